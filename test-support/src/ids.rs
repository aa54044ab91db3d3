//! Test identities and hub names. Keys are derived from seeds, never drawn at random, so a
//! failing run can be replayed with the same keys; within one process every [`identity`] is
//! distinct, and [`identity_for`] gives the same key for the same `(purpose, index)` anywhere.

use std::sync::atomic::{AtomicU32, Ordering};

use keyway_proto::{HubName, Identity};

/// The `purpose` that [`fresh_seed`] draws from; deterministic callers use any other.
pub const FRESH: u8 = 0xfe;

static NEXT: AtomicU32 = AtomicU32::new(1);

/// The seed of `(purpose, index)`: a tag byte, `purpose`, then `index` little-endian. The load
/// generator relies on this layout staying put (reruns use the same hub keys).
pub fn seed_for(purpose: u8, index: u32) -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[0] = 0x10;
    seed[1] = purpose;
    seed[2..6].copy_from_slice(&index.to_le_bytes());
    seed
}

/// The identity of `(purpose, index)`: reruns and repeated calls get the same key, distinct
/// purposes never collide.
pub fn identity_for(purpose: u8, index: u32) -> Identity {
    Identity::from_seed(seed_for(purpose, index))
}

/// A seed no other call in this process gets (for a key a test must recreate, e.g. a relay
/// restarted as "the same relay").
pub fn fresh_seed() -> [u8; 32] {
    seed_for(FRESH, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A fresh identity, distinct from every other [`identity`] and [`fresh_seed`] in this process.
pub fn identity() -> Identity {
    Identity::from_seed(fresh_seed())
}

/// A hub name from a literal that is valid by construction.
pub fn name(s: &str) -> HubName {
    HubName::new(s).expect("valid test hub name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_identities_are_distinct_and_fixed_ones_repeat() {
        assert_ne!(identity().public_key(), identity().public_key());
        assert_eq!(identity_for(4, 7).public_key(), identity_for(4, 7).public_key());
        assert_ne!(identity_for(4, 7).public_key(), identity_for(5, 7).public_key());
        assert_ne!(identity_for(4, 7).public_key(), identity_for(4, 8).public_key());
    }
}
