//! How the client asks the relay for something.
//!
//! `send` starts the one exchange the app has with the relay itself: a frame on a fresh stream of
//! the relay connection (`ChannelOpen`), whose one answer (`ChannelReady` or a typed `Refused`) the
//! end-to-end dial reads (`e2e`). What a session gives the app, [`HubStream`](crate::HubStream),
//! is a stream of the end-to-end connection (`e2e`).

use keyway_path::QuicBiStream;
use keyway_proto::io::{write_frame, FrameIoError};
use keyway_proto::Frame;
use quinn::Connection;

use crate::error::{ClientError, ProtocolError};

/// Maps a failure on a session stream: if the whole connection is gone, say so (the caller
/// may redial), else report what went wrong on the stream.
pub(crate) fn stream_failure(conn: &Connection, what: &'static str, err: FrameIoError) -> ClientError {
    if let Some(reason) = conn.close_reason() {
        return ClientError::Connection(reason);
    }
    match err {
        FrameIoError::Closed => ProtocolError::StreamClosed { what }.into(),
        FrameIoError::Frame(source) => ProtocolError::BadFrame { what, source }.into(),
        FrameIoError::Io(e) => ClientError::Io(e),
    }
}

/// Opens a stream on the relay connection and writes `request` on it; the answer is the
/// caller's to read.
pub(crate) async fn send(conn: &Connection, request: &Frame) -> Result<QuicBiStream, ClientError> {
    let (mut send, recv) = conn.open_bi().await.map_err(ClientError::from)?;
    write_frame(&mut send, request).await.map_err(|e| stream_failure(conn, "while asking for the hub", e))?;
    Ok(QuicBiStream { send, recv })
}
