//! [`Client`], [`pair`] and [`Forward`]: the relay side of the bindings.
//!
//! A [`Client`] wraps one [`keyway_client::Client`] (one UDP endpoint, one relay connection,
//! one end-to-end connection per hub, each `connect` a stream on it). Phones go to the
//! background and lose their sockets, so [`Client::disconnect`] drops all of that at once, and the
//! next `connect` builds a fresh endpoint and dials again (one relay handshake, and an
//! end-to-end connection that resumes with a kept session ticket) instead of failing on a
//! closed one.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};

use keyway_client::{ClientConfig, ClientSessionMemoryCache, ClientSessionStore, PairingCode};
use keyway_proto::PublicKey;
use tokio::sync::{broadcast, oneshot};

use crate::error::KeywayError;
use crate::events::{ClientEvent, EventStream};
use crate::identity::Identity;
use crate::runtime;
use crate::storage::{parse_hub, parse_key, KnownHub, SecureStorage};
use crate::stream::Stream;

/// A handle on one relay, from which the app opens streams to hubs.
#[derive(Debug, uniffi::Object)]
pub struct Client {
    identity: Arc<Identity>,
    relay_addr: SocketAddr,
    relay_key: PublicKey,
    /// The live Rust client; `None` before the first use and after `disconnect`.
    live: Mutex<Option<keyway_client::Client>>,
    /// The hubs' session tickets, shared by every Rust client this one makes: after
    /// `disconnect` (a phone back from the background) the new end-to-end connections resume
    /// instead of paying full handshakes. In memory only (rustls keeps tickets opaque).
    tickets: Arc<dyn ClientSessionStore>,
    /// What `events()` streams: every Rust client this one makes forwards its events here.
    events: broadcast::Sender<ClientEvent>,
}

/// Events an app may fall behind by before it is told it missed some.
const EVENTS: usize = 64;

/// Tickets kept per client (a few per hub; an app reaches a handful of hubs).
const TICKETS: usize = 256;

/// `host:port` to one address: a literal address as is, a name through the system resolver.
fn resolve(relay: &str) -> Result<SocketAddr, KeywayError> {
    if let Ok(addr) = relay.trim().parse() {
        return Ok(addr);
    }
    let mut addrs = relay
        .trim()
        .to_socket_addrs()
        .map_err(|e| KeywayError::bad_argument(&format!("relay address {relay:?}"), e))?;
    addrs.next().ok_or_else(|| KeywayError::BadArgument {
        detail: format!("relay address {relay:?} resolves to no address"),
    })
}

impl Client {
    /// The live Rust client, creating one (a new endpoint) if there is none.
    fn live(&self) -> Result<keyway_client::Client, KeywayError> {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = live.as_ref() {
            return Ok(client.clone());
        }
        // `Client::new` binds its endpoint on the current runtime.
        let handle = runtime::handle()?;
        let _entered = handle.enter();
        let mut config = ClientConfig::new(self.identity.key(), self.relay_addr, self.relay_key);
        config.session_store = Some(self.tickets.clone());
        let client = keyway_client::Client::new(config)?;
        crate::events::forward(&client, self.events.clone());
        *live = Some(client.clone());
        Ok(client)
    }
}

#[uniffi::export]
impl Client {
    /// A client for the relay at `relay` (`host:port`) whose key is `relay_key` (`kw…`).
    /// Does not contact the relay yet: the first `connect` does.
    #[uniffi::constructor]
    pub fn new(identity: Arc<Identity>, relay: String, relay_key: String) -> Result<Arc<Self>, KeywayError> {
        let relay_key = parse_key("relay key", &relay_key)?;
        let relay_addr = resolve(&relay)?;
        let tickets = Arc::new(ClientSessionMemoryCache::new(TICKETS));
        let events = broadcast::channel(EVENTS).0;
        Ok(Arc::new(Self { identity, relay_addr, relay_key, live: Mutex::new(None), tickets, events }))
    }

    /// A client for the relay a pairing named (see [`pair`]).
    #[uniffi::constructor]
    pub fn from_pairing(identity: Arc<Identity>, paired: KnownHub) -> Result<Arc<Self>, KeywayError> {
        Self::new(identity, paired.relay, paired.relay_key)
    }

    /// Opens an end-to-end encrypted stream to the service behind hub `hub`, pinning `hub_key`.
    pub async fn connect(&self, hub: String, hub_key: String) -> Result<Arc<Stream>, KeywayError> {
        let hub = parse_hub(&hub)?;
        let hub_key = parse_key("hub key", &hub_key)?;
        let client = self.live()?;
        runtime::run(async move {
            let stream = client.connect(&hub, &hub_key).await?;
            Ok(Arc::new(Stream::new(stream)))
        })
        .await?
    }

    /// Listens on `listen` (`127.0.0.1:0` for any free port) and forwards every TCP connection
    /// to the service behind `hub`, for apps that embed a local port (a web view, an existing
    /// HTTP client). Runs until the returned handle's `stop`, or until it is dropped.
    pub async fn forward(
        &self,
        hub: String,
        hub_key: String,
        listen: String,
    ) -> Result<Arc<Forward>, KeywayError> {
        let hub = parse_hub(&hub)?;
        let hub_key = parse_key("hub key", &hub_key)?;
        let listen: SocketAddr =
            listen.trim().parse().map_err(|e| KeywayError::bad_argument("listen address", e))?;
        let client = self.live()?;
        runtime::run(async move {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| KeywayError::Io { detail: format!("cannot listen on {listen}: {e}") })?;
            let local_addr = listener.local_addr()?;
            let (stop, stopped) = oneshot::channel::<()>();
            let task =
                tokio::spawn(keyway_client::forward::run(client, hub, hub_key, listener, async move {
                    // A dropped handle stops the forwarder too.
                    let _ = stopped.await;
                }));
            Ok(Arc::new(Forward {
                local_addr: local_addr.to_string(),
                running: Mutex::new(Some((stop, task))),
            }))
        })
        .await?
    }

    /// Closes the relay connection, every end-to-end connection and the UDP endpoint (a phone
    /// going to the background). Streams still open end. The client stays usable: the next
    /// `connect` dials again. (Not `close`: that is Kotlin's `AutoCloseable.close()`, which
    /// frees the handle; the Python layer calls this `close`.)
    pub async fn disconnect(&self) -> Result<(), KeywayError> {
        let client = self.live.lock().unwrap_or_else(PoisonError::into_inner).take();
        match client {
            Some(client) => runtime::run(async move { client.close().await }).await,
            None => Ok(()),
        }
    }

    /// The device's network changed (Wi-Fi to cellular, a new address, back from airplane
    /// mode): drops the relay connection, the end-to-end connections (their streams end, the
    /// events say `Closed`) and the UDP socket bound on the old network, at once instead of
    /// after a timeout; the next `connect` dials from the new network and resumes the
    /// end-to-end connection with the kept ticket. (Moving a live connection to the new
    /// network without ending its streams comes with the direct path.)
    pub async fn network_changed(&self) -> Result<(), KeywayError> {
        self.disconnect().await
    }

    /// Every event of this client from now on (see [`ClientEvent`]).
    pub fn events(&self) -> Arc<EventStream> {
        Arc::new(EventStream::new(self.events.subscribe()))
    }

    /// The path socket's datagram counters, or nothing while there is no live endpoint
    /// (before the first `connect`, after `disconnect`).
    pub fn path_stats(&self) -> Option<PathStats> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.as_ref().map(|client| client.path_stats().into())
    }

    /// The app's public key (`kw…`).
    pub fn public_key(&self) -> String {
        self.identity.public_key()
    }

    /// The relay's address as resolved.
    pub fn relay_addr(&self) -> String {
        self.relay_addr.to_string()
    }
}

/// Datagram counters of a client's path socket (GSO/GRO segments counted one by one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct PathStats {
    /// Channel datagrams from the relay handed to QUIC (the end-to-end connections' packets).
    pub channel_in: u64,
    /// End-to-end datagrams sent to the relay under their channel's id.
    pub channel_out: u64,
    /// Datagrams of the relay connection itself.
    pub relay_in: u64,
    /// Dropped: from an address other than the relay's.
    pub dropped_foreign: u64,
    /// Dropped: under a channel id nobody bound (ended, or never this client's).
    pub dropped_unknown_channel: u64,
    /// Dropped: too short, empty or too large.
    pub dropped_malformed: u64,
    /// Dropped: sent by a closing connection whose channel was already unbound.
    pub dropped_unbound_send: u64,
    /// Held until their channel was bound.
    pub held: u64,
    /// Channels bound right now.
    pub bound: u64,
}

impl From<keyway_client::PathStats> for PathStats {
    fn from(s: keyway_client::PathStats) -> Self {
        Self {
            channel_in: s.channel_in,
            channel_out: s.channel_out,
            relay_in: s.relay_in,
            dropped_foreign: s.dropped_foreign,
            dropped_unknown_channel: s.dropped_unknown_channel,
            dropped_malformed: s.dropped_malformed,
            dropped_unbound_send: s.dropped_unbound_send,
            held: s.held,
            bound: u64::try_from(s.bound).unwrap_or(u64::MAX),
        }
    }
}

/// A forwarder's stop signal and its task.
type Running = (oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>);

/// A running local forwarder (see [`Client::forward`]).
#[derive(Debug, uniffi::Object)]
pub struct Forward {
    local_addr: String,
    running: Mutex<Option<Running>>,
}

#[uniffi::export]
impl Forward {
    /// The address it listens on (with the port picked, if `:0` was asked for).
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// Stops accepting and aborts the connections still open; waits until they are gone.
    /// Stopping twice is fine.
    pub async fn stop(&self) -> Result<(), KeywayError> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some((stop, task)) = running else { return Ok(()) };
        let _ = stop.send(());
        match runtime::run(task).await? {
            Ok(result) => Ok(result?),
            Err(e) => Err(KeywayError::Internal { detail: format!("the forwarder task failed: {e}") }),
        }
    }
}

/// Pairs `identity` with the hub named in the one-time `code` (a `keyway://pair?…` URI that
/// `keyway-hub pair` prints). On success the hub has added the app's key, and what the app
/// needs to connect later is returned and, if `storage` is given, added to its known hubs.
#[uniffi::export]
pub async fn pair(
    code: String,
    identity: Arc<Identity>,
    storage: Option<Arc<dyn SecureStorage>>,
) -> Result<KnownHub, KeywayError> {
    let code: PairingCode = code.trim().parse().map_err(|e| KeywayError::bad_argument("pairing code", e))?;
    let key = identity.key();
    let paired = runtime::run(async move { keyway_client::pair(&code, key).await }).await??;
    let known = KnownHub::from(&paired);
    if let Some(storage) = storage {
        let mut hubs = storage.load_hubs()?;
        hubs.retain(|h| h.hub != known.hub);
        hubs.push(known.clone());
        storage.store_hubs(hubs)?;
    }
    Ok(known)
}
