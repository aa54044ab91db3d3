//! A hub's slot in the client: where one (hub, hub key)'s end-to-end connection is kept once
//! dialed, and the last dial's refusal.
//!
//! Why the refusal: callers who queued behind a dial that was refused get that answer instead
//! of each asking the relay in turn (1 000 TCP connections of a `keyway forward` to an offline
//! hub would otherwise queue 1 000 round trips). Why an async mutex: concurrent connects that
//! find no live connection wait for one dial instead of each dialing their own.

use keyway_proto::RefusalReason;
use tokio::time::Instant;

use crate::e2e;
use crate::error::ClientError;

/// One (hub, hub key)'s slot; lock it to read or dial.
pub(crate) type HubSlot = tokio::sync::Mutex<SlotState>;

/// What a slot holds.
#[derive(Debug, Default)]
pub(crate) struct SlotState {
    live: Option<e2e::Link>,
    refused: Option<(Instant, RefusalReason, String)>,
}

impl SlotState {
    /// The connection, unless it is closed or is `stale` (the one the caller just saw fail).
    pub(crate) fn usable(&self, stale: Option<&e2e::Link>) -> Option<e2e::Link> {
        self.live.as_ref().filter(|link| !link.is_closed() && !stale.is_some_and(|s| s.same(link))).cloned()
    }

    /// The refusal of a dial that ended after `queued_at` (when the caller started waiting).
    pub(crate) fn refused_since(&self, queued_at: Instant) -> Option<ClientError> {
        let (at, reason, message) = self.refused.as_ref()?;
        (*at >= queued_at).then(|| ClientError::Refused { reason: *reason, message: message.clone() })
    }

    /// Forgets the connection and the refusal: a new dial starts.
    pub(crate) fn reset(&mut self) {
        self.live = None;
        self.refused = None;
    }

    /// Keeps a failed dial's refusal for those queued behind it.
    pub(crate) fn note_failure(&mut self, error: &ClientError) {
        if let ClientError::Refused { reason, message } = error {
            self.refused = Some((Instant::now(), *reason, message.clone()));
        }
    }

    /// Keeps a dialed connection.
    pub(crate) fn set_live(&mut self, link: e2e::Link) {
        self.live = Some(link);
    }

    /// Takes the connection out (to close it).
    pub(crate) fn take_live(&mut self) -> Option<e2e::Link> {
        self.live.take()
    }
}
