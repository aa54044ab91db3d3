//! An app's v1 session: the authorization checks (in the protocol's order, before the hub hears
//! anything) and the announce to the hub, both shared with v2 channels ([`crate::introduce`]),
//! relaying the hub's answer, then the splice.

use std::net::SocketAddr;
use std::sync::Arc;

use keyway_proto::io::write_frame;
use keyway_proto::{Frame, HubName, PublicKey, SessionPurpose};
use quinn::{RecvStream, SendStream};
use tracing::debug;

use crate::access::Enrolled;
use crate::introduce::{announce, answer, authorize, revocation};
use crate::refusal::refuse;
use crate::splice::{splice, SpliceCtx};
use crate::state::{ConnCtx, Shared};
use crate::stats::{HandshakeResult, HandshakeRole};
use keyway_proto::codes;

/// The app's address as the hub should see it: IPv4-mapped IPv6 (from a dual-stack socket)
/// becomes plain IPv4.
pub(crate) fn observed(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// How a session request ended, for `sessions_opened_total` and `handshakes_total{role="app"}`.
enum Setup {
    /// Spliced (counted when the splice started).
    Spliced,
    /// Answered with a typed refusal.
    Refused,
    /// A peer went away before the splice.
    Failed,
}

/// Handles a stream whose first frame was `SessionOpen`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    app_send: SendStream,
    app_recv: RecvStream,
    name: HubName,
    pinned: PublicKey,
    purpose: SessionPurpose,
) {
    let stats = Arc::clone(&shared.stats);
    match setup_and_splice(shared, ctx, app_send, app_recv, name, pinned, purpose).await {
        Setup::Spliced => {}
        Setup::Refused => {
            stats.session_not_opened(true);
            stats.handshake(HandshakeRole::App, HandshakeResult::Refused);
        }
        Setup::Failed => {
            stats.session_not_opened(false);
            stats.handshake(HandshakeRole::App, HandshakeResult::Failed);
        }
    }
}

async fn setup_and_splice(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut app_send: SendStream,
    app_recv: RecvStream,
    name: HubName,
    pinned: PublicKey,
    purpose: SessionPurpose,
) -> Setup {
    let app = ctx.peer;
    let started = tokio::time::Instant::now();
    let (hub, Enrolled { guard, revoked }) = match authorize(&shared, &app, &name, &pinned, purpose) {
        Ok(authorized) => authorized,
        Err(refusal) => {
            refuse(&shared, &mut app_send, &app, refusal.reason, refusal.message).await;
            return Setup::Refused;
        }
    };
    // An authorized session keeps the app's connection (see `standing`) while it lives.
    let _authorized = ctx.standing.hold();
    let revoked = revocation(revoked);
    tokio::pin!(revoked);
    let frame =
        Frame::SessionAnnounce { app_key: app, observed: observed(ctx.conn.remote_address()), purpose };
    let introduced =
        announce(&shared, &hub, &app, frame, Frame::SessionAccepted, "session announce", revoked.as_mut())
            .await;
    let (mut hub_send, hub_recv) = match introduced {
        Ok(streams) => streams,
        Err(unanswered) => {
            answer(&shared, &mut app_send, &app, &name, unanswered).await;
            return Setup::Refused;
        }
    };
    if let Err(e) = write_frame(&mut app_send, &Frame::SessionAccepted).await {
        debug!("app went away before the session was spliced: {e}");
        let _ = hub_send.reset(codes::NORMAL);
        return Setup::Failed;
    }
    shared.stats.setup_time(started.elapsed());
    shared.stats.handshake(HandshakeRole::App, HandshakeResult::Ok);
    debug!(hub = %name, app = %app.fingerprint(), ?purpose, "session spliced");
    let limits = shared.limits.get();
    let buckets = if limits.bytes_per_second_per_key > 0 {
        // Both ends' keys pay for every byte: neither a greedy app nor a greedy hub can take
        // more than its share of the relay, however many sessions it opens.
        let now = tokio::time::Instant::now();
        vec![shared.buckets.key_bucket(&app, &limits, now), shared.buckets.key_bucket(&hub.key, &limits, now)]
    } else {
        Vec::new()
    };
    let ctx = SpliceCtx { stats: &shared.stats, tap: shared.tap.as_ref(), limits: &shared.limits, buckets };
    // Held until the splice ends: a graceful shutdown waits for it (within its deadline).
    let live = shared.sessions.track();
    let end = splice((app_send, app_recv), (hub_send, hub_recv), ctx, revoked).await;
    drop(live);
    debug!(hub = %name, app = %app.fingerprint(), ?end, "session ended");
    drop(guard);
    Setup::Spliced
}
