//! The routing table: hub name → the one live, registered hub connection.
//!
//! A `DashMap` keeps lookups on the session path lock-free across hubs. Each entry carries a
//! connection id, because a hub that reconnects replaces its entry at once ("newest connection
//! wins") and the old connection's clean-up must then not remove the new entry.
//!
//! Each hub's published allow-list and its live sessions sit behind one small mutex, so "check
//! the app key and enrol the session" is atomic with respect to an `AllowList` that revokes the
//! key: a session is either refused or enrolled and then cut, never missed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use keyway_proto::{HubName, PublicKey, RefusalReason, SessionPurpose};
use tokio::sync::{mpsc, oneshot};

use crate::policy::{decide_session, OnlineHub, Refusal};
use crate::stats::RelayStats;

/// Something the relay wants a hub's control task to do (it owns the control stream).
#[derive(Debug)]
pub(crate) enum ControlCommand {
    /// Send `GoAway` and finish the control stream; `done` fires once it was delivered (or gave up).
    GoAway { retry_after_ms: u32, message: String, done: oneshot::Sender<()> },
    /// The hub's name is no longer authorized: refuse on the control stream and disconnect.
    Revoke { message: String },
}

struct LiveSession {
    app_key: PublicKey,
    /// Fires when the app key is revoked; the session then resets both of its streams.
    revoke: Option<oneshot::Sender<()>>,
}

struct HubInner {
    allowed: HashSet<PublicKey>,
    pairing_open: bool,
    sessions: HashMap<u64, LiveSession>,
}

/// One registered hub connection.
pub(crate) struct Hub {
    pub name: HubName,
    pub key: PublicKey,
    pub conn: quinn::Connection,
    pub conn_id: u64,
    pub control: mpsc::UnboundedSender<ControlCommand>,
    inner: Mutex<HubInner>,
}

impl Hub {
    pub fn new(
        name: HubName,
        key: PublicKey,
        conn: quinn::Connection,
        conn_id: u64,
        allowed: Vec<PublicKey>,
        pairing_open: bool,
        control: mpsc::UnboundedSender<ControlCommand>,
    ) -> Self {
        let inner =
            HubInner { allowed: allowed.into_iter().collect(), pairing_open, sessions: HashMap::new() };
        Self { name, key, conn, conn_id, control, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> MutexGuard<'_, HubInner> {
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
    #[allow(clippy::too_many_arguments)]
    pub fn enrol(
        self: &Arc<Self>,
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
        Ok(Enrolled { guard: SessionGuard { hub: Arc::clone(self), id: session_id }, revoked: rx })
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
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.hub.lock().sessions.remove(&self.id);
    }
}

/// The table of registered hubs.
pub(crate) struct Registry {
    hubs: DashMap<HubName, Arc<Hub>>,
    stats: Arc<RelayStats>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new(stats: Arc<RelayStats>) -> Self {
        Self { hubs: DashMap::new(), stats, next_id: AtomicU64::new(1) }
    }

    /// A fresh id for a connection or a session.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `hub`, returning the entry it displaced (whose connection the caller closes).
    pub fn insert(&self, hub: Arc<Hub>) -> Option<Arc<Hub>> {
        let old = self.hubs.insert(hub.name.clone(), hub);
        if old.is_none() {
            self.stats.hub_up();
        }
        old
    }

    /// Removes `name` only if it still maps to connection `conn_id`. Returns the removed entry.
    pub fn remove_if_current(&self, name: &HubName, conn_id: u64) -> Option<Arc<Hub>> {
        let removed = self.hubs.remove_if(name, |_, hub| hub.conn_id == conn_id).map(|(_, hub)| hub);
        if removed.is_some() {
            self.stats.hub_down();
        }
        removed
    }

    pub fn get(&self, name: &HubName) -> Option<Arc<Hub>> {
        // Clone the Arc out so no shard lock is held across an await.
        self.hubs.get(name).map(|e| Arc::clone(e.value()))
    }

    /// How many hubs are registered.
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    /// A snapshot of every registered hub.
    pub fn all(&self) -> Vec<Arc<Hub>> {
        self.hubs.iter().map(|e| Arc::clone(e.value())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    /// A real (loopback) QUIC connection: `Hub` wants one, and no mock stands in for quinn.
    async fn connection() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
        let (server, client) = crate::testing::endpoint_pair().await;
        let addr = server.local_addr().unwrap();
        let connecting = client.connect(addr, keyway_proto::tls::SERVER_NAME).unwrap();
        let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        (server, c.unwrap(), s.unwrap())
    }

    #[tokio::test]
    async fn newest_connection_wins_and_stale_cleanup_is_ignored() {
        let stats = Arc::new(RelayStats::default());
        let registry = Registry::new(Arc::clone(&stats));
        let (_ep, conn, _) = connection().await;
        let name = HubName::new("home").unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let first = Arc::new(Hub::new(name.clone(), key(1), conn.clone(), 1, vec![], false, tx.clone()));
        let second = Arc::new(Hub::new(name.clone(), key(1), conn, 2, vec![], false, tx));
        assert!(registry.insert(first).is_none());
        assert_eq!(registry.insert(second).map(|h| h.conn_id), Some(1));
        assert_eq!(stats.hubs_connected(), 1);
        // The old connection's clean-up runs late: it must not remove the new entry.
        assert!(registry.remove_if_current(&name, 1).is_none());
        assert_eq!(registry.get(&name).map(|h| h.conn_id), Some(2));
        assert!(registry.remove_if_current(&name, 2).is_some());
        assert_eq!(stats.hubs_connected(), 0);
        assert!(registry.get(&name).is_none());
    }

    #[tokio::test]
    async fn removing_a_key_revokes_exactly_its_sessions() {
        let (_ep, conn, _) = connection().await;
        let name = HubName::new("home").unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = Arc::new(Hub::new(name, hub_key, conn, 1, vec![a, b], false, tx));
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
}
