//! Saying no on the wire: [`refuse`] sends a typed `Refused` frame (counted, logged, bounded in
//! time) and [`bad_frame_reason`] picks the reason for a frame that did not decode.
//!
//! Admission (`connection`), the control stream (`hub`) and sessions (`session`) all refuse the
//! same way, so the helpers live on their own rather than in any one of those drivers.

use keyway_proto::io::write_frame;
use keyway_proto::{Frame, FrameError, PublicKey, RefusalReason};
use quinn::SendStream;
use tracing::{debug, info};

use crate::state::Shared;

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
