//! A hub's control stream: registration under the name policy, replacement of an older
//! connection, `AllowList` and `Ping` handling, and the relay's own `GoAway` / revocation.
//!
//! The control task owns the stream's send half; anything else that needs to talk to the hub
//! (shutdown, a reload that revokes the name) sends it a [`ControlCommand`]. It waits for the
//! hub's next frame and for commands in one `select!`, reading through a
//! [`FrameReader`], which is cancel-safe: a command arriving mid-frame loses nothing, the next
//! turn continues the same frame.

use std::sync::Arc;
use std::time::Duration;

use keyway_proto::io::{write_frame, FrameIoError, FrameReader};
use keyway_proto::{Frame, HubName, PublicKey, RefusalReason};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::refusal::{bad_frame_reason, refuse};
use crate::registry::{ControlCommand, Hub};
use crate::state::{ConnCtx, Shared};
use crate::stats::{HandshakeResult, HandshakeRole, LimitKind};
use keyway_proto::codes;

/// How long the relay waits for a last control frame (GoAway, refusal) to be acknowledged
/// before it closes the connection, which would otherwise discard it.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Finishes `send`, waits (bounded) until the peer has it all, then closes the connection.
async fn flush_then_close(send: &mut SendStream, conn: &quinn::Connection, code: VarInt, reason: &[u8]) {
    let _ = send.finish();
    let _ = tokio::time::timeout(FLUSH_GRACE, send.stopped()).await;
    conn.close(code, reason);
}

/// Handles a stream whose first frame was `Register` (the one that claimed the connection's
/// control, see `connection::handle_stream`).
pub(crate) async fn run(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut send: SendStream,
    recv: RecvStream,
    name: HubName,
    allowed_apps: Vec<PublicKey>,
    pairing_open: bool,
) {
    let peer = ctx.peer;
    let refused = || shared.stats.handshake(HandshakeRole::Hub, HandshakeResult::Refused);
    if shared.is_shutting_down() {
        refused();
        let message = "the relay is shutting down; register again in a moment".to_owned();
        refuse(&shared, &mut send, &peer, RefusalReason::ShuttingDown, message).await;
        return;
    }
    let max_hubs = shared.limits.get().max_hubs;
    // A hub replacing its own registration never counts against the limit: it must always
    // be able to come back. (Concurrent registrations may overshoot by a few; it is a guard
    // against exhaustion, not an accounting rule.)
    let full =
        || max_hubs > 0 && shared.registry.get(&name).is_none() && shared.registry.len() >= max_hubs as usize;
    let over_max_hubs = || format!("this relay already has {max_hubs} hubs registered, its max_hubs limit");
    // Under the open policy the limit comes before the name is claimed: a claim is written
    // for good, so a refused registration must not leave one behind.
    if shared.names.is_open() && full() {
        shared.stats.limit_hit(LimitKind::MaxHubs);
        refused();
        refuse(&shared, &mut send, &peer, RefusalReason::OverLimit, over_max_hubs()).await;
        return;
    }
    // Open policy in a cluster: the first key wins across every node, not only this one.
    if let Some(cluster) = shared.cluster.as_ref().filter(|_| shared.names.is_open()) {
        if let Err(refusal) = cluster.admit_binding(&name, &peer).await {
            refused();
            refuse(&shared, &mut send, &peer, refusal.reason, refusal.message).await;
            return;
        }
    }
    let admission = match shared.names.admit(&name, &peer) {
        Ok(admission) => admission,
        Err(refusal) => {
            refused();
            refuse(&shared, &mut send, &peer, refusal.reason, refusal.message).await;
            return;
        }
    };
    if full() {
        shared.stats.limit_hit(LimitKind::MaxHubs);
        refused();
        refuse(&shared, &mut send, &peer, RefusalReason::OverLimit, over_max_hubs()).await;
        return;
    }
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let apps = allowed_apps.len();
    let hub = Arc::new(Hub::new(
        name.clone(),
        peer,
        ctx.conn.clone(),
        ctx.conn_id,
        allowed_apps,
        pairing_open,
        commands_tx,
        Arc::clone(&shared.stats),
    ));
    let old = shared.registry.insert(Arc::clone(&hub));
    let replaced = old.is_some();
    if let Some(old) = old {
        // Newest connection wins, at once: a stale tunnel must never lock the hub out.
        old.conn.close(codes::REPLACED, b"replaced by a newer connection of the same hub");
    }
    // A reload may have swept the table between our admission and the insert.
    if shared.names.binding(&name) != Some(peer) {
        shared.registry.remove_if_current(&name, ctx.conn_id);
        refused();
        let message = format!("hub name {name} is no longer authorized for this key at this relay");
        refuse(&shared, &mut send, &peer, RefusalReason::NameNotAuthorized, message).await;
        return;
    }
    // A live registration keeps the connection (see `standing`), until this function returns.
    let _registered = ctx.standing.hold();
    // Newest connection wins across nodes too: the claim drops an older tunnel elsewhere.
    if let Some(cluster) = &shared.cluster {
        cluster.claim(&name, ctx.conn_id).await;
    }
    shared.stats.registered(replaced);
    info!(
        hub = %name,
        key = %peer.fingerprint(),
        remote = %ctx.conn.remote_address(),
        replaced,
        apps,
        pairing_open,
        ?admission,
        "hub registered"
    );
    if let Err(e) = write_frame(&mut send, &Frame::Registered { replaced }).await {
        shared.stats.handshake(HandshakeRole::Hub, HandshakeResult::Failed);
        debug!(hub = %name, "could not confirm the registration: {e}");
    } else {
        shared.stats.handshake(HandshakeRole::Hub, HandshakeResult::Ok);
        control_loop(&shared, &hub, &mut send, recv, commands).await;
    }
    if shared.registry.remove_if_current(&name, ctx.conn_id).is_some() {
        info!(hub = %name, key = %peer.fingerprint(), "hub disconnected");
    }
    if let Some(cluster) = &shared.cluster {
        cluster.release(&name, ctx.conn_id).await;
    }
}

/// Serves the control stream until it ends, errs, or the relay tells the hub to go.
async fn control_loop(
    shared: &Shared,
    hub: &Hub,
    send: &mut SendStream,
    recv: RecvStream,
    mut commands: mpsc::UnboundedReceiver<ControlCommand>,
) {
    // The reader keeps a half-read frame across turns of the loop, so `select!` may drop the
    // read whenever a command wins. (A reader task and a channel per hub did the same at a
    // cost of a few KiB of every idle hub's memory.)
    let mut reader = FrameReader::new(recv);
    let peer = hub.key;
    loop {
        tokio::select! {
            frame = reader.read_frame() => match frame {
                Err(FrameIoError::Closed) => {
                    debug!(hub = %hub.name, "control stream ended");
                    return;
                }
                Err(FrameIoError::Io(e)) => {
                    debug!(hub = %hub.name, "control stream failed: {e}");
                    return;
                }
                Err(FrameIoError::Frame(e)) => {
                    let message = format!("malformed frame on the control stream: {e}");
                    refuse(shared, send, &peer, bad_frame_reason(&e), message).await;
                    flush_then_close(send, &hub.conn, codes::PROTOCOL, b"malformed control frame").await;
                    return;
                }
                Ok(Frame::AllowList { allowed_apps, pairing_open }) => {
                    // An allow-list can be large; an idle hub should not keep a buffer of its
                    // size. Nothing is lost: the reader never reads past a frame.
                    reader = FrameReader::new(reader.into_inner());
                    let apps = allowed_apps.len();
                    let cut = hub.access.set_allow_list(allowed_apps, pairing_open);
                    info!(hub = %hub.name, apps, pairing_open, sessions_cut = cut, "allow-list updated");
                    if let Some(cluster) = &shared.cluster {
                        cluster.apps_changed(&hub.name, hub.conn_id);
                    }
                }
                Ok(Frame::Ping { nonce }) => {
                    if let Err(e) = write_frame(send, &Frame::Pong { nonce }).await {
                        debug!(hub = %hub.name, "could not answer a ping: {e}");
                        return;
                    }
                }
                Ok(Frame::Pong { .. }) => {}
                Ok(other) => {
                    let message = format!("{} is not allowed on the control stream", other.name());
                    refuse(shared, send, &peer, RefusalReason::ProtocolViolation, message).await;
                    flush_then_close(send, &hub.conn, codes::PROTOCOL, b"protocol violation").await;
                    return;
                }
            },
            Some(command) = commands.recv() => match command {
                ControlCommand::GoAway { retry_after_ms, message, done } => {
                    let frame = Frame::GoAway { retry_after_ms, message };
                    if write_frame(send, &frame).await.is_ok() {
                        let _ = send.finish();
                        let _ = tokio::time::timeout(FLUSH_GRACE, send.stopped()).await;
                    }
                    let _ = done.send(());
                    return;
                }
                ControlCommand::Revoke { message } => {
                    refuse(shared, send, &peer, RefusalReason::NameNotAuthorized, message).await;
                    flush_then_close(send, &hub.conn, codes::REVOKED, b"hub name no longer authorized").await;
                    return;
                }
            },
        }
    }
}
