//! The path socket's outbox: channel datagrams that quinn handed over in separate transmits,
//! joined into one GSO send to the relay.
//!
//! Why: quinn 0.11's connection driver asks for at most 10 segments per transmit
//! (`MAX_TRANSMIT_SEGMENTS` in `quinn::connection`) whatever the socket can take, so a bulk
//! transfer leaves as one `sendmsg` per 10 packets, arrives at the relay as receive batches of
//! 10, and leaves the relay the same way: every hop pays its per-call and per-buffer costs
//! once per 10 packets. Every channel datagram of a path socket goes to the same address (the
//! relay), each segment carries its own channel header, and the socket copies each transmit
//! anyway to add those headers, so consecutive transmits of one stride can be joined for free:
//! one send of up to the socket's GSO limit (64 segments, 64 KiB).
//!
//! When: a transmit is appended, and only a burst waits. The outbox leaves at once when the
//! transmit has fewer segments than quinn puts in a full one (the end of what quinn had to
//! send: an ACK, an interactive write, a burst's tail, so nothing interactive waits), when it
//! ended in a short segment (GSO allows a short segment only last), when the outbox is full, or
//! when the next transmit cannot join (another stride, ECN mark or source). A burst that ends
//! on a full transmit leaves from the outbox's own task, woken by the append, after it has
//! yielded once to let the connection drivers that are running hand over their next transmits:
//! microseconds, not a timer. Without a tokio runtime (the path socket's receive tests) every
//! transmit is tried at once, and dropped if the socket's buffer is full.
//!
//! What it owns: at most one GSO send's worth of bytes. A send the kernel refuses for a full
//! buffer waits for the socket to be writable; one it refuses otherwise is dropped (quinn treats
//! a lost datagram as loss). When that send carried the transmit being handed over, the error
//! goes back to quinn, as it did before transmits were joined (quinn logs it); else it is
//! logged here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use keyway_proto::channel::{self, ChannelId, HEADER_LEN};
use quinn::udp::{EcnCodepoint, Transmit};
use quinn::AsyncUdpSocket;
use tokio::sync::Notify;

/// Most bytes in one joined send: the kernel refuses a GSO send whose UDP payload passes
/// 64 KiB, headers of the IP packet included.
const MAX_JOINED_BYTES: usize = 64 * 1024 - 1024;

/// The most segments quinn 0.11's driver puts in one transmit (`MAX_TRANSMIT_SEGMENTS`, private
/// to `quinn::connection`). A transmit that size means quinn is in a burst and more follows at
/// once; a shorter one ends what it had.
const QUINN_TRANSMIT_SEGMENTS: usize = 10;

/// The datagrams waiting to leave as one send.
#[derive(Debug, Default)]
struct Pending {
    /// Segments back to back, each with its channel header.
    bytes: Vec<u8>,
    /// Length of every segment but possibly the last.
    stride: usize,
    segments: usize,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    /// The last segment is shorter than `stride`: nothing may follow it in this send.
    sealed: bool,
}

impl Pending {
    /// Whether a transmit of `len` bytes in `segments` segments of `stride` (with headers) can
    /// join what is waiting, under a limit of `max_segments`.
    fn can_join(
        &self,
        stride: usize,
        segments: usize,
        len: usize,
        transmit: &Transmit<'_>,
        max_segments: usize,
    ) -> bool {
        self.segments == 0
            || (!self.sealed
                && self.stride == stride
                && self.ecn == transmit.ecn
                && self.src_ip == transmit.src_ip
                && self.segments + segments <= max_segments
                && self.bytes.len() + len <= MAX_JOINED_BYTES)
    }
}

/// See the module documentation. Shared by the path socket and the outbox's task.
#[derive(Debug)]
pub(crate) struct Outbox {
    inner: Arc<dyn AsyncUdpSocket>,
    relay: SocketAddr,
    pending: Mutex<Pending>,
    /// Wakes the task; `None` without a runtime: then nothing waits.
    wake: Option<Arc<Notify>>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // The task holds only a weak reference: woken now, it finds the outbox gone and ends.
        if let Some(wake) = &self.wake {
            wake.notify_one();
        }
    }
}

impl Outbox {
    /// An outbox sending through `inner` to `relay`, with its task when a tokio runtime is
    /// current.
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, relay: SocketAddr) -> Arc<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let wake = runtime.as_ref().map(|_| Arc::new(Notify::new()));
        let outbox = Arc::new(Self { inner, relay, pending: Mutex::default(), wake: wake.clone() });
        if let (Some(runtime), Some(wake)) = (runtime, wake) {
            runtime.spawn(send_later(Arc::downgrade(&outbox), wake));
        }
        outbox
    }

    /// Takes `transmit`'s packets (each `segment` long but possibly the last) to go under
    /// channel `id`. An error means nothing of it was taken: the send that had to leave first
    /// found the socket's buffer full (quinn retries once the socket is writable). Else, how many
    /// packets it took.
    pub(crate) fn send(&self, id: ChannelId, transmit: &Transmit<'_>, segment: usize) -> io::Result<usize> {
        if transmit.contents.is_empty() {
            return Ok(0);
        }
        let segments = transmit.contents.len().div_ceil(segment);
        let stride = segment + HEADER_LEN;
        let len = transmit.contents.len() + segments * HEADER_LEN;
        let max_segments = self.inner.max_transmit_segments().max(1);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if !pending.can_join(stride, segments, len, transmit, max_segments) {
            match self.flush(&mut pending) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // Earlier transmits, dropped: this one still goes.
                Err(e) => tracing::debug!(error = %e, "channel datagrams not sent"),
                Ok(()) => {}
            }
        }
        if pending.segments == 0 {
            pending.stride = stride;
            pending.ecn = transmit.ecn;
            pending.src_ip = transmit.src_ip;
            pending.bytes.reserve(len);
        }
        for packet in transmit.contents.chunks(segment) {
            channel::encode_into(&mut pending.bytes, id, packet);
        }
        pending.segments += segments;
        pending.sealed = transmit.contents.len() % segment != 0;
        // A transmit shorter than quinn's most is the end of what quinn had to send now (an
        // ACK, an interactive write, the tail of a burst): holding it would only add latency.
        let burst_goes_on = segments >= QUINN_TRANSMIT_SEGMENTS.min(max_segments);
        let full = !burst_goes_on
            || pending.sealed
            || pending.segments >= max_segments
            || pending.bytes.len() + stride > MAX_JOINED_BYTES;
        if !full {
            if let Some(wake) = &self.wake {
                wake.notify_one();
                return Ok(segments);
            }
        }
        match self.flush(&mut pending) {
            // Taken: the task sends it once the socket is writable (without a runtime, it is
            // dropped as quinn would drop it).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(wake) = &self.wake {
                    wake.notify_one();
                }
                Ok(segments)
            }
            other => other.map(|()| segments),
        }
    }

    /// Sends what is waiting. `WouldBlock` leaves it waiting; any other refusal drops it and is
    /// returned.
    fn flush(&self, pending: &mut Pending) -> io::Result<()> {
        if pending.segments == 0 {
            return Ok(());
        }
        let sent = self.inner.try_send(&Transmit {
            destination: self.relay,
            ecn: pending.ecn,
            contents: &pending.bytes,
            segment_size: (pending.segments > 1).then_some(pending.stride),
            src_ip: pending.src_ip,
        });
        if matches!(&sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            return sent;
        }
        pending.bytes.clear();
        pending.segments = 0;
        pending.sealed = false;
        sent
    }

    /// Sends what is waiting, waiting for the socket to be writable while its buffer is full.
    async fn flush_when_writable(&self) {
        let mut poller = None;
        loop {
            let sent = {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                self.flush(&mut pending)
            };
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return tracing::debug!(error = %e, "channel datagrams not sent"),
                Ok(()) => return,
            }
            let poller = poller.get_or_insert_with(|| self.inner.clone().create_io_poller());
            if std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.is_err() {
                return;
            }
        }
    }
}

/// The outbox's task: sends what waits once the drivers that are running have had their turn.
async fn send_later(outbox: Weak<Outbox>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        tokio::task::yield_now().await;
        let Some(outbox) = outbox.upgrade() else { return };
        outbox.flush_when_writable().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::udp::{RecvMeta, UdpSocketState};
    use std::io::IoSliceMut;
    use std::net::UdpSocket;
    use std::time::Duration;

    /// A "relay": a real socket with quinn-udp's GRO on, so a joined send arrives as one batch.
    struct Relay {
        socket: UdpSocket,
        state: UdpSocketState,
    }

    impl Relay {
        fn bind() -> Self {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let state = UdpSocketState::new((&socket).into()).unwrap();
            Self { socket, state }
        }

        /// The next receive call's batches, each as (stride, datagrams).
        fn recv(&self) -> Vec<(usize, Vec<Vec<u8>>)> {
            let mut storage = vec![vec![0u8; 70_000]; 4];
            let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut metas = [RecvMeta::default(); 4];
            // Non-blocking (quinn-udp's recvmmsg on a blocking socket would wait for all four).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let n = loop {
                match self.state.recv((&self.socket).into(), &mut bufs, &mut metas) {
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    other => break other.unwrap(),
                }
            };
            metas[..n]
                .iter()
                .zip(&bufs)
                .map(|(m, b)| (m.stride, b[..m.len].chunks(m.stride).map(<[u8]>::to_vec).collect()))
                .collect()
        }

        /// Every datagram until `count` have arrived, with how many receive batches carried them.
        fn datagrams(&self, count: usize) -> (Vec<Vec<u8>>, usize) {
            let (mut all, mut batches) = (Vec::new(), 0);
            while all.len() < count {
                for (_, datagrams) in self.recv() {
                    batches += 1;
                    all.extend(datagrams);
                }
            }
            (all, batches)
        }
    }

    fn outbox(to: SocketAddr) -> Arc<Outbox> {
        let runtime = quinn::default_runtime().unwrap();
        let inner = runtime.wrap_udp_socket(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        Outbox::new(inner, to)
    }

    fn transmit(contents: &[u8], segment: usize) -> Transmit<'_> {
        Transmit {
            destination: "240.0.0.1:1".parse().unwrap(),
            ecn: None,
            contents,
            segment_size: Some(segment),
            src_ip: None,
        }
    }

    fn datagram(id: u64, packet: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        channel::encode_into(&mut out, ChannelId::new(id), packet);
        out
    }

    /// `n` segments of `len` bytes, the last `last` bytes, filled with `first`, `first + 1`...
    fn segments(first: u8, n: usize, len: usize, last: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![first + i as u8; if i + 1 == n { last } else { len }]).collect()
    }

    // Current-thread, so the task cannot send part of it between two transmits.
    #[tokio::test]
    async fn full_transmits_of_one_stride_leave_as_one_send_in_order_each_segment_under_its_channel() {
        let relay = Relay::bind();
        let outbox = outbox(relay.socket.local_addr().unwrap());
        // Let the reactor learn that the socket is writable.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let gso = outbox.inner.max_transmit_segments() >= 40;
        // Three full transmits of 10 × 100 bytes for two channels, then one whose last segment
        // is short, which seals the send.
        let mut expected = Vec::new();
        for n in 0..4u8 {
            let packets = segments(n * 10, 10, 100, if n == 3 { 40 } else { 100 });
            let id = 1 + u64::from(n % 2);
            outbox.send(ChannelId::new(id), &transmit(&packets.concat(), 100), 100).unwrap();
            expected.extend(packets.iter().map(|p| datagram(id, p)));
        }
        let (got, batches) = relay.datagrams(expected.len());
        assert_eq!(got, expected);
        if gso {
            assert_eq!(batches, 1, "not joined");
        }
    }

    // Multi-threaded: the task must run while the test blocks on the relay's socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_burst_ending_on_a_full_transmit_leaves_from_the_task_and_another_stride_sends_it_first() {
        let relay = Relay::bind();
        let outbox = outbox(relay.socket.local_addr().unwrap());
        let hundred = segments(0, 10, 100, 100);
        outbox.send(ChannelId::new(5), &transmit(&hundred.concat(), 100), 100).unwrap();
        // Nothing sealed it and nothing follows: the task sends it.
        let (got, _) = relay.datagrams(10);
        assert_eq!(got, hundred.iter().map(|p| datagram(5, p)).collect::<Vec<_>>());
        // Another stride cannot join: what waited leaves first, in order.
        let fifty = segments(20, 10, 50, 50);
        outbox.send(ChannelId::new(5), &transmit(&hundred.concat(), 100), 100).unwrap();
        outbox.send(ChannelId::new(6), &transmit(&fifty.concat(), 50), 50).unwrap();
        let (got, _) = relay.datagrams(20);
        let mut expected: Vec<Vec<u8>> = hundred.iter().map(|p| datagram(5, p)).collect();
        expected.extend(fifty.iter().map(|p| datagram(6, p)));
        assert_eq!(got, expected);
    }

    // Current-thread: while the test blocks on the relay's socket, the task cannot run, so what
    // arrives was sent by `send` itself.
    #[tokio::test]
    async fn a_transmit_shorter_than_quinns_most_leaves_at_once() {
        let relay = Relay::bind();
        let outbox = outbox(relay.socket.local_addr().unwrap());
        // Let the reactor learn that the socket is writable.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let three = segments(0, 3, 100, 100);
        outbox.send(ChannelId::new(7), &transmit(&three.concat(), 100), 100).unwrap();
        let (got, _) = relay.datagrams(3);
        assert_eq!(got, three.iter().map(|p| datagram(7, p)).collect::<Vec<_>>());
    }
}
