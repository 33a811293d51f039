//! Slots of recent values, in front of a moka cache: a few keys are most of the requests, and
//! a key asked again finds its value in its slot with a lock and a key comparison, where
//! moka's lookup also reads the clock and queues the read for its eviction policy (about 900
//! instructions on every cached request).
//!
//! A slot holds its value *weakly*, so that the cache alone decides what stays: a value the
//! cache dropped and freed is not served from a slot (moka frees a removed value once
//! crossbeam-epoch collects it, so until then a slot may still find it; callers check what
//! they find against its source or generation), and keeps only its allocation's header alive
//! there, beside the slot's copy of its key, until the slot is taken again. So beyond the
//! slots themselves a cache's slots hold at most [`SLOTS`] keys the cache may have let go.
//! One hit in [`TOLD_EVERY`] is to be looked up in the cache as well, so that its policy (and
//! idle time) sees the key in use.
//!
//! Each value is kept under its owner's generation, a number the owner moves on whenever
//! what it kept may no longer hold (an invalidation): a slot kept under another generation
//! is passed by.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::middleware::KeyHasher;

/// Slots per owner: a pointer, a key, a generation and a lock each.
pub const SLOTS: usize = 512;

/// One hit in this many found in a slot is to be looked up in the cache as well.
pub const TOLD_EVERY: u32 = 16;

/// The slots of one cache.
pub struct Recent<K, V> {
    slots: Box<[Mutex<Slot<K, V>>]>,
    /// Picks a key's slot. Seeded per process, so clients cannot aim keys at one slot.
    hasher: KeyHasher,
}

/// The value last found or kept for the keys of one slot.
struct Slot<K, V> {
    key: Option<K>,
    generation: u64,
    value: Weak<V>,
    /// Hits since the value was kept, so that every [`TOLD_EVERY`]th is told to the cache.
    hits: u32,
}

/// A value found in its slot.
pub struct Hit<V> {
    pub value: Arc<V>,
    /// Whether the cache should be told of this hit (looked up as well).
    pub tell: bool,
}

impl<K: Hash + Eq + Clone, V> Recent<K, V> {
    /// [`SLOTS`] empty slots.
    pub fn new() -> Self {
        Self::with_slots(SLOTS)
    }

    /// `slots` empty slots; at least one.
    pub fn with_slots(slots: usize) -> Self {
        Self {
            slots: (0..slots.max(1))
                .map(|_| {
                    Mutex::new(Slot {
                        key: None,
                        generation: 0,
                        value: Weak::new(),
                        hits: 0,
                    })
                })
                .collect(),
            hasher: KeyHasher::default(),
        }
    }

    /// `key`'s value, unless its slot went to another key, was kept under another
    /// generation than `generation`, or the cache dropped the value.
    pub fn get<Q>(&self, key: &Q, generation: u64) -> Option<Hit<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut slot = lock(self.slot(key));
        if slot.key.as_ref().map(Borrow::borrow) != Some(key) || slot.generation != generation {
            return None;
        }
        let value = slot.value.upgrade()?;
        slot.hits = slot.hits.wrapping_add(1);
        Some(Hit {
            value,
            tell: slot.hits % TOLD_EVERY == 0,
        })
    }

    /// Keeps `value`, found in the cache or stored in it, under `generation` (read before
    /// the cache was), in `key`'s slot.
    pub fn keep(&self, key: &K, value: &Arc<V>, generation: u64) {
        let mut slot = lock(self.slot(key));
        if slot.key.as_ref() != Some(key) {
            slot.key = Some(key.clone());
        }
        slot.generation = generation;
        slot.value = Arc::downgrade(value);
        slot.hits = 0;
    }

    fn slot<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<Slot<K, V>> {
        &self.slots[self.hasher.hash_one(key) as usize % self.slots.len()]
    }
}

impl<K: Hash + Eq + Clone, V> Default for Recent<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Every change to a slot is a few plain stores: consistent whatever panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_value_is_found_under_its_key_and_generation_only() {
        let recent: Recent<String, u32> = Recent::new();
        let value = Arc::new(7);
        recent.keep(&"a".into(), &value, 3);
        assert_eq!(recent.get("a", 3).map(|hit| *hit.value), Some(7));
        assert!(
            recent.get("a", 4).is_none(),
            "kept under another generation"
        );
        assert!(recent.get("b", 3).is_none(), "another key");
    }

    #[test]
    fn keys_sharing_a_slot_take_it_from_each_other() {
        let recent: Recent<String, u32> = Recent::with_slots(1);
        let (a, b) = (Arc::new(1), Arc::new(2));
        recent.keep(&"a".into(), &a, 0);
        recent.keep(&"b".into(), &b, 0);
        assert!(recent.get("a", 0).is_none(), "b took a's slot");
        assert_eq!(recent.get("b", 0).map(|hit| *hit.value), Some(2));
    }

    #[test]
    fn a_value_the_cache_dropped_is_not_found() {
        let recent: Recent<String, u32> = Recent::new();
        let value = Arc::new(7);
        recent.keep(&"a".into(), &value, 0);
        drop(value);
        assert!(recent.get("a", 0).is_none());
    }

    #[test]
    fn every_sixteenth_hit_is_told_to_the_cache() {
        let recent: Recent<String, u32> = Recent::new();
        let value = Arc::new(7);
        recent.keep(&"a".into(), &value, 0);
        let told = (0..3 * TOLD_EVERY)
            .filter(|_| recent.get("a", 0).is_some_and(|hit| hit.tell))
            .count();
        assert_eq!(told, 3);
        recent.keep(&"a".into(), &value, 0);
        assert!(
            !recent.get("a", 0).is_some_and(|hit| hit.tell),
            "kept again: counting starts over"
        );
    }
}
