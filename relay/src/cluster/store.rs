//! [`Store`]: the one interface the node driver (`Cluster`) uses to reach its cluster's shared
//! store, dispatching to the Redis store ([`super::redis`], production) or the in-process one
//! ([`super::memory`], tests and embedders): presence leases (hub name → node, node address,
//! epoch), open-policy name bindings, node leases, and the replacement notices a claim
//! publishes. A single relay (no `--cluster`) uses neither: its in-memory registry alone.
//!
//! The enum has a file of its own so that the two stores import only the shared records
//! ([`super::records`]), never each other or the dispatch.

use std::net::SocketAddr;
use std::time::Duration;

use keyway_proto::{HubName, PublicKey};
use tokio::sync::broadcast;

use super::memory::MemoryStore;
use super::records::{AppList, NodeId, Presence, Renewal, Replaced, StoreError};
use super::redis::RedisStore;

/// The shared store of a cluster.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
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
    /// Claims `name` for `node` at `addr` with the hub's allow-list `apps`: always wins,
    /// returns the new epoch and publishes a [`Replaced`] notice.
    pub async fn claim(
        &self,
        name: &HubName,
        node: &NodeId,
        addr: SocketAddr,
        lease: Duration,
        apps: &AppList,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.claim(name, node, addr, lease, apps)),
            Store::Redis(r) => r.claim(name, node, addr, lease, apps).await,
        }
    }

    /// Renews (or re-asserts) `presence` of `name` and the lease of its allow-list (`listed`:
    /// the holder has a non-empty one).
    pub async fn renew(
        &self,
        name: &HubName,
        presence: &Presence,
        lease: Duration,
        listed: bool,
    ) -> Result<Renewal, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.renew(name, presence, lease, listed)),
            Store::Redis(r) => r.renew(name, presence, lease, listed).await,
        }
    }

    /// Replaces the allow-list of `name` if it is still held at `epoch`; `false` if not.
    pub async fn publish_apps(
        &self,
        name: &HubName,
        epoch: u64,
        apps: &AppList,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.publish_apps(name, epoch, apps, lease)),
            Store::Redis(r) => r.publish_apps(name, epoch, apps, lease).await,
        }
    }

    /// Removes `name`'s presence and allow-list if it still has `epoch`.
    pub async fn release(&self, name: &HubName, epoch: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.release(name, epoch);
                Ok(())
            }
            Store::Redis(r) => r.release(name, epoch).await,
        }
    }

    /// Where `name` is registered, if anywhere, with its allow-list if the store has it.
    pub async fn lookup(&self, name: &HubName) -> Result<Option<(Presence, Option<AppList>)>, StoreError> {
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
            Store::Memory(m) => m.notices(),
            Store::Redis(r) => r.notices(),
        }
    }
}
