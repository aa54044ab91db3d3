//! [`HubError`]: why the connector could not start or answer (local problems only: a relay
//! that fails is retried, never an error).
//!
//! Its own module, below everything that returns it, so that `apps` and the drivers do not
//! have to import it from the crate root that re-exports them. Every variant keeps what
//! caused it as its source; the messages are the ones the connector has always printed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::ConfigError;
use crate::status::TunnelStatus;

/// Why the connector could not start (relay failures are not errors: they are retried).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The config cannot work (its message says what to change).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `/metrics` listener could not be bound.
    #[error("configuration: cannot listen for metrics on {addr}: {source}")]
    MetricsListen { addr: SocketAddr, source: std::io::Error },
    /// The bound `/metrics` listener could not be served (its address cannot be read).
    #[error("configuration: cannot listen for metrics: {0}")]
    MetricsServe(#[source] std::io::Error),
    #[error(transparent)]
    Identity(#[from] keyway_proto::IdentityError),
    #[error("authorized apps file {path}: {source}")]
    Apps { path: PathBuf, source: keyway_proto::lists::ListError },
    #[error("cannot read authorized apps file {path}: {source}")]
    AppsRead { path: PathBuf, source: std::io::Error },
    /// Transparent: each `TlsConfigError` already says it is about the TLS configuration
    /// (a prefix here printed "TLS configuration: TLS configuration: …").
    #[error(transparent)]
    Tls(#[from] keyway_proto::tls::TlsConfigError),
    /// The path layer: binding the socket, dialing a relay.
    #[error(transparent)]
    Path(#[from] keyway_path::PathError),
    #[error("not registered with the relay after {}; tunnel status: {last}", humantime::format_duration(*waited))]
    NotRegistered { waited: Duration, last: TunnelStatus },
    #[error("the connector has stopped")]
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_configuration_error_says_so_once() {
        let e = HubError::from(keyway_proto::tls::TlsConfigError::Rustls(rustls::Error::General(
            "no key".into(),
        )));
        assert_eq!(e.to_string(), "TLS configuration: unexpected error: no key");
    }
}
