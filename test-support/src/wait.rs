//! Bounded waiting: poll a condition until it holds, or fail the test after [`PATIENCE`].
//!
//! Tests wait on state that settles asynchronously (a registration, a drained session, a
//! reloaded file) by polling it; they never sleep a fixed time and never assert how long
//! anything took. The deadline only turns a hang into a failure with a name.

use std::time::Duration;

/// How long any single wait in a test may take before the test fails: a hang guard, not a
/// measurement. 30 s is the larger of the two values the copies of this constant had (the relay's
/// tests had 20 s; e2e and the hub's tests 30 s), so that no test got less patience by sharing it;
/// it is generous because the tests run real QUIC on loopback, often on a few cores shared with
/// other test processes, where one handshake can take seconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How often a condition is polled. Short against [`PATIENCE`], long enough that a check which
/// dials the relay (new connections per source address are rate-limited) stays well under its
/// limits.
pub const POLL: Duration = Duration::from_millis(50);

/// Awaits `fut`, or fails the test naming `what` after [`PATIENCE`].
#[cfg(feature = "async")]
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `check` every [`POLL`] until it returns `Some`, and returns that value; fails the test
/// naming `what` once [`PATIENCE`] has passed. A `bool` condition reads
/// `|| async { cond().then_some(()) }`.
#[cfg(feature = "async")]
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for plain threads (tests that drive a child process without a runtime of
/// their own, or block on one inside `check`).
#[track_caller]
pub fn eventually_blocking<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting for: {what}");
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_wait_returns_the_first_value_the_check_yields() {
        let mut calls = 0;
        let got = eventually_blocking("the third call", || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!(got, 30);
    }

    #[cfg(feature = "async")]
    #[tokio::test(start_paused = true)]
    async fn async_wait_gives_up_only_after_patience() {
        // Paused time: the deadline is virtual, nothing here depends on the wall clock.
        let start = tokio::time::Instant::now();
        let polled = tokio::spawn(async move {
            eventually("never", || async { None::<()> }).await;
        })
        .await;
        assert!(polled.is_err(), "a check that never holds fails the test");
        assert!(start.elapsed() >= PATIENCE, "not before PATIENCE (virtual time)");
    }
}
