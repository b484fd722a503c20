//! Server-side sessions: in this gateway's memory, or in Redis for a fleet. A session is
//! stored under the SHA-256 of its id, so neither a memory dump nor a Redis `KEYS` reveals a
//! cookie that would open it. Each entry expires by itself (idle timeout, at most the
//! absolute one); sessions are also indexed by the provider's `sid` and the subject, so a
//! back-channel logout finds them.

use std::num::NonZeroUsize;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::redis_conn::{RedisConnector, RedisTarget};

/// One signed-in browser.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    pub subject: String,
    /// The provider's session id (`sid` of the ID token), for back-channel logout.
    #[serde(default)]
    pub idp_sid: Option<String>,
    /// The ID token's claims (the principal's claims; `user` shows the profile ones).
    pub claims: Map<String, Value>,
    pub id_token: String,
    pub access_token: String,
    /// Unix seconds.
    pub access_expires_at: u64,
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub last_seen: u64,
    /// Bumped by every update: an update applies only to the version it read, so a slower
    /// writer never restores a logged-out session or a spent refresh token.
    #[serde(default)]
    pub version: u64,
}

pub enum Store {
    Memory(MemoryStore),
    Redis(Box<RedisSessions>),
}

impl Store {
    pub async fn get(&self, key: &str) -> Result<Option<SessionRecord>, String> {
        match self {
            Store::Memory(m) => Ok(m.get(key)),
            Store::Redis(r) => r.get(key).await,
        }
    }

    /// Stores (or replaces) a session for `ttl`.
    pub async fn put(&self, key: &str, rec: &SessionRecord, ttl: Duration) -> Result<(), String> {
        match self {
            Store::Memory(m) => {
                m.put(key, rec);
                Ok(())
            }
            Store::Redis(r) => r.put(key, rec, ttl).await,
        }
    }

    /// Replaces the session only if it still exists at `rec.version - 1` (`rec` carries the
    /// bumped version). `Ok(false)`: it was deleted or changed meanwhile.
    pub async fn update(
        &self,
        key: &str,
        rec: &SessionRecord,
        ttl: Duration,
    ) -> Result<bool, String> {
        match self {
            Store::Memory(m) => Ok(m.update(key, rec)),
            Store::Redis(r) => r.update(key, rec, ttl).await,
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), String> {
        match self {
            Store::Memory(m) => {
                m.delete(key);
                Ok(())
            }
            Store::Redis(r) => r.delete(key).await,
        }
    }

    /// Records a one-time token id (a logout token's `jti`) for `ttl`; `Ok(false)` when it
    /// was seen before.
    pub async fn first_use(&self, id: &str, ttl: Duration) -> Result<bool, String> {
        match self {
            Store::Memory(m) => Ok(m.first_use(id)),
            Store::Redis(r) => r.first_use(id, ttl).await,
        }
    }

    /// Takes the fleet-wide lock of a session's refresh (Redis); the memory store needs none
    /// (the plugin serialises refreshes in-process). `Ok(false)`: another gateway holds it.
    pub async fn lock(&self, key: &str, ttl: Duration) -> Result<bool, String> {
        match self {
            Store::Memory(_) => Ok(true),
            Store::Redis(r) => r.lock(key, ttl).await,
        }
    }

    pub async fn unlock(&self, key: &str) {
        if let Store::Redis(r) = self {
            let _ = r.unlock(key).await;
        }
    }

    /// Ends every session of the provider session `sid`, or of `subject` when no `sid` is
    /// given. Returns how many ended.
    pub async fn delete_matching(
        &self,
        sid: Option<&str>,
        subject: Option<&str>,
    ) -> Result<usize, String> {
        match self {
            Store::Memory(m) => Ok(m.delete_matching(sid, subject)),
            Store::Redis(r) => r.delete_matching(sid, subject).await,
        }
    }
}

/// Sessions in this process, the least recently used dropped first beyond `max`. Expiry is
/// checked on read (the plugin compares the record's times), so no sweeper is needed.
pub struct MemoryStore {
    map: Mutex<lru::LruCache<String, SessionRecord>>,
    /// Logout token ids seen (bounded; a token also expires within minutes).
    used: Mutex<lru::LruCache<String, ()>>,
}

/// Logout token ids a memory store remembers.
const USED_IDS: usize = 10_000;

impl MemoryStore {
    pub fn new(max: usize) -> MemoryStore {
        MemoryStore {
            map: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(max).unwrap_or(NonZeroUsize::MIN),
            )),
            used: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(USED_IDS).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn update(&self, key: &str, rec: &SessionRecord) -> bool {
        let mut map = self.map.lock();
        match map.get_mut(key) {
            Some(current) if current.version.saturating_add(1) == rec.version => {
                *current = rec.clone();
                true
            }
            _ => false,
        }
    }

    fn first_use(&self, id: &str) -> bool {
        self.used.lock().put(id.to_string(), ()).is_none()
    }

    fn get(&self, key: &str) -> Option<SessionRecord> {
        self.map.lock().get(key).cloned()
    }

    fn put(&self, key: &str, rec: &SessionRecord) {
        self.map.lock().put(key.to_string(), rec.clone());
    }

    fn delete(&self, key: &str) {
        self.map.lock().pop(key);
    }

    fn delete_matching(&self, sid: Option<&str>, subject: Option<&str>) -> usize {
        let mut map = self.map.lock();
        let keys: Vec<String> = map
            .iter()
            .filter(|(_, r)| matches_logout(r, sid, subject))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            map.pop(k);
        }
        keys.len()
    }
}

/// What a back-channel logout token names: its `sid` when it has one, else its `sub`.
fn matches_logout(r: &SessionRecord, sid: Option<&str>, subject: Option<&str>) -> bool {
    match (sid, subject) {
        (Some(sid), _) => r.idp_sid.as_deref() == Some(sid),
        (None, Some(sub)) => r.subject == sub,
        (None, None) => false,
    }
}

/// Replaces `KEYS[1]` with `ARGV[1]` (TTL `ARGV[3]` ms) only when it exists at version
/// `ARGV[2]`.
const UPDATE: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local v = cjson.decode(cur).version or 0
if v ~= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
";

/// Deletes session `KEYS[1]` and its key `ARGV[2]` from its index sets under prefix `ARGV[1]`.
const DELETE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local r = cjson.decode(cur)
  redis.call('SREM', ARGV[1] .. ':sub:' .. r.subject, ARGV[2])
  if type(r.idp_sid) == 'string' then
    redis.call('SREM', ARGV[1] .. ':sid:' .. r.idp_sid, ARGV[2])
  end
end
return redis.call('DEL', KEYS[1])
";

/// Sessions in Redis: `PREFIX:s:KEY` holds the record as JSON with the session's TTL;
/// `PREFIX:sid:SID` and `PREFIX:sub:SUBJECT` are sets of session keys (for back-channel
/// logout), kept as long as the longest session in them; `PREFIX:jti:ID` marks a used logout
/// token; `PREFIX:lock:KEY` is a refresh under way. On a Redis Cluster the prefix is written
/// `{PREFIX}`, a hash tag: every key of a plugin lives in one slot, so a session and its index
/// sets change together (sessions are few next to quota decisions; one slot carries them).
pub struct RedisSessions {
    redis: RedisConnector,
    prefix: String,
    /// Longest a session lives (the index sets' TTL).
    absolute: Duration,
}

impl RedisSessions {
    pub fn new(
        target: &RedisTarget,
        timeout: Duration,
        prefix: String,
        absolute: Duration,
    ) -> Result<RedisSessions, String> {
        // On a cluster the prefix is a hash tag, so a session and its index sets share a
        // slot; elsewhere the keys keep their names (sessions survive an upgrade). No pause
        // after a failure: a session write that follows a token refresh must not be skipped.
        let prefix = match target {
            RedisTarget::Cluster(_) => format!("{{{prefix}}}"),
            _ => prefix,
        };
        Ok(RedisSessions {
            redis: RedisConnector::new(
                target,
                timeout,
                Duration::ZERO,
                format!("session store {prefix}"),
            )?,
            prefix,
            absolute,
        })
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Pipeline) -> Result<T, String> {
        self.redis.query(&cmd).await
    }

    fn key(&self, key: &str) -> String {
        format!("{}:s:{key}", self.prefix)
    }

    async fn get(&self, key: &str) -> Result<Option<SessionRecord>, String> {
        let mut p = redis::pipe();
        p.get(self.key(key));
        let (text,): (Option<String>,) = self.run(p).await?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    async fn put(&self, key: &str, rec: &SessionRecord, ttl: Duration) -> Result<(), String> {
        let text = serde_json::to_string(rec).map_err(|e| e.to_string())?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let index_ms = u64::try_from(self.absolute.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(self.key(key))
            .arg(text)
            .arg("PX")
            .arg(ms)
            .ignore();
        for index in self.indexes(rec) {
            p.sadd(&index, key).ignore();
            p.pexpire(&index, index_ms as i64).ignore();
        }
        self.run::<()>(p).await
    }

    fn indexes(&self, rec: &SessionRecord) -> Vec<String> {
        let mut out = vec![format!("{}:sub:{}", self.prefix, rec.subject)];
        if let Some(sid) = &rec.idp_sid {
            out.push(format!("{}:sid:{sid}", self.prefix));
        }
        out
    }

    async fn delete(&self, key: &str) -> Result<(), String> {
        let mut p = redis::pipe();
        p.cmd("EVAL")
            .arg(DELETE)
            .arg(1)
            .arg(self.key(key))
            .arg(&self.prefix)
            .arg(key)
            .ignore();
        self.run::<()>(p).await
    }

    async fn update(&self, key: &str, rec: &SessionRecord, ttl: Duration) -> Result<bool, String> {
        let text = serde_json::to_string(rec).map_err(|e| e.to_string())?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut p = redis::pipe();
        p.cmd("EVAL")
            .arg(UPDATE)
            .arg(1)
            .arg(self.key(key))
            .arg(text)
            .arg(rec.version.saturating_sub(1))
            .arg(ms);
        let (done,): (i64,) = self.run(p).await?;
        Ok(done == 1)
    }

    /// `SET key 1 NX PX ttl`: whether this call created it.
    async fn set_once(&self, key: String, ttl: Duration) -> Result<bool, String> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut p = redis::pipe();
        p.cmd("SET").arg(key).arg(1).arg("NX").arg("PX").arg(ms);
        let (set,): (Option<String>,) = self.run(p).await?;
        Ok(set.is_some())
    }

    async fn first_use(&self, id: &str, ttl: Duration) -> Result<bool, String> {
        self.set_once(format!("{}:jti:{id}", self.prefix), ttl).await
    }

    async fn lock(&self, key: &str, ttl: Duration) -> Result<bool, String> {
        self.set_once(format!("{}:lock:{key}", self.prefix), ttl).await
    }

    async fn unlock(&self, key: &str) -> Result<(), String> {
        let mut p = redis::pipe();
        p.del(format!("{}:lock:{key}", self.prefix)).ignore();
        self.run::<()>(p).await
    }

    async fn delete_matching(
        &self,
        sid: Option<&str>,
        subject: Option<&str>,
    ) -> Result<usize, String> {
        let index = match (sid, subject) {
            (Some(sid), _) => format!("{}:sid:{sid}", self.prefix),
            (None, Some(sub)) => format!("{}:sub:{sub}", self.prefix),
            (None, None) => return Ok(0),
        };
        let mut p = redis::pipe();
        p.smembers(&index);
        let (keys,): (Vec<String>,) = self.run(p).await?;
        if keys.is_empty() {
            return Ok(0);
        }
        let mut p = redis::pipe();
        for k in &keys {
            p.del(self.key(k));
            // Only the keys read: a session added to the set meanwhile stays indexed.
            p.srem(&index, k).ignore();
        }
        let deleted: Vec<usize> = self.run(p).await?;
        Ok(deleted.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sub: &str, sid: Option<&str>) -> SessionRecord {
        SessionRecord {
            subject: sub.into(),
            idp_sid: sid.map(str::to_string),
            claims: Map::new(),
            id_token: "id".into(),
            access_token: "at".into(),
            access_expires_at: 0,
            refresh_token: None,
            created_at: 0,
            last_seen: 0,
            version: 0,
        }
    }

    #[test]
    fn updates_apply_only_to_the_version_they_read() {
        let m = MemoryStore::new(10);
        m.put("k", &rec("alice", None));
        let mut next = rec("alice", None);
        next.version = 1;
        assert!(m.update("k", &next));
        assert!(!m.update("k", &next), "version 1 was already replaced");
        m.delete("k");
        next.version = 2;
        assert!(!m.update("k", &next), "a deleted session stays deleted");
        assert!(m.first_use("jti-1") && !m.first_use("jti-1"));
    }

    #[test]
    fn memory_store_ends_sessions_by_provider_sid_or_subject() {
        let m = MemoryStore::new(10);
        m.put("k1", &rec("alice", Some("s1")));
        m.put("k2", &rec("alice", Some("s2")));
        m.put("k3", &rec("bob", Some("s3")));
        assert_eq!(m.delete_matching(Some("s1"), Some("alice")), 1, "sid wins");
        assert!(m.get("k1").is_none() && m.get("k2").is_some());
        assert_eq!(m.delete_matching(None, Some("alice")), 1);
        assert!(m.get("k3").is_some());
        assert_eq!(m.delete_matching(None, None), 0);
    }

    #[test]
    fn memory_store_drops_the_least_recently_used_beyond_its_bound() {
        let m = MemoryStore::new(2);
        m.put("a", &rec("a", None));
        m.put("b", &rec("b", None));
        m.get("a");
        m.put("c", &rec("c", None));
        assert!(m.get("a").is_some() && m.get("b").is_none() && m.get("c").is_some());
    }
}
