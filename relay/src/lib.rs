//! The Keyway relay: a blind-forwarding QUIC relay that hubs dial out to and apps reach by name.
//!
//! Hubs hold an outbound QUIC connection and register a name on a control stream; apps open a
//! channel stream (`ChannelOpen`) naming the hub and the hub key they pin. The relay checks the
//! name policy and the hub's published allow-list *before* the hub hears anything, introduces
//! app and hub (`ChannelAnnounce`, `ChannelReady`), and then forwards the UDP datagrams of their
//! end-to-end QUIC connection inside its own socket. It never sees plaintext and holds no key of
//! that connection. See `docs/protocol.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyway_relay::RelayError> {
//! use keyway_relay::{NamePolicy, Relay, RelayConfig};
//! let identity = keyway_proto::Identity::generate()?;
//! let policy = NamePolicy::Closed { hubs_file: "authorized_hubs".into() };
//! let relay = Relay::start(RelayConfig::new("0.0.0.0:4433".parse().unwrap(), identity, policy)).await?;
//! println!("relay key {}", relay.public_key());
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

mod access;
mod channel;
mod channel_session;
mod channels;
#[cfg(feature = "cli")]
pub mod cli;
pub mod cluster;
mod config;
mod connection;
mod drain;
mod endpoint;
mod error;
mod forward;
mod gso;
mod handshakes;
mod hub;
mod introduce;
mod io_thread;
mod limits;
mod metrics;
mod policy;
mod refusal;
mod registry;
mod server;
mod standing;
mod state;
mod stats;

pub use channel::Direction;
pub use config::{
    ForwardTap, RelayConfig, DEFAULT_DRAIN_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_METRICS_LISTEN,
    DEFAULT_SESSION_OPEN_TIMEOUT,
};
pub use error::{RelayConfigError, RelayError};
pub use limits::*;
pub use policy::{NameBookError, NamePolicy};
pub use server::{Relay, RelayHandle};
pub use stats::{ConnectionRefusal, CutReason, LimitKind, RelayStats};

/// QUIC application error codes, for connection closes and stream resets: the wire's one
/// list, re-exported so that `keyway_relay::codes` keeps naming the codes the relay sends.
pub use keyway_proto::codes;

/// Loopback endpoints for unit tests that need real QUIC connections.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use keyway_proto::{Identity, ALPN_RELAY};

    use crate::config::RelayConfig;
    use crate::policy::NamePolicy;

    /// A server endpoint configured like the relay's, and a client endpoint that pins it.
    pub async fn endpoint_pair() -> (quinn::Endpoint, quinn::Endpoint) {
        let server_id = Identity::from_seed([200; 32]);
        let server_key = server_id.public_key();
        let config = RelayConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            server_id,
            NamePolicy::Open { state_file: None },
        );
        let server_config = crate::endpoint::server_config(&config).unwrap();
        let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let (crypto, _) =
            keyway_proto::tls::quic_client_crypto(&Identity::from_seed([201; 32]), server_key, ALPN_RELAY)
                .unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(crypto as Arc<_>));
        (server, client)
    }
}
