//! What a relay is started with: [`RelayConfig`] and its defaults.
//!
//! The library takes a fully built configuration; flags, environment variables and config
//! files are the binary's business (`cli`), so tests and embedders start a relay without them.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::Identity;

use crate::channel::Direction;
use crate::cluster::config::ClusterConfig;
use crate::cluster::records::NodeId;
use crate::limits::Limits;
use crate::policy::NamePolicy;

/// Default QUIC idle timeout. Hubs keep their tunnel alive well inside it (about every 15 s),
/// so only truly dead peers are timed out.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time allowed for a stream's first frame and for a hub's answer to an announce.
pub const DEFAULT_SESSION_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a graceful shutdown waits for live sessions to end.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default address of the metrics and health listener: loopback only, so it is not exposed
/// unless an operator says so.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// A test/debug hook that sees every chunk the relay forwards (to prove, for example, that only
/// ciphertext crosses the relay). It runs inline on the forwarding path, so it must be cheap.
pub type ForwardTap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

/// Everything a relay needs to start.
pub struct RelayConfig {
    /// UDP address to listen on (`127.0.0.1:0` picks a free port; see
    /// [`RelayHandle::local_addr`](crate::RelayHandle::local_addr)).
    pub listen: SocketAddr,
    /// The relay's own key, pinned by hubs and apps.
    pub identity: Identity,
    pub policy: NamePolicy,
    /// QUIC idle timeout for every connection.
    pub idle_timeout: Duration,
    /// How long to wait for a stream's first frame (`Register` / `ChannelOpen`) and for the
    /// hub's answer to a `ChannelAnnounce`.
    pub session_open_timeout: Duration,
    /// Sees every chunk the relay forwards; `None` in production.
    pub tap: Option<ForwardTap>,
    /// Limits (changeable later with [`RelayHandle::set_limits`](crate::RelayHandle::set_limits)).
    pub limits: Limits,
    /// TCP address of the HTTP listener serving `/metrics` and `/healthz`; `None`: none.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a graceful shutdown waits for live sessions to end before closing them.
    pub drain_timeout: Duration,
    /// This node's stable id in a cluster of relays sharing one key; `None`: a single relay.
    /// The QUIC reset and connection-ID secrets derive from (key, id), so siblings cannot
    /// reset each other's connections (see [`crate::cluster`]).
    pub node_id: Option<NodeId>,
    /// Be a node of a cluster sharing presence through a store (needs `node_id`); `None`: a
    /// single relay with its in-memory registry only.
    pub cluster: Option<ClusterConfig>,
}

impl RelayConfig {
    /// A configuration with the default timeouts and limits, no metrics listener and no tap.
    pub fn new(listen: SocketAddr, identity: Identity, policy: NamePolicy) -> Self {
        Self {
            listen,
            identity,
            policy,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            session_open_timeout: DEFAULT_SESSION_OPEN_TIMEOUT,
            tap: None,
            limits: Limits::default(),
            metrics_listen: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            node_id: None,
            cluster: None,
        }
    }
}

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `Identity`'s Debug shows only the public key; the tap is opaque.
        f.debug_struct("RelayConfig")
            .field("listen", &self.listen)
            .field("identity", &self.identity)
            .field("policy", &self.policy)
            .field("idle_timeout", &self.idle_timeout)
            .field("session_open_timeout", &self.session_open_timeout)
            .field("tap", &self.tap.as_ref().map(|_| "<tap>"))
            .field("limits", &self.limits)
            .field("metrics_listen", &self.metrics_listen)
            .field("drain_timeout", &self.drain_timeout)
            .field("node_id", &self.node_id)
            .field("cluster", &self.cluster)
            .finish()
    }
}
