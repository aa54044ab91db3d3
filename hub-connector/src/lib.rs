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
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod answer;
pub mod apps;
pub mod backoff;
mod channel;
mod channels;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
mod connector;
mod e2e;
mod error;
pub mod load;
pub mod metrics;
pub mod pairing;
pub mod proxy_protocol;
pub mod reconnect;
mod registry;
pub mod report;
pub mod service;
mod shutdown;
mod state;
mod status;
mod tunnel;

pub use config::{ConfigError, HubConfig, RelayTarget};
pub use connector::{start, HubHandle, POLL_INTERVAL};
pub use error::HubError;
pub use state::HubStats;
pub use status::TunnelStatus;
