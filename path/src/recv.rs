//! The receive side of the path socket: cutting what the kernel hands over into runs quinn
//! can take.
//!
//! Kernel GRO merges consecutive datagrams from one source into one buffer with one stride, and
//! every channel arrives from the relay's one address, so one GRO batch can mix channels (and
//! the relay connection). quinn takes one source address per [`RecvMeta`], so a batch is cut
//! into runs of one destination each, copied into quinn's buffers with headers stripped; what
//! does not fit waits for the next `poll_recv`. Pure over buffers: tested without sockets.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::task::{Context, Poll};

use keyway_proto::channel::{self, ChannelId};
use quinn::udp::RecvMeta;
use quinn::AsyncUdpSocket;

use crate::table::Counters;

/// Receive slots of the socket's own buffers (one GRO batch each). quinn-udp reads up to this
/// many batches per system call; more would only make the copy into quinn's buffers wait.
const SLOTS: usize = 8;

/// Bytes per receive slot: a full GRO batch (64 segments of an Ethernet-sized datagram), and
/// never less than the largest UDP payload, so nothing quinn-udp hands over is truncated.
pub(crate) fn slot_len(gro_segments: usize) -> usize {
    (gro_segments.max(1) * 1500).max(usize::from(u16::MAX) + 1)
}

/// Counts of one drain, added to the shared counters once per `poll_recv` rather than per
/// datagram.
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Tally {
    channel_in: u64,
    relay_in: u64,
    foreign: u64,
    malformed: u64,
}

impl Tally {
    pub(crate) fn commit(&self, c: &Counters) {
        Counters::add(&c.channel_in, self.channel_in);
        Counters::add(&c.relay_in, self.relay_in);
        Counters::add(&c.dropped_foreign, self.foreign);
        Counters::add(&c.dropped_malformed, self.malformed);
    }
}

/// What the socket read and has not yet handed to quinn: `SLOTS` buffers with their metas, and
/// a cursor (batch `next`, byte `offset` in it).
pub(crate) struct RecvState {
    slots: Box<[u8]>,
    slot_len: usize,
    metas: [RecvMeta; SLOTS],
    filled: usize,
    next: usize,
    offset: usize,
    /// Channel packets of the last drain for ids nobody bound, for the caller to hold.
    pub(crate) unbound: Vec<(ChannelId, Vec<u8>)>,
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
    pub(crate) fn new(slot_len: usize) -> Self {
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
    pub(crate) fn refill(&mut self, cx: &mut Context, inner: &dyn AsyncUdpSocket) -> Poll<io::Result<()>> {
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
    pub(crate) fn drain(
        &mut self,
        relay: SocketAddr,
        bound: &HashMap<ChannelId, SocketAddr>,
        tally: &mut Tally,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut out = 0;
        while self.next < self.filled {
            let (Some(dst), Some(meta_out)) = (bufs.get_mut(out), meta.get_mut(out)) else { break };
            let Some(&m) = self.metas.get(self.next) else { break };
            let start = self.next * self.slot_len;
            let Some(data) = self.slots.get(start..start + m.len.min(self.slot_len)) else {
                self.advance_batch();
                continue;
            };
            let stride = if m.stride == 0 { data.len().max(1) } else { m.stride };
            // Address and port only: a scope id or flow label the kernel reports is no
            // reason to drop the relay's own datagrams.
            if (m.addr.ip(), m.addr.port()) != (relay.ip(), relay.port()) {
                tally.foreign += data.len().div_ceil(stride).max(1) as u64;
                self.advance_batch();
                continue;
            }
            let mut used = 0;
            let mut run: Option<(Class, usize)> = None;
            while self.offset < data.len() {
                let end = (self.offset + stride).min(data.len());
                let Some(segment) = data.get(self.offset..end) else { break };
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
                let Some(room) = dst.get_mut(used..used + payload.len()) else { break };
                room.copy_from_slice(payload);
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
                *meta_out = RecvMeta { addr, len: used, stride: run_stride, ..m };
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
pub(crate) mod tests {
    use super::*;
    use crate::addr::virtual_addr;
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

    /// A channel datagram of `len` bytes under `id`, its payload `fill`.
    pub(crate) fn chan(id: u64, fill: u8, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        channel::encode_into(&mut out, ChannelId::new(id), &vec![fill; len - HEADER_LEN]);
        out
    }

    /// A datagram of `len` bytes that looks like QUIC (the relay connection's).
    pub(crate) fn quic(fill: u8, len: usize) -> Vec<u8> {
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
}
