//! The `cache` plugin's store: Pingora's [`Storage`] in memory, within a byte budget.
//!
//! Written here rather than taken from Pingora: its `MemCache` is a test store (no budget, no
//! eviction, a full copy of every body at admission). This one keeps each body as the chunks
//! the upstream sent (`Bytes` are shared, never copied), weighs every entry (body, serialised
//! metadata, key) against `max_size`, and evicts the least recently used entries at admission
//! (the `lru` crate keeps the order; the weights are ours). Readers hold their entry by `Arc`, so
//! an entry evicted or purged while it is being sent keeps streaming to that client.
//!
//! It also indexes entries by request target (path and query), so a purge or an unsafe
//! request can remove every variant of a URL (or every URL under a prefix) without a scan.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::{
    HandleHit, HandleMiss, MissFinishType, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{CacheKey, CacheMeta, HitHandler, MissHandler, Storage};
use pingora::{Error, ErrorType, Result};
use prometheus::{IntCounter, IntGauge};

/// What an entry costs beyond its bytes (map slots, index entries, the `Arc`s): counted so a
/// budget full of tiny entries is still a bounded amount of memory.
const ENTRY_OVERHEAD: usize = 256;

/// The request target (path and query) and host an entry was stored for, carried in the
/// [`CacheKey`]'s extensions from the plugin's `cache_key` to the store's `get_miss_handler`.
#[derive(Debug, Clone)]
pub struct EntryTarget {
    pub target: Arc<str>,
    /// Lowercased `Host` of the request.
    pub host: Arc<str>,
}

struct Entry {
    /// `CacheMeta::serialize` output: internal meta and response header.
    meta: (Vec<u8>, Vec<u8>),
    body: Arc<[Bytes]>,
    body_len: usize,
    target: Arc<str>,
    host: Arc<str>,
    weight: usize,
}

struct State {
    entries: LruCache<HashBinary, Arc<Entry>>,
    used: usize,
    /// Request target → the keys stored for it (variants, hosts, principals).
    targets: BTreeMap<Arc<str>, BTreeSet<HashBinary>>,
}

impl State {
    fn unlink(&mut self, key: &HashBinary, entry: &Entry) {
        self.used -= entry.weight;
        if let Some(keys) = self.targets.get_mut(&entry.target) {
            keys.remove(key);
            if keys.is_empty() {
                self.targets.remove(&entry.target);
            }
        }
    }

    fn remove(&mut self, key: &HashBinary) -> bool {
        match self.entries.pop(key) {
            Some(entry) => {
                self.unlink(key, &entry);
                true
            }
            None => false,
        }
    }
}

/// An in-memory response store with a byte budget.
pub struct MemoryStore {
    /// Set when a reload replaced the plugin: writes still in flight are dropped, so nothing
    /// is stored where nobody will read or evict it.
    retired: std::sync::atomic::AtomicBool,
    budget: usize,
    max_object: usize,
    state: Mutex<State>,
    bytes: IntGauge,
    evictions: IntCounter,
}

impl MemoryStore {
    pub fn new(budget: usize, max_object: usize, bytes: IntGauge, evictions: IntCounter) -> Self {
        MemoryStore {
            retired: std::sync::atomic::AtomicBool::new(false),
            budget,
            max_object,
            state: Mutex::new(State {
                entries: LruCache::unbounded(),
                used: 0,
                targets: BTreeMap::new(),
            }),
            bytes,
            evictions,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.state.lock().used
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits an entry, evicting the least recently used until it fits. An entry larger than
    /// the whole budget is not stored.
    fn admit(&self, key: HashBinary, entry: Entry) -> bool {
        if entry.weight > self.budget || self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut state = self.state.lock();
        state.remove(&key);
        let evicted = Self::evict_to(&mut state, self.budget - entry.weight);
        state.used += entry.weight;
        state
            .targets
            .entry(Arc::clone(&entry.target))
            .or_default()
            .insert(key);
        state.entries.push(key, Arc::new(entry));
        self.bytes.set(state.used as i64);
        drop(state);
        self.evictions.inc_by(evicted);
        true
    }

    /// Evicts least recently used entries until at most `limit` bytes are held; how many.
    fn evict_to(state: &mut State, limit: usize) -> u64 {
        let mut evicted = 0;
        while state.used > limit {
            match state.entries.pop_lru() {
                Some((old_key, old)) => {
                    state.unlink(&old_key, &old);
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }

    /// A stored response read at once (for answers a plugin made, served without Pingora):
    /// its metadata and whole body.
    pub fn get(&self, key: &CacheKey) -> Option<(CacheMeta, Bytes)> {
        let entry = self.state.lock().entries.get(&key.combined_bin()).cloned()?;
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1).ok()?;
        // `put` stores one chunk: share it rather than copy the body on every hit.
        if let [whole] = &*entry.body {
            return Some((meta, whole.clone()));
        }
        let mut body = bytes::BytesMut::with_capacity(entry.body_len);
        for chunk in entry.body.iter() {
            body.extend_from_slice(chunk);
        }
        Some((meta, body.freeze()))
    }

    /// Stores a complete response at once; `false` when it is not kept (too large, retired).
    pub fn put(&self, key: &CacheKey, meta: &CacheMeta, body: Bytes) -> bool {
        if body.len() > self.max_object {
            return false;
        }
        let Ok(meta) = meta.serialize() else {
            return false;
        };
        let (target, host) = key
            .extensions
            .get::<EntryTarget>()
            .map(|t| (Arc::clone(&t.target), Arc::clone(&t.host)))
            .unwrap_or_else(|| (Arc::from(""), Arc::from("")));
        let entry = Entry {
            weight: weight(&meta, body.len(), &target),
            meta,
            body_len: body.len(),
            body: Arc::from(vec![body]),
            target,
            host,
        };
        self.admit(key.combined_bin(), entry)
    }

    /// Removes every entry stored for `target` (all hosts, variants and principals).
    pub fn purge_target(&self, target: &str) -> usize {
        self.purge_target_where(target, |_| true)
    }

    /// Removes the entries stored for `target` on one host (an unsafe request's invalidation).
    pub fn purge_target_on(&self, target: &str, host: &str) -> usize {
        self.purge_target_where(target, |e| &*e.host == host)
    }

    fn purge_target_where(&self, target: &str, which: impl Fn(&Entry) -> bool) -> usize {
        let mut state = self.state.lock();
        let keys: Vec<HashBinary> = match state.targets.get(target) {
            Some(keys) => keys
                .iter()
                .copied()
                .filter(|k| state.entries.peek(k).is_some_and(|e| which(e)))
                .collect(),
            None => Vec::new(),
        };
        let removed = keys.iter().filter(|k| state.remove(k)).count();
        self.bytes.set(state.used as i64);
        removed
    }

    /// Removes every entry whose target starts with `prefix`.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        let mut state = self.state.lock();
        let keys: Vec<HashBinary> = state
            .targets
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(t, _)| t.starts_with(prefix))
            .flat_map(|(_, keys)| keys.iter().copied())
            .collect();
        let removed = keys.iter().filter(|k| state.remove(k)).count();
        self.bytes.set(state.used as i64);
        removed
    }

    /// Empties the store for good (a reload replaced the plugin): later writes are dropped.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.state.lock();
        state.entries.clear();
        state.targets.clear();
        state.used = 0;
        self.bytes.set(0);
    }
}

fn weight(meta: &(Vec<u8>, Vec<u8>), body_len: usize, target: &str) -> usize {
    meta.0.len() + meta.1.len() + body_len + target.len() + ENTRY_OVERHEAD
}

#[async_trait]
impl Storage for MemoryStore {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let found = self.state.lock().entries.get(&key.combined_bin()).cloned();
        let Some(entry) = found else {
            return Ok(None);
        };
        let meta = CacheMeta::deserialize(&entry.meta.0, &entry.meta.1)?;
        let end = entry.body_len;
        Ok(Some((meta, Box::new(Hit::new(entry, 0, end)))))
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let (target, host) = key
            .extensions
            .get::<EntryTarget>()
            .map(|t| (Arc::clone(&t.target), Arc::clone(&t.host)))
            .unwrap_or_else(|| (Arc::from(""), Arc::from("")));
        Ok(Box::new(Miss {
            store: self,
            key: key.combined_bin(),
            target,
            host,
            meta: meta.serialize()?,
            chunks: Vec::new(),
            len: 0,
            too_large: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        let key = target.key().combined_bin();
        let mut state = self.state.lock();
        let removed = state.remove(&key);
        self.bytes.set(state.used as i64);
        Ok(if removed {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        if self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        let meta = meta.serialize()?;
        let key = key.combined_bin();
        let mut state = self.state.lock();
        let Some(old) = state.entries.peek(&key).cloned() else {
            return Ok(false);
        };
        let updated = Entry {
            weight: weight(&meta, old.body_len, &old.target),
            meta,
            body: Arc::clone(&old.body),
            body_len: old.body_len,
            target: Arc::clone(&old.target),
            host: Arc::clone(&old.host),
        };
        state.used = state.used - old.weight + updated.weight;
        state.entries.put(key, Arc::new(updated));
        // A refreshed header may be larger: stay within the budget (the refreshed entry is the
        // most recently used, so it goes last).
        let evicted = Self::evict_to(&mut state, self.budget);
        self.bytes.set(state.used as i64);
        drop(state);
        self.evictions.inc_by(evicted);
        Ok(true)
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// Reads one stored body, whole or a byte range of it, chunk by chunk.
struct Hit {
    entry: Arc<Entry>,
    /// Absolute position of the next byte to send.
    pos: usize,
    /// Absolute end (exclusive).
    end: usize,
    /// The chunk the walk is at, and its absolute start: reads only move forward (a seek
    /// starts over), so a whole body is one pass over its chunks.
    chunk: usize,
    chunk_start: usize,
}

impl Hit {
    fn new(entry: Arc<Entry>, pos: usize, end: usize) -> Self {
        Hit {
            entry,
            pos,
            end,
            chunk: 0,
            chunk_start: 0,
        }
    }

    /// The rest of the chunk holding `pos`, cut at `end`.
    fn next_slice(&mut self) -> Option<Bytes> {
        if self.pos >= self.end {
            return None;
        }
        while let Some(chunk) = self.entry.body.get(self.chunk) {
            let chunk_end = self.chunk_start + chunk.len();
            if self.pos < chunk_end {
                let from = self.pos - self.chunk_start;
                let to = chunk.len().min(self.end - self.chunk_start);
                self.pos = self.chunk_start + to;
                return Some(chunk.slice(from..to));
            }
            self.chunk += 1;
            self.chunk_start = chunk_end;
        }
        None
    }
}

#[async_trait]
impl HandleHit for Hit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        Ok(self.next_slice())
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let len = self.entry.body_len;
        if start >= len {
            return Error::e_explain(
                ErrorType::InternalError,
                format!("seek start {start} is past the body's {len} bytes"),
            );
        }
        self.pos = start;
        self.end = end.map_or(len, |e| e.min(len));
        self.chunk = 0;
        self.chunk_start = 0;
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.entry.weight
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Collects one response's body as it streams to the client, and admits it when complete.
struct Miss {
    store: &'static MemoryStore,
    key: HashBinary,
    target: Arc<str>,
    host: Arc<str>,
    meta: (Vec<u8>, Vec<u8>),
    chunks: Vec<Bytes>,
    len: usize,
    too_large: bool,
}

#[async_trait]
impl HandleMiss for Miss {
    async fn write_body(&mut self, data: Bytes, _eof: bool) -> Result<()> {
        if self.too_large {
            return Ok(());
        }
        if self.len + data.len() > self.store.max_object {
            // Stop collecting; the client still gets the whole body from the upstream.
            self.too_large = true;
            self.chunks = Vec::new();
            return Error::e_explain(
                ErrorType::InternalError,
                "the response is larger than max_object_size",
            );
        }
        self.len += data.len();
        if !data.is_empty() {
            self.chunks.push(data);
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<MissFinishType> {
        if self.too_large {
            return Error::e_explain(
                ErrorType::InternalError,
                "the response is larger than max_object_size",
            );
        }
        let weight = weight(&self.meta, self.len, &self.target);
        let entry = Entry {
            meta: self.meta,
            body: Arc::from(self.chunks),
            body_len: self.len,
            target: self.target,
            host: self.host,
            weight,
        };
        let admitted = self.store.admit(self.key, entry);
        Ok(MissFinishType::Created(if admitted { weight } else { 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::trace::Span;
    use pingora::http::ResponseHeader;
    use std::time::{Duration, SystemTime};

    fn store(budget: usize) -> &'static MemoryStore {
        Box::leak(Box::new(MemoryStore::new(
            budget,
            budget,
            IntGauge::new("bytes", "b").unwrap(),
            IntCounter::new("evictions", "e").unwrap(),
        )))
    }

    fn meta() -> CacheMeta {
        let now = SystemTime::now();
        let header = ResponseHeader::build(200, None).unwrap();
        CacheMeta::new(now + Duration::from_secs(60), now, 0, 0, header)
    }

    fn key(target: &str) -> CacheKey {
        let mut key = CacheKey::new(format!("host{target}"), "");
        key.extensions.insert(EntryTarget {
            target: Arc::from(target),
            host: Arc::from("host"),
        });
        key
    }

    async fn put(store: &'static MemoryStore, target: &str, chunks: &[&'static [u8]]) {
        let span = Span::inactive().handle();
        let mut miss = store.get_miss_handler(&key(target), &meta(), &span).await.unwrap();
        for c in chunks {
            miss.write_body(Bytes::from_static(c), false).await.unwrap();
        }
        miss.finish().await.unwrap();
    }

    async fn read(store: &'static MemoryStore, target: &str) -> Option<Vec<u8>> {
        let span = Span::inactive().handle();
        let (_, mut hit) = store.lookup(&key(target), &span).await.unwrap()?;
        let mut body = Vec::new();
        while let Some(b) = hit.read_body().await.unwrap() {
            body.extend_from_slice(&b);
        }
        Some(body)
    }

    #[tokio::test]
    async fn stores_chunks_and_reads_them_back_and_by_range() {
        let s = store(1 << 20);
        put(s, "/a", &[b"hello ", b"wor", b"ld"]).await;
        assert_eq!(read(s, "/a").await.unwrap(), b"hello world");
        let span = Span::inactive().handle();
        let (_, mut hit) = s.lookup(&key("/a"), &span).await.unwrap().unwrap();
        hit.seek(4, Some(8)).unwrap();
        let mut part = Vec::new();
        while let Some(b) = hit.read_body().await.unwrap() {
            part.extend_from_slice(&b);
        }
        assert_eq!(part, b"o wo");
        assert!(hit.seek(11, None).is_err());
    }

    #[tokio::test]
    async fn evicts_least_recently_used_to_stay_within_budget() {
        let body: &'static [u8] = &[b'x'; 1000];
        let one = weight(&meta().serialize().unwrap(), 1000, "/1");
        let s = store(one * 2 + 10);
        put(s, "/1", &[body]).await;
        put(s, "/2", &[body]).await;
        // Touch /1, so /2 is the least recently used when /3 needs room.
        assert!(read(s, "/1").await.is_some());
        put(s, "/3", &[body]).await;
        assert!(read(s, "/2").await.is_none());
        assert!(read(s, "/1").await.is_some() && read(s, "/3").await.is_some());
        assert!(s.used() <= one * 2 + 10);
        assert_eq!(s.evictions.get(), 1);
        assert_eq!(s.bytes.get() as usize, s.used());
    }

    #[tokio::test]
    async fn an_entry_evicted_while_read_still_streams() {
        let body: &'static [u8] = &[b'y'; 1000];
        let one = weight(&meta().serialize().unwrap(), 1000, "/1");
        let s = store(one + 10);
        put(s, "/1", &[&body[..500], &body[500..]]).await;
        let span = Span::inactive().handle();
        let (_, mut hit) = s.lookup(&key("/1"), &span).await.unwrap().unwrap();
        let first = hit.read_body().await.unwrap().unwrap();
        put(s, "/2", &[body]).await; // evicts /1
        assert!(read(s, "/1").await.is_none());
        let second = hit.read_body().await.unwrap().unwrap();
        assert_eq!(first.len() + second.len(), 1000);
    }

    #[tokio::test]
    async fn a_body_over_max_object_is_not_stored() {
        let s: &'static MemoryStore = Box::leak(Box::new(MemoryStore::new(
            1 << 20,
            10,
            IntGauge::new("bytes", "b").unwrap(),
            IntCounter::new("evictions", "e").unwrap(),
        )));
        let span = Span::inactive().handle();
        let mut miss = s.get_miss_handler(&key("/big"), &meta(), &span).await.unwrap();
        miss.write_body(Bytes::from_static(b"0123456789"), false).await.unwrap();
        assert!(miss.write_body(Bytes::from_static(b"x"), true).await.is_err());
        assert!(miss.finish().await.is_err());
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn purges_by_target_and_prefix() {
        let s = store(1 << 20);
        put(s, "/items/1", &[b"1"]).await;
        put(s, "/items/2", &[b"2"]).await;
        put(s, "/other", &[b"o"]).await;
        assert_eq!(s.purge_target("/items/1"), 1);
        assert_eq!(s.purge_target("/items/1"), 0);
        put(s, "/items/1", &[b"1"]).await;
        assert_eq!(s.purge_prefix("/items/"), 2);
        assert_eq!(s.len(), 1);
        put(s, "/items/3", &[b"3"]).await;
        assert_eq!(s.purge_target_on("/items/3", "other-host"), 0);
        assert_eq!(s.purge_target_on("/items/3", "host"), 1);
        s.retire();
        assert!(s.is_empty() && s.used() == 0);
        put(s, "/late", &[b"l"]).await;
        assert!(s.is_empty(), "a retired store keeps nothing");
    }
}
