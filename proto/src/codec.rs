//! The wire codec: versioned, length-prefixed binary frames.
//!
//! Frames travel on the hub's control stream and at the head of every session stream (see
//! `docs/protocol.md` for who sends what, when). Everything after a session's header is opaque
//! end-to-end TLS and never passes through this codec.
//!
//! ```text
//! +---------+--------+-------------------+---------------------+
//! | version | type   | payload length    | payload             |
//! | u8 (=1) | u8     | u32, big endian   | `length` bytes      |
//! +---------+--------+-------------------+---------------------+
//! ```
//!
//! The codec is pure (no I/O, no allocation beyond the decoded values), refuses every field
//! over its limit before allocating for it, never panics on any input (the crate denies
//! `unwrap`, `expect`, `panic` and slice indexing), and is fuzzed (`proto/fuzz`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::channel::ChannelId;
use crate::identity::PublicKey;

/// The only protocol version this codec speaks.
pub const PROTOCOL_VERSION: u8 = 2;
/// Bytes of the frame header: version, type, payload length.
pub const HEADER_LEN: usize = 6;
/// Largest payload accepted, checked from the header before anything is read or allocated.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most app keys a hub may publish in one allow-list (32 KiB of keys).
pub const MAX_ALLOWED_APPS: usize = 1024;
/// Longest human message in a refusal or go-away frame, in bytes.
pub const MAX_MESSAGE: usize = 1024;
/// Longest hub name, in bytes (a DNS label).
pub const MAX_NAME: usize = 63;

/// Why a byte sequence is not a valid frame. Every variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("peer speaks protocol version {got}, this build speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion { got: u8 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max} for its type")]
    TooLarge { len: usize, max: usize },
    #[error("frame is truncated: {field} needs {needed} more bytes")]
    Truncated { field: &'static str, needed: usize },
    #[error("frame has {0} unexpected bytes after its last field")]
    TrailingBytes(usize),
    #[error("{field} is {len} long, over its limit of {max}")]
    FieldTooLong { field: &'static str, len: usize, max: usize },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("invalid hub name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("{field} is not a valid Ed25519 public key")]
    BadKey { field: &'static str },
    #[error("{field} has invalid value {value}")]
    BadValue { field: &'static str, value: u64 },
    #[error("expected a {expected} frame, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
}

/// Why the relay (or a hub) refused something. Sent in [`Frame::Refused`] with a human message.
///
/// Codes are stable on the wire; a code this build does not know decodes as
/// [`RefusalReason::Other`] so that a newer relay can add reasons without breaking old clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No hub by that name exists at this relay.
    UnknownHub,
    /// The hub exists but has no tunnel to the relay right now.
    HubOffline,
    /// The name is bound to another hub key than the one the app pins.
    HubKeyMismatch,
    /// The hub does not allow this app key.
    AppNotAuthorized,
    /// The relay's name policy does not let this hub key register this name.
    NameNotAuthorized,
    /// Another key already holds this name.
    NameClaimed,
    /// A relay limit was hit (hubs, sessions, streams, rate).
    OverLimit,
    /// A frame could not be decoded.
    BadFrame,
    /// The peer speaks an unsupported protocol version.
    UnsupportedVersion,
    /// A valid frame arrived where the protocol does not allow it.
    ProtocolViolation,
    /// The relay is shutting down.
    ShuttingDown,
    /// A newer connection for the same hub replaced this one.
    Replaced,
    /// The hub could not reach its local service.
    ServiceUnavailable,
    /// The hub's pairing window is not open.
    PairingClosed,
    /// Something failed inside the relay or hub.
    Internal,
    /// A code this build does not know.
    Other(u16),
}

impl RefusalReason {
    /// Every known reason, in code order (for metrics label sets and tests).
    pub const KNOWN: [RefusalReason; 15] = [
        Self::UnknownHub,
        Self::HubOffline,
        Self::HubKeyMismatch,
        Self::AppNotAuthorized,
        Self::NameNotAuthorized,
        Self::NameClaimed,
        Self::OverLimit,
        Self::BadFrame,
        Self::UnsupportedVersion,
        Self::ProtocolViolation,
        Self::ShuttingDown,
        Self::Replaced,
        Self::ServiceUnavailable,
        Self::PairingClosed,
        Self::Internal,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::UnknownHub => 1,
            Self::HubOffline => 2,
            Self::HubKeyMismatch => 3,
            Self::AppNotAuthorized => 4,
            Self::NameNotAuthorized => 5,
            Self::NameClaimed => 6,
            Self::OverLimit => 7,
            Self::BadFrame => 8,
            Self::UnsupportedVersion => 9,
            Self::ProtocolViolation => 10,
            Self::ShuttingDown => 11,
            Self::Replaced => 12,
            Self::ServiceUnavailable => 13,
            Self::PairingClosed => 14,
            Self::Internal => 15,
            Self::Other(code) => code,
        }
    }

    pub fn from_code(code: u16) -> Self {
        Self::KNOWN.iter().copied().find(|r| r.code() == code).unwrap_or(Self::Other(code))
    }

    /// A short, stable, lowercase label (used as the metrics label value).
    pub fn label(self) -> &'static str {
        match self {
            Self::UnknownHub => "unknown_hub",
            Self::HubOffline => "hub_offline",
            Self::HubKeyMismatch => "hub_key_mismatch",
            Self::AppNotAuthorized => "app_not_authorized",
            Self::NameNotAuthorized => "name_not_authorized",
            Self::NameClaimed => "name_claimed",
            Self::OverLimit => "over_limit",
            Self::BadFrame => "bad_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::ProtocolViolation => "protocol_violation",
            Self::ShuttingDown => "shutting_down",
            Self::Replaced => "replaced",
            Self::ServiceUnavailable => "service_unavailable",
            Self::PairingClosed => "pairing_closed",
            Self::Internal => "internal",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(code) => write!(f, "other({code})"),
            r => f.write_str(r.label()),
        }
    }
}

/// What an app wants from a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionPurpose {
    /// Reach the hub's service (the app key must be authorized).
    Connect,
    /// Pair a new app key (allowed only while the hub's pairing window is open).
    Pair,
}

impl SessionPurpose {
    fn code(self) -> u8 {
        match self {
            Self::Connect => 0,
            Self::Pair => 1,
        }
    }
}

/// A validated hub name: 1–63 bytes of `a-z`, `0-9` and `-`, not starting or ending with `-`
/// (a DNS label, so names can later become subdomains).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HubName(String);

impl HubName {
    pub fn new(name: &str) -> Result<Self, FrameError> {
        let bad = |why| FrameError::BadName { name: name.chars().take(MAX_NAME + 1).collect(), why };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_NAME {
            return Err(bad("it is longer than 63 bytes"));
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(bad("only a-z, 0-9 and '-' are allowed"));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(bad("it may not start or end with '-'"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HubName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for HubName {
    type Err = FrameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// One protocol frame. See `docs/protocol.md` for the flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// hub → relay, first frame on the control stream: claim `name` and publish the app keys
    /// the hub accepts (and whether its pairing window is open).
    Register {
        name: HubName,
        allowed_apps: Vec<PublicKey>,
        pairing_open: bool,
    },
    /// relay → hub: the name is yours. `replaced` says an older connection was displaced.
    Registered {
        replaced: bool,
    },
    /// hub → relay on the control stream: the new allow-list (replaces the previous one).
    AllowList {
        allowed_apps: Vec<PublicKey>,
        pairing_open: bool,
    },
    /// relay → anyone, hub → relay on a channel stream, or hub → app on a stream of the
    /// end-to-end connection: a typed refusal with a human message.
    Refused {
        reason: RefusalReason,
        message: String,
    },
    /// Liveness probe on the control stream (either direction); answered by `Pong`.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// relay → hub: the relay is going away; reconnect after `retry_after_ms` (± jitter).
    GoAway {
        retry_after_ms: u32,
        message: String,
    },
    /// app → relay, first frame of a channel stream: introduce me to `hub` for
    /// an end-to-end QUIC connection, under `channel`, the app's own id for it (drawn at random
    /// by the app, so its first flight can leave with this frame instead of a round trip later;
    /// the relay holds that flight until it has authorized). The stream stays open for the
    /// channel's life; either side ending it ends the channel.
    ChannelOpen {
        hub: HubName,
        hub_key: PublicKey,
        purpose: SessionPurpose,
        channel: ChannelId,
    },
    /// relay → hub, first frame of a stream the relay opens for a channel: the relay authorized
    /// `app_key` and will carry its end-to-end QUIC packets under `channel` (the hub's id).
    ChannelAnnounce {
        app_key: PublicKey,
        observed: SocketAddr,
        purpose: SessionPurpose,
        channel: ChannelId,
    },
    /// hub → relay: the hub accepts the channel and expects the app's first flight on it.
    ChannelAccepted,
    /// relay → app: the channel is up; send end-to-end packets under `channel` (the app's id).
    ChannelReady {
        channel: ChannelId,
    },
    /// app → hub, first frame of every stream on the end-to-end connection.
    StreamOpen,
    /// hub → app, first frame back on a stream: it reaches the hub's local service.
    StreamAccepted,
    /// relay → app, the answer to a `ChannelOpen` at a node of a relay cluster where the hub is
    /// not registered: it is registered at the node reachable at `node` (same relay key). The
    /// app dials that node and asks again; nothing about the hub was checked here, so the
    /// answer authorizes nothing.
    Redirect {
        node: SocketAddr,
    },
}

/// The wire's frame type numbers (a [`Header`]'s `kind`).
pub mod kind {
    pub const REGISTER: u8 = 1;
    pub const REGISTERED: u8 = 2;
    pub const ALLOW_LIST: u8 = 3;
    pub const REFUSED: u8 = 4;
    // 5, 6 and 7 were protocol version 1's spliced sessions (SessionOpen, SessionAnnounce,
    // SessionAccepted); they stay unassigned so no old frame can be misread.
    pub const PING: u8 = 8;
    pub const PONG: u8 = 9;
    pub const GO_AWAY: u8 = 10;
    pub const CHANNEL_OPEN: u8 = 11;
    pub const CHANNEL_ANNOUNCE: u8 = 12;
    pub const CHANNEL_ACCEPTED: u8 = 13;
    pub const CHANNEL_READY: u8 = 14;
    pub const STREAM_OPEN: u8 = 15;
    pub const STREAM_ACCEPTED: u8 = 16;
    pub const REDIRECT: u8 = 17;
    /// The highest kind this build knows.
    pub const LAST: u8 = REDIRECT;
}

/// A validated frame header: what a reader needs to know before reading the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub payload_len: usize,
}

impl Header {
    /// Validates the fixed-size header, so a reader never allocates for a bad or huge frame.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let [version, kind, l0, l1, l2, l3] = *bytes;
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion { got: version });
        }
        if kind_name(kind).is_none() {
            return Err(FrameError::UnknownType(kind));
        }
        let payload_len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        let max = max_payload(kind);
        if payload_len > max {
            return Err(FrameError::TooLarge { len: payload_len, max });
        }
        Ok(Self { kind, payload_len })
    }
}

/// The name of frame type `kind`, as [`Frame::name`] says it; `None` for a number no frame
/// of this build has (retired ones included).
pub fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        kind::REGISTER => "Register",
        kind::REGISTERED => "Registered",
        kind::ALLOW_LIST => "AllowList",
        kind::REFUSED => "Refused",
        kind::PING => "Ping",
        kind::PONG => "Pong",
        kind::GO_AWAY => "GoAway",
        kind::CHANNEL_OPEN => "ChannelOpen",
        kind::CHANNEL_ANNOUNCE => "ChannelAnnounce",
        kind::CHANNEL_ACCEPTED => "ChannelAccepted",
        kind::CHANNEL_READY => "ChannelReady",
        kind::STREAM_OPEN => "StreamOpen",
        kind::STREAM_ACCEPTED => "StreamAccepted",
        kind::REDIRECT => "Redirect",
        _ => return None,
    })
}

/// The largest payload a frame of `kind` can have when its fields are within their limits, so
/// a reader buffers no more for a frame than its type can hold (8 bytes for a `Ping`, not
/// [`MAX_PAYLOAD`]). Only the allow-list frames come near `MAX_PAYLOAD`.
pub fn max_payload(kind: u8) -> usize {
    const NAME: usize = 1 + MAX_NAME;
    const KEY: usize = 32;
    const KEYS: usize = 2 + MAX_ALLOWED_APPS * KEY;
    const MESSAGE: usize = 2 + MAX_MESSAGE;
    const ADDR: usize = 1 + 16 + 2;
    const CHANNEL: usize = 8;
    let max = match kind {
        kind::REGISTER => NAME + KEYS + 1,
        kind::REGISTERED => 1,
        kind::ALLOW_LIST => KEYS + 1,
        kind::REFUSED => 2 + MESSAGE,
        kind::PING | kind::PONG => 8,
        kind::GO_AWAY => 4 + MESSAGE,
        kind::CHANNEL_OPEN => NAME + KEY + 1 + CHANNEL,
        kind::CHANNEL_ANNOUNCE => KEY + ADDR + 1 + CHANNEL,
        kind::CHANNEL_READY => CHANNEL,
        kind::REDIRECT => ADDR,
        _ => 0,
    };
    max.min(MAX_PAYLOAD)
}

impl Frame {
    /// A short name of the frame type, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Register { .. } => "Register",
            Frame::Registered { .. } => "Registered",
            Frame::AllowList { .. } => "AllowList",
            Frame::Refused { .. } => "Refused",
            Frame::Ping { .. } => "Ping",
            Frame::Pong { .. } => "Pong",
            Frame::GoAway { .. } => "GoAway",
            Frame::ChannelOpen { .. } => "ChannelOpen",
            Frame::ChannelAnnounce { .. } => "ChannelAnnounce",
            Frame::ChannelAccepted => "ChannelAccepted",
            Frame::ChannelReady { .. } => "ChannelReady",
            Frame::StreamOpen => "StreamOpen",
            Frame::StreamAccepted => "StreamAccepted",
            Frame::Redirect { .. } => "Redirect",
        }
    }

    /// Builds a refusal, trimming the message to [`MAX_MESSAGE`] bytes on a char boundary.
    pub fn refused(reason: RefusalReason, message: impl Into<String>) -> Self {
        Frame::Refused { reason, message: truncate_message(message.into()) }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Register { .. } => kind::REGISTER,
            Frame::Registered { .. } => kind::REGISTERED,
            Frame::AllowList { .. } => kind::ALLOW_LIST,
            Frame::Refused { .. } => kind::REFUSED,
            Frame::Ping { .. } => kind::PING,
            Frame::Pong { .. } => kind::PONG,
            Frame::GoAway { .. } => kind::GO_AWAY,
            Frame::ChannelOpen { .. } => kind::CHANNEL_OPEN,
            Frame::ChannelAnnounce { .. } => kind::CHANNEL_ANNOUNCE,
            Frame::ChannelAccepted => kind::CHANNEL_ACCEPTED,
            Frame::ChannelReady { .. } => kind::CHANNEL_READY,
            Frame::StreamOpen => kind::STREAM_OPEN,
            Frame::StreamAccepted => kind::STREAM_ACCEPTED,
            Frame::Redirect { .. } => kind::REDIRECT,
        }
    }

    /// Encodes the frame, header included. Fails only if a field exceeds its limit (which a
    /// frame built from validated parts never does, but a hand-built one might).
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[PROTOCOL_VERSION, self.kind(), 0, 0, 0, 0]);
        let mut w = Writer(&mut out);
        match self {
            Frame::Register { name, allowed_apps, pairing_open } => {
                w.name(name);
                w.keys(allowed_apps)?;
                w.bool(*pairing_open);
            }
            Frame::Registered { replaced } => w.bool(*replaced),
            Frame::AllowList { allowed_apps, pairing_open } => {
                w.keys(allowed_apps)?;
                w.bool(*pairing_open);
            }
            Frame::Refused { reason, message } => {
                w.u16(reason.code());
                w.message("message", message)?;
            }
            Frame::Ping { nonce } | Frame::Pong { nonce } => w.u64(*nonce),
            Frame::GoAway { retry_after_ms, message } => {
                w.u32(*retry_after_ms);
                w.message("message", message)?;
            }
            Frame::ChannelOpen { hub, hub_key, purpose, channel } => {
                w.name(hub);
                w.key(hub_key);
                w.u8(purpose.code());
                w.u64(channel.get());
            }
            Frame::ChannelAnnounce { app_key, observed, purpose, channel } => {
                w.key(app_key);
                w.addr(observed);
                w.u8(purpose.code());
                w.u64(channel.get());
            }
            Frame::ChannelReady { channel } => w.u64(channel.get()),
            Frame::ChannelAccepted | Frame::StreamOpen | Frame::StreamAccepted => {}
            Frame::Redirect { node } => w.addr(node),
        }
        let payload_len = out.len() - HEADER_LEN;
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len: payload_len, max: MAX_PAYLOAD });
        }
        let len = (payload_len as u32).to_be_bytes();
        if let Some(slot) = out.get_mut(2..HEADER_LEN) {
            slot.copy_from_slice(&len);
        }
        Ok(out)
    }

    /// Decodes the payload of a frame whose header was already validated.
    pub fn decode_payload(header: Header, payload: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader(payload);
        let frame = match header.kind {
            kind::REGISTER => Frame::Register {
                name: r.name()?,
                allowed_apps: r.keys()?,
                pairing_open: r.bool("pairing_open")?,
            },
            kind::REGISTERED => Frame::Registered { replaced: r.bool("replaced")? },
            kind::ALLOW_LIST => {
                Frame::AllowList { allowed_apps: r.keys()?, pairing_open: r.bool("pairing_open")? }
            }
            kind::REFUSED => Frame::Refused {
                reason: RefusalReason::from_code(r.u16("reason")?),
                message: r.message("message")?,
            },
            kind::PING => Frame::Ping { nonce: r.u64("nonce")? },
            kind::PONG => Frame::Pong { nonce: r.u64("nonce")? },
            kind::GO_AWAY => {
                Frame::GoAway { retry_after_ms: r.u32("retry_after_ms")?, message: r.message("message")? }
            }
            kind::CHANNEL_OPEN => Frame::ChannelOpen {
                hub: r.name()?,
                hub_key: r.key("hub_key")?,
                purpose: r.purpose()?,
                channel: ChannelId::new(r.u64("channel")?),
            },
            kind::CHANNEL_ANNOUNCE => Frame::ChannelAnnounce {
                app_key: r.key("app_key")?,
                observed: r.addr()?,
                purpose: r.purpose()?,
                channel: ChannelId::new(r.u64("channel")?),
            },
            kind::CHANNEL_ACCEPTED => Frame::ChannelAccepted,
            kind::CHANNEL_READY => Frame::ChannelReady { channel: ChannelId::new(r.u64("channel")?) },
            kind::STREAM_OPEN => Frame::StreamOpen,
            kind::STREAM_ACCEPTED => Frame::StreamAccepted,
            kind::REDIRECT => Frame::Redirect { node: r.addr()? },
            other => return Err(FrameError::UnknownType(other)),
        };
        if !r.0.is_empty() {
            return Err(FrameError::TrailingBytes(r.0.len()));
        }
        Ok(frame)
    }

    /// Decodes one frame from the front of `buf`. Returns `Ok(None)` when more bytes are
    /// needed, or the frame and how many bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Some((head, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::decode(head)?;
        let Some(payload) = rest.get(..header.payload_len) else {
            return Ok(None);
        };
        let frame = Self::decode_payload(header, payload)?;
        Ok(Some((frame, HEADER_LEN + header.payload_len)))
    }
}

fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn name(&mut self, name: &HubName) {
        // HubName guarantees ≤ 63 bytes.
        self.u8(name.0.len() as u8);
        self.0.extend_from_slice(name.0.as_bytes());
    }
    fn key(&mut self, key: &PublicKey) {
        self.0.extend_from_slice(key.as_bytes());
    }
    fn keys(&mut self, keys: &[PublicKey]) -> Result<(), FrameError> {
        if keys.len() > MAX_ALLOWED_APPS {
            return Err(FrameError::FieldTooLong {
                field: "allowed_apps",
                len: keys.len(),
                max: MAX_ALLOWED_APPS,
            });
        }
        self.u16(keys.len() as u16);
        for key in keys {
            self.key(key);
        }
        Ok(())
    }
    fn message(&mut self, field: &'static str, msg: &str) -> Result<(), FrameError> {
        if msg.len() > MAX_MESSAGE {
            return Err(FrameError::FieldTooLong { field, len: msg.len(), max: MAX_MESSAGE });
        }
        self.u16(msg.len() as u16);
        self.0.extend_from_slice(msg.as_bytes());
        Ok(())
    }
    fn addr(&mut self, addr: &SocketAddr) {
        match addr.ip() {
            IpAddr::V4(ip) => {
                self.u8(4);
                self.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.u8(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.u16(addr.port());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated { field, needed: n - self.0.len() });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, FrameError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(FrameError::BadValue { field, value: v.into() }),
        }
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
    fn name(&mut self) -> Result<HubName, FrameError> {
        let len = self.u8("name length")? as usize;
        if len > MAX_NAME {
            return Err(FrameError::FieldTooLong { field: "name", len, max: MAX_NAME });
        }
        let bytes = self.take("name", len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| FrameError::BadUtf8 { field: "name" })?;
        HubName::new(s)
    }
    fn key(&mut self, field: &'static str) -> Result<PublicKey, FrameError> {
        PublicKey::from_bytes(self.array(field)?).map_err(|_| FrameError::BadKey { field })
    }
    fn keys(&mut self) -> Result<Vec<PublicKey>, FrameError> {
        let count = self.u16("allowed_apps count")? as usize;
        if count > MAX_ALLOWED_APPS {
            return Err(FrameError::FieldTooLong {
                field: "allowed_apps",
                len: count,
                max: MAX_ALLOWED_APPS,
            });
        }
        if self.0.len() < count * 32 {
            return Err(FrameError::Truncated { field: "allowed_apps", needed: count * 32 - self.0.len() });
        }
        (0..count).map(|_| self.key("allowed_apps")).collect()
    }
    fn message(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = self.u16(field)? as usize;
        if len > MAX_MESSAGE {
            return Err(FrameError::FieldTooLong { field, len, max: MAX_MESSAGE });
        }
        let bytes = self.take(field, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::BadUtf8 { field })
    }
    fn addr(&mut self) -> Result<SocketAddr, FrameError> {
        let ip = match self.u8("address family")? {
            4 => IpAddr::V4(Ipv4Addr::from(self.array::<4>("ipv4 address")?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.array::<16>("ipv6 address")?)),
            v => return Err(FrameError::BadValue { field: "address family", value: v.into() }),
        };
        Ok(SocketAddr::new(ip, self.u16("port")?))
    }
    fn purpose(&mut self) -> Result<SessionPurpose, FrameError> {
        match self.u8("purpose")? {
            0 => Ok(SessionPurpose::Connect),
            1 => Ok(SessionPurpose::Pair),
            v => Err(FrameError::BadValue { field: "purpose", value: v.into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use proptest::prelude::*;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    fn name(s: &str) -> HubName {
        HubName::new(s).unwrap()
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Register { name: name("home"), allowed_apps: vec![key(1), key(2)], pairing_open: false },
            Frame::Register { name: name("a"), allowed_apps: vec![], pairing_open: true },
            Frame::Registered { replaced: true },
            Frame::Registered { replaced: false },
            Frame::AllowList { allowed_apps: vec![key(3)], pairing_open: true },
            Frame::refused(RefusalReason::HubOffline, "hub \"home\" is offline"),
            Frame::Refused { reason: RefusalReason::Other(999), message: String::new() },
            Frame::Ping { nonce: u64::MAX },
            Frame::Pong { nonce: 0 },
            Frame::GoAway { retry_after_ms: 1500, message: "relay restarting".into() },
            Frame::ChannelOpen {
                hub: name("home"),
                hub_key: key(6),
                purpose: SessionPurpose::Connect,
                channel: ChannelId::new(0xfeed_0000_0000_0001),
            },
            Frame::ChannelAnnounce {
                app_key: key(7),
                observed: "198.51.100.9:5000".parse().unwrap(),
                purpose: SessionPurpose::Pair,
                channel: ChannelId::new(0x0123_4567_89ab_cdef),
            },
            Frame::ChannelAccepted,
            Frame::ChannelReady { channel: ChannelId::new(u64::MAX) },
            Frame::StreamOpen,
            Frame::StreamAccepted,
            Frame::Redirect { node: "[2001:db8::1]:4433".parse().unwrap() },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in samples() {
            let bytes = frame.encode().unwrap();
            let (decoded, used) = Frame::decode(&bytes).unwrap().unwrap();
            assert_eq!(decoded, frame);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn every_strict_prefix_asks_for_more_or_fails_cleanly() {
        for frame in samples() {
            let bytes = frame.encode().unwrap();
            for cut in 0..bytes.len() {
                assert_eq!(Frame::decode(&bytes[..cut]), Ok(None), "{} cut at {cut}", frame.name());
            }
        }
    }

    #[test]
    fn two_frames_back_to_back_decode_in_order() {
        let mut buf = Frame::Ping { nonce: 1 }.encode().unwrap();
        buf.extend(Frame::StreamAccepted.encode().unwrap());
        let (first, used) = Frame::decode(&buf).unwrap().unwrap();
        assert_eq!(first, Frame::Ping { nonce: 1 });
        let (second, _) = Frame::decode(&buf[used..]).unwrap().unwrap();
        assert_eq!(second, Frame::StreamAccepted);
    }

    #[test]
    fn wrong_version_is_named() {
        let mut bytes = Frame::StreamAccepted.encode().unwrap();
        bytes[0] = 1;
        let err = Frame::decode(&bytes).unwrap_err();
        assert_eq!(err, FrameError::UnsupportedVersion { got: 1 });
        assert!(err.to_string().contains("version 1"), "{err}");
    }

    #[test]
    fn unknown_type_is_refused() {
        // 5-7 were version 1's spliced sessions: retired, never reassigned.
        for t in [0u8, 5, 6, 7, kind::LAST + 1, 200, 255] {
            let bytes = [PROTOCOL_VERSION, t, 0, 0, 0, 0];
            assert_eq!(Frame::decode(&bytes), Err(FrameError::UnknownType(t)));
        }
    }

    #[test]
    fn oversized_payload_is_refused_from_the_header() {
        let mut bytes = vec![PROTOCOL_VERSION, kind::PING];
        bytes.extend(((MAX_PAYLOAD + 1) as u32).to_be_bytes());
        assert!(matches!(Frame::decode(&bytes), Err(FrameError::TooLarge { .. })));
        bytes[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Frame::decode(&bytes), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn each_frame_type_holds_its_largest_frame_and_not_a_byte_more() {
        let long = name(&"a".repeat(MAX_NAME));
        let keys: Vec<PublicKey> = (0..MAX_ALLOWED_APPS).map(|_| key(9)).collect();
        let message = "m".repeat(MAX_MESSAGE);
        let v6: SocketAddr = "[2001:db8::1]:4433".parse().unwrap();
        let largest = [
            Frame::Register { name: long.clone(), allowed_apps: keys.clone(), pairing_open: true },
            Frame::Registered { replaced: true },
            Frame::AllowList { allowed_apps: keys, pairing_open: true },
            Frame::Refused { reason: RefusalReason::HubOffline, message: message.clone() },
            Frame::Ping { nonce: 1 },
            Frame::Pong { nonce: 1 },
            Frame::GoAway { retry_after_ms: 1, message },
            Frame::ChannelOpen {
                hub: long,
                hub_key: key(6),
                purpose: SessionPurpose::Connect,
                channel: ChannelId::new(1),
            },
            Frame::ChannelAnnounce {
                app_key: key(7),
                observed: v6,
                purpose: SessionPurpose::Pair,
                channel: ChannelId::new(1),
            },
            Frame::ChannelAccepted,
            Frame::ChannelReady { channel: ChannelId::new(1) },
            Frame::StreamOpen,
            Frame::StreamAccepted,
            Frame::Redirect { node: v6 },
        ];
        for frame in largest {
            let bytes = frame.encode().unwrap();
            let max = max_payload(frame.kind());
            assert_eq!(bytes.len() - HEADER_LEN, max, "{} at its field limits", frame.name());
            assert!(Frame::decode(&bytes).unwrap().is_some());
            assert_eq!(kind_name(frame.kind()), Some(frame.name()));
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&bytes[..HEADER_LEN]);
            header[2..].copy_from_slice(&((max + 1) as u32).to_be_bytes());
            assert_eq!(
                Header::decode(&header),
                Err(FrameError::TooLarge { len: max + 1, max }),
                "{}",
                frame.name()
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes =
            Frame::Refused { reason: RefusalReason::HubOffline, message: String::new() }.encode().unwrap();
        bytes.push(0);
        bytes[5] += 1;
        assert_eq!(Frame::decode(&bytes), Err(FrameError::TrailingBytes(1)));
    }

    #[test]
    fn truncated_field_inside_a_complete_frame_is_named() {
        // A Ping whose header says 4 bytes: the u64 nonce is cut.
        let bytes = [PROTOCOL_VERSION, kind::PING, 0, 0, 0, 4, 1, 2, 3, 4];
        assert_eq!(Frame::decode(&bytes), Err(FrameError::Truncated { field: "nonce", needed: 4 }));
    }

    fn frame_with_payload(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![PROTOCOL_VERSION, kind];
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn bad_bool_purpose_and_family_values_are_refused() {
        assert_eq!(
            Frame::decode(&frame_with_payload(kind::REGISTERED, &[2])),
            Err(FrameError::BadValue { field: "replaced", value: 2 })
        );
        let mut open = vec![1, b'a'];
        open.extend(key(1).as_bytes());
        open.push(7);
        assert_eq!(
            Frame::decode(&frame_with_payload(kind::CHANNEL_OPEN, &open)),
            Err(FrameError::BadValue { field: "purpose", value: 7 })
        );
        let mut ann = key(1).as_bytes().to_vec();
        ann.push(5);
        assert!(matches!(
            Frame::decode(&frame_with_payload(kind::CHANNEL_ANNOUNCE, &ann)),
            Err(FrameError::BadValue { field: "address family", .. })
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "-a", "a-", "Home", "a b", "ä", &"a".repeat(64)] {
            assert!(HubName::new(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "home", "my-hub-1", &"a".repeat(63)] {
            assert!(HubName::new(good).is_ok(), "{good:?}");
        }
        // On the wire: a 64-byte name length is refused before reading it.
        let mut payload = vec![64];
        payload.extend([b'a'; 64]);
        assert!(matches!(
            Frame::decode(&frame_with_payload(kind::REGISTER, &payload)),
            Err(FrameError::FieldTooLong { field: "name", .. })
        ));
        // Invalid UTF-8 and invalid characters.
        assert_eq!(
            Frame::decode(&frame_with_payload(kind::REGISTER, &[1, 0xff])),
            Err(FrameError::BadUtf8 { field: "name" })
        );
        assert!(matches!(
            Frame::decode(&frame_with_payload(kind::REGISTER, &[1, b'A'])),
            Err(FrameError::BadName { .. })
        ));
    }

    #[test]
    fn invalid_key_points_are_refused() {
        // y = 2 is not on the curve for either sign of x.
        let mut bad = [0u8; 32];
        bad[0] = 2;
        assert!(PublicKey::from_bytes(bad).is_err());
        let mut open = vec![1, b'a'];
        open.extend(bad);
        open.push(0);
        assert_eq!(
            Frame::decode(&frame_with_payload(kind::CHANNEL_OPEN, &open)),
            Err(FrameError::BadKey { field: "hub_key" })
        );
    }

    #[test]
    fn allow_list_limits_hold_both_ways() {
        let too_many = vec![key(1); MAX_ALLOWED_APPS + 1];
        let frame = Frame::AllowList { allowed_apps: too_many, pairing_open: false };
        assert!(matches!(frame.encode(), Err(FrameError::FieldTooLong { .. })));
        let payload = ((MAX_ALLOWED_APPS + 1) as u16).to_be_bytes();
        assert!(matches!(
            Frame::decode(&frame_with_payload(kind::ALLOW_LIST, &payload)),
            Err(FrameError::FieldTooLong { field: "allowed_apps", .. })
        ));
        // A count that promises more keys than the payload holds.
        let mut payload = 3u16.to_be_bytes().to_vec();
        payload.extend(key(1).as_bytes());
        assert!(matches!(
            Frame::decode(&frame_with_payload(kind::ALLOW_LIST, &payload)),
            Err(FrameError::Truncated { field: "allowed_apps", .. })
        ));
        let full = Frame::AllowList { allowed_apps: vec![key(1); MAX_ALLOWED_APPS], pairing_open: true };
        let bytes = full.encode().unwrap();
        assert!(bytes.len() - HEADER_LEN <= MAX_PAYLOAD);
        assert_eq!(Frame::decode(&bytes).unwrap().unwrap().0, full);
    }

    #[test]
    fn long_messages_are_trimmed_on_a_char_boundary_or_refused() {
        let frame = Frame::refused(RefusalReason::Internal, "é".repeat(MAX_MESSAGE));
        let Frame::Refused { message, .. } = &frame else { unreachable!() };
        assert!(message.len() <= MAX_MESSAGE);
        assert!(frame.encode().is_ok());
        let raw = Frame::Refused { reason: RefusalReason::Internal, message: "x".repeat(MAX_MESSAGE + 1) };
        assert!(matches!(raw.encode(), Err(FrameError::FieldTooLong { .. })));
        let mut payload = 1u16.to_be_bytes().to_vec();
        payload.extend(((MAX_MESSAGE + 1) as u16).to_be_bytes());
        assert!(matches!(
            Frame::decode(&frame_with_payload(kind::REFUSED, &payload)),
            Err(FrameError::FieldTooLong { field: "message", .. })
        ));
        let mut payload = 1u16.to_be_bytes().to_vec();
        payload.extend(2u16.to_be_bytes());
        payload.extend([0xc3, 0x28]);
        assert_eq!(
            Frame::decode(&frame_with_payload(kind::REFUSED, &payload)),
            Err(FrameError::BadUtf8 { field: "message" })
        );
    }

    #[test]
    fn refusal_codes_are_stable_and_unknown_codes_survive() {
        for reason in RefusalReason::KNOWN {
            assert_eq!(RefusalReason::from_code(reason.code()), reason);
            assert_ne!(reason.label(), "other");
        }
        assert_eq!(RefusalReason::from_code(4242), RefusalReason::Other(4242));
        assert_eq!(RefusalReason::Other(4242).to_string(), "other(4242)");
    }

    fn arb_key() -> impl Strategy<Value = PublicKey> {
        any::<[u8; 32]>().prop_map(|seed| Identity::from_seed(seed).public_key())
    }
    fn arb_name() -> impl Strategy<Value = HubName> {
        "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?".prop_map(|s| HubName::new(&s).unwrap())
    }
    fn arb_purpose() -> impl Strategy<Value = SessionPurpose> {
        prop_oneof![Just(SessionPurpose::Connect), Just(SessionPurpose::Pair)]
    }
    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (arb_name(), prop::collection::vec(arb_key(), 0..20), any::<bool>()).prop_map(
                |(name, allowed_apps, pairing_open)| Frame::Register { name, allowed_apps, pairing_open }
            ),
            any::<bool>().prop_map(|replaced| Frame::Registered { replaced }),
            (prop::collection::vec(arb_key(), 0..20), any::<bool>())
                .prop_map(|(allowed_apps, pairing_open)| Frame::AllowList { allowed_apps, pairing_open }),
            (any::<u16>(), ".{0,300}").prop_map(|(c, m)| Frame::refused(RefusalReason::from_code(c), m)),
            any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
            (any::<u32>(), ".{0,300}").prop_map(|(retry_after_ms, m)| Frame::GoAway {
                retry_after_ms,
                message: truncate_message(m)
            }),
            (arb_name(), arb_key(), arb_purpose(), any::<u64>()).prop_map(|(hub, hub_key, purpose, id)| {
                Frame::ChannelOpen { hub, hub_key, purpose, channel: ChannelId::new(id) }
            }),
            (arb_key(), any::<SocketAddr>(), arb_purpose(), any::<u64>()).prop_map(
                |(app_key, observed, purpose, id)| Frame::ChannelAnnounce {
                    app_key,
                    observed,
                    purpose,
                    channel: ChannelId::new(id)
                }
            ),
            Just(Frame::ChannelAccepted),
            any::<u64>().prop_map(|id| Frame::ChannelReady { channel: ChannelId::new(id) }),
            Just(Frame::StreamOpen),
            Just(Frame::StreamAccepted),
            any::<SocketAddr>().prop_map(|node| Frame::Redirect { node }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_frames_round_trip(frame in arb_frame()) {
            let bytes = frame.encode().unwrap();
            let (decoded, used) = Frame::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            // SocketAddr V6 flow info / scope are not carried on the wire.
            let observed = |f: &Frame| match f {
                Frame::ChannelAnnounce { observed, .. } => Some(*observed),
                Frame::Redirect { node } => Some(*node),
                _ => None,
            };
            if let (Some(a), Some(b)) = (observed(&frame), observed(&decoded)) {
                prop_assert_eq!(a.ip(), b.ip());
                prop_assert_eq!(a.port(), b.port());
            } else {
                prop_assert_eq!(decoded, frame);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn valid_header_random_payload_never_panics(kind in 0u8..=18, payload in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::decode(&frame_with_payload(kind, &payload));
        }
    }
}
