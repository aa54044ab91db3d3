//! The relay's shared state: [`Shared`] (what every task of one relay reads and updates) and
//! [`ConnCtx`] (what one accepted connection is, with its [`StreamCredit`] and its standing).
//!
//! It lives beside the drivers that use it (`server`, `connection`, `hub`, `channel_session`), as
//! mini-redis's `db.rs` lives beside its `server.rs`: the callees import the state, never the
//! start-up code, so no module imports back from a module that imports it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keyway_proto::PublicKey;
use tokio::sync::watch;
use tracing::info;

use crate::channels::Channels;
use crate::drain::LiveSessions;
use crate::handshakes::Handshakes;
use crate::limits::{Buckets, LimitsCell};
use crate::policy::NameBook;
use crate::registry::{ControlCommand, Registry};
use crate::standing::{ConnStanding, Pending, Unauthorized};
use crate::stats::RelayStats;
use keyway_proto::codes;

/// Bidirectional streams a new connection may open before the relay grants more. quinn
/// pre-allocates state for every stream it allows a peer, about 85 bytes each, so granting
/// `max_streams_per_connection` (256) up front cost an idle hub, which needs one control
/// stream, some 20 KiB of the relay's memory; the credit grows with use instead (see
/// [`StreamCredit`]), up to the limit.
const INITIAL_STREAM_CREDIT: u32 = 8;

/// State shared by every task of one relay.
pub(crate) struct Shared {
    pub stats: Arc<RelayStats>,
    pub registry: Arc<Registry>,
    pub names: Arc<NameBook>,

    pub session_open_timeout: Duration,
    /// `true` once the relay is shutting down: no new registrations or sessions.
    pub shutdown: watch::Sender<bool>,
    /// The limits in force (replaced on reload); shared with the forwarding socket.
    pub limits: Arc<LimitsCell>,
    /// Rate-limit state per source address and per key.
    pub buckets: Buckets,
    /// The QUIC handshakes in flight, per source and in all.
    pub handshakes: Handshakes,
    /// Tokens for live channels, which a graceful shutdown waits for.
    pub sessions: LiveSessions,
    /// The live end-to-end channels, which the socket forwards.
    pub channels: Arc<Channels>,
    /// Connections of unknown keys not yet authorized (`max_unauthorized_connections`).
    pub unauthorized: Arc<Unauthorized>,
    /// The cluster driver of a cluster node; `None` for a single relay.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Disconnects registered hubs that the (just reloaded) name book no longer allows.
    pub fn sweep(&self) {
        for hub in self.registry.all() {
            if self.names.binding(&hub.name) == Some(hub.key) {
                continue;
            }
            if self.registry.remove_if_current(&hub.name, hub.conn_id).is_none() {
                continue;
            }
            info!(hub = %hub.name, key = %hub.key.fingerprint(), "hub no longer authorized; disconnecting it");
            let message = format!(
                "hub name {} is no longer authorized for key {} at this relay",
                hub.name,
                hub.key.fingerprint()
            );
            if hub.control.send(ControlCommand::Revoke { message }).is_err() {
                hub.conn.close(codes::REVOKED, b"hub name no longer authorized");
            }
        }
    }
}

/// What one accepted connection is: its authenticated key and whether it registered a hub.
pub(crate) struct ConnCtx {
    pub conn: quinn::Connection,
    pub peer: PublicKey,
    pub conn_id: u64,
    /// Set by the first `Register`; a connection carries at most one control stream.
    has_control: AtomicBool,
    /// Streams the peer has open now, and how many it may open.
    pub streams: StreamCredit,
    /// What authorized things live on it, which decides whether it may stay (`standing`).
    pub standing: ConnStanding,
}

impl ConnCtx {
    /// A connection that has registered nothing yet, with the initial stream credit under
    /// `max_streams` (`max_streams_per_connection`), counted as not yet authorized while it
    /// holds `pending`.
    pub fn new(
        conn: quinn::Connection,
        peer: PublicKey,
        conn_id: u64,
        max_streams: u32,
        pending: Option<Pending>,
    ) -> Self {
        Self {
            conn,
            peer,
            conn_id,
            has_control: AtomicBool::new(false),
            streams: StreamCredit::new(StreamCredit::initial(max_streams)),
            standing: ConnStanding::new(pending),
        }
    }

    /// Marks the connection as a hub's; `false` if it already was (one control stream per
    /// connection).
    pub fn claim_control(&self) -> bool {
        !self.has_control.swap(true, Ordering::AcqRel)
    }
}

/// The stream credit of one connection: starts at [`INITIAL_STREAM_CREDIT`] and doubles, up to
/// `max_streams_per_connection`, whenever the peer's open streams come close to it, so that a
/// busy app never waits on credit while an idle hub costs the relay only a few streams' state.
#[derive(Debug)]
pub(crate) struct StreamCredit {
    open: AtomicU32,
    granted: AtomicU32,
}

impl StreamCredit {
    /// The credit a new connection starts with under `limit` (`max_streams_per_connection`);
    /// also what the transport config grants before the connection exists.
    pub fn initial(limit: u32) -> u32 {
        limit.min(INITIAL_STREAM_CREDIT)
    }

    fn new(granted: u32) -> Self {
        Self { open: AtomicU32::new(0), granted: AtomicU32::new(granted) }
    }

    /// Counts a newly accepted stream; returns the new credit to grant, if it should grow.
    pub fn opened(&self, limit: u32) -> Option<u32> {
        let open = self.open.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let granted = self.granted.load(Ordering::Acquire);
        // Grow at three quarters, so the next streams never wait a round trip for credit.
        if granted >= limit || open.saturating_mul(4) < granted.saturating_mul(3) {
            return None;
        }
        let grown = granted.saturating_mul(2).clamp(1, limit);
        self.granted.store(grown, Ordering::Release);
        Some(grown)
    }

    /// Counts a stream whose handler ended.
    pub fn closed(&self) {
        let _ = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_credit_grows_before_it_runs_out_and_stops_at_the_limit() {
        let credit = StreamCredit::new(8);
        let grants: Vec<Option<u32>> = (0..40).map(|_| credit.opened(20)).collect();
        // 6 of 8 open (three quarters): grow to 16; 12 of 16: grow to the limit, 20; then never.
        assert_eq!(grants.iter().position(Option::is_some), Some(5));
        assert_eq!(grants.iter().flatten().copied().collect::<Vec<_>>(), vec![16, 20]);
    }

    #[test]
    fn closed_streams_are_uncounted_and_idle_connections_keep_the_small_credit() {
        let credit = StreamCredit::new(8);
        for _ in 0..100 {
            assert_eq!(credit.opened(256), None, "one stream at a time never needs more credit");
            credit.closed();
        }
        credit.closed(); // never below zero
        assert_eq!(credit.open.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_limit_below_the_initial_credit_is_never_exceeded() {
        let credit = StreamCredit::new(1);
        assert_eq!(credit.opened(1), None);
        assert_eq!(credit.opened(1), None);
    }
}
