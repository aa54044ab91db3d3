//! The vocabulary nodes of a cluster share, with no behaviour of its own: a node's stable
//! [`NodeId`], the records the store keeps ([`Presence`], a hub's [`AppList`], the
//! [`Replaced`] notice) and why the store did not answer ([`StoreError`]).
//!
//! It is a leaf on purpose: the configuration, both stores and the node driver all name these
//! types, and none of them must be imported back by the others.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use keyway_proto::{HubName, PublicKey};

/// The longest node id, in bytes (it is part of Redis keys and metric values).
pub const MAX_NODE_ID: usize = 63;

/// A node's stable id within its cluster: 1-63 characters of `a-z`, `0-9` and `-`, not
/// starting or ending with `-` (like a hub name), so it can stand in labels, keys and logs
/// unquoted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

/// Why a string is not a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node id {id:?} is invalid: {why} (1-{MAX_NODE_ID} characters of a-z, 0-9 and '-')")]
pub struct NodeIdError {
    id: String,
    why: &'static str,
}

impl NodeId {
    pub fn new(id: &str) -> Result<Self, NodeIdError> {
        let bad = |why| NodeIdError { id: id.chars().take(MAX_NODE_ID + 1).collect(), why };
        if id.is_empty() {
            return Err(bad("it is empty"));
        }
        if id.len() > MAX_NODE_ID {
            return Err(bad("it is too long"));
        }
        if !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(bad("it has a character other than a-z, 0-9 and '-'"));
        }
        if id.starts_with('-') || id.ends_with('-') {
            return Err(bad("it starts or ends with '-'"));
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Where a hub is registered now, as the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub epoch: u64,
    pub node: NodeId,
    pub addr: SocketAddr,
}

impl Presence {
    /// The stored form, `EPOCH NODE ADDR` (one short string per hub keeps the store's memory
    /// per hub small; the Lua scripts read the epoch off its front).
    pub(crate) fn encode(&self) -> String {
        format!("{} {} {}", self.epoch, self.node, self.addr)
    }

    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let epoch = parts.next()?.parse().ok()?;
        let node = NodeId::new(parts.next()?).ok()?;
        let addr = parts.next()?.parse().ok()?;
        Some(Self { epoch, node, addr })
    }
}

/// A claim's notice to the other nodes: `name` is now held at `epoch` by `node`; whoever holds
/// it with a lower epoch drops its tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub name: HubName,
    pub epoch: u64,
    pub node: NodeId,
}

impl Replaced {
    #[cfg(test)]
    pub(crate) fn encode(&self) -> String {
        format!("{} {} {}", self.name, self.epoch, self.node)
    }

    pub(crate) fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let name = HubName::new(parts.next()?).ok()?;
        let epoch = parts.next()?.parse().ok()?;
        let node = NodeId::new(parts.next()?).ok()?;
        Some(Self { name, epoch, node })
    }
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease is kept.
    Held,
    /// The lease is kept, but the store had lost the record or the allow-list (a restart,
    /// a failover, an expiry): the holder publishes its allow-list again.
    Restored,
    /// A higher epoch holds the name: the hub registered elsewhere.
    Lost,
}

/// A hub's allow-list as its node publishes it for the other nodes, which check an app against
/// it before they redirect the app (a revoked or unknown app is refused at whichever node it
/// asks). Eight octets of each app key, sorted: a hub's list costs the store 8 bytes per app,
/// and a prefix that matches by chance (2^-64 per pair; 2^64 key generations to forge) only
/// earns a redirect to the hub's node, which checks the whole key. Soft state like presence:
/// a missing list means "not known here", and the app is redirected to be checked there. (A
/// hub's list is stored only once the hub changed it on its tunnel, to keep idle hubs cheap;
/// an empty one is stored too, so that revoking the last app is refused everywhere.)
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppList(Vec<[u8; 8]>);

impl AppList {
    /// The list of these app keys.
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a PublicKey>) -> Self {
        let mut prefixes: Vec<[u8; 8]> = keys.into_iter().map(prefix).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        Self(prefixes)
    }

    /// Whether `key` may be on the list (see the type's doc for "may").
    pub fn admits(&self, key: &PublicKey) -> bool {
        self.0.binary_search(&prefix(key)).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stored form: the prefixes, concatenated; an empty list is one zero octet (Redis
    /// cannot tell an empty string from no value in a script's argument).
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.0.is_empty() {
            return vec![0];
        }
        self.0.concat()
    }

    /// Reads the stored form; `None` if it is not a whole number of prefixes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes == [0] {
            return Some(Self::default());
        }
        if bytes.is_empty() || bytes.len() % 8 != 0 {
            return None;
        }
        let mut prefixes: Vec<[u8; 8]> =
            bytes.chunks_exact(8).filter_map(|c| <[u8; 8]>::try_from(c).ok()).collect();
        prefixes.sort_unstable();
        Some(Self(prefixes))
    }
}

fn prefix(key: &PublicKey) -> [u8; 8] {
    let bytes = key.as_bytes();
    let mut out = [0u8; 8];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b;
    }
    out
}

/// Why the store did not answer. Nodes keep serving what they have; the operation is retried
/// (soft state) or refused with a typed refusal (a lookup).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store (redis): {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("cluster store answered something this relay cannot read: {0}")]
    Garbled(String),
    #[error("cluster store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cluster store address {url:?}: {why} (redis://HOST:PORT or redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER)")]
    Address { url: String, why: &'static str },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeId {
        NodeId::new(n).unwrap()
    }

    #[test]
    fn node_ids_are_checked_like_names() {
        assert_eq!(NodeId::new("relay-1").unwrap().as_str(), "relay-1");
        for bad in ["", "-a", "a-", "A", "a b", "a=b", &"x".repeat(MAX_NODE_ID + 1)] {
            let e = NodeId::new(bad).unwrap_err();
            assert!(e.to_string().contains("is invalid"), "{bad:?}: {e}");
        }
        assert!(NodeId::new(&"x".repeat(MAX_NODE_ID)).is_ok());
    }

    #[test]
    fn records_read_back() {
        let p = Presence {
            epoch: 1_733_000_000_000_123,
            node: node("relay-1"),
            addr: "[::1]:4433".parse().unwrap(),
        };
        assert_eq!(Presence::decode(&p.encode()), Some(p));
        let r = Replaced { name: HubName::new("home").unwrap(), epoch: 7, node: node("b") };
        assert_eq!(Replaced::decode(&r.encode()), Some(r));
        for bad in ["", "x a 1.2.3.4:5", "1 -bad 1.2.3.4:5", "1 a nowhere", "home 1"] {
            assert!(Presence::decode(bad).is_none() || Replaced::decode(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn an_app_list_admits_its_keys_and_reads_back() {
        let keys: Vec<PublicKey> = (0..20).map(|_| keyway_test_support::identity().public_key()).collect();
        let list = AppList::of(&keys[..10]);
        assert!(keys[..10].iter().all(|k| list.admits(k)));
        assert!(keys[10..].iter().all(|k| !list.admits(k)));
        assert_eq!(list.to_bytes().len(), 80);
        assert_eq!(AppList::from_bytes(&list.to_bytes()), Some(list));
        assert_eq!(AppList::from_bytes(&[1; 9]), None);
        assert_eq!(AppList::from_bytes(&[]), None);
        let empty = AppList::default();
        assert_eq!(AppList::from_bytes(&empty.to_bytes()), Some(empty));
    }
}
