//! Keyway's pure building blocks.
//!
//! Like `quinn-proto`, this crate does no I/O of its own: it holds the identities
//! ([`identity`]), the wire codec ([`codec`]) and the rustls configurations that pin raw
//! Ed25519 public keys ([`tls`]). Everything network-facing in the relay, the hub connector
//! and the client library is built on these types, so they are unit-tested and fuzzed here.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

#[cfg(feature = "cli")]
pub mod cli;
pub mod codec;
pub mod codes;
pub mod files;
pub mod identity;
pub mod io;
pub mod lists;
#[cfg(feature = "ops-http")]
pub mod ops_http;
pub mod pairing;
pub mod tls;

pub use codec::{Frame, FrameError, HubName, RefusalReason, SessionPurpose};
pub use identity::{Identity, IdentityError, PublicKey};

/// ALPN of the app/hub ↔ relay QUIC connection. The version is part of the name so that a
/// relay and a peer that speak different major versions fail the handshake with a clear alert.
pub const ALPN_RELAY: &[u8] = b"keyway-relay/1";
/// ALPN of the end-to-end TLS session that app and hub run inside a spliced stream.
pub const ALPN_E2E: &[u8] = b"keyway-e2e/1";
