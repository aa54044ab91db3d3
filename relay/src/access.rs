//! Who may reach one hub now: its published allow-list, whether it pairs, and its live
//! sessions ([`HubAccess`]), with the guard that un-enrols a session when it ends.
//!
//! Plain state, no connection handle and no I/O (like iroh's `clients.rs` beside its server),
//! so the authorization-and-enrolment rules are tested without a socket; `registry::Hub` is
//! the thin wrapper that pairs this state with the hub's QUIC connection.
//!
//! Everything sits behind one small mutex, so "check the app key and enrol the session" is
//! atomic with respect to an `AllowList` that revokes the key: a session is either refused or
//! enrolled and then cut, never missed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use keyway_proto::{HubName, PublicKey, RefusalReason, SessionPurpose};
use tokio::sync::oneshot;

use crate::policy::{decide_session, OnlineHub, Refusal};

struct LiveSession {
    app_key: PublicKey,
    /// Fires when the app key is revoked; the session then resets both of its streams.
    revoke: Option<oneshot::Sender<()>>,
}

struct Inner {
    allowed: HashSet<PublicKey>,
    pairing_open: bool,
    sessions: HashMap<u64, LiveSession>,
}

/// The allow-list and live sessions of one hub (hub `name`, key `key`); cheap to clone, every
/// clone is the same state.
#[derive(Clone)]
pub(crate) struct HubAccess {
    name: HubName,
    key: PublicKey,
    inner: Arc<Mutex<Inner>>,
}

impl HubAccess {
    pub fn new(name: HubName, key: PublicKey, allowed: Vec<PublicKey>, pairing_open: bool) -> Self {
        let inner = Inner { allowed: allowed.into_iter().collect(), pairing_open, sessions: HashMap::new() };
        Self { name, key, inner: Arc::new(Mutex::new(inner)) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Poisoning would need a panic while the lock is held; the state is still consistent
        // (plain inserts/removes), so carry on rather than take the relay down.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the published allow-list; revokes the live sessions of keys that were removed.
    /// Returns how many sessions were cut.
    pub fn set_allow_list(&self, allowed: Vec<PublicKey>, pairing_open: bool) -> usize {
        let mut inner = self.lock();
        let allowed: HashSet<PublicKey> = allowed.into_iter().collect();
        let removed: HashSet<PublicKey> = inner.allowed.difference(&allowed).copied().collect();
        inner.allowed = allowed;
        inner.pairing_open = pairing_open;
        let mut cut = 0;
        for session in inner.sessions.values_mut().filter(|s| removed.contains(&s.app_key)) {
            if let Some(revoke) = session.revoke.take() {
                let _ = revoke.send(());
                cut += 1;
            }
        }
        cut
    }

    /// Decides a session for `app_key` against this hub's current allow-list and, if it may
    /// proceed, enrols it (atomically, see the module docs).
    /// `max_sessions` (0: no limit) is checked last, after every authorization check, so an
    /// unauthorized app learns nothing about the hub's load.
    pub fn enrol(
        &self,
        bound: Option<&PublicKey>,
        pinned: &PublicKey,
        app_key: &PublicKey,
        purpose: SessionPurpose,
        session_id: u64,
        max_sessions: u32,
    ) -> Result<Enrolled, Refusal> {
        let mut inner = self.lock();
        let online = OnlineHub { key: &self.key, allowed: &inner.allowed, pairing_open: inner.pairing_open };
        decide_session(&self.name, bound, pinned, Some(online), app_key, purpose)?;
        if max_sessions > 0 && inner.sessions.len() >= max_sessions as usize {
            return Err(Refusal::new(
                RefusalReason::OverLimit,
                format!(
                    "hub {} already carries {} sessions, this relay's max_sessions_per_hub limit",
                    self.name, max_sessions
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        inner.sessions.insert(session_id, LiveSession { app_key: *app_key, revoke: Some(tx) });
        Ok(Enrolled { guard: SessionGuard { access: self.clone(), id: session_id }, revoked: rx })
    }

    #[cfg(test)]
    fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }
}

/// A session enrolled with its hub.
pub(crate) struct Enrolled {
    /// Un-enrols the session when dropped.
    pub guard: SessionGuard,
    /// Resolves `Ok(())` if the app key is revoked while the session lives.
    pub revoked: oneshot::Receiver<()>,
}

/// Removes a session from its hub's table when the session ends, however it ends.
pub(crate) struct SessionGuard {
    access: HubAccess,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.access.lock().sessions.remove(&self.id);
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
    fn removing_a_key_revokes_exactly_its_sessions() {
        let name = HubName::new("home").unwrap();
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = HubAccess::new(name, hub_key, vec![a, b], false);
        let mut sa = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 10, 0).unwrap();
        let mut sb = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 11, 0).unwrap();
        assert_eq!(hub.session_count(), 2);

        assert_eq!(hub.set_allow_list(vec![b], true), 1);
        assert!(sa.revoked.try_recv().is_ok());
        assert!(sb.revoked.try_recv().is_err());
        // Revoked key: new sessions are refused; pairing (now open) is allowed regardless.
        let err = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 12, 0).err().unwrap();
        assert_eq!(err.reason, RefusalReason::AppNotAuthorized);
        assert!(hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Pair, 13, 0).is_ok());
        assert_eq!(hub.session_count(), 2, "the pairing session's guard was dropped at once");

        drop(sa);
        drop(sb);
        assert_eq!(hub.session_count(), 0);

        // The per-hub session limit comes after authorization and counts live sessions only.
        let held = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 14, 1).unwrap();
        let err = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 15, 1).err().unwrap();
        assert_eq!(err.reason, RefusalReason::OverLimit);
        assert!(err.message.contains("max_sessions_per_hub"), "{}", err.message);
        let err = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 16, 1).err().unwrap();
        assert_eq!(err.reason, RefusalReason::AppNotAuthorized, "authorization first");
        drop(held);
        assert!(hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 17, 1).is_ok());
    }

    #[test]
    fn a_session_revoked_once_is_not_cut_again_and_a_kept_key_is_never_cut() {
        let name = HubName::new("home").unwrap();
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = HubAccess::new(name, hub_key, vec![a, b], false);
        let _sa = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 1, 0).unwrap();
        let _sb = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 2, 0).unwrap();
        assert_eq!(hub.set_allow_list(vec![b], false), 1);
        // Removing `a` again (it stays removed) cuts nothing more; `b` stays untouched.
        assert_eq!(hub.set_allow_list(vec![b], false), 0);
        assert_eq!(hub.set_allow_list(vec![a, b], false), 0, "re-adding a key cuts nothing");
        assert_eq!(hub.session_count(), 2, "a revoked session stays enrolled until it ends");
    }
}
