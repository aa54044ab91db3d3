//! The path socket: one UDP socket that carries both the QUIC connection to the relay and,
//! under the 9-byte channel header, the end-to-end QUIC connections to peers.
//!
//! It owns the translation between what quinn sees and what goes over the wire:
//! * **Receive.** A datagram from the relay that is channel data with a bound id goes to quinn
//!   with the header stripped and the source replaced by that channel's virtual address
//!   ([`crate::addr`]); batches are cut by the crate's `recv` module. Every other datagram from the relay
//!   (the relay connection itself) goes to quinn unchanged. Datagrams from any other address
//!   are dropped and counted: only the relay can reach this socket. Datagrams for an id not
//!   bound yet are held briefly by the table ([`crate::table`]).
//! * **Send.** A transmit to a virtual address goes on the path its route selects
//!   ([`crate::route`]; today always the peer's relay channel): the channel's header on every
//!   segment, to the relay, GSO segmentation kept (`segment_size + 9`); consecutive transmits of
//!   one stride leave as one send (the crate's `outbox` module). Other transmits pass.
//!
//! The inner socket is quinn's own (`Runtime::wrap_udp_socket`), so quinn-udp's GRO, GSO and
//! ECN stay.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use keyway_proto::channel;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::addr::is_virtual;
use crate::error::{PathConfigError, PathError};
use crate::outbox::Outbox;
use crate::pulse::Pulse;
use crate::recv::{slot_len, RecvState, Tally};
use crate::relay_link;
use crate::route::{PathKind, Selected};
use crate::table::{Counters, Paths, Table};

/// When nothing can be handed to quinn (a flood of datagrams to drop), `poll_recv` reads at
/// most this many batches before yielding, so a flood cannot monopolise quinn's driver task.
const MAX_BATCHES_WITHOUT_OUTPUT: usize = 16;

/// Binds the app's or hub's endpoint on a path socket: port 0 of the relay's address family,
/// 4 MiB buffers when the OS allows (as [`relay_link::bind_endpoint`]), the endpoint config of
/// a socket that carries channel data ([`keyway_proto::tls::peer_endpoint_config`]), and
/// `server` for accepting end-to-end connections (the hub). Must be called inside a tokio
/// runtime.
pub fn bind_path_endpoint(
    relay_addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<(quinn::Endpoint, Paths), PathError> {
    let runtime = quinn::default_runtime().ok_or(PathConfigError::NoRuntime)?;
    let socket = relay_link::bind_socket(relay_addr)?;
    let inner = runtime.wrap_udp_socket(socket)?;
    let (socket, paths) = PathSocket::new(inner, relay_addr)?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        keyway_proto::tls::peer_endpoint_config(),
        server,
        Arc::new(socket),
        runtime,
    )?;
    Ok((endpoint, paths))
}

/// Receive window of one end-to-end stream: what one stream may have in flight unread. 8 MiB
/// keeps one stream at about 800 Mbit/s across an 80 ms app↔hub round trip (quinn's default,
/// 1.25 MB, capped it at 125 Mbit/s whatever the line).
pub const E2E_STREAM_WINDOW: u32 = 8 << 20;

/// Receive window of a whole end-to-end connection, all streams together: what one peer can
/// make the other buffer. quinn's default has no such bound (every stream may hold its own
/// window: at the hub's stream credit of 2 112, gigabytes per connection). 16 MiB per
/// connection; the hub's per-app connection cap (`max_connections_per_app`) bounds an app.
pub const E2E_CONNECTION_WINDOW: u32 = 16 << 20;

/// Transport config of an end-to-end connection: the relay link's timers
/// ([`relay_link::transport_config`]), windows sized for long paths and bounded per connection
/// ([`E2E_STREAM_WINDOW`], [`E2E_CONNECTION_WINDOW`]), and an MTU discovery bound that leaves room
/// for the channel header ([`channel::MAX_E2E_PACKET`]), so a full-size packet plus header still
/// fits the 1452-byte datagrams quinn assumes every path carries.
pub fn e2e_transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::TransportConfig, PathError> {
    let mut transport = relay_link::transport_config(keep_alive, idle_timeout)?;
    transport
        .stream_receive_window(E2E_STREAM_WINDOW.into())
        .receive_window(E2E_CONNECTION_WINDOW.into())
        .send_window(u64::from(E2E_CONNECTION_WINDOW));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(channel::MAX_E2E_PACKET);
    transport.mtu_discovery_config(Some(mtu));
    Ok(transport)
}

/// The `quinn::AsyncUdpSocket` of [`bind_path_endpoint`].
struct PathSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    relay: SocketAddr,
    table: Arc<Table>,
    /// Only quinn's endpoint driver receives, so this lock is never contended; it exists
    /// because `poll_recv` takes `&self`.
    recv: Mutex<RecvState>,
    /// Channel sends, joined across transmits ([`crate::outbox`]).
    outbox: Arc<Outbox>,
    /// The task that checks the relay path a second after an unanswered send ([`Pulse::watch`]).
    watch: Option<tokio::task::AbortHandle>,
}

impl Drop for PathSocket {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.abort();
        }
    }
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket").field("relay", &self.relay).field("table", &self.table).finish()
    }
}

impl PathSocket {
    fn new(inner: Arc<dyn AsyncUdpSocket>, relay: SocketAddr) -> io::Result<(Self, Paths)> {
        let v6 = inner.local_addr()?.is_ipv6();
        let table = Arc::new(Table::new(v6));
        let recv = Mutex::new(RecvState::new(slot_len(inner.max_receive_segments())));
        let paths = Paths::new(table.clone());
        let outbox = Outbox::new(inner.clone(), relay);
        let watch = tokio::runtime::Handle::try_current()
            .ok()
            .map(|runtime| runtime.spawn(Pulse::watch(table.pulse.clone())).abort_handle());
        Ok((Self { inner, relay, table, recv, outbox, watch }, paths))
    }
}

impl AsyncUdpSocket for PathSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if !is_virtual(&transmit.destination) {
            return self.inner.try_send(transmit);
        }
        let selected = {
            let maps = self.table.maps.read().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            maps.by_addr.get(&transmit.destination).map(|route| (route.select(now), now))
        };
        let Some((Selected { primary: PathKind::RelayChannel(id), .. }, now)) = selected else {
            // Pretend it left: quinn would otherwise retry a send that can never succeed.
            Counters::add(&self.table.counters.dropped_unbound_send, 1);
            return Ok(());
        };
        let segment = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        let segments = self.outbox.send(id, transmit, segment)?;
        Counters::add(&self.table.counters.channel_out, segments as u64);
        self.table.pulse.data_sent(now);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.recv.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        let released = self.table.drain_ready(bufs, meta);
        if released > 0 {
            return Poll::Ready(Ok(released));
        }
        let mut batches = 0;
        loop {
            let filled = {
                let maps = self.table.maps.read().unwrap_or_else(PoisonError::into_inner);
                let mut tally = Tally::default();
                let filled = state.drain(self.relay, &maps.by_id, &mut tally, bufs, meta);
                tally.commit(&self.table.counters);
                filled
            };
            let now = (!state.unbound.is_empty()).then(Instant::now);
            for (id, packet) in state.unbound.drain(..) {
                if let Some(now) = now {
                    if !self.table.hold(id, &packet, now) {
                        Counters::add(&self.table.counters.dropped_unknown_channel, 1);
                    }
                }
            }
            if filled > 0 {
                self.table.pulse.heard(Instant::now());
                return Poll::Ready(Ok(filled));
            }
            if batches == MAX_BATCHES_WITHOUT_OUTPUT {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match state.refill(cx, &*self.inner) {
                Poll::Ready(Ok(())) => batches += 1,
                Poll::Pending => {
                    // A bind may release held packets while this waits on the socket.
                    self.table.register(cx.waker());
                    return Poll::Pending;
                }
                other => return other.map_ok(|()| 0),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recv::tests::{chan, quic};
    use keyway_proto::channel::ChannelId;

    /// The same over real sockets: one GSO send from the "relay" whose segments belong to two
    /// channels and the relay connection arrives (as one GRO batch where the kernel offers GRO)
    /// and is handed to quinn as runs of one source each, through buffers too few for it at once.
    #[tokio::test]
    async fn a_gso_batch_for_two_channels_reaches_each_from_its_own_address() {
        let runtime = quinn::default_runtime().unwrap();
        let receiver = runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = receiver.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = sender.local_addr().unwrap();
        let (socket, paths) = PathSocket::new(receiver, from).unwrap();
        let (a, b) = (paths.bind(ChannelId::new(1)), paths.bind(ChannelId::new(2)));

        let segments = [chan(1, 1, 200), chan(1, 2, 200), chan(2, 3, 200), quic(4, 200), chan(1, 5, 200)];
        let contents = segments.concat();
        let state = quinn::udp::UdpSocketState::new((&sender).into()).unwrap();
        let gso = state.max_gso_segments() > 1;
        let mut transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &contents,
            segment_size: Some(200),
            src_ip: None,
        };
        if gso {
            state.send((&sender).into(), &transmit).unwrap();
        } else {
            for s in &segments {
                transmit.contents = s;
                transmit.segment_size = None;
                state.send((&sender).into(), &transmit).unwrap();
            }
        }

        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut storage = vec![vec![0u8; 4096]; 2];
        while got.iter().map(|(_, d)| d.len()).sum::<usize>() < 4 * 191 + 200 {
            let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut metas = [RecvMeta::default(); 2];
            let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut metas)).await.unwrap();
            for (m, buf) in metas.iter().zip(&bufs).take(n) {
                for packet in buf[..m.len].chunks(m.stride) {
                    got.push((m.addr, packet.to_vec()));
                }
            }
        }
        let expected = vec![
            (a.addr(), vec![1; 191]),
            (a.addr(), vec![2; 191]),
            (b.addr(), vec![3; 191]),
            (from, quic(4, 200)),
            (a.addr(), vec![5; 191]),
        ];
        assert_eq!(got, expected);
        let stats = paths.stats();
        assert_eq!((stats.channel_in, stats.relay_in, stats.bound), (4, 1, 2), "{stats:?}");
    }
}
