//! The local store: sliding-window counters per key in a sharded map of bounded size.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use parking_lot::Mutex;

use super::window::{admits, describe, Decision, Policy};

const SHARDS: usize = 16;

#[derive(Debug, Clone)]
struct Counters {
    key: String,
    /// The key's hash (SipHash with this store's random keys: clients choose the keys).
    hash: u64,
    window_id: u64,
    prev: u64,
    curr: u64,
}

/// Per-key counters; memory is bounded by `max_keys` whatever keys clients send.
/// A key is hashed once: bits 32..36 of its hash pick the shard, and the shard's table uses
/// the same hash (its low bits and top seven, never the shard's).
pub struct LocalStore {
    shards: Vec<Mutex<HashTable<Counters>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl LocalStore {
    pub fn new(max_keys: usize) -> LocalStore {
        LocalStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Counts one request for `key` at `now_ms` (Unix milliseconds) if it fits.
    pub fn hit(&self, policy: &Policy, key: &str, now_ms: u64) -> Decision {
        let window = policy.window_ms.max(1);
        let id = now_ms / window;
        let elapsed = now_ms % window;
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash >> 32) as usize) % SHARDS];
        let mut map = shard.lock();
        // A known key (the usual case) costs one lookup; a new one a second to insert it.
        if let Some(c) = map.find_mut(hash, |c| c.key == key) {
            return count(policy, c, id, elapsed);
        }
        if map.len() >= self.per_shard {
            evict(&mut map, id, self.per_shard);
        }
        let c = map
            .insert_unique(
                hash,
                Counters {
                    key: key.to_string(),
                    hash,
                    window_id: id,
                    prev: 0,
                    curr: 0,
                },
                |c| c.hash,
            )
            .into_mut();
        count(policy, c, id, elapsed)
    }

    /// Number of tracked keys.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Moves `c` into window `id` and counts one request if the policy admits it.
fn count(policy: &Policy, c: &mut Counters, id: u64, elapsed: u64) -> Decision {
    if c.window_id != id {
        c.prev = if c.window_id + 1 == id { c.curr } else { 0 };
        c.curr = 0;
        c.window_id = id;
    }
    let allowed = admits(policy, c.prev, c.curr, elapsed);
    if allowed {
        c.curr += 1;
    }
    describe(policy, allowed, c.prev, c.curr, elapsed)
}

/// Makes room: first forget keys idle for two windows (they count nothing any more), then,
/// under a flood of fresh keys, the ones with the least recent window.
fn evict(map: &mut HashTable<Counters>, id: u64, cap: usize) {
    map.retain(|c| c.window_id + 1 >= id);
    if map.len() < cap {
        return;
    }
    let excess = map.len() + 1 - cap.saturating_sub(cap / 8);
    // The `excess` oldest go: every key older than the `excess`-th oldest window, then as
    // many of that window's as are still needed.
    let mut ages: Vec<u64> = map.iter().map(|c| c.window_id).collect();
    ages.sort_unstable();
    let Some(&cut) = ages.get(excess - 1) else {
        map.clear();
        return;
    };
    let mut ties = excess - ages.partition_point(|&a| a < cut);
    map.retain(|c| {
        if c.window_id < cut {
            false
        } else if c.window_id == cut && ties > 0 {
            ties -= 1;
            false
        } else {
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        quota: 3,
        ceiling: 3,
        window_ms: 1_000,
    };

    #[test]
    fn keys_are_independent() {
        let s = LocalStore::new(100);
        assert!((0..3).all(|_| s.hit(&P, "a", 10).allowed));
        assert!(!s.hit(&P, "a", 10).allowed);
        assert!(s.hit(&P, "b", 10).allowed);
    }

    #[test]
    fn eviction_drops_the_least_recent_windows_first() {
        let mut map = HashTable::new();
        let hasher = std::collections::hash_map::RandomState::new();
        for (i, window_id) in [7, 9, 8, 9, 7, 9, 8, 9].into_iter().enumerate() {
            let key = format!("k{i}");
            let hash = hasher.hash_one(&key);
            map.insert_unique(
                hash,
                Counters {
                    key,
                    hash,
                    window_id,
                    prev: 0,
                    curr: 0,
                },
                |c| c.hash,
            );
        }
        // Window 9 now: nothing is idle for two windows except window 7's keys.
        evict(&mut map, 9, 8);
        let mut left: Vec<u64> = map.iter().map(|c| c.window_id).collect();
        left.sort_unstable();
        assert_eq!(left, [8, 8, 9, 9, 9, 9]);
        // Full again: cap 6 makes room for one more plus an eighth, oldest first, ties split.
        evict(&mut map, 9, 6);
        let mut left: Vec<u64> = map.iter().map(|c| c.window_id).collect();
        left.sort_unstable();
        assert_eq!(left, [8, 9, 9, 9, 9]);
        evict(&mut map, 9, 3);
        let mut left: Vec<u64> = map.iter().map(|c| c.window_id).collect();
        left.sort_unstable();
        assert_eq!(left, [9, 9]);
    }

    #[test]
    fn memory_is_bounded_under_a_key_flood() {
        let s = LocalStore::new(1_000);
        for i in 0..50_000 {
            s.hit(&P, &format!("attacker-{i}"), 5);
        }
        assert!(s.len() <= 1_000 + SHARDS, "{}", s.len());
        // A legitimate key seen now is still counted.
        assert!(s.hit(&P, "alice", 5).allowed);
        assert_eq!(s.hit(&P, "alice", 5).remaining, 1);
    }
}
