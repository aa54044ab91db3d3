//! Saying no on the wire: [`refuse`] sends a typed `Refused` frame (counted, logged, bounded in
//! time) and [`bad_frame_reason`] picks the reason for a frame that did not decode.
//!
//! Admission (`connection`), the control stream (`hub`) and sessions (`session`) all refuse the
//! same way, so the helpers live on their own rather than in any one of those drivers.
//!
//! Every refusal is counted; at most [`LINES_PER_SECOND`] a second are logged at `info` (the
//! rest at `debug`, the next `info` line saying how many were left out), so a peer that
//! provokes refusals cannot flood the operator's log.

use keyway_proto::io::write_frame;
use keyway_proto::{Frame, FrameError, PublicKey, RefusalReason};
use quinn::SendStream;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::state::Shared;

/// The refusal reason for a frame that failed to decode.
pub(crate) fn bad_frame_reason(e: &FrameError) -> RefusalReason {
    match e {
        FrameError::UnsupportedVersion { .. } => RefusalReason::UnsupportedVersion,
        _ => RefusalReason::BadFrame,
    }
}

/// Refusal lines logged at `info` per second at most.
pub(crate) const LINES_PER_SECOND: u32 = 10;

/// How many lines a one-second window has logged, and how many it left out.
#[derive(Debug)]
struct LineBudget {
    window: Option<Instant>,
    logged: u32,
    left_out: u32,
}

impl LineBudget {
    const fn new() -> Self {
        Self { window: None, logged: 0, left_out: 0 }
    }

    /// Whether a line may be logged at `now`: `Some(lines left out before it)` or `None`.
    fn take(&mut self, now: Instant) -> Option<u32> {
        let expired = self.window.is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1));
        if expired {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged >= LINES_PER_SECOND {
            self.left_out = self.left_out.saturating_add(1);
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

static REFUSAL_LINES: Mutex<LineBudget> = Mutex::new(LineBudget::new());

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
    let line = REFUSAL_LINES.lock().unwrap_or_else(|p| p.into_inner()).take(Instant::now());
    match line {
        Some(0) => info!(peer = %peer.fingerprint(), %reason, "refused: {message}"),
        Some(left_out) => {
            info!(peer = %peer.fingerprint(), %reason, left_out, "refused: {message} ({left_out} refusal lines left out before this one)")
        }
        None => debug!(peer = %peer.fingerprint(), %reason, "refused: {message}"),
    }
    let frame = Frame::refused(reason, message);
    match tokio::time::timeout(shared.session_open_timeout, write_frame(send, &frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!("could not deliver a refusal: {e}"),
        Err(_) => debug!("could not deliver a refusal in time"),
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_are_bounded_per_second_and_say_how_many_were_left_out() {
        let mut budget = LineBudget::new();
        let t0 = Instant::now();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(budget.take(t0), Some(0));
        }
        assert_eq!(budget.take(t0 + Duration::from_millis(500)), None);
        assert_eq!(budget.take(t0 + Duration::from_millis(999)), None);
        assert_eq!(budget.take(t0 + Duration::from_secs(1)), Some(2), "the next window says so");
        assert_eq!(budget.take(t0 + Duration::from_secs(1)), Some(0));
    }
}
