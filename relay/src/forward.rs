//! Forwarding channel datagrams inside the relay's UDP socket ([`ForwardingSocket`]), so
//! end-to-end packets never reach quinn, never wait in a queue and never cost a task wake-up of
//! their own.
//!
//! The relay's QUIC endpoint reads its socket through this wrapper. quinn's endpoint driver
//! calls [`ForwardingSocket::poll_recv`] with its own receive buffers; the wrapper receives into
//! them through the runtime's socket (quinn-udp: GRO, ECN and the destination address stay),
//! then walks every buffer segment by segment (`meta.stride`). A segment that starts with
//! [`CHANNEL_DATA`] is channel data: its id is looked up in the [`ChannelTable`], rewritten in
//! place to the other side's id, and consecutive segments of one channel leave as **one** GSO
//! transmit (`segment_size = stride`) straight from quinn's buffer, with `try_send`. A socket
//! that would block, or fails, loses the run and counts it (`send_failed`): forwarding never
//! queues and never blocks the endpoint driver; the end-to-end connection's own loss recovery
//! copes, as it would with any lossy link. Segments that are not channel data (the relay's own
//! QUIC connections) are compacted to the front of the buffer and left for quinn; a buffer with
//! none left gets `meta.len = 0`, which quinn skips.
//!
//! The per-key byte rate applies to forwarded runs: both keys' buckets (the app's and the
//! hub's) must be out of debt for a run to go, which then charges
//! both; otherwise the run is dropped (`rate_limited`) and the limit hit counted. Dropping, not
//! delaying, is the only policing a forwarder without queues can do, and QUIC's congestion
//! control on the end-to-end connection reads the loss as the signal to slow down.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use keyway_proto::channel::{self, CHANNEL_DATA, HEADER_LEN};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::time::Instant;

use crate::channel::{ChannelTable, DropReason, Route};
use crate::config::ForwardTap;
use crate::limits::{Limits, LimitsCell};
use crate::stats::{LimitKind, RelayStats};

/// The channel table with what forwarding reports to and is limited by; shared by the socket
/// wrapper (which routes) and the control flow (which inserts and removes channels).
pub(crate) struct Channels {
    table: Mutex<ChannelTable>,
    stats: Arc<RelayStats>,
    limits: Arc<LimitsCell>,
    tap: Option<ForwardTap>,
    /// The runtime's socket under [`ForwardingSocket`], for sending held first flights.
    socket: std::sync::OnceLock<Arc<dyn AsyncUdpSocket>>,
}

impl Channels {
    pub fn new(stats: Arc<RelayStats>, limits: Arc<LimitsCell>, tap: Option<ForwardTap>) -> Self {
        Self { table: Mutex::new(ChannelTable::default()), stats, limits, tap, socket: Default::default() }
    }

    /// Drops (and counts as `unknown_channel`) the held datagrams that expired; the relay calls
    /// it every [`HOLD_TIME`](crate::channel::HOLD_TIME), so nothing is held longer than
    /// twice that even when no new datagram arrives.
    pub fn sweep_held(&self, now: Instant) {
        let expired = self.table().expire_held(now);
        self.stats.channel_dropped(DropReason::UnknownChannel, expired);
    }

    /// Forwards what was held for the channel whose app side is `app_id` from `src` (the app's
    /// first flight, which overtook its `ChannelOpen`), now that the channel is listed. Each
    /// datagram is routed like any other (the byte budget aside: a first flight is a few
    /// packets); a send that would block drops it, as everywhere.
    pub fn release_held(&self, src: SocketAddr, app_id: channel::ChannelId) {
        let Some(socket) = self.socket.get() else { return };
        let now = Instant::now();
        let mut table = self.table();
        let (held, expired) = table.take_held(src, app_id, now);
        self.stats.channel_dropped(DropReason::UnknownChannel, expired);
        for mut datagram in held {
            let forward = match table.route(src, &datagram, now) {
                Route::Forward(forward) => forward,
                Route::Drop(reason) => {
                    self.stats.channel_dropped(reason, 1);
                    continue;
                }
            };
            let (to, src_ip, direction) = (forward.to, forward.src_ip, forward.direction);
            let _ = channel::write_header(&mut datagram, forward.new_id);
            if let (Some(tap), Some(packet)) = (&self.tap, datagram.get(HEADER_LEN..)) {
                tap(direction, packet);
            }
            let transmit =
                Transmit { destination: to, ecn: None, contents: &datagram, segment_size: None, src_ip };
            match socket.try_send(&transmit) {
                Ok(()) => {
                    self.stats.channel_forwarded(direction, 1, datagram.len().saturating_sub(HEADER_LEN))
                }
                Err(_) => self.stats.channel_dropped(DropReason::SendFailed, 1),
            }
        }
    }

    /// The table, locked. Never held across an `.await`, and never while calling into a
    /// connection other than through [`ChannelTable::route`].
    pub fn table(&self) -> MutexGuard<'_, ChannelTable> {
        // A panic while the lock is held would leave plain map state, still consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The relay's UDP socket as quinn sees it: the runtime's socket, with channel data forwarded
/// on the way in (see the module docs).
pub(crate) struct ForwardingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    channels: Arc<Channels>,
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
        let inner = runtime.wrap_udp_socket(socket)?;
        let _ = channels.socket.set(inner.clone());
        Ok(Arc::new(Self { inner, channels }))
    }

    /// Forwards the channel segments of one received buffer and compacts the others to its
    /// front; returns the bytes left for quinn.
    fn filter(
        &self,
        data: &mut [u8],
        stride: usize,
        src: SocketAddr,
        ecn: Option<EcnCodepoint>,
        ctx: &mut Batch,
    ) -> usize {
        let len = data.len();
        let max_segments = self.inner.max_transmit_segments().max(1);
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
            if let Some(run) = data.get_mut(pos..run_end) {
                self.forward_run(&mut table, run, segments, stride, src, ecn, ctx);
            }
            pos = run_end;
        }
        keep
    }

    /// Routes one run of segments of one channel and sends it as one transmit, or drops it.
    #[allow(clippy::too_many_arguments)]
    fn forward_run(
        &self,
        table: &mut ChannelTable,
        run: &mut [u8],
        segments: usize,
        stride: usize,
        src: SocketAddr,
        ecn: Option<EcnCodepoint>,
        ctx: &mut Batch,
    ) {
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
                return;
            }
            Route::Drop(reason) => {
                stats.channel_dropped(reason, segments);
                return;
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
                    return;
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
        let transmit = Transmit {
            destination: forward.to,
            ecn,
            contents: run,
            segment_size: (segments > 1).then_some(stride),
            src_ip: forward.src_ip,
        };
        match self.inner.try_send(&transmit) {
            Ok(()) => stats.channel_forwarded(forward.direction, segments, payload),
            // WouldBlock included: never queue, never wait (see the module docs).
            Err(_) => stats.channel_dropped(DropReason::SendFailed, segments),
        }
    }
}

/// What one `poll_recv` call reads at most once, and only if it meets channel data: the time
/// and the limits in force.
#[derive(Default)]
struct Batch {
    now: Option<Instant>,
    limits: Option<Arc<Limits>>,
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
        let mut batch = Batch::default();
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()).take(received) {
            let len = meta.len.min(buf.len());
            let stride = if meta.stride == 0 { len.max(1) } else { meta.stride };
            let Some(data) = buf.get_mut(..len) else { continue };
            if !has_channel_data(data, stride) {
                continue;
            }
            meta.len = self.filter(data, stride, meta.addr, meta.ecn, &mut batch);
        }
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

    #[tokio::test]
    async fn a_gro_batch_mixing_channels_and_quic_is_forwarded_in_runs_and_the_quic_compacted() {
        let stats = Arc::new(RelayStats::default());
        let limits = Arc::new(LimitsCell::new(Limits::unlimited()));
        let channels = Arc::new(Channels::new(Arc::clone(&stats), limits, None));
        let socket = ForwardingSocket {
            inner: quinn::default_runtime()
                .unwrap()
                .wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
                .unwrap(),
            channels: Arc::clone(&channels),
        };
        // The hubs' side of two channels is one plain socket here, to see what arrives.
        let hubs = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        hubs.set_read_timeout(Some(keyway_test_support::PATIENCE)).unwrap();
        let app: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let (server, client) = endpoint_pair().await;
        let (conn, _peer) = relay_connection(&server, &client).await;
        let ids = [(ChannelId::new(1), ChannelId::new(11)), (ChannelId::new(2), ChannelId::new(22))];
        for (a, h) in ids {
            let legs = (Leg::at(a, conn.clone(), app), Leg::at(h, conn.clone(), hubs.local_addr().unwrap()));
            channels.table().insert(legs.0, legs.1, None, Instant::now()).unwrap();
        }
        let (one, two) = (Some(ids[0].0), Some(ids[1].0));
        let segments = [
            segment(None, 1, STRIDE),
            segment(one, 2, STRIDE),
            segment(one, 3, STRIDE),
            segment(None, 4, STRIDE),
            segment(Some(ChannelId::new(99)), 5, STRIDE),
            segment(two, 6, STRIDE),
            segment(None, 7, STRIDE),
            segment(two, 8, 20),
        ];
        let mut buf: Vec<u8> = segments.concat();
        let kept = socket.filter(&mut buf, STRIDE, app, None, &mut Batch::default());

        // quinn gets the QUIC segments, in order, at the front.
        assert_eq!(&buf[..kept], [segments[0].clone(), segments[3].clone(), segments[6].clone()].concat());
        // The hubs get every channel segment but the unknown one, under their own ids.
        let mut got = Vec::new();
        let mut datagram = [0u8; 2048];
        for _ in 0..4 {
            let n = hubs.recv(&mut datagram).unwrap();
            got.push(datagram[..n].to_vec());
        }
        let expected: Vec<Vec<u8>> = [(1, ids[0].1), (2, ids[0].1), (5, ids[1].1), (7, ids[1].1)]
            .iter()
            .map(|&(i, to)| {
                let mut s = segments[i].clone();
                assert!(channel::write_header(&mut s, to));
                s
            })
            .collect();
        assert_eq!(got, expected);
        let text = stats.encode();
        let series = |s: &str| keyway_test_support::http::series(&text, s).unwrap();
        assert_eq!(series("keyway_relay_channel_packets_forwarded_total{direction=\"app_to_hub\"}"), 4.0);
        // Runs of one channel leave as one send each: [2, 3] (one GSO batch where the socket
        // does GSO), then 6 and 8 (split by the QUIC segment between them).
        let sends = if socket.max_transmit_segments() > 1 { 3.0 } else { 4.0 };
        assert_eq!(series("keyway_relay_channel_transmits_total"), sends);
        // The unknown one is held (a first flight may overtake its `ChannelOpen`), then expires.
        assert_eq!(series("keyway_relay_channel_packets_held_total"), 1.0);
        assert_eq!(series("keyway_relay_channel_packets_dropped_total{reason=\"unknown_channel\"}"), 0.0);
        socket.channels.sweep_held(Instant::now() + crate::channel::HOLD_TIME);
        let text = stats.encode();
        let series = |s: &str| keyway_test_support::http::series(&text, s).unwrap();
        assert_eq!(series("keyway_relay_channel_packets_dropped_total{reason=\"unknown_channel\"}"), 1.0);
        assert_eq!(stats.bytes_app_to_hub(), (3 * (STRIDE - HEADER_LEN) + 20 - HEADER_LEN) as u64);

        // A buffer of channel data only leaves nothing for quinn; a spoofed source, nothing out.
        let mut only = [segment(one, 9, STRIDE), segment(one, 10, STRIDE)].concat();
        assert_eq!(socket.filter(&mut only, STRIDE, app, None, &mut Batch::default()), 0);
        let stranger: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let mut spoof = segment(one, 11, STRIDE);
        assert_eq!(socket.filter(&mut spoof, STRIDE, stranger, None, &mut Batch::default()), 0);
        let text = stats.encode();
        assert_eq!(
            keyway_test_support::http::series(
                &text,
                "keyway_relay_channel_packets_dropped_total{reason=\"wrong_source\"}"
            ),
            Some(1.0)
        );
    }
}
