//! The channel table: which end-to-end QUIC packets the relay forwards, and
//! where to ([`ChannelTable::route`]).
//!
//! A channel joins an app and a hub that the relay has authorized. Each side has its own
//! [`ChannelId`] (the relay draws both), so a datagram names the side it comes from; the relay
//! writes the *other* side's id over the header and sends it to the other side's address. A side's
//! id is only valid from the address the relay authenticated for that side: the address of that
//! side's relay connection. That address may change (NAT rebinding), and quinn follows it on the
//! relay connection after validating it, so a datagram from an address other than the cached one
//! is checked against the connection's current `remote_address()`: equal, the cache moves and
//! the datagram goes on; different, it is dropped as `wrong_source`.
//!
//! No I/O and no clock of its own (the caller passes `now`, as quinn-proto is told the time):
//! the socket wrapper ([`crate::forward`]) asks, the control flow ([`crate::channel_session`])
//! inserts and removes. The one call out is `quinn::Connection::remote_address`, a read of the
//! address quinn validated, made only when a source differs from the cache.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use keyway_proto::channel::{self, ChannelId};
use tokio::time::Instant;

use crate::limits::TokenBucket;

/// Which way a forwarded chunk travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    AppToHub,
    HubToApp,
}

/// One side of a channel as the relay knows it.
pub(crate) struct Leg {
    /// The id this side puts in its headers (and finds in the datagrams it receives).
    pub id: ChannelId,
    /// The relay connection of this side: its `remote_address()` is the authenticated address.
    pub conn: quinn::Connection,
    /// The last address this side's datagrams were seen from (and validated), where the other
    /// side's datagrams go.
    addr: SocketAddr,
    /// The relay's own address this side's connection uses (so replies leave from the address the
    /// peer sends to, on a relay bound to a wildcard address).
    local_ip: Option<IpAddr>,
    /// What the connection's `remote_address()` said when last read, and when that was: a side
    /// that only receives (a hub waiting for the app's packets) never sends a datagram that would
    /// move `addr`, but its relay connection migrates (keep-alives) when its NAT rebinds, so
    /// the address datagrams go *to* follows the connection too, read at most every
    /// [`DESTINATION_RECHECK`].
    validated: SocketAddr,
    checked: Option<Instant>,
    /// Bytes that may still be sent to `addr` before this side has sent a channel datagram
    /// from it; `None` once it has (or for the address its handshake was made from). quinn
    /// moves a connection to a new address on the first authenticated packet from it and
    /// validates afterwards, so one spoofed packet could otherwise aim this side's traffic at
    /// a third party: RFC 9000 §8's limit (three times what the address sent) applies until
    /// the address answers.
    unanswered: Option<usize>,
}

/// What the relay sends to a side's new address before that address has sent anything on the
/// channel: three times one full-size datagram, RFC 9000 §8's factor on the packet that moved
/// the relay connection.
pub(crate) const UNANSWERED_ALLOWANCE: usize = 3 * 1200;

/// How often the address a side's datagrams are sent to is re-read from its relay connection.
/// Bounds how long forwarding to a side whose NAT rebound stays stale after its relay
/// connection migrated, at one read of quinn's connection state per leg per interval.
pub(crate) const DESTINATION_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl Leg {
    /// The leg for `id` on relay connection `conn`, at the address quinn validated for it now.
    pub fn new(id: ChannelId, conn: quinn::Connection) -> Self {
        let addr = conn.remote_address();
        let local_ip = conn.local_ip();
        Self { id, conn, addr, local_ip, validated: addr, checked: None, unanswered: None }
    }

    /// The address to send this side's datagrams to at `now`: the cached one, unless the
    /// connection's validated address moved since it was last read.
    fn destination(&mut self, now: Instant) -> SocketAddr {
        let due = self.checked.is_none_or(|t| now.saturating_duration_since(t) >= DESTINATION_RECHECK);
        if due {
            self.checked = Some(now);
            let current = self.conn.remote_address();
            if current != self.validated {
                self.validated = current;
                self.addr = current;
                self.local_ip = self.conn.local_ip();
                self.unanswered = Some(UNANSWERED_ALLOWANCE);
            }
        }
        self.addr
    }

    /// Whether `bytes` may be sent to this side's address now (see `unanswered`); spends
    /// them from the allowance if it is not answered yet.
    fn may_send(&mut self, bytes: usize) -> bool {
        match &mut self.unanswered {
            None => true,
            Some(left) if *left >= bytes => {
                *left -= bytes;
                true
            }
            Some(_) => false,
        }
    }

    /// The leg for `id` as if quinn had validated `addr` for it (a test's socket stands in for
    /// the peer's).
    #[cfg(test)]
    pub fn at(id: ChannelId, conn: quinn::Connection, addr: SocketAddr) -> Self {
        let validated = conn.remote_address();
        Self { id, conn, addr, local_ip: None, validated, checked: None, unanswered: None }
    }
}

/// Which side of a channel a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    App,
    Hub,
}

/// One live channel: the app's leg, the hub's leg, the byte buckets it pays into, and
/// when a packet last moved.
struct Channel {
    app: Leg,
    hub: Leg,
    /// The app key's and the (hub, app) pair's byte buckets; `None` when the per-key rate is off.
    buckets: Option<[Arc<TokenBucket>; 2]>,
    last_moved: Instant,
}

/// Why a datagram was not forwarded (the `reason` label of the drop counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// No live channel has this id (or the datagram is too short for a header).
    UnknownChannel,
    /// The id is live but the datagram came from an address that is not that side's.
    WrongSource,
    /// A key's `bytes_per_second_per_key` budget is spent.
    RateLimited,
    /// The socket would not take it now (full send buffer) or failed.
    SendFailed,
    /// The other side's relay connection moved to an address that has not sent anything on
    /// the channel yet, and the allowance for it is spent (anti-amplification).
    UnansweredAddress,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 5] = [
        Self::UnknownChannel,
        Self::WrongSource,
        Self::RateLimited,
        Self::SendFailed,
        Self::UnansweredAddress,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::UnknownChannel => "unknown_channel",
            Self::WrongSource => "wrong_source",
            Self::RateLimited => "rate_limited",
            Self::SendFailed => "send_failed",
            Self::UnansweredAddress => "unanswered_address",
        }
    }
}

/// Where a channel datagram goes.
#[derive(Debug)]
pub(crate) struct Forward<'a> {
    /// The other side's address.
    pub to: SocketAddr,
    /// The other side's id, to be written over the header.
    pub new_id: ChannelId,
    /// The local address to send from (the other side's connection's).
    pub src_ip: Option<IpAddr>,
    pub direction: Direction,
    /// The byte buckets to charge (the app key's and the (hub, app) pair's), if the rate is on.
    pub buckets: Option<&'a [Arc<TokenBucket>; 2]>,
}

/// What to do with a datagram.
#[derive(Debug)]
pub(crate) enum Route<'a> {
    Forward(Forward<'a>),
    Drop(DropReason),
}

/// A channel id that is already taken (ids are random: drawing again fixes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("channel id {0} is already in use")]
pub(crate) struct IdTaken(pub ChannelId);

/// How long a datagram for a channel that is not live yet is held (its app's `ChannelOpen`,
/// sent before it on the same path, is being authorized): long enough for that, short enough
/// that a stranger's datagrams leave soon. quinn retransmits a flight that was dropped.
pub(crate) const HOLD_TIME: std::time::Duration = std::time::Duration::from_millis(250);

/// Most datagrams held for one source IP address, all its ports together (a first flight is an
/// Initial and a few 0-RTT packets), so one source cannot take the whole of
/// `max_held_datagrams` by changing ports.
pub(crate) const HELD_PER_SOURCE: usize = 8;

/// Largest datagram held: a first flight's packets are at most a path MTU (quinn starts at
/// 1 200 bytes), so holding is bounded by bytes too (`max_held_datagrams` × this at most), not
/// by what a single UDP datagram can carry (64 KiB).
pub(crate) const HELD_MAX_BYTES: usize = 1500 + channel::HEADER_LEN;

/// A datagram held for a channel that is not live yet.
struct Held {
    src: SocketAddr,
    id: ChannelId,
    at: Instant,
    datagram: Vec<u8>,
}

/// Every live channel, by both of its ids, and the first flights waiting for theirs.
#[derive(Default)]
pub(crate) struct ChannelTable {
    /// Keyed by the app side's id.
    channels: HashMap<ChannelId, Channel>,
    /// Hub side's id → app side's id.
    hub_ids: HashMap<ChannelId, ChannelId>,
    /// Oldest first.
    held: std::collections::VecDeque<Held>,
}

impl ChannelTable {
    /// Adds a channel between `app` and `hub` (its key buckets, if the rate is on) that has
    /// moved nothing yet at `now`. Refused if either id is already in use by any side.
    pub fn insert(
        &mut self,
        app: Leg,
        hub: Leg,
        buckets: Option<[Arc<TokenBucket>; 2]>,
        now: Instant,
    ) -> Result<(), IdTaken> {
        for id in [app.id, hub.id] {
            if self.contains(id) {
                return Err(IdTaken(id));
            }
        }
        if app.id == hub.id {
            return Err(IdTaken(app.id));
        }
        self.hub_ids.insert(hub.id, app.id);
        self.channels.insert(app.id, Channel { app, hub, buckets, last_moved: now });
        Ok(())
    }

    /// Removes the channel whose app side is `app_id`; true if it was there.
    pub fn remove(&mut self, app_id: ChannelId) -> bool {
        match self.channels.remove(&app_id) {
            Some(channel) => {
                self.hub_ids.remove(&channel.hub.id);
                true
            }
            None => false,
        }
    }

    /// Whether `id` names a side of a live channel.
    pub fn contains(&self, id: ChannelId) -> bool {
        self.channels.contains_key(&id) || self.hub_ids.contains_key(&id)
    }

    /// Live channels.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// When the channel whose app side is `app_id` last forwarded a packet (or was inserted).
    pub fn last_moved(&self, app_id: ChannelId) -> Option<Instant> {
        self.channels.get(&app_id).map(|c| c.last_moved)
    }

    /// Holds a copy of `datagram` from `src`, whose channel id is not live, for up to
    /// [`HOLD_TIME`]: an app sends its first flight with its `ChannelOpen`, so it can arrive
    /// before the channel exists. At most `max` datagrams in all (0: none) and
    /// [`HELD_PER_SOURCE`] per source; false if it was not held (the caller drops and counts
    /// it). Returns with the expired ones dropped, counted in the second value.
    pub fn hold(&mut self, src: SocketAddr, datagram: &[u8], now: Instant, max: usize) -> (bool, usize) {
        let expired = self.expire(now);
        let Some((id, _)) = channel::parse(datagram) else { return (false, expired) };
        let from_source = self.held.iter().filter(|h| h.src.ip() == src.ip()).count();
        if datagram.len() > HELD_MAX_BYTES || self.held.len() >= max || from_source >= HELD_PER_SOURCE {
            return (false, expired);
        }
        self.held.push_back(Held { src, id, at: now, datagram: datagram.to_vec() });
        (true, expired)
    }

    /// Takes the datagrams held for channel id `id` from `src` (the app's address), oldest
    /// first, to be routed now that the channel is live; and how many others had expired.
    pub fn take_held(&mut self, src: SocketAddr, id: ChannelId, now: Instant) -> (Vec<Vec<u8>>, usize) {
        let expired = self.expire(now);
        let mut taken = Vec::new();
        self.held.retain_mut(|h| {
            let mine = h.src == src && h.id == id;
            if mine {
                taken.push(std::mem::take(&mut h.datagram));
            }
            !mine
        });
        (taken, expired)
    }

    /// Datagrams held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Drops the held datagrams older than [`HOLD_TIME`]; how many.
    pub fn expire_held(&mut self, now: Instant) -> usize {
        self.expire(now)
    }

    fn expire(&mut self, now: Instant) -> usize {
        let before = self.held.len();
        while self.held.front().is_some_and(|h| now.saturating_duration_since(h.at) >= HOLD_TIME) {
            self.held.pop_front();
        }
        before - self.held.len()
    }

    /// Decides what to do with `datagram`, received from `src` at `now`: forward it (the
    /// caller rewrites the header to `new_id` and sends it to `to`) or drop it, and why.
    /// A forward counts as the channel's activity at `now`.
    pub fn route(&mut self, src: SocketAddr, datagram: &[u8], now: Instant) -> Route<'_> {
        let Some((id, _)) = channel::parse(datagram) else {
            return Route::Drop(DropReason::UnknownChannel);
        };
        let (key, side) = match self.hub_ids.get(&id) {
            Some(app_id) => (*app_id, Side::Hub),
            None => (id, Side::App),
        };
        let Some(channel) = self.channels.get_mut(&key) else {
            return Route::Drop(DropReason::UnknownChannel);
        };
        let (from, to, direction) = match side {
            Side::App => (&mut channel.app, &mut channel.hub, Direction::AppToHub),
            Side::Hub => (&mut channel.hub, &mut channel.app, Direction::HubToApp),
        };
        if src != from.addr {
            // Maybe the side's relay connection migrated: quinn's validated address decides.
            if from.conn.remote_address() != src {
                return Route::Drop(DropReason::WrongSource);
            }
            from.addr = src;
            from.validated = src;
        }
        // A datagram from the side's address: that address answers.
        from.unanswered = None;
        let destination = to.destination(now);
        if !to.may_send(datagram.len()) {
            return Route::Drop(DropReason::UnansweredAddress);
        }
        channel.last_moved = now;
        Route::Forward(Forward {
            to: destination,
            new_id: to.id,
            src_ip: to.local_ip,
            direction,
            buckets: channel.buckets.as_ref(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    use keyway_proto::channel::{encode_into, CHANNEL_DATA, HEADER_LEN};

    use crate::testing::endpoint_pair;

    /// A relay-side connection (what a leg holds) and the peer's endpoint that made it.
    pub(crate) async fn relay_connection(
        server: &quinn::Endpoint,
        client: &quinn::Endpoint,
    ) -> (quinn::Connection, quinn::Connection) {
        let dial = client.connect(server.local_addr().unwrap(), keyway_proto::tls::SERVER_NAME).unwrap();
        let accept = async { server.accept().await.unwrap().await.unwrap() };
        let (peer, relay_side) = tokio::join!(dial, accept);
        (relay_side, peer.unwrap())
    }

    #[test]
    fn first_flights_are_held_within_bounds_taken_by_their_channel_and_expire() {
        let mut table = ChannelTable::default();
        let now = Instant::now();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let id = ChannelId::new(7);
        for _ in 0..HELD_PER_SOURCE {
            assert!(table.hold(a, &datagram(id), now, 100).0);
        }
        assert!(!table.hold(a, &datagram(id), now, 100).0, "per source");
        let other_port: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        assert!(!table.hold(other_port, &datagram(id), now, 100).0, "per source address, all ports");
        let mut big = Vec::new();
        encode_into(&mut big, ChannelId::new(9), &[0x40; HELD_MAX_BYTES]);
        assert!(!table.hold("192.0.2.3:1".parse().unwrap(), &big, now, 100).0, "too large to hold");
        assert!(table.hold(b, &datagram(id), now, 100).0);
        assert!(!table.hold(b, &datagram(ChannelId::new(8)), now, HELD_PER_SOURCE + 1).0, "in all");
        assert!(!table.hold(b, &[CHANNEL_DATA, 1], now, 100).0, "no header");
        let (taken, expired) = table.take_held(a, id, now);
        assert_eq!((taken.len(), expired), (HELD_PER_SOURCE, 0));
        assert_eq!(taken[0], datagram(id));
        assert_eq!(table.held(), 1, "b's is not a's channel");
        let (taken, expired) = table.take_held(b, id, now + HOLD_TIME);
        assert_eq!((taken.len(), expired), (0, 1), "expired");
    }

    fn datagram(id: ChannelId) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(&mut out, id, &[0x40, 1, 2, 3]);
        out
    }

    #[tokio::test]
    async fn datagrams_go_to_the_other_side_with_its_id_and_others_are_dropped() {
        // Two peers with endpoints of their own (two source addresses), one relay endpoint.
        let (server, app_ep) = endpoint_pair().await;
        let (_other_server, hub_ep) = endpoint_pair().await;
        let (app_conn, _app_peer) = relay_connection(&server, &app_ep).await;
        let (hub_conn, _hub_peer) = relay_connection(&server, &hub_ep).await;
        let (app_addr, hub_addr) = (app_conn.remote_address(), hub_conn.remote_address());
        let (a, h) = (ChannelId::new(1), ChannelId::new(2));
        let t0 = Instant::now();
        let mut table = ChannelTable::default();
        table.insert(Leg::new(a, app_conn.clone()), Leg::new(h, hub_conn.clone()), None, t0).unwrap();
        assert_eq!(table.len(), 1);

        let later = t0 + Duration::from_secs(5);
        match table.route(app_addr, &datagram(a), later) {
            Route::Forward(f) => {
                assert_eq!((f.to, f.new_id, f.direction), (hub_addr, h, Direction::AppToHub));
                assert!(f.buckets.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(table.last_moved(a), Some(later));
        match table.route(hub_addr, &datagram(h), later) {
            Route::Forward(f) => {
                assert_eq!((f.to, f.new_id, f.direction), (app_addr, a, Direction::HubToApp))
            }
            other => panic!("{other:?}"),
        }

        // The hub's id from the app's address (and the other way round) is a spoof.
        let spoof = later + Duration::from_secs(1);
        assert!(matches!(table.route(app_addr, &datagram(h), spoof), Route::Drop(DropReason::WrongSource)));
        assert!(matches!(table.route(hub_addr, &datagram(a), spoof), Route::Drop(DropReason::WrongSource)));
        let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(matches!(table.route(stranger, &datagram(a), spoof), Route::Drop(DropReason::WrongSource)));
        assert_eq!(table.last_moved(a), Some(later), "a dropped datagram is no activity");
        assert!(matches!(
            table.route(app_addr, &datagram(ChannelId::new(3)), spoof),
            Route::Drop(DropReason::UnknownChannel)
        ));
        assert!(matches!(
            table.route(app_addr, &datagram(a)[..HEADER_LEN - 1], spoof),
            Route::Drop(DropReason::UnknownChannel)
        ));
        assert!(matches!(table.route(app_addr, &[0x40; 20], spoof), Route::Drop(DropReason::UnknownChannel)));

        // Ids are unique across sides and channels.
        let (c, d) = (ChannelId::new(3), ChannelId::new(4));
        assert_eq!(
            table.insert(Leg::new(h, app_conn.clone()), Leg::new(d, hub_conn.clone()), None, t0),
            Err(IdTaken(h))
        );
        assert_eq!(
            table.insert(Leg::new(c, app_conn.clone()), Leg::new(c, hub_conn.clone()), None, t0),
            Err(IdTaken(c))
        );
        assert_eq!(table.len(), 1);

        assert!(table.remove(a));
        assert!(!table.remove(a));
        assert_eq!(table.len(), 0);
        assert!(matches!(
            table.route(hub_addr, &datagram(h), spoof),
            Route::Drop(DropReason::UnknownChannel)
        ));
    }

    #[tokio::test]
    async fn a_leg_whose_relay_connection_migrated_follows_it_and_its_old_address_is_dropped() {
        let (server, app_ep) = endpoint_pair().await;
        let (_other_server, hub_ep) = endpoint_pair().await;
        let (app_conn, app_peer) = relay_connection(&server, &app_ep).await;
        let (hub_conn, _hub_peer) = relay_connection(&server, &hub_ep).await;
        let old = app_conn.remote_address();
        let (a, h) = (ChannelId::new(10), ChannelId::new(20));
        let t0 = Instant::now();
        let mut table = ChannelTable::default();
        table.insert(Leg::new(a, app_conn.clone()), Leg::new(h, hub_conn.clone()), None, t0).unwrap();

        // NAT rebinding, as quinn sees it: the app's packets now come from another port.
        app_ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let new = app_ep.local_addr().unwrap();
        assert_ne!(new, old);
        // Before quinn has seen the new address on the relay connection, it is a stranger.
        assert!(matches!(table.route(new, &datagram(a), t0), Route::Drop(DropReason::WrongSource)));
        // Traffic on the relay connection makes quinn validate and adopt the new path.
        let deadline = Instant::now() + keyway_test_support::PATIENCE;
        while app_conn.remote_address() != new {
            assert!(Instant::now() < deadline, "the relay connection never migrated");
            // Any ack-eliciting packet will do; the relay need not accept the stream.
            if let Ok((mut send, _recv)) = app_peer.open_bi().await {
                let _ = send.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match table.route(new, &datagram(a), t0) {
            Route::Forward(f) => assert_eq!(f.new_id, h),
            other => panic!("{other:?}"),
        }
        // The hub's datagrams now go to the new address, and the old one is a stranger.
        match table.route(hub_conn.remote_address(), &datagram(h), t0) {
            Route::Forward(f) => assert_eq!(f.to, new),
            other => panic!("{other:?}"),
        }
        assert!(matches!(table.route(old, &datagram(a), t0), Route::Drop(DropReason::WrongSource)));
    }

    #[tokio::test]
    async fn datagrams_to_a_silent_side_follow_its_relay_connection_when_it_migrates() {
        let (server, app_ep) = endpoint_pair().await;
        let (_other_server, hub_ep) = endpoint_pair().await;
        let (app_conn, _app_peer) = relay_connection(&server, &app_ep).await;
        let (hub_conn, hub_peer) = relay_connection(&server, &hub_ep).await;
        let old = hub_conn.remote_address();
        let (a, h) = (ChannelId::new(30), ChannelId::new(40));
        let t0 = Instant::now();
        let mut table = ChannelTable::default();
        table.insert(Leg::new(a, app_conn.clone()), Leg::new(h, hub_conn.clone()), None, t0).unwrap();
        let app = app_conn.remote_address();
        match table.route(app, &datagram(a), t0) {
            Route::Forward(f) => assert_eq!(f.to, old),
            other => panic!("{other:?}"),
        }
        // The hub's NAT rebinds; the hub only receives on the channel, but its relay connection
        // (keep-alives) migrates.
        hub_ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let new = hub_ep.local_addr().unwrap();
        let deadline = Instant::now() + keyway_test_support::PATIENCE;
        while hub_conn.remote_address() != new {
            assert!(Instant::now() < deadline, "the relay connection never migrated");
            if let Ok((mut send, _recv)) = hub_peer.open_bi().await {
                let _ = send.write_all(b"x").await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Within the recheck interval the cached address still serves...
        match table.route(app, &datagram(a), t0) {
            Route::Forward(f) => assert_eq!(f.to, old),
            other => panic!("{other:?}"),
        }
        // ...after it, the app's datagrams go where the hub's connection now is.
        match table.route(app, &datagram(a), t0 + DESTINATION_RECHECK) {
            Route::Forward(f) => assert_eq!(f.to, new),
            other => panic!("{other:?}"),
        }
    }
}
