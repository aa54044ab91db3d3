//! Keyway's shared foundations: what the relay, the hub connector and the client library must
//! agree on, in one crate that every side imports.
//!
//! Most of it is pure, in the spirit of `quinn-proto` (no sockets, no files, no clock), so it
//! is unit-tested exhaustively and fuzzed (`proto/fuzz`):
//! * [`codec`]: the frames and their limits;
//! * [`channel`]: the header of end-to-end packets carried through the relay;
//! * [`cid`]: the connection IDs of a cluster node, which name the node for a load balancer;
//! * [`codes`]: the QUIC application error codes;
//! * [`identity`]: keys, their one text form and fingerprints (but see key files below);
//! * [`lists`]: parsing and formatting `authorized_hubs` / `authorized_apps`;
//! * [`tls`]: the rustls configs that pin raw Ed25519 keys (built here, run by quinn and
//!   tokio-rustls);
//! * [`pairing`]: the pairing code's URI form and the answer statuses.
//!
//! Some of it does I/O, kept thin and on what the caller hands in:
//! * [`io`]: frames over any tokio byte stream ([`io::FrameReader`], cancel-safe);
//! * [`pairing`]: the request/answer exchange over the end-to-end stream;
//! * [`identity`]: key files ([`Identity::load`], [`Identity::save`], mode checks);
//! * [`files`]: atomic writes of state files;
//! * `ops_http` (feature `ops-http`): the `/metrics` and `/healthz` TCP listener;
//! * `cli` (feature `cli`): config files, environment, logging and `main` of the binaries;
//! * `sd_notify` (feature `cli`, unix): systemd readiness and watchdog pings;
//! * `admin` (feature `cli`, unix): the 0600 local socket `status --json` asks.
//!
//! Without features the crate pulls no HTTP server and no command-line parser.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

#[cfg(all(feature = "cli", unix))]
pub mod admin;
pub mod channel;
pub mod cid;
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
#[cfg(all(feature = "cli", unix))]
pub mod sd_notify;
pub mod tls;

pub use codec::{Frame, FrameError, HubName, RefusalReason, SessionPurpose};
pub use identity::{Identity, IdentityError, PublicKey, PublicKeyError};

/// ALPN of the app/hub ↔ relay QUIC connection. The version is part of the name so that a
/// relay and a peer that speak different major versions fail the handshake with a clear alert.
pub const ALPN_RELAY: &[u8] = b"keyway-relay/2";
/// ALPN of the end-to-end QUIC connection between app and hub, whose packets the relay
/// carries in a channel without decrypting them.
pub const ALPN_E2E: &[u8] = b"keyway-e2e/2";
