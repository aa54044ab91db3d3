//! The tokio runtime every binding call runs on, started on first use.
//!
//! uniffi drives an exported `async fn` from the foreign side (Python's asyncio loop, Kotlin
//! coroutines, Swift tasks): it polls the future on whatever thread the foreign executor uses
//! and is woken through a callback. Keyway's futures need a tokio context (quinn's endpoint
//! driver, timers, `spawn`), so each one is polled inside this runtime's context
//! ([`InRuntime`]); the I/O drivers and spawned tasks run on the runtime's own two worker
//! threads, so nothing depends on the foreign loop being busy or idle. Cancellation stays the
//! foreign side's: dropping the future (a cancelled coroutine) drops the Keyway future with it.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Runtime};

use crate::error::KeywayError;

/// Two workers: enough to drive the endpoint while the app's own threads call in, and small
/// enough for a phone.
const WORKERS: usize = 2;

static RUNTIME: OnceLock<std::io::Result<Runtime>> = OnceLock::new();

/// The runtime's handle, starting it on first use.
pub(crate) fn handle() -> Result<Handle, KeywayError> {
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("keyway")
            .enable_all()
            .build()
    });
    match runtime {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(KeywayError::Internal { detail: format!("cannot start the Keyway runtime: {e}") }),
    }
}

/// Runs `fut` with the runtime's context entered on every poll.
pub(crate) async fn run<F: Future>(fut: F) -> Result<F::Output, KeywayError> {
    let handle = handle()?;
    Ok(InRuntime { handle, fut: Box::pin(fut) }.await)
}

/// A future polled inside a runtime context (what `async_compat` does, for our own runtime).
struct InRuntime<F> {
    handle: Handle,
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let _entered = this.handle.enter();
        this.fut.as_mut().poll(cx)
    }
}
