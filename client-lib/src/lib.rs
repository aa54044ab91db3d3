//! Keyway's client library: what apps embed to reach a hub by name through a relay.
//!
//! ```no_run
//! # async fn demo(identity: keyway_proto::Identity, relay_key: keyway_proto::PublicKey,
//! #               hub_key: keyway_proto::PublicKey) -> Result<(), keyway_client::ClientError> {
//! use tokio::io::AsyncWriteExt;
//! let config = keyway_client::ClientConfig::new(identity, "203.0.113.7:443".parse().unwrap(), relay_key);
//! let client = keyway_client::Client::new(config)?;
//! let hub = keyway_proto::HubName::new("home").unwrap();
//! let mut stream = client.connect(&hub, &hub_key).await?; // end-to-end QUIC, hub key pinned
//! stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
//! # Ok(()) }
//! ```
//!
//! A [`Client`] holds one quinn endpoint on a path socket ([`keyway_path::socket`]), one relay connection
//! (dialed lazily, redialed when found closed), and one end-to-end QUIC connection per (hub, hub
//! key), dialed lazily through a relay channel (one dial for concurrent callers) and redialed
//! when lost (module `e2e`). The relay forwards that connection's packets without being able to
//! read them. Each [`Client::connect`] is one stream on it, so a new session costs no handshake
//! at all, only the hub's answer (and [`Client::connect_pipelined`] not even that wait).
//! [`Client::subscribe`] gives the [`events::Event`]s of those connections (up, resumed, lost
//! with a typed reason) for an app's status line.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

mod cluster;
pub mod config;
mod e2e;
pub mod error;
pub mod events;
pub mod forward;
pub mod known_hubs;
pub mod pairing;
mod session;
mod slot;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use keyway_proto::channel::ChannelId;
use keyway_proto::tls::MismatchSlot;
use keyway_proto::{Frame, HubName, PublicKey, SessionPurpose};
use quinn::{Connection, Endpoint};

pub use config::ClientConfig;
pub use e2e::HubStream;
pub use error::{ChannelEnd, ClientError, ConfigError, HandshakeError, ProtocolError};
pub use keyway_path::PathStats;
pub use pairing::{pair, PairedHub, PairingCode};
pub use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};

use slot::HubSlot;

/// A handle on the app's relay link. Cheap to clone; clones share the endpoint and connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    endpoint: Endpoint,
    dialer: keyway_path::relay_link::RelayDialer,
    /// The shared relay connection. An async mutex so that concurrent `connect`s that find no
    /// live connection wait for one dial instead of each dialing their own.
    conn: tokio::sync::Mutex<Option<Connection>>,
    /// The end-to-end connections and their channel table.
    quic: QuicPlane,
    /// The other relay cluster nodes this client was redirected to; `None` in a sibling
    /// client itself, which does not follow redirects ([`cluster`]).
    nodes: Option<cluster::Nodes>,
    /// The task that nudges the relay connection when the path socket says the relay answers
    /// nothing ([`keyway_path::Paths::relay_suspect`]); aborted with the client.
    nudger: Mutex<Option<tokio::task::AbortHandle>>,
    /// What [`Client::subscribe`] listens to ([`events`]).
    events: events::Events,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.nudger.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            task.abort();
        }
    }
}

/// What a client keeps besides the relay link.
#[derive(Debug)]
struct QuicPlane {
    paths: keyway_path::Paths,
    /// One slot per (hub, hub key) holding its end-to-end connection. An async mutex per slot
    /// so that concurrent `connect`s that find no live connection wait for one dial.
    links: Mutex<HashMap<(HubName, PublicKey), Arc<HubSlot>>>,
    /// One QUIC client config per hub key, kept for rustls' session cache (resumption).
    configs: Mutex<HashMap<PublicKey, (quinn::ClientConfig, MismatchSlot)>>,
    /// When [`Client::nudge_relay`] last touched the relay connection.
    last_nudge: Mutex<Option<tokio::time::Instant>>,
    /// The hubs' session tickets ([`ClientConfig::session_store`]), one store for every hub.
    sessions: Arc<events::TicketProbe>,
}

/// What one connect asks of a hub's end-to-end connection (the same cluster routing takes
/// every kind, [`Client::routed`]).
#[derive(Clone, Copy, Debug)]
enum Ask<'a> {
    /// A stream; `wait` for the hub's answer before returning it.
    Stream { purpose: SessionPurpose, wait: bool },
    /// A stream whose first bytes, safe to run twice, may travel as 0-RTT early data.
    Early { first: &'a [u8] },
}

/// Size of a client's own ticket store, in rustls' units (8 tickets per hub): 64 hubs.
const SESSION_STORE_SIZE: usize = 512;

/// At most one nudge of the relay connection per this interval (see [`Client::nudge_relay`]).
const NUDGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Client {
    /// Binds a UDP socket of the relay's address family on port 0. Needs a tokio runtime.
    /// Does not contact the relay yet: the first [`connect`](Client::connect) does.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        Self::build(config, Some(cluster::Nodes::default()))
    }

    /// A client for another node of the relay cluster, which returns a redirect instead of
    /// following it.
    pub(crate) fn new_sibling(config: ClientConfig) -> Result<Client, ClientError> {
        Self::build(config, None)
    }

    fn build(config: ClientConfig, nodes: Option<cluster::Nodes>) -> Result<Client, ClientError> {
        let dialer = keyway_path::relay_link::RelayDialer::new(
            &config.identity,
            config.relay_addr,
            config.relay_key,
            config.keep_alive,
            config.idle_timeout,
            config.connect_timeout,
        )?;
        let (endpoint, paths) = keyway_path::bind_path_endpoint(config.relay_addr, None)?;
        let quic = QuicPlane {
            paths,
            links: Mutex::default(),
            configs: Mutex::default(),
            last_nudge: Mutex::default(),
            sessions: events::TicketProbe::new(config.session_store.clone().unwrap_or_else(|| {
                Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSION_STORE_SIZE))
            })),
        };
        let inner = Arc::new(Inner {
            config,
            endpoint,
            dialer,
            conn: tokio::sync::Mutex::new(None),
            quic,
            nodes,
            nudger: Mutex::default(),
            events: events::Events::default(),
        });
        let task = tokio::spawn(Self::nudge_when_unanswered(Arc::downgrade(&inner)));
        *inner.nudger.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task.abort_handle());
        Ok(Client { inner })
    }

    /// Nudges the relay connection each time the path socket says the relay has answered
    /// nothing for a second while channel data went out: after a NAT rebound the socket, the
    /// relay drops channel datagrams from the new address until the relay connection shows it
    /// there, which quinn alone would do only at the next keep-alive.
    async fn nudge_when_unanswered(inner: std::sync::Weak<Inner>) {
        let Some(suspect) = inner.upgrade().map(|inner| inner.quic.paths.relay_suspect()) else { return };
        loop {
            suspect.notified().await;
            let Some(inner) = inner.upgrade() else { return };
            tracing::debug!("the relay answered nothing for a second while data went out; nudging it");
            let client = Client { inner };
            client.nudge_relay(&client.inner.quic);
        }
    }

    /// Opens an end-to-end encrypted stream to the service behind hub `hub`, pinning `hub_key`.
    pub async fn connect(&self, hub: &HubName, hub_key: &PublicKey) -> Result<HubStream, ClientError> {
        self.connect_for(hub, hub_key, SessionPurpose::Connect).await
    }

    /// [`connect`](Client::connect) with an explicit purpose. A `Pair` session is one stream on
    /// an end-to-end connection of its own (closed when the stream is dropped), with a fresh TLS
    /// config whose resumption is disabled: the hub accepts any app key on a pairing
    /// connection, and nothing learned there should be reused for (or confused with) authorized
    /// ones.
    pub async fn connect_for(
        &self,
        hub: &HubName,
        hub_key: &PublicKey,
        purpose: SessionPurpose,
    ) -> Result<HubStream, ClientError> {
        self.routed(hub, hub_key, Ask::Stream { purpose, wait: true }).await
    }

    /// `ask` at the relay cluster node that holds `hub`, the one routing every way to connect
    /// takes: the node the hub was last found at, else the configured relay, else (while it
    /// does not answer) each of the other configured nodes in turn; a redirect from the node
    /// that answered is followed once.
    async fn routed(
        &self,
        hub: &HubName,
        hub_key: &PublicKey,
        ask: Ask<'_>,
    ) -> Result<HubStream, ClientError> {
        let Some(nodes) = &self.inner.nodes else {
            return self.here(hub, hub_key, ask).await;
        };
        if let Some(home) = nodes.home_of(hub) {
            match home.here(hub, hub_key, ask).await {
                Err(e) if cluster::moved(&e) => {
                    tracing::debug!(%hub, error = %e, "hub no longer at its last cluster node");
                    nodes.forget(hub);
                }
                other => return other,
            }
        }
        let mut first = self.here(hub, hub_key, ask).await;
        for &other in &self.inner.config.other_nodes {
            if !cluster::unreachable(&first) {
                break;
            }
            tracing::debug!(%hub, node = %other, "relay node unreachable; asking another node of the cluster");
            let sibling = nodes.sibling(other, &self.inner.config)?;
            first = sibling.here(hub, hub_key, ask).await;
            if first.is_ok() {
                nodes.remember(hub, other);
            }
        }
        match first {
            Err(ClientError::Redirected { node }) => {
                tracing::debug!(%hub, %node, "redirected to the cluster node holding the hub");
                let sibling = nodes.sibling(node, &self.inner.config)?;
                let stream = sibling.here(hub, hub_key, ask).await?;
                nodes.remember(hub, node);
                Ok(stream)
            }
            other => other,
        }
    }

    /// `ask` through this client's own relay node.
    async fn here(&self, hub: &HubName, hub_key: &PublicKey, ask: Ask<'_>) -> Result<HubStream, ClientError> {
        match ask {
            Ask::Stream { purpose, wait } => {
                self.quic_connect(&self.inner.quic, hub, hub_key, purpose, wait).await
            }
            Ask::Early { first } => self.connect_early_here(hub, hub_key, first).await,
        }
    }

    /// [`connect`](Client::connect) without waiting for the hub's answer, for callers that
    /// have bytes to send at once (`keyway forward`): the stream is handed out
    /// as soon as `StreamOpen` is queued, so the first bytes leave in the same flight. The
    /// answer is read before the first byte the stream yields; a refusal then surfaces as an
    /// `io::Error` whose inner error is the [`ClientError`] (`get_ref()` and downcast). Errors
    /// before the stream exists (no relay, channel refused, wrong hub key) are returned here as
    /// usual.
    pub async fn connect_pipelined(
        &self,
        hub: &HubName,
        hub_key: &PublicKey,
    ) -> Result<HubStream, ClientError> {
        self.routed(hub, hub_key, Ask::Stream { purpose: SessionPurpose::Connect, wait: false }).await
    }

    /// Sends `request` on a new stream of the relay connection and returns the stream and the
    /// relay's answer (a `Refused` already turned into the typed error). A cached connection
    /// found dead is redialed once.
    /// [`connect_pipelined`](Client::connect_pipelined) with `first`, the session's first bytes,
    /// **which the caller declares safe to run twice** (an HTTP GET, a status poll): on a new
    /// end-to-end connection to a hub that gave this client a ticket, they travel as 0-RTT
    /// early data, so the answer can be back one app↔hub round trip after the call.
    ///
    /// Why "safe to run twice": a relay cannot replay them (each ticket resumes once at the
    /// hub; a replayed first flight gets a full handshake and its early data refused), but a
    /// request can still run twice when the hub's answer is lost and the app retries. And when
    /// the hub does not take the early data (it restarted and forgot the ticket), this method
    /// itself sends `first` again in 1-RTT. On a connection that is already up, or without a
    /// ticket, nothing is early: `first` goes right after the handshake, as with
    /// `connect_pipelined`. [`HubStream::early_data`] says which it was.
    pub async fn connect_early(
        &self,
        hub: &HubName,
        hub_key: &PublicKey,
        first: &[u8],
    ) -> Result<HubStream, ClientError> {
        self.routed(hub, hub_key, Ask::Early { first }).await
    }

    /// [`connect_early`](Client::connect_early) through this client's own relay.
    async fn connect_early_here(
        &self,
        hub: &HubName,
        hub_key: &PublicKey,
        first: &[u8],
    ) -> Result<HubStream, ClientError> {
        let plane = &self.inner.quic;
        let slot = self.slot(plane, hub, hub_key);
        let queued_at = tokio::time::Instant::now();
        let mut held = slot.lock().await;
        if let Some(link) = held.usable(None) {
            drop(held);
            self.nudge_relay(plane);
            let stream = e2e::open_and_write(&link, hub, first, true).await?;
            return Ok(HubStream::quic(stream, *hub_key));
        }
        if let Some(refused) = held.refused_since(queued_at) {
            return Err(refused);
        }
        held.take_live().inspect(|old| self.link_gone(old));
        held.reset();
        let dialed = self
            .dial(plane, hub, hub_key, SessionPurpose::Connect, true)
            .await
            .inspect_err(|e| held.note_failure(e))?;
        let (link, accepted) = match dialed {
            e2e::Dialed::Established(link) => (link, None),
            e2e::Dialed::Early(link, accepted) => (link, Some(accepted)),
        };
        let Some(accepted) = accepted else {
            held.set_live(link.clone());
            self.link_up(&link, hub, hub_key);
            drop(held);
            let stream = e2e::open_and_write(&link, hub, first, false).await?;
            return Ok(HubStream::quic(stream, *hub_key));
        };
        // These writes fail with `ZeroRttRejected` when, before they run, the handshake has
        // completed with the early data turned down or the connection has been closed (the
        // guard closes it when the relay refuses the channel; quinn reports a 0-RTT write on a
        // closed connection that way, not as a lost connection). `accepted` and the close
        // reason below say which, so it is not an error of the call.
        let early = match e2e::open_and_write(&link, hub, first, false).await {
            Ok(stream) => Some(stream),
            Err(e) if e2e::zero_rtt_rejected(&e) => None,
            Err(e) => return Err(e),
        };
        // The slot stays locked until the handshake completes: a concurrent `connect` must not
        // find this connection while it is still in 0-RTT and send bytes early that its
        // caller never marked safe to repeat.
        let timeout = self.inner.config.session_timeout();
        let took = match tokio::time::timeout(timeout, accepted).await {
            Ok(took) => took,
            Err(_) => {
                link.close("end-to-end handshake timed out");
                return Err(ClientError::HubRejected(HandshakeError::TimedOut { waited: timeout }));
            }
        };
        if let Some(e) = link.closed_error() {
            // The relay refused the channel, or the handshake failed: the hub's TLS turning a
            // key away is told as for a full dial (`e2e::dial`).
            return Err(match e {
                ClientError::HubConnection(e) => ClientError::HubRejected(HandshakeError::Quic(e)),
                typed => typed,
            });
        }
        held.set_live(link.clone());
        self.link_up(&link, hub, hub_key);
        drop(held);
        let stream = match early {
            Some(mut stream) if took => {
                stream.mark_early();
                stream
            }
            _ => {
                // The hub did not take the early data: none of it reached it. Again, in 1-RTT.
                // A hub that closes the connection meanwhile (it revoked the app) is reported
                // with its own reason rather than as the failed write.
                tracing::debug!(%hub, "0-RTT refused by the hub; sending the first bytes again");
                match e2e::open_and_write(&link, hub, first, false).await {
                    Ok(stream) => stream,
                    Err(e) => return Err(link.closed_error().unwrap_or(e)),
                }
            }
        };
        Ok(HubStream::quic(stream, *hub_key))
    }

    /// Closes the end-to-end connection to this hub, if there is one (its streams end). The
    /// relay connection and the hub's tickets stay: the next `connect` dials a new
    /// connection, resumed. For an app that stops using a hub for a while.
    pub async fn disconnect(&self, hub: &HubName, hub_key: &PublicKey) {
        let slot = self.slot(&self.inner.quic, hub, hub_key);
        let mut held = slot.lock().await;
        if let Some(link) = held.take_live() {
            link.close("app disconnected");
            self.link_gone(&link);
        }
    }

    fn slot(&self, plane: &QuicPlane, hub: &HubName, hub_key: &PublicKey) -> Arc<HubSlot> {
        let mut links = plane.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        links.entry((hub.clone(), *hub_key)).or_default().clone()
    }

    /// Opens a stream on the relay connection and writes `request` on it, without waiting for
    /// the answer (the caller's first flight follows it at once). A cached connection that
    /// turns out to have died since its last use (relay restart, network change) is redialed
    /// once; a freshly dialed one that fails is reported as is.
    async fn relay_send(
        &self,
        request: &Frame,
    ) -> Result<(Connection, keyway_path::QuicBiStream), ClientError> {
        let (conn, fresh) = self.relay_connection(None).await?;
        match session::send(&conn, request).await {
            Ok(stream) => Ok((conn, stream)),
            Err(ClientError::Connection(e)) if !fresh => {
                tracing::debug!(error = %e, "relay connection was closed; redialing");
                let (conn, _) = self.relay_connection(Some(&conn)).await?;
                let stream = session::send(&conn, request).await?;
                Ok((conn, stream))
            }
            Err(e) => Err(e),
        }
    }

    /// One stream on the (hub, hub key)'s end-to-end connection, dialing it if
    /// there is none; a cached connection found dead is redialed once.
    async fn quic_connect(
        &self,
        plane: &QuicPlane,
        hub: &HubName,
        hub_key: &PublicKey,
        purpose: SessionPurpose,
        wait: bool,
    ) -> Result<HubStream, ClientError> {
        let wait = wait.then(|| self.inner.config.session_timeout());
        if purpose == SessionPurpose::Pair {
            let link = self.dial_link(plane, hub, hub_key, purpose).await?;
            let stream = e2e::open_stream(&link, hub, wait, false).await?;
            return Ok(HubStream::quic(stream, *hub_key));
        }
        let slot = self.slot(plane, hub, hub_key);
        let (link, fresh) = self.live_link(plane, &slot, hub, hub_key, None).await?;
        if !fresh {
            self.nudge_relay(plane);
        }
        let stream = match e2e::open_stream(&link, hub, wait, !fresh).await {
            Ok(stream) => stream,
            Err(e)
                if !fresh
                    && (link.is_closed()
                        || matches!(e, ClientError::Protocol(ProtocolError::NoAnswer { .. }))) =>
            {
                // No answer on a connection that looked fine: its channel is most likely gone
                // (a relay restarted before it told us), so give up on it rather than wait again.
                link.close("no answer from the hub on this connection");
                tracing::debug!(error = %e, %hub, "end-to-end connection was lost; redialing");
                let (link, _) = self.live_link(plane, &slot, hub, hub_key, Some(&link)).await?;
                e2e::open_stream(&link, hub, wait, false).await?
            }
            Err(e) => return Err(e),
        };
        Ok(HubStream::quic(stream, *hub_key))
    }

    /// Sends one empty stream on the cached relay connection (at most once per
    /// [`NUDGE_INTERVAL`]), so a relay that restarted since answers with a stateless reset now.
    ///
    /// Why: a session touches only the end-to-end connection, whose packets a restarted relay drops without a word (it never
    /// held their keys), and the relay connection would learn of the crash only at its next
    /// keep-alive. The reset closes the relay connection, the channel guard then closes the
    /// end-to-end connection with [`ChannelEnd::RelayLost`], and `connect` redials. The relay
    /// ignores a stream that ends before its first frame (it only logs it at debug level);
    /// quinn 0.11 has no `PING` of its own to send instead.
    fn nudge_relay(&self, plane: &QuicPlane) {
        let now = tokio::time::Instant::now();
        {
            let mut last = plane.last_nudge.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| now.duration_since(at) < NUDGE_INTERVAL) {
                return;
            }
            *last = Some(now);
        }
        // `try_lock`: a held lock means a dial is under way, which needs no nudge (and a
        // session must not wait for it here).
        let Some(conn) = self.inner.conn.try_lock().ok().and_then(|slot| slot.clone()) else { return };
        if conn.close_reason().is_some() {
            return;
        }
        // Spawned: opening waits for stream credit, which a session must not wait for.
        tokio::spawn(async move {
            if let Ok((mut send, _recv)) = conn.open_bi().await {
                let _ = send.finish();
            }
        });
    }

    /// The live end-to-end connection in `slot`, dialing one if there is none, it is closed, or
    /// it is `stale`. Returns whether it was just dialed.
    async fn live_link(
        &self,
        plane: &QuicPlane,
        slot: &HubSlot,
        hub: &HubName,
        hub_key: &PublicKey,
        stale: Option<&e2e::Link>,
    ) -> Result<(e2e::Link, bool), ClientError> {
        let queued_at = tokio::time::Instant::now();
        let mut slot = slot.lock().await;
        if let Some(link) = slot.usable(stale) {
            return Ok((link, false));
        }
        if let Some(refused) = slot.refused_since(queued_at) {
            return Err(refused);
        }
        slot.take_live().inspect(|old| self.link_gone(old));
        slot.reset();
        let link = self
            .dial_link(plane, hub, hub_key, SessionPurpose::Connect)
            .await
            .inspect_err(|e| slot.note_failure(e))?;
        tracing::debug!(%hub, hub_key = %hub_key.fingerprint(), "end-to-end connection up");
        slot.set_live(link.clone());
        self.link_up(&link, hub, hub_key);
        Ok((link, true))
    }

    /// Opens a channel to `hub` at the relay and dials the end-to-end connection through it.
    async fn dial_link(
        &self,
        plane: &QuicPlane,
        hub: &HubName,
        hub_key: &PublicKey,
        purpose: SessionPurpose,
    ) -> Result<e2e::Link, ClientError> {
        match self.dial(plane, hub, hub_key, purpose, false).await? {
            e2e::Dialed::Established(link) | e2e::Dialed::Early(link, _) => Ok(link),
        }
    }

    /// Asks the relay for a channel, then dials the hub through it (see [`e2e::dial`]).
    async fn dial(
        &self,
        plane: &QuicPlane,
        hub: &HubName,
        hub_key: &PublicKey,
        purpose: SessionPurpose,
        early: bool,
    ) -> Result<e2e::Dialed, ClientError> {
        let (config, mismatch) = match purpose {
            SessionPurpose::Connect => self.quic_config(plane, hub_key)?,
            SessionPurpose::Pair => {
                let (mut tls, slot) = keyway_proto::tls::client_config(
                    &self.inner.config.identity,
                    *hub_key,
                    keyway_proto::ALPN_E2E,
                )?;
                tls.resumption = rustls::client::Resumption::disabled();
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                    .map_err(keyway_proto::tls::TlsConfigError::from)?;
                (self.with_e2e_transport(quinn::ClientConfig::new(Arc::new(crypto)))?, slot)
            }
        };
        let id = ChannelId::random().map_err(|e| ClientError::Io(std::io::Error::other(e)))?;
        // Bound before the request leaves: the hub's first answer may come right behind it.
        let binding = plane.paths.bind(id);
        let open = Frame::ChannelOpen { hub: hub.clone(), hub_key: *hub_key, purpose, channel: id };
        let (relay, stream) = self.relay_send(&open).await?;
        let params = e2e::DialParams {
            endpoint: &self.inner.endpoint,
            config,
            mismatch: &mismatch,
            hub_key: *hub_key,
            timeout: self.inner.config.session_timeout(),
        };
        let requested = e2e::Requested { stream, relay: &relay, binding, hub };
        let dialed = e2e::dial(params, requested, early).await;
        if let Err(ClientError::Protocol(ProtocolError::NoAnswer { .. })) = &dialed {
            // A relay that vanished without closing looks exactly like this. Do not close the
            // connection (other sessions may still be fine on it), but let the next `connect`
            // dial a fresh one instead of waiting on it again.
            self.forget(&relay).await;
        }
        dialed
    }

    fn quic_config(
        &self,
        plane: &QuicPlane,
        hub_key: &PublicKey,
    ) -> Result<(quinn::ClientConfig, MismatchSlot), ClientError> {
        // One insert of a finished config: a panic elsewhere cannot leave the map half-updated,
        // so a poisoned cache is still a good cache.
        let mut cache = plane.configs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((config, slot)) = cache.get(hub_key) {
            return Ok((config.clone(), slot.clone()));
        }
        let (mut tls, slot) =
            keyway_proto::tls::client_config(&self.inner.config.identity, *hub_key, keyway_proto::ALPN_E2E)?;
        tls.resumption = rustls::client::Resumption::store(plane.sessions.clone());
        // Lets a resumed dial offer early data; only `connect_early` ever writes any
        // (`e2e::dial` without `early` waits for the handshake before a stream opens).
        tls.enable_early_data = true;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(keyway_proto::tls::TlsConfigError::from)?;
        let config = self.with_e2e_transport(quinn::ClientConfig::new(Arc::new(crypto)))?;
        cache.insert(*hub_key, (config.clone(), slot.clone()));
        Ok((config, slot))
    }

    fn with_e2e_transport(
        &self,
        mut config: quinn::ClientConfig,
    ) -> Result<quinn::ClientConfig, ClientError> {
        let c = &self.inner.config;
        config.transport_config(Arc::new(keyway_path::e2e_transport_config(c.keep_alive, c.idle_timeout)?));
        Ok(config)
    }

    /// Counters of the path socket.
    pub fn path_stats(&self) -> keyway_path::PathStats {
        self.inner.quic.paths.stats()
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
        if let Some(nodes) = &self.inner.nodes {
            Box::pin(nodes.close()).await;
        }
        let slots: Vec<_> = {
            let links = self.inner.quic.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            links.values().cloned().collect()
        };
        for slot in slots {
            if let Some(link) = slot.lock().await.take_live() {
                link.close("client closed");
                self.link_gone(&link);
            }
        }
        if let Some(conn) = self.inner.conn.lock().await.take() {
            keyway_path::relay_link::close(&conn, keyway_proto::codes::NORMAL, "client closed");
            self.inner.events.relay_down(&conn);
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
        slot.take().inspect(|old| self.inner.events.relay_down(old));
        let conn = self.inner.dialer.dial(&self.inner.endpoint).await?;
        tracing::debug!(relay = %self.inner.config.relay_addr, "connected to relay");
        self.inner.events.relay_up(&conn, self.inner.config.relay_addr);
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    /// Drops `conn` from the cache if it is still the cached connection.
    async fn forget(&self, conn: &Connection) {
        let mut slot = self.inner.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
            *slot = None;
            self.inner.events.relay_down(conn);
        }
    }
}
