//! The relay's channels as the running relay shares them ([`Channels`]): the pure
//! [`ChannelTable`] behind a lock, with the counters, limits and tap that forwarding reports to,
//! and the socket that held first flights are released on.
//!
//! The socket wrapper ([`crate::forward`]) routes through it on every receive; the control flow
//! ([`crate::channel_session`]) inserts and removes channels and releases what was held. It lives
//! beside the table rather than in the I/O module, so the control tasks depend on the table, not
//! on the socket code.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use keyway_proto::channel::{self, HEADER_LEN};
use quinn::udp::Transmit;
use quinn::AsyncUdpSocket;
use tokio::time::Instant;

use crate::channel::{ChannelTable, DropReason, Route};
use crate::config::ForwardTap;
use crate::limits::LimitsCell;
use crate::stats::RelayStats;

/// The channel table with what forwarding reports to and is limited by; shared by the socket
/// wrapper (which routes) and the control flow (which inserts and removes channels).
pub(crate) struct Channels {
    table: Mutex<ChannelTable>,
    pub(crate) stats: Arc<RelayStats>,
    pub(crate) limits: Arc<LimitsCell>,
    pub(crate) tap: Option<ForwardTap>,
    /// The runtime's socket under [`ForwardingSocket`](crate::forward::ForwardingSocket), for sending held first flights.
    pub(crate) socket: OnceLock<Arc<dyn AsyncUdpSocket>>,
}

impl Channels {
    pub fn new(stats: Arc<RelayStats>, limits: Arc<LimitsCell>, tap: Option<ForwardTap>) -> Self {
        Self { table: Mutex::new(ChannelTable::default()), stats, limits, tap, socket: Default::default() }
    }

    /// Drops (and counts as `unknown_channel`) the held datagrams that expired; the relay calls
    /// it every [`HOLD_TIME`](crate::channel::HOLD_TIME), so nothing is held longer than
    /// twice that even when no new datagram arrives.
    pub fn sweep_held(&self, now: Instant) {
        let expired = self.table().expire_held(now);
        self.stats.channel_dropped(DropReason::UnknownChannel, expired);
    }

    /// Forwards what was held for the channel whose app side is `app_id` from `src` (the app's
    /// first flight, which overtook its `ChannelOpen`), now that the channel is listed. Each
    /// datagram is routed like any other (the byte budget aside: a first flight is a few
    /// packets); a send that would block drops it, as everywhere.
    pub fn release_held(&self, src: SocketAddr, app_id: channel::ChannelId) {
        let Some(socket) = self.socket.get() else { return };
        let now = Instant::now();
        let mut table = self.table();
        let (held, expired) = table.take_held(src, app_id, now);
        self.stats.channel_dropped(DropReason::UnknownChannel, expired);
        for mut datagram in held {
            let forward = match table.route(src, &datagram, now) {
                Route::Forward(forward) => forward,
                Route::Drop(reason) => {
                    self.stats.channel_dropped(reason, 1);
                    continue;
                }
            };
            let (to, src_ip, direction) = (forward.to, forward.src_ip, forward.direction);
            let _ = channel::write_header(&mut datagram, forward.new_id);
            if let (Some(tap), Some(packet)) = (&self.tap, datagram.get(HEADER_LEN..)) {
                tap(direction, packet);
            }
            let transmit =
                Transmit { destination: to, ecn: None, contents: &datagram, segment_size: None, src_ip };
            match socket.try_send(&transmit) {
                Ok(()) => {
                    self.stats.channel_forwarded(direction, 1, datagram.len().saturating_sub(HEADER_LEN))
                }
                Err(_) => self.stats.channel_dropped(DropReason::SendFailed, 1),
            }
        }
    }

    /// The table, locked. Never held across an `.await`, and never while calling into a
    /// connection other than through [`ChannelTable::route`].
    pub fn table(&self) -> MutexGuard<'_, ChannelTable> {
        // A panic while the lock is held would leave plain map state, still consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}
