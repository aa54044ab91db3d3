//! A peer's route: the paths one virtual address may use, which of them carries its packets,
//! and whether a path still answers. Pure: no sockets, no clock of its own (time comes in as
//! `now`), so every decision is tested deterministically, the way quinn-proto is.
//!
//! Today a route holds the relay channels that reach the peer, newest last, and sends on the
//! newest; the direct path and the TCP carrier join as further [`PathKind`]s, and the
//! [`Mode`] says whether packets go on one path or, as a hedge, on several.
//!
//! Liveness follows what the path socket sees: a path that carried data out and has heard
//! nothing back for [`SUSPECT_AFTER`] is suspect (a dead relay node sends nothing, and the
//! peer answers data within a round trip or an ACK delay). Only data-bearing sends count as
//! evidence; a path that is merely idle is never suspect.

use std::time::{Duration, Instant};

use keyway_proto::channel::ChannelId;

/// How long a path may carry data out with nothing coming back before it is suspect: several
/// round trips of any real path, well under a keep-alive.
pub const SUSPECT_AFTER: Duration = Duration::from_secs(1);

/// One way to reach a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Through the relay, under this side's id of a channel.
    RelayChannel(ChannelId),
}

/// How a route spreads its packets over its paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Every packet on the preferred path (the newest relay channel).
    #[default]
    Single,
    /// Every packet on every live path, for a bounded time while the preferred one is in
    /// doubt: QUIC drops the duplicates.
    Hedge,
}

/// What the route says about one of its paths at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Heard from since the last data went out, or never used.
    Live,
    /// Data went out less than [`SUSPECT_AFTER`] ago and nothing has come back yet.
    Waiting,
    /// Data went out [`SUSPECT_AFTER`] ago or longer and nothing has come back since.
    Suspect,
}

/// The evidence about one path: when data first went out unanswered, when it was last heard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    unanswered_since: Option<Instant>,
    last_heard: Option<Instant>,
}

impl Liveness {
    /// Data left on the path at `now`.
    pub fn on_data_sent(&mut self, now: Instant) {
        self.unanswered_since.get_or_insert(now);
    }

    /// Something from the peer arrived on the path at `now`.
    pub fn on_heard(&mut self, now: Instant) {
        self.unanswered_since = None;
        self.last_heard = Some(now);
    }

    /// When the peer was last heard on this path.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// The path's health at `now`.
    pub fn health(&self, now: Instant) -> Health {
        match self.unanswered_since {
            None => Health::Live,
            Some(since) if now.saturating_duration_since(since) >= SUSPECT_AFTER => Health::Suspect,
            Some(_) => Health::Waiting,
        }
    }
}

/// One path of a route and what is known of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoutePath {
    pub kind: PathKind,
    pub liveness: Liveness,
}

/// The paths of one peer (one virtual address) and how its packets use them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Newest last; never empty.
    paths: Vec<RoutePath>,
    mode: Mode,
}

/// Where the packets of one transmit go: the preferred path, and in [`Mode::Hedge`] the
/// others that are not suspect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub primary: PathKind,
    pub also: Vec<PathKind>,
}

impl Route {
    /// A route over one relay channel.
    pub fn over_channel(id: ChannelId) -> Route {
        Route {
            paths: vec![RoutePath { kind: PathKind::RelayChannel(id), liveness: Liveness::default() }],
            mode: Mode::Single,
        }
    }

    /// The relay channel this route sends on (the newest).
    pub fn channel(&self) -> Option<ChannelId> {
        self.paths
            .iter()
            .rev()
            .map(|p| match p.kind {
                PathKind::RelayChannel(id) => id,
            })
            .next()
    }

    /// The route's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Sets the route's mode.
    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// The paths, newest last.
    pub fn paths(&self) -> &[RoutePath] {
        &self.paths
    }

    /// Adds `kind` as the newest, preferred path (a path already there moves to the end).
    pub fn add(&mut self, kind: PathKind) {
        let existing = self.paths.iter().position(|p| p.kind == kind);
        let path = match existing {
            Some(at) => self.paths.remove(at),
            None => RoutePath { kind, liveness: Liveness::default() },
        };
        self.paths.push(path);
    }

    /// Removes `kind`; false if it was the route's last path (which stays: a route is never
    /// empty, its virtual address is unbound instead).
    pub fn remove(&mut self, kind: PathKind) -> bool {
        if self.paths.len() == 1 {
            return false;
        }
        self.paths.retain(|p| p.kind != kind);
        true
    }

    /// Where a transmit goes at `now`.
    pub fn select(&self, now: Instant) -> Selected {
        let mut newest_first = self.paths.iter().rev();
        // A route is never empty; the default is only there so this cannot panic.
        let primary =
            newest_first.next().map(|p| p.kind).unwrap_or(PathKind::RelayChannel(ChannelId::new(0)));
        let also = match self.mode {
            Mode::Single => Vec::new(),
            Mode::Hedge => {
                newest_first.filter(|p| p.liveness.health(now) != Health::Suspect).map(|p| p.kind).collect()
            }
        };
        Selected { primary, also }
    }

    /// Data left on `kind` at `now`.
    pub fn on_data_sent(&mut self, kind: PathKind, now: Instant) {
        if let Some(p) = self.paths.iter_mut().find(|p| p.kind == kind) {
            p.liveness.on_data_sent(now);
        }
    }

    /// Something from the peer arrived on `kind` at `now`.
    pub fn on_heard(&mut self, kind: PathKind, now: Instant) {
        if let Some(p) = self.paths.iter_mut().find(|p| p.kind == kind) {
            p.liveness.on_heard(now);
        }
    }

    /// The preferred path's health at `now`.
    pub fn health(&self, now: Instant) -> Health {
        self.paths.last().map_or(Health::Live, |p| p.liveness.health(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PathKind = PathKind::RelayChannel(ChannelId::new(1));
    const B: PathKind = PathKind::RelayChannel(ChannelId::new(2));

    /// A clock the test moves by hand.
    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn clock() -> Clock {
        Clock(Instant::now())
    }

    #[test]
    fn an_idle_path_is_never_suspect() {
        let t = clock();
        let route = Route::over_channel(ChannelId::new(1));
        assert_eq!(route.health(t.at(3_600_000)), Health::Live);
    }

    #[test]
    fn data_unanswered_for_the_bound_makes_a_path_suspect_and_an_answer_clears_it() {
        let t = clock();
        let mut route = Route::over_channel(ChannelId::new(1));
        route.on_data_sent(A, t.at(0));
        // Later sends do not move the start of the silence.
        route.on_data_sent(A, t.at(900));
        assert_eq!(route.health(t.at(999)), Health::Waiting);
        assert_eq!(route.health(t.at(1000)), Health::Suspect);
        route.on_heard(A, t.at(1200));
        assert_eq!(route.health(t.at(5000)), Health::Live);
        assert_eq!(route.paths()[0].liveness.last_heard(), Some(t.at(1200)));
        // A new silence counts from its own first send.
        route.on_data_sent(A, t.at(6000));
        assert_eq!(route.health(t.at(6999)), Health::Waiting);
    }

    #[test]
    fn the_newest_path_carries_and_a_hedge_adds_the_others_that_are_not_suspect() {
        let t = clock();
        let mut route = Route::over_channel(ChannelId::new(1));
        route.add(B);
        assert_eq!(route.channel(), Some(ChannelId::new(2)));
        assert_eq!(route.select(t.at(0)), Selected { primary: B, also: vec![] });
        route.set_mode(Mode::Hedge);
        assert_eq!(route.select(t.at(0)), Selected { primary: B, also: vec![A] });
        route.on_data_sent(A, t.at(0));
        assert_eq!(route.select(t.at(1500)), Selected { primary: B, also: vec![] }, "A is suspect");
        // Adding a path that is already there makes it the preferred one again.
        route.add(A);
        assert_eq!(route.select(t.at(1500)).primary, A);
    }

    #[test]
    fn a_route_keeps_its_last_path() {
        let mut route = Route::over_channel(ChannelId::new(1));
        assert!(!route.remove(A));
        route.add(B);
        assert!(route.remove(A));
        assert_eq!(route.paths().len(), 1);
        assert_eq!(route.channel(), Some(ChannelId::new(2)));
    }
}
