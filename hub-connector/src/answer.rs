//! How the hub answers what it is asked: a stream's `StreamOpen` read, a typed refusal written
//! and counted, a connection closed with a code and a reason. Shared by the channel stream the
//! relay opens ([`crate::channel`]), the streams of end-to-end connections (`e2e`) and the
//! pairing exchange ([`crate::pairing`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use keyway_proto::codes;
use keyway_proto::io::{read_frame, write_frame};
use keyway_proto::{Frame, RefusalReason};
use quinn::{Connection, RecvStream, SendStream};

use crate::state::Shared;

/// How long an app has to send `StreamOpen` on a stream it opened.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes `conn` with `code` and a short reason.
pub(crate) fn close(conn: &Connection, code: quinn::VarInt, reason: &str) {
    keyway_path::relay_link::close(conn, code, reason);
}

/// Answers a channel or stream with a typed refusal, counted and logged, and ends our side.
pub(crate) async fn refuse(shared: &Shared, send: &mut SendStream, reason: RefusalReason, message: String) {
    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%reason, %message, "refused");
    let _ = write_frame(send, &Frame::refused(reason, message)).await;
    let _ = send.finish();
}

/// Waits for the stream's `StreamOpen`; false (stream aborted) if anything else came.
pub(crate) async fn stream_opened(send: &mut SendStream, recv: &mut RecvStream) -> bool {
    match tokio::time::timeout(STREAM_OPEN_TIMEOUT, read_frame(recv)).await {
        Ok(Ok(Frame::StreamOpen)) => true,
        Ok(Ok(other)) => {
            tracing::debug!(frame = other.name(), "stream did not start with StreamOpen");
            let _ =
                write_frame(send, &Frame::refused(RefusalReason::ProtocolViolation, "expected StreamOpen"))
                    .await;
            let _ = send.finish();
            let _ = recv.stop(codes::PROTOCOL);
            false
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "stream without a valid StreamOpen");
            let _ = send.reset(codes::PROTOCOL);
            let _ = recv.stop(codes::PROTOCOL);
            false
        }
        Err(_) => {
            tracing::debug!("no StreamOpen in time");
            let _ = send.reset(codes::PROTOCOL);
            let _ = recv.stop(codes::PROTOCOL);
            false
        }
    }
}
