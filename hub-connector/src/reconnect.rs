//! The reconnect policy: which delay after which end of a tunnel attempt.
//!
//! Pure (the random source is a parameter, no clock, no socket), so every rule is a unit test;
//! the tunnel task (`tunnel`) and the load generator's raw hubs (`keyway-loadtest
//! storm --raw`) both call it, so a storm measured there follows the connector's own rules.
//!
//! The rules, and why:
//! * a registered tunnel that is lost (a verified stateless reset after a relay crash, a dead
//!   liveness ping, an idle timeout) redials after the backoff floor: the relay, or its
//!   successor, is most likely there at once;
//! * a connection the relay refused before its handshake (QUIC `CONNECTION_REFUSED`: the relay
//!   drains, the source is over its per-IP rate, or a reconnect storm fills its handshakes in
//!   flight) is retried *soon*, within [`LOAD_RETRY_MAX`], with jitter, however often it
//!   happens, and without growing the exponential backoff: the relay is alive and admitting
//!   at the rate its cores allow, so the hub should be back in line for the next free slot,
//!   not 30 s away. The spread still doubles with consecutive refusals (1, 2, 4 s, capped), so
//!   a long storm's retries cost the relay one small refusal per hub every few seconds;
//! * any other failure (no answer, a handshake or `Register` that failed or timed out, a typed
//!   refusal) draws the next capped exponential delay, with full jitter ([`Backoff`]);
//! * a tunnel replaced by another connector with this key keeps its backoff growing: two
//!   connectors fighting over one name should slow down, not spin;
//! * `GoAway` waits the relay's hint plus jitter ([`go_away_delay`]).
//!
//! Nothing is ever given up on: every rule returns a delay.

use std::time::Duration;

use rand::Rng;

use crate::backoff::{go_away_delay, uniform, Backoff};

/// The longest wait after a refusal for load, however many came in a row.
pub const LOAD_RETRY_MAX: Duration = Duration::from_secs(5);
/// The spread after the first refusal for load in a row (doubling up to [`LOAD_RETRY_MAX`]).
pub const LOAD_RETRY_FIRST: Duration = Duration::from_secs(1);

/// How a tunnel attempt ended, as far as the next delay is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Registered, then lost (reset, liveness, idle timeout, closed by the relay).
    Lost,
    /// Registered, then replaced by another connection of this hub's key.
    Replaced,
    /// The relay sent `GoAway` with this retry hint.
    GoAway(Duration),
    /// The relay refused the connection before its handshake (QUIC `CONNECTION_REFUSED`).
    RefusedForLoad,
    /// Never registered: no answer, the handshake or `Register` failed or timed out.
    Failed,
    /// The relay answered `Register` (or later) with a typed refusal.
    Refused,
}

/// The reconnect state of one tunnel: the exponential backoff of failures and the count of
/// refusals for load in a row.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    min: Duration,
    load_refusals: u32,
}

impl Reconnect {
    /// The policy with the connector's `backoff_min` (the floor of every delay but a `GoAway`
    /// hint's) and `backoff_max` (the cap of the exponential backoff).
    pub fn new(min: Duration, max: Duration) -> Self {
        let backoff = Backoff::new(min, max);
        Self { min: min.max(Duration::from_millis(1)), backoff, load_refusals: 0 }
    }

    /// The delay before the next attempt after one that `ended` so.
    pub fn delay<R: Rng + ?Sized>(&mut self, ended: Ended, rng: &mut R) -> Duration {
        if ended != Ended::RefusedForLoad {
            self.load_refusals = 0;
        }
        match ended {
            Ended::Lost => {
                self.backoff.reset();
                self.backoff.next_delay(rng)
            }
            Ended::GoAway(hint) => {
                self.backoff.reset();
                go_away_delay(hint, self.min, rng)
            }
            Ended::RefusedForLoad => {
                let doublings = self.load_refusals.min(16);
                self.load_refusals = self.load_refusals.saturating_add(1);
                let spread = LOAD_RETRY_FIRST.saturating_mul(1 << doublings).min(LOAD_RETRY_MAX);
                // A floor configured above the load cap must not stretch the bound.
                let floor = self.min.min(LOAD_RETRY_MAX);
                uniform(floor, spread.max(floor), rng)
            }
            Ended::Replaced | Ended::Failed | Ended::Refused => self.backoff.next_delay(rng),
        }
    }

    /// Refusals for load in a row so far.
    pub fn load_refusals(&self) -> u32 {
        self.load_refusals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn policy() -> (Reconnect, StdRng) {
        (Reconnect::new(MIN, MAX), StdRng::seed_from_u64(7))
    }

    #[test]
    fn a_lost_registered_tunnel_redials_after_the_floor_even_after_many_failures() {
        let (mut p, mut rng) = policy();
        for _ in 0..20 {
            p.delay(Ended::Failed, &mut rng);
        }
        for _ in 0..100 {
            let d = p.delay(Ended::Lost, &mut rng);
            assert!(d >= MIN && d <= 2 * MIN, "{d:?}");
        }
    }

    #[test]
    fn refusals_for_load_are_retried_within_seconds_forever_and_spread() {
        let (mut p, mut rng) = policy();
        let first: Vec<Duration> = (0..200)
            .map(|_| {
                let mut fresh = Reconnect::new(MIN, MAX);
                fresh.delay(Ended::RefusedForLoad, &mut rng)
            })
            .collect();
        assert!(first.iter().all(|d| *d >= MIN && *d <= LOAD_RETRY_FIRST), "first spread is 1 s");
        let mut draws = Vec::new();
        for _ in 0..10_000 {
            let d = p.delay(Ended::RefusedForLoad, &mut rng);
            assert!(d >= MIN && d <= LOAD_RETRY_MAX, "{d:?} outside [{MIN:?}, {LOAD_RETRY_MAX:?}]");
            draws.push(d);
        }
        assert_eq!(p.load_refusals(), 10_000, "counted, never given up on");
        let late = &draws[100..];
        let low = late.iter().filter(|d| **d < Duration::from_secs(2)).count();
        let high = late.iter().filter(|d| **d > Duration::from_secs(4)).count();
        assert!(low > 1000 && high > 1000, "jitter covers the range: {low} low, {high} high");
    }

    #[test]
    fn refusals_for_load_do_not_grow_the_backoff_and_a_failure_after_them_starts_low() {
        let (mut p, mut rng) = policy();
        for _ in 0..50 {
            p.delay(Ended::RefusedForLoad, &mut rng);
        }
        let d = p.delay(Ended::Failed, &mut rng);
        assert!(d <= 2 * MIN, "the first failure's step, not the cap: {d:?}");
        assert_eq!(p.load_refusals(), 0, "any other end starts the load spread over");
        let d = p.delay(Ended::RefusedForLoad, &mut rng);
        assert!(d <= LOAD_RETRY_FIRST, "{d:?}");
    }

    #[test]
    fn failures_and_typed_refusals_back_off_to_the_cap_and_replacement_keeps_growing() {
        let (mut p, mut rng) = policy();
        let mut longest = Duration::ZERO;
        for i in 0..200 {
            let ended = [Ended::Failed, Ended::Refused, Ended::Replaced][i % 3];
            let d = p.delay(ended, &mut rng);
            assert!(d >= MIN && d <= MAX);
            longest = longest.max(d);
        }
        assert!(longest > LOAD_RETRY_MAX * 2, "failures reach far beyond the load spread: {longest:?}");
    }

    #[test]
    fn go_away_waits_its_hint_and_resets_the_backoff() {
        let (mut p, mut rng) = policy();
        for _ in 0..20 {
            p.delay(Ended::Failed, &mut rng);
        }
        let d = p.delay(Ended::GoAway(Duration::from_secs(2)), &mut rng);
        assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(3), "{d:?}");
        assert!(p.delay(Ended::Failed, &mut rng) <= 2 * MIN, "reset by the GoAway");
    }

    #[test]
    fn a_floor_above_the_load_cap_still_gives_a_bounded_delay() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut p = Reconnect::new(Duration::from_secs(10), Duration::from_secs(60));
        for _ in 0..100 {
            let d = p.delay(Ended::RefusedForLoad, &mut rng);
            assert!(d <= LOAD_RETRY_MAX, "{d:?}");
        }
    }
}
