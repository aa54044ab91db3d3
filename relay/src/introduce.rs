//! Authorizing an app's request for a hub (`ChannelOpen`) and introducing the app to the hub:
//! the checks in the protocol's order, the typed refusals, and the enrolment that counts the
//! channel against the session caps (`max_sessions_per_app`, `max_sessions_per_hub`) and lets a
//! revocation cut it. Kept apart from the channel's lifetime ([`crate::channel_session`]), so
//! that the decisions are read in one place.
//!
//! [`authorize`] decides against the current state (never what the handshake saw: TLS
//! resumption can never bypass it) and enrols the request with its hub; [`announce`] opens a
//! stream to the hub, sends the announce frame and waits, bounded by `session_open_timeout` and
//! cut short by a revocation, for the hub's answer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::{Frame, HubName, PublicKey, RefusalReason, SessionPurpose};
use quinn::{RecvStream, SendStream};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::access::{Enrolled, SessionCaps};
use crate::policy::{decide_session, WireRefusal};
use crate::refusal::refuse;
use crate::registry::Hub;
use crate::state::Shared;
use keyway_proto::codes;

/// The app's address as the hub should see it: IPv4-mapped IPv6 (from a dual-stack socket)
/// becomes plain IPv4.
pub(crate) fn observed(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Decides whether `app` may reach hub `name` (pinned to `pinned`) for `purpose`, in the
/// protocol's order: the relay shutting down, then the name policy and the hub's state
/// ([`decide_session`]), the hub's allow-list or pairing window, and last the session caps
/// (per app, then per hub). On success the request is enrolled with its hub (it counts until the guard drops, and
/// a revocation of `app` fires its `revoked`).
pub(crate) fn authorize(
    shared: &Shared,
    app: &PublicKey,
    name: &HubName,
    pinned: &PublicKey,
    purpose: SessionPurpose,
) -> Result<(Arc<Hub>, Enrolled), WireRefusal> {
    if shared.is_shutting_down() {
        let message = "the relay is shutting down; try again in a moment".to_owned();
        return Err(WireRefusal::new(RefusalReason::ShuttingDown, message));
    }
    let bound = shared.names.binding(name);
    let session_id = shared.registry.next_id();
    let Some(hub) = shared.registry.get(name) else {
        let refusal =
            decide_session(name, bound.as_ref(), pinned, None, app, purpose).err().unwrap_or_else(|| {
                WireRefusal::new(RefusalReason::HubOffline, format!("hub {name} is not connected"))
            });
        return Err(refusal);
    };
    // A cap's refusal is counted by `enrol` itself.
    let caps = SessionCaps::from(&*shared.limits.get());
    let enrolled = hub.access.enrol(bound.as_ref(), pinned, app, purpose, session_id, caps)?;
    Ok((hub, enrolled))
}

/// A future that resolves only on an actual revocation of the app key, not when the hub entry
/// (and with it the sender) goes away.
pub(crate) async fn revocation(revoked: oneshot::Receiver<()>) {
    if revoked.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why an introduction did not get the hub's acceptance.
pub(crate) enum Unanswered {
    /// The relay refuses the app (hub gone, slow, broken, or the app revoked meanwhile).
    Refuse(WireRefusal),
    /// The hub refused; passed on to the app verbatim.
    HubRefused { reason: RefusalReason, message: String },
}

/// Why writing the announce or reading the answer failed.
enum ExchangeError {
    Io(String),
    Bad(String),
}

/// Opens a stream to `hub`, writes `announce` and waits for `accepted` (within
/// `session_open_timeout`; a revocation of the app cuts the wait short and resets the hub's
/// stream with `REVOKED`). `what` names the announce in messages ("session announce").
/// Returns the hub's stream on acceptance.
pub(crate) async fn announce(
    shared: &Shared,
    hub: &Hub,
    app: &PublicKey,
    announce: Frame,
    accepted: Frame,
    what: &str,
    mut revoked: Pin<&mut impl Future<Output = ()>>,
) -> Result<(SendStream, RecvStream), Unanswered> {
    let name = &hub.name;
    let timeout = shared.session_open_timeout;
    let refuse = |reason, message| Err(Unanswered::Refuse(WireRefusal::new(reason, message)));
    let (mut hub_send, mut hub_recv) = match tokio::time::timeout(timeout, hub.conn.open_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return refuse(RefusalReason::HubOffline, format!("hub {name} went offline: {e}")),
        Err(_) => {
            let message = format!("hub {name} has no stream free for a new session within {timeout:?}");
            return refuse(RefusalReason::OverLimit, message);
        }
    };
    let exchange = async {
        write_frame(&mut hub_send, &announce).await.map_err(|e| ExchangeError::Io(e.to_string()))?;
        read_frame(&mut hub_recv).await.map_err(|e| match e {
            FrameIoError::Frame(e) => ExchangeError::Bad(e.to_string()),
            e => ExchangeError::Io(e.to_string()),
        })
    };
    let answer = tokio::select! {
        answer = tokio::time::timeout(timeout, exchange) => answer,
        () = &mut revoked => {
            let _ = hub_send.reset(codes::REVOKED);
            let _ = hub_recv.stop(codes::REVOKED);
            let message = format!("hub {name} revoked app key {}", app.fingerprint());
            return refuse(RefusalReason::AppNotAuthorized, message);
        }
    };
    match answer {
        Ok(Ok(frame)) if frame == accepted => Ok((hub_send, hub_recv)),
        Ok(Ok(Frame::Refused { reason, message })) => Err(Unanswered::HubRefused { reason, message }),
        Ok(Ok(other)) => {
            let _ = hub_send.reset(codes::PROTOCOL);
            let message = format!("hub {name} answered the {what} with {}", other.name());
            refuse(RefusalReason::ProtocolViolation, message)
        }
        Ok(Err(ExchangeError::Bad(e))) => {
            let _ = hub_send.reset(codes::PROTOCOL);
            refuse(
                RefusalReason::ProtocolViolation,
                format!("hub {name} answered with a malformed frame: {e}"),
            )
        }
        Ok(Err(ExchangeError::Io(e))) => {
            refuse(RefusalReason::HubOffline, format!("hub {name} went offline during the {what}: {e}"))
        }
        Err(_) => {
            let _ = hub_send.reset(codes::NORMAL);
            let _ = hub_recv.stop(codes::NORMAL);
            refuse(
                RefusalReason::HubOffline,
                format!("hub {name} did not answer the {what} within {timeout:?}"),
            )
        }
    }
}

/// Tells the app why its request failed: the relay's own refusal, or the hub's verbatim (counted
/// like the relay's own).
pub(crate) async fn answer(
    shared: &Shared,
    app_send: &mut SendStream,
    app: &PublicKey,
    hub: &HubName,
    unanswered: Unanswered,
) {
    match unanswered {
        Unanswered::Refuse(refusal) => refuse(shared, app_send, app, refusal.reason, refusal.message).await,
        Unanswered::HubRefused { reason, message } => {
            shared.stats.refused(reason);
            info!(%hub, app = %app.fingerprint(), %reason, "hub refused a session: {message}");
            if let Err(e) = write_frame(app_send, &Frame::Refused { reason, message }).await {
                debug!("could not pass the hub's refusal on: {e}");
            }
            let _ = app_send.finish();
        }
    }
}
