//! [`RelayStats`]: the relay's live counters, gauges and histogram, backed by Prometheus
//! metrics in the relay's own [`prometheus::Registry`] (never the process-global default, so
//! several relays in one process, as in tests, never mix their numbers).
//!
//! Every label has a small, fixed set of values: no per-hub, per-key or per-address labels, so
//! cardinality stays bounded however many hubs connect. Each labelled child is resolved once
//! at construction, so the forwarding path bumps a plain atomic per chunk, without a hash
//! lookup.
//!
//! Besides `keyway_relay_…`, the registry holds `keyway_build_info{version}` (always 1) and, on
//! Linux, the standard `process_*` metrics of the process (CPU, memory, descriptors, start).

use std::time::Duration;

use keyway_proto::RefusalReason;

use crate::channel::DropReason;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Namespace of every metric name (`keyway_relay_...`).
const NAMESPACE: &str = "keyway_relay";

/// Which handshake a [`RelayStats::handshake`] observation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeRole {
    /// The QUIC/TLS handshake of any connection (its role is not known yet).
    Quic,
    /// A hub's registration (`Register` → `Registered` / `Refused`).
    Hub,
    /// An app's channel set-up (`ChannelOpen` → `ChannelReady` / `Refused`).
    App,
}

impl HandshakeRole {
    fn label(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Hub => "hub",
            Self::App => "app",
        }
    }
}

/// How a handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeResult {
    Ok,
    /// Answered with a typed refusal (or, for QUIC, refused before the handshake by a limit).
    Refused,
    /// The peer went away or broke the protocol.
    Failed,
    /// The handshake timeout ran out.
    Timeout,
    /// A QUIC handshake gave its slot to a validated attempt when all were taken.
    Evicted,
}

impl HandshakeResult {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Evicted => "evicted",
        }
    }
}

/// A relay limit, as the `limit` label of `keyway_relay_limit_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    MaxHubs,
    MaxSessionsPerHub,
    MaxSessionsPerApp,
    MaxPairingSessionsPerHub,
    MaxUnauthorizedConnections,
    NewConnectionsPerIp,
    BytesPerSecondPerKey,
    HandshakeTimeout,
    IdleSessionTimeout,
    MaxHandshakesInFlight,
    MaxHandshakesPerSource,
    UnvalidatedHandshakeTimeout,
}

impl LimitKind {
    /// Every limit, in label order.
    pub const ALL: [LimitKind; 12] = [
        Self::MaxHubs,
        Self::MaxSessionsPerHub,
        Self::MaxSessionsPerApp,
        Self::MaxPairingSessionsPerHub,
        Self::MaxUnauthorizedConnections,
        Self::NewConnectionsPerIp,
        Self::BytesPerSecondPerKey,
        Self::HandshakeTimeout,
        Self::IdleSessionTimeout,
        Self::MaxHandshakesInFlight,
        Self::MaxHandshakesPerSource,
        Self::UnvalidatedHandshakeTimeout,
    ];

    /// The label value, which is also the name of the limit's config key.
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxHubs => "max_hubs",
            Self::MaxSessionsPerHub => "max_sessions_per_hub",
            Self::MaxSessionsPerApp => "max_sessions_per_app",
            Self::MaxPairingSessionsPerHub => "max_pairing_sessions_per_hub",
            Self::MaxUnauthorizedConnections => "max_unauthorized_connections",
            Self::NewConnectionsPerIp => "new_connections_per_ip",
            Self::BytesPerSecondPerKey => "bytes_per_second_per_key",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::IdleSessionTimeout => "idle_session_timeout",
            Self::MaxHandshakesInFlight => "max_handshakes_in_flight",
            Self::MaxHandshakesPerSource => "max_handshakes_per_source",
            Self::UnvalidatedHandshakeTimeout => "unvalidated_handshake_timeout",
        }
    }
}

/// Why the relay refused a connection attempt before any handshake work (QUIC
/// `CONNECTION_REFUSED`, which carries no reason on the wire), as the `reason` label of
/// `keyway_relay_connections_refused_total`. All of them mean "come back soon" to a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// The relay is shutting down (the hub reaches its successor or another node).
    Draining,
    /// The source is over `new_connections_per_ip`.
    NewConnectionsPerIp,
    /// `max_handshakes_in_flight` handshakes are already being worked on (a reconnect storm)
    /// and none may give way to this one.
    HandshakesInFlight,
    /// Its source already has `max_handshakes_per_source` handshakes in flight.
    HandshakesPerSource,
}

impl ConnectionRefusal {
    /// Every reason, in label order.
    pub const ALL: [ConnectionRefusal; 4] =
        [Self::Draining, Self::NewConnectionsPerIp, Self::HandshakesInFlight, Self::HandshakesPerSource];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::NewConnectionsPerIp => "new_connections_per_ip",
            Self::HandshakesInFlight => "max_handshakes_in_flight",
            Self::HandshakesPerSource => "max_handshakes_per_source",
        }
    }
}

/// Why the relay closed a connection that was not authorized (see `standing`), as the `reason`
/// label of `keyway_relay_unauthorized_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    /// Nothing authorized on it, and no registered hub lists its key.
    Stranger,
    /// Its key is listed, but every hub that lists it already carries `max_idle_apps_per_hub`
    /// idle app connections.
    IdleOverHubBudget,
}

impl CutReason {
    /// Every reason, in label order.
    pub const ALL: [CutReason; 2] = [Self::Stranger, Self::IdleOverHubBudget];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Stranger => "stranger",
            Self::IdleOverHubBudget => "idle_over_hub_budget",
        }
    }
}

/// Counters and gauges of one relay. Read them through the accessor methods, or scrape them
/// (`/metrics`, see [`RelayStats::encode`]).
#[derive(Debug)]
pub struct RelayStats {
    registry: Registry,
    hubs_connected: IntGauge,
    connections_active: IntGauge,
    apps_at_session_cap: IntGauge,
    connections_unauthorized: IntGauge,
    idle_app_connections: IntGauge,
    unauthorized_closed: Vec<IntCounter>,
    draining: IntGauge,
    sessions_accepted: IntCounter,
    sessions_refused: IntCounter,
    sessions_failed: IntCounter,
    refusals: Vec<IntCounter>,
    bytes_app_to_hub: IntCounter,
    bytes_hub_to_app: IntCounter,
    handshakes: IntCounterVec,
    setup_seconds: Histogram,
    registrations: IntCounter,
    replacements: IntCounter,
    limit_hits: Vec<IntCounter>,
    address_validations: IntCounter,
    /// Attempts refused before the handshake, by [`ConnectionRefusal::ALL`] order.
    connections_refused: Vec<IntCounter>,
    handshakes_in_flight: IntGauge,
    limits: GaugeVec,
    channels_active: IntGauge,
    /// Channel packets forwarded, app→hub and hub→app.
    channel_packets: [IntCounter; 2],
    channel_held: IntCounter,
    /// Channel packets dropped, by [`DropReason::ALL`] order.
    channel_drops: Vec<IntCounter>,
    /// Sends (one GSO transmit each) that forwarded channel packets.
    channel_transmits: IntCounter,
}

impl Default for RelayStats {
    fn default() -> Self {
        Self::new()
    }
}

fn slot(reason: RefusalReason) -> usize {
    RefusalReason::KNOWN.iter().position(|r| *r == reason).unwrap_or(RefusalReason::KNOWN.len())
}

fn dec(gauge: &IntGauge) {
    // Never below zero: a bookkeeping slip must not show a negative number of hubs.
    if gauge.get() > 0 {
        gauge.dec();
    }
}

/// Registers metrics into one registry, with the relay's namespace.
struct Builder(Registry);

impl Builder {
    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> prometheus::Result<C> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }
    fn gauge(&self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.register(IntGauge::with_opts(Opts::new(name, help).namespace(NAMESPACE))?)
    }
    fn counter(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.register(IntCounter::with_opts(Opts::new(name, help).namespace(NAMESPACE))?)
    }
    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
        self.register(IntCounterVec::new(Opts::new(name, help).namespace(NAMESPACE), labels)?)
    }
}

/// Buckets of the session set-up histogram, in seconds: 1 ms to about 16 s.
const SETUP_BUCKETS: [f64; 15] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0];

impl RelayStats {
    /// Fresh metrics in a fresh registry.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        // Every name, help text and label set is a constant (and the unit tests build and
        // scrape them), so this can only fail on a programming error, never on input.
        Self::try_new().expect("constant metric definitions are valid")
    }

    fn try_new() -> prometheus::Result<Self> {
        let b = Builder(Registry::new());
        let hubs_connected = b.gauge("hubs_connected", "Hubs currently registered.")?;
        let connections_active =
            b.gauge("connections_active", "QUIC connections currently established (hubs and apps).")?;
        let apps_at_session_cap = b.gauge(
            "apps_at_session_cap",
            "App keys holding max_sessions_per_app sessions at one hub now (counted per hub and app).",
        )?;
        let connections_unauthorized = b.gauge(
            "connections_unauthorized",
            "Connections not yet authorized (by a registration, a session or channel, or a hub's listing); \
             at max_unauthorized_connections only known keys are let in, uncounted.",
        )?;
        let idle_app_connections = b.gauge(
            "idle_app_connections",
            "App connections with nothing authorized on them, kept because a registered hub lists the \
             key (charged to that hub, at most max_idle_apps_per_hub each).",
        )?;
        let closed = b.counter_vec(
            "unauthorized_closed_total",
            "Connections closed at their review for holding nothing authorized, by reason.",
            &["reason"],
        )?;
        let unauthorized_closed =
            CutReason::ALL.iter().map(|r| closed.with_label_values(&[r.label()])).collect();
        let draining = b.gauge("draining", "1 while the relay drains before shutting down, else 0.")?;
        let sessions = b.counter_vec(
            "sessions_opened_total",
            "Channel requests by result: accepted (listed), refused (typed refusal), failed (peer gone).",
            &["result"],
        )?;
        let refusals_vec = b.counter_vec(
            "refusals_total",
            "Typed refusals sent, by reason (the relay's own and hubs' forwarded ones).",
            &["reason"],
        )?;
        let mut refusals: Vec<IntCounter> =
            RefusalReason::KNOWN.iter().map(|r| refusals_vec.with_label_values(&[r.label()])).collect();
        refusals.push(refusals_vec.with_label_values(&[RefusalReason::Other(0).label()]));
        let bytes = b.counter_vec(
            "bytes_forwarded_total",
            "Payload bytes forwarded, by direction (counted chunk by chunk).",
            &["direction"],
        )?;
        let handshakes = b.counter_vec(
            "handshakes_total",
            "Handshakes by role (quic: transport; hub: registration; app: session set-up) and result.",
            &["role", "result"],
        )?;
        let setup_seconds = HistogramOpts::new(
            "session_setup_seconds",
            "Time from an app's ChannelOpen to its ChannelReady (includes the hub's answer).",
        )
        .namespace(NAMESPACE)
        .buckets(SETUP_BUCKETS.to_vec());
        let setup_seconds = b.register(Histogram::with_opts(setup_seconds)?)?;
        let registrations =
            b.counter("hub_registrations_total", "Successful hub registrations (replacements included).")?;
        let replacements = b.counter(
            "hub_replacements_total",
            "Registrations that displaced an older connection of the same hub.",
        )?;
        let limits = b.counter_vec(
            "limit_hits_total",
            "Times a limit refused or cut something, by limit (see docs/operating.md).",
            &["limit"],
        )?;
        let limit_hits = LimitKind::ALL.iter().map(|l| limits.with_label_values(&[l.label()])).collect();
        let address_validations = b.counter(
            "address_validations_total",
            "QUIC Retry packets sent because new connections arrived faster than retry_threshold.",
        )?;
        let refused = b.counter_vec(
            "connections_refused_total",
            "Connection attempts refused before any handshake work (QUIC CONNECTION_REFUSED), by \
             reason: draining, new_connections_per_ip, max_handshakes_in_flight.",
            &["reason"],
        )?;
        let connections_refused =
            ConnectionRefusal::ALL.iter().map(|r| refused.with_label_values(&[r.label()])).collect();
        let handshakes_in_flight = b.gauge(
            "handshakes_in_flight",
            "QUIC handshakes accepted and not yet complete (at most max_handshakes_in_flight).",
        )?;
        let limits_in_force = b.register(GaugeVec::new(
            Opts::new("limit", "The limits in force (0: off; durations in seconds), by limit.")
                .namespace(NAMESPACE),
            &["limit"],
        )?)?;
        let channels_active = b.gauge("channels_active", "End-to-end channels currently forwarded.")?;
        let packets = b.counter_vec(
            "channel_packets_forwarded_total",
            "End-to-end packets forwarded on channels, by direction (their bytes count in bytes_forwarded_total).",
            &["direction"],
        )?;
        let drops = b.counter_vec(
            "channel_packets_dropped_total",
            "Channel packets not forwarded, by reason: unknown_channel, wrong_source, rate_limited, send_failed.",
            &["reason"],
        )?;
        let channel_held = b.counter(
            "channel_packets_held_total",
            "Channel packets held for a channel not live yet (an app's first flight, sent with its ChannelOpen); those that expire count as unknown_channel drops.",
        )?;
        let channel_drops = DropReason::ALL.iter().map(|r| drops.with_label_values(&[r.label()])).collect();
        let channel_transmits = b.counter(
            "channel_transmits_total",
            "Socket sends that forwarded channel packets (one GSO batch each): packets per send is the batching.",
        )?;
        for role in [HandshakeRole::Quic, HandshakeRole::Hub, HandshakeRole::App] {
            for result in [
                HandshakeResult::Ok,
                HandshakeResult::Refused,
                HandshakeResult::Failed,
                HandshakeResult::Timeout,
                HandshakeResult::Evicted,
            ] {
                // Touch every series so a scrape shows zeros rather than nothing.
                let _ = handshakes.with_label_values(&[role.label(), result.label()]);
            }
        }
        let build_info = IntGaugeVec::new(
            Opts::new("keyway_build_info", "Always 1; the version of the running binary as a label."),
            &["version"],
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        b.register(build_info)?;
        // process_* (CPU seconds, resident memory, open descriptors, start time) of this
        // process; with several relays in one process (tests), each registry reports the same.
        #[cfg(target_os = "linux")]
        b.0.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(Self {
            hubs_connected,
            connections_active,
            apps_at_session_cap,
            connections_unauthorized,
            idle_app_connections,
            unauthorized_closed,
            draining,
            sessions_accepted: sessions.with_label_values(&["accepted"]),
            sessions_refused: sessions.with_label_values(&["refused"]),
            sessions_failed: sessions.with_label_values(&["failed"]),
            refusals,
            bytes_app_to_hub: bytes.with_label_values(&["app_to_hub"]),
            bytes_hub_to_app: bytes.with_label_values(&["hub_to_app"]),
            handshakes,
            setup_seconds,
            registrations,
            replacements,
            limit_hits,
            address_validations,
            connections_refused,
            handshakes_in_flight,
            limits: limits_in_force,
            channels_active,
            channel_packets: [
                packets.with_label_values(&["app_to_hub"]),
                packets.with_label_values(&["hub_to_app"]),
            ],
            channel_drops,
            channel_held,
            channel_transmits,
            registry: b.0,
        })
    }

    /// Hubs currently registered (gauge).
    pub fn hubs_connected(&self) -> u64 {
        self.hubs_connected.get().max(0) as u64
    }
    /// QUIC connections currently established (gauge).
    pub fn connections_active(&self) -> u64 {
        self.connections_active.get().max(0) as u64
    }
    /// (Hub, app key) pairs at `max_sessions_per_app` now (gauge).
    pub fn apps_at_session_cap(&self) -> u64 {
        self.apps_at_session_cap.get().max(0) as u64
    }
    /// Connections not yet authorized now (gauge; known keys admitted over the cap are not
    /// counted).
    pub fn connections_unauthorized(&self) -> u64 {
        self.connections_unauthorized.get().max(0) as u64
    }
    /// Idle app connections kept because a registered hub lists their key (gauge).
    pub fn idle_app_connections(&self) -> u64 {
        self.idle_app_connections.get().max(0) as u64
    }
    /// Connections closed at their review for `reason`, since start.
    pub fn unauthorized_closed(&self, reason: CutReason) -> u64 {
        CutReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.unauthorized_closed.get(i))
            .map_or(0, IntCounter::get)
    }
    /// Channels the hub accepted and the relay listed, since start.
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_accepted.get()
    }
    /// Refusals sent with `reason` since start (relay's own and hubs' forwarded ones). Every
    /// unknown reason shares one counter.
    pub fn refusals(&self, reason: RefusalReason) -> u64 {
        self.refusals.get(slot(reason)).map_or(0, IntCounter::get)
    }
    /// Sum of all refusals.
    pub fn refusals_total(&self) -> u64 {
        self.refusals.iter().map(IntCounter::get).sum()
    }
    /// Payload bytes forwarded from apps to hubs (counted live, chunk by chunk).
    pub fn bytes_app_to_hub(&self) -> u64 {
        self.bytes_app_to_hub.get()
    }
    /// Payload bytes forwarded from hubs to apps (counted live, chunk by chunk).
    pub fn bytes_hub_to_app(&self) -> u64 {
        self.bytes_hub_to_app.get()
    }
    /// Successful registrations since start (replacements included).
    pub fn registrations(&self) -> u64 {
        self.registrations.get()
    }
    /// Registrations that displaced an older connection of the same hub.
    pub fn replacements(&self) -> u64 {
        self.replacements.get()
    }
    /// Times `limit` refused or cut something since start.
    pub fn limit_hits(&self, limit: LimitKind) -> u64 {
        LimitKind::ALL
            .iter()
            .position(|l| *l == limit)
            .and_then(|i| self.limit_hits.get(i))
            .map_or(0, IntCounter::get)
    }
    /// QUIC Retry packets sent (address validation under load).
    pub fn address_validations(&self) -> u64 {
        self.address_validations.get()
    }

    /// End-to-end channels currently forwarded (gauge).
    pub fn channels_active(&self) -> u64 {
        self.channels_active.get().max(0) as u64
    }

    /// The registry the metrics are in, for a part that adds its own (the cluster's).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Connection attempts refused before any handshake work for `reason`.
    pub fn connections_refused(&self, reason: ConnectionRefusal) -> u64 {
        let i = ConnectionRefusal::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.connections_refused.get(i).map_or(0, IntCounter::get)
    }

    /// QUIC handshakes in flight now (gauge).
    pub fn handshakes_in_flight(&self) -> u64 {
        self.handshakes_in_flight.get().max(0) as u64
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        match prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()) {
            Ok(text) => text,
            Err(e) => format!("# cannot encode metrics: {e}\n"),
        }
    }

    /// Publishes the limits in force (at start and after every change).
    pub(crate) fn set_limits(&self, limits: &crate::limits::Limits) {
        let values = [
            ("max_hubs", f64::from(limits.max_hubs)),
            ("max_sessions_per_hub", f64::from(limits.max_sessions_per_hub)),
            ("max_sessions_per_app", f64::from(limits.max_sessions_per_app)),
            ("max_pairing_sessions_per_hub", f64::from(limits.max_pairing_sessions_per_hub)),
            ("unauthorized_grace", limits.unauthorized_grace.as_secs_f64()),
            ("max_unauthorized_connections", f64::from(limits.max_unauthorized_connections)),
            ("max_idle_apps_per_hub", f64::from(limits.max_idle_apps_per_hub)),
            ("max_streams_per_connection", f64::from(limits.max_streams_per_connection)),
            ("new_connections_per_ip", limits.new_connections_per_ip),
            ("new_connections_burst", f64::from(limits.new_connections_burst)),
            ("new_connections_ipv6_prefix", f64::from(limits.new_connections_ipv6_prefix)),
            ("bytes_per_second_per_key", limits.bytes_per_second_per_key as f64),
            ("handshake_timeout", limits.handshake_timeout.as_secs_f64()),
            ("idle_session_timeout", limits.idle_session_timeout.as_secs_f64()),
            ("retry_threshold", f64::from(limits.retry_threshold)),
            ("max_held_datagrams", f64::from(limits.max_held_datagrams)),
            ("max_handshakes_in_flight", f64::from(limits.max_handshakes_in_flight)),
            ("max_handshakes_per_source", f64::from(limits.max_handshakes_per_source)),
            ("validate_above_handshakes_in_flight", f64::from(limits.validate_above_handshakes_in_flight)),
            ("unvalidated_handshake_timeout", limits.unvalidated_handshake_timeout.as_secs_f64()),
        ];
        for (name, value) in values {
            self.limits.with_label_values(&[name]).set(value);
        }
    }

    pub(crate) fn hub_up(&self) {
        self.hubs_connected.inc();
    }
    pub(crate) fn hub_down(&self) {
        dec(&self.hubs_connected);
    }
    pub(crate) fn connection_up(&self) {
        self.connections_active.inc();
    }
    pub(crate) fn connection_down(&self) {
        dec(&self.connections_active);
    }
    /// One (hub, app) pair reached its session cap (`true`) or left it (`false`).
    pub(crate) fn app_at_session_cap(&self, at_cap: bool) {
        if at_cap {
            self.apps_at_session_cap.inc();
        } else {
            dec(&self.apps_at_session_cap);
        }
    }
    pub(crate) fn unauthorized(&self, up: bool) {
        if up {
            self.connections_unauthorized.inc();
        } else {
            dec(&self.connections_unauthorized);
        }
    }
    pub(crate) fn idle_app(&self, up: bool) {
        if up {
            self.idle_app_connections.inc();
        } else {
            dec(&self.idle_app_connections);
        }
    }
    pub(crate) fn closed_unauthorized(&self, reason: CutReason) {
        if let Some(c) =
            CutReason::ALL.iter().position(|r| *r == reason).and_then(|i| self.unauthorized_closed.get(i))
        {
            c.inc();
        }
    }
    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.set(i64::from(draining));
    }
    /// A channel request that was never listed: `refused` with a typed refusal, or
    /// failed because a peer went away.
    pub(crate) fn session_not_opened(&self, refused: bool) {
        if refused {
            self.sessions_refused.inc();
        } else {
            self.sessions_failed.inc();
        }
    }
    pub(crate) fn setup_time(&self, elapsed: Duration) {
        self.setup_seconds.observe(elapsed.as_secs_f64());
    }
    pub(crate) fn handshake(&self, role: HandshakeRole, result: HandshakeResult) {
        self.handshakes.with_label_values(&[role.label(), result.label()]).inc();
    }
    pub(crate) fn refused(&self, reason: RefusalReason) {
        if let Some(c) = self.refusals.get(slot(reason)) {
            c.inc();
        }
    }
    pub(crate) fn limit_hit(&self, limit: LimitKind) {
        if let Some(c) = LimitKind::ALL.iter().position(|l| *l == limit).and_then(|i| self.limit_hits.get(i))
        {
            c.inc();
        }
    }
    /// An attempt refused before any handshake work (the caller refuses it).
    pub(crate) fn connection_refused(&self, reason: ConnectionRefusal) {
        let i = ConnectionRefusal::ALL.iter().position(|r| *r == reason);
        if let Some(counter) = i.and_then(|i| self.connections_refused.get(i)) {
            counter.inc();
        }
        self.handshake(HandshakeRole::Quic, HandshakeResult::Refused);
    }
    /// The handshakes in flight now (set by the admission, which owns the count).
    pub(crate) fn set_handshakes_in_flight(&self, n: u32) {
        self.handshakes_in_flight.set(i64::from(n));
    }
    pub(crate) fn address_validation(&self) {
        self.address_validations.inc();
    }
    pub(crate) fn forwarded(&self, direction: crate::channel::Direction, bytes: usize) {
        let counter = match direction {
            crate::channel::Direction::AppToHub => &self.bytes_app_to_hub,
            crate::channel::Direction::HubToApp => &self.bytes_hub_to_app,
        };
        counter.inc_by(bytes as u64);
    }
    /// `segments` end-to-end packets (`bytes` without their channel headers) left for the other
    /// side of a channel, in one send.
    pub(crate) fn channel_forwarded(
        &self,
        direction: crate::channel::Direction,
        segments: usize,
        bytes: usize,
    ) {
        let [app_to_hub, hub_to_app] = &self.channel_packets;
        match direction {
            crate::channel::Direction::AppToHub => app_to_hub.inc_by(segments as u64),
            crate::channel::Direction::HubToApp => hub_to_app.inc_by(segments as u64),
        }
        self.channel_transmits.inc();
        self.forwarded(direction, bytes);
    }
    pub(crate) fn channel_dropped(&self, reason: DropReason, segments: usize) {
        if let Some(c) =
            DropReason::ALL.iter().position(|r| *r == reason).and_then(|i| self.channel_drops.get(i))
        {
            c.inc_by(segments as u64);
        }
    }
    pub(crate) fn channel_held(&self) {
        self.channel_held.inc();
    }
    pub(crate) fn channel_up(&self) {
        self.sessions_accepted.inc();
        self.channels_active.inc();
    }
    pub(crate) fn channel_down(&self) {
        dec(&self.channels_active);
    }
    pub(crate) fn registered(&self, replaced: bool) {
        self.registrations.inc();
        if replaced {
            self.replacements.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_unknown_ones_share_one() {
        let stats = RelayStats::default();
        for (i, reason) in RefusalReason::KNOWN.iter().enumerate() {
            for _ in 0..=i {
                stats.refused(*reason);
            }
        }
        for (i, reason) in RefusalReason::KNOWN.iter().enumerate() {
            assert_eq!(stats.refusals(*reason), i as u64 + 1, "{reason}");
        }
        stats.refused(RefusalReason::Other(900));
        stats.refused(RefusalReason::Other(901));
        assert_eq!(stats.refusals(RefusalReason::Other(1)), 2);
    }

    #[test]
    fn gauges_never_wrap() {
        let stats = RelayStats::default();
        stats.hub_down();
        stats.channel_down();
        assert_eq!(stats.hubs_connected(), 0);
        assert_eq!(stats.channels_active(), 0);
        stats.channel_up();
        assert_eq!((stats.channels_active(), stats.sessions_opened()), (1, 1));
        stats.channel_down();
        assert_eq!((stats.channels_active(), stats.sessions_opened()), (0, 1));
    }

    #[test]
    fn the_exposition_names_every_metric_with_bounded_labels() {
        let stats = RelayStats::default();
        stats.refused(RefusalReason::OverLimit);
        stats.limit_hit(LimitKind::MaxHubs);
        stats.setup_time(Duration::from_millis(3));
        stats.forwarded(crate::channel::Direction::AppToHub, 5);
        let text = stats.encode();
        for needle in [
            "keyway_relay_hubs_connected 0",
            "keyway_relay_channels_active 0",
            "keyway_relay_connections_active 0",
            "keyway_relay_apps_at_session_cap 0",
            "keyway_relay_connections_unauthorized 0",
            "keyway_relay_idle_app_connections 0",
            "keyway_relay_unauthorized_closed_total{reason=\"stranger\"} 0",
            "keyway_relay_unauthorized_closed_total{reason=\"idle_over_hub_budget\"} 0",
            "keyway_relay_limit_hits_total{limit=\"max_unauthorized_connections\"} 0",
            "keyway_relay_limit_hits_total{limit=\"max_sessions_per_app\"} 0",
            "keyway_relay_draining 0",
            "keyway_relay_refusals_total{reason=\"over_limit\"} 1",
            "keyway_relay_refusals_total{reason=\"other\"} 0",
            "keyway_relay_limit_hits_total{limit=\"max_hubs\"} 1",
            "keyway_relay_limit_hits_total{limit=\"idle_session_timeout\"} 0",
            "keyway_relay_bytes_forwarded_total{direction=\"app_to_hub\"} 5",
            "keyway_relay_handshakes_total{result=\"timeout\",role=\"quic\"} 0",
            "keyway_relay_session_setup_seconds_count 1",
            "keyway_relay_sessions_opened_total{result=\"accepted\"} 0",
            "keyway_relay_hub_registrations_total 0",
            "keyway_relay_hub_replacements_total 0",
            "keyway_relay_address_validations_total 0",
            "keyway_relay_connections_refused_total{reason=\"draining\"} 0",
            "keyway_relay_connections_refused_total{reason=\"max_handshakes_in_flight\"} 0",
            "keyway_relay_handshakes_in_flight 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }
}
