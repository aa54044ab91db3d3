//! [`HubConfig`]: the hub's identity, its relay, its name, its allow-list file and the local
//! service it exposes, plus the timers of the tunnel.
//!
//! Defaults are tuned for home NATs: a 15 s QUIC keep-alive (UDP mappings often expire after
//! 30 s) and an application-level ping every 20 s, because liveness must test the data path
//! through the relay, not just a socket (a hub that looks online but is unreachable is the
//! most common complaint about similar systems).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keyway_proto::{HubName, Identity, PublicKey};

/// Everything [`start`](crate::start) needs.
#[derive(Debug)]
pub struct HubConfig {
    /// UDP address of the relay.
    pub relay_addr: SocketAddr,
    /// The relay's public key (pinned).
    pub relay_key: PublicKey,
    /// The name to register.
    pub name: HubName,
    /// The hub's own key; apps pin its public half.
    pub identity: Identity,
    /// `authorized_apps` (`KEY [LABEL]` lines). Re-read when it changes (polled every
    /// 250 ms); a missing file is an empty list. The pairing window file lives next to it.
    pub apps_file: PathBuf,
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
}

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
            name,
            identity,
            apps_file,
            forward,
            keep_alive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            service_timeout: Duration::from_secs(5),
            proxy_protocol: false,
        }
    }

    /// Rejects timer values that cannot work.
    pub(crate) fn validate(&self) -> Result<(), crate::HubError> {
        let bad = |what: &str| Err(crate::HubError::Config(what.to_owned()));
        if self.ping_interval.is_zero() {
            return bad("ping interval must be greater than zero");
        }
        if self.backoff_min.is_zero() || self.backoff_max < self.backoff_min {
            return bad("backoff must satisfy 0 < backoff_min <= backoff_max");
        }
        if self.connect_timeout.is_zero() || self.service_timeout.is_zero() {
            return bad("timeouts must be greater than zero");
        }
        if !self.keep_alive.is_zero() && self.keep_alive >= self.idle_timeout {
            return bad(
                "keep-alive must be shorter than the idle timeout, or the tunnel times out while idle",
            );
        }
        Ok(())
    }
}
