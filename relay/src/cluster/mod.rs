//! Several relay nodes, one namespace (issue 16): what a node of a cluster is and what it
//! shares with its siblings.
//!
//! Every node of a cluster presents the same relay key (apps and hubs pin one key, as for one
//! service) and has its own stable [`NodeId`]. The id is configured, never drawn per start: the
//! per-node QUIC secrets derive from it ([`keyway_proto::tls::node_endpoint_config`]), so a
//! node restarted after a crash still resets its own old connections, and a packet that reached
//! the wrong node gets no valid reset.
//!
//! With a store ([`ClusterConfig`], `--cluster redis://…`), the node's driver (`Cluster`)
//! keeps, by what losing it costs:
//! * **presence** (soft state): each hub registered here is a lease in the store (name →
//!   node, node address, epoch), renewed every third of the lease while the tunnel is up and
//!   re-asserted after any store trouble. A registration claims the name with a new, higher
//!   epoch and publishes a notice; the node holding it with a lower epoch drops that tunnel at
//!   once (`REPLACED`). A lost notice costs at most one renewal period: the renewal finds the
//!   higher epoch and drops the tunnel then.
//! * **open-policy bindings** (durable state): checked in the store before a name is admitted
//!   (first key wins across the cluster) and kept in each node's bindings file as before; a
//!   node re-asserts its file's bindings whenever it finds that the store lost its state. Run
//!   Redis with `appendonly yes` (checked and reported at start): the files cover only the
//!   bindings of nodes that are up.
//! * **allow-lists** (soft state, with presence): once the hub changes its allow-list on its
//!   tunnel (a revocation, a pairing), its node publishes the whole list ([`AppList`]) at once,
//!   and again in full whenever a renewal finds that the store lost it. Until then the list the
//!   hub registered with is known only at its node, which every other node redirects to, so
//!   idle hubs cost the store nothing for it. Only the node holding the name's current epoch may
//!   write it; a claim removes an older holder's list.
//! * an app's `ChannelOpen` for a hub that is not here is answered with the hub's node address
//!   (`Redirect`), looked up in the store with the allow-list; an app the list does not admit
//!   is refused here (`AppNotAuthorized`) instead. A list that is missing or stale can only
//!   send the app on: the hub's node checks the whole key, and the hub checks it again.
//!
//! Without a store a relay is a single node: its in-memory registry is all there is, and
//! nothing of this module runs.
//!
//! The files, from the leaf up: `records` (the shared vocabulary), `memory` and `redis` (the
//! two stores), `store` (the dispatch), `config`; this file holds the driver, which is handed
//! the registry and the name book it works on, so no relay state imports it back.

pub mod config;
pub mod memory;
pub mod records;
pub mod redis;
pub mod store;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use keyway_proto::{HubName, PublicKey, RefusalReason, SessionPurpose};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};

use crate::policy::{NameBook, WireRefusal};
use crate::registry::Registry;
pub use config::{ClusterConfig, ClusterError, StoreConfig, DEFAULT_LEASE, TROUBLE_GRACE};
use keyway_proto::codes;
pub use memory::MemoryStore;
pub use records::{AppList, NodeId, NodeIdError, Presence, Renewal, Replaced, StoreError, MAX_NODE_ID};
pub use store::Store;

/// The cluster's metrics (added to the relay's registry; no per-hub label).
struct ClusterStats {
    redirects: IntCounter,
    refused_remote: IntCounter,
    replaced_remote: IntCounter,
    store_ops: IntCounterVec,
    store_seconds: Histogram,
    store_up: IntGauge,
    claims: IntGauge,
    durable: IntGauge,
}

impl ClusterStats {
    fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let ns = "keyway_relay_cluster";
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c);
        let redirects = IntCounter::with_opts(
            Opts::new("redirects_total", "ChannelOpens answered with the hub's node address.").namespace(ns),
        )?;
        let refused_remote = IntCounter::with_opts(
            Opts::new(
                "refused_total",
                "ChannelOpens for a hub at another node refused here by the allow-list its node published.",
            )
            .namespace(ns),
        )?;
        let replaced_remote = IntCounter::with_opts(
            Opts::new("replaced_total", "Tunnels dropped because the hub registered on another node.")
                .namespace(ns),
        )?;
        let store_ops = IntCounterVec::new(
            Opts::new("store_operations_total", "Store operations by result (ok, error).").namespace(ns),
            &["result"],
        )?;
        let store_seconds = Histogram::with_opts(
            HistogramOpts::new("store_seconds", "Latency of store operations.")
                .namespace(ns)
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]),
        )?;
        let store_up = IntGauge::with_opts(
            Opts::new("store_up", "1 while the last store operation succeeded.").namespace(ns),
        )?;
        let claims = IntGauge::with_opts(
            Opts::new("hubs", "Hubs this node holds a presence lease for.").namespace(ns),
        )?;
        let durable = IntGauge::with_opts(
            Opts::new("store_append_only", "1: the store runs with appendonly yes; 0: no; -1: unknown.")
                .namespace(ns),
        )?;
        reg(Box::new(redirects.clone()))?;
        reg(Box::new(refused_remote.clone()))?;
        reg(Box::new(replaced_remote.clone()))?;
        reg(Box::new(store_ops.clone()))?;
        reg(Box::new(store_seconds.clone()))?;
        reg(Box::new(store_up.clone()))?;
        reg(Box::new(claims.clone()))?;
        reg(Box::new(durable.clone()))?;
        Ok(Self {
            redirects,
            refused_remote,
            replaced_remote,
            store_ops,
            store_seconds,
            store_up,
            claims,
            durable,
        })
    }
}

/// One hub registered here, as the cluster knows it.
#[derive(Clone, Copy)]
struct Claim {
    conn_id: u64,
    /// `None` until the store confirmed the claim (store trouble): the next renewal claims.
    epoch: Option<u64>,
    /// The store holds an allow-list for it (renewed with it; see [`AppList`] for when).
    listed: bool,
}

/// A node's cluster driver (see the module doc).
pub(crate) struct Cluster {
    store: Store,
    node: NodeId,
    addr: SocketAddr,
    lease: Duration,
    claims: DashMap<HubName, Claim>,
    stats: ClusterStats,
    /// Milliseconds since `started` of the first failure of the current run of failures;
    /// `u64::MAX`: the store is fine.
    trouble_since: AtomicU64,
    started: tokio::time::Instant,
    /// The store lost its state (or trouble): re-assert the bindings on the next tick.
    reassert: AtomicBool,
    /// The hubs registered at this node (the relay's own registry).
    registry: Arc<Registry>,
    /// The relay's name policy, whose open-policy bindings the node re-asserts.
    names: Arc<NameBook>,
    /// Hubs whose allow-list changed (or failed to publish) since it was last published.
    apps_dirty: Mutex<HashSet<HubName>>,
    /// Wakes the driver to publish them.
    apps_changed: Notify,
}

/// The parts of the relay's state the driver works on.
pub(crate) struct Local {
    pub registry: Arc<Registry>,
    pub names: Arc<NameBook>,
}

impl Cluster {
    /// Connects to the store (which must answer now) as node `node` reachable at `addr`,
    /// serving the hubs of `local`.
    pub async fn start(
        config: &ClusterConfig,
        node: NodeId,
        addr: SocketAddr,
        local: Local,
        metrics: &prometheus::Registry,
    ) -> Result<Arc<Self>, ClusterError> {
        if config.lease < Duration::from_millis(300) {
            return Err(ClusterError::LeaseTooShort);
        }
        let store = match &config.store {
            StoreConfig::Memory(m) => Store::Memory(m.clone()),
            StoreConfig::Redis(url) => Store::Redis(redis::RedisStore::connect(url).await?),
        };
        // Constant definitions: fails only on a programming error (a duplicate name).
        let stats = ClusterStats::new(metrics)
            .map_err(|e| ClusterError::Store(StoreError::Garbled(e.to_string())))?;
        let durability = match &store {
            Store::Redis(r) => r.durability().await,
            Store::Memory(_) => redis::Durability::Unknown,
        };
        stats.durable.set(match durability {
            redis::Durability::AppendOnly => 1,
            redis::Durability::NotAppendOnly => 0,
            redis::Durability::Unknown => -1,
        });
        if durability == redis::Durability::NotAppendOnly {
            warn!(
                "the cluster store runs without appendonly: a restart of it forgets open-policy name \
                 bindings until the nodes that made them re-assert them (see docs/operating.md)"
            );
        }
        let server_id = keyway_proto::cid::ServerId::of_node(node.as_str());
        info!(node = %node, %server_id, addr = %addr, store = ?store, lease = ?config.lease, "cluster node");
        stats.store_up.set(1);
        Ok(Arc::new(Self {
            store,
            node,
            addr,
            lease: config.lease,
            claims: DashMap::new(),
            stats,
            trouble_since: AtomicU64::new(u64::MAX),
            started: tokio::time::Instant::now(),
            reassert: AtomicBool::new(true),
            registry: local.registry,
            names: local.names,
            apps_dirty: Mutex::default(),
            apps_changed: Notify::new(),
        }))
    }

    /// Times one store operation and keeps the trouble state.
    async fn timed<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = tokio::time::Instant::now();
        let result = op.await;
        self.stats.store_seconds.observe(start.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                self.stats.store_ops.with_label_values(&["ok"]).inc();
                self.stats.store_up.set(1);
                if self.trouble_since.swap(u64::MAX, Ordering::Relaxed) != u64::MAX {
                    info!("cluster store reachable again");
                    self.reassert.store(true, Ordering::Relaxed);
                }
            }
            Err(e) => {
                self.stats.store_ops.with_label_values(&["error"]).inc();
                self.stats.store_up.set(0);
                let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
                if self
                    .trouble_since
                    .compare_exchange(u64::MAX, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    warn!("cluster store trouble: {e}");
                }
            }
        }
        result
    }

    /// `Err` once the store has failed without a success for [`TROUBLE_GRACE`] (`/healthz`).
    pub fn health(&self) -> Result<(), &'static str> {
        let since = self.trouble_since.load(Ordering::Relaxed);
        if since == u64::MAX {
            return Ok(());
        }
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(since) >= u64::try_from(TROUBLE_GRACE.as_millis()).unwrap_or(u64::MAX) {
            Err("cluster store unreachable")
        } else {
            Ok(())
        }
    }

    /// Open policy: whether `key` may take `name` cluster-wide (first key wins). With the
    /// store in trouble the node's own book decides (availability over a lock nobody can
    /// check; the store re-learns the binding when it is back).
    pub async fn admit_binding(&self, name: &HubName, key: &PublicKey) -> Result<(), WireRefusal> {
        match self.timed(self.store.bind(name, key)).await {
            Ok(bound) if bound == *key => Ok(()),
            Ok(bound) => Err(WireRefusal::new(
                RefusalReason::NameClaimed,
                format!(
                    "hub name {name} is already bound to key {} in this relay cluster; your key is {}",
                    bound.fingerprint(),
                    key.fingerprint()
                ),
            )),
            Err(_) => Ok(()),
        }
    }

    /// Records that connection `conn_id` registered `name` here and claims it in the store
    /// (without an allow-list: see the module doc).
    pub async fn claim(&self, name: &HubName, conn_id: u64) {
        self.claims.insert(name.clone(), Claim { conn_id, epoch: None, listed: false });
        self.stats.claims.set(self.claims.len() as i64);
        self.claim_in_store(name, conn_id).await;
    }

    async fn claim_in_store(&self, name: &HubName, conn_id: u64) {
        let none = AppList::default();
        if let Ok(epoch) = self.timed(self.store.claim(name, &self.node, self.addr, self.lease, &none)).await
        {
            self.confirm(name, conn_id, epoch);
        }
    }

    /// The allow-list connection `conn_id` of `name` published here (empty if it is gone).
    fn apps_of(&self, name: &HubName, conn_id: u64) -> AppList {
        match self.registry.get(name).filter(|h| h.conn_id == conn_id) {
            Some(hub) => AppList::of(&hub.access.allowed()),
            None => AppList::default(),
        }
    }

    /// Sets the epoch of a claim, if the connection still holds it here.
    fn confirm(&self, name: &HubName, conn_id: u64, epoch: u64) {
        let current = self.registry.get(name).is_some_and(|h| h.conn_id == conn_id);
        if let Some(mut claim) = self.claims.get_mut(name) {
            if current && claim.conn_id == conn_id && claim.epoch.is_none_or(|e| e < epoch) {
                claim.epoch = Some(epoch);
                claim.listed = false;
            }
        }
    }

    /// The hub `name` (connection `conn_id`) published a new allow-list here: publish it to
    /// the other nodes (at once, by the driver; again at each renewal until it succeeds).
    pub fn apps_changed(&self, name: &HubName, conn_id: u64) {
        if self.claims.get(name).is_some_and(|c| c.conn_id == conn_id) {
            self.apps_dirty.lock().unwrap_or_else(PoisonError::into_inner).insert(name.clone());
            self.apps_changed.notify_one();
        }
    }

    /// Publishes the allow-lists that changed; those that failed stay for the next round.
    async fn publish_apps(&self) {
        let dirty = std::mem::take(&mut *self.apps_dirty.lock().unwrap_or_else(PoisonError::into_inner));
        for name in dirty {
            let Some(claim) = self.claims.get(&name).map(|c| *c) else { continue };
            // An unconfirmed claim publishes its list after it is confirmed (next round).
            let Some(epoch) = claim.epoch else {
                self.apps_dirty.lock().unwrap_or_else(PoisonError::into_inner).insert(name);
                continue;
            };
            let apps = self.apps_of(&name, claim.conn_id);
            match self.timed(self.store.publish_apps(&name, epoch, &apps, self.lease)).await {
                Ok(true) => {
                    if let Some(mut c) = self.claims.get_mut(&name).filter(|c| c.conn_id == claim.conn_id) {
                        c.listed = true;
                    }
                }
                // Another node holds the name now: its renewal drops the tunnel here.
                Ok(false) => {}
                Err(_) => {
                    self.apps_dirty.lock().unwrap_or_else(PoisonError::into_inner).insert(name);
                }
            }
        }
    }

    /// The hub's connection `conn_id` ended: give its lease back.
    pub async fn release(&self, name: &HubName, conn_id: u64) {
        let Some((_, claim)) = self.claims.remove_if(name, |_, c| c.conn_id == conn_id) else { return };
        self.stats.claims.set(self.claims.len() as i64);
        if let Some(epoch) = claim.epoch {
            let _ = self.timed(self.store.release(name, epoch)).await;
        }
    }

    /// Whether app `app`, refused here with `refusal`, should be sent to another node:
    /// `Ok(addr)` of the node holding `name` when the hub is not here (`HubOffline`, or
    /// `UnknownHub` under the open policy, whose bindings this node may not have), the store
    /// says another node holds it, and the allow-list published there admits the app (or is
    /// not known; a pairing always goes on). An app the list does not admit is refused here;
    /// otherwise the refusal stands. A store that cannot be asked turns `HubOffline` into a
    /// refusal that says so.
    pub async fn elsewhere(
        &self,
        name: &HubName,
        app: &PublicKey,
        purpose: SessionPurpose,
        refusal: WireRefusal,
    ) -> Result<SocketAddr, WireRefusal> {
        let here = refusal.reason == RefusalReason::HubOffline
            || (refusal.reason == RefusalReason::UnknownHub && self.names.is_open());
        if !here {
            return Err(refusal);
        }
        let found = match self.timed(self.store.lookup(name)).await {
            Ok(found) => found,
            Err(e) => return Err(WireRefusal::new(
                RefusalReason::HubOffline,
                format!("hub {name} is not connected to this relay node, and the cluster store cannot be asked where it is: {e}"),
            )),
        };
        let Some((presence, apps)) = found.filter(|(p, _)| p.node != self.node) else { return Err(refusal) };
        if purpose == SessionPurpose::Connect && apps.is_some_and(|apps| !apps.admits(app)) {
            self.stats.refused_remote.inc();
            return Err(WireRefusal::new(
                RefusalReason::AppNotAuthorized,
                format!(
                    "hub {name} does not authorize app key {} ({app}); pair this app with the hub first",
                    app.fingerprint()
                ),
            ));
        }
        self.stats.redirects.inc();
        Ok(presence.addr)
    }

    /// Drops the tunnel of `name` if connection `conn_id` still holds it here: the hub
    /// registered again on another node.
    fn drop_tunnel(&self, name: &HubName, conn_id: u64, why: &str) {
        self.claims.remove_if(name, |_, c| c.conn_id == conn_id);
        self.stats.claims.set(self.claims.len() as i64);
        if let Some(hub) = self.registry.remove_if_current(name, conn_id) {
            self.stats.replaced_remote.inc();
            info!(hub = %name, key = %hub.key.fingerprint(), why, "hub registered on another node; dropping its tunnel here");
            hub.conn.close(
                codes::REPLACED,
                b"replaced by a newer connection of the same hub on another relay node",
            );
        }
    }

    fn on_notice(&self, notice: &Replaced) {
        if notice.node == self.node {
            return;
        }
        let Some(claim) = self.claims.get(&notice.name).map(|c| *c) else { return };
        if claim.epoch.is_none_or(|e| e < notice.epoch) {
            self.drop_tunnel(&notice.name, claim.conn_id, "notice");
        }
    }

    /// One renewal round: the node lease (noticing a store that lost its state), the
    /// bindings if they need re-asserting, then every presence lease of this node.
    async fn tick(&self) {
        match self.timed(self.store.heartbeat(&self.node, self.addr, self.lease)).await {
            Ok(true) => self.reassert.store(true, Ordering::Relaxed),
            Ok(false) => {}
            Err(_) => return,
        }
        if self.reassert.swap(false, Ordering::Relaxed) {
            let bindings = self.names.open_bindings();
            for (name, key) in &bindings {
                if self.timed(self.store.bind(name, key)).await.is_err() {
                    self.reassert.store(true, Ordering::Relaxed);
                    return;
                }
            }
            if !bindings.is_empty() {
                info!(bindings = bindings.len(), "open-policy bindings re-asserted in the cluster store");
            }
        }
        let claims: Vec<(HubName, Claim)> =
            self.claims.iter().map(|e| (e.key().clone(), *e.value())).collect();
        let rounds = futures_util::stream::iter(claims).map(|(name, claim)| async move {
            match claim.epoch {
                None => self.claim_in_store(&name, claim.conn_id).await,
                Some(epoch) => {
                    let presence = Presence { epoch, node: self.node.clone(), addr: self.addr };
                    match self.timed(self.store.renew(&name, &presence, self.lease, claim.listed)).await {
                        Ok(Renewal::Held) | Err(_) => {}
                        // Only a stored list is published again: a hub that never had one
                        // stays without (see `AppList`).
                        Ok(Renewal::Restored) if !claim.listed => {}
                        Ok(Renewal::Restored) => {
                            self.apps_dirty.lock().unwrap_or_else(PoisonError::into_inner).insert(name);
                        }
                        Ok(Renewal::Lost) => self.drop_tunnel(&name, claim.conn_id, "renewal"),
                    }
                }
            }
        });
        use futures_util::StreamExt;
        rounds.buffer_unordered(64).for_each(|()| async {}).await;
        self.publish_apps().await;
    }

    /// Runs the node's cluster chores until the task is aborted: renewals every third of the
    /// lease, the replacement notices as they come, and changed allow-lists at once.
    pub async fn run(self: Arc<Self>) {
        let mut notices = self.store.notices();
        let mut renew = tokio::time::interval(self.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = renew.tick() => self.tick().await,
                () = self.apps_changed.notified() => self.publish_apps().await,
                notice = notices.recv() => match notice {
                    Ok(notice) => self.on_notice(&notice),
                    // Missed notices are made up for by the next renewal.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => notices = self.store.notices(),
                },
            }
        }
    }
}
