//! What a graceful shutdown waits for: every live channel holds a [`SessionToken`] while
//! it lives, and [`Drain::all_ended`] resolves once the last token is dropped.
//!
//! This is mini-redis's `shutdown_complete` channel: each task holds a clone of one
//! `mpsc::Sender` and never sends; the receiver sees the channel close when the last clone is
//! gone. The shared state keeps only a weak sender ([`LiveSessions`]), so it never holds the
//! drain up itself, and the drain waits on the sessions rather than polling a gauge.

use tokio::sync::mpsc;

/// Hands out tokens to sessions (kept in the shared state).
pub(crate) struct LiveSessions(mpsc::WeakSender<()>);

/// Held by a session for as long as the drain should wait for it.
pub(crate) struct SessionToken {
    _held: mpsc::Sender<()>,
}

/// Waits for the sessions (kept by the relay handle).
pub(crate) struct Drain {
    strong: mpsc::Sender<()>,
    closed: mpsc::Receiver<()>,
}

/// A tracker and its drain.
pub(crate) fn tracker() -> (LiveSessions, Drain) {
    let (strong, closed) = mpsc::channel(1);
    (LiveSessions(strong.downgrade()), Drain { strong, closed })
}

impl LiveSessions {
    /// A token for a session starting now; `None` once the drain has seen the last session end
    /// (the relay is closing its connections then anyway).
    pub fn track(&self) -> Option<SessionToken> {
        self.0.upgrade().map(|held| SessionToken { _held: held })
    }
}

impl Drain {
    /// Resolves once every token handed out has been dropped (at once if there is none).
    pub async fn all_ended(self) {
        let Drain { strong, mut closed } = self;
        drop(strong);
        // Nobody sends: `recv` returns `None` exactly when the last sender is gone.
        let _ = closed.recv().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_drain_waits_for_every_token_and_for_nothing_else() {
        let (sessions, drain) = tracker();
        let (a, b) = (sessions.track().unwrap(), sessions.track().unwrap());
        let waiting = tokio::spawn(drain.all_ended());
        drop(a);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "one session still lives");
        // A session that starts during the drain is waited for too.
        let c = sessions.track().unwrap();
        drop(b);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "the late session still lives");
        drop(c);
        waiting.await.unwrap();
        assert!(sessions.track().is_none(), "no tokens once the drain is over");
    }

    #[tokio::test]
    async fn a_drain_without_sessions_ends_at_once() {
        let (sessions, drain) = tracker();
        drop(sessions.track());
        drain.all_ended().await;
    }
}
