//! The cluster store's rules in one process ([`MemoryStore`]): the same claims, renewals,
//! releases, bindings and notices as the Redis store, so that the node driver is tested
//! without a Redis and relays started in one process (tests, an embedder) can form a cluster.
//!
//! The rules, the same in both stores: a claim always wins and gets an epoch above every epoch
//! the name had (the clock in microseconds, or one more than the last), so the newest
//! connection wins across nodes at once; a renewal keeps the lease only while no higher epoch
//! holds the name, and re-asserts a lease the store lost (expiry, restart) with its own epoch;
//! a release removes only its own epoch.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keyway_proto::{HubName, PublicKey};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::records::{NodeId, Presence, Replaced};

/// The store's rules in one process (see the module doc).
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<MemoryState>>,
    notices: broadcast::Sender<Replaced>,
}

#[derive(Default)]
struct MemoryState {
    presence: HashMap<HubName, (Presence, Instant)>,
    bindings: HashMap<HubName, PublicKey>,
    nodes: HashMap<NodeId, Instant>,
    marker: bool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self { state: Arc::default(), notices: broadcast::channel(1024).0 }
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn live(state: &MemoryState, name: &HubName) -> Option<Presence> {
        state.presence.get(name).filter(|(_, until)| *until > Instant::now()).map(|(p, _)| p.clone())
    }

    pub(super) fn claim(&self, name: &HubName, node: &NodeId, addr: SocketAddr, lease: Duration) -> u64 {
        let epoch = self.with(|s| {
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            let above = s.presence.get(name).map_or(0, |(p, _)| p.epoch.saturating_add(1));
            let epoch = clock.max(above);
            let presence = Presence { epoch, node: node.clone(), addr };
            s.presence.insert(name.clone(), (presence, Instant::now() + lease));
            epoch
        });
        let _ = self.notices.send(Replaced { name: name.clone(), epoch, node: node.clone() });
        epoch
    }

    pub(super) fn renew(&self, name: &HubName, presence: &Presence, lease: Duration) -> bool {
        self.with(|s| {
            if Self::live(s, name).is_some_and(|held| held.epoch > presence.epoch) {
                return false;
            }
            s.presence.insert(name.clone(), (presence.clone(), Instant::now() + lease));
            true
        })
    }

    pub(super) fn release(&self, name: &HubName, epoch: u64) {
        self.with(|s| {
            if s.presence.get(name).is_some_and(|(p, _)| p.epoch == epoch) {
                s.presence.remove(name);
            }
        });
    }

    pub(super) fn lookup(&self, name: &HubName) -> Option<Presence> {
        self.with(|s| Self::live(s, name))
    }

    pub(super) fn bind(&self, name: &HubName, key: &PublicKey) -> PublicKey {
        self.with(|s| *s.bindings.entry(name.clone()).or_insert(*key))
    }

    pub(super) fn heartbeat(&self, node: &NodeId, _addr: SocketAddr, lease: Duration) -> bool {
        self.with(|s| {
            s.nodes.insert(node.clone(), Instant::now() + lease);
            !std::mem::replace(&mut s.marker, true)
        })
    }

    /// Forgets everything, as a Redis restarted without persistence would (for tests).
    pub fn lose_everything(&self) {
        self.with(|s| *s = MemoryState::default());
    }

    pub(super) fn notices(&self) -> broadcast::Receiver<Replaced> {
        self.notices.subscribe()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStore")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).unwrap()
    }

    #[test]
    fn newest_claim_wins_and_stale_renewals_and_releases_lose() {
        let store = MemoryStore::new();
        let name = HubName::new("home").unwrap();
        let lease = Duration::from_secs(30);
        let addr1: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let addr2: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut notices = store.notices.subscribe();
        let e1 = store.claim(&name, &node("a"), addr1, lease);
        let e2 = store.claim(&name, &node("b"), addr2, lease);
        assert!(e2 > e1, "a later claim has a higher epoch");
        assert_eq!(notices.try_recv().unwrap().epoch, e1);
        assert_eq!(notices.try_recv().unwrap(), Replaced { name: name.clone(), epoch: e2, node: node("b") });
        let old = Presence { epoch: e1, node: node("a"), addr: addr1 };
        assert!(!store.renew(&name, &old, lease), "the older holder's renewal loses");
        store.release(&name, e1);
        assert_eq!(store.lookup(&name).map(|p| p.node), Some(node("b")), "a stale release removes nothing");
        // After the store lost everything, the holder re-asserts its lease with its epoch.
        store.lose_everything();
        assert!(store.lookup(&name).is_none());
        let new = Presence { epoch: e2, node: node("b"), addr: addr2 };
        assert!(store.renew(&name, &new, lease));
        assert!(!store.renew(&name, &old, lease), "and a stale holder still cannot take it back");
        assert_eq!(store.lookup(&name), Some(new));
    }

    #[test]
    fn a_binding_is_first_come_and_a_lost_store_is_noticed_once() {
        let store = MemoryStore::new();
        let name = HubName::new("home").unwrap();
        let (k1, k2) =
            (keyway_test_support::identity().public_key(), keyway_test_support::identity().public_key());
        assert_eq!(store.bind(&name, &k1), k1);
        assert_eq!(store.bind(&name, &k2), k1);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(store.heartbeat(&node("a"), addr, Duration::from_secs(1)), "first contact: state to assert");
        assert!(!store.heartbeat(&node("a"), addr, Duration::from_secs(1)));
        store.lose_everything();
        assert!(store.heartbeat(&node("a"), addr, Duration::from_secs(1)));
    }
}
