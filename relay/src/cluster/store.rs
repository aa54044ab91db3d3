//! The shared store of a cluster: what nodes agree on through it, and its two implementations.
//!
//! [`Store`] is the one interface the node driver (`Cluster`) uses: presence leases
//! (hub name → node, node address, epoch), open-policy name bindings, node leases, and the
//! replacement notices a claim publishes. [`Store::Redis`] is the production store
//! ([`super::redis`]); [`Store::Memory`] keeps the same rules in one process, so the driver
//! is tested without a Redis and relays started in one process (tests, an embedder) can form
//! a cluster. A single relay (no `--cluster`) uses neither: its in-memory registry alone.
//!
//! The rules, the same in both: a claim always wins and gets an epoch above every epoch the
//! name had (the store's clock in microseconds, or one more than the last), so the newest
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

use super::NodeId;

/// Where a hub is registered now, as the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub epoch: u64,
    pub node: NodeId,
    pub addr: SocketAddr,
}

impl Presence {
    /// The stored form, `EPOCH NODE ADDR` (one short string per hub keeps the store's memory
    /// per hub small; the Lua scripts read the epoch off its front).
    pub(crate) fn encode(&self) -> String {
        format!("{} {} {}", self.epoch, self.node, self.addr)
    }

    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let epoch = parts.next()?.parse().ok()?;
        let node = NodeId::new(parts.next()?).ok()?;
        let addr = parts.next()?.parse().ok()?;
        Some(Self { epoch, node, addr })
    }
}

/// A claim's notice to the other nodes: `name` is now held at `epoch` by `node`; whoever holds
/// it with a lower epoch drops its tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub name: HubName,
    pub epoch: u64,
    pub node: NodeId,
}

impl Replaced {
    #[cfg(test)]
    pub(crate) fn encode(&self) -> String {
        format!("{} {} {}", self.name, self.epoch, self.node)
    }

    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let name = HubName::new(parts.next()?).ok()?;
        let epoch = parts.next()?.parse().ok()?;
        let node = NodeId::new(parts.next()?).ok()?;
        Some(Self { name, epoch, node })
    }
}

/// Why the store did not answer. Nodes keep serving what they have; the operation is retried
/// (soft state) or refused with a typed refusal (a lookup).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store (redis): {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("cluster store answered something this relay cannot read: {0}")]
    Garbled(String),
    #[error("cluster store did not answer within {0:?}")]
    Timeout(Duration),
}

/// The shared store of a cluster.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(super::redis::RedisStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Memory(_) => f.write_str("Store::Memory"),
            Store::Redis(r) => write!(f, "Store::Redis({})", r.url()),
        }
    }
}

impl Store {
    /// Claims `name` for `node` at `addr`: always wins, returns the new epoch and publishes a
    /// [`Replaced`] notice.
    pub async fn claim(
        &self,
        name: &HubName,
        node: &NodeId,
        addr: SocketAddr,
        lease: Duration,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.claim(name, node, addr, lease)),
            Store::Redis(r) => r.claim(name, node, addr, lease).await,
        }
    }

    /// Renews (or re-asserts) `presence` of `name`; `false`: a higher epoch holds the name.
    pub async fn renew(
        &self,
        name: &HubName,
        presence: &Presence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.renew(name, presence, lease)),
            Store::Redis(r) => r.renew(name, presence, lease).await,
        }
    }

    /// Removes `name`'s presence if it still has `epoch`.
    pub async fn release(&self, name: &HubName, epoch: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.release(name, epoch);
                Ok(())
            }
            Store::Redis(r) => r.release(name, epoch).await,
        }
    }

    /// Where `name` is registered, if anywhere.
    pub async fn lookup(&self, name: &HubName) -> Result<Option<Presence>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.lookup(name)),
            Store::Redis(r) => r.lookup(name).await,
        }
    }

    /// Binds `name` to `key` if it is free (open policy); returns the key it is bound to.
    pub async fn bind(&self, name: &HubName, key: &PublicKey) -> Result<PublicKey, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.bind(name, key)),
            Store::Redis(r) => r.bind(name, key).await,
        }
    }

    /// Renews this node's lease (what an operator's `KEYS kw:node:*` shows; not used for
    /// routing) and says whether the store had lost its state since the last call (a restart
    /// without persistence, a failover to a replica that had not caught up), so that the node
    /// re-asserts its bindings at once.
    pub async fn heartbeat(
        &self,
        node: &NodeId,
        addr: SocketAddr,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.heartbeat(node, addr, lease)),
            Store::Redis(r) => r.heartbeat(node, addr, lease).await,
        }
    }

    /// The replacement notices, from now on. Delivery is at most once (Redis pub/sub): a lost
    /// notice is made up for by the next renewal, which finds the higher epoch.
    pub fn notices(&self) -> broadcast::Receiver<Replaced> {
        match self {
            Store::Memory(m) => m.notices.subscribe(),
            Store::Redis(r) => r.notices(),
        }
    }
}

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

    fn claim(&self, name: &HubName, node: &NodeId, addr: SocketAddr, lease: Duration) -> u64 {
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

    fn renew(&self, name: &HubName, presence: &Presence, lease: Duration) -> bool {
        self.with(|s| {
            if Self::live(s, name).is_some_and(|held| held.epoch > presence.epoch) {
                return false;
            }
            s.presence.insert(name.clone(), (presence.clone(), Instant::now() + lease));
            true
        })
    }

    fn release(&self, name: &HubName, epoch: u64) {
        self.with(|s| {
            if s.presence.get(name).is_some_and(|(p, _)| p.epoch == epoch) {
                s.presence.remove(name);
            }
        });
    }

    fn lookup(&self, name: &HubName) -> Option<Presence> {
        self.with(|s| Self::live(s, name))
    }

    fn bind(&self, name: &HubName, key: &PublicKey) -> PublicKey {
        self.with(|s| *s.bindings.entry(name.clone()).or_insert(*key))
    }

    fn heartbeat(&self, node: &NodeId, _addr: SocketAddr, lease: Duration) -> bool {
        self.with(|s| {
            s.nodes.insert(node.clone(), Instant::now() + lease);
            !std::mem::replace(&mut s.marker, true)
        })
    }

    /// Forgets everything, as a Redis restarted without persistence would (for tests).
    pub fn lose_everything(&self) {
        self.with(|s| *s = MemoryState::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).unwrap()
    }

    #[test]
    fn records_read_back() {
        let p = Presence {
            epoch: 1_733_000_000_000_123,
            node: node("relay-1"),
            addr: "[::1]:4433".parse().unwrap(),
        };
        assert_eq!(Presence::decode(&p.encode()), Some(p));
        let r = Replaced { name: HubName::new("home").unwrap(), epoch: 7, node: node("b") };
        assert_eq!(Replaced::decode(&r.encode()), Some(r));
        for bad in ["", "x a 1.2.3.4:5", "1 -bad 1.2.3.4:5", "1 a nowhere", "home 1"] {
            assert!(Presence::decode(bad).is_none() || Replaced::decode(bad).is_none(), "{bad:?}");
        }
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
