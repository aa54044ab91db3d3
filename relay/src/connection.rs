//! One connection, from attempt to end: admission before any handshake work (draining, Retry
//! under load, the per-source rate, the bounds on handshakes in flight of
//! [`crate::handshakes`], the handshake timeouts), the cap on connections not yet authorized
//! right after it, then per-stream dispatch on the stream's first frame:
//! `Register` makes it the hub's control stream ([`crate::hub`]), `ChannelOpen` an app's
//! channel ([`crate::channel_session`]); and, beside the dispatch, the connection's reviews, which
//! close it if it holds nothing authorized ([`crate::standing`]).
//!
//! Every stream gets its own task. TLS admits any valid key; authorization happens per frame,
//! against the current state, so TLS session resumption can never bypass it.

use std::sync::Arc;

use keyway_proto::codec::{kind, kind_name, Header};
use keyway_proto::io::{read_frame_if, FrameIoError};
use keyway_proto::tls::quic_peer_key;
use keyway_proto::{Frame, FrameError, RefusalReason};
use quinn::{RecvStream, SendStream, VarInt};
use std::time::Duration;
use tokio::time::Instant;
use tracing::debug;

use crate::handshakes::NoSlot;
use crate::limits::Limits;
use crate::refusal::{bad_frame_reason, refuse};
use crate::registry::Charged;
use crate::standing::{admission, cut_message, review, Admission, Verdict};
use crate::state::{ConnCtx, Shared};
use crate::stats::{ConnectionRefusal, CutReason, HandshakeResult, HandshakeRole, LimitKind, RelayStats};
use keyway_proto::codes;

/// When a connection with reviews switched off (`unauthorized_grace` 0) looks again whether a
/// reload switched them on.
const REVIEW_OFF_POLL: Duration = Duration::from_secs(60);

/// Decrements the open-stream count when a stream's handler ends, however it ends.
struct OpenStream(Arc<ConnCtx>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.closed();
    }
}

/// Decides what to do with a connection attempt before any handshake work: refuse it while
/// draining; ask for address validation (Retry) from an unvalidated address while attempts
/// arrive faster than `retry_threshold` or `validate_above_handshakes_in_flight` handshakes
/// are in flight; refuse it when its source is over the per-IP rate, then when its source
/// holds `max_handshakes_per_source` handshakes or all `max_handshakes_in_flight` are taken
/// and none may give way to it (see [`crate::handshakes`]); else accept it, under the
/// handshake timeout (shorter for an address not validated).
///
/// A refusal costs one small Initial packet and no crypto beyond the Initial keys, and says
/// nothing on the wire but QUIC `CONNECTION_REFUSED`: from this relay that always means
/// "come back soon" (draining, the source's rate, or a storm's handshakes), and the hub
/// connector retries it within seconds instead of backing off.
pub(crate) async fn handle_incoming(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let now = Instant::now();
    let stats = &shared.stats;
    if shared.is_shutting_down() {
        stats.connection_refused(ConnectionRefusal::Draining);
        incoming.refuse();
        return;
    }
    let limits = shared.limits.get();
    let validated = incoming.remote_address_validated();
    let busy = shared.buckets.over_retry_threshold(&limits, now) | shared.handshakes.need_validation(&limits);
    if busy && !validated && incoming.may_retry() {
        // Stateless for us: a spoofed source never sees the token, so it costs it a round trip
        // and us no handshake. quinn clients answer a Retry transparently.
        stats.address_validation();
        if let Err(e) = incoming.retry() {
            e.into_incoming().refuse();
        }
        return;
    }
    // The source's token before a slot: a source refused for load still spends its rate, so
    // attempts beyond it cost the attacker and hold nothing.
    if !shared.buckets.admit_ip(remote.ip(), &limits, now) {
        stats.limit_hit(LimitKind::NewConnectionsPerIp);
        stats.connection_refused(ConnectionRefusal::NewConnectionsPerIp);
        debug!(%remote, "refused a connection: over new_connections_per_ip");
        incoming.refuse();
        return;
    }
    let slot = match shared.handshakes.start(remote.ip(), validated, &limits) {
        Ok(slot) => slot,
        Err(NoSlot::PerSource) => {
            stats.limit_hit(LimitKind::MaxHandshakesPerSource);
            stats.connection_refused(ConnectionRefusal::HandshakesPerSource);
            debug!(%remote, "refused a connection: its source has max_handshakes_per_source in flight");
            incoming.refuse();
            return;
        }
        Err(NoSlot::InFlight) => {
            // Past the cap a storm would only queue handshakes beyond the hubs' patience.
            stats.limit_hit(LimitKind::MaxHandshakesInFlight);
            stats.connection_refused(ConnectionRefusal::HandshakesInFlight);
            debug!(%remote, "refused a connection: max_handshakes_in_flight handshakes are in flight");
            incoming.refuse();
            return;
        }
    };
    if slot.evicted_another {
        stats.limit_hit(LimitKind::MaxHandshakesInFlight);
    }
    stats.set_handshakes_in_flight(shared.handshakes.in_flight());
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            drop(slot);
            stats.set_handshakes_in_flight(shared.handshakes.in_flight());
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Failed);
            debug!(%remote, "cannot accept a connection: {e}");
            return;
        }
    };
    let (timeout, timeout_limit) = handshake_timeout(&limits, validated);
    let handshake = tokio::select! {
        handshake = async {
            match timeout {
                Some(timeout) => tokio::time::timeout(timeout, connecting).await,
                None => Ok(connecting.await),
            }
        } => Some(handshake),
        () = slot.evicted() => None,
    };
    drop(slot);
    stats.set_handshakes_in_flight(shared.handshakes.in_flight());
    let conn = match handshake {
        Some(Ok(Ok(conn))) => conn,
        Some(Ok(Err(e))) => {
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Failed);
            debug!(%remote, "handshake failed: {e}");
            return;
        }
        Some(Err(_)) => {
            // Dropping the half-done connection abandons it.
            stats.limit_hit(timeout_limit);
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Timeout);
            debug!(%remote, "handshake timed out after {timeout:?}");
            return;
        }
        None => {
            stats.handshake(HandshakeRole::Quic, HandshakeResult::Evicted);
            debug!(%remote, "handshake gave its slot to a validated attempt");
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
    let limits = shared.limits.get();
    let known = || shared.names.knows_key(&peer) || shared.registry.lists(&peer);
    let pending = match admission(shared.unauthorized.count(), limits.max_unauthorized_connections, known) {
        Admission::Counted => Some(shared.unauthorized.count_one()),
        Admission::Known => None,
        Admission::Refused => {
            stats.limit_hit(LimitKind::MaxUnauthorizedConnections);
            debug!(%remote, peer = %peer.fingerprint(), "closed a stranger: over max_unauthorized_connections");
            let reason = format!(
                "this relay already holds {} connections not yet authorized, its \
                 max_unauthorized_connections limit; try again in a moment",
                limits.max_unauthorized_connections
            );
            conn.close(codes::LIMIT, reason.as_bytes());
            return;
        }
    };
    let ctx = Arc::new(ConnCtx::new(
        conn.clone(),
        peer,
        shared.registry.next_id(),
        limits.max_streams_per_connection,
        pending,
    ));
    debug!(%remote, peer = %peer.fingerprint(), "connection established");
    let next_review = |limits: &crate::limits::Limits| {
        let grace =
            if limits.unauthorized_grace.is_zero() { REVIEW_OFF_POLL } else { limits.unauthorized_grace };
        // Limits are validated to at most a year; saturate anyway rather than panic.
        let now = Instant::now();
        now.checked_add(grace).unwrap_or(now + crate::limits::MAX_DURATION)
    };
    let review_at = tokio::time::sleep_until(next_review(&limits));
    tokio::pin!(review_at);
    drop(limits);
    // The idle connection's charge to a hub that lists its key, while it has one.
    let mut charged: Option<Charged> = None;
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            () = &mut review_at => {
                let limits = shared.limits.get();
                if let Some(reason) = review_connection(&shared, &ctx, &mut charged, &limits) {
                    stats.closed_unauthorized(reason);
                    debug!(%remote, peer = %peer.fingerprint(), reason = reason.label(), "closed a connection holding nothing authorized");
                    conn.close(codes::LIMIT, cut_message(reason));
                    return;
                }
                review_at.as_mut().reset(next_review(&limits));
                continue;
            }
        };
        match accepted {
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

/// One review of a connection under `limits` (see [`crate::standing`]): why to close it, or
/// `None` to keep it, keeping `charged` (its idle charge to a hub) up to date.
fn review_connection(
    shared: &Shared,
    ctx: &ConnCtx,
    charged: &mut Option<Charged>,
    limits: &crate::limits::Limits,
) -> Option<CutReason> {
    if limits.unauthorized_grace.is_zero() {
        return None;
    }
    let listing = || shared.registry.charge_idle(charged, &ctx.peer, limits.max_idle_apps_per_hub);
    match review(ctx.standing.live(), ctx.standing.take_recent(), listing) {
        Verdict::Active => {
            // Busy, so not idle: it needs no hub's idle budget.
            *charged = None;
            None
        }
        Verdict::Listed => {
            ctx.standing.authorized();
            None
        }
        Verdict::Cut(reason) => Some(reason),
    }
}

/// Reads a stream's first frame (within `session_open_timeout`) and hands the stream to the
/// driver that frame names. The header decides before any payload is read: a `ChannelOpen`
/// (at most 105 bytes), or a `Register` on the one stream that claims the connection's
/// control; anything else is refused unread, so a peer cannot make the relay buffer a large
/// frame on every stream it opens.
async fn handle_stream(ctx: Arc<ConnCtx>, shared: Arc<Shared>, mut send: SendStream, mut recv: RecvStream) {
    let check = |header: &Header| match header.kind {
        kind::CHANNEL_OPEN => Ok(()),
        kind::REGISTER if ctx.claim_control() => Ok(()),
        kind::REGISTER => Err(FrameError::Unexpected { expected: "ChannelOpen", got: "Register" }),
        other => Err(FrameError::Unexpected {
            expected: "Register or ChannelOpen",
            got: kind_name(other).unwrap_or("an unknown frame"),
        }),
    };
    let read = read_frame_if(&mut recv, check);
    let first = match tokio::time::timeout(shared.session_open_timeout, read).await {
        Ok(first) => first,
        Err(_) => {
            let message =
                format!("no Register or ChannelOpen frame within {:?}", shared.session_open_timeout);
            refuse(&shared, &mut send, &ctx.peer, RefusalReason::ProtocolViolation, message).await;
            return;
        }
    };
    match first {
        Ok(Frame::Register { name, allowed_apps, pairing_open }) => {
            crate::hub::run(shared, ctx, send, recv, name, allowed_apps, pairing_open).await;
        }
        Ok(Frame::ChannelOpen { hub, hub_key, purpose, channel }) => {
            let request =
                crate::channel_session::Request { name: hub, pinned: hub_key, purpose, app_id: channel };
            crate::channel_session::run(shared, ctx, send, recv, request).await;
        }
        Ok(other) => {
            let message =
                format!("a new stream must start with Register or ChannelOpen, not {}", other.name());
            refuse(&shared, &mut send, &ctx.peer, RefusalReason::ProtocolViolation, message).await;
        }
        Err(FrameIoError::Frame(FrameError::Unexpected { expected: "ChannelOpen", got: "Register" })) => {
            shared.stats.handshake(HandshakeRole::Hub, HandshakeResult::Refused);
            let message = "this connection already has a control stream; a hub registers once per connection";
            refuse(&shared, &mut send, &ctx.peer, RefusalReason::ProtocolViolation, message.into()).await;
        }
        Err(FrameIoError::Frame(FrameError::Unexpected { got, .. })) => {
            let message = format!("a new stream must start with Register or ChannelOpen, not {got}");
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

/// How long a handshake may take, and the limit that ends it: `handshake_timeout`, or for an
/// address not validated by a Retry the shorter `unvalidated_handshake_timeout`. `None`: no
/// timeout of the relay's own (QUIC's idle timeout still ends it).
fn handshake_timeout(limits: &Limits, validated: bool) -> (Option<Duration>, LimitKind) {
    let full = (!limits.handshake_timeout.is_zero()).then_some(limits.handshake_timeout);
    let short = (!validated && !limits.unvalidated_handshake_timeout.is_zero())
        .then_some(limits.unvalidated_handshake_timeout);
    match (full, short) {
        (Some(full), Some(short)) if short < full => (Some(short), LimitKind::UnvalidatedHandshakeTimeout),
        (None, Some(short)) => (Some(short), LimitKind::UnvalidatedHandshakeTimeout),
        (full, _) => (full, LimitKind::HandshakeTimeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unvalidated_address_gets_the_shorter_timeout() {
        let s = Duration::from_secs;
        let l = |full, short| Limits {
            handshake_timeout: s(full),
            unvalidated_handshake_timeout: s(short),
            ..Limits::default()
        };
        assert_eq!(handshake_timeout(&l(10, 3), false), (Some(s(3)), LimitKind::UnvalidatedHandshakeTimeout));
        assert_eq!(handshake_timeout(&l(10, 3), true), (Some(s(10)), LimitKind::HandshakeTimeout));
        assert_eq!(
            handshake_timeout(&l(2, 3), false),
            (Some(s(2)), LimitKind::HandshakeTimeout),
            "never longer"
        );
        assert_eq!(handshake_timeout(&l(0, 3), false), (Some(s(3)), LimitKind::UnvalidatedHandshakeTimeout));
        assert_eq!(handshake_timeout(&l(10, 0), false), (Some(s(10)), LimitKind::HandshakeTimeout));
        assert_eq!(handshake_timeout(&l(0, 0), false), (None, LimitKind::HandshakeTimeout));
    }
}
