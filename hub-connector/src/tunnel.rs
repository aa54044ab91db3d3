//! The tunnels: for each configured relay, connect, register, serve, and when anything breaks
//! reconnect, forever, with capped exponential backoff and jitter.
//!
//! Each relay gets a task of its own, with its own QUIC endpoint, dialer, backoff and status;
//! they share everything else (the apps list, the sessions, the TLS configs, the counters), so
//! a session is handled alike whichever relay it came through. A relay that goes away (or asks
//! the hub to move with `GoAway`) only sends its own tunnel back to connecting: the hub stays
//! [`TunnelStatus::Registered`] overall while at least one tunnel is.
//!
//! While registered, one loop multiplexes:
//! * incoming session streams (each handled in its own task, see [`crate::session`]);
//! * frames from the relay on the control stream (`Pong`, `Ping`, `GoAway`), read by a helper
//!   task because reading a frame is not cancel-safe;
//! * an application-level `Ping` every `ping_interval`: an unanswered ping by the next tick
//!   means the tunnel is dead even if QUIC still thinks it is alive (liveness tests the path
//!   through the relay, not a socket);
//! * changes of `authorized_apps` and of the pairing window, published to the relay as an
//!   `AllowList` frame (with `pairing_open` set while a window is open).
//!
//! A refusal (`NameNotAuthorized`, `NameClaimed`, …) is shown in [`TunnelStatus::Refused`]
//! but still retried with backoff: the relay owner may be about to add the hub to
//! `authorized_hubs`, and the hub owner should not have to restart anything then.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_client::relay_link::{self, codes, RelayDialer};
use keyway_proto::codec::MAX_ALLOWED_APPS;
use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::{Frame, PublicKey, RefusalReason};
use quinn::{Connection, ConnectionError, Endpoint};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::apps::{Apps, AppsChange};
use crate::backoff::{go_away_delay, Backoff};
use crate::config::RelayTarget;
use crate::session::SessionRegistry;
use crate::{HubConfig, HubError, HubStats};

/// Where the tunnel stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelStatus {
    /// Dialing or registering (also after losing the tunnel, while backing off).
    Connecting,
    /// Registered: sessions can reach the hub.
    Registered,
    /// The relay refused the registration; the connector keeps retrying with backoff.
    Refused { reason: RefusalReason, message: String },
    /// The connector was shut down.
    Stopped,
}

impl fmt::Display for TunnelStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelStatus::Connecting => f.write_str("connecting"),
            TunnelStatus::Registered => f.write_str("registered"),
            TunnelStatus::Refused { reason, message } => write!(f, "refused ({reason}): {message}"),
            TunnelStatus::Stopped => f.write_str("stopped"),
        }
    }
}

impl TunnelStatus {
    /// The status of the hub as a whole, from those of its tunnels (in config order): registered
    /// if any tunnel is; else refused if any relay refused (the first such refusal); stopped once
    /// every tunnel has stopped; connecting otherwise.
    pub(crate) fn aggregate<'a>(statuses: impl IntoIterator<Item = &'a TunnelStatus>) -> TunnelStatus {
        let mut refused = None;
        let mut all_stopped = true;
        for status in statuses {
            match status {
                TunnelStatus::Registered => return TunnelStatus::Registered,
                TunnelStatus::Refused { .. } if refused.is_none() => refused = Some(status.clone()),
                _ => {}
            }
            all_stopped &= *status == TunnelStatus::Stopped;
        }
        match refused {
            Some(refused) => refused,
            None if all_stopped => TunnelStatus::Stopped,
            None => TunnelStatus::Connecting,
        }
    }
}

/// The tunnel to one configured relay: its status and counters.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub(crate) target: RelayTarget,
    pub(crate) status: watch::Sender<TunnelStatus>,
    /// Successful registrations with this relay.
    pub(crate) registrations: AtomicU64,
    /// Times this registered tunnel was lost (or moved after `GoAway`).
    pub(crate) reconnects: AtomicU64,
}

impl Tunnel {
    fn new(target: RelayTarget) -> Self {
        Self {
            target,
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
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// The end-to-end TLS config of pairing sessions: admits any app key (the secret, checked
    /// inside the session, is what authorizes it) and never resumes, so a pairing session
    /// leaves nothing behind that an authorized session could reuse.
    pub(crate) pair_tls: Arc<rustls::ServerConfig>,
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
    status: watch::Sender<TunnelStatus>,
}

impl Shared {
    /// Re-reads the pairing window file and updates `pairing_open` (waking the tunnel to
    /// publish it). An expired or exhausted window's file is removed.
    pub(crate) fn refresh_pairing(&self) -> bool {
        let open = match crate::pairing::read_window(&self.window_file) {
            Ok(Some(window)) if window.is_open() => true,
            Ok(Some(_)) => {
                tracing::info!("pairing window closed (expired or too many wrong secrets)");
                if let Err(e) = crate::pairing::close_window(&self.window_file) {
                    tracing::warn!(error = %e, "cannot remove the closed pairing window");
                }
                false
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the pairing window file");
                false
            }
        };
        self.pairing_open.send_if_modified(|current| {
            let changed = *current != open;
            if changed {
                tracing::info!(open, "pairing window {}", if open { "opened" } else { "closed" });
            }
            *current = open;
            changed
        });
        open
    }

    /// Sets one tunnel's status, then the hub's overall status.
    fn set_status(&self, tunnel: &Tunnel, new: TunnelStatus) {
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

/// A running connector.
#[derive(Debug)]
pub struct HubHandle {
    shared: Arc<Shared>,
    endpoints: Vec<Endpoint>,
    stop: watch::Sender<bool>,
    tunnels: Vec<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
    metrics: Option<(SocketAddr, JoinHandle<()>)>,
}

impl HubHandle {
    /// The hub's overall status, live: [`TunnelStatus::Registered`] while at least one tunnel
    /// is (see [`HubHandle::relay_statuses`] for each relay's own).
    pub fn status(&self) -> watch::Receiver<TunnelStatus> {
        self.shared.status.subscribe()
    }

    /// The status of the tunnel to each configured relay, in config order.
    pub fn relay_statuses(&self) -> Vec<(SocketAddr, TunnelStatus)> {
        self.shared.tunnels.iter().map(|t| (t.target.addr, t.status.borrow().clone())).collect()
    }

    /// The status of the tunnel to `relay` (a configured relay address), live.
    pub fn relay_status(&self, relay: SocketAddr) -> Option<watch::Receiver<TunnelStatus>> {
        self.shared.tunnels.iter().find(|t| t.target.addr == relay).map(|t| t.status.subscribe())
    }

    /// The TCP address serving `/metrics` and `/healthz`, if
    /// [`HubConfig::metrics_listen`] was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(addr, _)| *addr)
    }

    /// The Prometheus text exposition `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        crate::metrics::encode(&self.shared)
    }

    /// Waits until at least one tunnel is registered. A refusal does not end the wait (the connector
    /// keeps retrying); the timeout error carries the last status seen.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<(), HubError> {
        let mut rx = self.status();
        let reached = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, TunnelStatus::Registered | TunnelStatus::Stopped)),
        )
        .await
        .map(|r| r.map(|status| status.clone()));
        match reached {
            Ok(Ok(TunnelStatus::Registered)) => Ok(()),
            Ok(_) => Err(HubError::Stopped),
            Err(_) => {
                Err(HubError::NotRegistered { waited: timeout, last: self.shared.status.borrow().clone() })
            }
        }
    }

    /// Session and tunnel counters.
    pub fn stats(&self) -> Arc<HubStats> {
        self.shared.stats.clone()
    }

    /// The hub's public key (what apps pin and the relay's `authorized_hubs` lists).
    pub fn public_key(&self) -> PublicKey {
        self.shared.config.identity.public_key()
    }

    /// Re-reads `authorized_apps` now instead of at the next poll; cuts sessions of removed
    /// keys and publishes the new list. `Ok(None)` if the file did not change.
    pub fn reload_apps(&self) -> Result<Option<AppsChange>, HubError> {
        self.shared.reload_apps()
    }

    /// Re-reads the pairing window file now instead of at the next poll; returns whether a
    /// window is open.
    pub fn refresh_pairing(&self) -> bool {
        self.shared.refresh_pairing()
    }

    /// The label of `app_key` in `authorized_apps` (empty if none or not authorized).
    pub fn app_label(&self, app_key: &PublicKey) -> String {
        self.shared.apps.label(app_key)
    }

    /// Number of live sessions of `app_key`.
    pub fn live_sessions(&self, app_key: &PublicKey) -> usize {
        self.shared.sessions.count(app_key)
    }

    /// Stops the connector: closes the tunnels (the relays forget the hub at once), cuts the
    /// live sessions and waits briefly for the closes to reach the relays.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for tunnel in self.tunnels.drain(..) {
            let _ = tunnel.await;
        }
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if let Some((_, metrics)) = self.metrics.take() {
            metrics.abort();
        }
        self.shared.sessions.cut_all();
        for endpoint in &self.endpoints {
            endpoint.close(codes::NORMAL, b"hub stopping");
        }
        // The endpoints close in the background concurrently: waiting for each in turn takes
        // as long as the slowest.
        let idle = async {
            for endpoint in &self.endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), idle).await;
        for tunnel in &self.shared.tunnels {
            self.shared.set_status(tunnel, TunnelStatus::Stopped);
        }
    }
}

impl Drop for HubHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
        if let Some((_, metrics)) = self.metrics.take() {
            metrics.abort();
        }
    }
}

/// Starts the connector. Returns as soon as the tunnel task is spawned: relay failures are
/// retried forever, never returned. Fails only on local problems (config, apps file, socket).
pub async fn start(config: HubConfig) -> Result<HubHandle, HubError> {
    config.validate()?;
    let apps = Apps::load(&config.apps_file)?;
    if apps.allow_list().is_empty() {
        tracing::warn!(
            file = %config.apps_file.display(),
            "no authorized apps yet: add \"KEY [LABEL]\" lines to the file (it is re-read automatically)"
        );
    }
    let tls = keyway_proto::tls::server_config(
        &config.identity,
        Arc::new(apps.allow_list()),
        keyway_proto::ALPN_E2E,
    )?;
    let mut pair_tls = keyway_proto::tls::server_config(
        &config.identity,
        Arc::new(keyway_proto::tls::AnyKey),
        keyway_proto::ALPN_E2E,
    )?;
    pair_tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    pair_tls.send_tls13_tickets = 0;
    let window_file = crate::pairing::window_path(&config.apps_file);
    let mut links = Vec::new();
    for target in config.relays() {
        let dialer = RelayDialer::new(
            &config.identity,
            target.addr,
            target.key,
            config.keep_alive,
            config.idle_timeout,
            config.connect_timeout,
        )?;
        // An endpoint (UDP socket) per relay: each tunnel's NAT binding and path are its own.
        let endpoint = relay_link::bind_endpoint(target.addr)?;
        links.push((Arc::new(Tunnel::new(target)), dialer, endpoint));
    }
    let metrics_listener =
        match config.metrics_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| {
                HubError::Config(format!("cannot listen for metrics on {addr}: {source}"))
            })?),
            None => None,
        };
    let (status, _) = watch::channel(TunnelStatus::Connecting);
    let shared = Arc::new(Shared {
        config,
        stats: Arc::default(),
        apps,
        sessions: Arc::default(),
        tls: Arc::new(tls),
        pair_tls: Arc::new(pair_tls),
        window_file,
        pairing_open: watch::channel(false).0,
        pair_lock: tokio::sync::Mutex::new(()),
        tunnels: links.iter().map(|(tunnel, _, _)| tunnel.clone()).collect(),
        status,
    });
    shared.refresh_pairing();
    let relays: Vec<String> = shared.tunnels.iter().map(|t| t.target.addr.to_string()).collect();
    tracing::info!(
        name = %shared.config.name,
        hub_key = %shared.config.identity.public_key(),
        relays = %relays.join(", "),
        forward = %shared.config.forward,
        "hub connector starting"
    );
    let metrics = match metrics_listener {
        Some(listener) => {
            let (addr, task) = crate::metrics::serve(listener, shared.clone())
                .map_err(|e| HubError::Config(format!("cannot listen for metrics: {e}")))?;
            tracing::info!(%addr, "metrics and health on http://{addr}/metrics and /healthz");
            Some((addr, task))
        }
        None => None,
    };
    let (stop, stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(watch_apps(shared.clone(), stop_rx.clone()));
    let mut endpoints = Vec::new();
    let mut tunnels = Vec::new();
    for (tunnel, dialer, endpoint) in links {
        let span = tracing::info_span!("tunnel", relay = %tunnel.target.addr);
        let task = run_tunnel(shared.clone(), tunnel, dialer, endpoint.clone(), stop_rx.clone());
        tunnels.push(tokio::spawn(task.instrument(span)));
        endpoints.push(endpoint);
    }
    Ok(HubHandle { shared, endpoints, stop, tunnels, watcher: Some(watcher), metrics })
}

/// Completes once a stop is requested (or the handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How often `authorized_apps` and the pairing window file are polled. Two `stat`s (and one
/// small read while a window is open) per tick cost nothing, and this bounds how long a
/// revocation by file edit (`keyway-hub apps revoke`) takes to cut live sessions.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

async fn watch_apps(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = shared.reload_apps();
                shared.refresh_pairing();
            }
            _ = stopped(&mut stop) => break,
        }
    }
}

/// How one tunnel attempt ended.
#[derive(Debug)]
enum Outcome {
    Shutdown,
    Refused { reason: RefusalReason, message: String },
    GoAway { hint: Duration, message: String },
    Lost { registered: bool, replaced: bool, error: String },
}

impl Outcome {
    fn lost(registered: bool, error: impl fmt::Display) -> Self {
        Outcome::Lost { registered, replaced: false, error: error.to_string() }
    }
}

async fn run_tunnel(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    dialer: RelayDialer,
    endpoint: Endpoint,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(shared.config.backoff_min, shared.config.backoff_max);
    loop {
        let outcome = attempt(&shared, &tunnel, &dialer, &endpoint, &mut stop).await;
        let delay = match outcome {
            Outcome::Shutdown => break,
            Outcome::Refused { reason, message } => {
                tracing::error!(%reason, %message, name = %shared.config.name, "relay refused the registration; retrying");
                shared.set_status(&tunnel, TunnelStatus::Refused { reason, message });
                backoff.next_delay(&mut rand::rng())
            }
            Outcome::GoAway { hint, message } => {
                shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                tunnel.reconnects.fetch_add(1, Ordering::Relaxed);
                shared.set_status(&tunnel, TunnelStatus::Connecting);
                backoff.reset();
                let delay = go_away_delay(hint, shared.config.backoff_min, &mut rand::rng());
                tracing::info!(%message, delay = ?delay, "relay asked the hub to move; reconnecting");
                delay
            }
            Outcome::Lost { registered, replaced, error } => {
                if registered {
                    shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tunnel.reconnects.fetch_add(1, Ordering::Relaxed);
                    // A fresh failure after a good run starts from the smallest delay, except
                    // when another connector with this key took the name: two connectors
                    // fighting over it should slow down, not spin.
                    if !replaced {
                        backoff.reset();
                    }
                }
                if replaced {
                    tracing::warn!(
                        "another connection registered this hub (same name and key); is a second \
                         connector running with this key?"
                    );
                }
                shared.set_status(&tunnel, TunnelStatus::Connecting);
                let delay = backoff.next_delay(&mut rand::rng());
                tracing::warn!(%error, registered, retry_in = ?delay, "tunnel to relay lost");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => break,
        }
    }
    shared.set_status(&tunnel, TunnelStatus::Stopped);
}

/// The allow-list as published to the relay (capped at the protocol limit: fail closed, the
/// keys left out are refused by the relay but the rest keep working).
fn published_apps(apps: &Apps) -> Vec<PublicKey> {
    let mut keys = apps.allow_list().snapshot();
    if keys.len() > MAX_ALLOWED_APPS {
        tracing::warn!(
            total = keys.len(),
            limit = MAX_ALLOWED_APPS,
            "too many authorized apps to publish; the relay will refuse those beyond the limit"
        );
        keys.truncate(MAX_ALLOWED_APPS);
    }
    keys
}

fn connection_lost(conn: &Connection, registered: bool, what: &str) -> Outcome {
    match conn.close_reason() {
        Some(reason) => from_connection_error(registered, reason),
        None => Outcome::lost(registered, what),
    }
}

fn from_connection_error(registered: bool, e: ConnectionError) -> Outcome {
    let replaced = matches!(&e, ConnectionError::ApplicationClosed(c) if c.error_code == codes::REPLACED);
    Outcome::Lost { registered, replaced, error: format!("relay connection: {e}") }
}

fn frame_error(conn: &Connection, registered: bool, what: &str, e: FrameIoError) -> Outcome {
    match conn.close_reason() {
        Some(reason) => from_connection_error(registered, reason),
        None => Outcome::lost(registered, format!("{what}: {e}")),
    }
}

/// Aborts a task when dropped (the control-stream reader must not outlive its tunnel).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn attempt(
    shared: &Arc<Shared>,
    tunnel: &Tunnel,
    dialer: &RelayDialer,
    endpoint: &Endpoint,
    stop: &mut watch::Receiver<bool>,
) -> Outcome {
    if *stop.borrow() {
        return Outcome::Shutdown;
    }
    let conn = tokio::select! {
        dialed = dialer.dial(endpoint) => match dialed {
            Ok(conn) => conn,
            Err(e) => return Outcome::lost(false, e),
        },
        _ = stopped(stop) => return Outcome::Shutdown,
    };
    let outcome = tokio::select! {
        outcome = serve(shared, tunnel, &conn) => outcome,
        _ = stopped(stop) => Outcome::Shutdown,
    };
    match &outcome {
        // After GoAway the relay drains: leave the connection to the sessions still on it
        // (quinn closes it once the last stream and handle are dropped).
        Outcome::GoAway { .. } => {}
        Outcome::Shutdown => relay_link::close(&conn, codes::NORMAL, "hub shutting down"),
        Outcome::Refused { .. } => relay_link::close(&conn, codes::NORMAL, "registration refused"),
        Outcome::Lost { .. } => relay_link::close(&conn, codes::NORMAL, "tunnel considered dead"),
    }
    outcome
}

/// Registers on `conn` and serves it until something ends the tunnel.
async fn serve(shared: &Arc<Shared>, tunnel: &Tunnel, conn: &Connection) -> Outcome {
    let config = &shared.config;
    // Subscribe before taking the snapshot, so a change in between is published afterwards.
    let mut apps_changed = shared.apps.subscribe();
    apps_changed.mark_unchanged();
    let mut pairing_changed = shared.pairing_open.subscribe();
    pairing_changed.mark_unchanged();
    let (mut ctl_send, mut ctl_recv) = match conn.open_bi().await {
        Ok(streams) => streams,
        Err(e) => return from_connection_error(false, e),
    };
    let register = Frame::Register {
        name: config.name.clone(),
        allowed_apps: published_apps(&shared.apps),
        pairing_open: *shared.pairing_open.borrow(),
    };
    if let Err(e) = write_frame(&mut ctl_send, &register).await {
        return frame_error(conn, false, "sending Register", e);
    }
    let reply = match tokio::time::timeout(config.connect_timeout, read_frame(&mut ctl_recv)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return frame_error(conn, false, "waiting for Registered", e),
        Err(_) => return Outcome::lost(false, "the relay did not answer Register in time"),
    };
    match reply {
        Frame::Registered { replaced } => {
            shared.stats.registrations.fetch_add(1, Ordering::Relaxed);
            tunnel.registrations.fetch_add(1, Ordering::Relaxed);
            shared.set_status(tunnel, TunnelStatus::Registered);
            tracing::info!(name = %config.name, replaced, relay = %tunnel.target.addr, "registered with the relay");
        }
        Frame::Refused { reason, message } => return Outcome::Refused { reason, message },
        other => {
            return Outcome::lost(false, format!("expected Registered or Refused, got {}", other.name()))
        }
    }

    let (frames_tx, mut frames) = mpsc::channel::<Result<Frame, FrameIoError>>(16);
    let _reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let frame = read_frame(&mut ctl_recv).await;
            let end = frame.is_err();
            if frames_tx.send(frame).await.is_err() || end {
                break;
            }
        }
    }));

    let interval = config.ping_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce: u64 = rand::random();
    let mut outstanding: Option<u64> = None;

    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    tokio::spawn(crate::session::handle(shared.clone(), send, recv).in_current_span());
                }
                Err(e) => return from_connection_error(true, e),
            },
            frame = frames.recv() => match frame {
                Some(Ok(Frame::Pong { nonce: n })) => {
                    if outstanding == Some(n) {
                        outstanding = None;
                    }
                }
                Some(Ok(Frame::Ping { nonce: n })) => {
                    if let Err(e) = write_frame(&mut ctl_send, &Frame::Pong { nonce: n }).await {
                        return frame_error(conn, true, "answering Ping", e);
                    }
                }
                Some(Ok(Frame::GoAway { retry_after_ms, message })) => {
                    return Outcome::GoAway { hint: Duration::from_millis(retry_after_ms.into()), message };
                }
                Some(Ok(Frame::Refused { reason, message })) => {
                    // A relay may revoke a registration (e.g. authorized_hubs changed).
                    shared.set_status(tunnel, TunnelStatus::Refused { reason, message: message.clone() });
                    return Outcome::Refused { reason, message };
                }
                Some(Ok(other)) => {
                    relay_link::close(conn, codes::PROTOCOL, "unexpected frame on the control stream");
                    return Outcome::lost(true, format!("unexpected {} on the control stream", other.name()));
                }
                Some(Err(e)) => return frame_error(conn, true, "control stream", e),
                None => return connection_lost(conn, true, "control stream reader ended"),
            },
            _ = ticker.tick() => {
                if outstanding.is_some() {
                    return Outcome::lost(
                        true,
                        format!("no Pong within {}", humantime::format_duration(interval)),
                    );
                }
                nonce = nonce.wrapping_add(1);
                if let Err(e) = write_frame(&mut ctl_send, &Frame::Ping { nonce }).await {
                    return frame_error(conn, true, "sending Ping", e);
                }
                outstanding = Some(nonce);
            }
            changed = async {
                tokio::select! {
                    c = apps_changed.changed() => c,
                    c = pairing_changed.changed() => c,
                }
            } => {
                if changed.is_err() {
                    return Outcome::lost(true, "apps watcher gone");
                }
                apps_changed.mark_unchanged();
                pairing_changed.mark_unchanged();
                let pairing_open = *shared.pairing_open.borrow();
                let frame = Frame::AllowList { allowed_apps: published_apps(&shared.apps), pairing_open };
                if let Err(e) = write_frame(&mut ctl_send, &frame).await {
                    return frame_error(conn, true, "publishing AllowList", e);
                }
                tracing::debug!("published the allow-list to the relay");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_is_registered_while_any_tunnel_is() {
        use TunnelStatus::*;
        let refused = Refused { reason: RefusalReason::NameClaimed, message: "taken".into() };
        assert_eq!(TunnelStatus::aggregate(&[Connecting, Registered]), Registered);
        assert_eq!(TunnelStatus::aggregate(&[refused.clone(), Registered]), Registered);
        assert_eq!(TunnelStatus::aggregate(&[Stopped, Registered]), Registered);
        assert_eq!(TunnelStatus::aggregate(&[Connecting, refused.clone()]), refused);
        assert_eq!(TunnelStatus::aggregate(&[Connecting, Stopped]), Connecting);
        assert_eq!(TunnelStatus::aggregate(&[Stopped, Stopped]), Stopped);
        assert_eq!(TunnelStatus::aggregate(&[Connecting]), Connecting);
        assert_eq!(TunnelStatus::aggregate(std::slice::from_ref(&refused)), refused);
    }
}
