//! [`RelayError`]: why a relay could not start or reload. Network input never produces one of
//! these; a misbehaving peer gets a typed refusal on the wire instead.

use std::path::PathBuf;

/// Why starting, reloading or running the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot build the relay's TLS configuration: {0}")]
    Tls(#[from] keyway_proto::tls::TlsConfigError),
    #[error("invalid relay configuration: {0}")]
    Config(String),
    #[error("cannot read hubs file {path}: {source}")]
    HubsFileRead { path: PathBuf, source: std::io::Error },
    #[error("hubs file {path}, {source}; keeping the previous list")]
    HubsFileParse { path: PathBuf, source: keyway_proto::lists::ListError },
    #[error("cannot read bindings file {path}: {source}")]
    StateRead { path: PathBuf, source: std::io::Error },
    #[error("bindings file {path}, {source}")]
    StateParse { path: PathBuf, source: keyway_proto::lists::ListError },
    #[error("cannot write bindings file {path}: {source}")]
    StateWrite { path: PathBuf, source: std::io::Error },
    #[error("identity: {0}")]
    Identity(#[from] keyway_proto::IdentityError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
