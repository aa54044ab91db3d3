//! The path socket (data plane v2): one UDP socket that carries both the QUIC connection to the
//! relay and, under the 9-byte channel header, the end-to-end QUIC connections to peers.
//!
//! It owns the translation between what quinn sees and what goes over the wire:
//! * **Receive.** A datagram from the relay that is channel data with a bound id goes to quinn
//!   with the header stripped and the source replaced by that channel's *virtual address*. Every
//!   other datagram from the relay (the relay connection itself) goes to quinn
//!   unchanged. Datagrams from any other address are dropped and counted: only the relay can
//!   reach this socket. Datagrams for an id nobody bound are held briefly (at most
//!   [`HELD_MAX`], each up to [`HELD_TIME`]) and handed to quinn if the id is bound in time:
//!   the relay sends an app's first flight on with its `ChannelAnnounce`, so at the hub it can
//!   arrive before the announce is processed. Then they are dropped and counted.
//! * **Send.** A transmit to a virtual address gets the header of its channel on every segment
//!   and goes to the relay, GSO segmentation kept (`segment_size + 9`); consecutive transmits
//!   of one stride leave as one send (the crate's `outbox` module). Other transmits pass.
//!
//! Why virtual addresses: quinn 0.11 drops packets whose source is not the connection's remote
//! and cannot change a client's remote, so an end-to-end connection must see one address for
//! its whole life whatever path its packets take. The addresses come from ranges no real peer
//! can have (IPv4 `240.0.0.0/5`, reserved; IPv6 the ULA `fd6b:6579:7761::/48`, ours), in the
//! socket's family, and are never reused while bound.
//!
//! Why the socket receives into its own buffers: kernel GRO merges consecutive datagrams from
//! one source into one buffer with one stride, and every channel arrives from the relay's one
//! address, so one GRO batch can mix channels (and the relay connection). quinn takes one
//! source address per [`RecvMeta`], so a batch is cut into runs of one destination each, copied
//! into quinn's buffers with headers stripped; what does not fit waits for the next `poll_recv`.
//! The inner socket is quinn's own (`Runtime::wrap_udp_socket`), so quinn-udp's GRO, GSO and
//! ECN stay.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use keyway_proto::channel::{self, ChannelId};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::error::{ClientError, ConfigError};
use crate::outbox::Outbox;
use crate::relay_link;

/// Most channel datagrams held for ids not bound yet (a few first flights).
pub const HELD_MAX: usize = 32;
/// How long such a datagram is held: the relay sends the `ChannelAnnounce` and the flight at
/// the same moment, so the announce is at most a few milliseconds behind.
pub const HELD_TIME: Duration = Duration::from_secs(1);

/// Receive slots of the socket's own buffers (one GRO batch each). quinn-udp reads up to this
/// many batches per system call; more would only make the copy into quinn's buffers wait.
const SLOTS: usize = 8;

/// Bytes per receive slot: a full GRO batch (64 segments of an Ethernet-sized datagram), and
/// never less than the largest UDP payload, so nothing quinn-udp hands over is truncated.
fn slot_len(gro_segments: usize) -> usize {
    (gro_segments.max(1) * 1500).max(usize::from(u16::MAX) + 1)
}

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
) -> Result<(quinn::Endpoint, Paths), ClientError> {
    let runtime = quinn::default_runtime().ok_or(ConfigError::NoRuntime)?;
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

/// Transport config of an end-to-end connection: the relay link's timers
/// ([`relay_link::transport_config`]) and an MTU discovery bound that leaves room for the
/// channel header ([`channel::MAX_E2E_PACKET`]), so a full-size packet plus header still fits
/// the 1452-byte datagrams quinn assumes every path carries.
pub fn e2e_transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::TransportConfig, ClientError> {
    let mut transport = relay_link::transport_config(keep_alive, idle_timeout)?;
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(channel::MAX_E2E_PACKET);
    transport.mtu_discovery_config(Some(mtu));
    Ok(transport)
}

/// A handle on a path socket's channel table: bind channel ids to virtual addresses, read the
/// counters. Cheap to clone; clones share the table.
#[derive(Clone, Debug)]
pub struct Paths {
    table: Arc<Table>,
}

impl Paths {
    /// Binds `id` (this side's id of a channel, from `ChannelReady` or `ChannelAnnounce`) to a
    /// fresh virtual address: datagrams from the relay under `id` now reach quinn from that
    /// address, and quinn's sends to it leave under `id`. Binding an id that is already bound
    /// moves its receive side to the new address (the old binding then only sends).
    pub fn bind(&self, id: ChannelId) -> ChannelBinding {
        self.bind_with(id, |_| ()).0
    }

    /// [`bind`](Self::bind), calling `register` with the virtual address before any datagram of
    /// the channel can reach quinn from it (held ones included), so whatever quinn's first
    /// packet from that address will look up (the hub's channel info) is there already.
    pub fn bind_with<T>(&self, id: ChannelId, register: impl FnOnce(SocketAddr) -> T) -> (ChannelBinding, T) {
        let mut maps = self.table.maps.write().unwrap_or_else(PoisonError::into_inner);
        let addr = loop {
            let n = self.table.next.fetch_add(1, Ordering::Relaxed);
            let addr = virtual_addr(self.table.v6, n);
            if !maps.by_addr.contains_key(&addr) {
                break addr;
            }
        };
        let registered = register(addr);
        maps.by_addr.insert(addr, id);
        maps.by_id.insert(id, addr);
        drop(maps);
        self.table.release_held(id, addr);
        (ChannelBinding { table: self.table.clone(), id, addr }, registered)
    }

    /// The socket's counters so far (held datagrams that expired are counted as dropped now).
    pub fn stats(&self) -> PathStats {
        {
            let mut held = self.table.held.lock().unwrap_or_else(PoisonError::into_inner);
            self.table.expire(&mut held, Instant::now());
        }
        let c = &self.table.counters;
        PathStats {
            channel_in: c.channel_in.load(Ordering::Relaxed),
            channel_out: c.channel_out.load(Ordering::Relaxed),
            relay_in: c.relay_in.load(Ordering::Relaxed),
            dropped_foreign: c.dropped_foreign.load(Ordering::Relaxed),
            dropped_unknown_channel: c.dropped_unknown_channel.load(Ordering::Relaxed),
            dropped_malformed: c.dropped_malformed.load(Ordering::Relaxed),
            dropped_unbound_send: c.dropped_unbound_send.load(Ordering::Relaxed),
            held: c.held.load(Ordering::Relaxed),
            bound: self.table.maps.read().map(|m| m.by_addr.len()).unwrap_or_default(),
        }
    }
}

/// One channel id bound to its virtual address; unbinds on drop (later datagrams under the id
/// are dropped as unknown, sends to the address are dropped and counted).
#[derive(Debug)]
pub struct ChannelBinding {
    table: Arc<Table>,
    id: ChannelId,
    addr: SocketAddr,
}

impl ChannelBinding {
    /// The virtual address quinn sees for this channel's peer: dial it (app) or expect it as
    /// the incoming connection's remote (hub).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This side's channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }
}

impl Drop for ChannelBinding {
    fn drop(&mut self) {
        let mut maps = self.table.maps.write().unwrap_or_else(PoisonError::into_inner);
        maps.by_addr.remove(&self.addr);
        // A later binding of the same id owns the receive side now; leave it alone.
        if maps.by_id.get(&self.id) == Some(&self.addr) {
            maps.by_id.remove(&self.id);
        }
    }
}

/// Plain counters of a path socket, in datagrams (GSO/GRO segments counted one by one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathStats {
    /// Channel datagrams from the relay handed to quinn (header stripped).
    pub channel_in: u64,
    /// Datagrams quinn sent to a virtual address, sent to the relay under their channel's id.
    pub channel_out: u64,
    /// Other datagrams from the relay (its own QUIC connection), handed to quinn unchanged.
    pub relay_in: u64,
    /// Datagrams from an address other than the relay's.
    pub dropped_foreign: u64,
    /// Channel datagrams from the relay under an id nobody bound (ended or never ours).
    pub dropped_unknown_channel: u64,
    /// Datagrams from the relay too short for a channel header, empty, or larger than quinn's
    /// receive buffer.
    pub dropped_malformed: u64,
    /// Datagrams quinn sent to a virtual address that is no longer bound (a closing connection
    /// whose binding was dropped first).
    pub dropped_unbound_send: u64,
    /// Channel datagrams held for an id not bound yet (those not bound in time also count in
    /// `dropped_unknown_channel`).
    pub held: u64,
    /// Channel ids bound right now.
    pub bound: usize,
}

#[derive(Default)]
struct Counters {
    channel_in: AtomicU64,
    channel_out: AtomicU64,
    relay_in: AtomicU64,
    dropped_foreign: AtomicU64,
    dropped_unknown_channel: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_unbound_send: AtomicU64,
    held: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

struct Table {
    maps: RwLock<Maps>,
    /// Counter behind the virtual addresses; only grows, so addresses are not reused while
    /// the socket lives (the loop in `bind` also skips any still bound after a wrap).
    next: AtomicU64,
    v6: bool,
    counters: Counters,
    held: Mutex<Held>,
}

/// Channel datagrams for ids not bound yet, and those whose id got bound, waiting for quinn.
#[derive(Default)]
struct Held {
    /// Oldest first.
    waiting: VecDeque<(ChannelId, Instant, Vec<u8>)>,
    /// Packets (header stripped) for quinn, from their channel's virtual address.
    ready: VecDeque<(SocketAddr, Vec<u8>)>,
    /// The endpoint driver's, to wake when `ready` fills.
    waker: Option<Waker>,
}

impl Table {
    /// Holds `packet` of channel `id` (not bound), within [`HELD_MAX`]; false if it was not.
    fn hold(&self, id: ChannelId, packet: &[u8], now: Instant) -> bool {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut held, now);
        if held.waiting.len() >= HELD_MAX {
            return false;
        }
        held.waiting.push_back((id, now, packet.to_vec()));
        Counters::add(&self.counters.held, 1);
        true
    }

    /// `id` was just bound to `addr`: what was held for it goes to quinn.
    fn release_held(&self, id: ChannelId, addr: SocketAddr) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.waiting.is_empty() {
            return;
        }
        self.expire(&mut held, Instant::now());
        let Held { waiting, ready, waker } = &mut *held;
        let before = ready.len();
        waiting.retain_mut(|(held_id, _, packet)| {
            let mine = *held_id == id;
            if mine {
                ready.push_back((addr, std::mem::take(packet)));
            }
            !mine
        });
        if ready.len() > before {
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
    }

    fn expire(&self, held: &mut Held, now: Instant) {
        let before = held.waiting.len();
        while held.waiting.front().is_some_and(|(_, at, _)| now.saturating_duration_since(*at) >= HELD_TIME) {
            held.waiting.pop_front();
        }
        Counters::add(&self.counters.dropped_unknown_channel, (before - held.waiting.len()) as u64);
    }

    /// Moves released packets into quinn's buffers, one per meta; how many.
    fn drain_ready(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = 0;
        while out < bufs.len().min(meta.len()) {
            let Some((addr, packet)) = held.ready.pop_front() else { break };
            let Some(dst) = bufs[out].get_mut(..packet.len()) else {
                Counters::add(&self.counters.dropped_malformed, 1);
                continue;
            };
            dst.copy_from_slice(&packet);
            meta[out] = RecvMeta { addr, len: packet.len(), stride: packet.len(), ..RecvMeta::default() };
            Counters::add(&self.counters.channel_in, 1);
            out += 1;
        }
        out
    }

    /// Registers the waker of a `poll_recv` about to return pending.
    fn register(&self, waker: &Waker) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            held.waker = Some(waker.clone());
        }
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bound = self.maps.read().map(|m| m.by_addr.len()).unwrap_or_default();
        f.debug_struct("Table").field("bound", &bound).field("v6", &self.v6).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Maps {
    /// Receive side: which virtual address a channel's datagrams come from.
    by_id: HashMap<ChannelId, SocketAddr>,
    /// Send side: which channel a virtual address's datagrams go under.
    by_addr: HashMap<SocketAddr, ChannelId>,
}

/// The `n`th virtual address of a family. IPv4: `240.0.0.0/5` (never a real unicast source, and
/// clear of the broadcast address), the port above 0 as quinn requires. IPv6: our ULA /48.
fn virtual_addr(v6: bool, n: u64) -> SocketAddr {
    if v6 {
        let prefix: u128 = 0xfd6b_6579_7761 << 80;
        let host = u128::from(n) & ((1 << 80) - 1);
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(prefix | host)), 1)
    } else {
        let host = (n & 0x07ff_ffff) as u32;
        let port = 1 + ((n >> 27) % u64::from(u16::MAX)) as u16;
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0xf000_0000 | host)), port)
    }
}

fn is_virtual(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.octets()[0] & 0xf8 == 0xf0,
        IpAddr::V6(ip) => u128::from(ip) >> 80 == 0xfd6b_6579_7761,
    }
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
}

impl fmt::Debug for PathSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathSocket").field("relay", &self.relay).field("table", &self.table).finish()
    }
}

impl PathSocket {
    fn new(inner: Arc<dyn AsyncUdpSocket>, relay: SocketAddr) -> io::Result<(Self, Paths)> {
        let v6 = inner.local_addr()?.is_ipv6();
        let table = Arc::new(Table {
            maps: RwLock::new(Maps::default()),
            next: AtomicU64::new(1),
            v6,
            counters: Counters::default(),
            held: Mutex::default(),
        });
        let recv = Mutex::new(RecvState::new(slot_len(inner.max_receive_segments())));
        let paths = Paths { table: table.clone() };
        let outbox = Outbox::new(inner.clone(), relay);
        Ok((Self { inner, relay, table, recv, outbox }, paths))
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
        let id = self
            .table
            .maps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_addr
            .get(&transmit.destination)
            .copied();
        let Some(id) = id else {
            // Pretend it left: quinn would otherwise retry a send that can never succeed.
            Counters::add(&self.table.counters.dropped_unbound_send, 1);
            return Ok(());
        };
        let segment = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        let segments = self.outbox.send(id, transmit, segment)?;
        Counters::add(&self.table.counters.channel_out, segments as u64);
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

/// Counts of one drain, added to the shared counters once per `poll_recv` rather than per
/// datagram.
#[derive(Default, Debug, PartialEq, Eq)]
struct Tally {
    channel_in: u64,
    relay_in: u64,
    foreign: u64,
    malformed: u64,
}

impl Tally {
    fn commit(&self, c: &Counters) {
        Counters::add(&c.channel_in, self.channel_in);
        Counters::add(&c.relay_in, self.relay_in);
        Counters::add(&c.dropped_foreign, self.foreign);
        Counters::add(&c.dropped_malformed, self.malformed);
    }
}

/// What the socket read and has not yet handed to quinn: `SLOTS` buffers with their metas, and
/// a cursor (batch `next`, byte `offset` in it).
struct RecvState {
    slots: Box<[u8]>,
    slot_len: usize,
    metas: [RecvMeta; SLOTS],
    filled: usize,
    next: usize,
    offset: usize,
    /// Channel packets of the last drain for ids nobody bound, for the caller to hold.
    unbound: Vec<(ChannelId, Vec<u8>)>,
}

/// Where one received segment goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// To quinn unchanged, from the relay's address.
    Relay,
    /// To quinn without the header, from this virtual address.
    Channel(SocketAddr),
}

impl RecvState {
    fn new(slot_len: usize) -> Self {
        Self {
            slots: vec![0; slot_len * SLOTS].into_boxed_slice(),
            slot_len,
            metas: [RecvMeta::default(); SLOTS],
            filled: 0,
            next: 0,
            offset: 0,
            unbound: Vec::new(),
        }
    }

    /// Reads the next batches from the inner socket; only called once the last ones are drained.
    fn refill(&mut self, cx: &mut Context, inner: &dyn AsyncUdpSocket) -> Poll<io::Result<()>> {
        let mut chunks = self.slots.chunks_mut(self.slot_len);
        let mut iovs: [IoSliceMut<'_>; SLOTS] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        let n = std::task::ready!(inner.poll_recv(cx, &mut iovs, &mut self.metas))?;
        self.filled = n.min(SLOTS);
        self.next = 0;
        self.offset = 0;
        Poll::Ready(Ok(()))
    }

    /// Moves what is pending into quinn's buffers, one run of one destination per `RecvMeta`,
    /// until either side runs out. Returns how many of quinn's metas it filled.
    fn drain(
        &mut self,
        relay: SocketAddr,
        bound: &HashMap<ChannelId, SocketAddr>,
        tally: &mut Tally,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut out = 0;
        while self.next < self.filled && out < bufs.len().min(meta.len()) {
            let m = self.metas[self.next];
            let start = self.next * self.slot_len;
            let data = &self.slots[start..start + m.len.min(self.slot_len)];
            let stride = if m.stride == 0 { data.len().max(1) } else { m.stride };
            // Address and port only: a scope id or flow label the kernel reports is no
            // reason to drop the relay's own datagrams.
            if (m.addr.ip(), m.addr.port()) != (relay.ip(), relay.port()) {
                tally.foreign += data.len().div_ceil(stride).max(1) as u64;
                self.advance_batch();
                continue;
            }
            let dst = &mut bufs[out];
            let mut used = 0;
            let mut run: Option<(Class, usize)> = None;
            while self.offset < data.len() {
                let end = (self.offset + stride).min(data.len());
                let segment = &data[self.offset..end];
                let (class, payload) = match classify(segment, bound) {
                    Ok(found) => found,
                    Err(discard) => {
                        match discard {
                            // Held by the caller (outside the table's read lock), or counted.
                            Discard::Unknown(id) => {
                                if let Some((_, packet)) = channel::parse(segment) {
                                    self.unbound.push((id, packet.to_vec()));
                                }
                            }
                            Discard::Malformed => tally.malformed += 1,
                        }
                        self.offset = end;
                        continue;
                    }
                };
                match run {
                    None => {
                        if payload.len() > dst.len() {
                            // quinn's buffers are sized for its largest datagram; anything
                            // larger is not a packet it could have wanted.
                            tally.malformed += 1;
                            self.offset = end;
                            continue;
                        }
                        run = Some((class, payload.len()));
                    }
                    Some((c, run_stride)) => {
                        if c != class || payload.len() > run_stride || used + payload.len() > dst.len() {
                            break;
                        }
                    }
                }
                dst[used..used + payload.len()].copy_from_slice(payload);
                used += payload.len();
                match class {
                    Class::Relay => tally.relay_in += 1,
                    Class::Channel(_) => tally.channel_in += 1,
                }
                self.offset = end;
                // A short segment can only end a run: quinn cuts runs at `stride`.
                if run.is_some_and(|(_, s)| payload.len() < s) {
                    break;
                }
            }
            if self.offset >= data.len() {
                self.advance_batch();
            }
            if let Some((class, run_stride)) = run {
                let addr = match class {
                    Class::Relay => relay,
                    Class::Channel(addr) => addr,
                };
                // ECN and destination IP are the batch's, as quinn-udp reported them.
                meta[out] = RecvMeta { addr, len: used, stride: run_stride, ..m };
                out += 1;
            }
        }
        out
    }

    fn advance_batch(&mut self) {
        self.next += 1;
        self.offset = 0;
    }
}

#[derive(Debug)]
enum Discard {
    Unknown(ChannelId),
    Malformed,
}

/// Sorts one segment from the relay: relay traffic, a bound channel's packet, or a drop.
fn classify<'a>(
    segment: &'a [u8],
    bound: &HashMap<ChannelId, SocketAddr>,
) -> Result<(Class, &'a [u8]), Discard> {
    if segment.is_empty() {
        return Err(Discard::Malformed);
    }
    if !channel::is_channel_data(segment) {
        return Ok((Class::Relay, segment));
    }
    let (id, packet) = channel::parse(segment).ok_or(Discard::Malformed)?;
    if packet.is_empty() {
        return Err(Discard::Malformed);
    }
    let addr = bound.get(&id).ok_or(Discard::Unknown(id))?;
    Ok((Class::Channel(*addr), packet))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::channel::HEADER_LEN;

    fn relay() -> SocketAddr {
        "192.0.2.1:4433".parse().unwrap()
    }

    /// A receive state holding one GRO batch made of `segments` (all but the last the same
    /// length), as quinn-udp would leave it.
    fn batch(from: SocketAddr, segments: &[Vec<u8>]) -> RecvState {
        let mut state = RecvState::new(slot_len(64));
        let stride = segments[0].len();
        let mut at = 0;
        for s in segments {
            state.slots[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        state.metas[0].addr = from;
        state.metas[0].len = at;
        state.metas[0].stride = stride;
        state.filled = 1;
        state
    }

    fn chan(id: u64, fill: u8, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        channel::encode_into(&mut out, ChannelId::new(id), &vec![fill; len - HEADER_LEN]);
        out
    }

    fn quic(fill: u8, len: usize) -> Vec<u8> {
        let mut out = vec![fill; len];
        out[0] = 0x40 | (fill & 0x3f);
        out
    }

    /// Drains into `n` quinn buffers of `cap` bytes; returns (addr, stride, data) per meta.
    fn drain(
        state: &mut RecvState,
        bound: &HashMap<ChannelId, SocketAddr>,
        tally: &mut Tally,
        n: usize,
        cap: usize,
    ) -> Vec<(SocketAddr, usize, Vec<u8>)> {
        let mut storage = vec![vec![0u8; cap]; n];
        let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut metas = vec![RecvMeta::default(); n];
        let filled = state.drain(relay(), bound, tally, &mut bufs, &mut metas);
        (0..filled).map(|i| (metas[i].addr, metas[i].stride, bufs[i][..metas[i].len].to_vec())).collect()
    }

    #[test]
    fn a_gro_batch_mixing_channels_is_cut_into_runs_and_what_does_not_fit_waits() {
        let a: SocketAddr = virtual_addr(false, 1);
        let b: SocketAddr = virtual_addr(false, 2);
        let bound = HashMap::from([(ChannelId::new(1), a), (ChannelId::new(2), b)]);
        let mut state = batch(
            relay(),
            &[
                chan(1, 0xa1, 100),
                chan(1, 0xa2, 100),
                chan(2, 0xb1, 100),
                quic(0x51, 100),
                chan(9, 0xee, 100), // unknown id: set aside (to be held) in the middle of a run
                quic(0x52, 100),
                chan(1, 0xa3, 100),
                chan(1, 0xa4, 40), // GRO's short last segment
            ],
        );
        let mut tally = Tally::default();
        // Two of quinn's buffers: the first two runs now, the rest later.
        let first = drain(&mut state, &bound, &mut tally, 2, 4096);
        assert_eq!(first.len(), 2);
        assert_eq!((first[0].0, first[0].1), (a, 91));
        assert_eq!(first[0].2, [vec![0xa1; 91], vec![0xa2; 91]].concat());
        assert_eq!((first[1].0, first[1].1, first[1].2.clone()), (b, 91, vec![0xb1; 91]));
        let rest = drain(&mut state, &bound, &mut tally, 8, 4096);
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert_eq!((rest[0].0, rest[0].1), (relay(), 100));
        assert_eq!(rest[0].2, [quic(0x51, 100), quic(0x52, 100)].concat(), "unknown id skipped");
        assert_eq!((rest[1].0, rest[1].1), (a, 91));
        assert_eq!(rest[1].2, [vec![0xa3; 91], vec![0xa4; 31]].concat());
        assert_eq!(tally, Tally { channel_in: 5, relay_in: 2, ..Tally::default() });
        assert_eq!(state.unbound, vec![(ChannelId::new(9), vec![0xee; 91])], "left for the caller to hold");
        assert!(drain(&mut state, &bound, &mut tally, 8, 4096).is_empty(), "all handed over");
    }

    #[test]
    fn a_packet_for_an_unbound_id_is_held_until_bound_then_handed_to_quinn() {
        let table = Table {
            maps: RwLock::new(Maps::default()),
            next: AtomicU64::new(1),
            v6: false,
            counters: Counters::default(),
            held: Mutex::default(),
        };
        let now = Instant::now();
        assert!(table.hold(ChannelId::new(5), &[0x40, 1, 2], now));
        for i in 1..HELD_MAX {
            assert!(table.hold(ChannelId::new(100 + i as u64), &[0x40], now));
        }
        assert!(!table.hold(ChannelId::new(6), &[0x40], now), "bounded");
        let addr = virtual_addr(false, 7);
        table.release_held(ChannelId::new(5), addr);
        let mut buf = [0u8; 64];
        let mut bufs = [IoSliceMut::new(&mut buf)];
        let mut metas = [RecvMeta::default()];
        assert_eq!(table.drain_ready(&mut bufs, &mut metas), 1);
        assert_eq!((metas[0].addr, metas[0].len), (addr, 3));
        assert_eq!(&buf[..3], &[0x40, 1, 2]);
        // The rest expire unbound, counted as unknown.
        table.expire(&mut table.held.lock().unwrap(), now + HELD_TIME);
        assert_eq!(table.counters.dropped_unknown_channel.load(Ordering::Relaxed), HELD_MAX as u64 - 1);
    }

    #[test]
    fn a_run_stops_where_quinns_buffer_is_full_and_resumes_there() {
        let a = virtual_addr(false, 7);
        let bound = HashMap::from([(ChannelId::new(1), a)]);
        let segments: Vec<_> = (0..5u8).map(|i| chan(1, i, 109)).collect();
        let mut state = batch(relay(), &segments);
        let mut tally = Tally::default();
        let mut seen = Vec::new();
        for _ in 0..5 {
            // Room for two stripped segments per buffer, one buffer per call.
            for (addr, stride, data) in drain(&mut state, &bound, &mut tally, 1, 250) {
                assert_eq!((addr, stride), (a, 100));
                seen.extend(data);
            }
        }
        let expected: Vec<u8> = (0..5u8).flat_map(|i| vec![i; 100]).collect();
        assert_eq!(seen, expected);
        assert_eq!(tally.channel_in, 5);
    }

    #[test]
    fn foreign_sources_short_headers_and_empty_datagrams_are_dropped_and_counted() {
        let a = virtual_addr(false, 1);
        let bound = HashMap::from([(ChannelId::new(1), a)]);
        let stranger: SocketAddr = "198.51.100.9:4433".parse().unwrap();
        let mut tally = Tally::default();
        let mut state = batch(stranger, &[chan(1, 1, 50), chan(1, 2, 50)]);
        assert!(drain(&mut state, &bound, &mut tally, 4, 4096).is_empty());
        assert_eq!(tally.foreign, 2, "a valid id from another address is not accepted");
        let mut state = batch(relay(), &[vec![channel::CHANNEL_DATA; 5]]);
        assert!(drain(&mut state, &bound, &mut tally, 4, 4096).is_empty());
        let mut state = batch(relay(), &[chan(1, 0, HEADER_LEN)]);
        assert!(drain(&mut state, &bound, &mut tally, 4, 4096).is_empty());
        assert_eq!(tally.malformed, 2);
        assert_eq!(tally.channel_in + tally.relay_in, 0);
    }

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

    #[test]
    fn virtual_addresses_are_virtual_distinct_and_never_port_zero() {
        let mut seen = std::collections::HashSet::new();
        for n in (1..2000).chain([0x07ff_ffff, 0x0800_0000, u64::MAX]) {
            for v6 in [false, true] {
                let addr = virtual_addr(v6, n);
                assert!(is_virtual(&addr), "{addr}");
                assert_ne!(addr.port(), 0);
                assert_eq!(addr.is_ipv6(), v6);
                assert!(seen.insert(addr), "{addr} twice");
            }
        }
        for real in ["127.0.0.1:1", "203.0.113.7:443", "[::1]:1", "[fd00::1]:1", "255.255.255.255:1"] {
            assert!(!is_virtual(&real.parse().unwrap()), "{real}");
        }
    }
}
