//! The connection IDs a relay issues: IDs that say which relay node owns them, so that a UDP
//! load balancer in front of a cluster can send every packet of a connection to its node even
//! after the peer's address changed (the QUIC-LB idea, draft-ietf-quic-load-balancers, its
//! plaintext algorithm), and, for a single relay, IDs that tell such a balancer nothing.
//!
//! A relay started with a node id (`--node-id`) issues only connection IDs of this layout
//! ([`NodeCidGenerator`], set by [`crate::tls::node_endpoint_config`]). [`CID_LEN`] = 12 octets:
//!
//! ```text
//! octet  0      config rotation (2 bits, 00) | length of the rest (6 bits, 11)  = 0x0b
//! octets 1-2    server id, big endian (ServerId::of_node(node id))
//! octets 3-7    nonce: 40 random bits, drawn per ID
//! octets 8-11   tag: HMAC-SHA256(node's connection-ID key, octets 0-7), first 4 octets
//! ```
//!
//! A single relay (no node id) issues [`RelayCidGenerator`]'s IDs, also 12 octets: octets 0-7
//! are 62 random bits under a first octet whose top two bits are `11` (QUIC-LB's "route by
//! 4-tuple": a balancer must not read a node in them), octets 8-11 the same tag.
//!
//! What a load balancer does: for a QUIC packet whose destination connection ID is 12 octets
//! long and starts with `0x0b`, octets 1-2 name the node ([`decode`]); any other packet (a
//! client's first Initial, whose ID the client chose; a channel datagram, which has no ID) is
//! routed by its address 4-tuple. The server id is in the clear, as QUIC-LB's plaintext
//! algorithm has it: an observer learns which node serves a connection (which the node's own
//! address tells it anyway), nothing that links two IDs of one connection beyond that.
//!
//! Why the tag: quinn answers a packet for a connection it does not know with a stateless reset
//! only if the generator recognises the ID as its own (`validate`). The tag is keyed by the
//! node's secret, which is derived from the relay key *and* the node id, so a node restarted
//! after a crash recognises (and resets) its previous run's IDs, while a sibling never does:
//! a packet that reached the wrong node is dropped, never answered with a reset that would kill
//! a live connection (`relay/tests/cluster.rs`).
//!
//! Why so many random bits: the key outlives a run, so the IDs of a restarted relay are drawn
//! from the same space as its previous run's, and quinn only keeps IDs unique *within* a run.
//! A packet of the previous run whose ID the new run happens to have issued again goes to that
//! new connection, which cannot decrypt it and drops it: no reset, and that hub waits for its
//! idle timeout. Each connection holds 5 IDs (quinn's client accepts 5), so with quinn's
//! hashed IDs (24 random bits) a restart under 1 000 hubs left one of them without a reset
//! every few runs and under 10 000 about one in a thousand; 62 bits (40 for a node, whose
//! server id takes 16) make that about one in 10¹² per hub. Pure: no I/O but the system's
//! random source, no panics.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};

/// Length of every connection ID a node issues.
pub const CID_LEN: usize = 12;
/// Config rotation `00` (the top two bits) and the length of the rest of the ID (the low six),
/// as QUIC-LB's first octet: a future layout would take another rotation value, so that a load
/// balancer can tell them apart while connections with old IDs drain.
pub const FIRST_OCTET: u8 = (CID_LEN - 1) as u8;
const SERVER_ID: std::ops::Range<usize> = 1..3;
const NONCE: std::ops::Range<usize> = 3..8;
const TAG: std::ops::Range<usize> = 8..CID_LEN;

/// The 16-bit id a load balancer routes on: the first two octets of SHA-256 over a fixed label
/// and the node id, so it follows from the node id alone (nothing more to configure, the same
/// after every restart). Two node ids of one cluster collide with a chance of about
/// n²/131 072 (n nodes); the relay prints its server id at start, and a collision is mended by
/// renaming one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(u16);

impl ServerId {
    /// The server id of the node with this id.
    pub fn of_node(node: &str) -> Self {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"keyway quic-lb server id v1\0");
        context.update(node.as_bytes());
        let digest = context.finish();
        let bytes = digest.as_ref();
        Self(u16::from_be_bytes([bytes.first().copied().unwrap_or(0), bytes.get(1).copied().unwrap_or(0)]))
    }

    /// The value, as a load balancer's table holds it.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:04x}", self.0)
    }
}

/// The node a connection ID names, as a load balancer reads it: `None` for an ID of another
/// layout (a client-chosen ID, a single relay's ID). Reads only the layout; whether the ID was
/// really issued by that node only the node can tell (the tag).
pub fn decode(cid: &[u8]) -> Option<ServerId> {
    if cid.len() != CID_LEN || cid.first() != Some(&FIRST_OCTET) {
        return None;
    }
    let id = cid.get(SERVER_ID)?;
    Some(ServerId(u16::from_be_bytes([*id.first()?, *id.get(1)?])))
}

/// The keyed half both layouts share: the tag over an ID's head, and the nonce.
struct Keyed {
    key: ring::hmac::Key,
    /// Counts IDs drawn while the system's random source failed (see `nonce`).
    fallback: AtomicU64,
}

impl Keyed {
    fn new(secret: &[u8; 32]) -> Self {
        Self { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), fallback: AtomicU64::new(0) }
    }

    fn tag(&self, head: &[u8]) -> [u8; TAG.end - TAG.start] {
        let mut out = [0u8; TAG.end - TAG.start];
        self.hmac_into(head, &mut out);
        out
    }

    /// Fills `out` with the first octets of HMAC-SHA256(key, `input`).
    fn hmac_into(&self, input: &[u8], out: &mut [u8]) {
        let tag = ring::hmac::sign(&self.key, input);
        for (o, t) in out.iter_mut().zip(tag.as_ref()) {
            *o = *t;
        }
    }

    /// A fresh nonce: random bits from the system. Should the system's source ever fail, an HMAC
    /// of a counter under the key stands in: still unique in this process and unpredictable to
    /// anyone without the key.
    fn nonce(&self, out: &mut [u8]) {
        if getrandom::fill(out).is_ok() {
            return;
        }
        let n = self.fallback.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // 0xff first: never the head of a node's ID (that starts with FIRST_OCTET).
        let mut input = vec![0xff];
        input.extend_from_slice(&n.to_be_bytes());
        input.extend_from_slice(&nanos.to_be_bytes());
        self.hmac_into(&input, out);
    }

    /// Writes the tag of `cid`'s head behind it.
    fn seal(&self, cid: &mut [u8; CID_LEN]) {
        let (head, tag) = cid.split_at_mut(TAG.start);
        tag.copy_from_slice(&self.tag(head));
    }

    /// Whether `cid` is 12 octets whose tag is its head's, compared in constant time so that
    /// timing tells a prober nothing about a valid tag.
    fn verify(&self, cid: &[u8]) -> Result<(), InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(InvalidCid);
        }
        let (head, tag) = cid.split_at(TAG.start);
        let diff = self.tag(head).iter().zip(tag).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }
}

/// quinn's connection-ID generator for one node (see the module doc).
pub struct NodeCidGenerator {
    server: ServerId,
    keyed: Keyed,
}

impl NodeCidGenerator {
    /// The generator of node `server`, whose tags are keyed by `secret` (the node's derived
    /// connection-ID secret).
    pub fn new(server: ServerId, secret: &[u8; 32]) -> Self {
        Self { server, keyed: Keyed::new(secret) }
    }
}

impl ConnectionIdGenerator for NodeCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        let [hi, lo] = self.server.0.to_be_bytes();
        cid[..NONCE.start].copy_from_slice(&[FIRST_OCTET, hi, lo]);
        self.keyed.nonce(&mut cid[NONCE]);
        self.keyed.seal(&mut cid);
        ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if decode(cid) != Some(self.server) {
            return Err(InvalidCid);
        }
        self.keyed.verify(cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The top two bits of a single relay's first octet: QUIC-LB's config rotation `11`, which
/// tells a load balancer that the ID names no server.
const UNROUTABLE: u8 = 0b1100_0000;

/// quinn's connection-ID generator for a relay without a node id (see the module doc): 62 random
/// bits and a tag keyed by the relay's connection-ID secret, so a restarted relay recognises its
/// previous run's IDs and almost never issues one of them again.
pub struct RelayCidGenerator {
    keyed: Keyed,
}

impl RelayCidGenerator {
    /// The generator whose tags are keyed by `secret` (the relay's derived connection-ID
    /// secret).
    pub fn new(secret: &[u8; 32]) -> Self {
        Self { keyed: Keyed::new(secret) }
    }
}

impl ConnectionIdGenerator for RelayCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        self.keyed.nonce(&mut cid[..TAG.start]);
        cid[0] |= UNROUTABLE;
        self.keyed.seal(&mut cid);
        ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.first().is_none_or(|first| first & UNROUTABLE != UNROUTABLE) {
            return Err(InvalidCid);
        }
        self.keyed.verify(cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn generator(node: &str, secret: u8) -> NodeCidGenerator {
        NodeCidGenerator::new(ServerId::of_node(node), &[secret; 32])
    }

    #[test]
    fn every_id_decodes_to_its_node_and_validates_there() {
        for node in ["relay-1", "relay-2", "relay-3", "keyway-relay-0", "x"] {
            let mut g = generator(node, 7);
            for _ in 0..2000 {
                let cid = g.generate_cid();
                assert_eq!(cid.len(), CID_LEN);
                assert_eq!(cid[0], 0x0b, "config rotation 00, length 11");
                assert_eq!(decode(&cid), Some(ServerId::of_node(node)), "{node}");
                assert!(g.validate(&cid).is_ok());
            }
        }
        let ids: HashSet<ServerId> =
            ["relay-1", "relay-2", "relay-3", "keyway-relay-0", "keyway-relay-1", "keyway-relay-2"]
                .iter()
                .map(|n| ServerId::of_node(n))
                .collect();
        assert_eq!(ids.len(), 6, "the documented example nodes have distinct server ids");
        assert_eq!(ServerId::of_node("relay-1"), ServerId::of_node("relay-1"), "stable");
    }

    #[test]
    fn ids_of_other_layouts_decode_to_nothing() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0x0b; 8]), None, "quinn's 8-byte hashed id (single relays before 12-byte ids)");
        for _ in 0..1000 {
            assert_eq!(decode(&RelayCidGenerator::new(&[7; 32]).generate_cid()), None, "a single relay's id");
        }
        let mut other = generator("relay-1", 7).generate_cid().to_vec();
        other[0] = 0xcb; // rotation 11: "route by 4-tuple"
        assert_eq!(decode(&other), None);
    }

    #[test]
    fn a_restarted_node_recognises_its_ids_and_a_sibling_or_a_forger_does_not() {
        let mut before = generator("relay-1", 7);
        let after = generator("relay-1", 7); // the same node after a crash: same key, same id
        let sibling = generator("relay-2", 9); // per-node secret and server id
        let same_id_other_key = generator("relay-1", 8); // a colliding server id cannot forge
        for _ in 0..1000 {
            let cid = before.generate_cid();
            assert!(after.validate(&cid).is_ok());
            assert!(sibling.validate(&cid).is_err());
            assert!(same_id_other_key.validate(&cid).is_err());
            for bit in 0..CID_LEN * 8 {
                let mut flipped = cid.to_vec();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(after.validate(&ConnectionId::new(&flipped)).is_err(), "bit {bit} flipped");
            }
        }
    }

    #[test]
    fn ids_are_unique_and_their_random_part_looks_random() {
        let mut g = generator("relay-1", 7);
        let n = 100_000;
        let ids: Vec<ConnectionId> = (0..n).map(|_| g.generate_cid()).collect();
        let unique: HashSet<&[u8]> = ids.iter().map(|c| &c[..]).collect();
        // 40 random bits: about n²/2^41 ≈ 0.005 repeats expected (quinn redraws on a clash).
        assert!(unique.len() >= n - 1, "{} repeats", n - unique.len());
        // Every bit after the server id is set in about half of the IDs (6 sigma ≈ 950).
        for bit in NONCE.start * 8..CID_LEN * 8 {
            let set = ids.iter().filter(|c| c[bit / 8] & (1 << (bit % 8)) != 0).count();
            assert!(set.abs_diff(n / 2) < 950, "bit {bit} set in {set} of {n}");
        }
        // Two generators of one node (a restart) do not repeat each other's sequence.
        let mut again = generator("relay-1", 7);
        let next: HashSet<Vec<u8>> = (0..1000).map(|_| again.generate_cid().to_vec()).collect();
        assert!(ids[..1000].iter().all(|c| !next.contains(&c.to_vec())));
    }

    #[test]
    fn a_single_relay_recognises_its_previous_runs_ids_and_no_other_key_does() {
        let mut before = RelayCidGenerator::new(&[7; 32]);
        let after = RelayCidGenerator::new(&[7; 32]); // the same relay after a crash
        let other = RelayCidGenerator::new(&[8; 32]);
        let node = generator("relay-1", 7);
        for _ in 0..1000 {
            let cid = before.generate_cid();
            assert_eq!(cid.len(), CID_LEN);
            assert_eq!(cid[0] & UNROUTABLE, UNROUTABLE, "QUIC-LB: route by 4-tuple");
            assert!(after.validate(&cid).is_ok());
            assert!(other.validate(&cid).is_err());
            assert!(node.validate(&cid).is_err(), "a node never takes a single relay's id");
            for bit in 0..CID_LEN * 8 {
                let mut flipped = cid.to_vec();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(after.validate(&ConnectionId::new(&flipped)).is_err(), "bit {bit} flipped");
            }
        }
        assert!(after.validate(&ConnectionId::new(&[0xff; 8])).is_err(), "wrong length");
    }

    /// The reason for the random bits (module doc): a restarted relay must not hand its new
    /// connections the IDs its previous run's peers still send to, or those peers get no reset.
    /// quinn's hashed IDs, keyed alike across runs, do: at 50 000 IDs per run about
    /// 50 000² / 2^24 ≈ 150 are issued again (none at all happens with chance e^-150).
    #[test]
    fn a_restarted_relay_does_not_issue_its_previous_runs_ids_again() {
        let n = 50_000;
        let run = |g: &mut dyn ConnectionIdGenerator| -> HashSet<Vec<u8>> {
            (0..n).map(|_| g.generate_cid().to_vec()).collect()
        };
        let (previous, next) =
            (run(&mut RelayCidGenerator::new(&[7; 32])), run(&mut RelayCidGenerator::new(&[7; 32])));
        assert_eq!(previous.intersection(&next).count(), 0);
        let (previous, next) = (run(&mut generator("relay-1", 7)), run(&mut generator("relay-1", 7)));
        assert_eq!(previous.intersection(&next).count(), 0, "a node's 40 bits");
        let hashed = || quinn_proto::HashedConnectionIdGenerator::from_key(7);
        let (previous, next) = (run(&mut hashed()), run(&mut hashed()));
        assert!(previous.intersection(&next).count() > 20, "quinn's 24 random bits repeat across runs");
    }
}
