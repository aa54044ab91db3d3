//! Who may reach one hub now: its published allow-list, whether it pairs, and its live
//! sessions ([`HubAccess`]), with the guard that un-enrols a session when it ends.
//!
//! Enrolment is also where the session caps apply ([`SessionCaps`]): one hub's sessions, and
//! one app's sessions at that hub, so that one app cannot take every session a hub may carry.
//! Every channel is enrolled here. The caps refuse at once
//! with a typed `OverLimit` naming the limit, and count their own hits, so every caller counts
//! the same way.
//!
//! An app connection with nothing authorized on it may still stay if this hub lists its key;
//! it is then charged to this hub ([`HubAccess::charge_idle`], at most `max_idle_apps_per_hub`
//! of them), so the allow-list a hub publishes bounds what it lets strangers hold.
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

use crate::limits::Limits;
use crate::policy::{decide_session, OnlineHub, WireRefusal};
use crate::stats::{LimitKind, RelayStats};

/// The caps [`HubAccess::enrol`] applies after authorization (0: no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionCaps {
    /// `max_sessions_per_hub`.
    pub per_hub: u32,
    /// `max_sessions_per_app`: sessions one app key holds at one hub.
    pub per_app: u32,
    /// `max_pairing_sessions_per_hub`: pairing sessions of one hub, all keys together.
    pub pairing: u32,
}

impl From<&Limits> for SessionCaps {
    fn from(limits: &Limits) -> Self {
        Self {
            per_hub: limits.max_sessions_per_hub,
            per_app: limits.max_sessions_per_app,
            pairing: limits.max_pairing_sessions_per_hub,
        }
    }
}

/// Live sessions of one app key at one hub.
#[derive(Default)]
struct AppTally {
    sessions: u32,
    /// Counted in `keyway_relay_apps_at_session_cap`; cleared when one of its sessions ends.
    at_cap: bool,
}

struct LiveSession {
    app_key: PublicKey,
    purpose: SessionPurpose,
    /// Fires when the app key is revoked or, for a pairing session, when the hub closes its
    /// pairing window; the session then resets both of its streams.
    revoke: Option<oneshot::Sender<()>>,
}

struct Inner {
    allowed: HashSet<PublicKey>,
    pairing_open: bool,
    sessions: HashMap<u64, LiveSession>,
    /// Per app key with a live session; entries go when their last session ends, so the map
    /// is never larger than `sessions`.
    per_app: HashMap<PublicKey, AppTally>,
    /// Idle app connections charged to this hub ([`IdleCharge`]s alive).
    idle_apps: u32,
}

/// The allow-list and live sessions of one hub (hub `name`, key `key`); cheap to clone, every
/// clone is the same state.
#[derive(Clone)]
pub(crate) struct HubAccess {
    name: HubName,
    key: PublicKey,
    inner: Arc<Mutex<Inner>>,
    /// Where the caps count their hits and the apps at their cap.
    stats: Arc<RelayStats>,
}

impl HubAccess {
    pub fn new(
        name: HubName,
        key: PublicKey,
        allowed: Vec<PublicKey>,
        pairing_open: bool,
        stats: Arc<RelayStats>,
    ) -> Self {
        let inner = Inner {
            allowed: allowed.into_iter().collect(),
            pairing_open,
            sessions: HashMap::new(),
            per_app: HashMap::new(),
            idle_apps: 0,
        };
        Self { name, key, inner: Arc::new(Mutex::new(inner)), stats }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Poisoning would need a panic while the lock is held; the state is still consistent
        // (plain inserts/removes), so carry on rather than take the relay down.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The published allow-list now (a cluster node publishes it for its siblings).
    pub fn allowed(&self) -> Vec<PublicKey> {
        self.lock().allowed.iter().copied().collect()
    }

    /// Replaces the published allow-list; revokes the live sessions of keys that were removed
    /// and, when pairing closes, every pairing session (the window they were admitted under
    /// is gone). Returns how many sessions were cut.
    pub fn set_allow_list(&self, allowed: Vec<PublicKey>, pairing_open: bool) -> usize {
        let mut inner = self.lock();
        let allowed: HashSet<PublicKey> = allowed.into_iter().collect();
        let removed: HashSet<PublicKey> = inner.allowed.difference(&allowed).copied().collect();
        inner.allowed = allowed;
        inner.pairing_open = pairing_open;
        let mut cut = 0;
        // A pairing session whose key the hub now lists is the one that just paired: the
        // hub closes its window when a pairing succeeds, and the app has yet to read the
        // hub's answer on that channel, so only the others are cut.
        let cut_pairing = !pairing_open;
        let listed = &inner.allowed;
        let gone: Vec<u64> = inner
            .sessions
            .iter()
            .filter(|(_, s)| match s.purpose {
                SessionPurpose::Pair => cut_pairing && !listed.contains(&s.app_key),
                _ => removed.contains(&s.app_key),
            })
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            let Some(session) = inner.sessions.get_mut(id) else { continue };
            if let Some(revoke) = session.revoke.take() {
                let _ = revoke.send(());
                cut += 1;
            }
        }
        cut
    }

    /// Decides a session for `app_key` against this hub's current allow-list and, if it may
    /// proceed, enrols it (atomically, see the module docs).
    /// The caps are checked last, after every authorization check, so an unauthorized app
    /// learns nothing about the hub's load; the app's own cap first, since it is the one the
    /// app can do something about. A cap's refusal is counted in `limit_hits_total` here.
    pub fn enrol(
        &self,
        bound: Option<&PublicKey>,
        pinned: &PublicKey,
        app_key: &PublicKey,
        purpose: SessionPurpose,
        session_id: u64,
        caps: SessionCaps,
    ) -> Result<Enrolled, WireRefusal> {
        let mut inner = self.lock();
        let online = OnlineHub { key: &self.key, allowed: &inner.allowed, pairing_open: inner.pairing_open };
        decide_session(&self.name, bound, pinned, Some(online), app_key, purpose)?;
        let app_sessions = inner.per_app.get(app_key).map_or(0, |t| t.sessions);
        if caps.per_app > 0 && app_sessions >= caps.per_app {
            self.stats.limit_hit(LimitKind::MaxSessionsPerApp);
            return Err(WireRefusal::new(
                RefusalReason::OverLimit,
                format!(
                    "app key {} already holds {} sessions to hub {}, this relay's max_sessions_per_app \
                     limit; close one first",
                    app_key.fingerprint(),
                    caps.per_app,
                    self.name
                ),
            ));
        }
        let pairing = inner.sessions.values().filter(|s| s.purpose == SessionPurpose::Pair).count();
        if purpose == SessionPurpose::Pair && caps.pairing > 0 && pairing >= caps.pairing as usize {
            self.stats.limit_hit(LimitKind::MaxPairingSessionsPerHub);
            return Err(WireRefusal::new(
                RefusalReason::OverLimit,
                format!(
                    "hub {} already carries {} pairing sessions, this relay's \
                     max_pairing_sessions_per_hub limit; pair again in a moment",
                    self.name, caps.pairing
                ),
            ));
        }
        if caps.per_hub > 0 && inner.sessions.len() >= caps.per_hub as usize {
            self.stats.limit_hit(LimitKind::MaxSessionsPerHub);
            return Err(WireRefusal::new(
                RefusalReason::OverLimit,
                format!(
                    "hub {} already carries {} sessions, this relay's max_sessions_per_hub limit",
                    self.name, caps.per_hub
                ),
            ));
        }
        let (tx, rx) = oneshot::channel();
        inner.sessions.insert(session_id, LiveSession { app_key: *app_key, purpose, revoke: Some(tx) });
        let tally = inner.per_app.entry(*app_key).or_default();
        tally.sessions += 1;
        if caps.per_app > 0 && tally.sessions >= caps.per_app && !tally.at_cap {
            tally.at_cap = true;
            self.stats.app_at_session_cap(true);
        }
        Ok(Enrolled { guard: SessionGuard { access: self.clone(), id: session_id }, revoked: rx })
    }

    /// Whether the published allow-list holds `key` now.
    pub fn lists(&self, key: &PublicKey) -> bool {
        self.lock().allowed.contains(key)
    }

    /// Charges one idle connection of `key` to this hub if the allow-list holds the key and
    /// fewer than `budget` (0: no limit) idle app connections are charged already.
    pub fn charge_idle(&self, key: &PublicKey, budget: u32) -> Charge {
        let mut inner = self.lock();
        if !inner.allowed.contains(key) {
            return Charge::Unlisted;
        }
        if budget > 0 && inner.idle_apps >= budget {
            return Charge::Full;
        }
        inner.idle_apps += 1;
        self.stats.idle_app(true);
        Charge::Charged(IdleCharge { access: self.clone(), key: *key })
    }

    /// Un-enrols session `id` (its guard was dropped).
    fn end(&self, id: u64) {
        let mut inner = self.lock();
        let Some(session) = inner.sessions.remove(&id) else { return };
        let std::collections::hash_map::Entry::Occupied(mut tally) = inner.per_app.entry(session.app_key)
        else {
            return;
        };
        let tally_mut = tally.get_mut();
        tally_mut.sessions = tally_mut.sessions.saturating_sub(1);
        if std::mem::take(&mut tally_mut.at_cap) {
            self.stats.app_at_session_cap(false);
        }
        if tally_mut.sessions == 0 {
            tally.remove();
        }
    }

    #[cfg(test)]
    fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    #[cfg(test)]
    fn apps_with_sessions(&self) -> usize {
        self.lock().per_app.len()
    }
}

/// The outcome of [`HubAccess::charge_idle`].
pub(crate) enum Charge {
    Charged(IdleCharge),
    /// Listed, but the hub carries its budget of idle app connections already.
    Full,
    Unlisted,
}

/// One idle app connection charged to a hub; uncharged when dropped.
pub(crate) struct IdleCharge {
    access: HubAccess,
    key: PublicKey,
}

impl IdleCharge {
    /// Whether the hub still lists the key (a revoked key's charge lapses).
    pub fn still_listed(&self) -> bool {
        self.access.lists(&self.key)
    }
}

impl Drop for IdleCharge {
    fn drop(&mut self) {
        let mut inner = self.access.lock();
        inner.idle_apps = inner.idle_apps.saturating_sub(1);
        self.access.stats.idle_app(false);
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
        self.access.end(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_proto::Identity;

    fn key(seed: u8) -> PublicKey {
        Identity::from_seed([seed; 32]).public_key()
    }

    fn hub_access(hub_key: PublicKey, allowed: Vec<PublicKey>, pairing_open: bool) -> HubAccess {
        let stats = Arc::new(RelayStats::default());
        HubAccess::new(HubName::new("home").unwrap(), hub_key, allowed, pairing_open, stats)
    }

    fn caps(per_hub: u32, per_app: u32) -> SessionCaps {
        SessionCaps { per_hub, per_app, pairing: 0 }
    }
    const NO_CAPS: SessionCaps = SessionCaps { per_hub: 0, per_app: 0, pairing: 0 };

    #[test]
    fn removing_a_key_revokes_exactly_its_sessions() {
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = hub_access(hub_key, vec![a, b], false);
        let mut sa = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 10, NO_CAPS).unwrap();
        let mut sb = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 11, NO_CAPS).unwrap();
        assert_eq!(hub.session_count(), 2);

        assert_eq!(hub.set_allow_list(vec![b], true), 1);
        assert!(sa.revoked.try_recv().is_ok());
        assert!(sb.revoked.try_recv().is_err());
        // Revoked key: new sessions are refused; pairing (now open) is allowed regardless.
        let err =
            hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 12, NO_CAPS).err().unwrap();
        assert_eq!(err.reason, RefusalReason::AppNotAuthorized);
        assert!(hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Pair, 13, NO_CAPS).is_ok());
        assert_eq!(hub.session_count(), 2, "the pairing session's guard was dropped at once");

        drop(sa);
        drop(sb);
        assert_eq!(hub.session_count(), 0);

        // The per-hub session limit comes after authorization and counts live sessions only.
        let held = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 14, caps(1, 0)).unwrap();
        let err =
            hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 15, caps(1, 0)).err().unwrap();
        assert_eq!(err.reason, RefusalReason::OverLimit);
        assert!(err.message.contains("max_sessions_per_hub"), "{}", err.message);
        let err =
            hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 16, caps(1, 0)).err().unwrap();
        assert_eq!(err.reason, RefusalReason::AppNotAuthorized, "authorization first");
        drop(held);
        assert!(hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 17, caps(1, 0)).is_ok());
    }

    #[test]
    fn a_session_revoked_once_is_not_cut_again_and_a_kept_key_is_never_cut() {
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = hub_access(hub_key, vec![a, b], false);
        let _sa = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 1, NO_CAPS).unwrap();
        let _sb = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 2, NO_CAPS).unwrap();
        assert_eq!(hub.set_allow_list(vec![b], false), 1);
        // Removing `a` again (it stays removed) cuts nothing more; `b` stays untouched.
        assert_eq!(hub.set_allow_list(vec![b], false), 0);
        assert_eq!(hub.set_allow_list(vec![a, b], false), 0, "re-adding a key cuts nothing");
        assert_eq!(hub.session_count(), 2, "a revoked session stays enrolled until it ends");
    }

    #[test]
    fn one_app_at_its_cap_is_refused_while_another_app_is_still_served() {
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = hub_access(hub_key, vec![a, b], false);
        let caps = caps(3, 2);
        let a1 = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 1, caps).unwrap();
        let _a2 = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 2, caps).unwrap();
        assert_eq!(hub.stats.apps_at_session_cap(), 1, "a is at its cap");
        let err = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 3, caps).err().unwrap();
        assert_eq!(err.reason, RefusalReason::OverLimit);
        assert!(err.message.contains("max_sessions_per_app"), "{}", err.message);
        assert!(err.message.contains(&a.fingerprint().to_string()), "names the app: {}", err.message);
        assert_eq!(hub.stats.limit_hits(LimitKind::MaxSessionsPerApp), 1);
        // The other app gets the hub's remaining session; then the hub's cap speaks.
        let _b1 = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 4, caps).unwrap();
        let err = hub.enrol(Some(&hub_key), &hub_key, &b, SessionPurpose::Connect, 5, caps).err().unwrap();
        assert!(err.message.contains("max_sessions_per_hub"), "{}", err.message);
        assert_eq!(hub.stats.limit_hits(LimitKind::MaxSessionsPerHub), 1);
        // An unauthorized key hears about neither cap.
        let err =
            hub.enrol(Some(&hub_key), &hub_key, &key(9), SessionPurpose::Connect, 6, caps).err().unwrap();
        assert_eq!(err.reason, RefusalReason::AppNotAuthorized);
        // One of a's sessions ends: a is below its cap again and may open one more.
        drop(a1);
        assert_eq!(hub.stats.apps_at_session_cap(), 0);
        let _a3 = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 7, caps).unwrap();
        assert_eq!(hub.stats.apps_at_session_cap(), 1);
    }

    #[test]
    fn per_app_tallies_go_with_their_last_session() {
        let (hub_key, a) = (key(1), key(2));
        let hub = hub_access(hub_key, vec![a], false);
        let sessions: Vec<Enrolled> = (0..5)
            .map(|id| {
                hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, id, caps(0, 5)).unwrap()
            })
            .collect();
        assert_eq!((hub.apps_with_sessions(), hub.stats.apps_at_session_cap()), (1, 1));
        drop(sessions);
        assert_eq!((hub.session_count(), hub.apps_with_sessions()), (0, 0));
        assert_eq!(hub.stats.apps_at_session_cap(), 0, "the gauge never drifts");
        // No cap: never counted as at it.
        let _s = hub.enrol(Some(&hub_key), &hub_key, &a, SessionPurpose::Connect, 9, NO_CAPS).unwrap();
        assert_eq!(hub.stats.apps_at_session_cap(), 0);
    }

    #[test]
    fn idle_app_connections_are_charged_up_to_the_budget_and_only_for_listed_keys() {
        let (hub_key, a, b) = (key(1), key(2), key(3));
        let hub = hub_access(hub_key, vec![a], false);
        assert!(matches!(hub.charge_idle(&b, 2), Charge::Unlisted));
        let Charge::Charged(first) = hub.charge_idle(&a, 2) else { panic!("a is listed") };
        let Charge::Charged(second) = hub.charge_idle(&a, 2) else { panic!("room for two") };
        assert!(matches!(hub.charge_idle(&a, 2), Charge::Full), "a long allow-list buys nothing more");
        assert_eq!(hub.stats.idle_app_connections(), 2);
        drop(first);
        assert!(matches!(hub.charge_idle(&a, 2), Charge::Charged(_)), "a charge freed makes room");
        assert_eq!(hub.stats.idle_app_connections(), 1, "the charge just taken was dropped at once");
        // A revoked key's charge lapses (the connection's next review drops it).
        assert!(second.still_listed());
        hub.set_allow_list(vec![b], false);
        assert!(!second.still_listed());
        drop(second);
        assert_eq!(hub.stats.idle_app_connections(), 0);
        assert!(matches!(hub.charge_idle(&b, 0), Charge::Charged(_)), "0: no budget");
    }
}
