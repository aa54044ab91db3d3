//! The operator's HTTP listener of a hub connector: Prometheus `/metrics` and `/healthz`, like
//! the relay's, on a TCP address of its own ([`HubConfig::metrics_listen`](crate::HubConfig);
//! off unless set, and meant for loopback: the hub never needs to listen otherwise).
//!
//! `/healthz` answers 200 while at least one tunnel is registered (apps can reach the hub
//! through some relay) and 503 otherwise. HTTP/1.1 only (`hyper`), GET/HEAD only.
//!
//! Metrics (all `keyway_hub_…`; the only label values are the configured relay addresses and
//! fixed words, never app keys, so cardinality is bounded by the config):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `tunnel_up{relay}` | gauge | 1 while the tunnel to that relay is registered, else 0 |
//! | `registrations_total{relay}` | counter | successful registrations with that relay |
//! | `reconnects_total{relay}` | counter | registered tunnels lost (or moved after `GoAway`) |
//! | `sessions_announced_total` | counter | sessions the relays announced |
//! | `sessions_total{result}` | counter | sessions `accepted` (pairing sessions included) or `refused` |
//! | `sessions_active` | gauge | accepted sessions not yet ended |
//! | `pairings_total{result}` | counter | pairings `paired` or `failed` (wrong secret, bad request) |
//! | `e2e_resumed_total` | counter | end-to-end connections that resumed a session (single-use ticket) |
//! | `pairing_window_open` | gauge | 1 while a pairing window is open |
//! | `authorized_apps` | gauge | keys in `authorized_apps` |
//! | `channels_active{relay}` | gauge | channels that relay introduced and that are live |
//! | `apps_connected` | gauge | app keys holding an end-to-end connection or stream |
//! | `service_connects_in_flight` | gauge | connections to the local service opened and not yet answered (at most 50 ms) |
//! | `service_connects_waiting` | gauge | streams waiting for their turn to connect to the service |
//! | `service_unanswered_total` | counter | connections the service closed before sending a byte |
//!
//! Besides these, `keyway_build_info{version}` (always 1) and, on Linux, the standard
//! `process_*` metrics (CPU seconds, resident memory, open descriptors, start time).
//!
//! The numbers live in plain atomics ([`HubStats`](crate::HubStats) and each tunnel's own);
//! a scrape copies them into a fresh [`prometheus::Registry`] and encodes that, so nothing on
//! the session path touches Prometheus.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use keyway_proto::ops_http::{self, OpsSource};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::state::Shared;

/// Namespace of every metric name (`keyway_hub_...`).
const NAMESPACE: &str = "keyway_hub";

/// Serves `listener` until the returned task is aborted (the connector's shutdown does).
pub(crate) fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    ops_http::serve(listener, Arc::new(HubOps(shared)))
}

/// The connector as the ops listener sees it.
struct HubOps(Arc<Shared>);

impl OpsSource for HubOps {
    fn metrics(&self) -> String {
        encode(&self.0)
    }

    fn health(&self) -> Result<(), &'static str> {
        if self.0.any_registered() {
            Ok(())
        } else {
            Err("no tunnel registered")
        }
    }
}

/// The Prometheus text exposition of the connector's current numbers.
pub(crate) fn encode(shared: &Shared) -> String {
    let encoded = gather(shared)
        .and_then(|registry| prometheus::TextEncoder::new().encode_to_string(&registry.gather()));
    match encoded {
        Ok(text) => text,
        Err(e) => format!("# cannot encode metrics: {e}\n"),
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn gather(shared: &Shared) -> prometheus::Result<Registry> {
    let registry = Registry::new();
    let register = |c: Box<dyn prometheus::core::Collector>| registry.register(c);

    let up = IntGaugeVec::new(
        opts("tunnel_up", "1 while the tunnel to this relay is registered, else 0."),
        &["relay"],
    )?;
    let registrations = IntCounterVec::new(
        opts("registrations_total", "Successful registrations with this relay (the first one included)."),
        &["relay"],
    )?;
    let reconnects = IntCounterVec::new(
        opts(
            "reconnects_total",
            "Times the registered tunnel to this relay was lost (or moved after GoAway).",
        ),
        &["relay"],
    )?;
    let channels =
        IntGaugeVec::new(opts("channels_active", "Live channels this relay introduced."), &["relay"])?;
    for tunnel in &shared.tunnels {
        let relay = tunnel.target.addr.to_string();
        up.with_label_values(&[relay.as_str()]).set(i64::from(tunnel.is_registered()));
        channels
            .with_label_values(&[relay.as_str()])
            .set(i64::try_from(tunnel.channels.len()).unwrap_or(i64::MAX));
        registrations
            .with_label_values(&[relay.as_str()])
            .inc_by(tunnel.registrations.load(Ordering::Relaxed));
        reconnects.with_label_values(&[relay.as_str()]).inc_by(tunnel.reconnects.load(Ordering::Relaxed));
    }
    register(Box::new(up))?;
    register(Box::new(registrations))?;
    register(Box::new(reconnects))?;
    register(Box::new(channels))?;

    let stats = &shared.stats;
    let announced = prometheus::IntCounter::with_opts(opts(
        "sessions_announced_total",
        "Sessions the relays announced to the hub.",
    ))?;
    announced.inc_by(stats.sessions_announced());
    register(Box::new(announced))?;
    let sessions = IntCounterVec::new(
        opts(
            "sessions_total",
            "Announced sessions by answer: accepted (pairing sessions included) or refused.",
        ),
        &["result"],
    )?;
    sessions.with_label_values(&["accepted"]).inc_by(stats.sessions_accepted());
    sessions.with_label_values(&["refused"]).inc_by(stats.sessions_refused());
    register(Box::new(sessions))?;
    let active = IntGauge::with_opts(opts("sessions_active", "Accepted sessions not yet ended."))?;
    active.set(i64::try_from(stats.sessions_active()).unwrap_or(i64::MAX));
    register(Box::new(active))?;
    let pairings = IntCounterVec::new(
        opts("pairings_total", "Pairing attempts by result: paired, or failed (wrong secret, bad request)."),
        &["result"],
    )?;
    pairings.with_label_values(&["paired"]).inc_by(stats.paired());
    pairings.with_label_values(&["failed"]).inc_by(stats.pairing_failures());
    register(Box::new(pairings))?;
    let resumed = prometheus::IntCounter::with_opts(opts(
        "e2e_resumed_total",
        "End-to-end connections that resumed a TLS session with a single-use ticket of this hub.",
    ))?;
    resumed.inc_by(stats.resumed());
    register(Box::new(resumed))?;
    let window =
        IntGauge::with_opts(opts("pairing_window_open", "1 while a pairing window is open, else 0."))?;
    window.set(i64::from(*shared.pairing_open.borrow()));
    register(Box::new(window))?;
    let apps = IntGauge::with_opts(opts("authorized_apps", "Keys in authorized_apps."))?;
    apps.set(i64::try_from(shared.apps.allow_list().len()).unwrap_or(i64::MAX));
    register(Box::new(apps))?;
    let connected = IntGauge::with_opts(opts(
        "apps_connected",
        "App keys holding an end-to-end connection or stream to this hub.",
    ))?;
    connected.set(i64::try_from(shared.load.apps()).unwrap_or(i64::MAX));
    register(Box::new(connected))?;
    let in_flight = IntGauge::with_opts(opts(
        "service_connects_in_flight",
        "Connections to the local service opened and not yet answered (bounded by max_service_connects).",
    ))?;
    in_flight.set(i64::try_from(shared.service.in_flight()).unwrap_or(i64::MAX));
    register(Box::new(in_flight))?;
    let waiting = IntGauge::with_opts(opts(
        "service_connects_waiting",
        "Streams waiting for their turn to connect to the local service.",
    ))?;
    waiting.set(i64::try_from(shared.service.waiting()).unwrap_or(i64::MAX));
    register(Box::new(waiting))?;
    let unanswered = prometheus::IntCounter::with_opts(opts(
        "service_unanswered_total",
        "Connections the local service closed (or reset) before sending a byte.",
    ))?;
    unanswered.inc_by(shared.service.unanswered());
    register(Box::new(unanswered))?;
    let build_info = IntGaugeVec::new(
        Opts::new("keyway_build_info", "Always 1; the version of the running binary as a label."),
        &["version"],
    )?;
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    register(Box::new(build_info))?;
    #[cfg(target_os = "linux")]
    register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(registry)
}
