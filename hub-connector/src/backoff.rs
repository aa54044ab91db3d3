//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Retrying forever is the point (owners should never have to script restarts after an outage),
//! and jitter is what keeps thousands of hubs from reconnecting in lock-step after a relay
//! restart. This module is pure: the random source is a parameter, so bounds are unit-tested.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff state. Attempt *n* (from 0) waits a uniformly random time in
/// `[min, min(max, min·2ⁿ⁺¹)]`; [`reset`](Backoff::reset) after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `min` is the floor of every delay (never a hot loop), `max` the cap.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self { min, max: max.max(min), attempt: 0 }
    }

    /// The largest delay the next attempt may draw.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.saturating_add(1)).unwrap_or(u32::MAX);
        self.min.checked_mul(factor).unwrap_or(self.max).min(self.max)
    }

    /// Draws the next delay and advances the attempt counter.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        // Stop growing once capped, so the shift above can never overflow.
        if ceiling < self.max {
            self.attempt = self.attempt.saturating_add(1);
        }
        uniform(self.min, ceiling, rng)
    }

    /// Forgets past failures (call after a successful registration).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays have been drawn since the last reset (capped once at `max`).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// A uniformly random duration in `[low, high]` (`low` if `high < low`).
pub fn uniform<R: Rng + ?Sized>(low: Duration, high: Duration, rng: &mut R) -> Duration {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let (lo, hi) = (micros(low), micros(high));
    if hi <= lo {
        return low;
    }
    Duration::from_micros(rng.random_range(lo..=hi))
}

/// The wait after a relay's `GoAway`: its hint plus up to half of it (at least `min_jitter`)
/// of random jitter, so hubs do not all come back in the same instant.
pub fn go_away_delay<R: Rng + ?Sized>(hint: Duration, min_jitter: Duration, rng: &mut R) -> Duration {
    let spread = (hint / 2).max(min_jitter);
    hint + uniform(Duration::ZERO, spread, rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn delays_stay_within_floor_and_growing_ceiling() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(MIN, MAX);
        let mut ceiling = MIN;
        for _ in 0..100 {
            let expected_ceiling = b.ceiling();
            assert!(expected_ceiling >= ceiling, "ceiling never shrinks");
            ceiling = expected_ceiling;
            let d = b.next_delay(&mut rng);
            assert!(d >= MIN && d <= ceiling && d <= MAX, "{d:?} outside [{MIN:?}, {ceiling:?}]");
        }
        assert_eq!(b.ceiling(), MAX, "after many failures the cap is reached");
        b.reset();
        assert_eq!(b.ceiling(), MIN * 2);
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut b = Backoff::new(MIN, MAX);
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(b.ceiling());
            b.next_delay(&mut rng);
        }
        assert_eq!(seen[0], Duration::from_millis(400));
        assert_eq!(seen[1], Duration::from_millis(800));
        assert_eq!(seen[2], Duration::from_millis(1600));
        assert_eq!(seen[9], MAX);
    }

    #[test]
    fn jitter_spreads_delays() {
        // Many hubs failing at once must not retry in lock-step: at the cap, draws should
        // cover the range rather than cluster.
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(MIN, MAX);
        for _ in 0..20 {
            b.next_delay(&mut rng);
        }
        let draws: Vec<Duration> = (0..1000).map(|_| b.next_delay(&mut rng)).collect();
        let low = draws.iter().filter(|d| **d < MAX / 4).count();
        let high = draws.iter().filter(|d| **d > MAX * 3 / 4).count();
        assert!(low > 100 && high > 100, "poor spread: {low} low, {high} high");
        let distinct: std::collections::HashSet<_> = draws.iter().collect();
        assert!(distinct.len() > 900);
    }

    #[test]
    fn degenerate_configs_do_not_panic() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay(&mut rng) >= Duration::from_millis(1));
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(b.next_delay(&mut rng), Duration::from_secs(10));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        for _ in 0..200 {
            b.next_delay(&mut rng);
        }
    }

    #[test]
    fn go_away_waits_at_least_the_hint() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..100 {
            let d = go_away_delay(Duration::from_secs(2), MIN, &mut rng);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(3));
            let d = go_away_delay(Duration::ZERO, MIN, &mut rng);
            assert!(d <= MIN);
        }
    }
}
