//! How a relay is made a node of a cluster: [`ClusterConfig`] (which store, the advertised
//! address, the presence lease), its defaults, and [`ClusterError`], why a node could not
//! start. The relay's own configuration and error types name these, so the file imports only
//! the shared records and the in-process store, never the node driver.

use std::net::SocketAddr;
use std::time::Duration;

use super::memory::MemoryStore;
use super::records::StoreError;

/// Default presence lease: a dead node's hubs are looked up at it for at most this long
/// (they re-register elsewhere sooner, which replaces the entry at once).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Store trouble must last this long before `/healthz` reports it: a blip (a Redis restart, a
/// failover) must not take a node out of a load balancer that still serves its hubs.
pub const TROUBLE_GRACE: Duration = Duration::from_secs(10);

/// Which store a cluster node uses.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// `redis://HOST:PORT[/DB]`, or `redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER` (the
    /// primary as the Sentinels name it, followed across failovers).
    Redis(String),
    /// An in-process store shared by relays of one process (tests, embedders).
    Memory(MemoryStore),
}

/// What a relay needs to be a node of a cluster (beside its `node_id`).
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub store: StoreConfig,
    /// The UDP address apps and hubs reach this node at, as redirects name it. `None`: the
    /// bound address (fine on loopback and with host networking; set it behind NAT).
    pub advertise: Option<SocketAddr>,
    /// The presence lease (renewed every third of it).
    pub lease: Duration,
}

impl ClusterConfig {
    pub fn new(store: StoreConfig) -> Self {
        Self { store, advertise: None, lease: DEFAULT_LEASE }
    }
}

/// Why a cluster node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("a cluster node needs a node id (--node-id)")]
    NoNodeId,
    #[error("the presence lease must be at least 300 ms")]
    LeaseTooShort,
    #[error("cannot reach the cluster store at start: {0}")]
    Store(#[from] StoreError),
}
