//! The stop signal of a running connector: the [`HubHandle`](crate::HubHandle) holds the
//! sender, and every task it spawned (a tunnel per relay, the apps watcher) holds a
//! [`Shutdown`] and ends at its next `select!` turn once a stop is requested.
//!
//! One `watch` channel rather than a cancellation per task, so a dropped handle stops
//! everything too (the sender going away counts as a stop).

use tokio::sync::watch;

/// The sending half, kept by the handle.
pub(crate) type StopSender = watch::Sender<bool>;

/// A task's view of the stop signal (cheap to clone: one per task).
#[derive(Debug, Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A fresh signal: the sender for the handle, the first receiver for the tasks.
    pub(crate) fn new() -> (StopSender, Shutdown) {
        let (stop, rx) = watch::channel(false);
        (stop, Shutdown(rx))
    }

    /// Whether a stop was requested already.
    pub(crate) fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once a stop is requested (or the handle is gone). Cancel-safe, so it can sit
    /// in any `select!`.
    pub(crate) async fn requested(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_or_a_dropped_handle_ends_the_wait() {
        let (stop, mut shutdown) = Shutdown::new();
        let mut other = shutdown.clone();
        assert!(!shutdown.is_requested());
        stop.send(true).unwrap();
        shutdown.requested().await;
        other.requested().await;
        assert!(shutdown.is_requested());

        let (stop, mut shutdown) = Shutdown::new();
        drop(stop);
        shutdown.requested().await;
    }
}
