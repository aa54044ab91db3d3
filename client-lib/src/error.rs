//! [`ClientError`]: every way `connect` can fail, as a typed error with a human message.
//!
//! "Errors are answers": a refusal from the relay or the hub arrives as a typed
//! [`RefusalReason`], a wrong pinned key names the fingerprints expected and seen, and a relay
//! that never answers is reported as a possibly blocked UDP path rather than as quinn's
//! generic timeout.

use std::net::SocketAddr;
use std::time::Duration;

use keyway_proto::tls::{KeyMismatch, TlsConfigError};
use keyway_proto::{FrameError, HubName, RefusalReason};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
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
    /// The relay or the hub refused the session.
    #[error("refused ({reason}): {message}")]
    Refused { reason: RefusalReason, message: String },
    /// The end-to-end handshake saw another hub key than the pinned one.
    #[error("the hub is not the pinned one: {0}")]
    HubKeyMismatch(KeyMismatch),
    /// The end-to-end handshake with the hub failed after the relay introduced the two.
    #[error(
        "the end-to-end handshake with the hub failed (is this app key in the hub's authorized_apps?): {0}"
    )]
    HubRejected(#[source] HandshakeError),
    /// The QUIC connection to the relay failed or was closed.
    #[error("relay connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The peer sent something the protocol does not allow here.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The TLS configuration could not be built (never caused by the network).
    #[error("TLS: {0}")]
    Tls(#[from] TlsConfigError),
    /// The hub answered a pairing request with something other than success.
    #[error("pairing refused by the hub ({status}): {message}")]
    PairingRejected { status: keyway_proto::pairing::PairStatus, message: String },
    /// A pairing code could not be understood.
    #[error(transparent)]
    BadPairingCode(#[from] keyway_proto::pairing::BadPairingCode),
    /// Local I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration cannot work (bad timer, relay address that does not resolve).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The relay ended the channel that carried the end-to-end connection.
    #[error(transparent)]
    ChannelEnded(#[from] ChannelEnd),
    /// The hub cut the end-to-end connection or stream with code `REVOKED`.
    #[error("the hub revoked this app's access: its key is no longer in the hub's authorized_apps")]
    Revoked,
    /// The end-to-end QUIC connection to the hub failed or was closed.
    #[error("end-to-end connection to the hub: {0}")]
    HubConnection(#[source] quinn::ConnectionError),
    /// A relay cluster node sent the request on to the node holding the hub, and this client
    /// does not follow redirects (a [`Client`](crate::Client) does, once per connect: this
    /// means the hub moved again meanwhile).
    #[error("the relay node says the hub is registered at cluster node {node}")]
    Redirected { node: SocketAddr },
}

/// Why the relay ended a channel, read from how it ended the channel stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelEnd {
    #[error("the relay ended the channel: this app's key was revoked")]
    Revoked,
    #[error("the relay ended the channel: idle for longer than the relay's idle session timeout")]
    Idle,
    #[error("the relay ended the channel: the hub's connection was replaced by a newer one")]
    HubReplaced,
    #[error("the relay ended the channel: the hub went away or closed it")]
    Closed,
    #[error("the relay ended the channel: the relay connection was lost: {0}")]
    RelayLost(#[source] quinn::ConnectionError),
}

/// Why a client's configuration cannot work. Each message starts with `configuration:`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: a tokio runtime is required to bind the endpoint")]
    NoRuntime,
    #[error("configuration: idle timeout {idle_timeout:?} is too large")]
    IdleTimeoutTooLarge { idle_timeout: Duration, source: quinn::VarIntBoundsExceeded },
    #[error("configuration: cannot dial relay {relay}: {source}")]
    Dial { relay: SocketAddr, source: quinn::ConnectError },
    #[error("configuration: cannot resolve relay {relay}: {source}")]
    Resolve { relay: String, source: std::io::Error },
    #[error("configuration: relay {relay} resolves to no address")]
    NoAddress { relay: String },
    #[error("configuration: cannot dial the end-to-end connection to the hub: {source}")]
    DialHub { source: quinn::ConnectError },
}

/// The relay or the hub broke the protocol. Each message starts with `protocol error:`.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("protocol error: the relay closed the session stream {what}")]
    StreamClosed { what: &'static str },
    #[error("protocol error: bad frame {what}: {source}")]
    BadFrame { what: &'static str, source: FrameError },
    #[error(
        "protocol error: no answer to the session request for hub {hub} within {}",
        humantime::format_duration(*waited)
    )]
    NoAnswer { hub: HubName, waited: Duration },
    #[error("protocol error: expected StreamAccepted or Refused, got {got}")]
    UnexpectedAnswer { got: &'static str },
    /// A relay or hub answer that is not the one the request asks for.
    #[error("protocol error: expected {expected} or Refused, got {got}")]
    UnexpectedFrame { expected: &'static str, got: &'static str },
    /// The hub's pairing answer announced a message over the limit.
    #[error("protocol error: {0}")]
    PairingAnswer(#[source] keyway_proto::pairing::AnswerError),
}

/// Why the end-to-end handshake with the hub failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the end-to-end handshake did not finish within {}", humantime::format_duration(*waited))]
    TimedOut { waited: Duration },
    /// The end-to-end QUIC handshake failed (TLS runs inside it).
    #[error(transparent)]
    Quic(quinn::ConnectionError),
}

impl From<keyway_path::PathError> for ClientError {
    /// The path layer's errors are the app's own: the same variants, so matching on
    /// `ClientError` tells them apart as before.
    fn from(e: keyway_path::PathError) -> Self {
        use keyway_path::{PathConfigError, PathError};
        match e {
            PathError::RelayUnreachable { addr, waited } => ClientError::RelayUnreachable { addr, waited },
            PathError::RelayKeyMismatch(m) => ClientError::RelayKeyMismatch(m),
            PathError::Connection(e) => ClientError::Connection(e),
            PathError::Tls(e) => ClientError::Tls(e),
            PathError::Io(e) => ClientError::Io(e),
            PathError::Config(PathConfigError::NoRuntime) => ConfigError::NoRuntime.into(),
            PathError::Config(PathConfigError::IdleTimeoutTooLarge { idle_timeout, source }) => {
                ConfigError::IdleTimeoutTooLarge { idle_timeout, source }.into()
            }
            PathError::Config(PathConfigError::Dial { relay, source }) => {
                ConfigError::Dial { relay, source }.into()
            }
        }
    }
}

impl ClientError {
    /// The typed refusal reason, if the relay or the hub refused.
    pub fn refusal(&self) -> Option<RefusalReason> {
        match self {
            ClientError::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// The answer's I/O failure stays an I/O error; a malformed answer is a protocol error, as it
/// was when the reader lived in this crate.
impl From<keyway_proto::pairing::AnswerError> for ClientError {
    fn from(e: keyway_proto::pairing::AnswerError) -> Self {
        match e {
            keyway_proto::pairing::AnswerError::Io(e) => ClientError::Io(e),
            e => ClientError::Protocol(ProtocolError::PairingAnswer(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    #[test]
    fn messages_explain_what_to_check() {
        let e = ClientError::RelayUnreachable {
            addr: "192.0.2.1:443".parse().unwrap(),
            waited: Duration::from_secs(5),
        };
        let text = e.to_string();
        assert!(text.contains("UDP") && text.contains("blocked") && text.contains("5s"), "{text}");
        assert_eq!(e.refusal(), None);

        let expected = Identity::from_seed([1; 32]).public_key();
        let seen = Identity::from_seed([2; 32]).public_key();
        let e = ClientError::HubKeyMismatch(KeyMismatch { expected, seen });
        let text = e.to_string();
        assert!(text.contains(&expected.fingerprint()) && text.contains(&seen.fingerprint()), "{text}");
        let e = ClientError::RelayKeyMismatch(KeyMismatch { expected, seen });
        assert!(e.to_string().contains("relay"));
    }

    #[test]
    fn refusals_are_typed() {
        let e =
            ClientError::Refused { reason: RefusalReason::HubOffline, message: "hub home is offline".into() };
        assert_eq!(e.refusal(), Some(RefusalReason::HubOffline));
        assert!(e.to_string().contains("hub_offline") && e.to_string().contains("offline"));
    }
}
