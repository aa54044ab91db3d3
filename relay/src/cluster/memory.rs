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

use super::records::{AppList, NodeId, Presence, Renewal, Replaced};

/// The store's rules in one process (see the module doc).
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<MemoryState>>,
    notices: broadcast::Sender<Replaced>,
}

#[derive(Default)]
struct MemoryState {
    presence: HashMap<HubName, (Presence, Instant)>,
    apps: HashMap<HubName, (AppList, Instant)>,
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

    pub(super) fn claim(
        &self,
        name: &HubName,
        node: &NodeId,
        addr: SocketAddr,
        lease: Duration,
        apps: &AppList,
    ) -> u64 {
        let epoch = self.with(|s| {
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            let above = s.presence.get(name).map_or(0, |(p, _)| p.epoch.saturating_add(1));
            let epoch = clock.max(above);
            let presence = Presence { epoch, node: node.clone(), addr };
            s.presence.insert(name.clone(), (presence, Instant::now() + lease));
            if apps.is_empty() {
                s.apps.remove(name);
            } else {
                s.apps.insert(name.clone(), (apps.clone(), Instant::now() + lease));
            }
            epoch
        });
        let _ = self.notices.send(Replaced { name: name.clone(), epoch, node: node.clone() });
        epoch
    }

    pub(super) fn renew(
        &self,
        name: &HubName,
        presence: &Presence,
        lease: Duration,
        listed: bool,
    ) -> Renewal {
        self.with(|s| {
            let held = Self::live(s, name);
            if held.as_ref().is_some_and(|held| held.epoch > presence.epoch) {
                return Renewal::Lost;
            }
            let until = Instant::now() + lease;
            s.presence.insert(name.clone(), (presence.clone(), until));
            let list_kept = match s.apps.get_mut(name).filter(|(_, t)| *t > Instant::now()) {
                Some((_, t)) => {
                    *t = until;
                    true
                }
                None => false,
            };
            if (listed && !list_kept) || held.is_none_or(|h| h.epoch != presence.epoch) {
                Renewal::Restored
            } else {
                Renewal::Held
            }
        })
    }

    pub(super) fn publish_apps(&self, name: &HubName, epoch: u64, apps: &AppList, lease: Duration) -> bool {
        self.with(|s| {
            if Self::live(s, name).is_none_or(|p| p.epoch != epoch) {
                return false;
            }
            s.apps.insert(name.clone(), (apps.clone(), Instant::now() + lease));
            true
        })
    }

    pub(super) fn release(&self, name: &HubName, epoch: u64) {
        self.with(|s| {
            if s.presence.get(name).is_some_and(|(p, _)| p.epoch == epoch) {
                s.presence.remove(name);
                s.apps.remove(name);
            }
        });
    }

    pub(super) fn lookup(&self, name: &HubName) -> Option<(Presence, Option<AppList>)> {
        self.with(|s| {
            let presence = Self::live(s, name)?;
            let apps = s.apps.get(name).filter(|(_, t)| *t > Instant::now()).map(|(a, _)| a.clone());
            Some((presence, apps))
        })
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
        let e1 = store.claim(&name, &node("a"), addr1, lease, &AppList::default());
        let e2 = store.claim(&name, &node("b"), addr2, lease, &AppList::default());
        assert!(e2 > e1, "a later claim has a higher epoch");
        assert_eq!(notices.try_recv().unwrap().epoch, e1);
        assert_eq!(notices.try_recv().unwrap(), Replaced { name: name.clone(), epoch: e2, node: node("b") });
        let old = Presence { epoch: e1, node: node("a"), addr: addr1 };
        assert_eq!(store.renew(&name, &old, lease, false), Renewal::Lost, "the older holder's renewal loses");
        store.release(&name, e1);
        assert_eq!(
            store.lookup(&name).map(|(p, _)| p.node),
            Some(node("b")),
            "a stale release removes nothing"
        );
        // After the store lost everything, the holder re-asserts its lease with its epoch.
        store.lose_everything();
        assert!(store.lookup(&name).is_none());
        let new = Presence { epoch: e2, node: node("b"), addr: addr2 };
        assert_eq!(store.renew(&name, &new, lease, false), Renewal::Restored, "re-asserted");
        assert_eq!(store.renew(&name, &new, lease, false), Renewal::Held);
        assert_eq!(
            store.renew(&name, &old, lease, false),
            Renewal::Lost,
            "a stale holder cannot take it back"
        );
        assert_eq!(store.lookup(&name), Some((new, None)));
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

    #[test]
    fn an_allow_list_lives_with_its_holders_epoch() {
        let store = MemoryStore::new();
        let name = HubName::new("home").unwrap();
        let lease = Duration::from_secs(30);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let app = keyway_test_support::identity().public_key();
        let apps = AppList::of([&app]);
        let e1 = store.claim(&name, &node("a"), addr, lease, &apps);
        assert_eq!(store.lookup(&name).and_then(|(_, a)| a), Some(apps.clone()));
        let e2 = store.claim(&name, &node("b"), addr, lease, &AppList::default());
        assert_eq!(store.lookup(&name).and_then(|(_, a)| a), None, "registered with none: no list");
        assert!(!store.publish_apps(&name, e1, &apps, lease), "an older holder cannot write");
        assert!(store.publish_apps(&name, e2, &AppList::default(), lease));
        assert_eq!(
            store.lookup(&name).and_then(|(_, a)| a),
            Some(AppList::default()),
            "a changed list, empty"
        );
        assert!(store.publish_apps(&name, e2, &apps, lease));
        let held = Presence { epoch: e2, node: node("b"), addr };
        assert_eq!(store.renew(&name, &held, lease, true), Renewal::Held);
        store.with(|s| s.apps.clear());
        assert_eq!(store.renew(&name, &held, lease, true), Renewal::Restored, "the list was lost");
        store.release(&name, e2);
        assert!(store.lookup(&name).is_none());
    }
}
