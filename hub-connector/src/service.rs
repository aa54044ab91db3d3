//! The hub's side of its local service: opening connections to it without flooding it, and
//! noticing when it drops them.
//!
//! A burst of app streams (a browser opening dozens of connections, 400 concurrent downloads)
//! would otherwise become as many TCP connects at once. A service with a small listen backlog
//! (Python's `http.server` has 5) that is slow to accept cannot take them: the kernel drops or
//! resets what overflows its accept queue, and those connections end with no byte. A client
//! cannot see when the service accepts, so a connection counts as *in flight* from its connect
//! until the service has answered (sent a first byte), closed it, or [`ANSWER_WAIT`] has passed;
//! at most [`HubConfig::max_service_connects`](crate::HubConfig) are in flight, and the others
//! wait their turn in order (a queue, not a refusal). The wait is short because many clients
//! speak first and some wait for the stream to be accepted before they do (a `connect` then a
//! write; a browser's idle preconnect): their connections free their place after it, so they
//! are slowed to `max_service_connects` per `ANSWER_WAIT`, never stalled. A service that answers
//! at once frees the place at once.
//!
//! A connection that the service closes (or resets) before sending any byte is counted
//! (`keyway_hub_service_unanswered_total`) and logged, at most once per [`LOG_EVERY`] with the
//! number left unlogged, so a broken service cannot flood the log.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};

/// Default of [`HubConfig::max_service_connects`](crate::HubConfig): below the smallest listen
/// backlog in common use (5), so even a service that is slow to accept never overflows it;
/// a service that answers within a millisecond still takes thousands of connections a second.
pub const DEFAULT_MAX_SERVICE_CONNECTS: usize = 4;

/// How long a connection holds its place without an answer from the service (see the module
/// doc).
pub const ANSWER_WAIT: Duration = Duration::from_millis(50);

/// At most one "service closed without answering" line per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a connection to the service could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot connect to the local service {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("the local service {addr} did not accept the connection within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// The bound on connects in flight to one service, and what it counts.
#[derive(Debug)]
pub struct ServiceGate {
    /// `None`: no bound (`max_service_connects` 0).
    permits: Option<Arc<Semaphore>>,
    waiting: AtomicU64,
    in_flight: Arc<AtomicU64>,
    unanswered: AtomicU64,
    log: Mutex<LogLimiter>,
}

impl ServiceGate {
    /// A gate letting `max` connects be in flight at once (0: no bound).
    pub fn new(max: usize) -> Self {
        Self {
            permits: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            waiting: AtomicU64::new(0),
            in_flight: Arc::new(AtomicU64::new(0)),
            unanswered: AtomicU64::new(0),
            log: Mutex::new(LogLimiter::new(LOG_EVERY)),
        }
    }

    /// Streams waiting for their turn to connect.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Connections opened and not yet answered, closed or past their time.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Connections the service closed before sending a byte.
    pub fn unanswered(&self) -> u64 {
        self.unanswered.load(Ordering::Relaxed)
    }

    /// Waits for a place (in order), then connects to `addr` within `timeout`. The place is
    /// held until the returned stream sees the service's first byte or its end, or for at
    /// most [`ANSWER_WAIT`] after the connect.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<ServiceStream, ServiceError> {
        let permit = match &self.permits {
            Some(permits) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let permit = Arc::clone(permits).acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                // The semaphore is never closed.
                permit.ok()
            }
            None => None,
        };
        let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => return Err(ServiceError::Connect { addr, source }),
            Err(_) => return Err(ServiceError::Timeout { addr, timeout }),
        };
        let (answered, heard) = oneshot::channel();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = Arc::clone(&self.in_flight);
        tokio::spawn(async move {
            // Either way (an answer, the end, the stream dropped, the time up) the place is free.
            let _ = tokio::time::timeout(ANSWER_WAIT, heard).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
        Ok(ServiceStream { tcp, answered: Some(answered), got_byte: false, ended_silent: false })
    }

    /// Records how a bridged connection ended: one the service closed without a byte is
    /// counted, and logged unless a line was written less than [`LOG_EVERY`] ago.
    pub fn finished(&self, stream: &ServiceStream, addr: SocketAddr, now: Instant) {
        if !stream.ended_silent {
            return;
        }
        let total = self.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
        let allowed = self.log.lock().map(|mut log| log.allow(now)).unwrap_or(None);
        if let Some(suppressed) = allowed {
            tracing::warn!(
                service = %addr,
                total,
                since_last_line = suppressed,
                "the local service closed a connection without answering (overloaded? its listen \
                 backlog full?); see keyway_hub_service_unanswered_total"
            );
        }
    }
}

/// A connection to the service that notices its first byte and an end before any.
#[derive(Debug)]
pub struct ServiceStream {
    tcp: TcpStream,
    /// Fired (by dropping or sending) at the first byte or the end: frees the gate's place.
    answered: Option<oneshot::Sender<()>>,
    got_byte: bool,
    ended_silent: bool,
}

impl ServiceStream {
    /// The TCP connection, e.g. to set options or write a PROXY header first.
    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// Whether the service closed (or reset) the connection before sending a byte.
    pub fn ended_silent(&self) -> bool {
        self.ended_silent
    }
}

impl AsyncRead for ServiceStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let Poll::Ready(result) = &polled {
            if !this.got_byte {
                let got = buf.filled().len() > before;
                this.got_byte = got;
                // Zero bytes read is the end; an error is a reset.
                this.ended_silent = !got && (result.is_err() || buf.remaining() > 0);
                if let Some(answered) = this.answered.take() {
                    let _ = answered.send(());
                }
            }
        }
        polled
    }
}

impl AsyncWrite for ServiceStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// At most one log line per period; says how many were held back since the last one. Pure:
/// the clock is passed in.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None, suppressed: 0 }
    }

    /// `Some(held back since the last line)` if a line may be written at `now`.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limiter_writes_once_per_period_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut log = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(log.allow(t0), Some(0));
        assert_eq!(log.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(9)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(log.allow(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.allow(t0 + Duration::from_secs(30)), Some(1));
    }
}
