//! Several relay nodes, one namespace (issue 16): what a node of a cluster is and what it
//! shares with its siblings.
//!
//! Every node of a cluster presents the same relay key (apps and hubs pin one key, as for one
//! service) and has its own stable [`NodeId`]. The id is configured, never drawn per start: the
//! per-node QUIC secrets derive from it ([`keyway_proto::tls::node_endpoint_config`]), so a
//! node restarted after a crash still resets its own old connections, and a packet that reached
//! the wrong node gets no valid reset.

use std::fmt;
use std::str::FromStr;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked_like_names() {
        assert_eq!(NodeId::new("relay-1").unwrap().as_str(), "relay-1");
        for bad in ["", "-a", "a-", "A", "a b", "a=b", &"x".repeat(MAX_NODE_ID + 1)] {
            let e = NodeId::new(bad).unwrap_err();
            assert!(e.to_string().contains("is invalid"), "{bad:?}: {e}");
        }
        assert!(NodeId::new(&"x".repeat(MAX_NODE_ID)).is_ok());
    }
}
