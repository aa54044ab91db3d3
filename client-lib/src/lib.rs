//! Keyway's client library: what apps embed to reach a hub by name through a relay.
//!
//! ```no_run
//! # async fn demo(identity: keyway_proto::Identity, relay_key: keyway_proto::PublicKey,
//! #               hub_key: keyway_proto::PublicKey) -> Result<(), keyway_client::ClientError> {
//! use tokio::io::AsyncWriteExt;
//! let config = keyway_client::ClientConfig::new(identity, "203.0.113.7:443".parse().unwrap(), relay_key);
//! let client = keyway_client::Client::new(config)?;
//! let hub = keyway_proto::HubName::new("home").unwrap();
//! let mut stream = client.connect(&hub, &hub_key).await?; // end-to-end TLS, hub key pinned
//! stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
//! # Ok(()) }
//! ```
//!
//! A [`Client`] holds one quinn endpoint and one relay connection, dialed lazily and redialed
//! when it is found closed, shared by every session: each [`Client::connect`] is one QUIC
//! stream, so opening a session costs one round trip to the hub, not a handshake with the relay.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod error;
pub mod forward;
pub mod known_hubs;
pub mod pairing;
pub mod path;
pub mod relay_link;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keyway_proto::tls::MismatchSlot;
use keyway_proto::{HubName, PublicKey, SessionPurpose};
use quinn::{Connection, Endpoint};

pub use config::ClientConfig;
pub use error::{ClientError, ConfigError, HandshakeError, ProtocolError};
pub use pairing::{pair, PairedHub, PairingCode};
pub use session::HubStream;

/// A handle on the app's relay link. Cheap to clone; clones share the endpoint and connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    endpoint: Endpoint,
    dialer: relay_link::RelayDialer,
    /// The shared relay connection. An async mutex so that concurrent `connect`s that find no
    /// live connection wait for one dial instead of each dialing their own.
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// One end-to-end TLS config per hub key, kept so that rustls' session cache lets later
    /// sessions to the same hub resume.
    e2e: Mutex<HashMap<PublicKey, (Arc<rustls::ClientConfig>, MismatchSlot)>>,
}

impl Client {
    /// Binds a UDP socket of the relay's address family on port 0. Needs a tokio runtime.
    /// Does not contact the relay yet: the first [`connect`](Client::connect) does.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let dialer = relay_link::RelayDialer::new(
            &config.identity,
            config.relay_addr,
            config.relay_key,
            config.keep_alive,
            config.idle_timeout,
            config.connect_timeout,
        )?;
        let endpoint = relay_link::bind_endpoint(config.relay_addr)?;
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                endpoint,
                dialer,
                conn: tokio::sync::Mutex::new(None),
                e2e: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Opens an end-to-end encrypted stream to the service behind hub `hub`, pinning `hub_key`.
    pub async fn connect(&self, hub: &HubName, hub_key: &PublicKey) -> Result<HubStream, ClientError> {
        self.connect_for(hub, hub_key, SessionPurpose::Connect).await
    }

    /// [`connect`](Client::connect) with an explicit purpose. `Pair` sessions use a fresh TLS
    /// config with resumption disabled: the hub accepts any app key on a pairing session, and
    /// nothing learned there should be reused for (or confused with) authorized sessions.
    pub async fn connect_for(
        &self,
        hub: &HubName,
        hub_key: &PublicKey,
        purpose: SessionPurpose,
    ) -> Result<HubStream, ClientError> {
        let timeout = self.inner.config.session_timeout();
        let (conn, fresh) = self.relay_connection(None).await?;
        let stream = match session::open(&conn, hub, hub_key, purpose, timeout).await {
            Ok(stream) => stream,
            // The cached connection died since its last use (relay restart, network change):
            // redial once. A freshly dialed connection that fails is reported as is.
            Err(f) if !fresh && matches!(f.error, ClientError::Connection(_)) => {
                tracing::debug!(error = %f.error, "relay connection was closed; redialing");
                let (conn, _) = self.relay_connection(Some(&conn)).await?;
                session::open(&conn, hub, hub_key, purpose, timeout).await.map_err(|f| f.error)?
            }
            Err(f) => {
                if f.no_answer {
                    // A relay that vanished without closing looks exactly like this. Do not
                    // close the connection (other sessions may still be fine on it), but let
                    // the next `connect` dial a fresh one instead of waiting on it again.
                    self.forget(&conn).await;
                }
                return Err(f.error);
            }
        };
        let (tls, mismatch) = match purpose {
            SessionPurpose::Connect => self.e2e_config(hub_key)?,
            SessionPurpose::Pair => {
                let (mut config, slot) = keyway_proto::tls::client_config(
                    &self.inner.config.identity,
                    *hub_key,
                    keyway_proto::ALPN_E2E,
                )?;
                config.resumption = rustls::client::Resumption::disabled();
                (Arc::new(config), slot)
            }
        };
        session::handshake(tls, &mismatch, *hub_key, stream, timeout).await
    }

    /// The app's public key (what the hub owner adds to `authorized_apps`).
    pub fn public_key(&self) -> PublicKey {
        self.inner.config.identity.public_key()
    }

    /// The local UDP address of the endpoint.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    /// Closes the relay connection and the endpoint, waiting briefly for the close to be sent.
    pub async fn close(&self) {
        if let Some(conn) = self.inner.conn.lock().await.take() {
            relay_link::close(&conn, keyway_proto::codes::NORMAL, "client closed");
        }
        self.inner.endpoint.close(keyway_proto::codes::NORMAL, b"client closed");
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.inner.endpoint.wait_idle()).await;
    }

    /// The live relay connection, dialing one if there is none or it is closed, or if it is
    /// `stale` (the connection the caller just saw fail). Returns whether it was just dialed.
    async fn relay_connection(&self, stale: Option<&Connection>) -> Result<(Connection, bool), ClientError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            let is_stale = stale.is_some_and(|s| s.stable_id() == conn.stable_id());
            if conn.close_reason().is_none() && !is_stale {
                return Ok((conn.clone(), false));
            }
        }
        *slot = None;
        let conn = self.inner.dialer.dial(&self.inner.endpoint).await?;
        tracing::debug!(relay = %self.inner.config.relay_addr, "connected to relay");
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    /// Drops `conn` from the cache if it is still the cached connection.
    async fn forget(&self, conn: &Connection) {
        let mut slot = self.inner.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
            *slot = None;
        }
    }

    fn e2e_config(
        &self,
        hub_key: &PublicKey,
    ) -> Result<(Arc<rustls::ClientConfig>, MismatchSlot), ClientError> {
        // A panic elsewhere while holding the lock cannot leave the map half-updated (one
        // insert of a finished config), so a poisoned cache is still a good cache.
        let mut cache = self.inner.e2e.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((config, slot)) = cache.get(hub_key) {
            return Ok((config.clone(), slot.clone()));
        }
        let (config, slot) =
            keyway_proto::tls::client_config(&self.inner.config.identity, *hub_key, keyway_proto::ALPN_E2E)?;
        let config = Arc::new(config);
        cache.insert(*hub_key, (config.clone(), slot.clone()));
        Ok((config, slot))
    }
}
