//! What happens to a [`Client`](crate::Client)'s connections, as [`Event`]s an app can follow:
//! the relay connection up and down, each end-to-end connection to a hub opened (resumed with a
//! ticket or not) and lost, each loss with a typed [`Loss`].
//!
//! Why a broadcast: an app shows a status line, a test asserts an order, a binding forwards to
//! Python or Kotlin, each at its own pace; a subscriber that falls more than [`CAPACITY`] events
//! behind is told how many it missed ([`tokio::sync::broadcast`]'s `Lagged`) instead of slowing
//! the network down. Nothing is kept for a client nobody subscribed to.
//!
//! Where they come from: the places that dial call `Events::relay_up` and
//! `Events::hub_connected`, which also start a task that waits for that connection to close
//! and reports the loss. The places that find a connection closed and dial a new one call
//! `Events::relay_down` / `Events::hub_lost` first, so a loss is always reported before the
//! `up` of its replacement, whichever of the two notices it first; each loss is reported once.
//! The relay connection's loss and the end-to-end connections' losses it causes are reported as
//! each is noticed, so they may arrive in either order.
//!
//! Whether a connection resumed: quinn does not say whether a handshake resumed a TLS session,
//! so `TicketProbe` sits in front of the client's ticket store and records, per hub, whether
//! the last handshake took a ticket out of it (the hub may still decline it and do a full
//! handshake; the hub re-checks the app's key either way).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use keyway_proto::{HubName, PublicKey};
use quinn::{Connection, ConnectionError};
use rustls::client::ClientSessionStore;
use rustls::pki_types::ServerName;
use tokio::sync::{broadcast, watch, Notify};

use crate::e2e::LinkEnd;
use crate::error::{ChannelEnd, ClientError};

/// How many events a subscriber may fall behind before it is told it missed some.
pub const CAPACITY: usize = 64;

/// Something that happened to one of the client's connections.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The connection to the relay is up (dialed for the first time, or again).
    RelayUp { relay: SocketAddr },
    /// The connection to the relay is gone; the next connect dials again.
    RelayDown { relay: SocketAddr, loss: Loss },
    /// An end-to-end connection to a hub is up. `resumed`: its handshake used a session ticket
    /// from an earlier connection (no full key exchange with the hub).
    HubConnected { hub: HubName, hub_key: PublicKey, resumed: bool },
    /// An end-to-end connection to a hub is gone, and its streams with it; the next connect to
    /// that hub dials again.
    HubLost { hub: HubName, hub_key: PublicKey, loss: Loss },
}

/// Why a connection went, typed, with the human message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loss {
    pub reason: LossReason,
    /// What the library says about it (the error's message).
    pub detail: String,
}

/// Why a connection went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// This app closed it (`close`, `disconnect`, a network change it reported).
    Closed,
    /// The relay went away: it restarted (a stateless reset), was shut down, or the relay
    /// connection that carried the channel broke.
    RelayLost,
    /// Nothing was heard from the other side within the idle timeout (a dead network, a
    /// relay or hub that vanished without a word).
    TimedOut,
    /// The hub or the relay revoked this app's key.
    Revoked,
    /// The hub registered again (a newer connection of the same hub) and this channel ended.
    Replaced,
    /// The relay ended an idle channel.
    Idle,
    /// The other side closed it (the hub or relay shutting down, for instance).
    ClosedByPeer,
    /// Anything else (a protocol or transport error); `detail` says what.
    Error,
}

/// The sending side, one per client. The task waiting for a connection to close holds a handle
/// on it, so it ends as soon as that connection's loss is reported (by whoever noticed first)
/// or the client is dropped: it never keeps a connection open that the client let go.
#[derive(Debug)]
pub(crate) struct Events {
    shared: Shared,
    _alive: watch::Sender<()>,
}

/// What the waiting tasks share with the client.
#[derive(Clone, Debug)]
struct Shared {
    tx: broadcast::Sender<Event>,
    /// Connections reported up whose loss is not reported yet, by quinn's stable id, each with
    /// the signal that releases its waiting task once the loss is reported.
    open: Arc<Mutex<HashMap<usize, OpenEntry>>>,
    /// Its sender is the client's: `changed()` fails once the client is gone.
    alive: watch::Receiver<()>,
}

/// An open connection and the signal that releases its waiting task.
type OpenEntry = (Open, Arc<Notify>);

/// What a loss report needs to know about a connection reported up.
#[derive(Clone, Debug)]
enum Open {
    Relay(SocketAddr),
    Hub(HubName, PublicKey),
}

impl Default for Events {
    fn default() -> Self {
        let (alive, watching) = watch::channel(());
        let shared = Shared { tx: broadcast::channel(CAPACITY).0, open: Arc::default(), alive: watching };
        Self { shared, _alive: alive }
    }
}

impl Events {
    /// A receiver of every event from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.tx.subscribe()
    }

    /// The relay connection `conn` is up; its loss will be reported when it closes.
    pub(crate) fn relay_up(&self, conn: &Connection, relay: SocketAddr) {
        let released = self.shared.opened(conn, Open::Relay(relay));
        self.shared.emit(Event::RelayUp { relay });
        let (shared, conn) = (self.shared.clone(), conn.clone());
        tokio::spawn(async move {
            if shared.until_closed(&conn, &released).await {
                shared.relay_down(&conn);
            }
        });
    }

    /// Reports the loss of relay connection `conn`, unless it was reported already. One still
    /// open is reported as `TimedOut`: the client stops using it because it did not answer.
    pub(crate) fn relay_down(&self, conn: &Connection) {
        self.shared.relay_down(conn);
    }

    /// The end-to-end connection `link` to `hub` is up (`resumed`: with a ticket, see
    /// [`TicketProbe`]); its loss will be reported when it closes.
    pub(crate) fn hub_connected(&self, link: LinkEnd, hub: &HubName, hub_key: &PublicKey, resumed: bool) {
        let released = self.shared.opened(link.connection(), Open::Hub(hub.clone(), *hub_key));
        self.shared.emit(Event::HubConnected { hub: hub.clone(), hub_key: *hub_key, resumed });
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if shared.until_closed(link.connection(), &released).await {
                shared.hub_lost(&link);
            }
        });
    }

    /// Reports the loss of the end-to-end connection `link`, unless it was reported already.
    pub(crate) fn hub_lost(&self, link: &LinkEnd) {
        self.shared.hub_lost(link);
    }
}

impl Shared {
    fn emit(&self, event: Event) {
        tracing::debug!(?event, "client event");
        // No subscriber is not an error: nobody is listening.
        let _ = self.tx.send(event);
    }

    /// Adds `conn` to the open set; returns the signal of its loss being reported.
    fn opened(&self, conn: &Connection, what: Open) -> Arc<Notify> {
        let released = Arc::new(Notify::new());
        let entry = (what, Arc::clone(&released));
        self.open.lock().unwrap_or_else(PoisonError::into_inner).insert(conn.stable_id(), entry);
        released
    }

    /// Takes `conn` out of the open set, releasing its waiting task: `Some` only for the
    /// first caller.
    fn take(&self, conn: &Connection) -> Option<Open> {
        let (what, released) =
            self.open.lock().unwrap_or_else(PoisonError::into_inner).remove(&conn.stable_id())?;
        released.notify_one();
        Some(what)
    }

    /// Waits until `conn` closes (true), or its loss was reported elsewhere or the client is
    /// dropped (false).
    async fn until_closed(&self, conn: &Connection, released: &Notify) -> bool {
        let mut alive = self.alive.clone();
        tokio::select! {
            biased;
            _ = conn.closed() => true,
            _ = released.notified() => false,
            _ = alive.changed() => false,
        }
    }

    fn relay_down(&self, conn: &Connection) {
        let Some(Open::Relay(relay)) = self.take(conn) else { return };
        let loss = conn.close_reason().map_or_else(
            || Loss {
                reason: LossReason::TimedOut,
                detail: "no answer from the relay on this connection; the next connect dials a new one"
                    .into(),
            },
            |e| connection_loss(&e),
        );
        self.emit(Event::RelayDown { relay, loss });
    }

    fn hub_lost(&self, link: &LinkEnd) {
        let Some(Open::Hub(hub, hub_key)) = self.take(link.connection()) else { return };
        let loss = link.closed_error().map_or_else(
            || Loss { reason: LossReason::Closed, detail: "replaced by a new connection".into() },
            |e| client_loss(&e),
        );
        self.emit(Event::HubLost { hub, hub_key, loss });
    }
}

/// A relay connection's end, typed.
fn connection_loss(e: &ConnectionError) -> Loss {
    let reason = match e {
        ConnectionError::LocallyClosed => LossReason::Closed,
        ConnectionError::Reset => LossReason::RelayLost,
        ConnectionError::TimedOut => LossReason::TimedOut,
        ConnectionError::ApplicationClosed(close) => match close.error_code {
            code if code == keyway_proto::codes::REVOKED => LossReason::Revoked,
            code if code == keyway_proto::codes::REPLACED => LossReason::Replaced,
            _ => LossReason::ClosedByPeer,
        },
        ConnectionError::ConnectionClosed(_) => LossReason::ClosedByPeer,
        _ => LossReason::Error,
    };
    Loss { reason, detail: e.to_string() }
}

/// An end-to-end connection's end as the link words it, typed.
fn client_loss(e: &ClientError) -> Loss {
    let reason = match e {
        ClientError::Revoked | ClientError::ChannelEnded(ChannelEnd::Revoked) => LossReason::Revoked,
        ClientError::ChannelEnded(ChannelEnd::RelayLost(_)) => LossReason::RelayLost,
        ClientError::ChannelEnded(ChannelEnd::Idle) => LossReason::Idle,
        ClientError::ChannelEnded(ChannelEnd::HubReplaced) => LossReason::Replaced,
        ClientError::ChannelEnded(ChannelEnd::Closed) => LossReason::ClosedByPeer,
        ClientError::HubConnection(e) | ClientError::Connection(e) => connection_loss(e).reason,
        _ => LossReason::Error,
    };
    Loss { reason, detail: e.to_string() }
}

/// The client's ticket store, with a record of whether each hub's last handshake took a
/// ticket from it (see the module doc).
#[derive(Debug)]
pub(crate) struct TicketProbe {
    inner: Arc<dyn ClientSessionStore>,
    took: Mutex<HashMap<String, bool>>,
}

impl TicketProbe {
    pub(crate) fn new(inner: Arc<dyn ClientSessionStore>) -> Arc<Self> {
        Arc::new(Self { inner, took: Mutex::default() })
    }

    /// Whether the last handshake with the hub of `server_name` offered a ticket.
    pub(crate) fn resumed(&self, server_name: &str) -> bool {
        self.took.lock().unwrap_or_else(PoisonError::into_inner).get(server_name).copied().unwrap_or(false)
    }
}

fn name(server_name: &ServerName<'_>) -> String {
    match server_name {
        ServerName::DnsName(name) => name.as_ref().to_owned(),
        other => format!("{other:?}"),
    }
}

impl ClientSessionStore for TicketProbe {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.inner.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let ticket = self.inner.take_tls13_ticket(server_name);
        self.took.lock().unwrap_or_else(PoisonError::into_inner).insert(name(server_name), ticket.is_some());
        ticket
    }
}

impl crate::Client {
    /// Every [`Event`] of this client from now on. A receiver that falls more than
    /// [`CAPACITY`] events behind gets `Lagged` with the count it missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Reports the end-to-end connection `link` to `hub` up.
    pub(crate) fn link_up(&self, link: &crate::e2e::Link, hub: &HubName, hub_key: &PublicKey) {
        let server_name = keyway_proto::tls::e2e_server_name(hub_key);
        let resumed = self.inner.quic.sessions.resumed(&server_name);
        self.inner.events.hub_connected(link.end(), hub, hub_key, resumed);
    }

    /// Reports the end-to-end connection `link` gone, unless that was reported already.
    pub(crate) fn link_gone(&self, link: &crate::e2e::Link) {
        self.inner.events.hub_lost(&link.end());
    }
}
