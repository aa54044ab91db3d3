//! Pairing on the hub, in one place: the window file `keyway-hub pair` opens ([`window`'s
//! items, re-exported here) and the pairing exchange a pairing channel carries (`exchange`).
//!
//! The flow: `keyway-hub pair` writes the window file and prints a one-time code; the running
//! connector sees the file within its poll, tells the relay to let pairing channels through
//! for this hub, and serves one: the app proves the code's secret inside the end-to-end TLS
//! session, and the hub appends the key it proved to `authorized_apps` and closes the window.

mod exchange;
mod window;

pub(crate) use exchange::{closed_message, refresh, serve};
pub use window::{
    close_window, open_window, read_window, window_path, write_window, PairingError, PairingWindow,
    MAX_FAILURES,
};
