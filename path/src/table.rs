//! The path table: which channel (and, later, which other paths) carries each virtual address,
//! the datagrams held for channels not bound yet, and the socket's counters.
//!
//! Two maps, one per direction: the receive side maps this side's channel id to the virtual
//! address quinn sees, the send side maps a virtual address to its [`Route`], the pure record of
//! the paths that peer may use and which one carries its packets. Datagrams for an id nobody
//! bound are held briefly (at most [`HELD_MAX`], each up to [`HELD_TIME`]) and handed to quinn
//! if the id is bound in time: the relay sends an app's first flight on with its
//! `ChannelAnnounce`, so at the hub it can arrive before the announce is processed. Then they
//! are dropped and counted. Time comes in as `now` wherever a decision depends on it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use keyway_proto::channel::ChannelId;
use quinn::udp::RecvMeta;

use crate::addr::virtual_addr;
use crate::pulse::Pulse;
use crate::route::Route;

/// Most channel datagrams held for ids not bound yet (a few first flights).
pub const HELD_MAX: usize = 32;
/// Most of them for one id: a first flight is an Initial, maybe coalesced 0-RTT, rarely more.
pub const HELD_PER_ID: usize = 4;
/// Most bytes held in all.
pub const HELD_BYTES: usize = 48 * 1024;
/// How long such a datagram is held: the relay sends the `ChannelAnnounce` and the flight at
/// the same moment, so the announce is at most a few milliseconds behind.
pub const HELD_TIME: Duration = Duration::from_secs(1);

/// A handle on a path socket's channel table: bind channel ids to virtual addresses, read the
/// counters. Cheap to clone; clones share the table.
#[derive(Clone, Debug)]
pub struct Paths {
    table: Arc<Table>,
}

impl Paths {
    pub(crate) fn new(table: Arc<Table>) -> Paths {
        Paths { table }
    }

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
        maps.by_addr.insert(addr, Route::over_channel(id));
        maps.by_id.insert(id, addr);
        drop(maps);
        self.table.release_held(id, addr);
        (ChannelBinding { table: self.table.clone(), id, addr }, registered)
    }

    /// Notified when the relay has answered nothing for a second while channel data went out
    /// (at most once a second): the owner of the relay connection should send on it, so that
    /// the relay sees where this socket is now (a NAT that rebound it) or the connection learns
    /// the relay is gone. See the crate's `pulse` module.
    pub fn relay_suspect(&self) -> Arc<tokio::sync::Notify> {
        self.table.pulse.suspect()
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
pub(crate) struct Counters {
    pub(crate) channel_in: AtomicU64,
    pub(crate) channel_out: AtomicU64,
    pub(crate) relay_in: AtomicU64,
    pub(crate) dropped_foreign: AtomicU64,
    pub(crate) dropped_unknown_channel: AtomicU64,
    pub(crate) dropped_malformed: AtomicU64,
    pub(crate) dropped_unbound_send: AtomicU64,
    pub(crate) held: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

pub(crate) struct Table {
    pub(crate) maps: RwLock<Maps>,
    /// Counter behind the virtual addresses; only grows, so addresses are not reused while
    /// the socket lives (the loop in `bind` also skips any still bound after a wrap).
    next: AtomicU64,
    v6: bool,
    pub(crate) counters: Counters,
    held: Mutex<Held>,
    /// Whether the relay still answers this socket.
    pub(crate) pulse: Arc<Pulse>,
}

/// Channel datagrams for ids not bound yet, and those whose id got bound, waiting for quinn.
#[derive(Default)]
struct Held {
    /// Oldest first.
    waiting: VecDeque<(ChannelId, Instant, Vec<u8>)>,
    /// Bytes in `waiting`.
    bytes: usize,
    /// Packets (header stripped) for quinn, from their channel's virtual address.
    ready: VecDeque<(SocketAddr, Vec<u8>)>,
    /// The endpoint driver's, to wake when `ready` fills.
    waker: Option<Waker>,
}

impl Table {
    /// An empty table for a socket of the IPv6 family or not.
    pub(crate) fn new(v6: bool) -> Table {
        Table {
            maps: RwLock::new(Maps::default()),
            next: AtomicU64::new(1),
            v6,
            counters: Counters::default(),
            held: Mutex::default(),
            pulse: Arc::default(),
        }
    }

    /// Holds `packet` of channel `id` (not bound); false if it was not. Within [`HELD_PER_ID`]
    /// per id, and within [`HELD_MAX`] and [`HELD_BYTES`] in all by dropping the oldest held
    /// datagrams: whoever can send from the relay's address (the only source this socket takes)
    /// cannot fill the hold once and keep later first flights out; at worst, flooding it makes a
    /// first flight wait for quinn's retransmission.
    pub(crate) fn hold(&self, id: ChannelId, packet: &[u8], now: Instant) -> bool {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut held, now);
        if packet.len() > HELD_BYTES
            || held.waiting.iter().filter(|(held_id, _, _)| *held_id == id).count() >= HELD_PER_ID
        {
            return false;
        }
        while held.waiting.len() >= HELD_MAX || held.bytes + packet.len() > HELD_BYTES {
            let Some((_, _, evicted)) = held.waiting.pop_front() else { break };
            held.bytes -= evicted.len();
            Counters::add(&self.counters.dropped_unknown_channel, 1);
        }
        held.bytes += packet.len();
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
        let Held { waiting, ready, waker, bytes } = &mut *held;
        let before = ready.len();
        waiting.retain_mut(|(held_id, _, packet)| {
            let mine = *held_id == id;
            if mine {
                *bytes -= packet.len();
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
            if let Some((_, _, expired)) = held.waiting.pop_front() {
                held.bytes -= expired.len();
            }
        }
        Counters::add(&self.counters.dropped_unknown_channel, (before - held.waiting.len()) as u64);
    }

    /// Moves released packets into quinn's buffers, one per meta; how many.
    pub(crate) fn drain_ready(&self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = 0;
        while let (Some(buf), Some(meta_out)) = (bufs.get_mut(out), meta.get_mut(out)) {
            let Some((addr, packet)) = held.ready.pop_front() else { break };
            let Some(dst) = buf.get_mut(..packet.len()) else {
                Counters::add(&self.counters.dropped_malformed, 1);
                continue;
            };
            dst.copy_from_slice(&packet);
            *meta_out = RecvMeta { addr, len: packet.len(), stride: packet.len(), ..RecvMeta::default() };
            Counters::add(&self.counters.channel_in, 1);
            out += 1;
        }
        out
    }

    /// Registers the waker of a `poll_recv` about to return pending.
    pub(crate) fn register(&self, waker: &Waker) {
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
pub(crate) struct Maps {
    /// Receive side: which virtual address a channel's datagrams come from.
    pub(crate) by_id: HashMap<ChannelId, SocketAddr>,
    /// Send side: the route of each virtual address (which path its datagrams take).
    pub(crate) by_addr: HashMap<SocketAddr, Route>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_for_an_unbound_id_is_held_until_bound_then_handed_to_quinn() {
        let table = Table::new(false);
        let now = Instant::now();
        assert!(table.hold(ChannelId::new(5), &[0x40, 1, 2], now));
        for i in 1..HELD_MAX {
            assert!(table.hold(ChannelId::new(100 + i as u64), &[0x40], now));
        }
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
        assert_eq!(table.held.lock().unwrap().bytes, 0);
    }

    /// A flood of datagrams under made-up ids from the relay's address cannot keep a real first
    /// flight out: the hold drops its oldest, caps each id, and bounds its bytes.
    #[test]
    fn a_flood_of_unknown_ids_evicts_the_oldest_and_a_later_first_flight_is_still_held() {
        let table = Table::new(false);
        let now = Instant::now();
        for i in 0..10_000u64 {
            table.hold(ChannelId::new(1_000 + i), &[0x40; 1200], now);
        }
        {
            let held = table.held.lock().unwrap();
            assert!(held.waiting.len() <= HELD_MAX && held.bytes <= HELD_BYTES, "bounded");
        }
        let real = ChannelId::new(7);
        assert!(table.hold(real, &[0xc0; 1200], now), "a new first flight is held during the flood");
        for _ in 0..HELD_PER_ID - 1 {
            assert!(table.hold(real, &[0xc0; 100], now));
        }
        assert!(!table.hold(real, &[0xc0; 100], now), "at most HELD_PER_ID per id");
        table.release_held(real, virtual_addr(false, 9));
        let mut storage = vec![vec![0u8; 1500]; 8];
        let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut metas = vec![RecvMeta::default(); 8];
        assert_eq!(table.drain_ready(&mut bufs, &mut metas), HELD_PER_ID);
        assert!(!table.hold(real, &vec![0; HELD_BYTES + 1], now), "larger than the whole hold");
    }
}
