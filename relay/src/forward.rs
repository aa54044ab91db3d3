//! Forwarding channel datagrams inside the relay's UDP socket ([`ForwardingSocket`]), so
//! end-to-end packets never reach quinn, never wait in a queue and never cost a task wake-up of
//! their own.
//!
//! The relay's QUIC endpoint reads its socket through this wrapper. quinn's endpoint driver
//! calls [`ForwardingSocket::poll_recv`] with its own receive buffers; the wrapper receives into
//! them through the runtime's socket (quinn-udp: recvmmsg, GRO, ECN and the destination address
//! stay), then walks every buffer segment by segment (`meta.stride`). A segment that starts with
//! [`CHANNEL_DATA`] is channel data: its id is looked up in the [`ChannelTable`] and rewritten in
//! place to the other side's id, and consecutive segments of one channel form a *run* that leaves
//! as **one** GSO transmit (`segment_size = stride`) straight from quinn's buffer.
//!
//! Runs of one destination in consecutive buffers of one receive call are joined into one send:
//! a sender's GSO batch (at most 10 segments from quinn) arrives as one buffer, so when the relay
//! falls behind and one call returns several, this saves a `sendmsg` (and, on loopback, the
//! receiver's delivery of one more packet) per buffer. A run that ends its buffer waits, in
//! place, while the next buffers are walked; a later run to the same destination and direction
//! joins it if GSO allows (same stride, ECN mark and source address, the waiting one ending on a
//! full segment, at most the socket's GSO segments and [`MAX_GSO_BYTES`]); anything else sends
//! what waited first, so each destination gets its segments in order. Whatever still waits
//! leaves before `poll_recv` returns. A run that does not end its buffer never waits: the QUIC
//! segments behind it are about to be moved over it. A send of one piece goes through quinn-udp
//! (`try_send`); a joined one through [`GatherSocket`] (one `sendmsg` over the pieces in quinn's
//! buffers, no copy; where that is not built, nothing is joined). A socket that would block, or
//! fails, loses the send and counts it (`send_failed`): forwarding never queues and never blocks
//! the endpoint driver; the end-to-end connection's own loss recovery copes, as it would with any
//! lossy link. Segments that are not channel data (the relay's own QUIC connections) are
//! compacted to the front of their buffer and left for quinn; a buffer with none left gets
//! `meta.len = 0`, which quinn skips.
//!
//! The per-key byte rate applies to forwarded runs: both of the channel's buckets (the app
//! key's and the (hub, app) pair's, see [`Buckets::channel_buckets`](crate::limits::Buckets::channel_buckets))
//! must be out of debt for a run to go, which then charges both; otherwise the run is dropped (`rate_limited`) and the limit hit counted. Dropping, not
//! delaying, is the only policing a forwarder without queues can do, and QUIC's congestion
//! control on the end-to-end connection reads the loss as the signal to slow down.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use keyway_proto::channel::{self, CHANNEL_DATA, HEADER_LEN};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::time::Instant;

use crate::channel::{ChannelTable, Direction, DropReason, Route};
use crate::channels::Channels;
use crate::gso::{GatherSocket, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
use crate::limits::{Limits, LimitsCell};
use crate::stats::LimitKind;

/// The relay's UDP socket as quinn sees it: the runtime's socket, with channel data forwarded
/// on the way in (see the module docs).
pub(crate) struct ForwardingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    channels: Arc<Channels>,
    /// For runs gathered from several receive buffers; `None`: every run is sent on its own.
    gather: Option<GatherSocket>,
}

impl ForwardingSocket {
    /// Wraps `socket` through `runtime` (a tokio-based quinn runtime, so quinn-udp's
    /// GRO/GSO/ECN handling stays; the relay's registers it with its I/O thread) and forwards
    /// the channels in `channels`.
    pub fn wrap(
        socket: std::net::UdpSocket,
        channels: Arc<Channels>,
        runtime: &dyn quinn::Runtime,
    ) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let gather = GatherSocket::new(&socket);
        let inner = runtime.wrap_udp_socket(socket)?;
        let _ = channels.socket.set(inner.clone());
        Ok(Arc::new(Self { inner, channels, gather }))
    }

    /// Forwards the channel data in the first `received` buffers (see the module docs) and
    /// leaves the rest in them for quinn, `meta.len` shortened to it.
    fn forward(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], received: usize) {
        let mut batch = Batch::default();
        for (index, meta) in meta.iter_mut().enumerate().take(received) {
            let (earlier, rest) = bufs.split_at_mut(index.min(bufs.len()));
            let Some(buf) = rest.first_mut() else { break };
            let len = meta.len.min(buf.len());
            let stride = if meta.stride == 0 { len.max(1) } else { meta.stride };
            let Some(data) = buf.get_mut(..len) else { continue };
            if !has_channel_data(data, stride) {
                continue;
            }
            meta.len = self.filter(index, earlier, data, stride, meta.addr, meta.ecn, &mut batch);
        }
        for waiting in &batch.waiting {
            self.send(waiting, bufs, &[]);
        }
    }

    /// Whether runs of several receive buffers may be joined: gathered sends are built here,
    /// the kernel has not refused one, and the socket does GSO at all.
    fn gathers(&self) -> bool {
        self.gather.as_ref().is_some_and(GatherSocket::usable) && self.max_segments() > 1
    }

    /// The most segments one forwarded send carries: what the socket's GSO allows, within the
    /// kernel's bound.
    fn max_segments(&self) -> usize {
        self.inner.max_transmit_segments().clamp(1, MAX_GSO_SEGMENTS)
    }

    /// Forwards the channel segments of receive buffer `index` (`data`; the buffers before it
    /// are `earlier`) and compacts the others to its front; returns the bytes left for quinn.
    /// A run that ends the buffer may wait in `ctx` for the next buffer's (see the module
    /// docs); every other one leaves before the QUIC segments behind it are moved over it.
    #[allow(clippy::too_many_arguments)]
    fn filter(
        &self,
        index: usize,
        earlier: &[IoSliceMut<'_>],
        data: &mut [u8],
        stride: usize,
        src: SocketAddr,
        ecn: Option<EcnCodepoint>,
        ctx: &mut Batch,
    ) -> usize {
        let len = data.len();
        let max_segments = self.max_segments();
        let mut table = self.channels.table();
        let (mut keep, mut pos) = (0, 0);
        while pos < len {
            let end = pos.saturating_add(stride).min(len);
            if data.get(pos) != Some(&CHANNEL_DATA) {
                // The relay's own QUIC: moved down over the segments already forwarded.
                data.copy_within(pos..end, keep);
                keep += end - pos;
                pos = end;
                continue;
            }
            // Extend the run over the following segments of the same channel (same header).
            let mut run_end = end;
            let mut segments = 1;
            if let Some(head) =
                data.get(pos..pos + HEADER_LEN).and_then(|h| <[u8; HEADER_LEN]>::try_from(h).ok())
            {
                while run_end < len && segments < max_segments {
                    if data.get(run_end..run_end + HEADER_LEN) != Some(&head[..]) {
                        break;
                    }
                    run_end = run_end.saturating_add(stride).min(len);
                    segments += 1;
                }
            }
            let routed = data
                .get_mut(pos..run_end)
                .and_then(|run| self.route_run(&mut table, run, segments, stride, src, ctx));
            if let Some(routed) = routed {
                let run = Run { piece: (index, pos..run_end), stride, ecn, routed };
                self.gather_or_send(run, run_end == len, earlier, data, ctx);
            }
            pos = run_end;
        }
        keep
    }

    /// Routes one run of segments of one channel and rewrites its headers, or drops it.
    fn route_run(
        &self,
        table: &mut ChannelTable,
        run: &mut [u8],
        segments: usize,
        stride: usize,
        src: SocketAddr,
        ctx: &mut Batch,
    ) -> Option<Routed> {
        let stats = &self.channels.stats;
        let now = ctx.now();
        let forward = match table.route(src, run, now) {
            Route::Forward(forward) => forward,
            Route::Drop(DropReason::UnknownChannel) => {
                // Maybe a first flight that overtook its `ChannelOpen`: held, within bounds.
                let max = ctx.limits(&self.channels.limits).max_held_datagrams as usize;
                let mut dropped = 0;
                for segment in run.chunks(stride) {
                    let (held, expired) = table.hold(src, segment, now, max);
                    dropped += expired + usize::from(!held);
                    if held {
                        stats.channel_held();
                    }
                }
                stats.channel_dropped(DropReason::UnknownChannel, dropped);
                return None;
            }
            Route::Drop(reason) => {
                stats.channel_dropped(reason, segments);
                return None;
            }
        };
        let payload = run.len().saturating_sub(segments * HEADER_LEN);
        if let Some(buckets) = forward.buckets {
            let rate = ctx.limits(&self.channels.limits).bytes_per_second_per_key as f64;
            if rate > 0.0 {
                // A bucket in debt means that key has spent its budget: the run is dropped and
                // neither key pays for it.
                if buckets.iter().any(|b| !b.take_debt(0.0, rate, rate, now).is_zero()) {
                    stats.limit_hit(LimitKind::BytesPerSecondPerKey);
                    stats.channel_dropped(DropReason::RateLimited, segments);
                    return None;
                }
                for bucket in buckets {
                    let _ = bucket.take_debt(payload as f64, rate, rate, now);
                }
            }
        }
        for segment in run.chunks_mut(stride) {
            // Cannot fail: every segment of a run starts with a whole header (checked above).
            let _ = channel::write_header(segment, forward.new_id);
            if let (Some(tap), Some(packet)) = (&self.channels.tap, segment.get(HEADER_LEN..)) {
                tap(forward.direction, packet);
            }
        }
        Some(Routed {
            to: forward.to,
            src_ip: forward.src_ip,
            direction: forward.direction,
            segments,
            bytes: run.len(),
            payload,
        })
    }

    /// Joins `run` to the waiting send of its destination if GSO allows, sends what cannot
    /// wait, and lets a run that ends its buffer (`at_end`) wait for the next buffer.
    fn gather_or_send(
        &self,
        run: Run,
        at_end: bool,
        earlier: &[IoSliceMut<'_>],
        current: &[u8],
        ctx: &mut Batch,
    ) {
        let key = (run.routed.to, run.routed.direction);
        let waiting = ctx.waiting.iter().position(|w| w.key() == key).map(|i| ctx.waiting.remove(i));
        let send = match waiting {
            Some(mut waiting) if waiting.can_take(&run, self.max_segments()) => {
                waiting.take(run);
                waiting
            }
            Some(waiting) => {
                // Another stride, ECN mark or source, or a short last segment: what waited goes
                // first, so the destination still gets its segments in order.
                self.send(&waiting, earlier, current);
                Train::new(run)
            }
            None => Train::new(run),
        };
        if at_end && self.gathers() {
            if ctx.waiting.len() >= MAX_WAITING {
                let oldest = ctx.waiting.remove(0);
                self.send(&oldest, earlier, current);
            }
            ctx.waiting.push(send);
        } else {
            self.send(&send, earlier, current);
        }
    }

    /// Sends `send` (its pieces are in the buffers `earlier`, or in `current`, the buffer being
    /// walked) as one transmit, and counts it.
    fn send(&self, send: &Train, earlier: &[IoSliceMut<'_>], current: &[u8]) {
        let piece = |(index, range): &(usize, Range<usize>)| -> &[u8] {
            let buffer = earlier.get(*index).map_or(current, |b| &b[..]);
            buffer.get(range.clone()).unwrap_or_default()
        };
        let first = &send.first;
        let result = if send.more.is_empty() {
            // One piece: quinn-udp's own send, from quinn's buffer.
            let transmit = Transmit {
                destination: first.routed.to,
                ecn: first.ecn,
                contents: piece(&first.piece),
                segment_size: (send.segments > 1).then_some(first.stride),
                src_ip: first.routed.src_ip,
            };
            self.inner.try_send(&transmit)
        } else if let Some(gather) = &self.gather {
            let pieces: Vec<IoSlice<'_>> =
                std::iter::once(&first.piece).chain(&send.more).map(|p| IoSlice::new(piece(p))).collect();
            gather.send(first.routed.to, first.routed.src_ip, first.ecn, first.stride, &pieces)
        } else {
            // Not reached: runs only wait for others where gathering is built.
            Err(io::ErrorKind::Unsupported.into())
        };
        let stats = &self.channels.stats;
        match result {
            Ok(()) => stats.channel_forwarded(first.routed.direction, send.segments, send.payload),
            // WouldBlock included: never queue, never wait (see the module docs).
            Err(_) => stats.channel_dropped(DropReason::SendFailed, send.segments),
        }
    }
}

/// How many destinations' runs may wait at once for the next receive buffer; one more sends
/// the oldest. Bulk traffic has two (data one way, acknowledgements the other); a bound keeps
/// the search short under many channels.
const MAX_WAITING: usize = 4;

/// Where a routed run goes and what it carries.
struct Routed {
    to: SocketAddr,
    src_ip: Option<IpAddr>,
    direction: Direction,
    segments: usize,
    /// The run's bytes, headers included.
    bytes: usize,
    /// Without the channel headers: what is counted and charged.
    payload: usize,
}

/// A routed run, rewritten in place in receive buffer `piece.0` at bytes `piece.1`.
struct Run {
    piece: (usize, Range<usize>),
    stride: usize,
    ecn: Option<EcnCodepoint>,
    routed: Routed,
}

/// One GSO send being put together (a datagram train; not called `Send`, which would shadow
/// the trait): runs of one destination, in their order of arrival, each but the last ending on
/// a full segment.
struct Train {
    first: Run,
    /// The pieces after the first one's (allocated only when runs are joined).
    more: Vec<(usize, Range<usize>)>,
    segments: usize,
    bytes: usize,
    payload: usize,
    /// Whether the last piece ends on a full segment, so another may follow.
    ends_full: bool,
}

impl Train {
    fn new(run: Run) -> Self {
        let (segments, bytes, payload) = (run.routed.segments, run.routed.bytes, run.routed.payload);
        let ends_full = bytes == segments * run.stride;
        Self { first: run, more: Vec::new(), segments, bytes, payload, ends_full }
    }

    /// The order that must be kept: per destination and direction.
    fn key(&self) -> (SocketAddr, Direction) {
        (self.first.routed.to, self.first.routed.direction)
    }

    /// Whether `run` may follow in the same GSO send: same segment size, mark and source, a
    /// full segment before it, and within the kernel's bounds.
    fn can_take(&self, run: &Run, max_segments: usize) -> bool {
        self.ends_full
            && run.stride == self.first.stride
            && run.ecn == self.first.ecn
            && run.routed.src_ip == self.first.routed.src_ip
            && self.segments + run.routed.segments <= max_segments
            && self.bytes + run.routed.bytes <= MAX_GSO_BYTES
    }

    fn take(&mut self, run: Run) {
        self.segments += run.routed.segments;
        self.bytes += run.routed.bytes;
        self.payload += run.routed.payload;
        self.ends_full = run.routed.bytes == run.routed.segments * run.stride;
        self.more.push(run.piece);
    }
}

/// What one `poll_recv` call reads at most once, and only if it meets channel data (the time
/// and the limits in force), and the sends waiting for the next receive buffer.
#[derive(Default)]
struct Batch {
    now: Option<Instant>,
    limits: Option<Arc<Limits>>,
    waiting: Vec<Train>,
}

impl Batch {
    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }
    fn limits(&mut self, cell: &LimitsCell) -> &Limits {
        self.limits.get_or_insert_with(|| cell.get())
    }
}

/// Whether any segment of `data` (segments of `stride` bytes) is channel data.
fn has_channel_data(data: &[u8], stride: usize) -> bool {
    data.chunks(stride).any(channel::is_channel_data)
}

impl fmt::Debug for ForwardingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardingSocket").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for ForwardingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let received = ready!(self.inner.poll_recv(cx, bufs, meta))?;
        self.forward(bufs, meta, received);
        Poll::Ready(Ok(received))
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
    use keyway_proto::channel::{encode_into, ChannelId};

    use crate::channel::tests::relay_connection;
    use crate::channel::Leg;
    use crate::stats::RelayStats;
    use crate::testing::endpoint_pair;

    const STRIDE: usize = 64;

    /// One segment of `STRIDE` bytes (or `len`): a channel datagram under `id`, or QUIC.
    fn segment(id: Option<ChannelId>, fill: u8, len: usize) -> Vec<u8> {
        match id {
            Some(id) => {
                let mut out = Vec::new();
                encode_into(&mut out, id, &vec![fill; len - HEADER_LEN]);
                out
            }
            None => vec![0x40 | (fill & 0x3f); len],
        }
    }

    /// `segment` under the id it leaves with.
    fn rewritten(mut segment: Vec<u8>, to: ChannelId) -> Vec<u8> {
        assert!(channel::write_header(&mut segment, to));
        segment
    }

    /// The relay's socket on a real loopback socket, with the channels of `stats`.
    fn forwarding_socket(stats: &Arc<RelayStats>) -> (ForwardingSocket, Arc<Channels>) {
        let limits = Arc::new(LimitsCell::new(Limits::unlimited()));
        let channels = Arc::new(Channels::new(Arc::clone(stats), limits, None));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gather = GatherSocket::new(&socket);
        let inner = quinn::default_runtime().unwrap().wrap_udp_socket(socket).unwrap();
        (ForwardingSocket { inner, channels: Arc::clone(&channels), gather }, channels)
    }

    /// A plain socket standing for a hub, to see what arrives.
    fn hub_socket() -> std::net::UdpSocket {
        let hub = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        hub.set_read_timeout(Some(keyway_test_support::PATIENCE)).unwrap();
        hub
    }

    /// The next `n` datagrams at `socket`.
    fn receive_n(socket: &std::net::UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut datagram = [0u8; 2048];
        (0..n)
            .map(|_| {
                let len = socket.recv(&mut datagram).unwrap();
                datagram[..len].to_vec()
            })
            .collect()
    }

    /// Passes `buffers` through the wrapper as one receive call that returned them from `src`,
    /// `(stride, segments)` each; returns what each buffer leaves for quinn.
    fn receive_call(
        socket: &ForwardingSocket,
        src: SocketAddr,
        buffers: Vec<(usize, Vec<Vec<u8>>)>,
    ) -> Vec<Vec<u8>> {
        let mut meta: Vec<RecvMeta> = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        for (stride, segments) in buffers {
            let buf = segments.concat();
            let mut m = RecvMeta::default();
            (m.addr, m.len, m.stride) = (src, buf.len(), stride);
            meta.push(m);
            data.push(buf);
        }
        let received = data.len();
        let mut slices: Vec<IoSliceMut<'_>> = data.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        socket.forward(&mut slices, &mut meta, received);
        drop(slices);
        data.iter().zip(&meta).map(|(b, m)| b[..m.len].to_vec()).collect()
    }

    fn series(stats: &RelayStats, name: &str) -> f64 {
        keyway_test_support::http::series(&stats.encode(), name).unwrap()
    }

    /// Whether this socket joins runs of several receive buffers (Linux with GSO).
    fn gathers(socket: &ForwardingSocket) -> bool {
        socket.gathers()
    }

    #[tokio::test]
    async fn an_app_over_the_byte_rate_does_not_starve_another_app_of_the_same_hub() {
        let stats = Arc::new(RelayStats::default());
        let limits = Limits { bytes_per_second_per_key: 1000, ..Limits::unlimited() };
        let channels =
            Arc::new(Channels::new(Arc::clone(&stats), Arc::new(LimitsCell::new(limits.clone())), None));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gather = GatherSocket::new(&socket);
        let inner = quinn::default_runtime().unwrap().wrap_udp_socket(socket).unwrap();
        let socket = ForwardingSocket { inner, channels: Arc::clone(&channels), gather };
        let hub = hub_socket();
        let (server, client) = endpoint_pair().await;
        let (conn, _peer) = relay_connection(&server, &client).await;
        let buckets = crate::limits::Buckets::new(Instant::now());
        let key = |seed| keyway_proto::Identity::from_seed([seed; 32]).public_key();
        let (hub_key, greedy_key, polite_key) = (key(1), key(2), key(3));
        let apps: [SocketAddr; 2] = ["127.0.0.1:4001".parse().unwrap(), "127.0.0.1:4002".parse().unwrap()];
        let ids = [(ChannelId::new(1), ChannelId::new(11)), (ChannelId::new(2), ChannelId::new(22))];
        for ((app_key, addr), (a, h)) in [(greedy_key, apps[0]), (polite_key, apps[1])].into_iter().zip(ids) {
            let legs = (Leg::at(a, conn.clone(), addr), Leg::at(h, conn.clone(), hub.local_addr().unwrap()));
            let charged = buckets.channel_buckets(&app_key, &hub_key, &limits, Instant::now());
            channels.table().insert(legs.0, legs.1, Some(charged), Instant::now()).unwrap();
        }
        // The greedy app sends a run of 1 280 bytes over a 1 000-byte budget, then more.
        let greedy: Vec<Vec<u8>> = (0..20).map(|i| segment(Some(ids[0].0), i, STRIDE)).collect();
        receive_call(&socket, apps[0], vec![(STRIDE, greedy.clone())]);
        assert_eq!(receive_n(&hub, 20).len(), 20, "the first run goes, into debt");
        receive_call(&socket, apps[0], vec![(STRIDE, greedy)]);
        assert!(
            series(&stats, "keyway_relay_channel_packets_dropped_total{reason=\"rate_limited\"}") >= 20.0
        );
        // The other app of the same hub still gets its datagram through.
        let polite = segment(Some(ids[1].0), 9, STRIDE);
        receive_call(&socket, apps[1], vec![(STRIDE, vec![polite.clone()])]);
        assert_eq!(receive_n(&hub, 1), [rewritten(polite, ids[1].1)], "the polite app is not rate-limited");
    }

    #[tokio::test]
    async fn a_gro_batch_mixing_channels_and_quic_is_forwarded_in_runs_and_the_quic_compacted() {
        let stats = Arc::new(RelayStats::default());
        let (socket, channels) = forwarding_socket(&stats);
        // The hubs' side of two channels is one plain socket here.
        let hubs = hub_socket();
        let app: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let (server, client) = endpoint_pair().await;
        let (conn, _peer) = relay_connection(&server, &client).await;
        let ids = [(ChannelId::new(1), ChannelId::new(11)), (ChannelId::new(2), ChannelId::new(22))];
        for (a, h) in ids {
            let legs = (Leg::at(a, conn.clone(), app), Leg::at(h, conn.clone(), hubs.local_addr().unwrap()));
            channels.table().insert(legs.0, legs.1, None, Instant::now()).unwrap();
        }
        let (one, two) = (Some(ids[0].0), Some(ids[1].0));
        let segments = vec![
            segment(None, 1, STRIDE),
            segment(one, 2, STRIDE),
            segment(one, 3, STRIDE),
            segment(None, 4, STRIDE),
            segment(Some(ChannelId::new(99)), 5, STRIDE),
            segment(two, 6, STRIDE),
            segment(None, 7, STRIDE),
            segment(two, 8, 20),
        ];
        let kept = receive_call(&socket, app, vec![(STRIDE, segments.clone())]);

        // quinn gets the QUIC segments, in order, at the front.
        assert_eq!(kept, [[segments[0].clone(), segments[3].clone(), segments[6].clone()].concat()]);
        // The hubs get every channel segment but the unknown one, under their own ids.
        let expected: Vec<Vec<u8>> = [(1, ids[0].1), (2, ids[0].1), (5, ids[1].1), (7, ids[1].1)]
            .iter()
            .map(|&(i, to)| rewritten(segments[i].clone(), to))
            .collect();
        assert_eq!(receive_n(&hubs, 4), expected);
        assert_eq!(
            series(&stats, "keyway_relay_channel_packets_forwarded_total{direction=\"app_to_hub\"}"),
            4.0
        );
        // Runs of one channel leave as one send each: [2, 3] (one GSO batch where the socket
        // does GSO), then 6 and 8 (split by the QUIC segment between them).
        let sends = if socket.max_transmit_segments() > 1 { 3.0 } else { 4.0 };
        assert_eq!(series(&stats, "keyway_relay_channel_transmits_total"), sends);
        // The unknown one is held (a first flight may overtake its `ChannelOpen`), then expires.
        assert_eq!(series(&stats, "keyway_relay_channel_packets_held_total"), 1.0);
        assert_eq!(
            series(&stats, "keyway_relay_channel_packets_dropped_total{reason=\"unknown_channel\"}"),
            0.0
        );
        socket.channels.sweep_held(Instant::now() + crate::channel::HOLD_TIME);
        assert_eq!(
            series(&stats, "keyway_relay_channel_packets_dropped_total{reason=\"unknown_channel\"}"),
            1.0
        );
        assert_eq!(stats.bytes_app_to_hub(), (3 * (STRIDE - HEADER_LEN) + 20 - HEADER_LEN) as u64);

        // A buffer of channel data only leaves nothing for quinn; a spoofed source, nothing out.
        let only = vec![segment(one, 9, STRIDE), segment(one, 10, STRIDE)];
        assert_eq!(receive_call(&socket, app, vec![(STRIDE, only)]), [Vec::<u8>::new()]);
        let stranger: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        assert_eq!(
            receive_call(&socket, stranger, vec![(STRIDE, vec![segment(one, 11, STRIDE)])]),
            [Vec::<u8>::new()]
        );
        assert_eq!(
            series(&stats, "keyway_relay_channel_packets_dropped_total{reason=\"wrong_source\"}"),
            1.0
        );
    }

    /// Two channels from one app to two hubs, for the tests of sends joined across buffers.
    struct TwoHubs {
        stats: Arc<RelayStats>,
        socket: ForwardingSocket,
        app: SocketAddr,
        hubs: [std::net::UdpSocket; 2],
        /// (app-side id, hub-side id) of the channel to each hub.
        ids: [(ChannelId, ChannelId); 2],
        _endpoints: (quinn::Endpoint, quinn::Endpoint, quinn::Connection),
    }

    async fn two_hubs() -> TwoHubs {
        let stats = Arc::new(RelayStats::default());
        let (socket, channels) = forwarding_socket(&stats);
        let hubs = [hub_socket(), hub_socket()];
        let app: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let (server, client) = endpoint_pair().await;
        let (conn, peer) = relay_connection(&server, &client).await;
        let ids = [(ChannelId::new(1), ChannelId::new(11)), (ChannelId::new(2), ChannelId::new(22))];
        for ((a, h), hub) in ids.iter().zip(&hubs) {
            let legs = (Leg::at(*a, conn.clone(), app), Leg::at(*h, conn.clone(), hub.local_addr().unwrap()));
            channels.table().insert(legs.0, legs.1, None, Instant::now()).unwrap();
        }
        TwoHubs { stats, socket, app, hubs, ids, _endpoints: (server, client, peer) }
    }

    #[tokio::test]
    async fn runs_of_one_channel_in_consecutive_buffers_leave_as_one_send_byte_exact_and_in_order() {
        let t = two_hubs().await;
        let one = Some(t.ids[0].0);
        let buffers = vec![
            vec![segment(one, 1, STRIDE), segment(one, 2, STRIDE)],
            vec![segment(one, 3, STRIDE), segment(one, 4, STRIDE), segment(one, 5, STRIDE)],
            vec![segment(one, 6, 20)],
        ];
        let expected: Vec<Vec<u8>> = buffers.concat().into_iter().map(|s| rewritten(s, t.ids[0].1)).collect();
        let kept = receive_call(&t.socket, t.app, buffers.into_iter().map(|b| (STRIDE, b)).collect());
        assert!(kept.iter().all(Vec::is_empty), "nothing for quinn");
        assert_eq!(receive_n(&t.hubs[0], 6), expected);
        assert_eq!(
            series(&t.stats, "keyway_relay_channel_packets_forwarded_total{direction=\"app_to_hub\"}"),
            6.0
        );
        let sends = if gathers(&t.socket) { 1.0 } else { 3.0 };
        assert_eq!(series(&t.stats, "keyway_relay_channel_transmits_total"), sends);
        assert_eq!(t.stats.bytes_app_to_hub(), (5 * (STRIDE - HEADER_LEN) + 20 - HEADER_LEN) as u64);

        // More segments than one GSO send may carry leave as several, still in order.
        let many = t.socket.max_segments() + 5;
        let segments: Vec<Vec<u8>> = (0..many).map(|i| segment(one, (i % 200) as u8, STRIDE)).collect();
        let expected: Vec<Vec<u8>> = segments.iter().map(|s| rewritten(s.clone(), t.ids[0].1)).collect();
        let buffers = segments.chunks(5).map(|b| (STRIDE, b.to_vec())).collect();
        receive_call(&t.socket, t.app, buffers);
        assert_eq!(receive_n(&t.hubs[0], many), expected);
        if gathers(&t.socket) {
            assert_eq!(series(&t.stats, "keyway_relay_channel_transmits_total"), sends + 2.0);
        }
    }

    #[tokio::test]
    async fn another_stride_or_a_short_segment_ends_a_joined_send_and_order_is_kept() {
        let t = two_hubs().await;
        let one = Some(t.ids[0].0);
        let buffers = vec![
            // Ends short: nothing may follow it in one send.
            (STRIDE, vec![segment(one, 1, STRIDE), segment(one, 2, 30)]),
            (STRIDE, vec![segment(one, 3, STRIDE), segment(one, 4, STRIDE)]),
            // Another segment size: a send of its own.
            (STRIDE / 2, vec![segment(one, 5, STRIDE / 2), segment(one, 6, STRIDE / 2)]),
            (STRIDE, vec![segment(one, 7, STRIDE)]),
        ];
        let expected: Vec<Vec<u8>> =
            buffers.iter().flat_map(|(_, b)| b.clone()).map(|s| rewritten(s, t.ids[0].1)).collect();
        receive_call(&t.socket, t.app, buffers);
        assert_eq!(receive_n(&t.hubs[0], 7), expected);
        assert_eq!(series(&t.stats, "keyway_relay_channel_transmits_total"), 4.0);
    }

    #[tokio::test]
    async fn joining_sends_leaves_other_channels_and_the_relays_quic_alone() {
        let t = two_hubs().await;
        let (one, two) = (Some(t.ids[0].0), Some(t.ids[1].0));
        let buffers = [
            vec![segment(two, 1, STRIDE), segment(one, 2, STRIDE)],
            vec![segment(None, 3, STRIDE), segment(one, 4, STRIDE), segment(one, 5, STRIDE)],
            vec![segment(one, 6, STRIDE), segment(None, 7, STRIDE), segment(two, 8, STRIDE)],
        ];
        let to_hub = |hub: usize, picks: &[(usize, usize)]| -> Vec<Vec<u8>> {
            picks.iter().map(|&(b, s)| rewritten(buffers[b][s].clone(), t.ids[hub].1)).collect()
        };
        let (expect_one, expect_two) =
            (to_hub(0, &[(0, 1), (1, 1), (1, 2), (2, 0)]), to_hub(1, &[(0, 0), (2, 2)]));
        let quic = [Vec::new(), buffers[1][0].clone(), buffers[2][1].clone()];
        let kept = receive_call(&t.socket, t.app, buffers.iter().map(|b| (STRIDE, b.clone())).collect());
        assert_eq!(kept, quic, "quinn gets its own segments, each in its buffer");
        assert_eq!(receive_n(&t.hubs[0], 4), expect_one);
        assert_eq!(receive_n(&t.hubs[1], 2), expect_two);
        // Hub one: its four segments in one send; hub two: one send per buffer.
        let sends = if gathers(&t.socket) { 3.0 } else { 5.0 };
        assert_eq!(series(&t.stats, "keyway_relay_channel_transmits_total"), sends);
    }
}
