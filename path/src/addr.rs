//! Virtual addresses: what quinn sees as the remote of an end-to-end connection.
//!
//! quinn 0.11 drops packets whose source is not the connection's remote and cannot change a
//! client's remote, so an end-to-end connection must see one address for its whole life,
//! whatever path its packets take. The path socket gives each peer one from ranges no real peer
//! can have (IPv4 `240.0.0.0/5`, reserved; IPv6 the ULA `fd6b:6579:7761::/48`, ours), in the
//! socket's family, and maps it to the paths that reach the peer (the crate's table). A real
//! address never falls in these ranges, so a transmit to a virtual address is always one of
//! ours and anything else passes the path socket untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The `n`th virtual address of a family. IPv4: `240.0.0.0/5` (never a real unicast source, and
/// clear of the broadcast address), the port above 0 as quinn requires. IPv6: our ULA /48.
pub(crate) fn virtual_addr(v6: bool, n: u64) -> SocketAddr {
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

pub fn is_virtual(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.octets()[0] & 0xf8 == 0xf0,
        IpAddr::V6(ip) => u128::from(ip) >> 80 == 0xfd6b_6579_7761,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
