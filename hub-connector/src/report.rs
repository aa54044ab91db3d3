//! A running connector's status as `keyway-hub status` shows it (through the admin socket,
//! `keyway_proto::admin`): its relays and how each tunnel stands, the apps holding a
//! connection or stream now, and the numbers of its sessions and of its local service. Read
//! live from the connector's shared state each time it is asked.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::state::Shared;
use crate::TunnelStatus;

/// A handle that reads a running connector's status; cheap to clone, keeps nothing alive but
/// the state it reads.
#[derive(Debug, Clone)]
pub struct StatusSource(pub(crate) Arc<Shared>);

/// One relay's tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayReport {
    pub address: SocketAddr,
    pub status: TunnelStatus,
    pub registrations: u64,
    pub reconnects: u64,
    pub channels: usize,
}

/// One app holding an end-to-end connection or stream now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppReport {
    pub key: String,
    pub fingerprint: String,
    pub label: String,
    pub connections: usize,
    pub streams: usize,
}

/// The whole status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubReport {
    pub name: String,
    pub public_key: String,
    pub status: TunnelStatus,
    pub forward: SocketAddr,
    pub relays: Vec<RelayReport>,
    pub apps: Vec<AppReport>,
    pub sessions_active: u64,
    pub sessions_accepted: u64,
    pub sessions_refused: u64,
    pub service_in_flight: u64,
    pub service_waiting: u64,
    pub service_unanswered: u64,
}

impl StatusSource {
    /// The status now.
    pub fn report(&self) -> HubReport {
        let shared = &self.0;
        let relays = shared
            .tunnels
            .iter()
            .map(|t| RelayReport {
                address: t.target.addr,
                status: t.status.borrow().clone(),
                registrations: t.registrations.load(Ordering::Relaxed),
                reconnects: t.reconnects.load(Ordering::Relaxed),
                channels: t.channels.len(),
            })
            .collect();
        let mut apps: Vec<AppReport> = shared
            .load
            .snapshot()
            .into_iter()
            .map(|(key, held)| AppReport {
                key: key.to_string(),
                fingerprint: key.fingerprint().to_string(),
                label: shared.apps.label(&key),
                connections: held.connections,
                streams: held.streams,
            })
            .collect();
        apps.sort_by(|a, b| a.label.cmp(&b.label).then_with(|| a.key.cmp(&b.key)));
        let stats = &shared.stats;
        HubReport {
            name: shared.config.name.to_string(),
            public_key: shared.config.identity.public_key().to_string(),
            status: shared.status.borrow().clone(),
            forward: shared.config.forward,
            relays,
            apps,
            sessions_active: stats.sessions_active(),
            sessions_accepted: stats.sessions_accepted(),
            sessions_refused: stats.sessions_refused(),
            service_in_flight: shared.service.in_flight(),
            service_waiting: shared.service.waiting(),
            service_unanswered: shared.service.unanswered(),
        }
    }
}
