//! Start-up, the accept loop, reload and graceful shutdown ([`Relay`], [`RelayHandle`]).
//!
//! This is the driver at the top: it builds the shared state ([`crate::state`]) and the
//! endpoint ([`crate::endpoint`]), hands every `Incoming` to its own task
//! ([`crate::connection`]) so that one slow handshake never stalls the others, runs the
//! background chores (hubs-file watch, bucket sweep, metrics listener), and drains on
//! shutdown. Nothing below imports from here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::tls::{quic_server_crypto, AnyKey};
use keyway_proto::{PublicKey, ALPN_RELAY};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::channels::Channels;
use crate::config::RelayConfig;
use crate::connection::handle_incoming;
use crate::drain::Drain;
use crate::endpoint::{bind_socket, build_server_config};
use crate::error::{RelayConfigError, RelayError};
use crate::forward::ForwardingSocket;
use crate::handshakes::Handshakes;
use crate::io_thread::IoThread;
use crate::limits::Limits;
use crate::limits::{Buckets, LimitsCell};
use crate::policy::NameBook;
use crate::policy::NamePolicy;
use crate::registry::{ControlCommand, Registry};
use crate::state::Shared;
use crate::stats::RelayStats;
use keyway_proto::codes;

/// How often the hubs file is checked for changes.
const HUBS_FILE_POLL: Duration = Duration::from_secs(1);
/// How long shutdown waits for hubs to receive their `GoAway`.
const GOAWAY_GRACE: Duration = Duration::from_secs(2);
/// How long shutdown waits for connections to close cleanly (after the drain).
const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// How often idle rate-limit buckets are forgotten.
const BUCKET_SWEEP: Duration = Duration::from_secs(30);
/// Base of the reconnect delay hinted in `GoAway`; each hub gets a share of a window on top
/// ([`go_away_hint`]), so a relay restart does not bring every hub back in the same instant.
const GOAWAY_RETRY_MS: u32 = 1000;
/// Reconnects per second and core that the `GoAway` hints plan for: below what one core
/// admits (a handshake, Retry under load, a `Register`), so the restarted relay keeps up
/// instead of timing handshakes out and sending hubs into their backoff.
const GOAWAY_RECONNECTS_PER_CORE_S: u64 = 1000;

/// The `GoAway` hints for `hubs` registered hubs on a relay with `cores` cores, as
/// `(base_ms, window_ms)`: each hub is told to wait `base + its share of window`. A relay that
/// admits all its hubs within a second keeps the hints it always had (1–2 s). A bigger one
/// plans their return over `hubs / (cores × GOAWAY_RECONNECTS_PER_CORE_S)` seconds, leaving
/// room for the connector's jitter (up to half the hint on top), so the last hubs are due at
/// the end of the planned span (100 000 hubs on 2 cores: 1–50 s) instead of all within 3 s,
/// which times handshakes out and sends the hubs into their backoff.
fn go_away_hint(hubs: usize, cores: usize) -> (u32, u32) {
    let rate = GOAWAY_RECONNECTS_PER_CORE_S * cores.max(1) as u64;
    let span = (hubs as u64).saturating_mul(1000) / rate;
    let base = u64::from(GOAWAY_RETRY_MS);
    // Delays end up in [base, 1.5 (base + window)]; that should end at `span`.
    let window = (2 * span).saturating_sub(3 * base) / 3;
    (GOAWAY_RETRY_MS, u32::try_from(window.max(1000)).unwrap_or(u32::MAX))
}

/// Starts relays. See [`Relay::start`].
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Binds the UDP socket, loads the name policy and starts serving in the background.
    /// Must be called inside a tokio runtime.
    pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
        if config.idle_timeout.is_zero() || config.session_open_timeout.is_zero() {
            return Err(RelayConfigError::ZeroTimeout.into());
        }
        config.limits.validate().map_err(RelayConfigError::from)?;
        let names = Arc::new(NameBook::load(&config.policy)?);
        let crypto: Arc<dyn quinn::crypto::ServerConfig> =
            quic_server_crypto(&config.identity, Arc::new(AnyKey), ALPN_RELAY)?;
        let server_config = build_server_config(Arc::clone(&crypto), config.idle_timeout, &config.limits)?;
        let stats = Arc::new(RelayStats::default());
        stats.set_limits(&config.limits);
        let limits = Arc::new(LimitsCell::new(config.limits));
        // The socket forwards channel data itself and hands quinn the rest.
        let channels = Arc::new(Channels::new(Arc::clone(&stats), Arc::clone(&limits), config.tap.clone()));
        let sweeper = Arc::downgrade(&channels);
        tokio::spawn(async move {
            // Ends with the relay (the last `Channels` handle goes with its socket).
            loop {
                tokio::time::sleep(crate::channel::HOLD_TIME).await;
                let Some(channels) = sweeper.upgrade() else { return };
                channels.sweep_held(tokio::time::Instant::now());
            }
        });
        let socket = bind_socket(config.listen).await?;
        // The socket and the endpoint driver get a thread of their own (see `io_thread`).
        let io_thread = IoThread::start().map_err(RelayError::IoThread)?;
        let runtime = io_thread.runtime();
        let socket = ForwardingSocket::wrap(socket, Arc::clone(&channels), &*runtime)
            .map_err(|source| RelayError::Bind { addr: config.listen, source })?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            keyway_proto::tls::node_endpoint_config(
                &config.identity,
                config.node_id.as_ref().map(crate::cluster::NodeId::as_str),
            ),
            Some(server_config),
            socket,
            runtime,
        )?;
        let local_addr = endpoint.local_addr()?;
        let public_key = config.identity.public_key();
        let registry = Arc::new(Registry::new(Arc::clone(&stats)));
        let cluster = match &config.cluster {
            None => None,
            Some(cluster) => {
                let node = config.node_id.clone().ok_or(crate::cluster::ClusterError::NoNodeId)?;
                let addr = cluster.advertise.unwrap_or(local_addr);
                let local =
                    crate::cluster::Local { registry: Arc::clone(&registry), names: Arc::clone(&names) };
                Some(crate::cluster::Cluster::start(cluster, node, addr, local, stats.registry()).await?)
            }
        };
        let (shutdown, _) = watch::channel(false);
        let (sessions, drain) = crate::drain::tracker();
        let shared = Arc::new(Shared {
            registry,
            unauthorized: crate::standing::Unauthorized::new(Arc::clone(&stats)),
            stats,
            names,
            session_open_timeout: config.session_open_timeout,
            shutdown,
            limits,
            buckets: Buckets::new(tokio::time::Instant::now()),
            handshakes: Handshakes::default(),
            sessions,
            channels,
            cluster,
        });
        let policy = match &config.policy {
            NamePolicy::Closed { hubs_file } => format!("closed ({})", hubs_file.display()),
            NamePolicy::Open { state_file: Some(f) } => format!("open ({})", f.display()),
            NamePolicy::Open { state_file: None } => "open (bindings in memory only)".into(),
        };
        info!(
            addr = %local_addr,
            key = %public_key,
            fingerprint = %public_key.fingerprint(),
            policy = %policy,
            names = shared.names.len(),
            "relay listening"
        );
        let mut background = Vec::new();
        let metrics_addr = match config.metrics_listen {
            None => None,
            Some(addr) => {
                let state = crate::metrics::MetricsState {
                    stats: Arc::clone(&shared.stats),
                    draining: shared.shutdown.subscribe(),
                    cluster: shared.cluster.clone(),
                };
                // Not fatal: forwarding matters more than observing it, and a second relay on
                // the same host (tests, a blue/green upgrade) must not fail on the default port.
                // A probe on /healthz notices the missing listener.
                match crate::metrics::serve(addr, state).await {
                    Ok((bound, task)) => {
                        info!(addr = %bound, "metrics and health on http://{bound}/metrics and /healthz");
                        background.push(task);
                        Some(bound)
                    }
                    Err(e) => {
                        error!(%addr, "cannot start the metrics listener: {e}; running without /metrics");
                        None
                    }
                }
            }
        };
        background.push(tokio::spawn(sweep_buckets(Arc::clone(&shared))));
        if let Some(cluster) = &shared.cluster {
            background.push(tokio::spawn(Arc::clone(cluster).run()));
        }
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), Arc::clone(&shared)));
        let watch_task = matches!(config.policy, NamePolicy::Closed { .. })
            .then(|| tokio::spawn(watch_hubs_file(Arc::clone(&shared))));
        Ok(RelayHandle {
            endpoint,
            local_addr,
            public_key,
            metrics_addr,
            crypto,
            idle_timeout: config.idle_timeout,
            drain_timeout: config.drain_timeout,
            shared,
            drain: Some(drain),
            accept_task: Some(accept_task),
            watch_task,
            background,
            _io_thread: io_thread,
        })
    }
}

/// A running relay. Dropping it closes the endpoint abruptly; [`RelayHandle::shutdown`] is
/// the graceful way.
pub struct RelayHandle {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    public_key: PublicKey,
    metrics_addr: Option<SocketAddr>,
    /// Kept to rebuild the server config when limits change.
    crypto: Arc<dyn quinn::crypto::ServerConfig>,
    idle_timeout: Duration,
    drain_timeout: Duration,
    shared: Arc<Shared>,
    /// Waits for the live sessions; taken by the shutdown.
    drain: Option<Drain>,
    accept_task: Option<JoinHandle<()>>,
    watch_task: Option<JoinHandle<()>>,
    /// The metrics listener and the bucket sweeper: aborted when the relay stops.
    background: Vec<JoinHandle<()>>,
    /// Last, so that it stops after everything above let go of the endpoint.
    _io_thread: IoThread,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("local_addr", &self.local_addr)
            .field("public_key", &self.public_key)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl RelayHandle {
    /// The UDP address the relay listens on (with the real port if `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The relay's public key, which hubs and apps pin.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Live counters and gauges.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.shared.stats)
    }

    /// The TCP address serving `/metrics` and `/healthz`, if the listener is up.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        Limits::clone(&self.shared.limits.get())
    }

    /// Replaces the limits at run time, without touching live sessions: rates apply to the
    /// next token taken, counts to the next registration or session, timeouts to the next
    /// check, and `max_streams_per_connection` to connections made from now on. Invalid
    /// limits are refused and the old ones stay.
    pub fn set_limits(&self, limits: Limits) -> Result<(), RelayError> {
        limits.validate().map_err(RelayConfigError::from)?;
        let server_config = build_server_config(Arc::clone(&self.crypto), self.idle_timeout, &limits)?;
        if !self.shared.is_shutting_down() {
            self.endpoint.set_server_config(Some(server_config));
        }
        info!(?limits, "limits changed");
        self.shared.stats.set_limits(&limits);
        self.shared.limits.set(limits);
        Ok(())
    }

    /// Re-reads `authorized_hubs` now and disconnects registered hubs it no longer allows. On
    /// a read or parse error the previous list stays in force and the error is returned. A
    /// no-op under the open policy.
    pub fn reload(&self) -> Result<(), RelayError> {
        self.shared.names.reload()?;
        info!(names = self.shared.names.len(), "name policy reloaded");
        self.shared.sweep();
        Ok(())
    }

    /// Graceful shutdown: reports unhealthy (`/healthz` 503), stops accepting connections,
    /// registrations and channels, sends `GoAway` to every registered hub (and waits, bounded,
    /// for it to arrive), lets live channels finish for up to the drain timeout, then closes
    /// every connection with `SHUTTING_DOWN` and waits, bounded, for the endpoint to go idle.
    pub async fn shutdown(mut self) {
        let channels = self.shared.stats.channels_active();
        info!(channels, drain_timeout = ?self.drain_timeout, "relay draining");
        self.shared.stats.set_draining(true);
        self.shared.shutdown.send_replace(true);
        // New connection attempts now fail at once instead of waiting for a handshake.
        self.endpoint.set_server_config(None);
        if let Some(task) = self.watch_task.take() {
            task.abort();
        }
        let mut delivered = Vec::new();
        let hubs = self.shared.registry.all();
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        let (base, window) = go_away_hint(hubs.len(), cores);
        for hub in hubs {
            let (done, rx) = oneshot::channel();
            let retry_after_ms = base.saturating_add(spread(hub.conn_id, window));
            let message = "the relay is restarting or shutting down; reconnect after the delay".to_owned();
            if hub.control.send(ControlCommand::GoAway { retry_after_ms, message, done }).is_ok() {
                delivered.push(rx);
            }
        }
        let _ = tokio::time::timeout(GOAWAY_GRACE, async {
            for rx in delivered {
                let _ = rx.await;
            }
        })
        .await;
        let stats = Arc::clone(&self.shared.stats);
        let drained = match self.drain.take() {
            Some(drain) => tokio::time::timeout(self.drain_timeout, drain.all_ended()).await,
            None => Ok(()),
        };
        match drained {
            Ok(()) => info!("all channels ended"),
            Err(_) => warn!(
                channels = stats.channels_active(),
                "drain timeout of {:?} reached; closing the remaining channels", self.drain_timeout
            ),
        }
        self.endpoint.close(codes::SHUTTING_DOWN, b"relay shutting down");
        if tokio::time::timeout(DRAIN_GRACE, self.endpoint.wait_idle()).await.is_err() {
            warn!("some connections did not close within {DRAIN_GRACE:?}");
        }
        if let Some(task) = self.accept_task.take() {
            // It exits on the shutdown signal; wait so its endpoint handle (and with it the
            // socket) is released before we return and a successor binds the same port.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        info!("relay stopped");
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = self.watch_task.take() {
            task.abort();
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        self.endpoint.close(codes::SHUTTING_DOWN, b"relay shutting down");
    }
}

/// A number in `0..range` that differs per hub (not cryptographic: it only spreads reconnects).
fn spread(seed: u64, range: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seed);
    (h.finish() % u64::from(range.max(1))) as u32
}

/// Waits until `rx` says the relay is shutting down (or its sender is gone).
async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    loop {
        let down = *rx.borrow_and_update();
        if down || rx.changed().await.is_err() {
            return;
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let incoming = tokio::select! {
            () = shutting_down(&mut shutdown) => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        tokio::spawn(handle_incoming(incoming, Arc::clone(&shared)));
    }
    debug!("accept loop ended");
}

/// Forgets idle rate-limit buckets now and then.
async fn sweep_buckets(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(BUCKET_SWEEP);
    loop {
        tick.tick().await;
        shared.buckets.sweep(&shared.limits.get(), tokio::time::Instant::now());
    }
}

/// Polls the hubs file for changes (mtime/size) and applies them like `reload()`.
async fn watch_hubs_file(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(HUBS_FILE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match shared.names.reload_if_changed() {
            Ok(true) => {
                info!(names = shared.names.len(), "hubs file changed; reloaded");
                shared.sweep();
            }
            Ok(false) => {}
            Err(e) => error!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_away_hints_plan_the_return_over_what_the_cores_admit() {
        // Small relays keep the 1–2 s hints they always had.
        assert_eq!(go_away_hint(0, 2), (1000, 1000));
        assert_eq!(go_away_hint(3000, 2), (1000, 1000));
        // Bigger ones stretch the window so that hint + the connector's jitter (up to half the
        // hint) ends where the planned span does: 100 000 hubs at 2 000 per second, 50 s.
        let (base, window) = go_away_hint(100_000, 2);
        assert_eq!(base, 1000);
        assert_eq!(window, 32_333);
        assert!((base + window) * 3 / 2 <= 50_000);
        assert_eq!(go_away_hint(10_000, 2).1, 2333);
        assert!(go_away_hint(100_000, 8).1 < window, "more cores, shorter window");
        assert_eq!(go_away_hint(100_000, 0), go_away_hint(100_000, 1), "no core count reads as one core");
    }
}
