//! Whether the relay still answers this socket, and the signal to nudge the relay connection
//! when it does not.
//!
//! A path socket has one peer on the wire, the relay, so when the relay stops hearing it every
//! channel of the socket stalls at once. Two causes look alike from here: a NAT that rebound
//! the socket's mapping (the relay drops channel datagrams from an address its relay connection
//! has not migrated to, and its answers go to the old mapping), and a relay that died. Both are
//! cured or diagnosed by sending on the relay connection: the relay sees the new address and
//! migrates (channels follow), or the connection learns the relay is gone. quinn would send
//! on it only at the next keep-alive, up to 15 s away.
//!
//! So channel data that goes out while nothing comes back from the relay for
//! [`SUSPECT_AFTER`](crate::route::SUSPECT_AFTER) raises the signal [`Pulse::suspect`]
//! (at most once per that interval), which the owner of the relay connection (the client or
//! the hub's tunnel) answers by sending on it. The decision is the route's pure
//! [`Liveness`]; a task checks it when the first unanswered send is a second old, so the nudge
//! does not wait for quinn's next, backed-off retransmission.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

use crate::route::{Health, Liveness, SUSPECT_AFTER};

/// The relay path's liveness and its two signals.
#[derive(Debug, Default)]
pub(crate) struct Pulse {
    state: Mutex<State>,
    /// Woken by the first unanswered send, so that a timer can look again a second later.
    armed: Notify,
    /// Raised when the relay path is suspect; the relay connection's owner waits on it.
    suspect: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    liveness: Liveness,
    /// When the signal was last raised.
    raised: Option<Instant>,
}

impl Pulse {
    /// Channel data left for the relay at `now`.
    pub(crate) fn data_sent(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let was_answered = state.liveness.health(now) == Health::Live;
        state.liveness.on_data_sent(now);
        if was_answered {
            self.armed.notify_one();
        }
        self.raise_if_suspect(&mut state, now);
    }

    /// Something arrived from the relay at `now`.
    pub(crate) fn heard(&self, now: Instant) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).liveness.on_heard(now);
    }

    /// Looks again at `now` (the timer's check).
    pub(crate) fn check(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.raise_if_suspect(&mut state, now);
    }

    /// The signal the relay connection's owner waits on.
    pub(crate) fn suspect(&self) -> Arc<Notify> {
        self.suspect.clone()
    }

    fn raise_if_suspect(&self, state: &mut State, now: Instant) {
        let quiet = state.raised.is_none_or(|at| now.saturating_duration_since(at) >= SUSPECT_AFTER);
        if state.liveness.health(now) == Health::Suspect && quiet {
            state.raised = Some(now);
            self.suspect.notify_one();
        }
    }

    /// Waits for the first unanswered send, then checks a second later; forever. The socket
    /// spawns it when a runtime is there and aborts it when dropped.
    pub(crate) async fn watch(pulse: Arc<Pulse>) {
        loop {
            pulse.armed.notified().await;
            let armed_at = Instant::now();
            tokio::time::sleep(SUSPECT_AFTER).await;
            pulse.check(Instant::now().max(armed_at + SUSPECT_AFTER));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::time::Duration;

    #[test]
    fn unanswered_data_raises_the_signal_once_per_interval_and_an_answer_clears_it() {
        let pulse = Pulse::default();
        let t = Instant::now();
        let at = |ms| t + Duration::from_millis(ms);
        let suspect = pulse.suspect();
        pulse.data_sent(at(0));
        pulse.check(at(999));
        pulse.data_sent(at(1000));
        pulse.data_sent(at(1500));
        // One permit stored: the signal was raised exactly once so far.
        let raised = || futures_now(suspect.notified());
        assert!(raised(), "raised at 1 s");
        assert!(!raised(), "not again within the interval");
        pulse.check(at(2000));
        assert!(raised(), "again a second later while still unanswered");
        pulse.heard(at(2100));
        pulse.data_sent(at(2200));
        pulse.check(at(3100));
        assert!(!raised(), "the silence counts from the first send after the answer");
        pulse.check(at(3200));
        assert!(raised());
    }

    /// Whether a `Notified` completes at once (a stored permit).
    fn futures_now(notified: tokio::sync::futures::Notified<'_>) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().poll(&mut cx).is_ready()
    }
}
