//! [`ClientConfig`]: who the app is, which relay it pins, and the timers of its relay link.
//!
//! The defaults are chosen for phones and laptops behind NATs: a keep-alive well under the
//! ~30 s after which many NATs forget a UDP mapping, and a short connect timeout so that a
//! network that silently drops UDP is reported quickly instead of after quinn's idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::{Identity, PublicKey};

/// Default time to wait for the relay to answer the QUIC handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default QUIC keep-alive interval (NAT bindings often expire after 30 s).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Default QUIC idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a [`Client`](crate::Client) needs.
#[derive(Debug)]
pub struct ClientConfig {
    /// The app's own key (its identity at the relay and at the hub).
    pub identity: Identity,
    /// UDP address of the relay.
    pub relay_addr: SocketAddr,
    /// The relay's public key, pinned: any other key fails the handshake.
    pub relay_key: PublicKey,
    /// No answer from the relay within this time means UDP to the relay is probably blocked.
    /// Also bounds the wait for the answer to a session request and for the end-to-end TLS
    /// handshake (twice this value, since those involve the hub's round trip too).
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval on the relay connection.
    pub keep_alive: Duration,
    /// QUIC idle timeout on the relay connection.
    pub idle_timeout: Duration,
    /// Where the hubs' single-use session tickets are kept (resumption and 0-RTT of end-to-end
    /// connections). `None`: a store of this client's own, gone with it. An app that drops its
    /// `Client` when backgrounded and makes a new one when back passes one store to both, so
    /// the new client resumes. Tickets cannot outlive the process: rustls (0.23) keeps their
    /// values opaque, with no way to write them to a file or a platform store; after process
    /// death every hub costs one full handshake. Entries are keyed per hub key, so one store
    /// serves any number of hubs.
    pub session_store: Option<Arc<dyn rustls::client::ClientSessionStore>>,
    /// Further addresses of the same relay cluster (every node presents `relay_key`), asked in
    /// turn when `relay_addr` does not answer; empty for a single relay. Any node will do: one
    /// that does not hold the hub redirects to the one that does.
    pub other_nodes: Vec<SocketAddr>,
}

impl ClientConfig {
    /// A config with default timers.
    pub fn new(identity: Identity, relay_addr: SocketAddr, relay_key: PublicKey) -> Self {
        Self {
            identity,
            relay_addr,
            relay_key,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            other_nodes: Vec::new(),
            session_store: None,
        }
    }

    /// How long to wait for the relay's (or hub's) answer to a session request, and for the
    /// end-to-end TLS handshake: these cross the relay to the hub and back, so they get twice
    /// the connect timeout.
    pub fn session_timeout(&self) -> Duration {
        self.connect_timeout.saturating_mul(2)
    }
}
