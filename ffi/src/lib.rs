//! Keyway's client library for apps written in Kotlin, Swift and Python: one uniffi crate over
//! [`keyway_client`], from which all three bindings are generated.
//!
//! What it exports, and why it has this shape:
//! - [`Identity`]: the app's key, from a key file (0600), from key bytes kept in the platform's
//!   secure storage, or from a [`SecureStorage`] the app implements ([`file_storage`] is the
//!   file-based default, compatible with the `keyway` CLI's `app.key` and `app.key.hubs.toml`).
//! - [`Client`]: one relay (address and pinned key, or a [`KnownHub`] from pairing); `connect`
//!   gives a [`Stream`] with async `read` / `write` / `finish` / `shutdown`; `forward` a local
//!   TCP port; `disconnect()` for a phone going to the background, after which the next
//!   `connect` dials again.
//! - [`Client::events`]: an [`EventStream`] of [`ClientEvent`]s (relay up and down, end-to-end
//!   connections up, resumed or not, and lost, each loss with a [`LossReason`]);
//!   [`Client::network_changed`] and [`Client::path_stats`] for apps that follow the network.
//! - [`pair`]: a pairing code in, a [`KnownHub`] out (and into the storage, if given).
//! - [`set_logger`]: the library's logs into the app, at a [`LogLevel`], through a [`LogSink`]
//!   the app implements (module `logging`).
//! - [`version`]: the library's version, the workspace's.
//! - [`KeywayError`]: every failure typed, a refusal carrying its [`Refusal`] reason and the
//!   human message, so the foreign side gets an exception it can branch on.
//!
//! The network runs on a tokio runtime owned by this crate (module `runtime`), not on the foreign
//! language's event loop: the quinn endpoint driver must outlive any one call, and a phone's
//! UI thread must never run it. Nothing here panics on foreign input (clippy denies `unwrap`,
//! `expect` and `panic`); uniffi would turn a panic into an exception anyway, but a typed error
//! says what was wrong.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

uniffi::setup_scaffolding!();

mod client;
mod error;
mod events;
mod identity;
mod logging;
mod runtime;
mod storage;
mod stream;

pub use client::{pair, Client, Forward, PathStats};
pub use error::{KeywayError, Refusal};
pub use events::{ClientEvent, EventStream, LossReason};
pub use identity::Identity;
pub use logging::{set_logger, LogLevel, LogRecord, LogSink};
pub use storage::{file_storage, KnownHub, SecureStorage};
pub use stream::Stream;

/// The library's version (the Cargo workspace's): what `python -m keyway --version` prints and
/// what the Python package's own version is built from.
#[uniffi::export]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}
