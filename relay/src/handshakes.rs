//! The QUIC handshakes the relay is working on ([`HandshakeBook`]): who holds the slots, per
//! source and in all, and which attempt gives way when they are all taken.
//!
//! A handshake holds its slot from acceptance until it completes or times out, so a stranger
//! that sends client Initials and never its second flight holds slots at the price of one
//! packet each. Three bounds keep that from locking the relay: a source (an IPv4 address or an
//! IPv6 prefix, [`rate_key`]) holds at most `max_handshakes_per_source`; past
//! `validate_above_handshakes_in_flight` in flight a new attempt must prove its address first
//! (a QUIC Retry, asked by `connection`), which a spoofed source cannot; and when every slot
//! is taken, an attempt whose address is validated takes the slot of the oldest attempt whose
//! address is not, instead of being refused. An unvalidated newcomer never evicts: that would
//! let a spoofer push out real hubs for free.
//!
//! [`HandshakeBook`] is pure bookkeeping with no clock and no I/O: attempts are ordered by when
//! they were booked, and what an evicted attempt is told is the caller's payload (`T`).
//! [`Handshakes`] is the relay's book, shared by every connection attempt: a booked attempt
//! holds a [`HandshakeSlot`] that frees itself when dropped and wakes its task when evicted.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::limits::{rate_key, Limits};

/// The relay's handshakes in flight.
#[derive(Debug, Default)]
pub(crate) struct Handshakes(Mutex<HandshakeBook<Arc<Notify>>>);

/// One handshake in flight (see [`Handshakes::start`]), booked until dropped.
#[derive(Debug)]
pub(crate) struct HandshakeSlot<'a> {
    book: &'a Handshakes,
    id: u64,
    evict: Arc<Notify>,
    /// Whether this attempt took the slot of another (which is told to give up).
    pub evicted_another: bool,
}

impl Handshakes {
    /// A slot for one more handshake from `ip` (see [`HandshakeBook::book`]); an evicted
    /// attempt is woken to give up its handshake.
    pub fn start(&self, ip: IpAddr, validated: bool, limits: &Limits) -> Result<HandshakeSlot<'_>, NoSlot> {
        let evict = Arc::new(Notify::new());
        let booked = self.book().book(ip, validated, Arc::clone(&evict), limits)?;
        // `notify_one` keeps a permit, so an attempt evicted before it waits still sees it.
        let evicted_another = booked.evicted.inspect(|other| other.notify_one()).is_some();
        Ok(HandshakeSlot { book: self, id: booked.id, evict, evicted_another })
    }

    /// Whether a new attempt whose address is not validated must prove it first.
    pub fn need_validation(&self, limits: &Limits) -> bool {
        self.book().needs_validation(limits)
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> u32 {
        u32::try_from(self.book().len()).unwrap_or(u32::MAX)
    }

    fn book(&self) -> MutexGuard<'_, HandshakeBook<Arc<Notify>>> {
        // A panic while the lock is held would leave plain map state, still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HandshakeSlot<'_> {
    /// Resolves when a validated attempt took this slot.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.book.book().finish(self.id);
    }
}

/// Why an attempt got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoSlot {
    /// Its source already holds `max_handshakes_per_source`.
    PerSource,
    /// `max_handshakes_in_flight` are taken and none may give way to it.
    InFlight,
}

/// A booked attempt and, if one gave way to it, the payload of the evicted one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Booked<T> {
    pub id: u64,
    pub evicted: Option<T>,
}

/// One attempt in flight.
#[derive(Debug)]
struct Attempt<T> {
    source: IpAddr,
    validated: bool,
    payload: T,
}

/// The attempts in flight, oldest first, and how many each source holds.
#[derive(Debug)]
pub(crate) struct HandshakeBook<T> {
    next: u64,
    attempts: BTreeMap<u64, Attempt<T>>,
    per_source: HashMap<IpAddr, u32>,
}

impl<T> Default for HandshakeBook<T> {
    fn default() -> Self {
        Self { next: 0, attempts: BTreeMap::new(), per_source: HashMap::new() }
    }
}

impl<T> HandshakeBook<T> {
    /// Books an attempt from `ip` (`validated`: its address is proven, by a Retry token), or
    /// says why it gets no slot (see the module docs).
    pub fn book(
        &mut self,
        ip: IpAddr,
        validated: bool,
        payload: T,
        limits: &Limits,
    ) -> Result<Booked<T>, NoSlot> {
        let source = rate_key(ip, limits.new_connections_ipv6_prefix);
        let per_source = limits.max_handshakes_per_source;
        if per_source > 0 && self.per_source.get(&source).copied().unwrap_or(0) >= per_source {
            return Err(NoSlot::PerSource);
        }
        let cap = limits.max_handshakes_in_flight as usize;
        let mut evicted = None;
        if cap > 0 && self.attempts.len() >= cap {
            let oldest = validated
                .then(|| self.attempts.iter().find(|(_, a)| !a.validated).map(|(id, _)| *id))
                .flatten();
            let Some(oldest) = oldest else { return Err(NoSlot::InFlight) };
            evicted = self.finish(oldest);
        }
        let id = self.next;
        self.next = self.next.wrapping_add(1);
        *self.per_source.entry(source).or_insert(0) += 1;
        self.attempts.insert(id, Attempt { source, validated, payload });
        Ok(Booked { id, evicted })
    }

    /// Ends attempt `id` (completed, failed, timed out or evicted); its payload if it was still
    /// booked.
    pub fn finish(&mut self, id: u64) -> Option<T> {
        let attempt = self.attempts.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&attempt.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&attempt.source);
            }
        }
        Some(attempt.payload)
    }

    /// Attempts in flight.
    pub fn len(&self) -> usize {
        self.attempts.len()
    }

    /// Whether a new attempt whose address is not validated must prove it first: at least
    /// `validate_above_handshakes_in_flight` are in flight (0: never on this ground).
    pub fn needs_validation(&self, limits: &Limits) -> bool {
        let share = limits.validate_above_handshakes_in_flight as usize;
        share > 0 && self.attempts.len() >= share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cap: u32, per_source: u32) -> Limits {
        Limits { max_handshakes_in_flight: cap, max_handshakes_per_source: per_source, ..Limits::default() }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_source_holds_at_most_its_share_and_a_finished_one_frees_it() {
        let mut book = HandshakeBook::default();
        let l = limits(10, 2);
        let first = book.book(ip(1), false, 'a', &l).unwrap();
        book.book(ip(1), false, 'b', &l).unwrap();
        assert_eq!(book.book(ip(1), true, 'c', &l), Err(NoSlot::PerSource));
        assert!(book.book(ip(2), false, 'd', &l).is_ok(), "another source is not held back");
        assert_eq!(book.finish(first.id), Some('a'));
        assert_eq!(book.finish(first.id), None, "finished once");
        assert!(book.book(ip(1), false, 'e', &l).is_ok());
    }

    #[test]
    fn one_ipv6_prefix_is_one_source() {
        let mut book = HandshakeBook::default();
        let l = limits(10, 1);
        book.book("2001:db8::1".parse().unwrap(), false, (), &l).unwrap();
        assert_eq!(book.book("2001:db8::2".parse().unwrap(), false, (), &l), Err(NoSlot::PerSource));
        assert!(book.book("2001:db8:0:1::1".parse().unwrap(), false, (), &l).is_ok());
    }

    #[test]
    fn when_full_a_validated_attempt_evicts_the_oldest_unvalidated_one() {
        let mut book = HandshakeBook::default();
        let l = limits(3, 0);
        book.book(ip(1), true, 'v', &l).unwrap();
        book.book(ip(2), false, 'o', &l).unwrap();
        book.book(ip(3), false, 'n', &l).unwrap();
        assert_eq!(
            book.book(ip(4), false, 'x', &l),
            Err(NoSlot::InFlight),
            "an unvalidated one never evicts"
        );
        assert_eq!(book.book(ip(4), true, 'y', &l).unwrap().evicted, Some('o'), "the oldest unvalidated");
        assert_eq!(book.book(ip(5), true, 'z', &l).unwrap().evicted, Some('n'));
        assert_eq!(book.len(), 3);
        assert_eq!(book.book(ip(6), true, 'w', &l), Err(NoSlot::InFlight), "validated ones stay");
        assert!(book.book(ip(2), false, 'p', &l).is_err());
    }

    #[test]
    fn validation_is_asked_from_the_share_on_and_never_when_off() {
        let mut book = HandshakeBook::default();
        let l = Limits { validate_above_handshakes_in_flight: 2, ..limits(0, 0) };
        assert!(!book.needs_validation(&l));
        book.book(ip(1), false, (), &l).unwrap();
        assert!(!book.needs_validation(&l));
        book.book(ip(2), false, (), &l).unwrap();
        assert!(book.needs_validation(&l));
        assert!(!book.needs_validation(&Limits { validate_above_handshakes_in_flight: 0, ..l }));
    }
}
