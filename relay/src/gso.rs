//! One GSO send gathered from several buffers ([`GatherSocket`]): the forwarding path's way to
//! send the runs of one destination that arrived in different receive buffers as one
//! `sendmsg`, without copying them together first.
//!
//! Why not quinn-udp: its `Transmit` has one contiguous `contents`, so joining runs from two
//! receive buffers would need a user-space copy, and on loopback that copy cost what the saved
//! syscalls gave (measured in `loadtest/README.md`). `sendmsg` takes an iovec per piece and the
//! kernel gathers them while it copies into its own buffer anyway. The control messages are
//! the ones quinn-udp writes for the same transmit (`UDP_SEGMENT`, the ECN codepoint in
//! `IP_TOS`/`IPV6_TCLASS`, the source address in `IP_PKTINFO`/`IPV6_PKTINFO`), built by hand so
//! that this stays safe code (socket2's `sendmsg`). Only where the `cmsghdr` layout is known
//! (Linux with glibc): elsewhere [`GatherSocket::new`] gives `None` and nothing is gathered.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use quinn::udp::EcnCodepoint;

/// The most bytes one UDP GSO send may carry: the IPv4 total length (16 bits) less the IPv4
/// and UDP headers; IPv6 allows 20 more, which is not worth a second bound.
pub(crate) const MAX_GSO_BYTES: usize = 65_535 - 20 - 8;

/// The most segments one UDP GSO send may carry: the kernel's `UDP_MAX_SEGMENTS` (64 before
/// Linux 6.9, 128 since), which is also what quinn-udp's `max_gso_segments` reports.
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;

/// A second handle on the relay's UDP socket (a `dup` of its descriptor), for gathered sends.
#[derive(Debug)]
pub(crate) struct GatherSocket {
    socket: std::net::UdpSocket,
    /// Set when the kernel refused GSO on the way out (`EIO`: a device that cannot offload the
    /// checksum), as quinn-udp turns its own GSO off then.
    refused: AtomicBool,
}

impl GatherSocket {
    /// A handle on `socket` for gathered sends, or `None` where they are not built (see the
    /// module docs) or the descriptor cannot be duplicated.
    pub fn new(socket: &std::net::UdpSocket) -> Option<Self> {
        if !cmsg::SUPPORTED {
            return None;
        }
        socket.try_clone().ok().map(|socket| Self { socket, refused: AtomicBool::new(false) })
    }

    /// Whether gathered sends may be tried (not refused by the kernel so far).
    pub fn usable(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    /// Sends `pieces` as one datagram train of `segment_size`-byte segments (the last may be
    /// shorter) to `to`, from `src_ip` if given, marked `ecn`. Never blocks: the socket is
    /// non-blocking (quinn set it so), and `WouldBlock` is returned like any other error.
    pub fn send(
        &self,
        to: SocketAddr,
        src_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        segment_size: usize,
        pieces: &[IoSlice<'_>],
    ) -> io::Result<()> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut control = cmsg::Buffer::default();
        if let Some(ecn) = ecn {
            let ecn = i32::from(ecn as u8).to_ne_bytes();
            if is_ipv4(to) {
                control.push(cmsg::IPPROTO_IP, cmsg::IP_TOS, &ecn);
            } else {
                control.push(cmsg::IPPROTO_IPV6, cmsg::IPV6_TCLASS, &ecn);
            }
        }
        if segment_size < total {
            let size = u16::try_from(segment_size).map_err(|_| io::ErrorKind::InvalidInput)?;
            control.push(cmsg::SOL_UDP, cmsg::UDP_SEGMENT, &size.to_ne_bytes());
        }
        match src_ip {
            Some(IpAddr::V4(ip)) => {
                // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
                let mut info = [0u8; 12];
                if let Some(spec_dst) = info.get_mut(4..8) {
                    spec_dst.copy_from_slice(&ip.octets());
                }
                control.push(cmsg::IPPROTO_IP, cmsg::IP_PKTINFO, &info);
            }
            Some(IpAddr::V6(ip)) => {
                // struct in6_pktinfo { in6_addr ipi6_addr; unsigned ipi6_ifindex; }
                let mut info = [0u8; 20];
                if let Some(addr) = info.get_mut(..16) {
                    addr.copy_from_slice(&ip.octets());
                }
                control.push(cmsg::IPPROTO_IPV6, cmsg::IPV6_PKTINFO, &info);
            }
            None => {}
        }
        let to = socket2::SockAddr::from(to);
        let msg = socket2::MsgHdr::new().with_addr(&to).with_buffers(pieces).with_control(control.bytes());
        let sent = socket2::SockRef::from(&self.socket).sendmsg(&msg, 0).inspect_err(|e| {
            // EIO, as in quinn-udp: the route's device cannot do GSO.
            if e.raw_os_error() == Some(5) {
                self.refused.store(true, Ordering::Relaxed);
            }
        })?;
        if sent == total {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short UDP send"))
        }
    }
}

/// IPv4, or IPv4 mapped into IPv6 (a dual-stack socket's view of an IPv4 peer): what decides
/// between `IP_TOS` and `IPV6_TCLASS`, as in quinn-udp.
fn is_ipv4(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    }
}

/// Control messages written by hand: `struct cmsghdr { size_t cmsg_len; int cmsg_level; int
/// cmsg_type; }` followed by the data, each message padded to the alignment of `size_t`
/// (glibc's `CMSG_SPACE`). The constants are Linux's, the same on every architecture.
mod cmsg {
    /// Whether the layout above is the platform's.
    pub const SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

    pub const IPPROTO_IP: i32 = 0;
    pub const IP_TOS: i32 = 1;
    pub const IP_PKTINFO: i32 = 8;
    pub const IPPROTO_IPV6: i32 = 41;
    pub const IPV6_PKTINFO: i32 = 50;
    pub const IPV6_TCLASS: i32 = 67;
    pub const SOL_UDP: i32 = 17;
    pub const UDP_SEGMENT: i32 = 103;

    const ALIGN: usize = std::mem::size_of::<usize>();
    const HEADER: usize = ALIGN + 8;

    /// Room for the three messages of one send (ECN, segment size, source address), aligned as
    /// the kernel reads it.
    #[repr(C, align(8))]
    pub struct Buffer {
        bytes: [u8; 128],
        len: usize,
    }

    impl Default for Buffer {
        fn default() -> Self {
            Self { bytes: [0; 128], len: 0 }
        }
    }

    impl Buffer {
        /// Appends one message; one that would not fit is left out (cannot happen with the
        /// three messages `send` writes: 24 + 24 + 40 bytes at most).
        pub fn push(&mut self, level: i32, kind: i32, data: &[u8]) {
            let len = HEADER + data.len();
            let space = len.div_ceil(ALIGN) * ALIGN;
            let Some(message) = self.bytes.get_mut(self.len..self.len + space) else { return };
            let (header, rest) = message.split_at_mut(HEADER);
            let (cmsg_len, kind_level) = header.split_at_mut(ALIGN);
            cmsg_len.copy_from_slice(&len.to_ne_bytes());
            let (level_bytes, kind_bytes) = kind_level.split_at_mut(4);
            level_bytes.copy_from_slice(&level.to_ne_bytes());
            kind_bytes.copy_from_slice(&kind.to_ne_bytes());
            let (payload, padding) = rest.split_at_mut(data.len());
            payload.copy_from_slice(data);
            padding.fill(0);
            self.len += space;
        }

        pub fn bytes(&self) -> &[u8] {
            self.bytes.get(..self.len).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_pieces_arrive_as_the_segments_they_make_up() {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.set_nonblocking(true).unwrap();
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(keyway_test_support::PATIENCE)).unwrap();
        let Some(gather) = GatherSocket::new(&sender) else { return };
        // Three segments of 100 bytes and a short one, cut across pieces at other places.
        let data: Vec<u8> = (0..350u32).map(|i| (i % 251) as u8).collect();
        let pieces = [IoSlice::new(&data[..150]), IoSlice::new(&data[150..200]), IoSlice::new(&data[200..])];
        let to = receiver.local_addr().unwrap();
        gather.send(to, Some("127.0.0.1".parse().unwrap()), Some(EcnCodepoint::Ect0), 100, &pieces).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        for _ in 0..4 {
            let n = receiver.recv(&mut buf).unwrap();
            got.push(buf[..n].to_vec());
        }
        let expected: Vec<Vec<u8>> = data.chunks(100).map(<[u8]>::to_vec).collect();
        assert_eq!(got, expected);
        // A source address the socket cannot send from is refused, not sent from elsewhere.
        let err = gather.send(to, Some("192.0.2.1".parse().unwrap()), None, 100, &pieces).unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
