//! The live sessions by app key, each with a handle that cuts it: what lets removing a key
//! from `authorized_apps` (or stopping the hub) end that key's sessions at once.
//!
//! Plain bookkeeping with no I/O handle in it: a session registers (and gets a
//! [`SessionGuard`] that leaves on drop), a revocation notifies the guards of the removed
//! keys, and the session task, which holds the stream, does the cutting. So the registry is
//! tested here without a socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keyway_proto::PublicKey;
use tokio::sync::Notify;

/// Live sessions by app key, each with a handle that cuts it.
#[derive(Debug, Default)]
pub struct SessionRegistry {
    next_id: AtomicU64,
    live: Mutex<HashMap<PublicKey, HashMap<u64, Arc<Notify>>>>,
}

/// Membership of one session in the registry; leaves it on drop.
#[derive(Debug)]
pub struct SessionGuard {
    registry: Arc<SessionRegistry>,
    key: PublicKey,
    id: u64,
    cut: Arc<Notify>,
}

impl SessionGuard {
    /// Completes when the session must be cut (its key was revoked, or the hub stops).
    /// `Notify::notify_one` stores a permit, so a cut that happens before anyone waits is not lost.
    pub async fn cut(&self) {
        self.cut.notified().await
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut live) = self.registry.live.lock() {
            if let Some(sessions) = live.get_mut(&self.key) {
                sessions.remove(&self.id);
                if sessions.is_empty() {
                    live.remove(&self.key);
                }
            }
        }
    }
}

impl SessionRegistry {
    /// Registers a session of `key`.
    pub fn register(self: &Arc<Self>, key: PublicKey) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cut = Arc::new(Notify::new());
        if let Ok(mut live) = self.live.lock() {
            live.entry(key).or_default().insert(id, cut.clone());
        }
        SessionGuard { registry: self.clone(), key, id, cut }
    }

    /// Cuts every live session of the given keys; returns how many were cut.
    pub fn revoke(&self, keys: &[PublicKey]) -> usize {
        let Ok(live) = self.live.lock() else { return 0 };
        let mut n = 0;
        for key in keys {
            for cut in live.get(key).into_iter().flat_map(|s| s.values()) {
                cut.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Cuts every live session (hub shutdown).
    pub fn cut_all(&self) -> usize {
        let keys: Vec<PublicKey> = self.live.lock().map(|l| l.keys().copied().collect()).unwrap_or_default();
        self.revoke(&keys)
    }

    /// Number of live sessions of `key`.
    pub fn count(&self, key: &PublicKey) -> usize {
        self.live.lock().map(|l| l.get(key).map_or(0, HashMap::len)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    /// Whether the guard's cut has fired, without waiting (a cut stores a permit; polling
    /// once consumes it).
    fn is_cut(guard: &SessionGuard) -> bool {
        let mut cut = pin!(guard.cut());
        matches!(cut.as_mut().poll(&mut Context::from_waker(Waker::noop())), Poll::Ready(()))
    }

    #[test]
    fn revoking_a_key_cuts_its_sessions_only() {
        let registry = Arc::new(SessionRegistry::default());
        let a1 = registry.register(key(1));
        let a2 = registry.register(key(1));
        let b = registry.register(key(2));
        assert_eq!((registry.count(&key(1)), registry.count(&key(2))), (2, 1));

        assert_eq!(registry.revoke(&[key(1), key(3)]), 2);
        assert!(is_cut(&a1) && is_cut(&a2), "a cut before anyone waits is kept");
        assert!(!is_cut(&b));
        // Being cut does not leave the registry: the session task ends and drops its guard.
        assert_eq!(registry.count(&key(1)), 2);
        drop(a1);
        drop(a2);
        assert_eq!(registry.count(&key(1)), 0);
        assert_eq!(registry.revoke(&[key(1)]), 0, "nothing left to cut");
        assert_eq!(registry.count(&key(2)), 1);
    }

    #[test]
    fn cut_all_reaches_every_key_and_guards_leave_on_drop() {
        let registry = Arc::new(SessionRegistry::default());
        let guards: Vec<SessionGuard> = (1..=3).map(|seed| registry.register(key(seed))).collect();
        assert_eq!(registry.cut_all(), 3);
        assert!(guards.iter().all(is_cut));
        drop(guards);
        assert_eq!(registry.cut_all(), 0);
        assert!(registry.live.lock().unwrap().is_empty(), "no empty entries left behind");
    }
}
