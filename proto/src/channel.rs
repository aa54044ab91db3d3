//! The channel header: how an end-to-end QUIC connection's packets share the relay's one UDP
//! port with the QUIC connections the relay terminates.
//!
//! App and hub each send their end-to-end packets to the relay's address prefixed with
//! [`HEADER_LEN`] bytes: [`CHANNEL_DATA`] and the 8-byte [`ChannelId`] the relay gave *that*
//! side. The relay looks the id up, checks the source address, writes the other side's id over
//! it in place and sends the datagram on; it never sees inside (the QUIC packet after the header
//! is encrypted end to end).
//!
//! Why the first byte cannot be mistaken for QUIC: a QUIC long header has the top bit set and a
//! short header the second one (the "fixed bit", RFC 9000 §17). QUIC allows greasing that bit
//! (RFC 9287), so every endpoint that shares a socket with channel data turns greasing off
//! (`EndpointConfig::grease_quic_bit(false)`); then no QUIC packet starts in `0x00..=0x3F`.
//! TURN's ChannelData range `0x40..=0x4F` would overlap short headers (RFC 9443), so we do
//! not use it. Pure: no I/O, no panics on any input.

use std::fmt;

/// First byte of a channel datagram.
pub const CHANNEL_DATA: u8 = 0x2c;

/// Bytes the channel header adds to every end-to-end datagram.
pub const HEADER_LEN: usize = 9;

/// The largest UDP payload an end-to-end connection may send, header included, on paths with a
/// 1500-byte MTU: quinn's default MTU discovery bound (1452) stays the bound of the outer
/// datagram, so the inner QUIC packet gets [`HEADER_LEN`] bytes less.
pub const MAX_E2E_PACKET: u16 = 1452 - HEADER_LEN as u16;

/// One side's name for a channel at the relay: unguessable (64 random bits), and only valid
/// from the address the relay authenticated for that side.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(u64);

impl ChannelId {
    /// The id with this wire value.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// A fresh id from the operating system's random generator.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)?;
        Ok(Self(u64::from_be_bytes(bytes)))
    }

    /// The wire value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelId({:016x})", self.0)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Half the id is enough to tell channels apart in logs without printing what a
        // spoofer would need.
        write!(f, "{:08x}…", self.0 >> 32)
    }
}

/// Whether a datagram is channel data (as opposed to a QUIC packet for the socket's owner).
pub fn is_channel_data(datagram: &[u8]) -> bool {
    datagram.first() == Some(&CHANNEL_DATA)
}

/// Splits a channel datagram into its id and the end-to-end packet; `None` if it is not one.
pub fn parse(datagram: &[u8]) -> Option<(ChannelId, &[u8])> {
    let (head, packet) = datagram.split_first_chunk::<HEADER_LEN>()?;
    let [kind, id @ ..] = *head;
    (kind == CHANNEL_DATA).then(|| (ChannelId(u64::from_be_bytes(id)), packet))
}

/// Writes the header for `id` into the first [`HEADER_LEN`] bytes of `out`; false (and
/// nothing written) if `out` is shorter.
pub fn write_header(out: &mut [u8], id: ChannelId) -> bool {
    let Some(head) = out.first_chunk_mut::<HEADER_LEN>() else {
        return false;
    };
    head[0] = CHANNEL_DATA;
    head[1..].copy_from_slice(&id.0.to_be_bytes());
    true
}

/// Appends one channel datagram (header for `id`, then `packet`) to `out`.
pub fn encode_into(out: &mut Vec<u8>, id: ChannelId, packet: &[u8]) {
    out.push(CHANNEL_DATA);
    out.extend_from_slice(&id.0.to_be_bytes());
    out.extend_from_slice(packet);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_datagram_round_trips_and_its_id_can_be_rewritten_in_place() {
        let mut out = Vec::new();
        encode_into(&mut out, ChannelId::new(7), b"quic");
        assert_eq!(out.len(), HEADER_LEN + 4);
        assert_eq!(parse(&out), Some((ChannelId::new(7), &b"quic"[..])));
        assert!(write_header(&mut out, ChannelId::new(u64::MAX)));
        assert_eq!(parse(&out), Some((ChannelId::new(u64::MAX), &b"quic"[..])));
        assert!(!write_header(&mut [0u8; HEADER_LEN - 1], ChannelId::new(1)));
    }

    #[test]
    fn quic_packets_are_never_channel_data() {
        // Long header (0b1xxxxxxx) and short header with the fixed bit (0b01xxxxxx).
        for first in 0x40..=0xffu8 {
            assert!(!is_channel_data(&[first, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        }
        assert!(!is_channel_data(&[]));
        assert_eq!(parse(&[CHANNEL_DATA; HEADER_LEN - 1]), None, "too short for a header");
    }

    #[test]
    fn display_shows_only_half_the_id() {
        assert_eq!(ChannelId::new(0x0123_4567_89ab_cdef).to_string(), "01234567…");
        assert_ne!(ChannelId::random().unwrap(), ChannelId::random().unwrap());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Some((id, packet)) = parse(&bytes) {
                let mut again = Vec::new();
                encode_into(&mut again, id, packet);
                prop_assert_eq!(again, bytes);
            }
        }
    }
}
