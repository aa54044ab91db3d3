//! An app's session: a channel between the app and the hub whose end-to-end QUIC packets the
//! relay forwards without reading them (`docs/protocol.md`).
//!
//! On `ChannelOpen` the relay authorizes and enrols the request ([`crate::introduce`]), draws
//! the hub side's random channel id (the app chose its own), puts the channel in the forwarding
//! table and sends on the app's first flight if it was held ([`Channels::release_held`]),
//! announces the channel to the hub (`ChannelAnnounce` with the hub's id), and on
//! `ChannelAccepted` answers the app `ChannelReady` (on a refusal the channel leaves the table). From then on the
//! packets never pass through here (the socket forwards them, [`crate::forward`]); this task
//! only holds the two channel streams, app↔relay and relay↔hub, for the channel's life, and
//! ends the channel when one of them ends, either connection closes, the app key is revoked,
//! the hub is replaced or no packet moved for `idle_session_timeout`. Then the channel leaves
//! the table and the other stream is reset with the code that says why. When a graceful
//! shutdown starts it writes one `GoAway` on the app's channel stream: the app then closes
//! its end-to-end connection once its open streams are done, which ends the channel.

use std::sync::Arc;
use std::time::Duration;

use keyway_proto::channel::ChannelId;
use keyway_proto::io::write_frame;
use keyway_proto::{Frame, HubName, PublicKey, RefusalReason, SessionPurpose};
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use tokio::time::Instant;
use tracing::debug;

use crate::access::Enrolled;
use crate::channel::Leg;
use crate::channels::Channels;
use crate::introduce::observed;
use crate::introduce::{announce, answer, authorize, revocation};
use crate::refusal::refuse;
use crate::state::{ConnCtx, Shared};
use crate::stats::{HandshakeResult, HandshakeRole, LimitKind};
use keyway_proto::codes;

/// What the app's channel stream is told when a graceful shutdown starts.
const DRAIN_MESSAGE: &str =
    "the relay is restarting or shutting down; finish the streams on this connection, then close it";

/// Longest the idle watchdog sleeps before re-reading the limits (a reload may change them).
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// How a channel request ended, for `sessions_opened_total` and `handshakes_total{role="app"}`.
enum Setup {
    /// The channel was live (counted when it went into the table).
    Held,
    /// Answered with a typed refusal.
    Refused,
    /// A peer went away before the channel was ready.
    Failed,
    /// Sent to the cluster node that holds the hub (counted by the cluster's metrics).
    Redirected,
}

/// What a `ChannelOpen` asks for.
pub(crate) struct Request {
    pub name: HubName,
    /// The hub key the app pinned.
    pub pinned: PublicKey,
    pub purpose: SessionPurpose,
    /// The app's own id for the channel.
    pub app_id: ChannelId,
}

/// Handles a stream whose first frame was `ChannelOpen`.
pub(crate) async fn run(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    app_send: SendStream,
    app_recv: RecvStream,
    request: Request,
) {
    let stats = Arc::clone(&shared.stats);
    match setup_and_hold(shared, ctx, app_send, app_recv, request).await {
        Setup::Held | Setup::Redirected => {}
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

/// A channel in the forwarding table; removed when this is dropped, however the channel ends.
struct Listed {
    channels: Arc<Channels>,
    app_id: ChannelId,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.channels.table().remove(self.app_id);
    }
}

/// The hub side's id: one no live channel uses and not the app's (64 random bits: a clash is a
/// 2^-64 event per channel, but it costs nothing to rule out here; the insert checks again).
fn draw_hub_id(channels: &Channels, app_id: ChannelId) -> Result<ChannelId, getrandom::Error> {
    loop {
        let hub = ChannelId::random()?;
        if hub != app_id && !channels.table().contains(hub) {
            return Ok(hub);
        }
    }
}

async fn setup_and_hold(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut app_send: SendStream,
    mut app_recv: RecvStream,
    request: Request,
) -> Setup {
    let Request { name, pinned, purpose, app_id } = request;
    let app = ctx.peer;
    let started = Instant::now();
    let (hub, Enrolled { guard, revoked }) = match authorize(&shared, &app, &name, &pinned, purpose) {
        Ok(authorized) => authorized,
        Err(refusal) => {
            let elsewhere = match &shared.cluster {
                Some(cluster) => cluster.elsewhere(&name, &app, purpose, refusal).await,
                None => Err(refusal),
            };
            let refusal = match elsewhere {
                Ok(node) => {
                    // The node that holds the hub checks everything; this answer grants nothing.
                    let _ = write_frame(&mut app_send, &Frame::Redirect { node }).await;
                    let _ = app_send.finish();
                    return Setup::Redirected;
                }
                Err(refusal) => refusal,
            };
            refuse(&shared, &mut app_send, &app, refusal.reason, refusal.message).await;
            return Setup::Refused;
        }
    };
    // An authorized channel keeps the app's connection (see `standing`) while it lives.
    let _authorized = ctx.standing.hold();
    let revoked = revocation(revoked);
    tokio::pin!(revoked);
    let hub_id = match draw_hub_id(&shared.channels, app_id) {
        Ok(id) => id,
        Err(e) => {
            let message = format!("the relay cannot draw a channel id: {e}");
            refuse(&shared, &mut app_send, &app, RefusalReason::Internal, message).await;
            return Setup::Refused;
        }
    };
    let limits = shared.limits.get();
    let buckets = (limits.bytes_per_second_per_key > 0).then(|| {
        // The app key and the (hub, app) pair pay for every forwarded byte: an app gets no more
        // than the rate however many channels it opens, and no app can spend what its hub's
        // other apps are owed.
        let now = Instant::now();
        shared.buckets.channel_buckets(&app, &hub.key, &limits, now)
    });
    // Listed before the hub is asked, so the app's first flight (sent with its `ChannelOpen`,
    // held meanwhile) reaches the hub with the announce instead of a round trip after it; the
    // hub holds it until it has bound the channel, and drops it if it refuses. A refusal by
    // the hub unlists the channel again (`Listed` drops).
    let legs = (Leg::new(app_id, ctx.conn.clone()), Leg::new(hub_id, hub.conn.clone()));
    let inserted = shared.channels.table().insert(legs.0, legs.1, buckets, Instant::now());
    if let Err(e) = inserted {
        // The app's id is taken by a live channel: a 2^-64 accident, or an app reusing one.
        let message = format!("the relay cannot list the channel: {e}; draw another id");
        refuse(&shared, &mut app_send, &app, RefusalReason::ProtocolViolation, message).await;
        return Setup::Refused;
    }
    let listed = Listed { channels: Arc::clone(&shared.channels), app_id };
    shared.channels.release_held(ctx.conn.remote_address(), app_id);
    let frame = Frame::ChannelAnnounce {
        app_key: app,
        observed: observed(ctx.conn.remote_address()),
        purpose,
        channel: hub_id,
    };
    let introduced =
        announce(&shared, &hub, &app, frame, Frame::ChannelAccepted, "channel announce", revoked.as_mut())
            .await;
    let (mut hub_send, mut hub_recv) = match introduced {
        Ok(streams) => streams,
        Err(unanswered) => {
            drop(listed);
            answer(&shared, &mut app_send, &app, &name, unanswered).await;
            return Setup::Refused;
        }
    };
    if let Err(e) = write_frame(&mut app_send, &Frame::ChannelReady { channel: app_id }).await {
        debug!("app went away before its channel was ready: {e}");
        let _ = hub_send.reset(codes::NORMAL);
        return Setup::Failed;
    }
    shared.stats.setup_time(started.elapsed());
    shared.stats.handshake(HandshakeRole::App, HandshakeResult::Ok);
    shared.stats.channel_up();
    debug!(hub = %name, app = %app.fingerprint(), ?purpose, channel = %app_id, "channel ready");
    // Held until the channel ends: a graceful shutdown waits for it (within its deadline).
    let live = shared.sessions.track();
    let mut draining = shared.shutdown.subscribe();
    let mut told = false;
    let cut = loop {
        // Every branch is cancel-safe (reads of one byte, `stopped`, timers), so the loop
        // re-creates them after the drain's `GoAway` went out.
        tokio::select! {
            end = ended(&mut app_recv, &mut app_send) => break Cut::App(end),
            end = ended(&mut hub_recv, &mut hub_send) => break Cut::Hub(end),
            () = &mut revoked => break Cut::Revoked,
            () = idle(&shared, app_id) => break Cut::Idle,
            () = async { let _ = draining.wait_for(|draining| *draining).await; }, if !told => {
                // A graceful shutdown started: the app finishes its streams on this connection
                // and then closes it, so the drain need not wait its deadline for an app that
                // only keeps a warm connection. Apps dial anew on demand: no delay to hint.
                told = true;
                let frame = Frame::GoAway { retry_after_ms: 0, message: DRAIN_MESSAGE.to_owned() };
                if let Err(e) = write_frame(&mut app_send, &frame).await {
                    debug!(channel = %app_id, "cannot tell the app the relay is draining: {e}");
                }
            }
        }
    };
    drop(listed);
    let (app_code, hub_code) = match cut {
        Cut::App(end) => (end.code(), codes::NORMAL),
        Cut::Hub(end) => {
            // A hub whose connection went because a newer one took its name was replaced.
            let replaced = matches!(end, Ended::ConnectionLost)
                && shared.registry.get(&name).is_some_and(|current| current.conn_id != hub.conn_id);
            (if replaced { codes::REPLACED } else { codes::NORMAL }, end.code())
        }
        Cut::Revoked => (codes::REVOKED, codes::REVOKED),
        Cut::Idle => {
            shared.stats.limit_hit(LimitKind::IdleSessionTimeout);
            (codes::LIMIT, codes::LIMIT)
        }
    };
    for (send, recv, code) in
        [(&mut app_send, &mut app_recv, app_code), (&mut hub_send, &mut hub_recv, hub_code)]
    {
        let _ = send.reset(code);
        let _ = recv.stop(code);
    }
    shared.stats.channel_down();
    drop(live);
    debug!(hub = %name, app = %app.fingerprint(), channel = %app_id, ?cut, "channel ended");
    drop(guard);
    Setup::Held
}

/// Why a channel ended.
#[derive(Debug)]
enum Cut {
    /// The app's channel stream ended.
    App(Ended),
    /// The hub's channel stream ended.
    Hub(Ended),
    /// The app key was revoked.
    Revoked,
    /// No packet moved for `idle_session_timeout`.
    Idle,
}

/// How one channel stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The peer finished, reset or stopped it.
    Closed,
    /// The peer's connection went away.
    ConnectionLost,
    /// The peer sent bytes on it, which the protocol does not allow after the set-up.
    Violated,
}

impl Ended {
    /// The code to end the ending side's own stream with.
    fn code(self) -> VarInt {
        match self {
            Self::Closed | Self::ConnectionLost => codes::NORMAL,
            Self::Violated => codes::PROTOCOL,
        }
    }
}

/// Resolves when the peer ends its channel stream (either direction) or its connection.
async fn ended(recv: &mut RecvStream, send: &mut SendStream) -> Ended {
    let mut byte = [0u8; 1];
    tokio::select! {
        read = recv.read(&mut byte) => match read {
            Ok(None) => Ended::Closed,
            Ok(Some(_)) => Ended::Violated,
            Err(ReadError::ConnectionLost(_)) => Ended::ConnectionLost,
            Err(_) => Ended::Closed,
        },
        stopped = send.stopped() => match stopped {
            Err(quinn::StoppedError::ConnectionLost(_)) => Ended::ConnectionLost,
            _ => Ended::Closed,
        },
    }
}

/// Resolves once the channel has moved no packet for the (current) idle session timeout.
async fn idle(shared: &Shared, app_id: ChannelId) {
    loop {
        let timeout = shared.limits.get().idle_session_timeout;
        let now = Instant::now();
        let last = shared.channels.table().last_moved(app_id);
        let Some(last) = last else {
            // Not listed (cannot happen while this task holds it): nothing to watch.
            return std::future::pending().await;
        };
        if timeout.is_zero() {
            tokio::time::sleep(IDLE_RECHECK).await;
            continue;
        }
        let Some(deadline) = last.checked_add(timeout) else {
            // Beyond the clock's range (limits are validated to at most a year): never idle.
            tokio::time::sleep(IDLE_RECHECK).await;
            continue;
        };
        if now >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.min(now + IDLE_RECHECK)).await;
    }
}
