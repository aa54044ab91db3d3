//! Keyway's hub connector: holds an outbound QUIC tunnel to each of its relays and bridges each
//! authorized session to a local TCP service.
//!
//! ```no_run
//! # async fn demo(config: keyway_hub::HubConfig) -> Result<(), keyway_hub::HubError> {
//! let hub = keyway_hub::start(config).await?; // returns at once; the tunnel retries forever
//! hub.wait_registered(std::time::Duration::from_secs(10)).await?;
//! // ... serve ...
//! hub.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The hub never listens: every connection is outbound, and nothing reaches the local service
//! that the relay has not authenticated and the hub has not authorized (twice: before
//! answering the relay, and after the end-to-end TLS handshake).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod apps;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod pairing;
pub mod proxy_protocol;
pub mod session;
pub mod tunnel;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use config::{HubConfig, RelayTarget};
pub use tunnel::{start, HubHandle, TunnelStatus};

/// Counters of one running connector (monotonic except `sessions_active`).
#[derive(Debug, Default)]
pub struct HubStats {
    pub(crate) announced: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) registrations: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) paired: AtomicU64,
    pub(crate) pairing_failures: AtomicU64,
}

impl HubStats {
    /// Sessions the relay announced.
    pub fn sessions_announced(&self) -> u64 {
        self.announced.load(Ordering::Relaxed)
    }
    /// Sessions answered with `SessionAccepted` (counted before the end-to-end handshake,
    /// so an app whose `connect` succeeded is always counted).
    pub fn sessions_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Sessions answered with `Refused` (not authorized, pairing closed, service unavailable).
    pub fn sessions_refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Sessions accepted and not yet ended.
    pub fn sessions_active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    /// Successful registrations with the relay (the first one included).
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }
    /// Apps paired successfully.
    pub fn paired(&self) -> u64 {
        self.paired.load(Ordering::Relaxed)
    }
    /// Pairing attempts refused for a wrong secret (or a malformed request).
    pub fn pairing_failures(&self) -> u64 {
        self.pairing_failures.load(Ordering::Relaxed)
    }
    /// Times a registered tunnel was lost (or moved after `GoAway`) and reconnecting began.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// Why the connector could not start (relay failures are not errors: they are retried).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Identity(#[from] keyway_proto::IdentityError),
    #[error("authorized apps file {path}: {source}")]
    Apps { path: PathBuf, source: keyway_proto::lists::ListError },
    #[error("cannot read authorized apps file {path}: {source}")]
    AppsRead { path: PathBuf, source: std::io::Error },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    Client(#[from] keyway_client::ClientError),
    #[error("not registered with the relay after {}; tunnel status: {last}", humantime::format_duration(*waited))]
    NotRegistered { waited: Duration, last: TunnelStatus },
    #[error("the connector has stopped")]
    Stopped,
}

impl From<keyway_proto::tls::TlsConfigError> for HubError {
    fn from(e: keyway_proto::tls::TlsConfigError) -> Self {
        HubError::Tls(e.to_string())
    }
}
