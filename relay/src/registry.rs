//! The routing table: hub name → the one live, registered hub connection.
//!
//! A `DashMap` keeps lookups on the session path lock-free across hubs. Each entry carries a
//! connection id, because a hub that reconnects replaces its entry at once ("newest connection
//! wins") and the old connection's clean-up must then not remove the new entry.
//!
//! An entry ([`Hub`]) is a thin wrapper: the hub's QUIC connection and control channel beside
//! its allow-list and live sessions, which are plain state of their own ([`HubAccess`]). The
//! table is generic over its entries so that its rules are tested without a connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use keyway_proto::{HubName, PublicKey};
use tokio::sync::{mpsc, oneshot};

use crate::access::{Charge, HubAccess, IdleCharge};
use crate::standing::Listing;
use crate::stats::RelayStats;

/// Something the relay wants a hub's control task to do (it owns the control stream).
#[derive(Debug)]
pub(crate) enum ControlCommand {
    /// Send `GoAway` and finish the control stream; `done` fires once it was delivered (or gave up).
    GoAway { retry_after_ms: u32, message: String, done: oneshot::Sender<()> },
    /// The hub's name is no longer authorized: refuse on the control stream and disconnect.
    Revoke { message: String },
}

/// One registered hub connection: the thin wrapper pairing the hub's QUIC connection and
/// control channel with its [`HubAccess`] state.
pub(crate) struct Hub {
    pub name: HubName,
    pub key: PublicKey,
    pub conn: quinn::Connection,
    pub conn_id: u64,
    pub control: mpsc::UnboundedSender<ControlCommand>,
    /// The published allow-list and the live sessions.
    pub access: HubAccess,
}

impl Hub {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: HubName,
        key: PublicKey,
        conn: quinn::Connection,
        conn_id: u64,
        allowed: Vec<PublicKey>,
        pairing_open: bool,
        control: mpsc::UnboundedSender<ControlCommand>,
        stats: Arc<RelayStats>,
    ) -> Self {
        let access = HubAccess::new(name.clone(), key, allowed, pairing_open, stats);
        Self { name, key, conn, conn_id, control, access }
    }
}

/// What the table needs of an entry: the name it is registered under and the connection it
/// belongs to. (A trait so that the table's rules are tested with plain entries, no QUIC.)
pub(crate) trait Entry {
    fn name(&self) -> &HubName;
    fn conn_id(&self) -> u64;
}

impl Entry for Hub {
    fn name(&self) -> &HubName {
        &self.name
    }
    fn conn_id(&self) -> u64 {
        self.conn_id
    }
}

/// The table of registered hubs.
pub(crate) struct Registry<H = Hub> {
    hubs: DashMap<HubName, Arc<H>>,
    stats: Arc<RelayStats>,
    next_id: AtomicU64,
}

impl<H: Entry> Registry<H> {
    pub fn new(stats: Arc<RelayStats>) -> Self {
        Self { hubs: DashMap::new(), stats, next_id: AtomicU64::new(1) }
    }

    /// A fresh id for a connection or a session.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `hub`, returning the entry it displaced (whose connection the caller closes).
    pub fn insert(&self, hub: Arc<H>) -> Option<Arc<H>> {
        let old = self.hubs.insert(hub.name().clone(), hub);
        if old.is_none() {
            self.stats.hub_up();
        }
        old
    }

    /// Removes `name` only if it still maps to connection `conn_id`. Returns the removed entry.
    pub fn remove_if_current(&self, name: &HubName, conn_id: u64) -> Option<Arc<H>> {
        let removed = self.hubs.remove_if(name, |_, hub| hub.conn_id() == conn_id).map(|(_, hub)| hub);
        if removed.is_some() {
            self.stats.hub_down();
        }
        removed
    }

    pub fn get(&self, name: &HubName) -> Option<Arc<H>> {
        // Clone the Arc out so no shard lock is held across an await.
        self.hubs.get(name).map(|e| Arc::clone(e.value()))
    }

    /// How many hubs are registered.
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    /// A snapshot of every registered hub.
    pub fn all(&self) -> Vec<Arc<H>> {
        self.hubs.iter().map(|e| Arc::clone(e.value())).collect()
    }
}

/// An idle app connection's charge to a registered hub, and which registration it was.
pub(crate) struct Charged {
    charge: IdleCharge,
    name: HubName,
    conn_id: u64,
}

impl Registry<Hub> {
    /// Whether some registered hub lists `key` now.
    pub fn lists(&self, key: &PublicKey) -> bool {
        self.hubs.iter().any(|e| e.value().access.lists(key))
    }

    /// Keeps `held` if its hub is still the registered one and still lists the key; else
    /// charges the idle connection of `key` to the first registered hub that lists it and has
    /// room under `budget`. Scans the table only when `held` lapsed.
    pub fn charge_idle(&self, held: &mut Option<Charged>, key: &PublicKey, budget: u32) -> Listing {
        if let Some(c) = held.as_ref() {
            let current = self.hubs.get(&c.name).is_some_and(|h| h.conn_id == c.conn_id);
            if current && c.charge.still_listed() {
                return Listing::Charged;
            }
        }
        *held = None;
        let mut listed = false;
        for entry in self.hubs.iter() {
            let hub = entry.value();
            match hub.access.charge_idle(key, budget) {
                Charge::Charged(charge) => {
                    *held = Some(Charged { charge, name: hub.name.clone(), conn_id: hub.conn_id });
                    return Listing::Charged;
                }
                Charge::Full => listed = true,
                Charge::Unlisted => {}
            }
        }
        if listed {
            Listing::Full
        } else {
            Listing::Unlisted
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry entry without a connection: the table's rules need only names and ids.
    struct Plain {
        name: HubName,
        conn_id: u64,
    }

    impl Entry for Plain {
        fn name(&self) -> &HubName {
            &self.name
        }
        fn conn_id(&self) -> u64 {
            self.conn_id
        }
    }

    #[test]
    fn newest_connection_wins_and_stale_cleanup_is_ignored() {
        let stats = Arc::new(RelayStats::default());
        let registry = Registry::new(Arc::clone(&stats));
        let name = HubName::new("home").unwrap();
        let first = Arc::new(Plain { name: name.clone(), conn_id: 1 });
        let second = Arc::new(Plain { name: name.clone(), conn_id: 2 });
        assert!(registry.insert(first).is_none());
        assert_eq!(registry.insert(second).map(|h| h.conn_id), Some(1));
        assert_eq!(stats.hubs_connected(), 1);
        // The old connection's clean-up runs late: it must not remove the new entry.
        assert!(registry.remove_if_current(&name, 1).is_none());
        assert_eq!(registry.get(&name).map(|h| h.conn_id), Some(2));
        assert!(registry.remove_if_current(&name, 2).is_some());
        assert_eq!(stats.hubs_connected(), 0);
        assert!(registry.get(&name).is_none());
    }

    #[test]
    fn ids_are_unique_and_every_hub_is_listed_once() {
        let registry = Registry::new(Arc::new(RelayStats::default()));
        let (a, b) = (registry.next_id(), registry.next_id());
        assert_ne!(a, b);
        for (i, n) in ["a", "b", "c"].into_iter().enumerate() {
            registry.insert(Arc::new(Plain { name: HubName::new(n).unwrap(), conn_id: i as u64 }));
        }
        registry.insert(Arc::new(Plain { name: HubName::new("b").unwrap(), conn_id: 9 }));
        assert_eq!(registry.len(), 3);
        let mut ids: Vec<u64> = registry.all().iter().map(|h| h.conn_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 2, 9]);
    }
}
