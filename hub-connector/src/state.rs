//! The state every task of a running connector shares: the config, the counters, the apps
//! list, the live sessions, the TLS configs, the pairing window and the status of each tunnel.
//!
//! The drivers ([`crate::connector`] starts things, [`crate::tunnel`] runs one relay's
//! connection, `e2e` one app's end-to-end connection, [`crate::pairing`] a pairing exchange,
//! [`crate::metrics`] answers scrapes) all take an
//! `Arc<Shared>` and import it from here; this module imports none of them, so no driver
//! imports another one back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use keyway_path::Paths;

use crate::apps::{Apps, AppsChange};
use crate::channels::Channels;
use crate::config::{HubConfig, RelayTarget};
use crate::error::HubError;
use crate::load::AppLoad;
use crate::registry::SessionRegistry;
use crate::status::TunnelStatus;

/// The tunnel to one configured relay: its status and counters, and the channels the relay
/// introduced on it with the path socket that carries their packets.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub(crate) target: RelayTarget,
    /// The channel table of this tunnel's UDP socket (see `keyway_path::socket`).
    pub(crate) paths: Paths,
    /// The live channels, by the virtual address `paths` bound for each.
    pub(crate) channels: Arc<Channels>,
    pub(crate) status: watch::Sender<TunnelStatus>,
    /// Successful registrations with this relay.
    pub(crate) registrations: AtomicU64,
    /// Times this registered tunnel was lost (or moved after `GoAway`).
    pub(crate) reconnects: AtomicU64,
}

impl Tunnel {
    pub(crate) fn new(target: RelayTarget, paths: Paths) -> Self {
        Self {
            target,
            paths,
            channels: Arc::default(),
            status: watch::channel(TunnelStatus::Connecting).0,
            registrations: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_registered(&self) -> bool {
        *self.status.borrow() == TunnelStatus::Registered
    }
}

/// State shared by the tunnels, the apps watcher and the session tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) stats: Arc<HubStats>,
    pub(crate) apps: Apps,
    pub(crate) sessions: Arc<SessionRegistry>,
    /// One server config for the connector's lifetime, so rustls' session cache can let apps
    /// resume (the post-handshake re-check keeps resumption from bypassing revocation).

    /// The end-to-end TLS config of pairing sessions: admits any app key (the secret, checked
    /// inside the session, is what authorizes it) and never resumes, so a pairing session
    /// leaves nothing behind that an authorized session could reuse.

    /// The end-to-end QUIC server config: the app key checked against the
    /// allow-list, one config for the connector's lifetime (resumption, as for `tls`).
    pub(crate) e2e_server: Arc<quinn::ServerConfig>,
    /// The end-to-end QUIC server config of pairing channels: any key, never resumes.
    pub(crate) pair_server: Arc<quinn::ServerConfig>,
    /// The bound on connects in flight to the local service ([`crate::service`]).
    pub(crate) service: crate::service::ServiceGate,
    /// What each app holds (end-to-end connections, streams) against the per-app caps.
    pub(crate) load: Arc<AppLoad>,
    /// The pairing window file (see [`crate::pairing`]).
    pub(crate) window_file: std::path::PathBuf,
    /// Whether a pairing window is open, as last published to the relay.
    pub(crate) pairing_open: watch::Sender<bool>,
    /// Serializes check-and-consume of the window, so a code cannot be used twice by two
    /// concurrent sessions.
    pub(crate) pair_lock: tokio::sync::Mutex<()>,
    /// One per configured relay, in config order.
    pub(crate) tunnels: Vec<Arc<Tunnel>>,
    /// The hub's overall status ([`TunnelStatus::aggregate`] of the tunnels').
    pub(crate) status: watch::Sender<TunnelStatus>,
}

impl Shared {
    /// Sets one tunnel's status, then the hub's overall status.
    pub(crate) fn set_status(&self, tunnel: &Tunnel, new: TunnelStatus) {
        tunnel.status.send_if_modified(|current| {
            if *current == new {
                false
            } else {
                *current = new;
                true
            }
        });
        // Computed under the overall channel's lock, after the tunnel's own update: whichever
        // tunnel recomputes last sees every tunnel's latest status.
        self.status.send_if_modified(|current| {
            let statuses: Vec<TunnelStatus> =
                self.tunnels.iter().map(|t| t.status.borrow().clone()).collect();
            let new = TunnelStatus::aggregate(&statuses);
            if *current == new {
                false
            } else {
                *current = new;
                true
            }
        });
    }

    /// Whether at least one tunnel is registered (what `/healthz` reports).
    pub(crate) fn any_registered(&self) -> bool {
        self.tunnels.iter().any(|t| t.is_registered())
    }

    /// Re-reads `authorized_apps` if it changed and cuts the sessions of removed keys.
    pub(crate) fn reload_apps(&self) -> Result<Option<AppsChange>, HubError> {
        match self.apps.reload_if_changed() {
            Ok(Some(change)) => {
                let cut = self.sessions.revoke(&change.removed);
                for key in &change.removed {
                    tracing::info!(app = %key.fingerprint(), "app key revoked");
                }
                for key in &change.added {
                    tracing::info!(app = %key.fingerprint(), label = %self.apps.label(key), "app key authorized");
                }
                tracing::info!(total = change.total, sessions_cut = cut, "authorized apps reloaded");
                Ok(Some(change))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::error!(error = %e, "keeping the previous authorized apps list");
                Err(e)
            }
        }
    }
}

/// Counters of one running connector (monotonic except `sessions_active`).
#[derive(Debug, Default)]
pub struct HubStats {
    pub(crate) announced: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) registrations: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) paired: AtomicU64,
    pub(crate) pairing_failures: AtomicU64,
    pub(crate) resumed: AtomicU64,
}

impl HubStats {
    /// Channels the relay announced (one per end-to-end connection).
    pub fn sessions_announced(&self) -> u64 {
        self.announced.load(Ordering::Relaxed)
    }
    /// Streams answered with `StreamAccepted` (each forwarded connection; a pairing stream
    /// too), so an app whose `connect` succeeded is always counted.
    pub fn sessions_accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Sessions answered with `Refused` (not authorized, pairing closed, service unavailable).
    pub fn sessions_refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Sessions accepted and not yet ended.
    pub fn sessions_active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }
    /// Successful registrations with the relay (the first one included).
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }
    /// Apps paired successfully.
    pub fn paired(&self) -> u64 {
        self.paired.load(Ordering::Relaxed)
    }
    /// Pairing attempts refused for a wrong secret (or a malformed request).
    pub fn pairing_failures(&self) -> u64 {
        self.pairing_failures.load(Ordering::Relaxed)
    }
    /// End-to-end connections that resumed a TLS session (a single-use ticket of this hub):
    /// served from their first flight, their key re-checked before any stream was read.
    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }
    /// Times a registered tunnel was lost (or moved after `GoAway`) and reconnecting began.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}
