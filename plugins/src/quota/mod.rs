//! `quota`: rate limits per key, on this gateway or fleet-wide through Redis.
//!
//! Phases: `request_filter` (decide; 429 with `Retry-After` when over), `response_filter`
//! (`RateLimit-Policy` and `RateLimit` on every response of the route, allowed or not, per
//! the IETF httpapi ratelimit-headers draft (draft-ietf-httpapi-ratelimit-headers-09/-10,
//! structured fields): `RateLimit-Policy: "NAME";q=LIMIT;w=SECONDS`,
//! `RateLimit: "NAME";r=REMAINING;t=SECONDS`; optionally the legacy `X-RateLimit-*` triple).
//! Both fields are lists: several quotas on one route (say per second and per day) each add
//! their item, and the legacy triple reports the most restrictive of them.
//! Per-request state: the decision, for the headers.
//!
//! The algorithm is a sliding-window counter (see `window.rs`): smooth at window edges, exact
//! `Retry-After`. The local store is a sharded map bounded by `max_keys`; the Redis store runs
//! one atomic script per decision on Redis's clock and reconnects by itself; when Redis fails
//! or is slow, `on_store_error` decides and the gateway keeps serving.
//!
//! ```toml
//! [plugins.per-user]
//! type = "quota"
//! key = "claim:sub"          # ip | header:NAME | claim:NAME | api_key | route, or a list
//! limit = 100
//! window = "1m"
//! store = "redis"
//! redis_url = "redis://127.0.0.1:6379"
//! on_store_error = "allow"
//! ```
//! Metrics: `sallyport_quota_decisions_total{route,plugin,decision}` (allowed, rejected,
//! store_error_allowed, store_error_denied, store_error_local),
//! `sallyport_quota_store_errors_total{plugin}`, and rejections in
//! `sallyport_plugin_rejections_total` (reasons `rate_limited`, `missing_key`,
//! `store_unavailable`).

mod config;
mod local;
mod redis_store;
pub mod window;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

pub use config::{KeySpec, MissingKey, OnStoreError, QuotaConfig, Store};
pub use local::LocalStore;
pub use redis_store::RedisStore;
use window::{Decision, Policy};

use crate::key::RequestKey;
use crate::{
    ApiError, BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, PluginMetrics, Reply,
    RequestCtx, Result,
};

// Names as static strings: Pingora copies a `HeaderName` into its case map on every insert.
const RATELIMIT_POLICY: &str = "ratelimit-policy";
const RATELIMIT: &str = "ratelimit";
const X_LIMIT: &str = "x-ratelimit-limit";
const X_REMAINING_NAME: &str = "x-ratelimit-remaining";
const X_REMAINING: HeaderName = HeaderName::from_static(X_REMAINING_NAME);
const X_RESET: &str = "x-ratelimit-reset";

enum Backend {
    Local(LocalStore),
    Redis {
        redis: Box<RedisStore>,
        fallback: Option<LocalStore>,
    },
}

/// The built `quota` plugin.
pub struct Quota {
    name: Arc<str>,
    keys: Vec<RequestKey>,
    policy: Policy,
    /// `"NAME";q=LIMIT;w=SECONDS`.
    /// `RateLimit-Policy` item, built once (a shared value, cloned without copying).
    policy_header: HeaderValue,
    /// `"NAME"`, the policy's name as a structured-field string.
    policy_name: String,
    backend: Backend,
    on_store_error: OnStoreError,
    missing_key: MissingKey,
    legacy_headers: bool,
    metrics: Arc<PluginMetrics>,
}

/// Checks a config; every problem with its path.
pub fn validate(c: &QuotaConfig) -> Vec<BuildError> {
    let mut errors = Vec::new();
    if c.limit == 0 {
        errors.push(BuildError::new("limit", "must be at least 1"));
    }
    if c.window.get().as_millis() == 0 {
        errors.push(BuildError::new("window", "must be at least 1ms"));
    }
    let parts = c.key.parts();
    if parts.is_empty() {
        errors.push(BuildError::new("key", "name at least one key"));
    }
    for (path, p) in parts {
        errors.extend(crate::conf::parse_error(path, p));
    }
    match (c.store, c.redis_target()) {
        (_, Err(e)) => errors.extend(e),
        (Store::Redis, Ok(None)) => errors.push(BuildError::new(
            "redis_url",
            "required with store = \"redis\" (or redis_cluster, redis_sentinel), e.g. \"redis://127.0.0.1:6379\"",
        )),
        (Store::Local, Ok(Some(_))) => errors.push(BuildError::new(
            "store",
            "redis_url, redis_cluster and redis_sentinel are only used with store = \"redis\"",
        )),
        _ => {}
    }
    if c.redis_timeout.get().is_zero() {
        errors.push(BuildError::new("redis_timeout", "must be greater than 0"));
    }
    if c.max_keys == 0 {
        errors.push(BuildError::new("max_keys", "must be at least 1"));
    }
    errors
}

impl Quota {
    pub fn build(
        c: &QuotaConfig,
        env: &BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Ok(Erased::into_dyn(Self::new(c, env)?))
    }

    pub fn new(c: &QuotaConfig, env: &BuildEnv) -> std::result::Result<Quota, Vec<BuildError>> {
        let errors = validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        let keys = c
            .key
            .parts()
            .into_iter()
            .map(|(path, p)| crate::conf::value(&path, p))
            .collect::<std::result::Result<_, _>>()?;
        let window_ms = u64::try_from(c.window.get().as_millis()).unwrap_or(u64::MAX);
        let target = c.redis_target()?;
        let backend = match (c.store, target) {
            (Store::Redis, Some(target)) => Backend::Redis {
                redis: Box::new(
                    RedisStore::new(
                        &target,
                        c.redis_timeout.get(),
                        &format!("{}:{}", c.key_prefix, env.name),
                    )
                    .map_err(|m| vec![BuildError::new("redis_url", m)])?,
                ),
                fallback: (c.on_store_error == OnStoreError::Local)
                    .then(|| LocalStore::new(c.max_keys)),
            },
            _ => Backend::Local(LocalStore::new(c.max_keys)),
        };
        Ok(Quota {
            // sf_string yields visible ASCII only, so the value is always a valid header.
            policy_header: HeaderValue::try_from(format!(
                "{};q={};w={}",
                sf_string(&env.name),
                c.limit,
                window_ms.div_ceil(1000).max(1)
            ))
            .map_err(|e| vec![BuildError::new("", format!("RateLimit-Policy value: {e}"))])?,
            policy_name: sf_string(&env.name),
            name: Arc::clone(&env.name),
            keys,
            policy: Policy {
                quota: c.limit,
                ceiling: c.limit.saturating_add(c.burst),
                window_ms: window_ms.max(1),
            },
            backend,
            on_store_error: c.on_store_error,
            missing_key: c.missing_key,
            legacy_headers: c.legacy_headers,
            metrics: Arc::clone(&env.metrics),
        })
    }

    /// The counting key of a request; `None` when an attribute is missing.
    fn key_of(&self, session: &Session, ctx: &RequestCtx) -> Option<String> {
        let req = session.req_header();
        let mut key = String::new();
        for part in &self.keys {
            let value = part.value(req, ctx)?;
            // Length-prefixed, so no value can imitate a combination of others.
            let mut digits = itoa::Buffer::new();
            let len = digits.format(value.len());
            key.reserve(len.len() + 1 + value.len());
            key.push_str(len);
            key.push(':');
            key.push_str(&value);
        }
        Some(compact(key))
    }

    fn count(&self, ctx: &RequestCtx, decision: &'static str) {
        self.metrics
            .quota_decisions
            .with_label_values(&[&*ctx.route, &*self.name, decision])
            .inc();
    }

    /// Decides for a key; `Ok(None)` when the store failed and the request goes on uncounted.
    async fn decide(
        &self,
        key: &str,
        ctx: &RequestCtx,
    ) -> std::result::Result<Option<Decision>, ApiError> {
        match &self.backend {
            Backend::Local(store) => Ok(Some(store.hit(&self.policy, key, now_ms()))),
            Backend::Redis { redis, fallback } => match redis.hit(&self.policy, key).await {
                Ok(d) => Ok(Some(d)),
                Err(reason) => {
                    self.metrics
                        .quota_store_errors
                        .with_label_values(&[&*self.name])
                        .inc();
                    // RedisStore logs the failure once per outage, not once per request.
                    log::debug!("quota {}: {reason}; applying on_store_error", self.name);
                    match (self.on_store_error, fallback) {
                        (OnStoreError::Local, Some(local)) => {
                            self.count(ctx, "store_error_local");
                            Ok(Some(local.hit(&self.policy, key, now_ms())))
                        }
                        (OnStoreError::Deny, _) => {
                            self.count(ctx, "store_error_denied");
                            Err(ApiError::new(
                                503,
                                "quota_unavailable",
                                "the quota store is unavailable; try again shortly",
                            )
                            .with_reason("store_unavailable")
                            .with_header(RETRY_AFTER, "1"))
                        }
                        _ => {
                            self.count(ctx, "store_error_allowed");
                            Ok(None)
                        }
                    }
                }
            },
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Longest key kept as it is; longer ones are stored as a digest.
const MAX_PLAIN_KEY: usize = 64;

/// Bounds the size of a stored key. A header can carry up to a megabyte, so `max_keys` alone
/// would not bound memory (or Redis key sizes) under a flood of long distinct values: keys
/// longer than `MAX_PLAIN_KEY` become `#` and the hex SHA-256 of the key. A composed key
/// always starts with a digit (its first length prefix), so no client value can imitate a
/// digest.
fn compact(key: String) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    if key.len() <= MAX_PLAIN_KEY {
        return key;
    }
    let mut out = String::with_capacity(65);
    out.push('#');
    for b in Sha256::digest(key.as_bytes()) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// A structured-field string (RFC 8941 sf-string) naming the policy: printable ASCII with
/// `"` and `\` escaped; any other character (a plugin name is free text) becomes `_`.
fn sf_string(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for ch in name.chars() {
        match ch {
            '"' | '\\' => {
                out.push('\\');
                out.push(ch);
            }
            ' '..='~' => out.push(ch),
            _ => out.push('_'),
        }
    }
    out.push('"');
    out
}

/// Whether the response already carries a legacy `X-RateLimit-Remaining` at or below
/// `remaining` (another quota of the route, or the upstream, is at least as restrictive).
fn tighter_legacy_present(response: &ResponseHeader, remaining: u64) -> bool {
    response
        .headers
        .get(&X_REMAINING)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|other| other <= remaining)
}

#[async_trait]
impl Plugin for Quota {
    type State = Option<Decision>;

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            response_filter: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut Option<Decision>,
    ) -> Result<Flow> {
        // The gateway's own refresh of a stale cache entry is not a client's request.
        if ctx.background {
            return Ok(Flow::Continue);
        }
        let key = match self.key_of(session, ctx) {
            Some(k) => k,
            None => match (self.missing_key, ctx.client_ip) {
                (MissingKey::Ip, Some(ip)) => format!("missing-key-ip:{ip}"),
                (MissingKey::Unauthorized, _) | (MissingKey::Ip, None) => {
                    self.count(ctx, "rejected");
                    return Ok(Flow::Respond(Reply::Error(
                        ApiError::new(
                            401,
                            "unauthorized",
                            "this request has no identity to count a quota against",
                        )
                        .with_reason("missing_key"),
                    )));
                }
                (MissingKey::Reject, _) => {
                    self.count(ctx, "rejected");
                    return Ok(Flow::Respond(Reply::Error(
                        ApiError::new(
                            429,
                            "rate_limited",
                            "this request has no identity to count a quota against",
                        )
                        .with_reason("missing_key")
                        .with_header(RETRY_AFTER, secs_ceil(self.policy.window_ms).to_string()),
                    )));
                }
            },
        };
        let decision = match self.decide(&key, ctx).await {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(Flow::Continue),
            Err(err) => return Ok(Flow::Respond(Reply::Error(err))),
        };
        *state = Some(decision);
        // The decision is in the access log (`quota`) and on the request's span.
        let verdict = if decision.allowed { "allowed" } else { "rejected" };
        ctx.log_fields.push(("quota", verdict.into()));
        if decision.allowed {
            self.count(ctx, "allowed");
            return Ok(Flow::Continue);
        }
        self.count(ctx, "rejected");
        let retry = secs_ceil(decision.retry_after_ms).max(1);
        Ok(Flow::Respond(Reply::Error(
            ApiError::new(
                429,
                "rate_limited",
                format!(
                    "quota of {} requests per {}s exceeded; retry in {retry}s",
                    self.policy.quota,
                    secs_ceil(self.policy.window_ms)
                ),
            )
            .with_header(RETRY_AFTER, retry.to_string()),
        )))
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
        state: &mut Option<Decision>,
    ) -> Result<()> {
        let Some(d) = state else {
            return Ok(());
        };
        let reset = secs_ceil(d.reset_ms);
        // Appended, not replaced: both fields are lists with one item per policy, so every
        // quota of the route (and any the upstream reports) stays visible.
        response.append_header(RATELIMIT_POLICY, self.policy_header.clone())?;
        // `"name";r=REMAINING;t=RESET`, written without `fmt` (this runs for every answer).
        let mut numbers = itoa::Buffer::new();
        let mut value = String::with_capacity(self.policy_name.len() + 46);
        value.push_str(&self.policy_name);
        value.push_str(";r=");
        value.push_str(numbers.format(d.remaining));
        value.push_str(";t=");
        value.push_str(numbers.format(reset));
        response.append_header(RATELIMIT, value)?;
        if self.legacy_headers && !tighter_legacy_present(response, d.remaining) {
            response.insert_header(X_LIMIT, self.policy.quota.to_string())?;
            response.insert_header(X_REMAINING_NAME, d.remaining.to_string())?;
            response.insert_header(X_RESET, reset.to_string())?;
        }
        Ok(())
    }
}

impl crate::PluginType for QuotaConfig {
    const KIND: &'static str = "quota";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn keeps_state_across_reloads(&self) -> bool {
        true
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Quota::build(self, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_stored_as_digests() {
        let short = "9:10.1.2.3".to_string();
        assert_eq!(compact(short.clone()), short);
        let long_a = format!("1048576:{}a", "x".repeat(1_048_575));
        let long_b = format!("1048576:{}b", "x".repeat(1_048_575));
        let (a, b) = (compact(long_a.clone()), compact(long_b));
        assert_eq!(a.len(), 65);
        assert!(a.starts_with('#'));
        assert_ne!(a, b, "values differing only at the end stay apart");
        assert_eq!(a, compact(long_a), "stable");
    }

    #[test]
    fn policy_names_are_structured_field_strings() {
        assert_eq!(sf_string("per-user"), "\"per-user\"");
        assert_eq!(sf_string("a \"b\" \\c"), "\"a \\\"b\\\" \\\\c\"");
        assert_eq!(sf_string("ünï\tcode"), "\"_n__code\"");
    }

    #[test]
    fn legacy_headers_keep_the_most_restrictive_quota() {
        let mut r = ResponseHeader::build(200, None).unwrap();
        assert!(!tighter_legacy_present(&r, 5));
        r.insert_header(X_REMAINING, "3").unwrap();
        assert!(tighter_legacy_present(&r, 5));
        assert!(tighter_legacy_present(&r, 3));
        assert!(!tighter_legacy_present(&r, 2));
        r.insert_header(X_REMAINING, "garbage").unwrap();
        assert!(!tighter_legacy_present(&r, 2));
    }
}
