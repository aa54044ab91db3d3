//! The operator's HTTP listener: Prometheus `/metrics` and `/healthz`, on its own TCP port
//! (by default loopback only), separate from the relay's UDP port so that it is never exposed
//! to hubs and apps by accident. The serving is [`keyway_proto::ops_http`]'s; this module says
//! what the relay reports.
//!
//! `/healthz` answers 200 only while the QUIC listener accepts; it answers 503 from the moment a
//! graceful shutdown starts, so a load balancer or Kubernetes stops sending new traffic while
//! the relay drains. A cluster node also answers 503 while its store has been unreachable for
//! longer than a blip.

use std::net::SocketAddr;
use std::sync::Arc;

use keyway_proto::ops_http::{self, OpsSource};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::stats::RelayStats;

/// What the listener reads: the metrics and whether the relay is draining.
pub(crate) struct MetricsState {
    pub stats: Arc<RelayStats>,
    pub draining: watch::Receiver<bool>,
    /// A cluster node reports lasting store trouble (not a blip; see `cluster::TROUBLE_GRACE`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl OpsSource for MetricsState {
    fn metrics(&self) -> String {
        self.stats.encode()
    }

    fn health(&self) -> Result<(), &'static str> {
        if *self.draining.borrow() {
            Err("draining")
        } else if let Some(cluster) = &self.cluster {
            cluster.health()
        } else {
            Ok(())
        }
    }
}

/// Binds `addr` and serves until the task is aborted. Returns the bound address (with the real
/// port if `:0` was asked for) and the serving task.
pub(crate) async fn serve(
    addr: SocketAddr,
    state: MetricsState,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    ops_http::serve(TcpListener::bind(addr).await?, Arc::new(state))
}
