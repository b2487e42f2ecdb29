//! Which keys a store that started empty holds: every key this process wrote
//! to it, as a Bloom filter over the keys' 64-bit hashes.
//!
//! A key the filter has never seen was never written, so a batch treats it as
//! new without a lookup; a key it may have seen is looked up. A false
//! positive costs one lookup of a key that is not there, never a wrong
//! answer; a false negative would be a wrong answer, and there are none (the
//! property test below). The filter has a fixed size, so absence stays known
//! however many keys the store gets: the set of hashes it replaces (18 bytes a
//! key) was given up past half the budget, 466,000 keys at the default, a
//! third of the way into the 1M backlog's first phase, and every later new row
//! and identifier was then looked up for nothing.

/// Bits each key sets (and a lookup tests).
const PROBES: u64 = 4;

/// A fixed-size Bloom filter of key hashes; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct KnownKeys {
    words: Vec<u64>,
}

impl KnownKeys {
    /// An empty filter of about `bytes` (a power of two, at least 4 KiB).
    pub(crate) fn with_bytes(bytes: usize) -> KnownKeys {
        let bytes = bytes.max(4096);
        let bytes = 1usize << (usize::BITS - 1 - bytes.leading_zeros());
        KnownKeys {
            words: vec![0; bytes / 8],
        }
    }

    /// No keys, and no memory.
    pub(crate) fn none() -> KnownKeys {
        KnownKeys::default()
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Records a key's hash.
    pub(crate) fn insert(&mut self, hash: u64) {
        if self.words.is_empty() {
            return;
        }
        let mask = self.words.len() as u64 * 64 - 1;
        for bit in positions(hash, mask) {
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// Whether a key with this hash may have been recorded (false: it was not).
    pub(crate) fn may_contain(&self, hash: u64) -> bool {
        if self.words.is_empty() {
            return false;
        }
        let mask = self.words.len() as u64 * 64 - 1;
        positions(hash, mask).all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// The bits of a key: double hashing of the two halves of its 64-bit hash
/// (the second made odd, so the probes differ in a power-of-two table).
fn positions(hash: u64, mask: u64) -> impl Iterator<Item = u64> {
    let step = hash.rotate_left(32) | 1;
    (0..PROBES).map(move |i| hash.wrapping_add(i.wrapping_mul(step)) & mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::hash::BuildHasher;

    fn hash(k: u64) -> u64 {
        foldhash::fast::FixedState::with_seed(7).hash_one(k)
    }

    proptest! {
        /// Every recorded key is reported as possibly present, whatever the
        /// keys and however full the filter (a miss here would make a batch
        /// insert a row the store already holds).
        #[test]
        fn a_recorded_key_is_never_reported_absent(
            keys in prop::collection::vec(any::<u64>(), 0..5000),
            bytes in 0usize..20_000,
        ) {
            let mut k = KnownKeys::with_bytes(bytes);
            for key in &keys {
                k.insert(*key);
            }
            for key in &keys {
                prop_assert!(k.may_contain(*key));
            }
        }
    }

    #[test]
    fn absence_stays_known_far_past_what_a_set_of_hashes_held() {
        // 2 MiB, as for the default 16 MB budget; the 1M backlog writes
        // 1,250,000 keys.
        let mut k = KnownKeys::with_bytes(2 << 20);
        assert_eq!(k.bytes(), 2 << 20);
        for key in 0..1_250_000u64 {
            k.insert(hash(key));
        }
        let false_positives = (1_250_000..1_350_000u64)
            .filter(|key| k.may_contain(hash(*key)))
            .count();
        assert!(
            false_positives < 2_000,
            "{false_positives} of 100,000 new keys would be looked up"
        );
        assert!(!KnownKeys::none().may_contain(hash(1)));
    }
}
