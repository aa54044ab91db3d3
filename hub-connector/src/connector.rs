//! The connector as a whole: [`start`] builds the shared state, binds a UDP endpoint per relay
//! and spawns the tasks (a [`tunnel`](crate::tunnel) per relay, the apps watcher, the
//! optional ops listener); the [`HubHandle`] it returns reads the status and counters and
//! shuts everything down.
//!
//! The apps watcher lives here too: every [`POLL_INTERVAL`] it re-reads `authorized_apps`
//! (cutting the sessions of removed keys) and the pairing window file; the tunnels see the
//! changes through [`Shared`]'s watch channels and publish them to their relays.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_path::relay_link::RelayDialer;
use keyway_proto::codes;
use keyway_proto::PublicKey;
use quinn::Endpoint;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::apps::{Apps, AppsChange};
use crate::config::HubConfig;
use crate::error::HubError;
use crate::shutdown::{Shutdown, StopSender};
use crate::state::{HubStats, Shared, Tunnel};
use crate::status::TunnelStatus;

/// A running connector.
#[derive(Debug)]
pub struct HubHandle {
    shared: Arc<Shared>,
    endpoints: Vec<Endpoint>,
    stop: StopSender,
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

    /// A reader of this connector's whole status (`keyway-hub status`), usable after this
    /// handle moves.
    pub fn status_source(&self) -> crate::report::StatusSource {
        crate::report::StatusSource(self.shared.clone())
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
        crate::pairing::refresh(&self.shared)
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
    let (e2e_server, pair_server) = e2e_server_configs(&config, &apps)?;
    let window_file = crate::pairing::window_path(&config.apps_file);
    // Relays sharing one key are the nodes of one cluster: one tunnel task for them all.
    let mut groups: Vec<Vec<crate::tunnel::Node>> = Vec::new();
    let mut links = Vec::new();
    for target in config.relays() {
        let dialer = RelayDialer::new(
            &config.identity,
            target.addr,
            target.key,
            config.keep_alive,
            config.idle_timeout,
            config.connect_timeout,
        )?
        .accept_streams(RELAY_STREAMS, config.keep_alive, config.idle_timeout)?;
        // An endpoint (UDP socket) per relay: each tunnel's NAT binding and path are its own.
        // Its path socket also carries the end-to-end connections of the channels this relay
        // introduces, which the endpoint accepts as a server.
        let (endpoint, paths) = keyway_path::bind_path_endpoint(target.addr, Some((*e2e_server).clone()))?;
        let node = (Arc::new(Tunnel::new(target, paths)), dialer, endpoint);
        links.push(node.0.clone());
        match groups.iter_mut().find(|g| g.first().is_some_and(|(t, _, _)| t.target.key == target.key)) {
            Some(group) => group.push(node),
            None => groups.push(vec![node]),
        }
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| HubError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let (status, _) = watch::channel(TunnelStatus::Connecting);
    let max_service_connects = config.max_service_connects;
    let shared = Arc::new(Shared {
        config,
        stats: Arc::default(),
        apps,
        sessions: Arc::default(),
        e2e_server,
        pair_server,
        load: Arc::default(),
        service: crate::service::ServiceGate::new(max_service_connects),
        window_file,
        pairing_open: watch::channel(false).0,
        pair_lock: tokio::sync::Mutex::new(()),
        tunnels: links,
        status,
    });
    crate::pairing::refresh(&shared);
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
            let (addr, task) =
                crate::metrics::serve(listener, shared.clone()).map_err(HubError::MetricsServe)?;
            tracing::info!(%addr, "metrics and health on http://{addr}/metrics and /healthz");
            Some((addr, task))
        }
        None => None,
    };
    let (stop, shutdown) = Shutdown::new();
    let watcher = tokio::spawn(watch_apps(shared.clone(), shutdown.clone()));
    let mut endpoints = Vec::new();
    let mut tunnels = Vec::new();
    for group in groups {
        for (tunnel, _, endpoint) in &group {
            let span = tracing::info_span!("tunnel", relay = %tunnel.target.addr);
            let accept =
                crate::e2e::serve(shared.clone(), tunnel.clone(), endpoint.clone(), shutdown.clone());
            tunnels.push(tokio::spawn(accept.instrument(span)));
            endpoints.push(endpoint.clone());
        }
        let span = match group.as_slice() {
            [(tunnel, _, _)] => tracing::info_span!("tunnel", relay = %tunnel.target.addr),
            nodes => tracing::info_span!("tunnel", cluster_nodes = nodes.len()),
        };
        let task = crate::tunnel::run(shared.clone(), group, shutdown.clone());
        tunnels.push(tokio::spawn(task.instrument(span)));
    }
    Ok(HubHandle { shared, endpoints, stop, tunnels, watcher: Some(watcher), metrics })
}

/// How many streams the hub lets a relay keep open at once on its tunnel (one per channel the
/// relay introduces): four times the relay's `max_sessions_per_hub` default (256), so the
/// relay's limit, which refuses with a typed error, is the one a hub meets. quinn keeps about
/// 85 bytes of state per stream it allows a peer, so this costs the hub ~85 KiB per relay.
const RELAY_STREAMS: u32 = 1024;

/// The end-to-end QUIC server configs: one that admits the keys in `authorized_apps` (one config
/// for the connector's lifetime, so rustls' session cache lets apps resume; the re-check after
/// every handshake keeps resumption from bypassing revocation), and one for pairing channels
/// that admits any key (the secret, checked inside, is what authorizes it) and never resumes,
/// so a pairing leaves nothing an authorized connection could reuse. Each connection gets the per-app stream credit plus a margin, so
/// streams over the cap reach the hub and are refused with a typed error instead of waiting.
fn e2e_server_configs(
    config: &HubConfig,
    apps: &Apps,
) -> Result<(Arc<quinn::ServerConfig>, Arc<quinn::ServerConfig>), HubError> {
    use keyway_proto::tls::{server_config, AnyKey};
    let mut transport = keyway_path::e2e_transport_config(Duration::ZERO, config.idle_timeout)?;
    let credit = match config.max_streams_per_app {
        0 => quinn::VarInt::MAX,
        max => quinn::VarInt::from_u64((max + crate::load::STREAM_CREDIT_MARGIN) as u64)
            .unwrap_or(quinn::VarInt::MAX),
    };
    transport.max_concurrent_bidi_streams(credit).max_concurrent_uni_streams(0u32.into());
    let transport = Arc::new(transport);
    let mut authorized =
        server_config(&config.identity, Arc::new(apps.allow_list()), keyway_proto::ALPN_E2E)?;
    if config.session_tickets > 0 {
        keyway_proto::tls::enable_single_use_tickets(&mut authorized, config.session_tickets);
    } else {
        authorized.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        authorized.send_tls13_tickets = 0;
    }
    let mut pairing = server_config(&config.identity, Arc::new(AnyKey), keyway_proto::ALPN_E2E)?;
    pairing.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    pairing.send_tls13_tickets = 0;
    let quic = |tls: rustls::ServerConfig| -> Result<Arc<quinn::ServerConfig>, HubError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(keyway_proto::tls::TlsConfigError::from)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        // An app's virtual address never moves (path changes stay below quinn), so a packet
        // from another address is never this peer migrating: following it would hand the
        // connection to whichever channel a relay bound there.
        server.migration(false);
        Ok(Arc::new(server))
    };
    Ok((quic(authorized)?, quic(pairing)?))
}

/// How often `authorized_apps` and the pairing window file are polled by default
/// ([`HubConfig::poll_interval`](crate::HubConfig::poll_interval)). Two `stat`s (and one
/// small read while a window is open) per tick cost nothing, and this bounds how long a
/// revocation by file edit (`keyway-hub apps revoke`) takes to cut live sessions.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

async fn watch_apps(shared: Arc<Shared>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(shared.config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = shared.reload_apps();
                crate::pairing::refresh(&shared);
            }
            _ = shutdown.requested() => break,
        }
    }
}
