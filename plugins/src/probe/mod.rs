//! `probe` (test builds only, feature `testing`): records every hook the gateway calls on it
//! for a request, in order, and reports them to the client in `x-probe-hooks`, so integration
//! tests can prove through real sockets when each hook runs and with what. With the request
//! header `x-probe-body: append` it also appends `\n[probe] response_body bytes=N` to a
//! proxied response body (sent chunked: it removes `Content-Length`).
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
        Ok(Erased::into_dyn(Probe { lifecycle }))
    }
}

/// `sallyport_probe_lifecycle_total{event="start"|"stop"}` counts `start` and `stop` calls.
pub struct Probe {
    lifecycle: prometheus::IntCounterVec,
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
