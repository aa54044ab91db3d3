//! The pairing wire: the `keyway://pair?…` code and the exchange inside the end-to-end session.
//!
//! `keyway-hub pair` prints a [`PairingCode`], a URI holding everything an app needs to reach
//! the hub for the first time (relay address and key, hub name and key) plus a one-time
//! secret. The app opens a session with purpose `Pair`, runs the end-to-end TLS handshake
//! pinning the hub key from the code, and only *inside* that session sends the secret; the hub
//! answers with a [`PairStatus`] (`docs/protocol.md`, "Pairing"):
//! * app → hub: `[version u8 = 1][secret length u8][secret]` ([`write_request`], [`read_request`]);
//! * hub → app: `[status u8][message length u16 BE][UTF-8 message]` ([`write_answer`],
//!   [`read_answer`]).
//!
//! It lives here, not in the client library, because both ends speak it: the hub connector
//! reads requests and writes answers, apps do the reverse, and `proto/fuzz` fuzzes the readers
//! and the code parser. The app's pairing *flow* (dialing, storing what it learned) stays in
//! `keyway-client`.

use std::fmt;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{FrameError, HubName};
use crate::identity::{IdentityError, PublicKey};

/// Version byte of the pairing request.
pub const PAIR_VERSION: u8 = 1;
/// Length of the secret `keyway-hub pair` generates (128 bits).
pub const SECRET_LEN: usize = 16;
/// Largest secret accepted on the wire (bounds what the hub reads).
pub const MAX_SECRET_LEN: usize = 64;
/// Largest answer message accepted.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// A pairing code could not be understood. Every variant says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BadPairingCode {
    #[error("invalid pairing code: it must start with keyway://pair?")]
    NotAPairingCode,
    #[error("invalid pairing code: expected key=value parameters")]
    NotKeyValue,
    #[error("invalid pairing code: parameter {0} is missing")]
    Missing(&'static str),
    #[error("invalid pairing code: parameter {0} appears twice")]
    Repeated(&'static str),
    #[error("invalid pairing code: relay must be HOST:PORT")]
    BadRelay,
    #[error("invalid pairing code: {field}: {source}")]
    BadKey { field: &'static str, source: IdentityError },
    #[error("invalid pairing code: hub: {0}")]
    BadHub(#[source] FrameError),
    #[error("invalid pairing code: secret is not base32")]
    SecretNotBase32,
    #[error("invalid pairing code: secret has a bad length")]
    SecretLength,
}

/// Everything a pairing code carries.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode {
    /// Relay address as `HOST:PORT` (resolved when pairing).
    pub relay: String,
    /// The relay's public key.
    pub relay_key: PublicKey,
    /// The hub's name at the relay.
    pub hub: HubName,
    /// The hub's public key.
    pub hub_key: PublicKey,
    /// The one-time secret.
    pub secret: Vec<u8>,
}

/// The secret is never printed by `Debug` (codes end up in logs via `?` formatting).
impl fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingCode")
            .field("relay", &self.relay)
            .field("relay_key", &self.relay_key)
            .field("hub", &self.hub)
            .field("hub_key", &self.hub_key)
            .field("secret", &"<redacted>")
            .finish()
    }
}

const SCHEME: &str = "keyway://pair?";

fn need<'a>(v: Option<&'a str>, k: &'static str) -> Result<&'a str, BadPairingCode> {
    v.ok_or(BadPairingCode::Missing(k))
}

fn b32() -> data_encoding::Encoding {
    data_encoding::BASE32_NOPAD
}

/// The URI form: `keyway://pair?relay=…&relay_key=kw…&hub=…&hub_key=kw…&secret=…`. The
/// secret is lowercase base32 without padding, like the keys.
impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}relay={}&relay_key={}&hub={}&hub_key={}&secret={}",
            self.relay,
            self.relay_key,
            self.hub,
            self.hub_key,
            b32().encode(&self.secret).to_ascii_lowercase()
        )
    }
}

impl FromStr for PairingCode {
    type Err = BadPairingCode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let query = text.trim().strip_prefix(SCHEME).ok_or(BadPairingCode::NotAPairingCode)?;
        let (mut relay, mut relay_key, mut hub, mut hub_key, mut secret) = (None, None, None, None, None);
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').ok_or(BadPairingCode::NotKeyValue)?;
            let (slot, k) = match k {
                "relay" => (&mut relay, "relay"),
                "relay_key" => (&mut relay_key, "relay_key"),
                "hub" => (&mut hub, "hub"),
                "hub_key" => (&mut hub_key, "hub_key"),
                "secret" => (&mut secret, "secret"),
                // Unknown parameters are ignored so a later version can add some.
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(BadPairingCode::Repeated(k));
            }
        }
        let relay = need(relay, "relay")?;
        if relay.is_empty() || relay.len() > 255 || !relay.contains(':') {
            return Err(BadPairingCode::BadRelay);
        }
        let key = |v: &str, field: &'static str| {
            v.parse::<PublicKey>().map_err(|source| BadPairingCode::BadKey { field, source })
        };
        let secret = b32()
            .decode(need(secret, "secret")?.to_ascii_uppercase().as_bytes())
            .map_err(|_| BadPairingCode::SecretNotBase32)?;
        if secret.is_empty() || secret.len() > MAX_SECRET_LEN {
            return Err(BadPairingCode::SecretLength);
        }
        Ok(PairingCode {
            relay: relay.to_owned(),
            relay_key: key(need(relay_key, "relay_key")?, "relay_key")?,
            hub: need(hub, "hub")?.parse().map_err(BadPairingCode::BadHub)?,
            hub_key: key(need(hub_key, "hub_key")?, "hub_key")?,
            secret,
        })
    }
}

/// The hub's answer to a pairing request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairStatus {
    /// The app key was added to `authorized_apps`.
    Paired,
    /// The secret did not match (the attempt is counted at the hub).
    WrongSecret,
    /// No window is open: never opened, expired, already used, or closed after failures.
    WindowClosed,
    /// The request was malformed.
    BadRequest,
    /// The hub failed to record the key.
    Internal,
    /// A status this build does not know.
    Other(u8),
}

impl PairStatus {
    pub fn code(self) -> u8 {
        match self {
            Self::Paired => 0,
            Self::WrongSecret => 1,
            Self::WindowClosed => 2,
            Self::BadRequest => 3,
            Self::Internal => 4,
            Self::Other(c) => c,
        }
    }
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Paired,
            1 => Self::WrongSecret,
            2 => Self::WindowClosed,
            3 => Self::BadRequest,
            4 => Self::Internal,
            c => Self::Other(c),
        }
    }
}

impl fmt::Display for PairStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Paired => f.write_str("paired"),
            Self::WrongSecret => f.write_str("wrong_secret"),
            Self::WindowClosed => f.write_str("window_closed"),
            Self::BadRequest => f.write_str("bad_request"),
            Self::Internal => f.write_str("internal"),
            Self::Other(c) => write!(f, "status {c}"),
        }
    }
}

/// Why the hub's answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The answer announces a message over [`MAX_MESSAGE_LEN`]; it is not read.
    #[error("pairing answer message too long")]
    MessageTooLong { len: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Sends the pairing request (app side).
pub async fn write_request<W: AsyncWrite + Unpin>(w: &mut W, secret: &[u8]) -> std::io::Result<()> {
    let len = u8::try_from(secret.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_SECRET_LEN)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "secret too long"))?;
    let mut buf = Vec::with_capacity(2 + secret.len());
    buf.extend_from_slice(&[PAIR_VERSION, len]);
    buf.extend_from_slice(secret);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads a pairing request (hub side). `Ok(None)`: malformed (bad version or length).
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).await?;
    let [version, len] = head;
    if version != PAIR_VERSION || len == 0 || usize::from(len) > MAX_SECRET_LEN {
        return Ok(None);
    }
    let mut secret = vec![0u8; usize::from(len)];
    r.read_exact(&mut secret).await?;
    Ok(Some(secret))
}

/// Sends the hub's answer, trimming the message to [`MAX_MESSAGE_LEN`] bytes on a char boundary.
pub async fn write_answer<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: PairStatus,
    message: &str,
) -> std::io::Result<()> {
    let mut end = message.len().min(MAX_MESSAGE_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = message.get(..end).unwrap_or_default().as_bytes();
    let mut buf = Vec::with_capacity(3 + msg.len());
    buf.push(status.code());
    // `msg` is at most MAX_MESSAGE_LEN bytes, which fits in u16.
    buf.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    buf.extend_from_slice(msg);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads the hub's answer (app side). Invalid UTF-8 in the message is replaced, not refused:
/// the message is for a human, the status is what counts.
pub async fn read_answer<R: AsyncRead + Unpin>(r: &mut R) -> Result<(PairStatus, String), AnswerError> {
    let mut head = [0u8; 3];
    r.read_exact(&mut head).await?;
    let [status, l0, l1] = head;
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    if len > MAX_MESSAGE_LEN {
        return Err(AnswerError::MessageTooLong { len });
    }
    let mut msg = vec![0u8; len];
    r.read_exact(&mut msg).await?;
    Ok((PairStatus::from_code(status), String::from_utf8_lossy(&msg).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn code() -> PairingCode {
        PairingCode {
            relay: "relay.example:4433".into(),
            relay_key: Identity::from_seed([1; 32]).public_key(),
            hub: HubName::new("home").unwrap(),
            hub_key: Identity::from_seed([2; 32]).public_key(),
            secret: vec![7; SECRET_LEN],
        }
    }

    #[test]
    fn uri_round_trips_and_debug_hides_the_secret() {
        let c = code();
        let text = c.to_string();
        assert!(text.starts_with("keyway://pair?relay=relay.example:4433&"), "{text}");
        assert_eq!(text.parse::<PairingCode>().unwrap(), c);
        let secret = b32().encode(&c.secret).to_ascii_lowercase();
        assert!(!format!("{c:?}").contains(&secret));
        // IPv6 literals survive too.
        let v6 = PairingCode { relay: "[::1]:4433".into(), ..code() };
        assert_eq!(v6.to_string().parse::<PairingCode>().unwrap(), v6);
    }

    #[test]
    fn bad_codes_are_named() {
        let good = code().to_string();
        for (text, why) in [
            ("https://x", "keyway://pair"),
            (&good.replace("&secret=", "&sekret="), "secret is missing"),
            (&good.replace("hub=home", "hub=Home!"), "hub"),
            (&good.replace("relay_key=kw", "relay_key=xx"), "relay_key"),
            (&format!("{good}&hub=x"), "twice"),
            (&good.replace("relay=relay.example:4433", "relay="), "HOST:PORT"),
        ] {
            let err = text.parse::<PairingCode>().unwrap_err();
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn bad_code_messages_are_the_ones_users_have_always_seen() {
        let good = code().to_string();
        let message = |text: &str| text.parse::<PairingCode>().unwrap_err().to_string();
        assert_eq!(message("https://x"), "invalid pairing code: it must start with keyway://pair?");
        assert_eq!(message("keyway://pair?relay"), "invalid pairing code: expected key=value parameters");
        assert_eq!(
            message(&good.replace("&secret=", "&sekret=")),
            "invalid pairing code: parameter secret is missing"
        );
        assert_eq!(message(&format!("{good}&hub=x")), "invalid pairing code: parameter hub appears twice");
        assert_eq!(
            message(&good.replace("relay=relay.example:4433", "relay=")),
            "invalid pairing code: relay must be HOST:PORT"
        );
        assert_eq!(
            message(&good.replace("&secret=", "&secret=1")),
            "invalid pairing code: secret is not base32"
        );
        let no_secret = format!("{}&secret=", good.split("&secret=").next().unwrap());
        assert_eq!(message(&no_secret), "invalid pairing code: secret has a bad length");
        let bad_key = message(&good.replace("hub_key=kw", "hub_key=xx"));
        assert!(bad_key.starts_with("invalid pairing code: hub_key: not a Keyway public key: "), "{bad_key}");
        let bad_hub = message(&good.replace("hub=home", "hub=Home"));
        assert!(bad_hub.starts_with("invalid pairing code: hub: invalid hub name \"Home\""), "{bad_hub}");
        // The cause stays reachable for callers that want it.
        let err = good.replace("hub=home", "hub=Home").parse::<PairingCode>().unwrap_err();
        assert!(std::error::Error::source(&err).is_some());
    }

    #[tokio::test]
    async fn request_and_answer_round_trip_and_reject_garbage() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        write_request(&mut a, b"sesame").await.unwrap();
        assert_eq!(read_request(&mut b).await.unwrap().unwrap(), b"sesame");
        write_answer(&mut b, PairStatus::WrongSecret, "no").await.unwrap();
        assert_eq!(read_answer(&mut a).await.unwrap(), (PairStatus::WrongSecret, "no".into()));
        a.write_all(&[9, 3, 1, 2, 3]).await.unwrap();
        assert_eq!(read_request(&mut b).await.unwrap(), None, "unknown version");
        let long = "é".repeat(MAX_MESSAGE_LEN);
        write_answer(&mut b, PairStatus::Paired, &long).await.unwrap();
        let (status, msg) = read_answer(&mut a).await.unwrap();
        assert_eq!(status, PairStatus::Paired);
        assert!(msg.len() <= MAX_MESSAGE_LEN && msg.chars().all(|c| c == 'é'));
        for code in 0..=255u8 {
            assert_eq!(PairStatus::from_code(code).code(), code);
        }
    }

    #[tokio::test]
    async fn an_answer_announcing_too_long_a_message_is_refused_unread() {
        let mut wire: &[u8] = &[0, 0x04, 0x01, b'x'];
        let err = read_answer(&mut wire).await.unwrap_err();
        assert!(matches!(err, AnswerError::MessageTooLong { len: 1025 }), "{err:?}");
        assert_eq!(err.to_string(), "pairing answer message too long");
        assert_eq!(wire, b"x");
        let mut short: &[u8] = &[0, 0];
        assert!(matches!(read_answer(&mut short).await, Err(AnswerError::Io(_))));
    }
}
