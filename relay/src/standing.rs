//! Whether a connection may stay: what the relay lets a key that nobody vouches for hold.
//!
//! TLS admits any valid key, so anyone can complete a handshake and then sit on the relay's
//! memory (about 35 KiB a connection) with keep-alives. A connection is therefore reviewed
//! `unauthorized_grace` after its handshake and every `unauthorized_grace` after that, and it
//! **stays** only while one of these holds, in this order ([`review`]):
//!
//! 1. it carries something the relay authorized ([`ConnStanding::hold`]), now or at some time
//!    since its last review: a registration (a `Register` answered `Registered`, until its
//!    control stream ends), or a session or channel that passed authorization (enrolled with
//!    its hub, `Pair` to an open window included), until it ends. "Since the last review"
//!    keeps an app whose sessions are short from being taken for idle between two of them;
//! 2. otherwise its key is in the allow-list of a hub registered now, and that hub has room
//!    for one more idle app connection (`max_idle_apps_per_hub`): the connection is then
//!    charged to that hub ([`IdleCharge`]), so a long allow-list buys no more idle connections
//!    than a short one; a charge lasts while the hub stays registered and lists the key.
//!
//! Anything else is closed with the `LIMIT` code and a reason ([`CutReason`]). A connection is
//! *not yet authorized* from its handshake until the first time 1. or 2. holds; those of keys
//! the relay does not know are capped in total (`max_unauthorized_connections`, [`admission`]),
//! so what strangers hold is bounded by configuration whatever their number of addresses.
//!
//! The decisions ([`admission`], [`review`]) are pure: the facts come in, the lookups that
//! cost something are passed as closures and run only when the decision needs them.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::stats::{CutReason, RelayStats};

/// What [`admission`] decided for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Counted as not yet authorized (under the cap).
    Counted,
    /// Over the cap, but the key is known (a hub key of the name book, or an app key some
    /// registered hub lists): admitted uncounted, so strangers can never lock known keys out.
    Known,
    /// Over the cap, and the key is a stranger: refuse.
    Refused,
}

/// Decides a new connection's admission when `unauthorized` connections are not yet
/// authorized and the cap is `cap` (0: none). `known` runs only at the cap.
pub(crate) fn admission(unauthorized: usize, cap: u32, known: impl FnOnce() -> bool) -> Admission {
    if cap == 0 || unauthorized < cap as usize {
        Admission::Counted
    } else if known() {
        Admission::Known
    } else {
        Admission::Refused
    }
}

/// The connection-close reason a peer cut at its review sees (the close code is `LIMIT`).
pub(crate) fn cut_message(reason: CutReason) -> &'static [u8] {
    match reason {
        CutReason::Stranger => {
            b"not authorized within unauthorized_grace: this key registered no hub, has no session, \
              and no registered hub lists it"
        }
        CutReason::IdleOverHubBudget => {
            b"idle app connection over max_idle_apps_per_hub: every hub that lists this key already \
              carries its idle app connections"
        }
    }
}

/// What [`review`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Something authorized lives on the connection.
    Active,
    /// Idle, but charged to a hub that lists the key.
    Listed,
    /// Close it.
    Cut(CutReason),
}

/// The outcome of looking a key up among the registered hubs' allow-lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    /// A hub lists the key and carries this connection (charged now, or still charged).
    Charged,
    /// Hubs list the key, but none has room for another idle app connection.
    Full,
    /// No registered hub lists the key.
    Unlisted,
}

/// Reviews a connection with `live` authorized things on it now, and `recent` if one lived
/// since the last review; `listing` runs only if it is idle (and may charge it to a hub).
pub(crate) fn review(live: u32, recent: bool, listing: impl FnOnce() -> Listing) -> Verdict {
    if live > 0 || recent {
        return Verdict::Active;
    }
    match listing() {
        Listing::Charged => Verdict::Listed,
        Listing::Full => Verdict::Cut(CutReason::IdleOverHubBudget),
        Listing::Unlisted => Verdict::Cut(CutReason::Stranger),
    }
}

/// The relay-wide count of connections of unknown keys not yet authorized.
#[derive(Debug)]
pub(crate) struct Unauthorized {
    count: AtomicUsize,
    stats: Arc<RelayStats>,
}

impl Unauthorized {
    pub fn new(stats: Arc<RelayStats>) -> Arc<Self> {
        Arc::new(Self { count: AtomicUsize::new(0), stats })
    }

    /// How many there are now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts one more, until the returned token is dropped (or the connection authorized).
    pub fn count_one(self: &Arc<Self>) -> Pending {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.stats.unauthorized(true);
        Pending(Arc::clone(self))
    }
}

/// One connection counted in [`Unauthorized`]; uncounts it when dropped.
#[derive(Debug)]
pub(crate) struct Pending(Arc<Unauthorized>);

impl Drop for Pending {
    fn drop(&mut self) {
        let _ = self.0.count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.0.stats.unauthorized(false);
    }
}

/// One connection's standing: how many authorized things live on it, and its not-yet-authorized
/// token until the first of them (or its first charge to a hub).
#[derive(Debug, Default)]
pub(crate) struct ConnStanding {
    live: AtomicU32,
    /// Set whenever an authorized thing starts or ends; taken by each review.
    recent: AtomicBool,
    pending: Mutex<Option<Pending>>,
}

impl ConnStanding {
    pub fn new(pending: Option<Pending>) -> Self {
        Self { live: AtomicU32::new(0), recent: AtomicBool::new(false), pending: Mutex::new(pending) }
    }

    /// Marks the connection as carrying one more authorized thing (a registration, a session,
    /// a channel) until the guard is dropped; the first one authorizes the connection.
    pub fn hold(&self) -> Hold<'_> {
        self.live.fetch_add(1, Ordering::AcqRel);
        self.recent.store(true, Ordering::Release);
        self.authorized();
        Hold(self)
    }

    /// Authorized things living on the connection now.
    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Acquire)
    }

    /// Whether an authorized thing started or ended since the last call.
    pub fn take_recent(&self) -> bool {
        self.recent.swap(false, Ordering::AcqRel)
    }

    /// The connection is authorized: it no longer counts as not yet authorized.
    pub fn authorized(&self) {
        drop(self.pending.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Whether it still counts as not yet authorized.
    #[cfg(test)]
    pub fn is_pending(&self) -> bool {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// One authorized thing on a connection, for as long as it lives (see [`ConnStanding::hold`]).
#[derive(Debug)]
pub(crate) struct Hold<'a>(&'a ConnStanding);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let _ = self.0.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.0.recent.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_under_the_cap_and_looks_keys_up_only_at_it() {
        let never = || -> bool { panic!("looked up under the cap") };
        assert_eq!(admission(0, 2, never), Admission::Counted);
        assert_eq!(admission(1, 2, never), Admission::Counted);
        assert_eq!(admission(5_000, 0, never), Admission::Counted, "0: no cap");
        assert_eq!(admission(2, 2, || true), Admission::Known);
        assert_eq!(admission(2, 2, || false), Admission::Refused);
        assert_eq!(admission(9, 2, || false), Admission::Refused, "overshoot still refuses");
    }

    #[test]
    fn review_keeps_the_active_and_the_charged_and_cuts_the_rest_by_reason() {
        let never = || -> Listing { panic!("looked up an active connection") };
        assert_eq!(review(1, false, never), Verdict::Active);
        assert_eq!(review(3, true, never), Verdict::Active);
        assert_eq!(review(0, true, never), Verdict::Active, "a session ended since the last review");
        assert_eq!(review(0, false, || Listing::Charged), Verdict::Listed);
        assert_eq!(review(0, false, || Listing::Full), Verdict::Cut(CutReason::IdleOverHubBudget));
        assert_eq!(review(0, false, || Listing::Unlisted), Verdict::Cut(CutReason::Stranger));
    }

    #[test]
    fn the_first_hold_authorizes_and_holds_count_what_lives() {
        let stats = Arc::new(RelayStats::default());
        let unauthorized = Unauthorized::new(Arc::clone(&stats));
        let standing = ConnStanding::new(Some(unauthorized.count_one()));
        let other = ConnStanding::new(Some(unauthorized.count_one()));
        assert_eq!((unauthorized.count(), stats.connections_unauthorized()), (2, 2));
        assert!(standing.is_pending());
        let a = standing.hold();
        let b = standing.hold();
        assert_eq!(standing.live(), 2);
        assert!(!standing.is_pending());
        assert_eq!((unauthorized.count(), stats.connections_unauthorized()), (1, 1));
        assert!(standing.take_recent());
        assert!(!standing.take_recent(), "taken by the review");
        drop(a);
        drop(b);
        assert_eq!(standing.live(), 0, "ended things no longer count");
        assert!(standing.take_recent(), "but they ended since the last review");
        assert!(!standing.is_pending(), "authorized once is never pending again");
        drop(other);
        assert_eq!((unauthorized.count(), stats.connections_unauthorized()), (0, 0));
        // A connection admitted uncounted (a known key over the cap) has no token to drop.
        let known = ConnStanding::new(None);
        known.authorized();
        assert_eq!(unauthorized.count(), 0);
    }

    #[test]
    fn every_cut_reason_names_the_limit_that_cut() {
        assert!(String::from_utf8_lossy(cut_message(CutReason::Stranger)).contains("unauthorized_grace"));
        let budget = String::from_utf8_lossy(cut_message(CutReason::IdleOverHubBudget)).into_owned();
        assert!(budget.contains("max_idle_apps_per_hub"));
        let labels: Vec<_> = CutReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels, ["stranger", "idle_over_hub_budget"]);
    }
}
