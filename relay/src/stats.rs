//! [`RelayStats`]: live counters and gauges, lock-free so the forwarding path can bump them per
//! chunk. No per-hub or per-key labels: cardinality stays bounded however many hubs connect.

use std::sync::atomic::{AtomicU64, Ordering};

use keyway_proto::RefusalReason;

/// One slot per known refusal reason plus one for reasons this build does not know.
const REASON_SLOTS: usize = RefusalReason::KNOWN.len() + 1;

/// Counters and gauges of one relay. Read them through the accessor methods.
#[derive(Debug, Default)]
pub struct RelayStats {
    hubs_connected: AtomicU64,
    sessions_active: AtomicU64,
    sessions_opened: AtomicU64,
    refusals: [AtomicU64; REASON_SLOTS],
    bytes_app_to_hub: AtomicU64,
    bytes_hub_to_app: AtomicU64,
    registrations: AtomicU64,
    replacements: AtomicU64,
}

fn slot(reason: RefusalReason) -> usize {
    RefusalReason::KNOWN.iter().position(|r| *r == reason).unwrap_or(RefusalReason::KNOWN.len())
}

fn dec(gauge: &AtomicU64) {
    // Saturating: a bookkeeping slip must never wrap a gauge to 2^64.
    let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
}

impl RelayStats {
    /// Hubs currently registered (gauge).
    pub fn hubs_connected(&self) -> u64 {
        self.hubs_connected.load(Ordering::Relaxed)
    }
    /// Sessions currently being spliced (gauge).
    pub fn sessions_active(&self) -> u64 {
        self.sessions_active.load(Ordering::Relaxed)
    }
    /// Sessions the hub accepted and the relay spliced, since start.
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_opened.load(Ordering::Relaxed)
    }
    /// Refusals sent with `reason` since start (relay's own and hubs' forwarded ones). Every
    /// unknown reason shares one counter.
    pub fn refusals(&self, reason: RefusalReason) -> u64 {
        self.refusals.get(slot(reason)).map_or(0, |c| c.load(Ordering::Relaxed))
    }
    /// Sum of all refusals.
    pub fn refusals_total(&self) -> u64 {
        self.refusals.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
    /// Payload bytes forwarded from apps to hubs (counted live, chunk by chunk).
    pub fn bytes_app_to_hub(&self) -> u64 {
        self.bytes_app_to_hub.load(Ordering::Relaxed)
    }
    /// Payload bytes forwarded from hubs to apps (counted live, chunk by chunk).
    pub fn bytes_hub_to_app(&self) -> u64 {
        self.bytes_hub_to_app.load(Ordering::Relaxed)
    }
    /// Successful registrations since start (replacements included).
    pub fn registrations(&self) -> u64 {
        self.registrations.load(Ordering::Relaxed)
    }
    /// Registrations that displaced an older connection of the same hub.
    pub fn replacements(&self) -> u64 {
        self.replacements.load(Ordering::Relaxed)
    }

    pub(crate) fn hub_up(&self) {
        self.hubs_connected.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn hub_down(&self) {
        dec(&self.hubs_connected);
    }
    pub(crate) fn session_up(&self) {
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
        self.sessions_active.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn session_down(&self) {
        dec(&self.sessions_active);
    }
    pub(crate) fn refused(&self, reason: RefusalReason) {
        if let Some(c) = self.refusals.get(slot(reason)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
    pub(crate) fn forwarded(&self, direction: crate::Direction, bytes: usize) {
        let counter = match direction {
            crate::Direction::AppToHub => &self.bytes_app_to_hub,
            crate::Direction::HubToApp => &self.bytes_hub_to_app,
        };
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn registered(&self, replaced: bool) {
        self.registrations.fetch_add(1, Ordering::Relaxed);
        if replaced {
            self.replacements.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_unknown_ones_share_one() {
        let stats = RelayStats::default();
        for (i, reason) in RefusalReason::KNOWN.iter().enumerate() {
            for _ in 0..=i {
                stats.refused(*reason);
            }
        }
        for (i, reason) in RefusalReason::KNOWN.iter().enumerate() {
            assert_eq!(stats.refusals(*reason), i as u64 + 1, "{reason}");
        }
        stats.refused(RefusalReason::Other(900));
        stats.refused(RefusalReason::Other(901));
        assert_eq!(stats.refusals(RefusalReason::Other(1)), 2);
    }

    #[test]
    fn gauges_never_wrap() {
        let stats = RelayStats::default();
        stats.hub_down();
        stats.session_down();
        assert_eq!(stats.hubs_connected(), 0);
        assert_eq!(stats.sessions_active(), 0);
        stats.session_up();
        assert_eq!((stats.sessions_active(), stats.sessions_opened()), (1, 1));
        stats.session_down();
        assert_eq!((stats.sessions_active(), stats.sessions_opened()), (0, 1));
    }
}
