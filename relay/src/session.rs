//! An app's session: the authorization checks (in the protocol's order, before the hub hears
//! anything), the announce to the hub, relaying the hub's answer, then the splice.

use std::net::SocketAddr;
use std::sync::Arc;

use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::{Frame, HubName, PublicKey, RefusalReason, SessionPurpose};
use quinn::{RecvStream, SendStream};
use tracing::{debug, info};

use crate::access::{Enrolled, SessionCaps};
use crate::policy::{decide_session, Refusal};
use crate::refusal::refuse;
use crate::splice::{splice, SpliceCtx};
use crate::state::{ConnCtx, Shared};
use crate::stats::{HandshakeResult, HandshakeRole};
use keyway_proto::codes;

/// The app's address as the hub should see it: IPv4-mapped IPv6 (from a dual-stack socket)
/// becomes plain IPv4.
fn observed(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Why announcing a session to the hub failed.
enum AnnounceError {
    Io(String),
    Bad(String),
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
    if shared.is_shutting_down() {
        let message = "the relay is shutting down; try again in a moment".to_owned();
        refuse(&shared, &mut app_send, &app, RefusalReason::ShuttingDown, message).await;
        return Setup::Refused;
    }
    // Authorization against the current state (never what the handshake saw: resumption).
    let bound = shared.names.binding(&name);
    let session_id = shared.registry.next_id();
    let hub = shared.registry.get(&name);
    let decision = match &hub {
        Some(hub) => hub.access.enrol(
            bound.as_ref(),
            &pinned,
            &app,
            purpose,
            session_id,
            SessionCaps::from(&*shared.limits.get()),
        ),
        None => {
            Err(decide_session(&name, bound.as_ref(), &pinned, None, &app, purpose).err().unwrap_or_else(
                || Refusal::new(RefusalReason::HubOffline, format!("hub {name} is not connected")),
            ))
        }
    };
    let (hub, Enrolled { guard, revoked }) = match (hub, decision) {
        (Some(hub), Ok(enrolled)) => (hub, enrolled),
        (_, Err(refusal)) => {
            // A cap's refusal was counted by `enrol` itself.
            refuse(&shared, &mut app_send, &app, refusal.reason, refusal.message).await;
            return Setup::Refused;
        }
        (None, Ok(_)) => return Setup::Failed, // unreachable: no hub, no enrolment
    };
    // Fires only on an actual revocation, not when the hub entry (and its sender) goes away.
    let revoked = async move {
        if revoked.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(revoked);

    let timeout = shared.session_open_timeout;
    let opened = tokio::time::timeout(timeout, hub.conn.open_bi()).await;
    let (mut hub_send, mut hub_recv) = match opened {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            let message = format!("hub {name} went offline: {e}");
            refuse(&shared, &mut app_send, &app, RefusalReason::HubOffline, message).await;
            return Setup::Refused;
        }
        Err(_) => {
            let message = format!("hub {name} has no stream free for a new session within {timeout:?}");
            refuse(&shared, &mut app_send, &app, RefusalReason::OverLimit, message).await;
            return Setup::Refused;
        }
    };
    let announce =
        Frame::SessionAnnounce { app_key: app, observed: observed(ctx.conn.remote_address()), purpose };
    let exchange = async {
        write_frame(&mut hub_send, &announce).await.map_err(|e| AnnounceError::Io(e.to_string()))?;
        read_frame(&mut hub_recv).await.map_err(|e| match e {
            FrameIoError::Frame(e) => AnnounceError::Bad(e.to_string()),
            e => AnnounceError::Io(e.to_string()),
        })
    };
    let answer = tokio::select! {
        answer = tokio::time::timeout(timeout, exchange) => answer,
        () = &mut revoked => {
            let _ = hub_send.reset(codes::REVOKED);
            let _ = hub_recv.stop(codes::REVOKED);
            let message = format!("hub {name} revoked app key {}", app.fingerprint());
            refuse(&shared, &mut app_send, &app, RefusalReason::AppNotAuthorized, message).await;
            return Setup::Refused;
        }
    };
    match answer {
        Ok(Ok(Frame::SessionAccepted)) => {}
        Ok(Ok(Frame::Refused { reason, message })) => {
            // The hub's own refusal goes to the app verbatim (and is counted like ours).
            shared.stats.refused(reason);
            info!(hub = %name, app = %app.fingerprint(), %reason, "hub refused a session: {message}");
            if let Err(e) = write_frame(&mut app_send, &Frame::Refused { reason, message }).await {
                debug!("could not pass the hub's refusal on: {e}");
            }
            let _ = app_send.finish();
            return Setup::Refused;
        }
        Ok(Ok(other)) => {
            let _ = hub_send.reset(codes::PROTOCOL);
            let message = format!("hub {name} answered the session announce with {}", other.name());
            refuse(&shared, &mut app_send, &app, RefusalReason::ProtocolViolation, message).await;
            return Setup::Refused;
        }
        Ok(Err(AnnounceError::Bad(e))) => {
            let _ = hub_send.reset(codes::PROTOCOL);
            let message = format!("hub {name} answered with a malformed frame: {e}");
            refuse(&shared, &mut app_send, &app, RefusalReason::ProtocolViolation, message).await;
            return Setup::Refused;
        }
        Ok(Err(AnnounceError::Io(e))) => {
            let message = format!("hub {name} went offline during the session announce: {e}");
            refuse(&shared, &mut app_send, &app, RefusalReason::HubOffline, message).await;
            return Setup::Refused;
        }
        Err(_) => {
            let _ = hub_send.reset(codes::NORMAL);
            let _ = hub_recv.stop(codes::NORMAL);
            let message = format!("hub {name} did not answer the session announce within {timeout:?}");
            refuse(&shared, &mut app_send, &app, RefusalReason::HubOffline, message).await;
            return Setup::Refused;
        }
    }
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
