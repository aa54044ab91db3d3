//! How the client asks the relay for something, and the byte-stream view of a QUIC stream.
//!
//! `send` starts the one exchange the app has with the relay itself: a frame on a fresh stream of
//! the relay connection (`ChannelOpen`), whose one answer (`ChannelReady` or a typed `Refused`) the
//! end-to-end dial reads (`e2e`). [`QuicBiStream`] joins the two halves of a QUIC stream into one
//! tokio byte stream (the hub bridges its end-to-end streams to TCP through it too). What a session
//! gives the app, [`HubStream`](crate::HubStream), is a stream of the end-to-end connection
//! (`e2e`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use keyway_proto::io::{write_frame, FrameIoError};
use keyway_proto::Frame;
use quinn::{Connection, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ClientError, ProtocolError};

/// The two halves of a QUIC bidirectional stream as one tokio byte stream.
#[derive(Debug)]
pub struct QuicBiStream {
    pub send: SendStream,
    pub recv: RecvStream,
}

impl AsyncRead for QuicBiStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicBiStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

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
