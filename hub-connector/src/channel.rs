//! One channel announced by the relay: authorize the app, bind the channel in
//! the tunnel's path socket, answer, and hold the binding for as long as the relay's stream
//! lives.
//!
//! The hub trusts nothing the relay says beyond "this app key authenticated to me": the
//! announced key must be in the *current* allow-list (or, for `Pair`, a pairing window must be
//! open), and the end-to-end handshake that follows must prove that same key ([`crate::e2e`]
//! checks it, and the allow-list again, after every handshake). The stream the relay opened is
//! the channel's lifeline: when the relay ends it (the app left, was revoked, the channel idled
//! out) the binding is dropped, so the app's packets stop reaching quinn, and the end-to-end
//! connection on it is closed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::channel::ChannelId;
use keyway_proto::codes;
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::{Frame, PublicKey, RefusalReason, SessionPurpose};
use quinn::{RecvStream, SendStream};
use tracing::Instrument;

use crate::answer::refuse;
use crate::state::{Shared, Tunnel};

/// How long the relay has to send its announce on a stream it opened.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one stream the relay opened on the tunnel: its first frame must be
/// `ChannelAnnounce`. Never panics on what it reads.
pub(crate) async fn handle_stream(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let announce = match tokio::time::timeout(ANNOUNCE_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "relay stream without a valid announce");
            let _ = send.reset(codes::PROTOCOL);
            let _ = recv.stop(codes::PROTOCOL);
            return;
        }
        Err(_) => {
            tracing::debug!("no ChannelAnnounce in time");
            let _ = send.reset(codes::PROTOCOL);
            let _ = recv.stop(codes::PROTOCOL);
            return;
        }
    };
    let Frame::ChannelAnnounce { app_key, observed, purpose, channel } = announce else {
        tracing::warn!(frame = announce.name(), "relay opened a stream without ChannelAnnounce");
        let message = "expected ChannelAnnounce";
        let _ = write_frame(&mut send, &Frame::refused(RefusalReason::ProtocolViolation, message)).await;
        let _ = send.finish();
        return;
    };
    let label = shared.apps.label(&app_key);
    let span = tracing::info_span!("channel", app = %app_key.fingerprint(), label = %label, %observed);
    let announce = Announce { app_key, observed, purpose, id: channel };
    handle(shared, tunnel, send, recv, announce).instrument(span).await
}

/// What the relay's `ChannelAnnounce` said.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Announce {
    pub(crate) app_key: PublicKey,
    pub(crate) observed: SocketAddr,
    pub(crate) purpose: SessionPurpose,
    /// The hub's id for the channel (what its datagrams carry).
    pub(crate) id: ChannelId,
}

/// Handles a stream whose first frame was `ChannelAnnounce`.
async fn handle(
    shared: Arc<Shared>,
    tunnel: Arc<Tunnel>,
    mut send: SendStream,
    mut recv: RecvStream,
    announce: Announce,
) {
    let Announce { app_key, observed, purpose, id } = announce;
    shared.stats.announced.fetch_add(1, Ordering::Relaxed);
    let name = &shared.config.name;
    match purpose {
        SessionPurpose::Connect if !shared.apps.contains(&app_key) => {
            let message = format!("app key {} is not in hub {name}'s authorized_apps", app_key.fingerprint());
            return refuse(&shared, &mut send, RefusalReason::AppNotAuthorized, message).await;
        }
        SessionPurpose::Pair if !crate::pairing::refresh(&shared) => {
            let message = crate::pairing::closed_message(name);
            return refuse(&shared, &mut send, RefusalReason::PairingClosed, message).await;
        }
        _ => {}
    }
    // The relay sent the app's first flight on with the announce, so it may be held in the
    // path socket already: the channel info goes in before the binding lets it reach quinn,
    // whose first packet from the address looks the info up.
    let (binding, entry) =
        tunnel.paths.bind_with(id, |addr| tunnel.channels.add(addr, app_key, observed, purpose));
    if let Err(e) = write_frame(&mut send, &Frame::ChannelAccepted).await {
        tracing::debug!(error = %e, "could not accept the channel");
        return;
    }
    tracing::debug!(channel = %id, ?purpose, "channel accepted");
    // The relay sends nothing more on this stream; it ends it (finish or reset) when the channel
    // ends. Anything else is a protocol violation, which ends the channel too.
    let mut scratch = [0u8; 64];
    let ended = loop {
        match recv.read(&mut scratch).await {
            Ok(None) => break "the relay finished the channel stream".to_owned(),
            Ok(Some(0)) => continue,
            Ok(Some(_)) => {
                let _ = recv.stop(codes::PROTOCOL);
                break "the relay sent data on a channel stream".to_owned();
            }
            Err(e) => break format!("channel stream: {e}"),
        }
    };
    tracing::debug!(channel = %id, %ended, "channel ended");
    let _ = send.finish();
    drop(entry);
    drop(binding);
}
