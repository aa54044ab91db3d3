//! [`Limits`]: what one relay allows, and the token buckets that enforce the rate limits.
//!
//! New connections are rate-limited per *source*, and a source is an IPv4 address or an IPv6
//! prefix ([`rate_key`]): a home line gets a whole /64 (often a /56 or /48), so keying IPv6 by
//! the full address would hand every such line 2^64 buckets.
//!
//! Every limit can be changed at run time ([`RelayHandle::set_limits`](crate::RelayHandle::set_limits),
//! SIGHUP in the binary): the rates live here, not in the buckets, so a new rate applies to the
//! next token taken. A value of `0` switches a limit off (except `max_streams_per_connection`,
//! which QUIC needs to be at least 1).
//!
//! The buckets are the textbook kind: `rate` tokens per second up to `burst`. The byte bucket
//! lets a chunk through at once and makes the *next* one wait off the debt, so a chunk larger
//! than the burst never deadlocks and the long-run rate is still exact. They have no clock of
//! their own: every call is told the time (`now`, as quinn-proto is), so they are tested
//! deterministically and the callers decide which clock counts.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use keyway_proto::PublicKey;
use tokio::time::Instant;

/// The relay's limits. [`Limits::default`] suits a small self-hosted relay (a household or a
/// club: tens of hubs, a handful of apps each); `docs/operating.md` explains each.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Hubs registered at once (a replacement of a registered hub always passes). 0: no limit.
    pub max_hubs: u32,
    /// Sessions (connect or pair) one hub carries at once. 0: no limit.
    pub max_sessions_per_hub: u32,
    /// Sessions one app key holds at one hub at once, below `max_sessions_per_hub` so that
    /// one app cannot take all of a hub's sessions. 0: no limit.
    pub max_sessions_per_app: u32,
    /// Pairing sessions one hub carries at once. Anyone who knows a hub's name and key may
    /// open one while its pairing window is open, with as many throw-away keys as they like,
    /// so this keeps them from taking the hub's `max_sessions_per_hub`; a hub pairs one
    /// device at a time. 0: no limit.
    pub max_pairing_sessions_per_hub: u32,
    /// Bidirectional streams a peer may have open on one connection (QUIC flow control; the
    /// peer simply cannot open more). Applies to connections made after a change.
    pub max_streams_per_connection: u32,
    /// New QUIC connections per second from one source (an IPv4 address, or an IPv6 prefix
    /// of `new_connections_ipv6_prefix` bits; token bucket rate); over it, the connection is
    /// refused before any handshake work. 0: no limit.
    pub new_connections_per_ip: f64,
    /// Burst of the per-source bucket: connections one source may open back to back.
    pub new_connections_burst: u32,
    /// Prefix length (1–128) that makes one IPv6 source for `new_connections_per_ip`: every
    /// address of one /64 (the default) shares one bucket. 128 keys by the full address.
    pub new_connections_ipv6_prefix: u8,
    /// Payload bytes per second one key (app or hub) may move through the relay, both
    /// directions and all its sessions together. 0: no limit.
    pub bytes_per_second_per_key: u64,
    /// Time a QUIC handshake may take before it is abandoned. 0: QUIC's idle timeout only.
    pub handshake_timeout: Duration,
    /// How long after its handshake (and how often after that) a connection must carry
    /// something authorized, or be an app connection a registered hub lists, to stay; else
    /// it is closed with the `LIMIT` code (see `docs/security.md`). 0: never reviewed.
    pub unauthorized_grace: Duration,
    /// Connections of keys the relay does not know that are not yet authorized, all sources
    /// together; over it, a stranger's connection is closed with the `LIMIT` code right after
    /// its handshake (known keys still pass). 0: no limit.
    pub max_unauthorized_connections: u32,
    /// Idle app connections (nothing authorized on them) one registered hub's allow-list may
    /// keep on the relay; the others are closed at their review. 0: no limit.
    pub max_idle_apps_per_hub: u32,
    /// A channel with no datagram in either direction for this long is cut. 0: never.
    pub idle_session_timeout: Duration,
    /// New connections per second (all sources together) above which the relay asks for QUIC
    /// address validation (a Retry round trip) before spending a handshake. 0: always.
    pub retry_threshold: u32,
    /// Datagrams held, all sources together, for channels that are not live yet: an app sends
    /// its end-to-end first flight with its `ChannelOpen`, so it may arrive before the relay
    /// has authorized (each held up to 250 ms, at most 8 per source IP address, at most 1 500
    /// bytes each). 0: none (the app's
    /// first flight is then lost and resent by quinn a PTO later).
    pub max_held_datagrams: u32,
    /// QUIC handshakes the relay works on at once (accepted, not yet complete); over it, a
    /// new connection is refused before any handshake work (QUIC `CONNECTION_REFUSED`), which
    /// the hub connector retries within a few seconds. This is what keeps a reconnect storm
    /// from queueing handshakes past the peers' patience, where every attempt would time out
    /// and the cores would work on nothing anybody still waits for. 0: no limit.
    pub max_handshakes_in_flight: u32,
    /// QUIC handshakes one source (an IPv4 address, or an IPv6 prefix of
    /// `new_connections_ipv6_prefix` bits) may have in flight at once; over it, its new
    /// connection is refused before any handshake work. Keeps a few addresses from holding
    /// every slot with handshakes they never finish. 0: no limit.
    pub max_handshakes_per_source: u32,
    /// Handshakes in flight from which a new connection whose address is not yet validated
    /// must prove it (a QUIC Retry round trip) before it gets a slot: a spoofed source cannot,
    /// and a validated attempt may take the slot of the oldest unvalidated one when all are
    /// taken. 0: never asked on this ground (`retry_threshold` still applies).
    pub validate_above_handshakes_in_flight: u32,
    /// Time a handshake from an address not validated by a Retry may take before it is
    /// abandoned (at most `handshake_timeout`): a legitimate handshake needs 1.5 round trips,
    /// a half-open one holds its slot only this long. 0: `handshake_timeout` applies.
    pub unvalidated_handshake_timeout: Duration,
}

/// Default `max_hubs`.
pub const DEFAULT_MAX_HUBS: u32 = 1000;
/// Default `max_sessions_per_hub`.
pub const DEFAULT_MAX_SESSIONS_PER_HUB: u32 = 256;
/// Default `max_sessions_per_app`: a quarter of a hub's sessions, far above what a browser
/// behind `keyway forward` keeps open (about six connections per site).
pub const DEFAULT_MAX_SESSIONS_PER_APP: u32 = 64;
/// Default `max_streams_per_connection`.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Default `max_pairing_sessions_per_hub`.
pub const DEFAULT_MAX_PAIRING_SESSIONS_PER_HUB: u32 = 4;
/// Default `new_connections_per_ip` (per second).
pub const DEFAULT_NEW_CONNECTIONS_PER_IP: f64 = 10.0;
/// Default `new_connections_burst`.
pub const DEFAULT_NEW_CONNECTIONS_BURST: u32 = 30;
/// Default `new_connections_ipv6_prefix`: a /64, the smallest prefix a home line is given.
pub const DEFAULT_NEW_CONNECTIONS_IPV6_PREFIX: u8 = 64;
/// Default `bytes_per_second_per_key`: 25 MiB/s (about 200 Mbit/s), more than a home uplink.
pub const DEFAULT_BYTES_PER_SECOND_PER_KEY: u64 = 25 * 1024 * 1024;
/// Default `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `unauthorized_grace`: long enough for a hub to register and an app to open its
/// first session over a slow link, short enough that a stranger holds little.
pub const DEFAULT_UNAUTHORIZED_GRACE: Duration = Duration::from_secs(10);
/// Default `max_unauthorized_connections`: about 35 MiB of strangers at most.
pub const DEFAULT_MAX_UNAUTHORIZED_CONNECTIONS: u32 = 1000;
/// Default `max_idle_apps_per_hub`: a household's phones and laptops, with room to spare.
pub const DEFAULT_MAX_IDLE_APPS_PER_HUB: u32 = 32;
/// Default `idle_session_timeout`.
pub const DEFAULT_IDLE_SESSION_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `max_held_datagrams`: 32 first flights, under 400 KiB.
pub const DEFAULT_MAX_HELD_DATAGRAMS: u32 = 256;
/// Default `retry_threshold` (new connections per second).
pub const DEFAULT_RETRY_THRESHOLD: u32 = 100;
/// Default `max_handshakes_in_flight`. A handshake costs the relay about 0.6 ms of CPU
/// (`keyway-loadtest handshakes`) and is in flight for about 1.5 round trips, so 256 admit
/// about 1 700 per second at 100 ms round trips (more at shorter ones) while queueing at most
/// about 0.15 s of CPU work per core of a 2-core relay: far below the connector's 5 s connect
/// timeout. Without the cap, 1 600 attempts per second on that relay completed 210 per second
/// (13 000 timed out); with it, 500–900 and none timed out.
pub const DEFAULT_MAX_HANDSHAKES_IN_FLIGHT: u32 = 256;
/// Default `max_handshakes_per_source`: a household's hubs and apps reconnecting at once fit
/// many times over; 16 sources cannot take all of the default 256 slots.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 16;
/// Default `validate_above_handshakes_in_flight`: a quarter of the default
/// `max_handshakes_in_flight`.
pub const DEFAULT_VALIDATE_ABOVE_HANDSHAKES_IN_FLIGHT: u32 = 64;
/// Default `unvalidated_handshake_timeout`: a handshake over a 1 s round trip with a lost
/// flight still fits.
pub const DEFAULT_UNVALIDATED_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_hubs: DEFAULT_MAX_HUBS,
            max_sessions_per_hub: DEFAULT_MAX_SESSIONS_PER_HUB,
            max_sessions_per_app: DEFAULT_MAX_SESSIONS_PER_APP,
            max_pairing_sessions_per_hub: DEFAULT_MAX_PAIRING_SESSIONS_PER_HUB,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            new_connections_per_ip: DEFAULT_NEW_CONNECTIONS_PER_IP,
            new_connections_burst: DEFAULT_NEW_CONNECTIONS_BURST,
            new_connections_ipv6_prefix: DEFAULT_NEW_CONNECTIONS_IPV6_PREFIX,
            bytes_per_second_per_key: DEFAULT_BYTES_PER_SECOND_PER_KEY,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            unauthorized_grace: DEFAULT_UNAUTHORIZED_GRACE,
            max_unauthorized_connections: DEFAULT_MAX_UNAUTHORIZED_CONNECTIONS,
            max_idle_apps_per_hub: DEFAULT_MAX_IDLE_APPS_PER_HUB,
            idle_session_timeout: DEFAULT_IDLE_SESSION_TIMEOUT,
            retry_threshold: DEFAULT_RETRY_THRESHOLD,
            max_held_datagrams: DEFAULT_MAX_HELD_DATAGRAMS,
            max_handshakes_in_flight: DEFAULT_MAX_HANDSHAKES_IN_FLIGHT,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            validate_above_handshakes_in_flight: DEFAULT_VALIDATE_ABOVE_HANDSHAKES_IN_FLIGHT,
            unvalidated_handshake_timeout: DEFAULT_UNVALIDATED_HANDSHAKE_TIMEOUT,
        }
    }
}

impl Limits {
    /// No limits at all (streams: QUIC's maximum), for tests and benchmarks.
    pub fn unlimited() -> Self {
        Self {
            max_hubs: 0,
            max_sessions_per_hub: 0,
            max_sessions_per_app: 0,
            max_pairing_sessions_per_hub: 0,
            max_streams_per_connection: u32::MAX >> 2,
            new_connections_per_ip: 0.0,
            new_connections_burst: 1,
            new_connections_ipv6_prefix: 128,
            bytes_per_second_per_key: 0,
            handshake_timeout: Duration::ZERO,
            unauthorized_grace: Duration::ZERO,
            max_unauthorized_connections: 0,
            max_idle_apps_per_hub: 0,
            idle_session_timeout: Duration::ZERO,
            retry_threshold: u32::MAX,
            max_held_datagrams: DEFAULT_MAX_HELD_DATAGRAMS,
            max_handshakes_in_flight: 0,
            max_handshakes_per_source: 0,
            validate_above_handshakes_in_flight: 0,
            unvalidated_handshake_timeout: Duration::ZERO,
        }
    }

    /// Checks the values that have no "off" meaning.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.max_streams_per_connection == 0 {
            return Err(LimitsError::NoStreams);
        }
        if !self.new_connections_per_ip.is_finite() || self.new_connections_per_ip < 0.0 {
            return Err(LimitsError::BadConnectionRate);
        }
        if self.new_connections_per_ip > 0.0 && self.new_connections_burst == 0 {
            return Err(LimitsError::NoBurst);
        }
        if !(1..=128).contains(&self.new_connections_ipv6_prefix) {
            return Err(LimitsError::BadIpv6Prefix(self.new_connections_ipv6_prefix));
        }
        let durations = [
            ("handshake_timeout", self.handshake_timeout),
            ("unvalidated_handshake_timeout", self.unvalidated_handshake_timeout),
            ("unauthorized_grace", self.unauthorized_grace),
            ("idle_session_timeout", self.idle_session_timeout),
        ];
        if let Some((field, _)) = durations.into_iter().find(|(_, d)| *d > MAX_DURATION) {
            return Err(LimitsError::DurationTooLong { field });
        }
        Ok(())
    }
}

/// The longest duration a limit may be: deadlines are the clock plus a limit, and a clock plus
/// `Duration::MAX` overflows. A year is "never" for every timer here.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which value of a [`Limits`] cannot be used (see [`Limits::validate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("max_streams_per_connection must be at least 1")]
    NoStreams,
    #[error("new_connections_per_ip must be a rate of zero or more")]
    BadConnectionRate,
    #[error("new_connections_burst must be at least 1")]
    NoBurst,
    #[error("new_connections_ipv6_prefix must be a prefix length from 1 to 128, not {0}")]
    BadIpv6Prefix(u8),
    #[error("{field} must be at most a year (365 days); use 0 to switch it off where that is allowed")]
    DurationTooLong { field: &'static str },
}

/// The source a connection from `ip` is rate-limited as: an IPv4 address as it is (an
/// IPv4-mapped IPv6 address from a dual-stack socket counts as the IPv4 address), an IPv6
/// address cut to its first `ipv6_prefix` bits (values above 128 count as 128).
pub fn rate_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let keep = u32::from(ipv6_prefix.min(128));
            // A shift by 128 (prefix 0) is out of range for u128: nothing is kept then.
            let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// The limits in force, swapped as a whole on reload; readers take a cheap `Arc` snapshot.
#[derive(Debug)]
pub(crate) struct LimitsCell(RwLock<Arc<Limits>>);

impl LimitsCell {
    pub fn new(limits: Limits) -> Self {
        Self(RwLock::new(Arc::new(limits)))
    }
    pub fn get(&self) -> Arc<Limits> {
        Arc::clone(&self.0.read().unwrap_or_else(|p| p.into_inner()))
    }
    pub fn set(&self, limits: Limits) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(limits);
    }
}

/// A token bucket whose rate and burst are passed in at each use (see the module docs).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket full at `now`.
    pub fn new(burst: f64, now: Instant) -> Self {
        Self { state: Mutex::new((burst, now)) }
    }

    /// Adds what `rate` earned since the last call, up to `burst`. A `now` earlier than the
    /// last call's (callers read the clock before they take the lock) earns nothing and does
    /// not move the bucket's time back.
    fn refill(state: &mut (f64, Instant), rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * rate).min(burst);
        state.1 = state.1.max(now);
    }

    /// Takes one token if there is one at `now`.
    pub fn try_take(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::refill(&mut state, rate, burst, now);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens at `now`, going into debt if needed, and returns how long the caller
    /// must wait for the debt to be paid off (zero if there was no debt).
    pub fn take_debt(&self, n: f64, rate: f64, burst: f64, now: Instant) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::refill(&mut state, rate, burst, now);
        state.0 -= n;
        if state.0 >= 0.0 || rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-state.0 / rate)
        }
    }

    /// Whether the bucket is full at `now` (so dropping it loses nothing).
    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::refill(&mut state, rate, burst, now);
        state.0 >= burst
    }
}

/// The buckets of every source address and every key, the global arrival bucket that
/// decides when to ask for address validation.
#[derive(Debug)]
pub(crate) struct Buckets {
    per_ip: DashMap<IpAddr, TokenBucket>,
    per_key: DashMap<PublicKey, Arc<TokenBucket>>,
    /// Per (hub key, app key): what one app's channels to one hub move, charged instead of the
    /// hub key's own bucket so one app cannot spend its hub's budget for the others.
    per_pair: DashMap<(PublicKey, PublicKey), Arc<TokenBucket>>,
    arrivals: TokenBucket,
}

impl Buckets {
    /// No buckets yet; the arrival bucket starts full at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            per_ip: DashMap::new(),
            per_key: DashMap::new(),
            per_pair: DashMap::new(),
            arrivals: TokenBucket::new(f64::MAX, now),
        }
    }

    /// Whether a new connection from `ip` at `now` is within `new_connections_per_ip` for its
    /// source ([`rate_key`]).
    pub fn admit_ip(&self, ip: IpAddr, limits: &Limits, now: Instant) -> bool {
        if limits.new_connections_per_ip <= 0.0 {
            return true;
        }
        let burst = f64::from(limits.new_connections_burst.max(1));
        let source = rate_key(ip, limits.new_connections_ipv6_prefix);
        let bucket = self.per_ip.entry(source).or_insert_with(|| TokenBucket::new(burst, now));
        bucket.try_take(limits.new_connections_per_ip, burst, now)
    }

    /// Counts a connection attempt at `now`; `true` if attempts currently arrive faster than
    /// `retry_threshold` per second (then unvalidated addresses must do a Retry round trip).
    pub fn over_retry_threshold(&self, limits: &Limits, now: Instant) -> bool {
        let rate = f64::from(limits.retry_threshold);
        // A one-second burst: a threshold of N admits N back-to-back arrivals without Retry.
        !self.arrivals.try_take(rate, rate, now)
    }

    /// The shared byte bucket of `key` (created full at `now`).
    pub fn key_bucket(&self, key: &PublicKey, limits: &Limits, now: Instant) -> Arc<TokenBucket> {
        let burst = limits.bytes_per_second_per_key as f64;
        Arc::clone(self.per_key.entry(*key).or_insert_with(|| Arc::new(TokenBucket::new(burst, now))).value())
    }

    /// The byte buckets a channel between `app` and `hub` charges: the app key's own (all its
    /// channels, to every hub) and the (hub, app) pair's. The hub key has no bucket of its own:
    /// charging it for every app let one app that sends at the rate make every other app of
    /// that hub drop (`rate_limited`); per pair, each app gets the full rate to its hub, and a
    /// hub moves at most the rate per app it serves (bounded by `max_sessions_per_hub`).
    pub fn channel_buckets(
        &self,
        app: &PublicKey,
        hub: &PublicKey,
        limits: &Limits,
        now: Instant,
    ) -> [Arc<TokenBucket>; 2] {
        let burst = limits.bytes_per_second_per_key as f64;
        let pair = Arc::clone(
            self.per_pair
                .entry((*hub, *app))
                .or_insert_with(|| Arc::new(TokenBucket::new(burst, now)))
                .value(),
        );
        [self.key_bucket(app, limits, now), pair]
    }

    /// Forgets buckets that carry no state worth keeping at `now` (full, and for keys unused by
    /// any session), so the maps stay as small as the live population.
    pub fn sweep(&self, limits: &Limits, now: Instant) {
        let (rate, burst) = (limits.new_connections_per_ip, f64::from(limits.new_connections_burst.max(1)));
        self.per_ip.retain(|_, b| !b.is_full(rate, burst, now));
        let bytes = limits.bytes_per_second_per_key as f64;
        self.per_key.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full(bytes, bytes, now));
        self.per_pair.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full(bytes, bytes, now));
    }

    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        (self.per_ip.len(), self.per_key.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds after `t0`: the tests build their own timeline, no clock involved.
    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let b = TokenBucket::new(3.0, t0);
        assert!((0..3).all(|_| b.try_take(1.0, 3.0, t0)));
        assert!(!b.try_take(1.0, 3.0, t0));
        assert!(b.try_take(1.0, 3.0, at(t0, 1.0)));
        assert!(!b.try_take(1.0, 3.0, at(t0, 1.0)));
    }

    #[test]
    fn byte_debt_is_paid_off_at_the_rate() {
        let t0 = Instant::now();
        let b = TokenBucket::new(100.0, t0);
        assert_eq!(b.take_debt(100.0, 100.0, 100.0, t0), Duration::ZERO);
        // 50 more bytes at 100 B/s: half a second of debt.
        assert_eq!(b.take_debt(50.0, 100.0, 100.0, t0), Duration::from_millis(500));
        // A quarter of a second later a quarter of it is paid: 25 more bytes wait 0.5 s again.
        assert_eq!(b.take_debt(25.0, 100.0, 100.0, at(t0, 0.25)), Duration::from_millis(500));
    }

    #[test]
    fn a_bucket_never_earns_from_a_clock_that_goes_back() {
        let t0 = Instant::now();
        let b = TokenBucket::new(5.0, at(t0, 10.0));
        assert!((0..5).all(|_| b.try_take(1.0, 5.0, at(t0, 10.0))));
        assert!(!b.try_take(1.0, 5.0, t0), "an earlier time earns nothing");
        // Had the bucket's time gone back to t0, 11 s would have refilled it to the burst.
        assert!(b.try_take(1.0, 5.0, at(t0, 11.0)));
        assert!(!b.try_take(1.0, 5.0, at(t0, 11.0)), "one second earned one token");
    }

    #[test]
    fn per_ip_limits_and_the_sweep_forgets_idle_sources() {
        let t0 = Instant::now();
        let limits = Limits { new_connections_per_ip: 1.0, new_connections_burst: 2, ..Limits::default() };
        let buckets = Buckets::new(t0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(buckets.admit_ip(ip, &limits, t0) && buckets.admit_ip(ip, &limits, t0));
        assert!(!buckets.admit_ip(ip, &limits, t0));
        assert!(buckets.admit_ip(other, &limits, t0), "each address has its own bucket");
        assert!(buckets.admit_ip(ip, &Limits { new_connections_per_ip: 0.0, ..limits.clone() }, t0));
        buckets.sweep(&limits, at(t0, 0.5));
        assert_eq!(buckets.sizes().0, 2, "buckets still refilling are kept");
        buckets.sweep(&limits, at(t0, 5.0));
        assert_eq!(buckets.sizes().0, 0);
    }

    #[test]
    fn ipv6_sources_are_prefixes_and_ipv4_sources_are_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // One /64: every address in it is one source; the next /64 is another.
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1"), 64), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 64), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("2001:db8:1:3::1"), 64), ip("2001:db8:1:3::"));
        // Other lengths, including ones that cut inside a 16-bit group.
        assert_eq!(rate_key(ip("2001:db8:1:2ff::1"), 56), ip("2001:db8:1:200::"));
        assert_eq!(rate_key(ip("2001:db8:ffff::1"), 48), ip("2001:db8:ffff::"));
        assert_eq!(rate_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(rate_key(ip("2001:db8::1"), 200), ip("2001:db8::1"), "above 128 keeps all");
        assert_eq!(rate_key(ip("2001:db8::1"), 1), ip("::"));
        assert_eq!(rate_key(ip("a001:db8::1"), 1), ip("8000::"));
        assert_eq!(rate_key(ip("2001:db8::1"), 0), ip("::"), "no shift overflow");
        assert_eq!(rate_key(ip("::1"), 64), ip("::"));
        // IPv4 keeps its full address, whether it arrives plain or IPv4-mapped.
        assert_eq!(rate_key(ip("192.0.2.77"), 64), ip("192.0.2.77"));
        assert_eq!(rate_key(ip("::ffff:192.0.2.77"), 64), ip("192.0.2.77"));
        assert_ne!(rate_key(ip("192.0.2.77"), 1), rate_key(ip("192.0.2.78"), 1));
    }

    #[test]
    fn one_ipv6_prefix_shares_one_bucket() {
        let t0 = Instant::now();
        let limits = Limits { new_connections_per_ip: 1.0, new_connections_burst: 2, ..Limits::default() };
        let buckets = Buckets::new(t0);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(buckets.admit_ip(ip("2001:db8:0:1::1"), &limits, t0));
        assert!(buckets.admit_ip(ip("2001:db8:0:1::2"), &limits, t0));
        assert!(!buckets.admit_ip(ip("2001:db8:0:1:ffff::3"), &limits, t0), "same /64, bucket empty");
        assert!(buckets.admit_ip(ip("2001:db8:0:2::1"), &limits, t0), "another /64 is unaffected");
        // Keyed by the full address, the same sources are separate.
        let full = Limits { new_connections_ipv6_prefix: 128, ..limits.clone() };
        assert!(buckets.admit_ip(ip("2001:db8:0:1::4"), &full, t0));
        assert_eq!(buckets.sizes().0, 3);
    }

    #[test]
    fn key_buckets_in_use_survive_the_sweep() {
        let t0 = Instant::now();
        let limits = Limits::default();
        let buckets = Buckets::new(t0);
        let key = keyway_proto::Identity::from_seed([7; 32]).public_key();
        let held = buckets.key_bucket(&key, &limits, t0);
        assert!(Arc::ptr_eq(&held, &buckets.key_bucket(&key, &limits, t0)), "one bucket per key");
        buckets.sweep(&limits, at(t0, 60.0));
        assert_eq!(buckets.sizes().1, 1, "a session still holds it");
        drop(held);
        buckets.sweep(&limits, at(t0, 60.0));
        assert_eq!(buckets.sizes().1, 0);
    }

    #[test]
    fn retry_is_asked_for_above_the_threshold_only() {
        let t0 = Instant::now();
        let limits = Limits { retry_threshold: 2, ..Limits::default() };
        let buckets = Buckets::new(t0);
        // A threshold of 2 admits 2 back-to-back arrivals, then 2 more per second.
        assert!(!buckets.over_retry_threshold(&limits, t0));
        assert!(!buckets.over_retry_threshold(&limits, t0));
        assert!(buckets.over_retry_threshold(&limits, t0));
        assert!(!buckets.over_retry_threshold(&limits, at(t0, 1.0)));
    }

    #[test]
    fn validation_names_the_bad_value() {
        assert!(Limits::default().validate().is_ok());
        assert!(Limits::unlimited().validate().is_ok());
        let bad = Limits { max_streams_per_connection: 0, ..Limits::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("max_streams_per_connection"));
        let bad = Limits { new_connections_per_ip: f64::NAN, ..Limits::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("new_connections_per_ip"));
        let bad = Limits { new_connections_burst: 0, ..Limits::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("new_connections_burst"));
        for prefix in [0, 129] {
            let bad = Limits { new_connections_ipv6_prefix: prefix, ..Limits::default() };
            assert!(bad.validate().unwrap_err().to_string().contains("new_connections_ipv6_prefix"));
        }
        assert!(Limits { new_connections_ipv6_prefix: 128, ..Limits::default() }.validate().is_ok());
        let forever = Limits { unauthorized_grace: Duration::MAX, ..Limits::default() };
        assert_eq!(forever.validate(), Err(LimitsError::DurationTooLong { field: "unauthorized_grace" }));
        let year = Limits { idle_session_timeout: MAX_DURATION, ..Limits::default() };
        assert_eq!(year.validate(), Ok(()));
    }
}
