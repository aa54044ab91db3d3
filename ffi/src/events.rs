//! [`ClientEvent`]s for the app: what happens to a [`crate::Client`]'s connections, read from
//! an [`EventStream`] (`async for` in Python, a `Flow` in Kotlin, an `AsyncSequence` in Swift).
//!
//! One binding client makes a new Rust client after each `disconnect` or `network_changed`, so
//! the stream an app holds is the binding client's own broadcast, fed by one task per Rust
//! client that forwards its [`keyway_client::events::Event`]s; it ends (`None`) once the binding
//! client is dropped. An app that reads too slowly gets a [`ClientEvent::Missed`] with the count
//! instead of slowing the network down.

use keyway_client::events::{Event, LossReason as RustLoss};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::runtime;

/// Why a connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum LossReason {
    /// This app closed it (`disconnect`, `network_changed`).
    Closed,
    /// The relay went away (restarted, shut down, or its connection broke).
    RelayLost,
    /// Nothing heard from the other side within the idle timeout (dead network, vanished peer).
    TimedOut,
    /// The hub or the relay revoked this app's key.
    Revoked,
    /// The hub registered again and this channel ended.
    Replaced,
    /// The relay ended an idle channel.
    Idle,
    /// The other side closed it.
    ClosedByPeer,
    /// Anything else; `detail` says what.
    Error,
}

impl From<RustLoss> for LossReason {
    fn from(r: RustLoss) -> Self {
        match r {
            RustLoss::Closed => Self::Closed,
            RustLoss::RelayLost => Self::RelayLost,
            RustLoss::TimedOut => Self::TimedOut,
            RustLoss::Revoked => Self::Revoked,
            RustLoss::Replaced => Self::Replaced,
            RustLoss::Idle => Self::Idle,
            RustLoss::ClosedByPeer => Self::ClosedByPeer,
            _ => Self::Error,
        }
    }
}

/// Something that happened to one of the client's connections.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum ClientEvent {
    /// The connection to the relay (`host:port`) is up.
    RelayUp { relay: String },
    /// The connection to the relay is gone; the next connect dials again.
    RelayDown { relay: String, reason: LossReason, detail: String },
    /// An end-to-end connection to `hub` is up; `resumed`: its handshake used a session ticket
    /// kept from an earlier connection.
    HubConnected { hub: String, hub_key: String, resumed: bool },
    /// The end-to-end connection to `hub` is gone, and its streams with it.
    HubLost { hub: String, hub_key: String, reason: LossReason, detail: String },
    /// The app read too slowly and `count` events were dropped before this one.
    Missed { count: u64 },
}

impl ClientEvent {
    /// The binding's form of `e`; `None` for a kind of event this binding does not know.
    fn from_rust(e: Event) -> Option<Self> {
        Some(match e {
            Event::RelayUp { relay } => Self::RelayUp { relay: relay.to_string() },
            Event::RelayDown { relay, loss } => {
                Self::RelayDown { relay: relay.to_string(), reason: loss.reason.into(), detail: loss.detail }
            }
            Event::HubConnected { hub, hub_key, resumed } => {
                Self::HubConnected { hub: hub.to_string(), hub_key: hub_key.to_string(), resumed }
            }
            Event::HubLost { hub, hub_key, loss } => Self::HubLost {
                hub: hub.to_string(),
                hub_key: hub_key.to_string(),
                reason: loss.reason.into(),
                detail: loss.detail,
            },
            _ => return None,
        })
    }
}

/// Events of one binding client, from when it was asked for on.
#[derive(Debug, uniffi::Object)]
pub struct EventStream {
    rx: tokio::sync::Mutex<broadcast::Receiver<ClientEvent>>,
}

impl EventStream {
    pub(crate) fn new(rx: broadcast::Receiver<ClientEvent>) -> Self {
        Self { rx: tokio::sync::Mutex::new(rx) }
    }
}

#[uniffi::export]
impl EventStream {
    /// The next event, waiting for it; `None` once the client is gone. Cancelling the wait
    /// loses nothing.
    pub async fn next(&self) -> Option<ClientEvent> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Ok(event) => Some(event),
            Err(RecvError::Lagged(count)) => Some(ClientEvent::Missed { count }),
            Err(RecvError::Closed) => None,
        }
    }
}

/// Forwards `client`'s events to `tx` until that Rust client is dropped.
pub(crate) fn forward(client: &keyway_client::Client, tx: broadcast::Sender<ClientEvent>) {
    let mut rx = client.subscribe();
    let Ok(handle) = runtime::handle() else { return };
    handle.spawn(async move {
        loop {
            let event = match rx.recv().await {
                Ok(event) => match ClientEvent::from_rust(event) {
                    Some(event) => event,
                    None => continue,
                },
                Err(RecvError::Lagged(count)) => ClientEvent::Missed { count },
                Err(RecvError::Closed) => return,
            };
            let _ = tx.send(event);
        }
    });
}
