//! The QUIC endpoint's two ingredients: the server config (TLS admitting any valid key, the
//! transport settings, the initial stream credit) and the UDP socket, bound through socket2
//! with enlarged buffers.
//!
//! Both are built at start-up and the config again whenever the limits change, so they live
//! apart from the start-up code (`server`) that calls them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[cfg(test)]
use keyway_proto::tls::{quic_server_crypto, AnyKey};
#[cfg(test)]
use keyway_proto::ALPN_RELAY;
use quinn::VarInt;
use tracing::{debug, info};

#[cfg(test)]
use crate::config::RelayConfig;
use crate::error::{RelayConfigError, RelayError};
use crate::limits::Limits;
use crate::state::StreamCredit;

/// UDP socket buffer size asked for: the default (~208 KiB) drops packets in handshake bursts.
const UDP_BUFFER: usize = 4 * 1024 * 1024;
/// Receive window of one stream of a relay connection: the largest control frame (a
/// `Register` with a full allow-list, about 32 KiB) arrives in one round trip.
const STREAM_WINDOW: u32 = 36 * 1024;
/// Receive window of a whole relay connection, all its streams together.
const CONNECTION_WINDOW: u32 = 64 * 1024;
/// How long a restarted relay retries binding a port its predecessor is still releasing.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// The relay's server config built from `config` as [`crate::Relay::start`] builds it, for
/// unit tests that stand up a bare endpoint.
#[cfg(test)]
pub(crate) fn server_config(config: &RelayConfig) -> Result<quinn::ServerConfig, RelayError> {
    let crypto = quic_server_crypto(&config.identity, Arc::new(AnyKey), ALPN_RELAY)?;
    build_server_config(crypto, config.idle_timeout, &config.limits)
}
/// The server config: `crypto` for TLS, the idle timeout, and the initial stream credit under
/// `limits` (grown per connection later, see [`StreamCredit`]).
pub(crate) fn build_server_config(
    crypto: Arc<dyn quinn::crypto::ServerConfig>,
    idle_timeout: Duration,
    limits: &Limits,
) -> Result<quinn::ServerConfig, RelayError> {
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    // Retry tokens are only asked for under load (see `connection::handle_incoming`); quinn's own
    // always-on validation stays off.
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .map_err(|source| RelayConfigError::IdleTimeoutTooLarge { idle_timeout, source })?;
    transport
        .max_idle_timeout(Some(idle))
        .max_concurrent_bidi_streams(VarInt::from_u32(StreamCredit::initial(
            limits.max_streams_per_connection,
        )))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // The relay's own connections carry control frames only (end-to-end packets bypass
        // quinn, see `forward`), so their windows are sized for frames, not for bulk data:
        // what a peer can make quinn hold unread is one window per connection, not quinn's
        // default 1.25 MB per stream with no connection-wide bound.
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        // No DATAGRAM frames: nothing on the relay reads them.
        .datagram_receive_buffer_size(None)
        // Hubs keep their NAT binding alive; the relay only answers.
        .keep_alive_interval(None);
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Binds the UDP socket through socket2 so its buffers can be enlarged first (best effort: the
/// kernel caps them at `net.core.rmem_max` / `wmem_max`).
pub(crate) async fn bind_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, RelayError> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        match try_bind(addr) {
            Ok(socket) => return Ok(socket),
            // A relay restarted in-process may find its predecessor's socket not yet released.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(source) => return Err(RelayError::Bind { addr, source }),
        }
    }
}

fn try_bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Serve IPv4 too on `[::]` where the system allows it.
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(UDP_BUFFER) {
        debug!("cannot enlarge the UDP receive buffer: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(UDP_BUFFER) {
        debug!("cannot enlarge the UDP send buffer: {e}");
    }
    match socket.recv_buffer_size() {
        // Linux reports twice the usable size; below the request means the sysctl capped it.
        Ok(size) if size < UDP_BUFFER => info!(
            bytes = size,
            "UDP receive buffer is smaller than the {UDP_BUFFER} bytes asked for; \
             raise net.core.rmem_max for handshake bursts"
        ),
        _ => {}
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}
