//! Recently verified tokens, keyed by the SHA-256 of the token (never the token itself), each
//! valid until its `exp` (+ leeway). Bounded: a full shard first drops expired entries, then
//! is cleared.
//!
//! The key is already a cryptographic digest, so its own bytes pick the shard (byte 0) and
//! are the table's hash (bytes 8..16): nothing is hashed a second time. Only verified tokens
//! are inserted, so nobody can fill a shard with chosen keys.

use std::sync::Arc;

use hashbrown::HashTable;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::Verified;

const SHARDS: usize = 16;

struct Entry {
    key: [u8; 32],
    exp: u64,
    verified: Arc<Verified>,
}

pub struct VerifiedCache {
    shards: Vec<Mutex<HashTable<Entry>>>,
    per_shard: usize,
}

/// The table hash of a key: eight of the digest's bytes other than the shard's.
fn hash_of(key: &[u8; 32]) -> u64 {
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&key[8..16]);
    u64::from_le_bytes(eight)
}

impl VerifiedCache {
    pub fn new(size: usize) -> VerifiedCache {
        VerifiedCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard: size.div_ceil(SHARDS).max(1),
        }
    }

    fn key(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    pub fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Arc<Verified>> {
        let key = Self::key(token);
        let mut shard = self.shards[key[0] as usize % SHARDS].lock();
        let hash = hash_of(&key);
        match shard.find_entry(hash, |e| e.key == key) {
            Ok(e) if now <= e.get().exp.saturating_add(leeway) => {
                Some(Arc::clone(&e.get().verified))
            }
            Ok(e) => {
                e.remove();
                None
            }
            Err(_) => None,
        }
    }

    pub fn insert(&self, token: &str, exp: u64, verified: &Arc<Verified>) {
        let key = Self::key(token);
        let mut shard = self.shards[key[0] as usize % SHARDS].lock();
        if shard.len() >= self.per_shard {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            shard.retain(|e| e.exp > now);
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        let entry = Entry {
            key,
            exp,
            verified: Arc::clone(verified),
        };
        match shard.entry(hash_of(&key), |e| e.key == key, |e| hash_of(&e.key)) {
            hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = entry,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Principal;

    fn verified(sub: &str) -> Arc<Verified> {
        Arc::new(Verified {
            principal: Principal {
                subject: Some(sub.to_string()),
                ..Principal::default()
            },
            forwarded: Vec::new(),
        })
    }

    fn subject(v: Option<Arc<Verified>>) -> Option<String> {
        v.and_then(|v| v.principal.subject.clone())
    }

    #[test]
    fn a_token_is_remembered_until_its_exp_plus_leeway() {
        let cache = VerifiedCache::new(100);
        assert!(cache.get("token-a", 1_000, 0).is_none());
        cache.insert("token-a", 1_000, &verified("alice"));
        cache.insert("token-b", 1_000, &verified("bob"));
        assert_eq!(subject(cache.get("token-a", 1_000, 0)).as_deref(), Some("alice"));
        assert_eq!(subject(cache.get("token-b", 1_030, 30)).as_deref(), Some("bob"));
        // Past exp + leeway: gone, and removed (a later, smaller `now` finds nothing either).
        assert!(cache.get("token-a", 1_031, 30).is_none());
        assert!(cache.get("token-a", 900, 0).is_none());
        // Inserting a token again replaces its entry.
        cache.insert("token-b", 2_000, &verified("bob-2"));
        assert_eq!(subject(cache.get("token-b", 1_500, 0)).as_deref(), Some("bob-2"));
    }

    #[test]
    fn each_shard_is_bounded() {
        let cache = VerifiedCache::new(SHARDS * 4);
        let far = u64::MAX / 2;
        for i in 0..10_000 {
            cache.insert(&format!("token-{i}"), far, &verified("x"));
        }
        for shard in &cache.shards {
            assert!(shard.lock().len() <= 4);
        }
        // The last token inserted is found.
        assert!(cache.get("token-9999", 0, 0).is_some());
    }
}
