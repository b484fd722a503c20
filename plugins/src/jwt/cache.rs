//! Recently verified tokens, keyed by the SHA-256 of the token (never the token itself), each
//! valid until its `exp` (+ leeway). Bounded: a full shard first drops expired entries, then
//! is cleared.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::Verified;

const SHARDS: usize = 16;

struct Entry {
    exp: u64,
    verified: Arc<Verified>,
}

pub struct VerifiedCache {
    shards: Vec<Mutex<HashMap<[u8; 32], Entry>>>,
    per_shard: usize,
}

impl VerifiedCache {
    pub fn new(size: usize) -> VerifiedCache {
        VerifiedCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: size.div_ceil(SHARDS).max(1),
        }
    }

    fn key(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    pub fn get(&self, token: &str, now: u64, leeway: u64) -> Option<Arc<Verified>> {
        let key = Self::key(token);
        let mut shard = self.shards[key[0] as usize % SHARDS].lock();
        match shard.get(&key) {
            Some(e) if now <= e.exp.saturating_add(leeway) => Some(Arc::clone(&e.verified)),
            Some(_) => {
                shard.remove(&key);
                None
            }
            None => None,
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
            shard.retain(|_, e| e.exp > now);
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(
            key,
            Entry {
                exp,
                verified: Arc::clone(verified),
            },
        );
    }
}
