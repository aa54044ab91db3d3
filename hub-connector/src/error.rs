//! [`HubError`]: why the connector could not start or answer (local problems only: a relay
//! that fails is retried, never an error).
//!
//! Its own module, below everything that returns it, so that `config`, `apps` and the
//! drivers do not have to import it from the crate root that re-exports them.

use std::path::PathBuf;
use std::time::Duration;

use crate::status::TunnelStatus;

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
