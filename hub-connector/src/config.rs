//! [`HubConfig`]: the hub's identity, its relays, its name, its allow-list file and the local
//! service it exposes, plus the timers of the tunnel.
//!
//! A hub may list several relays ([`HubConfig::with_relay`]): the connector keeps one tunnel to
//! each (like cloudflared's HA connections), so one relay going down or draining loses nothing
//! for apps that can reach the others. Relays listed with the same key are the nodes of one
//! relay cluster instead: one tunnel for all of them, to one node at a time (`tunnel`).
//!
//! Defaults are tuned for home NATs: a 15 s QUIC keep-alive (UDP mappings often expire after
//! 30 s) and an application-level ping every 20 s, because liveness must test the data path
//! through the relay, not just a socket (a hub that looks online but is unreachable is the
//! most common complaint about similar systems).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keyway_proto::{HubName, Identity, PublicKey};

/// One relay the hub keeps a tunnel to: its UDP address and its pinned public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayTarget {
    /// UDP address of the relay.
    pub addr: SocketAddr,
    /// The relay's public key (pinned).
    pub key: PublicKey,
}

/// Everything [`start`](crate::start) needs.
#[derive(Debug)]
pub struct HubConfig {
    /// UDP address of the (first) relay.
    pub relay_addr: SocketAddr,
    /// The (first) relay's public key (pinned).
    pub relay_key: PublicKey,
    /// Further relays, each with a tunnel of its own (see [`HubConfig::relays`]). Sessions
    /// arriving through any of them are handled alike.
    pub extra_relays: Vec<RelayTarget>,
    /// The name to register.
    pub name: HubName,
    /// The hub's own key; apps pin its public half.
    pub identity: Identity,
    /// `authorized_apps` (`KEY [LABEL]` lines). Re-read when it changes (polled every
    /// `poll_interval`); a missing file is an empty list. The pairing window file lives next
    /// to it.
    pub apps_file: PathBuf,
    /// How often `authorized_apps` and the pairing window file are polled
    /// ([`POLL_INTERVAL`](crate::POLL_INTERVAL) by default): it bounds how long a revocation
    /// by file edit takes, and how long a new pairing window waits to be published.
    pub poll_interval: Duration,
    /// The local TCP service every accepted session is bridged to.
    pub forward: SocketAddr,
    /// QUIC keep-alive interval (NAT bindings often expire after 30 s).
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Interval of the application-level `Ping`; no `Pong` within it means the tunnel is dead.
    pub ping_interval: Duration,
    /// Smallest reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Time allowed for the QUIC handshake with the relay and for its answer to `Register`.
    pub connect_timeout: Duration,
    /// Time allowed to connect to the local service before refusing a session as
    /// `ServiceUnavailable`.
    pub service_timeout: Duration,
    /// Prefix each connection to the local service with a PROXY protocol v2 header carrying
    /// the app's address as the relay observed it (so the service's logs and login bans see
    /// the real caller instead of 127.0.0.1).
    pub proxy_protocol: bool,
    /// TCP address of an HTTP listener serving Prometheus `/metrics` and `/healthz` (see
    /// [`crate::metrics`]); `None` (the default) runs without one.
    pub metrics_listen: Option<SocketAddr>,
    /// Cap on one app key's concurrent end-to-end connections to this hub (0: no cap); see
    /// [`crate::load`].
    pub max_connections_per_app: usize,
    /// Cap on one app key's concurrent streams (forwarded connections) to this hub (0: no
    /// cap): the streams over it are refused at once with a typed `OverLimit`.
    pub max_streams_per_app: usize,
    /// Connections to the local service in flight at once (opened, not yet answered, for at
    /// most [`crate::service::ANSWER_WAIT`]; see [`crate::service`]); more wait their turn.
    /// 0: no bound.
    pub max_service_connects: usize,
    /// Sessions the hub keeps for single-use TLS tickets (resumption and 0-RTT of end-to-end
    /// connections; see `keyway_proto::tls::enable_single_use_tickets`). The oldest is
    /// forgotten when full, and that app does one full handshake: size it as apps × 2.
    pub session_tickets: usize,
}

/// Default of [`HubConfig::session_tickets`]: 2 048 apps with a connection each, at a few
/// hundred bytes per session (about 1.5 MiB when full).
pub const DEFAULT_SESSION_TICKETS: usize = 4096;

impl HubConfig {
    /// A config with default timers.
    pub fn new(
        relay_addr: SocketAddr,
        relay_key: PublicKey,
        name: HubName,
        identity: Identity,
        apps_file: PathBuf,
        forward: SocketAddr,
    ) -> Self {
        Self {
            relay_addr,
            relay_key,
            extra_relays: Vec::new(),
            name,
            identity,
            apps_file,
            poll_interval: crate::POLL_INTERVAL,
            forward,
            keep_alive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            service_timeout: Duration::from_secs(5),
            proxy_protocol: false,
            metrics_listen: None,
            max_connections_per_app: crate::load::DEFAULT_MAX_CONNECTIONS_PER_APP,
            max_streams_per_app: crate::load::DEFAULT_MAX_STREAMS_PER_APP,
            max_service_connects: crate::service::DEFAULT_MAX_SERVICE_CONNECTS,
            session_tickets: DEFAULT_SESSION_TICKETS,
        }
    }

    /// Adds a relay to keep a tunnel to, besides the first one (with the key of a relay already
    /// listed: another node of that relay cluster, which shares its one tunnel).
    #[must_use]
    pub fn with_relay(mut self, addr: SocketAddr, key: PublicKey) -> Self {
        self.extra_relays.push(RelayTarget { addr, key });
        self
    }

    /// Every relay the hub keeps a tunnel to: the first one (`relay_addr`, `relay_key`), then
    /// `extra_relays` in order.
    pub fn relays(&self) -> Vec<RelayTarget> {
        std::iter::once(RelayTarget { addr: self.relay_addr, key: self.relay_key })
            .chain(self.extra_relays.iter().copied())
            .collect()
    }

    /// Rejects relay lists and timer values that cannot work.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let relays = self.relays();
        for (i, relay) in relays.iter().enumerate() {
            if relays.iter().skip(i + 1).any(|other| other.addr == relay.addr) {
                return Err(ConfigError::RelayListedTwice(relay.addr));
            }
        }
        if self.ping_interval.is_zero() {
            return Err(ConfigError::ZeroPingInterval);
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError::ZeroPollInterval);
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return Err(ConfigError::Backoff);
        }
        if self.connect_timeout.is_zero() || self.service_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        if !self.keep_alive.is_zero() && self.keep_alive >= self.idle_timeout {
            return Err(ConfigError::KeepAliveNotShorterThanIdle);
        }
        Ok(())
    }
}

/// Why a [`HubConfig`] cannot work (checked by [`start`](crate::start) before anything is
/// bound). Each message says what to change, prefixed `configuration:` as the connector has
/// always printed it ([`HubError::Config`](crate::HubError::Config) shows it as it is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: relay {0} is listed twice")]
    RelayListedTwice(SocketAddr),
    #[error("configuration: ping interval must be greater than zero")]
    ZeroPingInterval,
    #[error("configuration: poll interval must be greater than zero")]
    ZeroPollInterval,
    #[error("configuration: backoff must satisfy 0 < backoff_min <= backoff_max")]
    Backoff,
    #[error("configuration: timeouts must be greater than zero")]
    ZeroTimeout,
    #[error(
        "configuration: keep-alive must be shorter than the idle timeout, or the tunnel times out while idle"
    )]
    KeepAliveNotShorterThanIdle,
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    fn config() -> HubConfig {
        HubConfig::new(
            "127.0.0.1:4433".parse().unwrap(),
            Identity::from_seed([1; 32]).public_key(),
            HubName::new("home").unwrap(),
            Identity::from_seed([2; 32]),
            "apps".into(),
            "127.0.0.1:8123".parse().unwrap(),
        )
    }

    #[test]
    fn relays_lists_the_first_relay_then_the_extra_ones() {
        let b: SocketAddr = "127.0.0.1:4434".parse().unwrap();
        let key_b = Identity::from_seed([3; 32]).public_key();
        let config = config().with_relay(b, key_b);
        let relays = config.relays();
        assert_eq!(relays.len(), 2);
        assert_eq!(relays[0].addr, config.relay_addr);
        assert_eq!(relays[1], RelayTarget { addr: b, key: key_b });
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_relay_listed_twice_is_rejected() {
        let config = config();
        let again = config.relay_addr;
        let config = config.with_relay(again, Identity::from_seed([3; 32]).public_key());
        let err = config.validate().unwrap_err();
        assert_eq!(err, ConfigError::RelayListedTwice(again));
        let err = err.to_string();
        assert!(err.contains("listed twice") && err.contains("127.0.0.1:4433"), "{err}");
        // What `start` returns, and the CLI prints, is the same text as before it was typed.
        let hub = crate::HubError::from(ConfigError::RelayListedTwice(again));
        assert_eq!(hub.to_string(), "configuration: relay 127.0.0.1:4433 is listed twice");
    }
}
