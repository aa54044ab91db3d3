//! Deterministic pseudo-random payloads: the same `(len, seed)` gives the same bytes in every
//! test and every run, so a receiver can check what it got by regenerating it, and nothing in the
//! path (QUIC, TLS, a NAT) can compress or deduplicate them.

/// `len` bytes of xorshift64 (shifts 13, 7, 17) started from `seed | 1` (xorshift must not start
/// at zero), each state written little-endian. The sequence is part of the contract: tests
/// regenerate blocks to verify echoes, and the netbed writes a blob the hub's service serves.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::payload;

    #[test]
    fn the_byte_sequence_is_pinned() {
        // Computed with the generator as e2e, netbed and the load generator each had it.
        assert_eq!(payload(12, 1), PINNED_SEED_1);
        assert_eq!(payload(8, 0x9e37_79b9_7f4a_7c15), PINNED_LOADTEST);
    }

    #[test]
    fn lengths_are_exact_and_prefixes_agree() {
        for len in [0, 1, 7, 8, 9, 1000] {
            assert_eq!(payload(len, 42).len(), len);
        }
        assert_eq!(payload(1000, 42)[..333], payload(333, 42)[..]);
        assert_ne!(payload(64, 1), payload(64, 2));
        // Seeds that differ only in the lowest bit start from the same state.
        assert_eq!(payload(64, 6), payload(64, 7));
    }

    const PINNED_SEED_1: [u8; 12] = [65, 32, 130, 64, 0, 0, 0, 0, 65, 20, 1, 12];
    /// The seed the load generator's blocks use.
    const PINNED_LOADTEST: [u8; 8] = [173, 77, 243, 11, 174, 119, 27, 220];
}
