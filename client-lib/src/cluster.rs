//! Following a relay cluster's redirects: the app asks its relay node for a hub, a node that
//! does not hold the hub answers `Redirect { node }` with the address of the node that does,
//! and the client asks there, pinning the same relay key (every node of a cluster presents
//! one key), without the caller noticing.
//!
//! Each other node gets a [`Client`] of its own (its own endpoint and relay connection, made
//! on the first redirect to it, kept for the client's life), and the client remembers which
//! node each hub was found at, so later connects go there at once: after the first, a redirect
//! costs nothing. A remembered node that no longer has the hub (it moved, the node died) is
//! forgotten and the home relay asked again. Sibling clients never follow a redirect
//! themselves (they return [`ClientError::Redirected`]), so a redirect is followed once per
//! connect, never in a loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use keyway_proto::{HubName, RefusalReason};

use crate::config::ClientConfig;
use crate::error::{ClientError, ProtocolError};
use crate::Client;

/// The other nodes this client was sent to, and where each hub was last found.
#[derive(Debug, Default)]
pub(crate) struct Nodes {
    siblings: Mutex<HashMap<SocketAddr, Client>>,
    homes: Mutex<HashMap<HubName, SocketAddr>>,
}

impl Nodes {
    /// The client of the node `hub` was last found at, if any.
    pub(crate) fn home_of(&self, hub: &HubName) -> Option<Client> {
        let node = *self.homes.lock().unwrap_or_else(PoisonError::into_inner).get(hub)?;
        self.siblings.lock().unwrap_or_else(PoisonError::into_inner).get(&node).cloned()
    }

    pub(crate) fn remember(&self, hub: &HubName, node: SocketAddr) {
        self.homes.lock().unwrap_or_else(PoisonError::into_inner).insert(hub.clone(), node);
    }

    pub(crate) fn forget(&self, hub: &HubName) {
        self.homes.lock().unwrap_or_else(PoisonError::into_inner).remove(hub);
    }

    /// The client for node `node`, made with `config`'s identity, relay key and timers.
    pub(crate) fn sibling(&self, node: SocketAddr, config: &ClientConfig) -> Result<Client, ClientError> {
        let mut siblings = self.siblings.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = siblings.get(&node) {
            return Ok(client.clone());
        }
        let mut sibling = ClientConfig::new(config.identity.duplicate(), node, config.relay_key);
        sibling.connect_timeout = config.connect_timeout;
        sibling.keep_alive = config.keep_alive;
        sibling.idle_timeout = config.idle_timeout;
        // The hubs' tickets are the hubs', whichever node carries the packets.
        sibling.session_store = config.session_store.clone();
        let client = Client::new_sibling(sibling)?;
        siblings.insert(node, client.clone());
        Ok(client)
    }

    /// Closes every sibling's connections.
    pub(crate) async fn close(&self) {
        let siblings: Vec<Client> =
            self.siblings.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        for sibling in siblings {
            sibling.close().await;
        }
    }
}

/// Whether `error`, from a remembered node, means the hub is no longer there (so the home
/// relay should be asked again) rather than an answer about the hub itself.
pub(crate) fn moved(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Redirected { .. }
            | ClientError::RelayUnreachable { .. }
            | ClientError::Connection(_)
            | ClientError::ChannelEnded(_)
            | ClientError::HubConnection(_)
            | ClientError::Protocol(ProtocolError::NoAnswer { .. })
            | ClientError::Refused { reason: RefusalReason::HubOffline | RefusalReason::UnknownHub, .. }
    )
}

/// Whether `result` is a node that did not answer at all (so another node of the cluster
/// should be asked) rather than an answer about the hub.
pub(crate) fn unreachable<T>(result: &Result<T, ClientError>) -> bool {
    matches!(result, Err(ClientError::RelayUnreachable { .. } | ClientError::Connection(_)))
}
