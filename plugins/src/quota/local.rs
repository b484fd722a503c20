//! The local store: sliding-window counters per key in a sharded map of bounded size.

use std::collections::HashMap;
use std::hash::BuildHasher;

use parking_lot::Mutex;

use super::window::{admits, describe, Decision, Policy};

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Counters {
    window_id: u64,
    prev: u64,
    curr: u64,
}

/// Per-key counters; memory is bounded by `max_keys` whatever keys clients send.
pub struct LocalStore {
    shards: Vec<Mutex<HashMap<String, Counters>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl LocalStore {
    pub fn new(max_keys: usize) -> LocalStore {
        LocalStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Counts one request for `key` at `now_ms` (Unix milliseconds) if it fits.
    pub fn hit(&self, policy: &Policy, key: &str, now_ms: u64) -> Decision {
        let window = policy.window_ms.max(1);
        let id = now_ms / window;
        let elapsed = now_ms % window;
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut map = shard.lock();
        // A known key (the usual case) costs one lookup; a new one a second to insert it.
        if let Some(c) = map.get_mut(key) {
            return count(policy, c, id, elapsed);
        }
        if map.len() >= self.per_shard {
            evict(&mut map, id, self.per_shard);
        }
        let c = map.entry(key.to_string()).or_insert(Counters {
            window_id: id,
            prev: 0,
            curr: 0,
        });
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
fn evict(map: &mut HashMap<String, Counters>, id: u64, cap: usize) {
    map.retain(|_, c| c.window_id + 1 >= id);
    if map.len() < cap {
        return;
    }
    let excess = map.len() + 1 - cap.saturating_sub(cap / 8);
    let mut by_age: Vec<(u64, String)> =
        map.iter().map(|(k, c)| (c.window_id, k.clone())).collect();
    by_age.sort_unstable();
    for (_, k) in by_age.into_iter().take(excess) {
        map.remove(&k);
    }
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
