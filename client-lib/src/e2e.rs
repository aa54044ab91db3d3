//! The app side of the end-to-end QUIC connection to a hub and its streams.
//!
//! It owns the life of one connection and what each of its streams says first:
//! * **Channel.** `ChannelOpen` on a bi stream of the relay connection; the relay answers
//!   `ChannelReady { channel }` (or a typed `Refused`, the hub's passed on verbatim). The app
//!   binds the id in its path socket ([`keyway_path::socket`]) and dials the hub at the binding's
//!   virtual address, hub key pinned, ALPN `keyway-e2e/2`.
//! * **Guard.** The channel stream is held for the connection's life by one task: the relay
//!   ending it (reset `REVOKED`, `LIMIT` when idle, `REPLACED`, a finish, or the relay
//!   connection dying) closes the end-to-end connection and records why, so every later error
//!   on it is that typed reason; the end-to-end connection closing finishes the channel stream
//!   (the relay then drops the channel) and unbinds the id.
//! * **Drain.** A relay starting a graceful shutdown writes one `GoAway` on the channel stream.
//!   The connection keeps serving (new `connect`s still use it: dialing anew would meet a
//!   draining relay), and the guard closes it as soon as no stream is open on it, at once if
//!   none is, so that the drain does not wait its deadline for an app that only keeps a warm
//!   connection. The next `connect` dials a new one.
//! * **Streams.** Each session is one bi stream: the app writes `StreamOpen`, the hub answers
//!   `StreamAccepted` or `Refused` and finishes, then raw bytes flow both ways. The hub's reset
//!   codes become typed errors: `REVOKED` is [`ClientError::Revoked`], `LIMIT` (a per-app cap)
//!   a `Refused` with [`RefusalReason::OverLimit`]. An [`E2eStream`] may be handed out before
//!   the answer arrived (`keyway forward`: a TCP connection's first bytes leave at once); it
//!   then reads the answer before the first byte it yields, and a refusal surfaces as an
//!   `io::Error` whose inner error is the [`ClientError`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use keyway_proto::channel::ChannelId;
use keyway_proto::codec::{Header, HEADER_LEN};
use keyway_proto::codes;
use keyway_proto::io::write_frame;
use keyway_proto::tls::MismatchSlot;
use keyway_proto::{Frame, HubName, PublicKey, RefusalReason};
use quinn::{Connection, ConnectionError, Endpoint, ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{ChannelEnd, ClientError, ConfigError, HandshakeError, ProtocolError};
use keyway_path::{ChannelBinding, QuicBiStream};

/// How long the guard keeps a channel bound after its connection closed: long enough for quinn
/// to send the `CONNECTION_CLOSE` it just queued (microseconds on a live driver), so the hub
/// hears of the close directly rather than only through the relay's reset of its channel stream.
const CLOSE_GRACE: Duration = Duration::from_millis(100);

/// One end-to-end connection to a hub, and why the relay ended its channel once it did.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    conn: Connection,
    ended: Arc<OnceLock<Ended>>,
    /// Held by every handle (the client's cache, each stream): when the last one goes, the
    /// guard's receiver wakes and closes the connection. Without it the guard (which holds the
    /// connection and the channel stream, and through it the relay connection) would keep both
    /// alive, with their keep-alives, after the `Client` and its streams were dropped. A pairing
    /// connection, never cached, is so closed when its one stream is dropped.
    _in_use: Arc<tokio::sync::oneshot::Sender<()>>,
    usage: Arc<Usage>,
}

/// What a connection's handles share with its guard for the drain: whether the relay said
/// `GoAway`, and how many streams are open.
#[derive(Debug, Default)]
struct Usage {
    draining: AtomicBool,
    open: AtomicUsize,
    /// Signalled (one stored permit) when `open` falls to zero.
    idle: tokio::sync::Notify,
}

/// One open stream, counted in its connection's [`Usage`] while it lives.
#[derive(Debug)]
struct Counted(Arc<Usage>);

impl Counted {
    fn new(usage: &Arc<Usage>) -> Self {
        usage.open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(usage))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_one();
        }
    }
}

impl Link {
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    pub(crate) fn same(&self, other: &Link) -> bool {
        self.conn.stable_id() == other.conn.stable_id()
    }

    /// Closes the connection (the guard then ends the channel).
    pub(crate) fn close(&self, reason: &str) {
        keyway_path::relay_link::close(&self.conn, codes::NORMAL, reason);
    }

    /// Why the connection is closed, typed, if it is.
    pub(crate) fn closed_error(&self) -> Option<ClientError> {
        self.conn.close_reason().map(|e| self.lost(e))
    }

    /// The typed error for the connection being gone.
    fn lost(&self, e: ConnectionError) -> ClientError {
        connection_error(self.ended.get(), e)
    }

    /// What [`crate::events`] keeps to report the connection's end, without keeping the
    /// connection in use.
    pub(crate) fn end(&self) -> LinkEnd {
        LinkEnd { conn: self.conn.clone(), ended: Arc::clone(&self.ended) }
    }
}

/// A [`Link`]'s connection and why its channel ended, without its in-use handle.
#[derive(Clone, Debug)]
pub(crate) struct LinkEnd {
    conn: Connection,
    ended: Arc<OnceLock<Ended>>,
}

impl LinkEnd {
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Why the connection is closed, typed, if it is (as [`Link::closed_error`]).
    pub(crate) fn closed_error(&self) -> Option<ClientError> {
        self.conn.close_reason().map(|e| connection_error(self.ended.get(), e))
    }
}

/// Why the relay ended a connection's channel, once it did.
#[derive(Debug, Clone)]
enum Ended {
    /// After it was up.
    Channel(ChannelEnd),
    /// It refused the `ChannelOpen` whose first flight had already left (an early dial).
    Refused { reason: RefusalReason, message: String },
    /// It did not answer that `ChannelOpen` in time.
    NoAnswer { hub: HubName, waited: Duration },
    /// It is a cluster node that does not hold the hub, and named the one that does.
    Redirected { node: std::net::SocketAddr },
}

/// A closed end-to-end connection as a typed error: the relay's reason for ending (or
/// refusing) the channel if it did, the hub's `REVOKED` / `LIMIT` close codes, else quinn's.
fn connection_error(ended: Option<&Ended>, e: ConnectionError) -> ClientError {
    match ended {
        Some(Ended::Channel(end)) => return ClientError::ChannelEnded(end.clone()),
        Some(Ended::Refused { reason, message }) => {
            return ClientError::Refused { reason: *reason, message: message.clone() }
        }
        Some(Ended::NoAnswer { hub, waited }) => {
            return ProtocolError::NoAnswer { hub: hub.clone(), waited: *waited }.into()
        }
        Some(Ended::Redirected { node }) => return ClientError::Redirected { node: *node },
        None => {}
    }
    match &e {
        ConnectionError::ApplicationClosed(close) if close.error_code == codes::REVOKED => {
            ClientError::Revoked
        }
        ConnectionError::ApplicationClosed(close) if close.error_code == codes::LIMIT => {
            ClientError::Refused {
                reason: RefusalReason::OverLimit,
                message: format!(
                    "the hub closed the end-to-end connection: over a per-app limit ({})",
                    String::from_utf8_lossy(&close.reason)
                ),
            }
        }
        _ => ClientError::HubConnection(e),
    }
}

/// A stream reset or stop code from the hub as a typed error, for the codes that mean one.
fn stream_code_error(code: VarInt) -> Option<ClientError> {
    if code == codes::REVOKED {
        Some(ClientError::Revoked)
    } else if code == codes::LIMIT {
        Some(ClientError::Refused {
            reason: RefusalReason::OverLimit,
            message: "the hub reset the stream: this app is over its per-app limit of concurrent streams"
                .into(),
        })
    } else {
        None
    }
}

/// What a dial needs besides the channel.
pub(crate) struct DialParams<'a> {
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) config: quinn::ClientConfig,
    pub(crate) mismatch: &'a MismatchSlot,
    pub(crate) hub_key: PublicKey,
    pub(crate) timeout: Duration,
}

/// A dialed end-to-end connection.
pub(crate) enum Dialed {
    /// The handshake completed.
    Established(Link),
    /// Resumed with a ticket and usable at once: streams opened now send 0-RTT early data.
    /// The future resolves when the handshake completes: true if the hub took the early data,
    /// false if it did not (it lost the session, e.g. it restarted), in which case nothing sent
    /// early reached it and those streams fail with `ZeroRttRejected`.
    Early(Link, quinn::ZeroRttAccepted),
}

/// The channel request of a dial: `ChannelOpen` written on `stream` of the relay connection
/// `relay`, for this side's id `binding`; its answer not read yet.
pub(crate) struct Requested<'a> {
    pub(crate) stream: QuicBiStream,
    pub(crate) relay: &'a Connection,
    pub(crate) binding: ChannelBinding,
    pub(crate) hub: &'a HubName,
}

/// Dials the hub through the requested channel and starts the guard that ties the channel
/// stream and the connection together. The first flight leaves at once, right behind the
/// `ChannelOpen` (the relay holds it until it has authorized, the hub until it has bound the
/// channel), so the relay's answer and the hub's handshake arrive together. With `early`, a
/// dial that holds a ticket of this hub returns before either ([`Dialed::Early`]; a refusal
/// then closes the connection with the typed reason); without, it never does, so no byte
/// goes as early data.
pub(crate) async fn dial(
    p: DialParams<'_>,
    requested: Requested<'_>,
    early: bool,
) -> Result<Dialed, ClientError> {
    let Requested { mut stream, relay, binding, hub } = requested;
    // A mismatch left over from an earlier attempt must not be blamed on this one.
    let _ = p.mismatch.take();
    let connecting = p
        .endpoint
        .connect_with(p.config, binding.addr(), &keyway_proto::tls::e2e_server_name(&p.hub_key))
        .map_err(|source| ConfigError::DialHub { source })?;
    let connecting = match early {
        true => match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                let answer = Some((binding.id(), hub.clone(), p.timeout));
                let link = start(p.hub_key, conn, stream, binding, answer)?;
                return Ok(Dialed::Early(link, accepted));
            }
            // No ticket of this hub (or one without early data): a full handshake.
            Err(connecting) => connecting,
        },
        false => connecting,
    };
    // quinn drives the handshake meanwhile; a refusal wins over whatever it did.
    channel_answer(&mut stream, relay, hub, binding.id(), p.timeout).await?;
    // On every error path below, dropping `channel` finishes it: the relay drops the channel.
    let conn = match tokio::time::timeout(p.timeout, connecting).await {
        Err(_) => {
            return Err(match p.mismatch.take() {
                Some(m) => ClientError::HubKeyMismatch(m),
                None => ClientError::HubRejected(HandshakeError::TimedOut { waited: p.timeout }),
            })
        }
        Ok(Err(e)) => {
            return Err(match p.mismatch.take() {
                Some(m) => ClientError::HubKeyMismatch(m),
                None => match connection_error(None, e) {
                    ClientError::HubConnection(e) => ClientError::HubRejected(HandshakeError::Quic(e)),
                    typed => typed,
                },
            })
        }
        Ok(Ok(conn)) => conn,
    };
    start(p.hub_key, conn, stream, binding, None).map(Dialed::Established)
}

/// Reads the relay's answer to a `ChannelOpen` for `id`: `ChannelReady` for it, or a typed
/// refusal (the hub's passed on verbatim).
async fn channel_answer(
    stream: &mut QuicBiStream,
    relay: &Connection,
    hub: &HubName,
    id: ChannelId,
    wait: Duration,
) -> Result<(), ClientError> {
    let answer = match tokio::time::timeout(wait, keyway_proto::io::read_frame(&mut stream.recv)).await {
        Err(_) => return Err(ProtocolError::NoAnswer { hub: hub.clone(), waited: wait }.into()),
        Ok(answer) => answer.map_err(|e| crate::session::stream_failure(relay, "before answering", e))?,
    };
    match answer {
        Frame::ChannelReady { channel } if channel == id => Ok(()),
        Frame::Refused { reason, message } => Err(ClientError::Refused { reason, message }),
        // A cluster node that does not hold the hub names the one that does (`crate::cluster`).
        Frame::Redirect { node } => Err(ClientError::Redirected { node }),
        other => Err(ProtocolError::UnexpectedFrame { expected: "ChannelReady", got: other.name() }.into()),
    }
}

/// Checks the hub's key and starts the guard of a connection that is usable now; `answer`:
/// the relay's answer is still to be read (id, hub, how long to wait), by the guard.
fn start(
    hub_key: PublicKey,
    conn: Connection,
    channel: QuicBiStream,
    binding: ChannelBinding,
    answer: Option<(ChannelId, HubName, Duration)>,
) -> Result<Link, ClientError> {
    // Belt and braces, as for the relay: the verifier pinned the key on a full handshake; the
    // connection's own report covers resumed ones too (the key the ticket was issued with).
    if let Some(seen) = keyway_proto::tls::quic_peer_key(&conn) {
        if seen != hub_key {
            conn.close(codes::PROTOCOL, b"unexpected hub key");
            return Err(ClientError::HubKeyMismatch(keyway_proto::tls::KeyMismatch {
                expected: hub_key,
                seen,
            }));
        }
    }
    let ended = Arc::new(OnceLock::new());
    let usage = Arc::new(Usage::default());
    let (in_use, unused) = tokio::sync::oneshot::channel();
    let held = Held { ended: ended.clone(), usage: usage.clone(), unused };
    tokio::spawn(guard(conn.clone(), channel, binding, held, answer));
    Ok(Link { conn, ended, _in_use: Arc::new(in_use), usage })
}

/// What the guard shares with the connection's handles.
struct Held {
    ended: Arc<OnceLock<Ended>>,
    usage: Arc<Usage>,
    /// Resolves when the last `Link` handle is dropped.
    unused: tokio::sync::oneshot::Receiver<()>,
}

/// Holds the channel stream for the connection's life (see the module docs).
async fn guard(
    conn: Connection,
    channel: QuicBiStream,
    binding: ChannelBinding,
    held: Held,
    answer: Option<(ChannelId, HubName, Duration)>,
) {
    let Held { ended, usage, mut unused } = held;
    let mut channel = channel;
    if let Some((id, hub, wait)) = answer {
        if let Err(end) = channel_answer_early(&mut channel, &hub, id, wait).await {
            tracing::debug!(channel = %id, "the relay refused the channel of an early dial");
            let reason = match &end {
                Ended::Refused { message, .. } => message.clone(),
                Ended::Channel(end) => end.to_string(),
                Ended::NoAnswer { .. } => "no answer from the relay".to_owned(),
                Ended::Redirected { .. } => "redirected to another cluster node".to_owned(),
            };
            let _ = ended.set(end);
            keyway_path::relay_link::close(&conn, codes::NORMAL, &reason);
            drop(binding);
            return;
        }
    }
    let QuicBiStream { mut send, recv } = channel;
    let mut reader = keyway_proto::io::FrameReader::new(recv);
    let relay_ended = loop {
        let draining = usage.draining.load(Ordering::SeqCst);
        if draining && usage.open.load(Ordering::SeqCst) == 0 {
            keyway_path::relay_link::close(&conn, codes::NORMAL, "the relay is draining");
            break None;
        }
        // Each branch is cancel-safe (the frame reader, quinn's `closed`, a `Notify`).
        tokio::select! {
            event = channel_event(&mut reader) => match event {
                ChannelEvent::GoAway => {
                    tracing::debug!(channel = %binding.id(), "the relay is draining; closing when idle");
                    usage.draining.store(true, Ordering::SeqCst);
                }
                ChannelEvent::End(end) => break Some(end),
            },
            _ = conn.closed() => break None,
            // Nothing sends on it: it resolves when the last `Link` handle is dropped.
            _ = &mut unused => {
                keyway_path::relay_link::close(&conn, codes::NORMAL, "no longer used");
                break None;
            }
            () = usage.idle.notified(), if draining => {}
        }
    };
    if let Some(end) = relay_ended {
        tracing::debug!(channel = %binding.id(), reason = %end, "the relay ended the channel");
        let code = match end {
            ChannelEnd::Revoked => codes::REVOKED,
            ChannelEnd::Idle => codes::LIMIT,
            ChannelEnd::HubReplaced => codes::REPLACED,
            ChannelEnd::Closed | ChannelEnd::RelayLost(_) => codes::NORMAL,
        };
        let reason = end.to_string();
        // Recorded before the close, so no stream can see the close without the reason.
        let _ = ended.set(Ended::Channel(end));
        keyway_path::relay_link::close(&conn, code, &reason);
    }
    tokio::time::sleep(CLOSE_GRACE).await;
    let _ = send.finish();
    drop(binding);
}

/// [`channel_answer`] for a dial that went ahead of it: a failure as how the channel ended.
async fn channel_answer_early(
    stream: &mut QuicBiStream,
    hub: &HubName,
    id: ChannelId,
    wait: Duration,
) -> Result<(), Ended> {
    let answer = tokio::time::timeout(wait, keyway_proto::io::read_frame(&mut stream.recv)).await;
    match answer {
        Ok(Ok(Frame::ChannelReady { channel })) if channel == id => Ok(()),
        Ok(Ok(Frame::Refused { reason, message })) => Err(Ended::Refused { reason, message }),
        Ok(Ok(Frame::Redirect { node })) => Err(Ended::Redirected { node }),
        Ok(Ok(_)) | Ok(Err(_)) => Err(Ended::Channel(ChannelEnd::Closed)),
        Err(_) => Err(Ended::NoAnswer { hub: hub.clone(), waited: wait }),
    }
}

/// What the relay said on a live channel stream.
enum ChannelEvent {
    /// A graceful shutdown started.
    GoAway,
    /// It ended the stream, and how.
    End(ChannelEnd),
}

/// Reads the relay's next word on the channel stream: `GoAway` (a draining relay), or how it
/// ended the stream. Other frames are skipped (a later protocol may add some); bytes that are
/// no frame end the channel as `Closed`, as a relay breaking the protocol would.
async fn channel_event(reader: &mut keyway_proto::io::FrameReader<RecvStream>) -> ChannelEvent {
    loop {
        let error = match reader.read_frame().await {
            Ok(Frame::GoAway { .. }) => return ChannelEvent::GoAway,
            Ok(_) => continue,
            Err(keyway_proto::io::FrameIoError::Io(e)) => e,
            Err(keyway_proto::io::FrameIoError::Frame(_) | keyway_proto::io::FrameIoError::Closed) => {
                return ChannelEvent::End(ChannelEnd::Closed)
            }
        };
        let read = error.get_ref().and_then(|inner| inner.downcast_ref::<ReadError>());
        let end = match read {
            Some(ReadError::Reset(code)) if *code == codes::REVOKED => ChannelEnd::Revoked,
            Some(ReadError::Reset(code)) if *code == codes::LIMIT => ChannelEnd::Idle,
            Some(ReadError::Reset(code)) if *code == codes::REPLACED => ChannelEnd::HubReplaced,
            Some(ReadError::ConnectionLost(e)) => ChannelEnd::RelayLost(e.clone()),
            // A finish (end of stream) or any other reset.
            _ => ChannelEnd::Closed,
        };
        return ChannelEvent::End(end);
    }
}

/// Opens one stream on `link`: writes `StreamOpen`, then either waits up to `wait` for the
/// hub's answer or (`None`) hands the stream out at once with the answer still to read.
pub(crate) async fn open_stream(
    link: &Link,
    hub: &HubName,
    wait: Option<Duration>,
    reused: bool,
) -> Result<E2eStream, ClientError> {
    // quinn's `open_bi` waits for stream credit; a caller who waits for the answer waits for
    // the credit under the same bound.
    let opened = match wait {
        Some(wait) => tokio::time::timeout(wait, link.conn.open_bi())
            .await
            .map_err(|_| ClientError::from(ProtocolError::NoAnswer { hub: hub.clone(), waited: wait }))?,
        None => link.conn.open_bi().await,
    };
    let (mut send, recv) = opened.map_err(|e| link.lost(e))?;
    if let Err(e) = write_frame(&mut send, &Frame::StreamOpen).await {
        return Err(match link.conn.close_reason() {
            Some(reason) => link.lost(reason),
            None => ClientError::Io(match e {
                keyway_proto::io::FrameIoError::Io(e) => e,
                other => io::Error::other(other),
            }),
        });
    }
    let mut stream = E2eStream {
        send,
        recv,
        _counted: Counted::new(&link.usage),
        link: link.clone(),
        answer: Answer::Pending(Vec::new()),
        reused,
        early: false,
    };
    if let Some(wait) = wait {
        match tokio::time::timeout(wait, std::future::poll_fn(|cx| stream.poll_answer(cx))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                stream.abort();
                return Err(ProtocolError::NoAnswer { hub: hub.clone(), waited: wait }.into());
            }
        }
    }
    Ok(stream)
}

/// A new stream on `link` with `first` written on it, without waiting for the hub's answer;
/// `reused` as for [`open_stream`].
pub(crate) async fn open_and_write(
    link: &Link,
    hub: &HubName,
    first: &[u8],
    reused: bool,
) -> Result<E2eStream, ClientError> {
    let mut stream = open_stream(link, hub, None, reused).await?;
    stream.write_now(first).await?;
    Ok(stream)
}

/// Whether `e` is a write on a 0-RTT stream that the hub's handshake turned down (quinn's
/// `WriteError::ZeroRttRejected`, which `open_stream` and `write_now` pass on inside an I/O
/// error).
pub(crate) fn zero_rtt_rejected(e: &ClientError) -> bool {
    let ClientError::Io(io) = e else { return false };
    io.get_ref().and_then(|inner| inner.downcast_ref::<WriteError>()) == Some(&WriteError::ZeroRttRejected)
}

/// The hub's answer on a stream, as far as it has been read.
#[derive(Debug)]
enum Answer {
    /// Not yet complete: the bytes of the frame so far (never more than the frame).
    Pending(Vec<u8>),
    Accepted,
    /// Refused, or the answer was broken: every later read and write fails with this.
    Failed(Failure),
}

#[derive(Debug, Clone)]
enum Failure {
    Refused { reason: RefusalReason, message: String },
    Revoked,
    Closed,
    Unexpected { got: &'static str },
    BadFrame(keyway_proto::FrameError),
}

impl Failure {
    fn error(&self) -> ClientError {
        match self.clone() {
            Failure::Refused { reason, message } => ClientError::Refused { reason, message },
            Failure::Revoked => ClientError::Revoked,
            Failure::Closed => ProtocolError::StreamClosed { what: "before answering" }.into(),
            Failure::Unexpected { got } => {
                ProtocolError::UnexpectedFrame { expected: "StreamAccepted", got }.into()
            }
            Failure::BadFrame(source) => {
                ProtocolError::BadFrame { what: "in the hub's answer", source }.into()
            }
        }
    }
}

/// One session on the end-to-end connection (see the module docs).
#[derive(Debug)]
pub(crate) struct E2eStream {
    send: SendStream,
    recv: RecvStream,
    /// Counts it as open on its connection (the drain closes an idle one).
    _counted: Counted,
    link: Link,
    answer: Answer,
    reused: bool,
    /// Its first bytes went as 0-RTT early data and the hub took them.
    early: bool,
}

impl E2eStream {
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Writes `data` at once, before the hub's answer (pipelined; early data on a 0-RTT
    /// connection). A failure is typed as for `connect`.
    pub(crate) async fn write_now(&mut self, data: &[u8]) -> Result<(), ClientError> {
        match self.send.write_all(data).await {
            Ok(()) => Ok(()),
            Err(WriteError::ConnectionLost(e)) => Err(self.link.lost(e)),
            Err(e) => Err(stream_code_error(match e {
                WriteError::Stopped(code) => code,
                _ => codes::NORMAL,
            })
            .unwrap_or_else(|| ClientError::Io(io::Error::from(e)))),
        }
    }

    pub(crate) fn mark_early(&mut self) {
        self.early = true;
    }

    pub(crate) fn early(&self) -> bool {
        self.early
    }

    pub(crate) fn abort(&mut self) {
        let _ = self.send.reset(codes::NORMAL);
        let _ = self.recv.stop(codes::NORMAL);
    }

    /// Reads the hub's answer (only the bytes of that one frame).
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        loop {
            let buf = match &mut self.answer {
                Answer::Accepted => return Poll::Ready(Ok(())),
                Answer::Failed(f) => return Poll::Ready(Err(f.error())),
                Answer::Pending(buf) => buf,
            };
            let missing = match Frame::decode(buf) {
                Ok(Some((frame, _))) => {
                    self.answer = match frame {
                        Frame::StreamAccepted => Answer::Accepted,
                        Frame::Refused { reason, message } => {
                            Answer::Failed(Failure::Refused { reason, message })
                        }
                        other => Answer::Failed(Failure::Unexpected { got: other.name() }),
                    };
                    continue;
                }
                Ok(None) => match buf.first_chunk::<HEADER_LEN>() {
                    None => Ok(HEADER_LEN - buf.len()),
                    Some(head) => Header::decode(head).map(|h| HEADER_LEN + h.payload_len - buf.len()),
                },
                Err(e) => Err(e),
            };
            let missing = match missing {
                Ok(missing) => missing,
                Err(e) => {
                    self.answer = Answer::Failed(Failure::BadFrame(e));
                    continue;
                }
            };
            let start = buf.len();
            buf.resize(start + missing, 0);
            // `split_at_mut` rather than indexing: `start` is the length before the resize.
            let (_, tail) = buf.split_at_mut(start);
            let read = self.recv.poll_read(cx, tail);
            let got = match read {
                Poll::Ready(Ok(n)) => n,
                Poll::Pending => {
                    buf.truncate(start);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    buf.truncate(start);
                    return Poll::Ready(Err(self.fail_on_read(e)));
                }
            };
            buf.truncate(start + got);
            if got == 0 {
                self.answer = Answer::Failed(match start {
                    0 => Failure::Closed,
                    _ => Failure::BadFrame(keyway_proto::FrameError::Truncated {
                        field: "answer",
                        needed: missing,
                    }),
                });
            }
        }
    }

    /// A read error before the answer: typed, and remembered when it is final.
    fn fail_on_read(&mut self, e: ReadError) -> ClientError {
        match e {
            ReadError::Reset(code) => {
                let error = stream_code_error(code);
                if matches!(error, Some(ClientError::Revoked)) {
                    self.answer = Answer::Failed(Failure::Revoked);
                }
                error.unwrap_or(ClientError::Io(io::Error::from(ReadError::Reset(code))))
            }
            ReadError::ConnectionLost(e) => self.link.lost(e),
            other => ClientError::Io(io::Error::from(other)),
        }
    }

    /// Replaces quinn's error with the typed reason behind it, where there is one.
    fn typed_io(&self, e: io::Error) -> io::Error {
        let kind = e.kind();
        let typed = match e.get_ref() {
            Some(inner) => {
                if let Some(read) = inner.downcast_ref::<ReadError>() {
                    match read {
                        ReadError::Reset(code) => stream_code_error(*code),
                        ReadError::ConnectionLost(c) => Some(self.link.lost(c.clone())),
                        _ => None,
                    }
                } else if let Some(write) = inner.downcast_ref::<WriteError>() {
                    match write {
                        WriteError::Stopped(code) => stream_code_error(*code),
                        WriteError::ConnectionLost(c) => Some(self.link.lost(c.clone())),
                        _ => None,
                    }
                } else {
                    None
                }
            }
            None => None,
        };
        match typed {
            Some(ClientError::HubConnection(_)) | None => e,
            Some(typed) => io::Error::new(kind, typed),
        }
    }

    /// A write failed: if the hub's answer explains why (it refused and stopped the stream),
    /// that is the error; else the typed write error.
    fn write_failure(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        if let Poll::Ready(Err(answer)) = self.poll_answer(cx) {
            return into_io(answer);
        }
        self.typed_io(e)
    }
}

/// A [`ClientError`] as the `io::Error` an `AsyncRead`/`AsyncWrite` must return; the inner
/// error is the `ClientError` (`e.get_ref()` and downcast to read it).
fn into_io(e: ClientError) -> io::Error {
    let kind = match &e {
        ClientError::Refused { .. } => io::ErrorKind::ConnectionRefused,
        ClientError::Revoked | ClientError::ChannelEnded(_) => io::ErrorKind::ConnectionReset,
        ClientError::Io(e) => e.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for E2eStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_answer(cx)).map_err(into_io)?;
        match std::task::ready!(Pin::new(&mut self.recv).poll_read(cx, buf)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(self.typed_io(e))),
        }
    }
}

impl AsyncWrite for E2eStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Answer::Failed(f) = &self.answer {
            return Poll::Ready(Err(into_io(f.error())));
        }
        match std::task::ready!(AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(e) => Poll::Ready(Err(self.write_failure(cx, e))),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match std::task::ready!(AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(self.write_failure(cx, e))),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match std::task::ready!(AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(self.write_failure(cx, e))),
        }
    }
}

/// An end-to-end encrypted byte stream to a hub's service.
///
/// `shutdown` finishes the stream (a half-close: reading still works until the hub closes its
/// side).
#[derive(Debug)]
pub struct HubStream {
    inner: E2eStream,
    hub_key: PublicKey,
}

impl HubStream {
    pub(crate) fn quic(stream: E2eStream, hub_key: PublicKey) -> Self {
        Self { inner: stream, hub_key }
    }

    /// The hub key this stream was authenticated against.
    pub fn hub_key(&self) -> PublicKey {
        self.hub_key
    }

    /// Whether this stream rode on an end-to-end connection that was already up, so it cost
    /// no handshake at all. (quinn does not tell a client whether its handshake resumed a TLS
    /// session; the hub re-checks the key after every handshake, resumed or not.)
    pub fn resumed(&self) -> bool {
        self.inner.reused()
    }

    /// Whether this stream's first bytes travelled as 0-RTT early data and the hub took them
    /// (only ever for `Client::connect_early`, on a new
    /// connection resumed with a ticket).
    pub fn early_data(&self) -> bool {
        self.inner.early()
    }

    /// Aborts the stream at once in both directions (QUIC reset and stop-sending).
    pub fn abort(&mut self) {
        self.inner.abort();
    }
}

impl AsyncRead for HubStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HubStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_early_write_the_hub_turned_down_is_told_apart_from_other_failures() {
        let io = |e: WriteError| ClientError::Io(io::Error::from(e));
        assert!(zero_rtt_rejected(&io(WriteError::ZeroRttRejected)));
        assert!(!zero_rtt_rejected(&io(WriteError::ClosedStream)));
        assert!(!zero_rtt_rejected(&io(WriteError::Stopped(VarInt::from_u32(0)))));
        assert!(!zero_rtt_rejected(&ClientError::Io(io::Error::other("0-RTT rejected"))));
        assert!(!zero_rtt_rejected(&ClientError::Revoked));
    }
}
