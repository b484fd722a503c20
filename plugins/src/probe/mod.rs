//! `probe` (test builds only, feature `testing`): records every hook the gateway calls on it
//! for a request, in order, and reports them to the client in `x-probe-hooks`, so integration
//! tests can prove through real sockets when each hook runs and with what. With the request
//! header `x-probe-body: append` it also appends `\n[probe] response_body bytes=N` to a
//! proxied response body (sent chunked: it removes `Content-Length`). With `x-probe-cache: on`
//! it turns Pingora's cache on for the request (an in-memory store of its own, keyed by path,
//! every 200 kept for a minute), so tests see the cache hooks run.
//!
//! ```toml
//! [plugins.probe]
//! type = "probe"
//! ```
//! Never compiled into a release build: the gateway's dev-dependency turns the feature on.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use serde::Deserialize;

use crate::{
    Attempt, BuildEnv, BuildError, DynPlugin, Erased, Flow, Plugin, PluginType, RequestCtx,
    Result, UpstreamFailure,
};

/// The response header that lists the hooks seen.
pub const HEADER: &str = "x-probe-hooks";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Anything: changing it makes a reload build the plugin again.
    #[serde(default)]
    pub label: String,
}

impl PluginType for ProbeConfig {
    const KIND: &'static str = "probe";

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let lifecycle = env
            .registry
            .counter("lifecycle_total", "Probe plugin starts and stops.", &["event"])
            .map_err(|e| vec![e])?;
        // Pingora's cache wants a `'static` store; a test-only plugin may leak one per build.
        let store: &'static pingora::cache::MemCache =
            Box::leak(Box::new(pingora::cache::MemCache::new()));
        Ok(Erased::into_dyn(Probe { lifecycle, store }))
    }
}

/// `sallyport_probe_lifecycle_total{event="start"|"stop"}` counts `start` and `stop` calls.
pub struct Probe {
    lifecycle: prometheus::IntCounterVec,
    store: &'static pingora::cache::MemCache,
}

/// What one request showed the probe.
#[derive(Default)]
pub struct Seen {
    hooks: Vec<String>,
    request_bytes: usize,
    response_bytes: usize,
    append: bool,
}

fn attempt_str(a: &Attempt) -> String {
    format!("{}#{}@{}", a.upstream, a.number, a.endpoint)
}

#[async_trait]
impl Plugin for Probe {
    type State = Seen;

    async fn start(&self) {
        self.lifecycle.with_label_values(&["start"]).inc();
    }

    async fn stop(&self) {
        self.lifecycle.with_label_values(&["stop"]).inc();
    }

    async fn request_filter(
        &self,
        _s: &mut Session,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<Flow> {
        seen.hooks.push("request_filter".into());
        seen.append = _s
            .req_header()
            .headers
            .get("x-probe-body")
            .is_some_and(|v| v == "append");
        Ok(Flow::Continue)
    }

    async fn upstream_request_filter(
        &self,
        _s: &mut Session,
        _r: &mut RequestHeader,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<()> {
        seen.hooks.push("upstream_request_filter".into());
        Ok(())
    }

    async fn upstream_response(
        &self,
        _s: &mut Session,
        response: &mut ResponseHeader,
        attempt: &Attempt,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<()> {
        seen.hooks.push(format!(
            "upstream_response({},{})",
            response.status.as_u16(),
            attempt_str(attempt)
        ));
        Ok(())
    }

    fn upstream_failure(
        &self,
        attempt: &Attempt,
        failure: UpstreamFailure,
        retrying: bool,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) {
        seen.hooks.push(format!(
            "upstream_failure({},{},{})",
            failure.as_str(),
            attempt_str(attempt),
            if retrying { "retrying" } else { "final" }
        ));
    }

    async fn request_body(
        &self,
        _s: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<()> {
        seen.request_bytes += body.as_ref().map_or(0, |b| b.len());
        if end_of_stream {
            seen.hooks.push(format!("request_body({})", seen.request_bytes));
        }
        Ok(())
    }

    fn response_body(
        &self,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<()> {
        seen.response_bytes += body.as_ref().map_or(0, |b| b.len());
        if end_of_stream && seen.append {
            let tail = format!("\n[probe] response_body bytes={}", seen.response_bytes);
            let mut out = body.take().map(|b| b.to_vec()).unwrap_or_default();
            out.extend_from_slice(tail.as_bytes());
            *body = Some(bytes::Bytes::from(out));
        }
        Ok(())
    }

    fn request_cache(&self, s: &mut Session, _c: &mut RequestCtx, seen: &mut Seen) -> Result<()> {
        if s.req_header().headers.get("x-probe-cache").is_some_and(|v| v == "on") {
            seen.hooks.push("request_cache".into());
            s.cache.enable(self.store, None, None, None, None);
        }
        Ok(())
    }

    fn cache_key(
        &self,
        s: &Session,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<Option<crate::CacheKey>> {
        seen.hooks.push("cache_key".into());
        // Only the primary part (the path) is hashed; the user tag is a label.
        Ok(Some(crate::CacheKey::new(
            s.req_header().uri.path().to_string(),
            "probe",
        )))
    }

    async fn cache_hit(
        &self,
        _s: &mut Session,
        _meta: &crate::CacheMeta,
        _hit: &mut crate::HitHandler,
        is_fresh: bool,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<Option<crate::ForcedFreshness>> {
        seen.hooks.push(format!("cache_hit(fresh={is_fresh})"));
        Ok(None)
    }

    fn response_cache(
        &self,
        _s: &Session,
        response: &ResponseHeader,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<Option<crate::RespCacheable>> {
        seen.hooks.push("response_cache".into());
        if response.status != 200 {
            return Ok(None);
        }
        let now = std::time::SystemTime::now();
        let meta = crate::CacheMeta::new(
            now + std::time::Duration::from_secs(60),
            now,
            0,
            0,
            response.clone(),
        );
        Ok(Some(crate::RespCacheable::Cacheable(meta)))
    }

    async fn response_filter(
        &self,
        _s: &mut Session,
        response: &mut ResponseHeader,
        _c: &mut RequestCtx,
        seen: &mut Seen,
    ) -> Result<()> {
        seen.hooks.push("response_filter".into());
        if seen.append {
            response.remove_header(&http::header::CONTENT_LENGTH);
        }
        response.insert_header(HEADER, seen.hooks.join(" "))
    }
}
