//! How the client asks the relay for something, and the byte-stream view of a QUIC stream.
//!
//! `request` is the one exchange the app has with the relay itself: a frame on a fresh stream
//! of the relay connection (`ChannelOpen`) and one answer (`ChannelReady` or a typed
//! `Refused`). [`QuicBiStream`] joins the two halves of a QUIC stream into one tokio byte
//! stream (the hub bridges its end-to-end streams to TCP through it too). What a session gives
//! the app, [`HubStream`](crate::HubStream), is a stream of the end-to-end connection (`e2e`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::{Frame, HubName};
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

/// Why [`open`] failed, and whether the relay simply never answered (which, on a connection
/// that looked healthy, suggests the relay is gone without having closed it).
#[derive(Debug)]
pub(crate) struct OpenFailure {
    pub(crate) error: ClientError,
    pub(crate) no_answer: bool,
}

impl From<ClientError> for OpenFailure {
    fn from(error: ClientError) -> Self {
        Self { error, no_answer: false }
    }
}

/// Opens a stream on the relay connection, writes `request` about `hub` and reads one answer
/// frame: a `Refused` becomes [`ClientError::Refused`], any other frame is the caller's to
/// judge.
pub(crate) async fn request(
    conn: &Connection,
    request: &Frame,
    hub: &HubName,
    answer_timeout: Duration,
) -> Result<(QuicBiStream, Frame), OpenFailure> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(ClientError::from)?;
    write_frame(&mut send, request).await.map_err(|e| stream_failure(conn, "while asking for the hub", e))?;
    let answer = match tokio::time::timeout(answer_timeout, read_frame(&mut recv)).await {
        Ok(answer) => answer.map_err(|e| stream_failure(conn, "before answering", e))?,
        Err(_) => {
            let _ = send.reset(keyway_proto::codes::NORMAL);
            let _ = recv.stop(keyway_proto::codes::NORMAL);
            let error = ProtocolError::NoAnswer { hub: hub.clone(), waited: answer_timeout }.into();
            return Err(OpenFailure { error, no_answer: true });
        }
    };
    match answer {
        Frame::Refused { reason, message } => Err(ClientError::Refused { reason, message }.into()),
        answer => Ok((QuicBiStream { send, recv }, answer)),
    }
}
