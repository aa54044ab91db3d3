//! The QUIC link to the relay, shared by apps (`keyway_client::Client`) and the hub connector.
//!
//! It owns the details both sides must get right in the same way:
//! * the UDP socket (relay's address family, port 0, 4 MiB buffers when the OS allows, because
//!   the default ~208 KiB buffers drop packets under handshake bursts and bulk transfers);
//! * the transport timers (quinn has *no* keep-alive by default, and NAT mappings expire);
//! * pinning the relay key and turning a failed dial into a typed error: a recorded
//!   [`KeyMismatch`](keyway_proto::tls::KeyMismatch) becomes
//!   [`PathError::RelayKeyMismatch`], silence becomes [`PathError::RelayUnreachable`].

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::tls::MismatchSlot;
use keyway_proto::{Identity, PublicKey};
use quinn::{Connection, Endpoint, VarInt};

use crate::error::{PathConfigError, PathError};

/// UDP socket buffer size requested (best effort; the OS may cap it).
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Binds a client-side quinn endpoint on port 0 of `relay_addr`'s address family, with
/// enlarged socket buffers when the OS allows. Must be called inside a tokio runtime.
pub fn bind_endpoint(relay_addr: SocketAddr) -> Result<Endpoint, PathError> {
    let socket = bind_socket(relay_addr)?;
    let runtime = quinn::default_runtime().ok_or(PathConfigError::NoRuntime)?;
    let endpoint = Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?;
    Ok(endpoint)
}

/// The UDP socket of a relay link: port 0 of `relay_addr`'s address family, non-blocking,
/// 4 MiB buffers when the OS allows. Shared with the path socket ([`crate::socket`]).
pub fn bind_socket(relay_addr: SocketAddr) -> Result<std::net::UdpSocket, PathError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let local: SocketAddr = match relay_addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: an unprivileged process may get less than asked, which is still fine.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(error = %e, "could not enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::debug!(error = %e, "could not enlarge the UDP send buffer");
    }
    socket.bind(&local.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Transport timers for a relay link: keep-alive (NAT bindings) and idle timeout.
pub fn transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::TransportConfig, PathError> {
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|source| PathConfigError::IdleTimeoutTooLarge { idle_timeout, source })?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle));
    if !keep_alive.is_zero() {
        transport.keep_alive_interval(Some(keep_alive));
    }
    Ok(transport)
}

/// Dials the relay with a pinned key; reusable for every (re)connect of one identity.
#[derive(Debug, Clone)]
pub struct RelayDialer {
    config: quinn::ClientConfig,
    mismatch: MismatchSlot,
    relay_addr: SocketAddr,
    relay_key: PublicKey,
    connect_timeout: Duration,
}

impl RelayDialer {
    /// Builds the QUIC client config once: reusing it keeps rustls' session cache, so
    /// reconnects can resume.
    pub fn new(
        identity: &Identity,
        relay_addr: SocketAddr,
        relay_key: PublicKey,
        keep_alive: Duration,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Self, PathError> {
        let (crypto, mismatch) =
            keyway_proto::tls::quic_client_crypto(identity, relay_key, keyway_proto::ALPN_RELAY)?;
        let mut config = quinn::ClientConfig::new(crypto);
        config.transport_config(Arc::new(transport_config(keep_alive, idle_timeout)?));
        Ok(Self { config, mismatch, relay_addr, relay_key, connect_timeout })
    }

    /// Lets the relay keep up to `streams` bidirectional streams open at once on the
    /// connection. A hub needs this: every channel the relay introduces is
    /// a stream the relay opens, and quinn's default credit of 100 would make the 101st wait
    /// while the relay's own limit allows more. Apps never accept streams and keep the default.
    pub fn accept_streams(
        mut self,
        streams: u32,
        keep_alive: Duration,
        idle_timeout: Duration,
    ) -> Result<Self, PathError> {
        let mut transport = transport_config(keep_alive, idle_timeout)?;
        transport.max_concurrent_bidi_streams(streams.into());
        self.config.transport_config(Arc::new(transport));
        Ok(self)
    }

    /// The relay address this dialer connects to.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay_addr
    }

    /// Connects to the relay. Silence for `connect_timeout` is
    /// [`PathError::RelayUnreachable`]; another relay key is [`PathError::RelayKeyMismatch`].
    pub async fn dial(&self, endpoint: &Endpoint) -> Result<Connection, PathError> {
        // A mismatch left over from an earlier attempt must not be blamed on this one.
        let _ = self.mismatch.take();
        let connecting = endpoint
            .connect_with(self.config.clone(), self.relay_addr, keyway_proto::tls::SERVER_NAME)
            .map_err(|source| PathConfigError::Dial { relay: self.relay_addr, source })?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(match self.mismatch.take() {
                    Some(m) => PathError::RelayKeyMismatch(m),
                    None => {
                        PathError::RelayUnreachable { addr: self.relay_addr, waited: self.connect_timeout }
                    }
                })
            }
            Ok(Err(e)) => {
                return Err(match self.mismatch.take() {
                    Some(m) => PathError::RelayKeyMismatch(m),
                    None => PathError::Connection(e),
                })
            }
            Ok(Ok(conn)) => conn,
        };
        // Belt and braces: the verifier pinned the key on a full handshake; check what the
        // connection reports too (it also covers resumed sessions).
        if let Some(seen) = keyway_proto::tls::quic_peer_key(&conn) {
            if seen != self.relay_key {
                conn.close(keyway_proto::codes::PROTOCOL, b"unexpected relay key");
                return Err(PathError::RelayKeyMismatch(keyway_proto::tls::KeyMismatch {
                    expected: self.relay_key,
                    seen,
                }));
            }
        }
        Ok(conn)
    }
}

/// Closes a connection with `code` and a short reason (truncated to stay in one packet).
pub fn close(conn: &Connection, code: VarInt, reason: &str) {
    let bytes = reason.as_bytes();
    conn.close(code, bytes.get(..bytes.len().min(200)).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn silence_is_reported_as_unreachable() {
        // A bound UDP socket that never answers stands in for a network that drops UDP.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let id = Identity::from_seed([1; 32]);
        let relay = Identity::from_seed([2; 32]).public_key();
        let dialer = RelayDialer::new(
            &id,
            addr,
            relay,
            Duration::from_secs(15),
            Duration::from_secs(60),
            Duration::from_millis(300),
        )
        .unwrap();
        let endpoint = bind_endpoint(addr).unwrap();
        let err = dialer.dial(&endpoint).await.unwrap_err();
        assert!(matches!(err, PathError::RelayUnreachable { addr: a, .. } if a == addr), "{err}");
    }

    #[test]
    fn transport_rejects_absurd_idle_timeout() {
        assert!(transport_config(Duration::from_secs(15), Duration::from_secs(60)).is_ok());
        assert!(matches!(
            transport_config(Duration::from_secs(15), Duration::from_secs(u64::MAX / 2)),
            Err(PathError::Config(PathConfigError::IdleTimeoutTooLarge { .. }))
        ));
    }
}
