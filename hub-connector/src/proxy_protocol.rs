//! PROXY protocol v2 headers (haproxy's `proxy-protocol.txt`, section 2.2), so the local
//! service sees the real caller instead of 127.0.0.1 (a hub whose login ban keys on the
//! address would otherwise ban every remote user at once).
//!
//! The source is the app's UDP address as the relay observed it (`ChannelAnnounce.observed`),
//! the destination is the local service's address. Both are sent as TCP over IPv4 when both
//! are IPv4, else as TCP over IPv6 (IPv4 addresses mapped). The app's key travels in a custom
//! TLV (type [`TLV_APP_KEY`], the `kw…` text form) so a service that wants to can tell
//! devices apart by key rather than by address.

use std::net::{IpAddr, SocketAddr};

use keyway_proto::PublicKey;

/// The 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV type carrying the app key (first of the range the spec reserves for custom use).
pub const TLV_APP_KEY: u8 = 0xE0;

/// Builds the header for a connection from `source` (the app) to `destination` (the service).
pub fn header(source: SocketAddr, destination: SocketAddr, app_key: Option<&PublicKey>) -> Vec<u8> {
    let mut addrs = Vec::with_capacity(36);
    let family = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11 // AF_INET, STREAM
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            addrs.extend_from_slice(&v6(s).octets());
            addrs.extend_from_slice(&v6(d).octets());
            0x21 // AF_INET6, STREAM
        }
    };
    addrs.extend_from_slice(&source.port().to_be_bytes());
    addrs.extend_from_slice(&destination.port().to_be_bytes());
    if let Some(key) = app_key {
        let text = key.to_string();
        addrs.push(TLV_APP_KEY);
        // A key's text form is 54 bytes: always fits in u16.
        addrs.extend_from_slice(&(text.len() as u16).to_be_bytes());
        addrs.extend_from_slice(text.as_bytes());
    }
    let mut out = Vec::with_capacity(16 + addrs.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    out.push(family);
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&addrs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_layout_matches_the_spec() {
        let h = header("203.0.113.7:40000".parse().unwrap(), "127.0.0.1:8123".parse().unwrap(), None);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[203, 0, 113, 7]);
        assert_eq!(&h[20..24], &[127, 0, 0, 1]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 40000);
        assert_eq!(u16::from_be_bytes([h[26], h[27]]), 8123);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn mixed_families_use_ipv6_and_the_key_tlv_follows() {
        let key = keyway_proto::Identity::from_seed([3; 32]).public_key();
        let h = header("[2001:db8::1]:5".parse().unwrap(), "127.0.0.1:80".parse().unwrap(), Some(&key));
        assert_eq!(h[13], 0x21);
        let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
        assert_eq!(h.len(), 16 + len);
        let dst: [u8; 16] = h[32..48].try_into().unwrap();
        assert_eq!(std::net::Ipv6Addr::from(dst), "::ffff:127.0.0.1".parse::<std::net::Ipv6Addr>().unwrap());
        let tlv = &h[52..];
        assert_eq!(tlv[0], TLV_APP_KEY);
        assert_eq!(std::str::from_utf8(&tlv[3..]).unwrap(), key.to_string());
    }
}
