//! `cache`: an RFC 9111 shared HTTP cache on Pingora's cache machinery, in memory within a
//! byte budget, that never gives one user's response to another.
//!
//! Pingora does the protocol work around a lookup: the cache lock that coalesces concurrent
//! misses, `HEAD` answered from a `GET` entry, validators on revalidation and merging a 304 into
//! the stored header, 304 answers to client conditionals, `Age` on hits, background refresh for
//! stale-while-revalidate and stale-if-error. This plugin decides the policy in its hooks:
//! - `request_cache`: only `GET` and `HEAD` turn the cache on; the request's `Cache-Control`
//!   is read once.
//! - `cache_key`: the upstream pool the request goes to, `Host`, path and query, and
//!   `key_headers`.
//! - `cache_vary`: the response's `Vary` headers, plus the caller's identity when the response
//!   is partitioned (see [`policy::partitioned`]): two users never share such an entry.
//! - `cache_hit`: the request's `no-cache`, `max-age`, `min-fresh`, `max-stale`.
//! - `response_cache`: storability and freshness ([`policy::storable`]).
//! - `cache_serve_stale`, `cache_miss` (`only-if-cached` → 504), `upstream_response`
//!   (a successful unsafe request invalidates its URI, RFC 9111 4.4), `response_filter`
//!   (RFC 9211 `Cache-Status`, and the verdict for the metric and the access log).
//!
//! The store ([`store::MemoryStore`]) lives as long as the built plugin; an unchanged config
//! keeps it across reloads, and a restart empties it.
//!
//! ```toml
//! [plugins.edge-cache]
//! type = "cache"
//! max_size = "256MiB"
//! max_object_size = "2MiB"
//! ```

pub mod config;
pub mod policy;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::header::{AUTHORIZATION, CONTENT_LOCATION, COOKIE, HOST, LOCATION};
use http::{HeaderName, Method};
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, ForcedFreshness, HitHandler,
    NoCacheReason, RespCacheable, VarianceBuilder,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;

pub use config::CacheConfig;
use policy::{RequestDirectives, Rules};
use store::{EntryTarget, MemoryStore};

use crate::{
    ApiError, Attempt, BuildEnv, BuildError, CachePurge, DynPlugin, Erased, Flow, HashBinary, Hooks,
    Plugin, Reply, RequestCtx, Result,
};

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// This cache's name in `Cache-Status`.
const CACHE_NAME: &str = "sallyport";

/// The built `cache` plugin.
pub struct Cache {
    store: &'static MemoryStore,
    lock: Option<&'static CacheKeyLockImpl>,
    lock_timeout: Duration,
    max_object: usize,
    rules: Rules,
    key_headers: Vec<HeaderName>,
    purge: bool,
}

/// Per-request state.
#[derive(Default)]
pub struct CacheState {
    /// This plugin turned Pingora's cache on for the request.
    enabled: bool,
    /// Why the request was not looked up (`Cache-Status: fwd=bypass; detail=...`).
    bypass: Option<&'static str>,
    directives: RequestDirectives,
    credentialed: bool,
    /// A lookup found an entry: whether it was fresh.
    found_fresh: Option<bool>,
    /// The request forced revalidation of a fresh entry (`no-cache`, `max-age`, `min-fresh`).
    forced: bool,
    /// Why the response was not stored.
    not_stored: Option<&'static str>,
    /// The header of an upstream 304 that revalidated the entry (RFC 9111 4.3.4).
    not_modified: Option<ResponseHeader>,
    /// On a route a plugin answers (no upstream): the key its answer is kept under (until
    /// stored), and the verdict.
    reply: Option<ReplyCache>,
}

/// Caching the answer of a plugin (`aggregate`), outside Pingora's cache: looked up in this
/// plugin's `request_filter`, stored by `reply_cache`.
struct ReplyCache {
    key: Option<CacheKey>,
    result: &'static str,
    ttl: Option<i64>,
    stored: bool,
}

impl Cache {
    pub fn build(
        c: &CacheConfig,
        env: &BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = config::validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        let key_headers = crate::conf::values("key_headers", &c.key_headers)?;
        let budget = usize::try_from(c.max_size.get()).unwrap_or(usize::MAX);
        let max_object = usize::try_from(c.max_object_size.get()).unwrap_or(usize::MAX);
        // Pingora's cache wants `'static` stores and locks. The config that built them keeps
        // them across reloads (`keeps_state_across_reloads`); a changed config builds new ones
        // and `stop` empties the old store, so what outlives it is the empty shell.
        let store: &'static MemoryStore = Box::leak(Box::new(MemoryStore::new(
            budget,
            max_object,
            env.metrics.cache_bytes.with_label_values(&[&*env.name]),
            env.metrics.cache_evictions.with_label_values(&[&*env.name]),
        )));
        let lock_timeout = c.lock_timeout.get();
        let lock: Option<&'static CacheKeyLockImpl> = if lock_timeout.is_zero() {
            None
        } else {
            Some(Box::leak(CacheLock::new_boxed(lock_timeout)))
        };
        Ok(Erased::into_dyn(Cache {
            store,
            lock,
            lock_timeout,
            max_object,
            rules: Rules {
                heuristic: c.heuristic,
                default_ttl: c.default_ttl.get(),
                max_ttl: c.max_ttl.get(),
                stale_while_revalidate: c.stale_while_revalidate.get(),
                stale_if_error: c.stale_if_error.get(),
                shared_when_authenticated: c.shared_when_authenticated,
            },
            key_headers,
            purge: c.purge,
        }))
    }

    /// Who the caller is, for a partitioned entry: the verified principal (issuer, subject,
    /// tenant; every claim when it has no subject) when a plugin verified one, otherwise the
    /// credentials themselves. Only its hash is kept (in the entry's variance).
    fn identity(ctx: &RequestCtx, request: &RequestHeader) -> Vec<u8> {
        if let Some(p) = &ctx.principal {
            let claim = |n| p.claim_str(n).unwrap_or_default();
            return match &p.subject {
                // The client and its scopes too: an app with narrower scopes acting for the same
                // user must not be served what a fuller one was.
                Some(subject) => format!(
                    "principal\0{}\0{}\0{subject}\0{}\0{}\0{}\0{}\0{}",
                    p.verified_by,
                    claim("iss"),
                    claim("tenant"),
                    claim("azp"),
                    claim("client_id"),
                    claim("scope"),
                    claim("scp")
                )
                .into_bytes(),
                // No subject to tell callers apart: every verified claim does.
                None => format!(
                    "claims\0{}\0{}",
                    p.verified_by,
                    serde_json::Value::Object((*p.claims).clone())
                )
                .into_bytes(),
            };
        }
        let mut id = b"credentials".to_vec();
        for name in [AUTHORIZATION, COOKIE] {
            for v in request.headers.get_all(name) {
                id.push(0);
                id.extend_from_slice(v.as_bytes());
            }
        }
        id
    }
}

impl Cache {
    /// The key of a request: the pool it goes to, its host, target and `key_headers`; with
    /// `identity` (answers of plugins, kept per caller) a hash of that too.
    fn key(&self, req: &RequestHeader, ctx: &RequestCtx, identity: Option<&[u8]>) -> CacheKey {
        let host = host_of(req).unwrap_or("").to_ascii_lowercase();
        let target = target_of(ctx, req);
        // The pool the request goes to is part of the key: a `traffic_split` canary's answers
        // are never served to requests of the stable pool. Only the primary part is hashed:
        // every part is length-prefixed so no two different requests frame to the same bytes.
        let pool = ctx.upstream.as_deref().unwrap_or("");
        let mut primary = format!(
            "{}:{pool}{}:{host}{}:{target}",
            pool.len(),
            host.len(),
            target.len()
        );
        for name in &self.key_headers {
            let values: Vec<&[u8]> = req.headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            let joined = values.join(&b", "[..]);
            // Hex keeps every byte distinct (a lossy decoding would merge invalid UTF-8).
            primary.push_str(&format!("|{}:", joined.len()));
            primary.push_str(&crate::context::hex(&joined));
        }
        if let Some(id) = identity {
            use sha2::Digest;
            primary.push_str("|id:");
            primary.push_str(&crate::context::hex(&sha2::Sha256::digest(id)));
        }
        let mut key = CacheKey::new(primary, "");
        key.extensions.insert(EntryTarget {
            target: Arc::from(target),
            host: Arc::from(host.as_str()),
        });
        key
    }
}

/// The request's authority as the client wrote it (`Host`, or the absolute-form target's).
fn host_of(request: &RequestHeader) -> Option<&str> {
    request
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| request.headers.get(HOST).and_then(|h| h.to_str().ok()))
}

/// The request target an entry is indexed by: the normalised path and the query.
fn target_of(ctx: &RequestCtx, request: &RequestHeader) -> String {
    let path = if ctx.path.is_empty() {
        request.uri.path()
    } else {
        &ctx.path
    };
    match request.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// The target of a `Location` or `Content-Location` value on the request's own origin.
fn same_origin_target(value: &str, host: Option<&str>) -> Option<String> {
    let uri: http::Uri = value.parse().ok()?;
    if let Some(authority) = uri.authority() {
        if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority.as_str())) {
            return None;
        }
    } else if !value.starts_with('/') {
        return None;
    }
    uri.path_and_query().map(|pq| pq.as_str().to_string())
}

fn unsafe_method(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// Seconds as `Cache-Status`'s `ttl` (negative once stale).
fn ttl(meta: &CacheMeta, now: SystemTime) -> i64 {
    match meta.fresh_until().duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[async_trait]
impl Plugin for Cache {
    type State = CacheState;

    fn hooks(&self) -> Hooks {
        Hooks {
            // request_filter: answers of plugins (aggregate) are looked up there.
            request_filter: true,
            cache: true,
            upstream_response: true,
            response_filter: true,
            ..Hooks::NONE
        }
    }

    async fn stop(&self) {
        self.store.retire();
    }

    /// On a route a plugin answers (no upstream pool), before that plugin runs: a fresh stored
    /// answer is sent from here; otherwise `reply_cache` keeps the plugin's answer. Such
    /// answers are kept per caller whenever the request carries credentials.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<Flow> {
        let req = session.req_header();
        if ctx.upstream.is_some() || !matches!(req.method, Method::GET | Method::HEAD) {
            return Ok(Flow::Continue);
        }
        state.directives = RequestDirectives::parse(&req.headers);
        state.credentialed = policy::credentialed(&req.headers, ctx.principal.is_some());
        let identity = state.credentialed.then(|| Self::identity(ctx, req));
        let key = self.key(req, ctx, identity.as_deref());
        let now = SystemTime::now();
        let fresh = self.store.get(&key).filter(|(meta, _)| {
            meta.is_fresh(now) && policy::on_hit(meta, &state.directives, now).is_none()
        });
        if let Some((meta, body)) = fresh {
            let mut header = meta.response_header_copy();
            header.insert_header(http::header::AGE, meta.age().as_secs())?;
            state.reply = Some(ReplyCache {
                key: None,
                result: "hit",
                ttl: Some(ttl(&meta, now)),
                stored: false,
            });
            return Ok(Flow::Respond(Reply::Full {
                header: Box::new(header),
                body,
            }));
        }
        if state.directives.only_if_cached {
            state.not_stored = Some("only-if-cached");
            return Ok(Flow::Respond(Reply::Error(ApiError::new(
                504,
                "not_cached",
                "the response is not in the cache and the request says only-if-cached",
            ))));
        }
        state.reply = Some(ReplyCache {
            key: Some(key),
            result: "miss",
            ttl: None,
            stored: false,
        });
        Ok(Flow::Continue)
    }

    fn reply_cache(
        &self,
        _session: &Session,
        header: &ResponseHeader,
        body: &bytes::Bytes,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) {
        let Some(reply) = state.reply.as_mut() else {
            return;
        };
        let Some(key) = reply.key.take() else {
            return;
        };
        let now = SystemTime::now();
        let request_time = now.checked_sub(ctx.received_at.elapsed()).unwrap_or(now);
        // Kept per caller (the identity is in the key), so RFC 9111 3.5's rule for shared
        // entries does not apply; every other storage rule does.
        let rules = Rules {
            shared_when_authenticated: false,
            ..self.rules.clone()
        };
        match policy::storable(header, &state.directives, false, &rules, request_time, now) {
            Ok(storable) => {
                let meta = storable.into_meta(now);
                reply.ttl = Some(ttl(&meta, now));
                reply.stored = self.store.put(&key, &meta, body.clone());
                if !reply.stored {
                    state.not_stored = Some("too-large");
                }
            }
            Err(why) => state.not_stored = Some(why),
        }
    }

    fn request_cache(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<()> {
        let req = session.req_header();
        state.directives = RequestDirectives::parse(&req.headers);
        state.credentialed = policy::credentialed(&req.headers, ctx.principal.is_some());
        if !matches!(req.method, Method::GET | Method::HEAD) {
            state.bypass = Some("method");
            return Ok(());
        }
        if session.cache.enabled() {
            // An earlier cache plugin of the chain took the request.
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.lock_timeout);
        session
            .cache
            .enable(self.store, None, None, self.lock, Some(overrides));
        session.cache.set_max_file_size_bytes(self.max_object);
        state.enabled = true;
        Ok(())
    }

    fn cache_key(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<Option<CacheKey>> {
        if !state.enabled {
            return Ok(None);
        }
        Ok(Some(self.key(session.req_header(), ctx, None)))
    }


    fn cache_vary(
        &self,
        meta: &CacheMeta,
        request: &RequestHeader,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Option<HashBinary> {
        if !state.enabled {
            return None;
        }
        let mut variance = VarianceBuilder::new();
        for name in policy::vary_names(meta.headers()) {
            let values: Vec<&[u8]> = request
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            variance.add_owned_name_value(name, values.join(&b", "[..]));
        }
        if policy::partitioned(meta.response_header(), state.credentialed, &self.rules) {
            variance.add_owned_name_value(
                "\0sallyport-identity".to_string(),
                Self::identity(ctx, request),
            );
        }
        if !variance.has_variance() {
            // Never "no variance": Pingora would then serve whatever the primary slot holds,
            // also a partitioned entry to a request without credentials. A constant variance
            // keeps shared entries in one slot and makes every lookup compare.
            variance.add_value("\0sallyport-shared", "");
        }
        variance.finalize()
    }

    async fn cache_hit(
        &self,
        _session: &mut Session,
        meta: &CacheMeta,
        _hit: &mut HitHandler,
        is_fresh: bool,
        _ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<Option<ForcedFreshness>> {
        if !state.enabled {
            return Ok(None);
        }
        state.found_fresh = Some(is_fresh);
        if self.rules.shared_when_authenticated
            && state.credentialed
            && policy::partitioned(
                meta.response_header(),
                true,
                &Rules {
                    shared_when_authenticated: false,
                    ..self.rules.clone()
                },
            )
        {
            // A response stored for an anonymous request that does not say it may be shared
            // is not given to a credentialed one (RFC 9111 3.5).
            state.not_stored = Some("authenticated");
            return Ok(Some(ForcedFreshness::ForceMiss));
        }
        let forced = policy::on_hit(meta, &state.directives, SystemTime::now());
        state.forced = matches!(forced, Some(ForcedFreshness::ForceExpired)) && is_fresh;
        Ok(forced)
    }

    fn response_cache(
        &self,
        _session: &Session,
        response: &ResponseHeader,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<Option<RespCacheable>> {
        if !state.enabled {
            return Ok(None);
        }
        let now = SystemTime::now();
        let request_time = now
            .checked_sub(ctx.received_at.elapsed())
            .unwrap_or(now);
        // Pingora merges only a few fields of a 304 into the stored header; RFC 9111 4.3.4
        // wants every field the 304 carries to replace the stored ones.
        let refreshed = state
            .not_modified
            .take()
            .map(|nm| policy::refresh_header(response, &nm));
        let verdict = policy::storable(
            refreshed.as_ref().unwrap_or(response),
            &state.directives,
            state.credentialed,
            &self.rules,
            request_time,
            now,
        );
        Ok(Some(match verdict {
            Ok(storable) => RespCacheable::Cacheable(storable.into_meta(now)),
            Err(why) => {
                state.not_stored = Some(why);
                RespCacheable::Uncacheable(NoCacheReason::Custom(why))
            }
        }))
    }

    fn cache_serve_stale(
        &self,
        _session: &Session,
        error: Option<&pingora::Error>,
        _ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Option<bool> {
        if !state.enabled {
            return None;
        }
        // Pingora asks only within the entry's own stale-while-revalidate or stale-if-error
        // window: serve stale while refreshing, and when the upstream failed (5xx, refused,
        // timed out), not when the request itself was at fault.
        Some(match error {
            None => true,
            Some(e) => {
                e.esource() == &pingora::ErrorSource::Upstream
                    || matches!(e.etype(), pingora::ErrorType::HTTPStatus(s) if *s >= 500)
            }
        })
    }

    fn cache_miss(
        &self,
        _session: &Session,
        _ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<Flow> {
        if state.enabled && state.directives.only_if_cached {
            // RFC 9111 5.2.1.7: nothing stored can answer, and the origin must not be asked.
            state.not_stored = Some("only-if-cached");
            return Ok(Flow::Respond(Reply::Error(ApiError::new(
                504,
                "not_cached",
                "the response is not in the cache and the request says only-if-cached",
            ))));
        }
        Ok(Flow::Continue)
    }

    async fn upstream_response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _attempt: &Attempt,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<()> {
        let req = session.req_header();
        let status = response.status.as_u16();
        if state.enabled && status == 304 {
            state.not_modified = Some(response.clone());
        }
        if !unsafe_method(&req.method) || !(200..400).contains(&status) {
            return Ok(());
        }
        // RFC 9111 4.4: a non-error response to an unsafe request invalidates the target URI
        // and the same-origin Location and Content-Location, on this host only.
        let host = host_of(req);
        let own = host.unwrap_or("").to_ascii_lowercase();
        self.store.purge_target_on(&target_of(ctx, req), &own);
        for name in [LOCATION, CONTENT_LOCATION] {
            if let Some(t) = response
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| same_origin_target(v, host))
            {
                self.store.purge_target_on(&t, &own);
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
        state: &mut CacheState,
    ) -> Result<()> {
        if ctx.cache_result.is_some() {
            // Another cache plugin of the route (later in the chain) already reported.
            return Ok(());
        }
        if let Some(reply) = &state.reply {
            // A plugin's answer, looked up and stored outside Pingora's cache.
            let mut status = match reply.result {
                "hit" => format!("{CACHE_NAME}; hit"),
                _ => format!("{CACHE_NAME}; fwd=uri-miss"),
            };
            if let Some(t) = reply.ttl {
                status.push_str(&format!("; ttl={t}"));
            }
            if reply.stored {
                status.push_str("; stored");
            } else if let Some(why) = state.not_stored.filter(|_| reply.result != "hit") {
                status.push_str(&format!("; detail={why}"));
            }
            ctx.cache_result = Some(reply.result);
            response.insert_header(CACHE_STATUS, status)?;
            return Ok(());
        }
        if !state.enabled && state.bypass.is_none() && state.not_stored.is_none() {
            return Ok(());
        }
        let (result, status) = cache_status(session, response, state);
        ctx.cache_result = Some(result);
        let mut value = status;
        // RFC 9211 2: a cache prepends its entry to what the next hop reported.
        if let Some(upstream) = response.headers.get(&CACHE_STATUS).and_then(|v| v.to_str().ok())
        {
            value.push_str(", ");
            value.push_str(upstream);
        }
        response.insert_header(CACHE_STATUS, value)?;
        Ok(())
    }

    fn cache_purge(&self, target: &CachePurge) -> usize {
        if !self.purge {
            return 0;
        }
        match target {
            CachePurge::Url(url) => self.store.purge_target(url),
            CachePurge::Prefix(prefix) => self.store.purge_prefix(prefix),
        }
    }
}

/// The verdict (for `sallyport_cache_lookups_total` and the access log) and the RFC 9211
/// `Cache-Status` entry of a response.
fn cache_status(
    session: &Session,
    response: &ResponseHeader,
    state: &CacheState,
) -> (&'static str, String) {
    let now = SystemTime::now();
    let fwd_status = response.status.as_u16();
    if let Some(why) = state.bypass {
        return ("bypass", format!("{CACHE_NAME}; fwd=bypass; detail={why}"));
    }
    if state.not_stored == Some("only-if-cached") {
        return ("miss", format!("{CACHE_NAME}; fwd=miss; detail=only-if-cached"));
    }
    let cache = &session.cache;
    let meta_ttl = || cache.maybe_cache_meta().map(|m| ttl(m, now));
    let with_ttl = |mut s: String| {
        if let Some(t) = meta_ttl() {
            s.push_str(&format!("; ttl={t}"));
        }
        s
    };
    match cache.phase() {
        CachePhase::Hit => {
            let mut s = with_ttl(format!("{CACHE_NAME}; hit"));
            if cache.lock_duration().is_some() {
                s.push_str("; collapsed");
            }
            ("hit", s)
        }
        CachePhase::Stale | CachePhase::StaleUpdating => {
            let why = if cache.phase() == CachePhase::StaleUpdating {
                "stale-while-revalidate"
            } else {
                "stale-if-error"
            };
            ("stale", with_ttl(format!("{CACHE_NAME}; hit; detail={why}")))
        }
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => (
            "revalidated",
            with_ttl(format!(
                "{CACHE_NAME}; fwd={}; fwd-status=304",
                if state.forced { "request" } else { "stale" }
            )),
        ),
        phase => {
            // Went upstream: a miss, an expired entry, or a lookup the request overrode.
            let (result, fwd) = match state.found_fresh {
                Some(_) if state.forced => ("expired", "request"),
                Some(false) => ("expired", "stale"),
                Some(true) => ("miss", "miss"),
                None if cache
                    .maybe_cache_key()
                    .is_some_and(|k| k.get_variance_key().is_some()) =>
                {
                    ("miss", "vary-miss")
                }
                None => ("miss", "uri-miss"),
            };
            let mut s = format!("{CACHE_NAME}; fwd={fwd}; fwd-status={fwd_status}");
            match phase {
                CachePhase::Miss | CachePhase::Expired => {
                    s = with_ttl(s);
                    s.push_str("; stored");
                }
                CachePhase::Disabled(reason) => {
                    let detail = state.not_stored.unwrap_or_else(|| pingora_reason(reason));
                    s.push_str(&format!("; detail={detail}"));
                }
                _ => {
                    if let Some(detail) = state.not_stored {
                        s.push_str(&format!("; detail={detail}"));
                    }
                }
            }
            (result, s)
        }
    }
}

/// A `Cache-Status` detail for Pingora's own reasons not to store a response.
fn pingora_reason(reason: NoCacheReason) -> &'static str {
    match reason {
        NoCacheReason::Custom(why) => why,
        NoCacheReason::ResponseTooLarge | NoCacheReason::PredictedResponseTooLarge => {
            "too-large"
        }
        NoCacheReason::CacheLockTimeout => "lock-timeout",
        NoCacheReason::CacheLockGiveUp | NoCacheReason::CacheLockRetryLimit => "lock-give-up",
        NoCacheReason::UpstreamError => "upstream-error",
        NoCacheReason::StorageError => "storage-error",
        _ => "not-stored",
    }
}

impl crate::PluginType for CacheConfig {
    const KIND: &'static str = "cache";

    fn validate(&self) -> Vec<BuildError> {
        config::validate(self)
    }

    /// The stored responses are the plugin's state: an unchanged config keeps them.
    fn keeps_state_across_reloads(&self) -> bool {
        true
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Cache::build(self, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_targets_only_on_the_same_origin() {
        let host = Some("api.example.com");
        assert_eq!(same_origin_target("/items/2", host).as_deref(), Some("/items/2"));
        assert_eq!(
            same_origin_target("https://api.example.com/items/2?x=1", host).as_deref(),
            Some("/items/2?x=1")
        );
        assert_eq!(same_origin_target("https://evil.example/items/2", host), None);
        assert_eq!(same_origin_target("items/2", host), None);
    }

    /// Callers a plugin verified never share an identity: not without a subject either (a
    /// token without `sub` in a custom header would otherwise fall back to no credentials).
    #[test]
    fn identities_tell_verified_callers_apart() {
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut ctx = RequestCtx::new("r".into(), Arc::from("route"));
        let id = |ctx: &RequestCtx| Cache::identity(ctx, &req);
        let anonymous = id(&ctx);
        let principal = |sub: Option<&str>, claims: serde_json::Value| crate::Principal {
            subject: sub.map(String::from),
            claims: Arc::new(claims.as_object().cloned().unwrap()),
            verified_by: "jwt",
        };
        ctx.principal = Some(principal(None, serde_json::json!({"uid": 1})));
        let one = id(&ctx);
        ctx.principal = Some(principal(None, serde_json::json!({"uid": 2})));
        let two = id(&ctx);
        ctx.principal = Some(principal(Some("alice"), serde_json::json!({"tenant": "a"})));
        let alice_a = id(&ctx);
        ctx.principal = Some(principal(Some("alice"), serde_json::json!({"tenant": "b"})));
        let alice_b = id(&ctx);
        let all = [&anonymous, &one, &two, &alice_a, &alice_b];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    fn config(text: &str) -> CacheConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn config_errors_name_their_key() {
        let paths = |c: &CacheConfig| -> Vec<String> {
            config::validate(c).into_iter().map(|e| e.path).collect()
        };
        assert!(paths(&config("")).is_empty());
        assert_eq!(
            paths(&config("max_size = \"1MiB\"\nmax_object_size = \"2MiB\"")),
            ["max_object_size"]
        );
        assert!(paths(&config("max_size = 0")).contains(&"max_size".to_string()));
        assert_eq!(paths(&config("key_headers = [\"bad header\"]")), ["key_headers[0]"]);
        assert_eq!(paths(&config("max_ttl = \"0s\"")), ["max_ttl"]);
        assert!(toml::from_str::<CacheConfig>("max_sise = 1").is_err());
    }
}
