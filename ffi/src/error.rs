//! [`KeywayError`]: every failure a binding call can return, typed, with a human message.
//!
//! uniffi turns it into `KeywayError.<Variant>` exceptions in Python, `KeywayException` in
//! Kotlin and a Swift `Error` enum. Each variant carries `detail`, the full message as the
//! Rust library words it (fingerprints expected and seen, what to check). A refusal by the
//! relay or the hub also carries its typed [`Refusal`] reason and wire code, so apps branch on
//! the reason, not on the text. The field is `detail`, not `message`: Kotlin exceptions already
//! have a `message` (uniffi builds it from the fields).

use keyway_client::{ChannelEnd, ClientError};
use keyway_proto::{IdentityError, RefusalReason};

/// Why a Keyway call failed.
#[derive(Debug, thiserror::Error, uniffi::Error)]
pub enum KeywayError {
    /// An argument the app passed cannot be used: bad key text, hub name, address, pairing
    /// code, read size.
    #[error("{detail}")]
    BadArgument { detail: String },
    /// The relay or the hub refused (see `reason`); `code` is the wire code, for reasons this
    /// build does not know (`Refusal::Other`).
    #[error("{detail}")]
    Refused { reason: Refusal, code: u16, detail: String },
    /// The relay did not answer over UDP (blocked network, relay down).
    #[error("{detail}")]
    RelayUnreachable { detail: String },
    /// The relay presented another key than the pinned one.
    #[error("{detail}")]
    RelayKeyMismatch { detail: String },
    /// The hub presented another key than the pinned one.
    #[error("{detail}")]
    HubKeyMismatch { detail: String },
    /// The end-to-end handshake with the hub failed (is the app key authorized?).
    #[error("{detail}")]
    HubRejected { detail: String },
    /// The hub (or the relay) revoked this app's access.
    #[error("{detail}")]
    Revoked { detail: String },
    /// The hub answered a pairing request with something other than success.
    #[error("{detail}")]
    PairingRejected { status: String, detail: String },
    /// A connection (to the relay or the hub) failed or was closed, or the relay ended the
    /// channel.
    #[error("{detail}")]
    Connection { detail: String },
    /// The relay or the hub broke the protocol.
    #[error("{detail}")]
    Protocol { detail: String },
    /// Reading or writing a key file, the known-hubs file, or a local socket failed.
    #[error("{detail}")]
    Io { detail: String },
    /// The app's storage (a [`crate::SecureStorage`] implementation) failed.
    #[error("{detail}")]
    Storage { detail: String },
    /// The stream was closed by `close()`; open a new one with `connect`.
    #[error("{detail}")]
    StreamClosed { detail: String },
    /// Something inside the library failed (a bug, or the runtime could not start).
    #[error("{detail}")]
    Internal { detail: String },
}

/// Why the relay or the hub refused: [`RefusalReason`] for the foreign side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Refusal {
    UnknownHub,
    HubOffline,
    HubKeyMismatch,
    AppNotAuthorized,
    NameNotAuthorized,
    NameClaimed,
    OverLimit,
    BadFrame,
    UnsupportedVersion,
    ProtocolViolation,
    ShuttingDown,
    Replaced,
    ServiceUnavailable,
    PairingClosed,
    Internal,
    /// A code this build does not know (the error's `code` holds it).
    Other,
}

impl From<RefusalReason> for Refusal {
    fn from(r: RefusalReason) -> Self {
        match r {
            RefusalReason::UnknownHub => Self::UnknownHub,
            RefusalReason::HubOffline => Self::HubOffline,
            RefusalReason::HubKeyMismatch => Self::HubKeyMismatch,
            RefusalReason::AppNotAuthorized => Self::AppNotAuthorized,
            RefusalReason::NameNotAuthorized => Self::NameNotAuthorized,
            RefusalReason::NameClaimed => Self::NameClaimed,
            RefusalReason::OverLimit => Self::OverLimit,
            RefusalReason::BadFrame => Self::BadFrame,
            RefusalReason::UnsupportedVersion => Self::UnsupportedVersion,
            RefusalReason::ProtocolViolation => Self::ProtocolViolation,
            RefusalReason::ShuttingDown => Self::ShuttingDown,
            RefusalReason::Replaced => Self::Replaced,
            RefusalReason::ServiceUnavailable => Self::ServiceUnavailable,
            RefusalReason::PairingClosed => Self::PairingClosed,
            RefusalReason::Internal => Self::Internal,
            RefusalReason::Other(_) => Self::Other,
        }
    }
}

impl KeywayError {
    pub(crate) fn bad_argument(what: &str, e: impl std::fmt::Display) -> Self {
        Self::BadArgument { detail: format!("{what}: {e}") }
    }

    /// The refusal reason, if this is a refusal (for Rust callers and tests).
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Self::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

impl From<&ClientError> for KeywayError {
    fn from(e: &ClientError) -> Self {
        let detail = e.to_string();
        match e {
            ClientError::Refused { reason, .. } => {
                Self::Refused { reason: (*reason).into(), code: reason.code(), detail }
            }
            ClientError::RelayUnreachable { .. } => Self::RelayUnreachable { detail },
            ClientError::RelayKeyMismatch(_) => Self::RelayKeyMismatch { detail },
            ClientError::HubKeyMismatch(_) => Self::HubKeyMismatch { detail },
            ClientError::HubRejected(_) => Self::HubRejected { detail },
            ClientError::Revoked | ClientError::ChannelEnded(ChannelEnd::Revoked) => Self::Revoked { detail },
            ClientError::PairingRejected { status, .. } => {
                Self::PairingRejected { status: format!("{status:?}"), detail }
            }
            ClientError::BadPairingCode(_) => Self::BadArgument { detail },
            // Redirected: the hub moved between cluster nodes again while the client followed
            // one redirect; a retry reaches it.
            ClientError::Connection(_)
            | ClientError::HubConnection(_)
            | ClientError::ChannelEnded(_)
            | ClientError::Redirected { .. } => Self::Connection { detail },
            ClientError::Protocol(_) => Self::Protocol { detail },
            ClientError::Io(_) => Self::Io { detail },
            ClientError::Config(_) | ClientError::Tls(_) => Self::Internal { detail },
        }
    }
}

impl From<ClientError> for KeywayError {
    fn from(e: ClientError) -> Self {
        (&e).into()
    }
}

impl From<IdentityError> for KeywayError {
    fn from(e: IdentityError) -> Self {
        let detail = e.to_string();
        match e {
            IdentityError::BadPublicKey(_) | IdentityError::BadKeyBytes => Self::BadArgument { detail },
            IdentityError::Random(_) | IdentityError::Pkcs8Encode(_) => Self::Internal { detail },
            _ => Self::Io { detail },
        }
    }
}

/// A stream's I/O error: the typed [`ClientError`] inside it when there is one (a refusal
/// arriving on the stream, `REVOKED`), else the I/O error itself.
impl From<std::io::Error> for KeywayError {
    fn from(e: std::io::Error) -> Self {
        match e.get_ref().and_then(|inner| inner.downcast_ref::<ClientError>()) {
            Some(typed) => typed.into(),
            None => Self::Io { detail: e.to_string() },
        }
    }
}

/// A foreign [`crate::SecureStorage`] that raised something its declared errors do not cover.
impl From<uniffi::UnexpectedUniFFICallbackError> for KeywayError {
    fn from(e: uniffi::UnexpectedUniFFICallbackError) -> Self {
        Self::Storage { detail: format!("the app's storage failed: {}", e.reason) }
    }
}
