//! What each app holds at the hub right now: its end-to-end connections and the streams on
//! them, against the per-app caps, so that one app cannot starve the others.
//!
//! quinn's `MAX_STREAMS` credit makes an app's `open_bi` wait when it runs out, never fail, and
//! a person behind a browser needs an answer, not a hang. So the hub grants each connection a
//! little more stream credit than the cap and refuses the excess itself, at once, with a typed
//! `OverLimit` on the stream. Plain bookkeeping (a slot is a guard that frees itself on drop),
//! tested without a socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use keyway_proto::PublicKey;

/// Default cap on one app key's concurrent end-to-end connections to this hub (one per relay
/// and app process is the norm; a few more cover a process that restarts before the old
/// connection timed out).
pub const DEFAULT_MAX_CONNECTIONS_PER_APP: usize = 8;
/// Default cap on one app key's concurrent streams (forwarded TCP connections) to this hub:
/// far above what a browser behind `keyway forward` opens (a page load opens tens).
pub const DEFAULT_MAX_STREAMS_PER_APP: usize = 2048;
/// Stream credit granted beyond the cap, so the streams over it reach the hub and are refused
/// with a typed error instead of waiting for credit.
pub const STREAM_CREDIT_MARGIN: usize = 64;

/// What an app holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub connections: usize,
    pub streams: usize,
}

/// Which resource a slot counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Connection,
    Stream,
}

/// The per-app load of one connector.
#[derive(Debug, Default)]
pub struct AppLoad {
    held: Mutex<HashMap<PublicKey, Held>>,
}

/// One connection or stream of one app, counted until dropped.
#[derive(Debug)]
pub struct Slot {
    load: Arc<AppLoad>,
    key: PublicKey,
    resource: Resource,
}

impl AppLoad {
    fn lock(&self) -> MutexGuard<'_, HashMap<PublicKey, Held>> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot of `resource` for `key` if it holds fewer than `max` (0: no cap).
    pub fn try_take(self: &Arc<Self>, key: PublicKey, resource: Resource, max: usize) -> Option<Slot> {
        let mut held = self.lock();
        let entry = held.entry(key).or_default();
        let count = match resource {
            Resource::Connection => &mut entry.connections,
            Resource::Stream => &mut entry.streams,
        };
        if max != 0 && *count >= max {
            if *entry == Held::default() {
                held.remove(&key);
            }
            return None;
        }
        *count += 1;
        Some(Slot { load: self.clone(), key, resource })
    }

    /// What `key` holds now.
    pub fn held(&self, key: &PublicKey) -> Held {
        self.lock().get(key).copied().unwrap_or_default()
    }

    /// How many apps hold anything.
    pub fn snapshot(&self) -> Vec<(PublicKey, Held)> {
        self.lock().iter().map(|(k, h)| (*k, *h)).collect()
    }

    /// App keys holding anything now.
    pub fn apps(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.load.lock();
        if let Some(entry) = held.get_mut(&self.key) {
            let count = match self.resource {
                Resource::Connection => &mut entry.connections,
                Resource::Stream => &mut entry.streams,
            };
            *count = count.saturating_sub(1);
            if *entry == Held::default() {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    #[test]
    fn a_cap_holds_per_app_and_per_resource_and_slots_free_themselves() {
        let load = Arc::new(AppLoad::default());
        let (a, b) = (key(1), key(2));
        let first = load.try_take(a, Resource::Stream, 2).unwrap();
        let _second = load.try_take(a, Resource::Stream, 2).unwrap();
        assert!(load.try_take(a, Resource::Stream, 2).is_none(), "a third stream is over the cap");
        assert!(load.try_take(b, Resource::Stream, 2).is_some(), "another app is not affected");
        let _conn = load.try_take(a, Resource::Connection, 1).unwrap();
        assert_eq!(load.held(&a), Held { connections: 1, streams: 2 });
        drop(first);
        assert!(load.try_take(a, Resource::Stream, 2).is_some(), "a freed slot can be taken again");
    }

    #[test]
    fn nothing_is_kept_for_an_app_that_holds_nothing() {
        let load = Arc::new(AppLoad::default());
        assert!(load.try_take(key(3), Resource::Connection, 0).is_some(), "0 means no cap");
        assert_eq!(load.apps(), 0, "the slot above was dropped at once");
        let slot = load.try_take(key(3), Resource::Stream, 1);
        assert!(load.try_take(key(4), Resource::Stream, 0).is_some());
        assert_eq!(load.apps(), 1);
        drop(slot);
        assert_eq!(load.apps(), 0);
        assert_eq!(load.held(&key(3)), Held::default());
    }
}
