//! [`RelayError`]: why a relay could not start or reload, and [`RelayConfigError`]: what is
//! wrong with a configuration. Network input never produces one of these; a misbehaving peer
//! gets a typed refusal on the wire instead.

use std::time::Duration;

use crate::limits::LimitsError;
use crate::policy::NameBookError;

/// Why starting, reloading or running the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot start the relay's I/O thread: {0}")]
    IoThread(#[source] std::io::Error),
    #[error("cannot build the relay's TLS configuration: {0}")]
    Tls(#[from] keyway_proto::tls::TlsConfigError),
    /// The message shows the detail and keeps it as the source; the binary's
    /// `keyway_proto::cli::error_report` says a cause already in the line only once.
    #[error("invalid relay configuration: {0}")]
    Config(#[from] RelayConfigError),
    /// The name book's files (the hubs file, the open policy's bindings).
    #[error(transparent)]
    NameBook(#[from] NameBookError),
    #[error("identity: {0}")]
    Identity(#[from] keyway_proto::IdentityError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::config::ClusterError),
}

/// What is wrong with a [`RelayConfig`](crate::RelayConfig) or the limits given to a running
/// relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayConfigError {
    #[error("idle_timeout and session_open_timeout must be above zero")]
    ZeroTimeout,
    #[error("idle timeout {idle_timeout:?} is too large")]
    IdleTimeoutTooLarge {
        idle_timeout: Duration,
        #[source]
        source: quinn::VarIntBoundsExceeded,
    },
    #[error(transparent)]
    Limits(#[from] LimitsError),
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn configuration_errors_read_as_before_and_keep_their_cause() {
        let e = RelayError::from(RelayConfigError::from(LimitsError::NoStreams));
        assert_eq!(
            e.to_string(),
            "invalid relay configuration: max_streams_per_connection must be at least 1"
        );
        assert!(matches!(&e, RelayError::Config(RelayConfigError::Limits(LimitsError::NoStreams))));
        assert!(e.source().is_some(), "the detail is kept as the source");
        #[cfg(feature = "cli")]
        assert_eq!(
            keyway_proto::cli::error_report(&e),
            "invalid relay configuration: max_streams_per_connection must be at least 1",
            "the binary says the detail once"
        );
        let e = RelayError::from(RelayConfigError::ZeroTimeout);
        assert_eq!(
            e.to_string(),
            "invalid relay configuration: idle_timeout and session_open_timeout must be above zero"
        );
        let Err(source) = quinn::IdleTimeout::try_from(Duration::MAX) else { panic!("too large") };
        let e = RelayConfigError::IdleTimeoutTooLarge { idle_timeout: Duration::MAX, source };
        assert!(e.to_string().starts_with("idle timeout ") && e.to_string().ends_with(" is too large"));
        assert!(e.source().is_some(), "quinn's bound error is kept");
        let RelayError::Config(e) = RelayError::from(e) else { panic!("a configuration error") };
        assert!(e.source().is_some());
    }
}
