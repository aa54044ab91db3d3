//! The pairing exchange on the hub: whether a window is open, and the pairing connection
//! that carries an app's secret.
//!
//! A pairing channel's end-to-end connection admits any app key (the secret, checked inside
//! it, is what authorizes the key) and carries one stream: `StreamOpen`, the hub's answer, the
//! app's secret, the hub's verdict. A right secret adds the key the app proved to
//! `authorized_apps` with the window's label and closes the window; wrong ones are counted
//! and close it after [`MAX_FAILURES`]. The secret is never logged.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keyway_proto::codes;
use keyway_proto::io::write_frame;
use keyway_proto::{Frame, HubName, PublicKey, RefusalReason};
use quinn::Connection;
use tokio::io::AsyncWriteExt;

use keyway_path::QuicBiStream;

use super::{close_window, read_window, write_window, PairingWindow, MAX_FAILURES};
use crate::answer::{close, refuse, stream_opened};
use crate::channels::ChannelInfo;
use crate::state::Shared;

/// How long an app has to send its pairing request on a pairing connection.
const PAIR_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What an app is told when no window is open, at the channel's announce and on the stream.
pub(crate) fn closed_message(hub: &HubName) -> String {
    format!("hub {hub} has no pairing window open (it expired, was used, or was never opened)")
}

/// Re-reads the pairing window file and updates `pairing_open` (waking the tunnel to
/// publish it). An expired or exhausted window's file is removed.
pub(crate) fn refresh(shared: &Shared) -> bool {
    let open = match read_window(&shared.window_file) {
        Ok(Some(window)) if window.is_open() => true,
        Ok(Some(_)) => {
            tracing::info!("pairing window closed (expired or too many wrong secrets)");
            if let Err(e) = close_window(&shared.window_file) {
                tracing::warn!(error = %e, "cannot remove the closed pairing window");
            }
            false
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the pairing window file");
            false
        }
    };
    shared.pairing_open.send_if_modified(|current| {
        let changed = *current != open;
        if changed {
            tracing::info!(open, "pairing window {}", if open { "opened" } else { "closed" });
        }
        *current = open;
        changed
    });
    open
}

/// A pairing connection: one stream carries the app's secret; a right one authorizes the key
/// the app proved and closes the window. The secret is never logged.
pub(crate) async fn serve(shared: &Shared, conn: &Connection, channel: &ChannelInfo) {
    use keyway_proto::pairing::{read_request, write_answer, PairStatus};

    let (mut send, mut recv) = tokio::select! {
        accepted = tokio::time::timeout(PAIR_REQUEST_TIMEOUT, conn.accept_bi()) => match accepted {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => return tracing::info!(error = %e, "pairing: connection lost before the request"),
            Err(_) => return close(conn, codes::NORMAL, "no pairing request in time"),
        },
        () = channel.ended() => return close(conn, codes::NORMAL, "channel ended"),
    };
    if !stream_opened(&mut send, &mut recv).await {
        return close(conn, codes::PROTOCOL, "expected StreamOpen");
    }
    if !refresh(shared) {
        refuse(shared, &mut send, RefusalReason::PairingClosed, closed_message(&shared.config.name)).await;
        return;
    }
    if let Err(e) = write_frame(&mut send, &Frame::StreamAccepted).await {
        return tracing::debug!(error = %e, "pairing: could not accept the stream");
    }
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let mut quic = QuicBiStream { send, recv };
    let secret = match tokio::time::timeout(PAIR_REQUEST_TIMEOUT, read_request(&mut quic)).await {
        Ok(Ok(Some(secret))) => secret,
        Ok(Ok(None)) => {
            shared.stats.pairing_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("pairing: malformed request");
            let _ = write_answer(&mut quic, PairStatus::BadRequest, "malformed pairing request").await;
            let _ = quic.shutdown().await;
            return;
        }
        Ok(Err(e)) => return tracing::info!(error = %e, "pairing: no request"),
        Err(_) => return tracing::info!("pairing: no request in time"),
    };
    let (status, message) = consume_window(shared, &channel.app_key, &secret).await;
    let _ = write_answer(&mut quic, status, &message).await;
    let _ = quic.shutdown().await;
    // The app closes the connection once it has read the answer; bound the wait.
    let _ = tokio::time::timeout(PAIR_REQUEST_TIMEOUT, conn.closed()).await;
}

/// Checks `secret` against the open window and, if it matches, authorizes `app_key` and
/// closes the window. Serialized by `pair_lock` so one code pairs one app.
async fn consume_window(
    shared: &Shared,
    app_key: &PublicKey,
    secret: &[u8],
) -> (keyway_proto::pairing::PairStatus, String) {
    use keyway_proto::pairing::PairStatus;
    let _guard = shared.pair_lock.lock().await;
    let window = match read_window(&shared.window_file) {
        Ok(Some(w)) if w.is_open() => w,
        Ok(_) => return (PairStatus::WindowClosed, "the pairing window is closed".into()),
        Err(e) => {
            tracing::warn!(error = %e, "pairing: cannot read the window");
            return (PairStatus::WindowClosed, "the pairing window is closed".into());
        }
    };
    if !window.matches(secret) {
        shared.stats.pairing_failures.fetch_add(1, Ordering::Relaxed);
        let failures = window.failures.saturating_add(1);
        tracing::warn!(failures, limit = MAX_FAILURES, "pairing: wrong secret");
        let updated = PairingWindow { failures, ..window };
        if let Err(e) = write_window(&shared.window_file, &updated) {
            tracing::warn!(error = %e, "pairing: cannot record the failure; closing the window");
            let _ = close_window(&shared.window_file);
        }
        refresh(shared);
        return (PairStatus::WrongSecret, "wrong pairing secret".into());
    }
    // Close first: if recording the key fails, the code is spent anyway (fail closed).
    if let Err(e) = close_window(&shared.window_file) {
        tracing::error!(error = %e, "pairing: cannot close the window; refusing");
        return (PairStatus::Internal, "the hub could not close its pairing window".into());
    }
    let label = if window.label.is_empty() { "paired app".to_owned() } else { window.label.clone() };
    if let Err(e) = crate::apps::add_app(&shared.config.apps_file, app_key, &label) {
        tracing::error!(error = %e, "pairing: cannot add the app key");
        refresh(shared);
        return (PairStatus::Internal, "the hub could not record the app key".into());
    }
    // Apply now rather than at the next poll, so the app's first `connect` works at once.
    let _ = shared.reload_apps();
    refresh(shared);
    shared.stats.paired.fetch_add(1, Ordering::Relaxed);
    tracing::info!(app = %app_key.fingerprint(), %label, "app paired and authorized");
    (PairStatus::Paired, format!("paired as {label:?}"))
}
