//! [`PathError`]: how setting up a path or dialing the relay can fail.
//!
//! The app library and the hub connector each turn it into their own error: the variants are
//! what both need to tell apart (silence is a possibly blocked UDP path, another key is a
//! pinned-key mismatch naming both fingerprints), not how either reports it.

use std::net::SocketAddr;
use std::time::Duration;

use keyway_proto::tls::{KeyMismatch, TlsConfigError};

/// Why a path could not be set up or the relay could not be dialed.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The relay did not answer the QUIC handshake in time.
    #[error(
        "no answer from relay {addr} within {}: UDP to the relay may be blocked on this network, \
         or the relay is down",
        humantime::format_duration(*waited)
    )]
    RelayUnreachable { addr: SocketAddr, waited: Duration },
    /// The relay presented another key than the pinned one.
    #[error("the relay is not the pinned one: {0}")]
    RelayKeyMismatch(KeyMismatch),
    /// The QUIC connection to the relay failed or was closed.
    #[error("relay connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The TLS configuration could not be built (never caused by the network).
    #[error("TLS: {0}")]
    Tls(#[from] TlsConfigError),
    /// Local I/O failed (binding the socket).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] PathConfigError),
}

/// Why a path's configuration cannot work. Each message starts with `configuration:`.
#[derive(Debug, thiserror::Error)]
pub enum PathConfigError {
    #[error("configuration: a tokio runtime is required to bind the endpoint")]
    NoRuntime,
    #[error("configuration: idle timeout {idle_timeout:?} is too large")]
    IdleTimeoutTooLarge { idle_timeout: Duration, source: quinn::VarIntBoundsExceeded },
    #[error("configuration: cannot dial relay {relay}: {source}")]
    Dial { relay: SocketAddr, source: quinn::ConnectError },
}
