//! One session: `SessionOpen` on a fresh stream, the relay's (or hub's) answer, then the
//! end-to-end TLS handshake that pins the hub key; and [`HubStream`], the byte stream a
//! session gives the app on either data plane (v1 here, v2's streams in `e2e`).
//!
//! The relay splices bytes after `SessionAccepted`, so everything from here on is TLS the relay
//! cannot read. The pinned-key verifier records a mismatch in a
//! [`MismatchSlot`] so a wrong hub key is reported as
//! [`ClientError::HubKeyMismatch`] naming both fingerprints rather than a bare TLS alert.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use keyway_proto::io::{read_frame, write_frame, FrameIoError};
use keyway_proto::tls::MismatchSlot;
use keyway_proto::{Frame, HubName, PublicKey};
use quinn::{Connection, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ClientError, HandshakeError, ProtocolError};

/// The two halves of a QUIC bidirectional stream as one tokio byte stream (what TLS runs over).
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

/// An end-to-end encrypted byte stream to a hub's service.
///
/// `shutdown` finishes the stream (a half-close: reading still works until the hub closes its
/// side); on data plane v1 it sends TLS `close_notify` first.
#[derive(Debug)]
pub struct HubStream {
    inner: Transport,
    hub_key: PublicKey,
}

#[derive(Debug)]
enum Transport {
    /// v1: TLS over a spliced relay stream.
    Tls(Box<tokio_rustls::client::TlsStream<QuicBiStream>>),
    /// v2: a stream of the end-to-end QUIC connection.
    Quic(crate::e2e::E2eStream),
}

impl HubStream {
    pub(crate) fn quic(stream: crate::e2e::E2eStream, hub_key: PublicKey) -> Self {
        Self { inner: Transport::Quic(stream), hub_key }
    }

    /// The hub key this stream was authenticated against.
    pub fn hub_key(&self) -> PublicKey {
        self.hub_key
    }

    /// v1: whether the end-to-end TLS session was resumed from a cached ticket (no certificate
    /// verification ran; the hub re-checks the key after the handshake either way).
    ///
    /// v2 (one end-to-end QUIC connection per hub, each stream on it): whether this stream
    /// rode on a connection that was already up, so it cost no handshake at all. (quinn does
    /// not tell a client whether its handshake resumed a TLS session; the hub re-checks the
    /// key after every handshake, resumed or not.)
    pub fn resumed(&self) -> bool {
        match &self.inner {
            Transport::Tls(tls) => tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            Transport::Quic(quic) => quic.reused(),
        }
    }

    /// Aborts the stream at once in both directions (QUIC reset and stop-sending).
    pub fn abort(&mut self) {
        match &mut self.inner {
            Transport::Tls(tls) => {
                let io = tls.get_mut().0;
                let _ = io.send.reset(keyway_proto::codes::NORMAL);
                let _ = io.recv.stop(keyway_proto::codes::NORMAL);
            }
            Transport::Quic(quic) => quic.abort(),
        }
    }
}

impl AsyncRead for HubStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            Transport::Quic(quic) => Pin::new(quic).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HubStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            Transport::Quic(quic) => Pin::new(quic).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            Transport::Quic(quic) => Pin::new(quic).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            Transport::Quic(quic) => Pin::new(quic).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Transport::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
            Transport::Quic(quic) => Pin::new(quic).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Transport::Tls(tls) => tls.is_write_vectored(),
            Transport::Quic(quic) => quic.is_write_vectored(),
        }
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
/// judge. Shared by v1 sessions (`SessionOpen`) and v2 channels (`ChannelOpen`).
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

/// Runs the end-to-end TLS client over an accepted session stream.
pub(crate) async fn handshake(
    config: Arc<rustls::ClientConfig>,
    mismatch: &MismatchSlot,
    hub_key: PublicKey,
    stream: QuicBiStream,
    timeout: Duration,
) -> Result<HubStream, ClientError> {
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(keyway_proto::tls::server_name(), stream)).await {
        Ok(Ok(inner)) => Ok(HubStream { inner: Transport::Tls(Box::new(inner)), hub_key }),
        Ok(Err(e)) => Err(match mismatch.take() {
            // The slot is shared by all sessions to this hub key, so a hit means the far end
            // presented another key than `hub_key`, whichever session recorded it.
            Some(m) => ClientError::HubKeyMismatch(m),
            None => ClientError::HubRejected(HandshakeError::Tls(e)),
        }),
        Err(_) => Err(ClientError::HubRejected(HandshakeError::TimedOut { waited: timeout })),
    }
}
