//! The QUIC endpoint: start-up, the accept loop, per-connection stream dispatch, reload and
//! graceful shutdown ([`Relay`], [`RelayHandle`]).
//!
//! Every `Incoming` gets its own task so that one slow handshake never stalls the others, and
//! every stream gets its own task. A stream's first frame decides what it is: `Register` makes
//! it the hub's control stream ([`crate::hub`]), `SessionOpen` an app session
//! ([`crate::session`]). TLS admits any valid key; authorization happens per frame, against
//! the current state, so TLS session resumption can never bypass it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::tls::{quic_peer_key, quic_server_crypto, AnyKey};
use keyway_proto::{Frame, FrameError, PublicKey, RefusalReason, ALPN_RELAY};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::limits::{Buckets, LimitsCell};
use crate::policy::NameBook;
use crate::registry::{ControlCommand, Registry};
use crate::stats::{HandshakeResult, HandshakeRole, LimitKind, RelayStats};
use crate::{codes, ForwardTap, Limits, NamePolicy, RelayConfig, RelayError};

/// UDP socket buffer size asked for: the default (~208 KiB) drops packets in handshake bursts.
const UDP_BUFFER: usize = 4 * 1024 * 1024;
/// How often the hubs file is checked for changes.
const HUBS_FILE_POLL: Duration = Duration::from_secs(1);
/// How long shutdown waits for hubs to receive their `GoAway`.
const GOAWAY_GRACE: Duration = Duration::from_secs(2);
/// How long shutdown waits for connections to close cleanly (after the drain).
const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// How often a draining relay checks whether its last session ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How often idle rate-limit buckets are forgotten.
const BUCKET_SWEEP: Duration = Duration::from_secs(30);
/// Base of the reconnect delay hinted in `GoAway`; each hub gets up to one second more, so a
/// relay restart does not bring every hub back in the same instant.
const GOAWAY_RETRY_MS: u32 = 1000;
/// How long a restarted relay retries binding a port its predecessor is still releasing.
const BIND_RETRY: Duration = Duration::from_secs(2);
/// Bidirectional streams a new connection may open before the relay grants more. quinn
/// pre-allocates state for every stream it allows a peer, about 85 bytes each, so granting
/// `max_streams_per_connection` (256) up front cost an idle hub, which needs one control
/// stream, some 20 KiB of the relay's memory; the credit grows with use instead (see
/// [`StreamCredit`]), up to the limit.
const INITIAL_STREAM_CREDIT: u32 = 8;

/// State shared by every task of one relay.
pub(crate) struct Shared {
    pub stats: Arc<RelayStats>,
    pub registry: Registry,
    pub names: NameBook,
    pub tap: Option<ForwardTap>,
    pub session_open_timeout: Duration,
    /// `true` once the relay is shutting down: no new registrations or sessions.
    pub shutdown: watch::Sender<bool>,
    /// The limits in force (replaced on reload).
    pub limits: LimitsCell,
    /// Rate-limit state per source address and per key.
    pub buckets: Buckets,
}

impl Shared {
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Disconnects registered hubs that the (just reloaded) name book no longer allows.
    fn sweep(&self) {
        for hub in self.registry.all() {
            if self.names.binding(&hub.name) == Some(hub.key) {
                continue;
            }
            if self.registry.remove_if_current(&hub.name, hub.conn_id).is_none() {
                continue;
            }
            info!(hub = %hub.name, key = %hub.key.fingerprint(), "hub no longer authorized; disconnecting it");
            let message = format!(
                "hub name {} is no longer authorized for key {} at this relay",
                hub.name,
                hub.key.fingerprint()
            );
            if hub.control.send(ControlCommand::Revoke { message }).is_err() {
                hub.conn.close(codes::REVOKED, b"hub name no longer authorized");
            }
        }
    }
}

/// What one accepted connection is: its authenticated key and whether it registered a hub.
pub(crate) struct ConnCtx {
    pub conn: quinn::Connection,
    pub peer: PublicKey,
    pub conn_id: u64,
    /// Set by the first `Register`; a connection carries at most one control stream.
    pub has_control: AtomicBool,
    /// Streams the peer has open now, and how many it may open.
    pub streams: StreamCredit,
}

/// The stream credit of one connection: starts at [`INITIAL_STREAM_CREDIT`] and doubles, up to
/// `max_streams_per_connection`, whenever the peer's open streams come close to it, so that a
/// busy app never waits on credit while an idle hub costs the relay only a few streams' state.
#[derive(Debug)]
pub(crate) struct StreamCredit {
    open: AtomicU32,
    granted: AtomicU32,
}

impl StreamCredit {
    fn new(granted: u32) -> Self {
        Self { open: AtomicU32::new(0), granted: AtomicU32::new(granted) }
    }

    /// Counts a newly accepted stream; returns the new credit to grant, if it should grow.
    fn opened(&self, limit: u32) -> Option<u32> {
        let open = self.open.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let granted = self.granted.load(Ordering::Acquire);
        // Grow at three quarters, so the next streams never wait a round trip for credit.
        if granted >= limit || open.saturating_mul(4) < granted.saturating_mul(3) {
            return None;
        }
        let grown = granted.saturating_mul(2).clamp(1, limit);
        self.granted.store(grown, Ordering::Release);
        Some(grown)
    }

    fn closed(&self) {
        let _ = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// Decrements the open-stream count when a stream's handler ends, however it ends.
struct OpenStream(Arc<ConnCtx>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.closed();
    }
}

/// Starts relays. See [`Relay::start`].
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Binds the UDP socket, loads the name policy and starts serving in the background.
    /// Must be called inside a tokio runtime.
    pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
        if config.idle_timeout.is_zero() || config.session_open_timeout.is_zero() {
            return Err(RelayError::Config(
                "idle_timeout and session_open_timeout must be above zero".into(),
            ));
        }
        config.limits.validate().map_err(RelayError::Config)?;
        let names = NameBook::load(&config.policy)?;
        let crypto: Arc<dyn quinn::crypto::ServerConfig> =
            quic_server_crypto(&config.identity, Arc::new(AnyKey), ALPN_RELAY)?;
        let server_config = build_server_config(Arc::clone(&crypto), config.idle_timeout, &config.limits)?;
        let socket = bind_socket(config.listen).await?;
        let endpoint = quinn::Endpoint::new(
            keyway_proto::tls::endpoint_config(&config.identity),
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        let public_key = config.identity.public_key();
        let stats = Arc::new(RelayStats::default());
        stats.set_limits(&config.limits);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            registry: Registry::new(Arc::clone(&stats)),
            stats,
            names,
            tap: config.tap,
            session_open_timeout: config.session_open_timeout,
            shutdown,
            limits: LimitsCell::new(config.limits),
            buckets: Buckets::new(),
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
            accept_task: Some(accept_task),
            watch_task,
            background,
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
    accept_task: Option<JoinHandle<()>>,
    watch_task: Option<JoinHandle<()>>,
    /// The metrics listener and the bucket sweeper: aborted when the relay stops.
    background: Vec<JoinHandle<()>>,
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
        limits.validate().map_err(RelayError::Config)?;
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
    /// registrations and sessions, sends `GoAway` to every registered hub (and waits, bounded,
    /// for it to arrive), lets live sessions finish for up to the drain timeout, then closes
    /// every connection with `SHUTTING_DOWN` and waits, bounded, for the endpoint to go idle.
    pub async fn shutdown(mut self) {
        let sessions = self.shared.stats.sessions_active();
        info!(sessions, drain_timeout = ?self.drain_timeout, "relay draining");
        self.shared.stats.set_draining(true);
        self.shared.shutdown.send_replace(true);
        // New connection attempts now fail at once instead of waiting for a handshake.
        self.endpoint.set_server_config(None);
        if let Some(task) = self.watch_task.take() {
            task.abort();
        }
        let mut delivered = Vec::new();
        for hub in self.shared.registry.all() {
            let (done, rx) = oneshot::channel();
            let retry_after_ms = GOAWAY_RETRY_MS + spread(hub.conn_id, 1000);
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
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while stats.sessions_active() > 0 {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        })
        .await;
        match drained {
            Ok(()) => info!("all sessions ended"),
            Err(_) => warn!(
                sessions = stats.sessions_active(),
                "drain timeout of {:?} reached; closing the remaining sessions", self.drain_timeout
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

#[cfg(test)]
pub(crate) fn server_config(config: &RelayConfig) -> Result<quinn::ServerConfig, RelayError> {
    let crypto = quic_server_crypto(&config.identity, Arc::new(AnyKey), ALPN_RELAY)?;
    build_server_config(crypto, config.idle_timeout, &config.limits)
}

fn build_server_config(
    crypto: Arc<dyn quinn::crypto::ServerConfig>,
    idle_timeout: Duration,
    limits: &Limits,
) -> Result<quinn::ServerConfig, RelayError> {
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    // Retry tokens are only asked for under load (see `handle_incoming`); quinn's own
    // always-on validation stays off.
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|_| RelayError::Config(format!("idle timeout {idle_timeout:?} is too large")))?;
    transport
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(VarInt::from_u32(
            limits.max_streams_per_connection.min(INITIAL_STREAM_CREDIT),
        ))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // Hubs keep their NAT binding alive; the relay only answers.
        .keep_alive_interval(None);
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Binds the UDP socket through socket2 so its buffers can be enlarged first (best effort: the
/// kernel caps them at `net.core.rmem_max` / `wmem_max`).
async fn bind_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, RelayError> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match try_bind(addr) {
            Ok(socket) => return Ok(socket),
            // A relay restarted in-process may find its predecessor's socket not yet released.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => return Err(RelayError::Bind { addr, source }),
        }
    }
}

fn try_bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Serve IPv4 too on `[::]` where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER) {
        debug!("cannot enlarge the UDP receive buffer: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER) {
        debug!("cannot enlarge the UDP send buffer: {e}");
    }
    match socket.recv_buffer_size() {
        // Linux reports twice the usable size; below the request means the sysctl capped it.
        Ok(size) if size < UDP_BUFFER => info!(
            bytes = size,
            "UDP receive buffer is smaller than the {UDP_BUFFER} bytes asked for; \
             raise net.core.rmem_max for handshake bursts"
        ),
        _ => {}
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
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
        shared.buckets.sweep(&shared.limits.get());
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

/// Decides what to do with a connection attempt before any handshake work: refuse it while
/// draining or over the per-IP rate, ask for address validation (Retry) while attempts arrive
/// faster than `retry_threshold`, else accept it, under the handshake timeout.
async fn handle_incoming(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let stats = &shared.stats;
    if shared.is_shutting_down() {
        incoming.refuse();
        return;
    }
    let limits = shared.limits.get();
    if shared.buckets.over_retry_threshold(&limits)
        && !incoming.remote_address_validated()
        && incoming.may_retry()
    {
        // Stateless for us: a spoofed source never sees the token, so it costs it a round trip
        // and us no handshake. quinn clients answer a Retry transparently.
        stats.address_validation();
        if let Err(e) = incoming.retry() {
            e.into_incoming().refuse();
        }
        return;
    }
    if !shared.buckets.admit_ip(remote.ip(), &limits) {
        stats.limit_hit(LimitKind::NewConnectionsPerIp);
        stats.handshake(HandshakeRole::Quic, HandshakeResult::Refused);
        debug!(%remote, "refused a connection: over new_connections_per_ip");
        incoming.refuse();
        return;
    }
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Failed);
            debug!(%remote, "cannot accept a connection: {e}");
            return;
        }
    };
    let handshake = if limits.handshake_timeout.is_zero() {
        Ok(connecting.await)
    } else {
        tokio::time::timeout(limits.handshake_timeout, connecting).await
    };
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Failed);
            debug!(%remote, "handshake failed: {e}");
            return;
        }
        Err(_) => {
            // Dropping the half-done connection abandons it.
            stats.limit_hit(LimitKind::HandshakeTimeout);
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Timeout);
            debug!(%remote, "handshake timed out after {:?}", limits.handshake_timeout);
            return;
        }
    };
    stats.handshake(HandshakeRole::Quic, HandshakeResult::Ok);
    struct Counted<'a>(&'a RelayStats);
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.connection_down();
        }
    }
    stats.connection_up();
    let _counted = Counted(stats);
    let Some(peer) = quic_peer_key(&conn) else {
        // Cannot happen with our verifier, but never serve an unidentified peer.
        conn.close(codes::PROTOCOL, b"no Ed25519 raw public key presented");
        return;
    };
    let ctx = Arc::new(ConnCtx {
        conn: conn.clone(),
        peer,
        conn_id: shared.registry.next_id(),
        has_control: AtomicBool::new(false),
        streams: StreamCredit::new(shared.limits.get().max_streams_per_connection.min(INITIAL_STREAM_CREDIT)),
    });
    debug!(%remote, peer = %peer.fingerprint(), "connection established");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                if let Some(grown) = ctx.streams.opened(shared.limits.get().max_streams_per_connection) {
                    conn.set_max_concurrent_bi_streams(VarInt::from_u32(grown));
                }
                let open = OpenStream(Arc::clone(&ctx));
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    handle_stream(Arc::clone(&open.0), shared, send, recv).await;
                    drop(open);
                });
            }
            Err(e) => {
                debug!(%remote, peer = %peer.fingerprint(), "connection ended: {e}");
                return;
            }
        }
    }
}

/// The refusal reason for a frame that failed to decode.
pub(crate) fn bad_frame_reason(e: &FrameError) -> RefusalReason {
    match e {
        FrameError::UnsupportedVersion { .. } => RefusalReason::UnsupportedVersion,
        _ => RefusalReason::BadFrame,
    }
}

/// Sends a typed refusal, finishes the stream and counts it. Failing to deliver it is not an
/// error worth more than a debug line: the peer is gone.
pub(crate) async fn refuse(
    shared: &Shared,
    send: &mut SendStream,
    peer: &PublicKey,
    reason: RefusalReason,
    message: String,
) {
    shared.stats.refused(reason);
    info!(peer = %peer.fingerprint(), %reason, "refused: {message}");
    let frame = Frame::refused(reason, message);
    match tokio::time::timeout(shared.session_open_timeout, write_frame(send, &frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("could not deliver a refusal: {e}"),
        Err(_) => debug!("could not deliver a refusal in time"),
    }
    let _ = send.finish();
}

async fn handle_stream(ctx: Arc<ConnCtx>, shared: Arc<Shared>, mut send: SendStream, mut recv: RecvStream) {
    let first = match tokio::time::timeout(shared.session_open_timeout, read_frame(&mut recv)).await {
        Ok(first) => first,
        Err(_) => {
            let message =
                format!("no Register or SessionOpen frame within {:?}", shared.session_open_timeout);
            refuse(&shared, &mut send, &ctx.peer, RefusalReason::ProtocolViolation, message).await;
            return;
        }
    };
    match first {
        Ok(Frame::Register { name, allowed_apps, pairing_open }) => {
            crate::hub::run(shared, ctx, send, recv, name, allowed_apps, pairing_open).await;
        }
        Ok(Frame::SessionOpen { hub, hub_key, purpose }) => {
            crate::session::run(shared, ctx, send, recv, hub, hub_key, purpose).await;
        }
        Ok(other) => {
            let message =
                format!("a new stream must start with Register or SessionOpen, not {}", other.name());
            refuse(&shared, &mut send, &ctx.peer, RefusalReason::ProtocolViolation, message).await;
        }
        Err(FrameIoError::Frame(e)) => {
            refuse(&shared, &mut send, &ctx.peer, bad_frame_reason(&e), format!("malformed frame: {e}"))
                .await;
        }
        Err(FrameIoError::Closed) => {
            debug!(peer = %ctx.peer.fingerprint(), "stream closed before its first frame")
        }
        Err(FrameIoError::Io(e)) => {
            debug!(peer = %ctx.peer.fingerprint(), "stream failed before its first frame: {e}")
        }
    }
}

/// Marks the connection as a hub's (one control stream per connection).
pub(crate) fn claim_control(ctx: &ConnCtx) -> bool {
    !ctx.has_control.swap(true, Ordering::AcqRel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_credit_grows_before_it_runs_out_and_stops_at_the_limit() {
        let credit = StreamCredit::new(8);
        let grants: Vec<Option<u32>> = (0..40).map(|_| credit.opened(20)).collect();
        // 6 of 8 open (three quarters): grow to 16; 12 of 16: grow to the limit, 20; then never.
        assert_eq!(grants.iter().position(Option::is_some), Some(5));
        assert_eq!(grants.iter().flatten().copied().collect::<Vec<_>>(), vec![16, 20]);
    }

    #[test]
    fn closed_streams_are_uncounted_and_idle_connections_keep_the_small_credit() {
        let credit = StreamCredit::new(8);
        for _ in 0..100 {
            assert_eq!(credit.opened(256), None, "one stream at a time never needs more credit");
            credit.closed();
        }
        credit.closed(); // never below zero
        assert_eq!(credit.open.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_limit_below_the_initial_credit_is_never_exceeded() {
        let credit = StreamCredit::new(1);
        assert_eq!(credit.opened(1), None);
        assert_eq!(credit.opened(1), None);
    }
}
