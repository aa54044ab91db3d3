//! The thread that owns the relay's UDP socket and runs quinn's endpoint driver, and the
//! [`quinn::Runtime`] that puts the driver there while every connection stays on the relay's
//! multi-threaded runtime.
//!
//! Why: forwarded channel data never leaves the endpoint driver (it is routed inside
//! [`ForwardingSocket::poll_recv`](crate::forward::ForwardingSocket)), so under bulk traffic
//! the driver is the relay's only busy task. On a multi-threaded tokio runtime each of its
//! wake-ups also wakes an idle worker to look for work (futex calls, context switches) and
//! may move the driver between cores; measured in `loadtest/README.md`, a one-worker runtime
//! cost about a quarter less CPU per forwarded GiB. One worker for everything would also put
//! every handshake's crypto on one core, which a reconnect storm needs spread. So the socket
//! is registered with a current-thread runtime of its own, whose thread sleeps in `epoll_wait`
//! on that one socket, and the driver is spawned there; connection drivers (TLS, streams) and
//! the relay's tasks keep the main runtime and its cores.
//!
//! quinn spawns through one [`quinn::Runtime`] for both: the endpoint driver first, from
//! `Endpoint::new_with_abstract_socket`, then one driver per connection. [`SplitRuntime`]
//! sends the first spawn to the I/O thread and the rest to the main runtime.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The I/O thread: a current-thread tokio runtime on a named OS thread, running until this
/// handle is dropped.
pub(crate) struct IoThread {
    handle: Handle,
    /// Dropping it ends the thread's `block_on`, which then drops the runtime.
    _stop: oneshot::Sender<()>,
}

impl IoThread {
    /// Starts the thread (named `keyway-relay-io`).
    pub fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new().name("keyway-relay-io".into()).spawn(move || {
            // `Err` (the sender dropped) is the stop signal too.
            let _ = runtime.block_on(stopped);
            // Whatever the endpoint left (its driver ends once the last handle is gone) is
            // dropped with the runtime here, on this thread.
        })?;
        Ok(Self { handle, _stop: stop })
    }

    /// The runtime to give `Endpoint::new_with_abstract_socket`: see [`SplitRuntime`].
    pub fn runtime(&self) -> Arc<dyn Runtime> {
        Arc::new(SplitRuntime {
            io: self.handle.clone(),
            main: Handle::current(),
            endpoint_spawned: AtomicBool::new(false),
        })
    }
}

impl fmt::Debug for IoThread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoThread").finish_non_exhaustive()
    }
}

/// quinn's tokio runtime, except that sockets are registered with the I/O thread's reactor and
/// the first future spawned (the endpoint driver) runs there, the others (connection drivers)
/// on the main runtime. Timers are tokio's, created where they are polled.
#[derive(Debug)]
struct SplitRuntime {
    io: Handle,
    main: Handle,
    endpoint_spawned: AtomicBool,
}

impl Runtime for SplitRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        quinn::TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        if self.endpoint_spawned.swap(true, Ordering::AcqRel) {
            self.main.spawn(future);
        } else {
            self.io.spawn(future);
        }
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        // Registered with the I/O thread's reactor, so the socket's readiness wakes that thread
        // only (the relay's socket, through `ForwardingSocket::wrap`; `Endpoint::rebind` too).
        let _context = self.io.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_spawn_runs_on_the_io_thread_and_the_rest_on_the_main_runtime() {
        let io = IoThread::start().expect("thread");
        let runtime = io.runtime();
        let mut names = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel();
            runtime.spawn(Box::pin(async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
            }));
            names.push(rx.await.expect("spawned future ran"));
        }
        assert_eq!(names[0].as_deref(), Some("keyway-relay-io"));
        for name in &names[1..] {
            assert_ne!(
                name.as_deref(),
                Some("keyway-relay-io"),
                "connection drivers stay on the main runtime"
            );
        }
    }
}
