//! A UDP hop on one peer's leg to the relay that records the channel datagrams passing both
//! ways and can inject its own: the relay-blindness tests compare what enters and leaves the
//! relay, the NAT-rebinding test moves its relay-facing port, and the 0-RTT tests replay a
//! captured first flight as a hostile relay would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use keyway_proto::channel;
use tokio::net::UdpSocket;

/// Which way a tapped datagram went.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Way {
    ToRelay,
    FromRelay,
}

/// One datagram a tap saw: its way, the tap's relay-facing address it passed, its bytes.
type Tapped = (Way, SocketAddr, Vec<u8>);

/// A UDP hop between one peer and the relay that records every channel datagram both ways
/// (the "tap on the leg"), and can move its relay-facing side to a new port (NAT rebinding).
pub struct Tap {
    front: Arc<UdpSocket>,
    back: Arc<Mutex<Arc<UdpSocket>>>,
    peer: Arc<Mutex<Option<SocketAddr>>>,
    /// Channel datagrams by way, with the tap's relay-facing address they passed.
    seen: Arc<Mutex<Vec<Tapped>>>,
}

impl Tap {
    pub async fn start(relay: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("tap socket"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("tap socket"));
        let tap = Self {
            front,
            back: Arc::new(Mutex::new(Arc::clone(&back))),
            peer: Arc::default(),
            seen: Arc::default(),
        };
        let (front, back_cell, peer, seen) =
            (Arc::clone(&tap.front), Arc::clone(&tap.back), Arc::clone(&tap.peer), Arc::clone(&tap.seen));
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
                *lock(&peer) = Some(from);
                let back = Arc::clone(&lock(&back_cell));
                if channel::is_channel_data(&buf[..n]) {
                    let via = back.local_addr().expect("tap socket");
                    lock(&seen).push((Way::ToRelay, via, buf[..n].to_vec()));
                }
                let _ = back.send_to(&buf[..n], relay).await;
            }
        });
        tap.serve_back(back);
        tap
    }

    /// Carries what the relay sends to `back` on to the peer.
    fn serve_back(&self, back: Arc<UdpSocket>) {
        let (front, peer, seen) = (Arc::clone(&self.front), Arc::clone(&self.peer), Arc::clone(&self.seen));
        let via = back.local_addr().expect("tap socket");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, _)) = back.recv_from(&mut buf).await else { return };
                if channel::is_channel_data(&buf[..n]) {
                    lock(&seen).push((Way::FromRelay, via, buf[..n].to_vec()));
                }
                let to = *lock(&peer);
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
    }

    /// The address the peer sends to as if it were the relay.
    pub fn addr(&self) -> SocketAddr {
        self.front.local_addr().expect("tap socket")
    }

    /// From now on the peer's datagrams reach the relay from a new port.
    pub async fn rebind(&self) -> SocketAddr {
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("tap socket"));
        let addr = back.local_addr().expect("tap socket");
        self.serve_back(Arc::clone(&back));
        *lock(&self.back) = back;
        addr
    }

    pub fn seen(&self, way: Way) -> Vec<Vec<u8>> {
        lock(&self.seen).iter().filter(|(w, _, _)| *w == way).map(|(_, _, d)| d.clone()).collect()
    }

    /// How many channel datagrams the relay sent to the tap's relay-facing address `via`.
    pub fn delivered_via(&self, via: SocketAddr) -> usize {
        lock(&self.seen).iter().filter(|(w, v, _)| *w == Way::FromRelay && *v == via).count()
    }

    /// Forgets what it saw so far.
    pub fn clear(&self) {
        lock(&self.seen).clear();
    }

    /// Sends `bytes` to the peer as if the relay had (a hostile relay's replay).
    pub async fn inject(&self, bytes: &[u8]) {
        let to = *lock(&self.peer);
        if let Some(to) = to {
            let _ = self.front.send_to(bytes, to).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The kind of one QUIC v1 long-header packet (RFC 9000 §17.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LongPacket {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

/// The long-header packets in one QUIC datagram (the channel header already removed), in
/// order: a datagram may coalesce several (an Initial and 0-RTT packets, say). Stops at the
/// first short-header packet, which runs to the datagram's end, or at anything malformed.
pub fn long_packets(mut datagram: &[u8]) -> Vec<LongPacket> {
    let mut kinds = Vec::new();
    while let Some((kind, len)) = long_packet(datagram) {
        kinds.push(kind);
        datagram = datagram.get(len..).unwrap_or_default();
    }
    kinds
}

/// One long-header packet at the start of `d`: its kind and its length in bytes.
fn long_packet(d: &[u8]) -> Option<(LongPacket, usize)> {
    let first = *d.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    let kind = match (first >> 4) & 0x03 {
        0 => LongPacket::Initial,
        1 => LongPacket::ZeroRtt,
        2 => LongPacket::Handshake,
        _ => return Some((LongPacket::Retry, d.len())),
    };
    let mut at = 5; // first byte and version
    let dcid = usize::from(*d.get(at)?);
    at += 1 + dcid;
    let scid = usize::from(*d.get(at)?);
    at += 1 + scid;
    if kind == LongPacket::Initial {
        let (token, n) = varint(d.get(at..)?)?;
        at += n + token;
    }
    let (len, n) = varint(d.get(at..)?)?;
    let end = at.checked_add(n)?.checked_add(len)?;
    (end <= d.len()).then_some((kind, end))
}

/// A QUIC variable-length integer: its value and its length.
fn varint(d: &[u8]) -> Option<(usize, usize)> {
    let first = *d.first()?;
    let len = 1usize << (first >> 6);
    let mut value = u64::from(first & 0x3f);
    for byte in d.get(1..len)? {
        value = (value << 8) | u64::from(*byte);
    }
    Some((usize::try_from(value).ok()?, len))
}
