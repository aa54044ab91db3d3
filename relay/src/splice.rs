//! Splicing: once a session is accepted, the relay forwards bytes between the app's stream and
//! the hub's stream without looking at them (they are end-to-end TLS).
//!
//! Each direction moves quinn's own `Bytes` chunks (`read_chunk` → `write_chunk`): no copy and
//! no relay-side buffer beyond one chunk, so QUIC flow control on both legs provides the
//! backpressure. The two directions run concurrently and end independently, so a half-close
//! (FIN on one side) is passed on as a FIN while the other direction keeps flowing. A reset is
//! passed on as a reset, a STOP_SENDING as a STOP_SENDING, with the same error code.
//!
//! Two limits apply here, both read afresh from the live [`LimitsCell`] so a reload changes
//! them for running sessions too: the per-key byte rate (each chunk pays into the app's and
//! the hub's token buckets and waits off any debt before it is written, so backpressure again
//! falls to QUIC flow control) and the idle session timeout (no byte either way for that long:
//! both streams are reset with [`codes::LIMIT`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{ReadError, RecvStream, SendStream, StoppedError, VarInt, WriteError};
use tokio::time::Instant;

use crate::config::{Direction, ForwardTap};
use crate::limits::{LimitsCell, TokenBucket};
use crate::stats::{LimitKind, RelayStats};
use keyway_proto::codes;

/// Longest the idle watchdog sleeps before re-reading the limits (a reload may change them).
const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// Largest chunk taken from a stream at once.
const CHUNK: usize = 64 * 1024;

/// How one direction of a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PumpEnd {
    /// Clean end of stream, passed on as a FIN.
    Finished,
    /// The sender reset its stream (or its connection died); we reset ours with this code.
    Reset(VarInt),
    /// The receiver stopped reading (or its connection died); we stopped the source with this code.
    Stopped(VarInt),
}

/// How a whole splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpliceEnd {
    /// Both directions ended on their own.
    Done { app_to_hub: PumpEnd, hub_to_app: PumpEnd },
    /// The session was cut by the relay (key revoked); every stream was reset/stopped with REVOKED.
    Revoked,
    /// Nothing moved for `idle_session_timeout`; every stream was reset/stopped with LIMIT.
    Idle,
}

/// What a splice reports to and is limited by.
pub(crate) struct SpliceCtx<'a> {
    pub stats: &'a RelayStats,
    pub tap: Option<&'a ForwardTap>,
    pub limits: &'a LimitsCell,
    /// The byte buckets every chunk pays into (app key's and hub key's); empty: no rate limit.
    pub buckets: Vec<Arc<TokenBucket>>,
}

/// When the session last moved a byte, in milliseconds since it started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Resolves once the session has been idle for the (current) idle session timeout.
async fn idle_for_too_long(limits: &LimitsCell, activity: &Activity) {
    loop {
        let timeout = limits.get().idle_session_timeout;
        let now = Instant::now();
        if timeout.is_zero() {
            tokio::time::sleep(IDLE_RECHECK).await;
            continue;
        }
        let deadline = activity.last() + timeout;
        if now >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.min(now + IDLE_RECHECK)).await;
    }
}

/// Charges `len` bytes to every bucket at the current rate and waits off the debt.
async fn throttle(ctx: &SpliceCtx<'_>, len: usize) {
    if ctx.buckets.is_empty() {
        return;
    }
    let rate = ctx.limits.get().bytes_per_second_per_key as f64;
    if rate <= 0.0 {
        return;
    }
    let now = Instant::now();
    let wait = ctx.buckets.iter().map(|b| b.take_debt(len as f64, rate, rate, now)).max().unwrap_or_default();
    if !wait.is_zero() {
        ctx.stats.limit_hit(LimitKind::BytesPerSecondPerKey);
        tokio::time::sleep(wait).await;
    }
}

/// The error code to pass on when a connection, not a stream, failed: the peer's application
/// close code if it sent one (REPLACED, REVOKED, ...), otherwise a normal close.
fn connection_code(e: &quinn::ConnectionError) -> VarInt {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code,
        _ => codes::NORMAL,
    }
}

/// Moves one direction until it ends. Borrows the streams so that the caller can still reset
/// them if the session is revoked mid-flight.
async fn pump(
    from: &mut RecvStream,
    to: &mut SendStream,
    direction: Direction,
    ctx: &SpliceCtx<'_>,
    activity: &Activity,
) -> PumpEnd {
    // The receiver may stop reading while we wait for input; notice that too, not only on the
    // next write, so the source is told at once.
    let stopped = to.stopped();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            read = from.read_chunk(CHUNK, true) => match read {
                Ok(Some(chunk)) => {
                    let len = chunk.bytes.len();
                    activity.touch();
                    if let Some(tap) = ctx.tap {
                        tap(direction, &chunk.bytes);
                    }
                    throttle(ctx, len).await;
                    match to.write_chunk(chunk.bytes).await {
                        Ok(()) => ctx.stats.forwarded(direction, len),
                        Err(e) => {
                            let code = match e {
                                WriteError::Stopped(code) => code,
                                WriteError::ConnectionLost(e) => connection_code(&e),
                                WriteError::ClosedStream | WriteError::ZeroRttRejected => codes::NORMAL,
                            };
                            let _ = from.stop(code);
                            return PumpEnd::Stopped(code);
                        }
                    }
                }
                Ok(None) => {
                    let _ = to.finish();
                    return PumpEnd::Finished;
                }
                Err(e) => {
                    let code = match e {
                        ReadError::Reset(code) => code,
                        ReadError::ConnectionLost(e) => connection_code(&e),
                        ReadError::ClosedStream | ReadError::IllegalOrderedRead | ReadError::ZeroRttRejected => {
                            codes::NORMAL
                        }
                    };
                    let _ = to.reset(code);
                    return PumpEnd::Reset(code);
                }
            },
            stop = &mut stopped => {
                // `Ok(None)` only follows our own finish(), which ends the loop first.
                let code = match stop {
                    Ok(Some(code)) => code,
                    Ok(None) => codes::NORMAL,
                    Err(StoppedError::ConnectionLost(e)) => connection_code(&e),
                    Err(StoppedError::ZeroRttRejected) => codes::NORMAL,
                };
                let _ = from.stop(code);
                return PumpEnd::Stopped(code);
            }
        }
    }
}

/// Splices `app` and `hub` (each a `(send, recv)` pair) until both directions end, or until
/// `revoked` resolves, in which case every stream is reset/stopped with [`codes::REVOKED`].
/// Counts `sessions_active` for its whole duration.
pub(crate) async fn splice(
    app: (SendStream, RecvStream),
    hub: (SendStream, RecvStream),
    ctx: SpliceCtx<'_>,
    revoked: impl Future<Output = ()>,
) -> SpliceEnd {
    struct Active<'a>(&'a RelayStats);
    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.session_down();
        }
    }
    ctx.stats.session_up();
    let _active = Active(ctx.stats);

    let (mut app_send, mut app_recv) = app;
    let (mut hub_send, mut hub_recv) = hub;
    let activity = Activity { start: Instant::now(), last_ms: AtomicU64::new(0) };
    let both = async {
        tokio::join!(
            pump(&mut app_recv, &mut hub_send, Direction::AppToHub, &ctx, &activity),
            pump(&mut hub_recv, &mut app_send, Direction::HubToApp, &ctx, &activity),
        )
    };
    let (end, code) = tokio::select! {
        (app_to_hub, hub_to_app) = both => return SpliceEnd::Done { app_to_hub, hub_to_app },
        () = revoked => (SpliceEnd::Revoked, codes::REVOKED),
        () = idle_for_too_long(ctx.limits, &activity) => {
            ctx.stats.limit_hit(LimitKind::IdleSessionTimeout);
            (SpliceEnd::Idle, codes::LIMIT)
        }
    };
    // The pumps are dropped here (both read_chunk and write_chunk are cancel-safe enough:
    // whatever was mid-flight is being discarded by the resets anyway).
    let _ = app_send.reset(code);
    let _ = hub_send.reset(code);
    let _ = app_recv.stop(code);
    let _ = hub_recv.stop(code);
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::testing::endpoint_pair;

    /// Two real loopback QUIC connections standing for the app's and the hub's, each with a
    /// stream pair: (remote end held by the test, relay end handed to `splice`).
    struct Legs {
        _eps: Vec<(quinn::Endpoint, quinn::Connection)>,
        app_peer: (SendStream, RecvStream),
        app_relay: (SendStream, RecvStream),
        hub_peer: (SendStream, RecvStream),
        hub_relay: (SendStream, RecvStream),
    }

    type Keep = Vec<(quinn::Endpoint, quinn::Connection)>;

    async fn leg() -> (Keep, (SendStream, RecvStream), (SendStream, RecvStream)) {
        let (server, client) = endpoint_pair().await;
        let addr = server.local_addr().unwrap();
        let connecting = client.connect(addr, keyway_proto::tls::SERVER_NAME).unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        let (c, s) = (c.unwrap(), s.unwrap());
        let (mut send, recv) = c.open_bi().await.unwrap();
        // A stream exists for the peer only once something is sent on it.
        send.write_all(b"x").await.unwrap();
        let (relay_send, mut relay_recv) = s.accept_bi().await.unwrap();
        let mut one = [0u8; 1];
        relay_recv.read_exact(&mut one).await.unwrap();
        // Connections close when their last handle goes: keep them for the test's duration.
        (vec![(server, s), (client, c)], (send, recv), (relay_send, relay_recv))
    }

    async fn legs() -> Legs {
        let (mut e1, app_peer, app_relay) = leg().await;
        let (e2, hub_peer, hub_relay) = leg().await;
        e1.extend(e2);
        Legs { _eps: e1, app_peer, app_relay, hub_peer, hub_relay }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_honoured() {
        let Legs { _eps, app_peer, app_relay, hub_peer, hub_relay } = legs().await;
        let stats = RelayStats::default();
        let unlimited = LimitsCell::new(crate::limits::Limits::unlimited());
        let seen = Arc::new(Mutex::new((0usize, 0usize)));
        let seen2 = Arc::clone(&seen);
        let tap: ForwardTap = Arc::new(move |dir, bytes| {
            let mut s = seen2.lock().unwrap();
            match dir {
                Direction::AppToHub => s.0 += bytes.len(),
                Direction::HubToApp => s.1 += bytes.len(),
            }
        });
        let (mut app_send, mut app_recv) = app_peer;
        let (mut hub_send, mut hub_recv) = hub_peer;
        let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let up = upload.clone();
        let peers = async move {
            // The app sends everything and half-closes; the hub reads to the end, *then* answers
            // on its still-open direction, and closes.
            app_send.write_all(&up).await.unwrap();
            app_send.finish().unwrap();
            let got = hub_recv.read_to_end(1 << 20).await.unwrap();
            assert_eq!(got, up);
            hub_send.write_all(b"answer after the app's FIN").await.unwrap();
            hub_send.finish().unwrap();
            let back = app_recv.read_to_end(1 << 20).await.unwrap();
            assert_eq!(back, b"answer after the app's FIN");
        };
        let ctx = SpliceCtx { stats: &stats, tap: Some(&tap), limits: &unlimited, buckets: Vec::new() };
        let (end, ()) = tokio::join!(splice(app_relay, hub_relay, ctx, std::future::pending()), peers);
        assert_eq!(end, SpliceEnd::Done { app_to_hub: PumpEnd::Finished, hub_to_app: PumpEnd::Finished });
        assert_eq!(stats.bytes_app_to_hub(), upload.len() as u64);
        assert_eq!(stats.bytes_hub_to_app(), 26);
        assert_eq!(*seen.lock().unwrap(), (upload.len(), 26));
        assert_eq!((stats.sessions_opened(), stats.sessions_active()), (1, 0));
    }

    #[tokio::test]
    async fn a_reset_becomes_a_reset_with_the_same_code() {
        let Legs { _eps, app_peer, app_relay, hub_peer, hub_relay } = legs().await;
        let stats = RelayStats::default();
        let unlimited = LimitsCell::new(crate::limits::Limits::unlimited());
        let (mut app_send, _app_recv) = app_peer;
        let (_hub_send, mut hub_recv) = hub_peer;
        let peers = async move {
            app_send.write_all(b"partial").await.unwrap();
            let mut buf = [0u8; 7];
            hub_recv.read_exact(&mut buf).await.unwrap();
            app_send.reset(VarInt::from_u32(77)).unwrap();
            let err = hub_recv.read_to_end(1024).await.unwrap_err();
            assert!(matches!(err, quinn::ReadToEndError::Read(ReadError::Reset(c)) if c.into_inner() == 77));
            // Close the other direction too so the splice ends.
            drop(_hub_send);
        };
        let ctx = SpliceCtx { stats: &stats, tap: None, limits: &unlimited, buckets: Vec::new() };
        let (end, ()) = tokio::join!(splice(app_relay, hub_relay, ctx, std::future::pending()), peers);
        let SpliceEnd::Done { app_to_hub, .. } = end else { panic!("{end:?}") };
        assert_eq!(app_to_hub, PumpEnd::Reset(VarInt::from_u32(77)));
    }

    #[tokio::test]
    async fn revocation_resets_both_sides_with_revoked() {
        let Legs { _eps, app_peer, app_relay, hub_peer, hub_relay } = legs().await;
        let stats = RelayStats::default();
        let unlimited = LimitsCell::new(crate::limits::Limits::unlimited());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (mut app_send, mut app_recv) = app_peer;
        let (_hub_send, mut hub_recv) = hub_peer;
        let peers = async move {
            app_send.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            hub_recv.read_exact(&mut buf).await.unwrap();
            tx.send(()).unwrap();
            let err = app_recv.read_to_end(1024).await.unwrap_err();
            assert!(matches!(err, quinn::ReadToEndError::Read(ReadError::Reset(c)) if c == codes::REVOKED));
            let err = app_send.stopped().await.unwrap();
            assert_eq!(err, Some(codes::REVOKED));
        };
        let ctx = SpliceCtx { stats: &stats, tap: None, limits: &unlimited, buckets: Vec::new() };
        let revoked = async move {
            let _ = rx.await;
        };
        let (end, ()) = tokio::join!(splice(app_relay, hub_relay, ctx, revoked), peers);
        assert_eq!(end, SpliceEnd::Revoked);
        assert_eq!(stats.sessions_active(), 0);
    }
}
