//! `aggregate`: one client call fans out in parallel to several upstream pools and returns one
//! JSON document (the backend-for-frontend pattern: a web endpoint and a slimmer mobile one
//! over the same services).
//!
//! Phases: `request_filter` (runs the calls and answers; the route needs no upstream).
//! Per-request state: none. Calls use the gateway's pools (balancing, health, timeouts,
//! pooled connections), each with its own deadline inside an overall one; late calls are
//! cancelled. The answer is `{"<call>": <json or null>, ..., "warnings": [...]}` in config
//! order, with `x-aggregate-complete: true|false`. A failed optional call yields `null` and a
//! warning `{"call", "code": timeout|upstream_error|unavailable|bad_response}`; a failed
//! required call fails the request (504 on timeout, else 502) naming the call.
//!
//! Every call carries the caller's verified identity headers (`RequestCtx::identity_headers`),
//! `x-request-id`, a `traceparent` with the request's trace id and a new span id per call,
//! `tracestate`, `x-forwarded-for`, and the `forward_headers` allowlist; nothing else from the
//! client, so client-supplied identity headers never reach a call.
//!
//! ```toml
//! [plugins.web-dashboard]
//! type = "aggregate"
//! timeout = "800ms"
//! calls = [
//!   { name = "user", upstream = "users", path = "/users/{path.id}", required = true, timeout = "300ms" },
//!   { name = "orders", upstream = "orders", path = "/orders?user={path.id}&limit=5", extract = "items" },
//! ]
//! ```
//! Metrics: `sallyport_aggregate_calls_total{route,call,outcome}`,
//! `sallyport_aggregate_call_duration_seconds{route,call}`; the access log gets `calls`.

mod config;
mod shape;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

pub use config::{AggregateConfig, CallConfig};
pub use shape::Shape;
pub use crate::template::Template;

use crate::conf::{parse_error, parse_errors, value, values};
use crate::trace::nonzero_span_id;
use crate::{
    ApiError, BuildEnv, BuildError, CallError, DynPlugin, Erased, Flow, Hooks, Plugin,
    PluginMetrics, Reply, RequestCtx, Result, UpstreamRequest, Upstreams,
};

const X_AGGREGATE_COMPLETE: HeaderName = HeaderName::from_static("x-aggregate-complete");

struct Call {
    name: String,
    /// The name as a JSON string, ready to write.
    key_json: String,
    upstream: String,
    method: Method,
    path: Template,
    required: bool,
    timeout: Duration,
    shape: Shape,
}

/// The built `aggregate` plugin.
pub struct Aggregate {
    /// `Cache-Control` of complete answers.
    cache_control: http::HeaderValue,
    calls: Vec<Call>,
    timeout: Duration,
    max_body: usize,
    forward_headers: Vec<HeaderName>,
    upstreams: Arc<dyn Upstreams>,
    metrics: Arc<PluginMetrics>,
}

/// Checks a config without the pools (what `--check` can see); every problem with its path.
pub fn validate(c: &AggregateConfig) -> Vec<BuildError> {
    let mut errors = Vec::new();
    if http::HeaderValue::from_str(&c.cache_control).is_err() {
        errors.push(BuildError::new("cache_control", "is not a valid header value"));
    }
    if c.timeout.get().is_zero() {
        errors.push(BuildError::new("timeout", "must be greater than 0"));
    }
    if c.max_body.get() == 0 {
        errors.push(BuildError::new("max_body", "must be greater than 0"));
    }
    if c.calls.is_empty() {
        errors.push(BuildError::new("calls", "at least one call is needed"));
    }
    errors.extend(parse_errors("forward_headers", &c.forward_headers));
    let mut names = HashSet::new();
    for (i, call) in c.calls.iter().enumerate() {
        let p = format!("calls[{i}]");
        if call.name.trim().is_empty() {
            errors.push(BuildError::new(format!("{p}.name"), "must not be empty"));
        } else if call.name == "warnings" {
            errors.push(BuildError::new(
                format!("{p}.name"),
                "\"warnings\" is reserved for the warnings list",
            ));
        } else if !names.insert(call.name.as_str()) {
            errors.push(BuildError::new(
                format!("{p}.name"),
                format!("duplicate call name {:?}", call.name),
            ));
        }
        errors.extend(parse_error(format!("{p}.path"), &call.path));
        errors.extend(parse_error(format!("{p}.method"), &call.method));
        if let Some(t) = call.timeout {
            if t.get().is_zero() {
                errors.push(BuildError::new(
                    format!("{p}.timeout"),
                    "must be greater than 0",
                ));
            } else if t.get() > c.timeout.get() {
                errors.push(BuildError::new(
                    format!("{p}.timeout"),
                    format!("{t} is longer than the overall timeout {}", c.timeout),
                ));
            }
        }
        if call
            .extract
            .as_deref()
            .is_some_and(|e| e.split('.').any(str::is_empty))
        {
            errors.push(BuildError::new(
                format!("{p}.extract"),
                "write a dotted path like \"data.items\"",
            ));
        }
    }
    errors
}

/// Upstream pools a config refers to, with their paths (checked against `[upstreams]`).
pub fn upstream_refs(c: &AggregateConfig) -> Vec<(String, String)> {
    c.calls
        .iter()
        .enumerate()
        .map(|(i, call)| (format!("calls[{i}].upstream"), call.upstream.clone()))
        .collect()
}

impl Aggregate {
    pub fn build(
        c: &AggregateConfig,
        env: &BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let mut errors = validate(c);
        for (path, name) in upstream_refs(c) {
            if !env.upstreams.has(&name) {
                errors.push(BuildError::new(path, format!("unknown upstream {name:?}")));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let calls = c
            .calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                Ok(Call {
                    key_json: serde_json::to_string(&call.name)
                        .map_err(|e| vec![BuildError::new(format!("calls[{i}].name"), e.to_string())])?,
                    name: call.name.clone(),
                    upstream: call.upstream.clone(),
                    method: value(&format!("calls[{i}].method"), &call.method)?,
                    path: value(&format!("calls[{i}].path"), &call.path)?,
                    required: call.required,
                    timeout: call.timeout.map_or(c.timeout.get(), |t| t.get()),
                    shape: Shape {
                        extract: call
                            .extract
                            .as_deref()
                            .map(|e| e.split('.').map(str::to_string).collect())
                            .unwrap_or_default(),
                        limit: call.limit,
                        select: call.select.clone(),
                        rename: call.rename.clone(),
                    },
                })
            })
            .collect::<std::result::Result<_, Vec<BuildError>>>()?;
        let cache_control = http::HeaderValue::from_str(&c.cache_control).map_err(|_| {
            vec![BuildError::new("cache_control", "is not a valid header value")]
        })?;
        Ok(Erased::into_dyn(Aggregate {
            cache_control,
            calls,
            timeout: c.timeout.get(),
            max_body: usize::try_from(c.max_body.get()).unwrap_or(usize::MAX),
            forward_headers: values("forward_headers", &c.forward_headers)?,
            upstreams: Arc::clone(&env.upstreams),
            metrics: Arc::clone(&env.metrics),
        }))
    }

    /// The headers every call carries.
    fn call_headers(&self, session: &Session, ctx: &RequestCtx) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
        let req = session.req_header();
        for name in &self.forward_headers {
            if let Some(v) = req.headers.get(name) {
                headers.push((name.clone(), v.clone()));
            }
        }
        // Identity last, so an allowlisted header can never stand in for it.
        headers.retain(|(n, _)| !ctx.identity_headers.iter().any(|(i, _)| i == n));
        headers.extend(ctx.identity_headers.iter().cloned());
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            headers.push((crate::trace::X_REQUEST_ID, v));
        }
        if let Some(ip) = ctx.client_ip {
            if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
                headers.push((HeaderName::from_static("x-forwarded-for"), v));
            }
        }
        if let Some(state) = ctx.trace.as_ref().and_then(|t| t.tracestate.as_deref()) {
            if let Ok(v) = HeaderValue::from_str(state) {
                headers.push((crate::trace::TRACESTATE, v));
            }
        }
        headers.push((
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        ));
        headers
    }
}

/// What became of one call.
enum Outcome {
    Ok(serde_json::Value),
    Failed(&'static str, String),
}

fn classify(
    result: std::result::Result<crate::UpstreamResponse, CallError>,
    shape: &Shape,
) -> Outcome {
    match result {
        Ok(resp) if (200..300).contains(&resp.status) => {
            match serde_json::from_slice::<serde_json::Value>(&resp.body) {
                Ok(v) => match shape.apply(v) {
                    Some(v) => Outcome::Ok(v),
                    None => Outcome::Failed(
                        "bad_response",
                        "the response lacks the extracted part".into(),
                    ),
                },
                Err(_) => Outcome::Failed("bad_response", "the response is not JSON".into()),
            }
        }
        Ok(resp) => Outcome::Failed("upstream_error", format!("status {}", resp.status)),
        Err(CallError::Timeout) => {
            Outcome::Failed("timeout", "no answer within the deadline".into())
        }
        Err(CallError::Unavailable(m)) => Outcome::Failed("unavailable", m),
        Err(e @ CallError::Overloaded(_)) => Outcome::Failed("unavailable", e.to_string()),
        Err(CallError::UnknownUpstream(m)) => {
            Outcome::Failed("unavailable", format!("no upstream {m}"))
        }
        Err(CallError::BodyTooLarge(n)) => {
            Outcome::Failed("bad_response", format!("body over {n} bytes"))
        }
        Err(CallError::Upstream(m)) => Outcome::Failed("upstream_error", m),
    }
}

#[async_trait]
impl Plugin for Aggregate {
    type State = ();

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        let started = Instant::now();
        let base_headers = self.call_headers(session, ctx);
        let req = session.req_header();
        let mut pending = Vec::with_capacity(self.calls.len());
        let mut span_ids = Vec::with_capacity(self.calls.len());
        let calls_started = std::time::SystemTime::now();
        for call in &self.calls {
            let path = match call.path.render(req, ctx) {
                Ok(p) => p,
                Err(missing) => {
                    pending.push(None);
                    if call.required {
                        // A claim without any verified principal means the caller is not
                        // authenticated (401); anything else is a bad request (400).
                        let (status, code) =
                            if missing.starts_with("{claim.") && ctx.principal.is_none() {
                                (401, "unauthorized")
                            } else {
                                (400, "bad_request")
                            };
                        return Ok(Flow::Respond(Reply::Error(
                            ApiError::new(
                                status,
                                code,
                                format!(
                                    "call {} needs {missing}, which this request lacks",
                                    call.name
                                ),
                            )
                            .with_reason("missing_parameter"),
                        )));
                    }
                    continue;
                }
            };
            let mut headers = base_headers.clone();
            let span = nonzero_span_id(&mut rand::rng());
            if let Some(trace) = &ctx.trace {
                if let Ok(v) = HeaderValue::from_str(&trace.traceparent_with_span(&span)) {
                    headers.push((crate::trace::TRACEPARENT, v));
                }
            }
            span_ids.push((call.name.as_str(), span));
            pending.push(Some(UpstreamRequest {
                method: call.method.clone(),
                path_and_query: path,
                headers,
                body: Bytes::new(),
                timeout: call.timeout.min(self.timeout),
                max_body: self.max_body,
                balance_key: self.upstreams.balance_key(&call.upstream, req, ctx),
            }));
        }

        let upstreams = &self.upstreams;
        let runs = self
            .calls
            .iter()
            .zip(pending)
            .map(|(call, request)| async move {
                let t0 = Instant::now();
                let outcome = match request {
                    Some(r) => classify(upstreams.send(&call.upstream, r).await, &call.shape),
                    None => Outcome::Failed("unavailable", "a template value is missing".into()),
                };
                (outcome, t0.elapsed())
            });
        // Each call's own deadline is at most the overall one and all start now, so this
        // join finishes by the overall deadline; the outer timeout is the safety net.
        let results = match tokio::time::timeout(
            self.timeout + Duration::from_millis(50),
            futures_join(runs),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => self
                .calls
                .iter()
                .map(|_| {
                    (
                        Outcome::Failed("timeout", "overall deadline".into()),
                        self.timeout,
                    )
                })
                .collect(),
        };

        let mut body = Vec::with_capacity(1024);
        body.push(b'{');
        let mut warnings = Vec::new();
        let mut log = Vec::with_capacity(self.calls.len());
        let mut failed_required: Option<(&Call, &'static str, String)> = None;
        for (i, (call, (outcome, took))) in self.calls.iter().zip(results).enumerate() {
            let code = match &outcome {
                Outcome::Ok(_) => "ok",
                Outcome::Failed(code, _) => code,
            };
            self.metrics
                .aggregate_calls
                .with_label_values(&[&*ctx.route, &call.name, code])
                .inc();
            self.metrics
                .aggregate_call_duration
                .with_label_values(&[&*ctx.route, &call.name])
                .observe(took.as_secs_f64());
            log.push(serde_json::json!({"call": call.name, "outcome": code, "ms": (took.as_secs_f64() * 1e6).round() / 1e3}));
            if let Some((_, span_id)) = span_ids.iter().find(|(n, _)| *n == call.name.as_str()) {
                ctx.call_spans.push(crate::CallSpan {
                    name: Arc::from(call.name.as_str()),
                    upstream: Arc::from(call.upstream.as_str()),
                    span_id: *span_id,
                    start: calls_started,
                    duration: took,
                    outcome: code,
                });
            }
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(call.key_json.as_bytes());
            body.push(b':');
            match outcome {
                Outcome::Ok(v) => {
                    serde_json::to_writer(&mut body, &v).map_err(|e| {
                        pingora::Error::because(pingora::ErrorType::InternalError, "encoding", e)
                    })?;
                }
                Outcome::Failed(code, detail) => {
                    body.extend_from_slice(b"null");
                    if call.required && failed_required.is_none() {
                        failed_required = Some((call, code, detail));
                    } else if !call.required {
                        warnings.push(serde_json::json!({"call": call.name, "code": code}));
                    }
                }
            }
        }
        ctx.log_fields
            .push(("calls", serde_json::Value::Array(log)));
        if let Some((call, code, detail)) = failed_required {
            // The detail (addresses, upstream errors) is for operators, not clients.
            log::warn!(
                "aggregate {}: required call {} failed: {code} ({detail})",
                ctx.route,
                call.name
            );
            let status = if code == "timeout" { 504 } else { 502 };
            return Ok(Flow::Respond(Reply::Error(
                ApiError::new(
                    status,
                    if code == "timeout" {
                        "upstream_timeout"
                    } else {
                        "upstream_error"
                    },
                    format!("required call {} failed: {code}", call.name),
                )
                .with_reason("required_call_failed"),
            )));
        }
        body.extend_from_slice(b",\"warnings\":");
        serde_json::to_writer(&mut body, &warnings).map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InternalError, "encoding", e)
        })?;
        body.push(b'}');

        let mut header = ResponseHeader::build(200, Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        if warnings.is_empty() {
            header.insert_header(http::header::CACHE_CONTROL, self.cache_control.clone())?;
        } else {
            header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        }
        header.insert_header(
            X_AGGREGATE_COMPLETE,
            if warnings.is_empty() { "true" } else { "false" },
        )?;
        log::debug!("aggregate answered in {:?}", started.elapsed());
        Ok(Flow::Respond(Reply::Full {
            header: Box::new(header),
            body: Bytes::from(body),
        }))
    }
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    futures_util::future::join_all(futs).await
}

impl crate::PluginType for AggregateConfig {
    const KIND: &'static str = "aggregate";
    const RESPONDS: bool = true;

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn upstream_refs(&self) -> Vec<(String, String)> {
        upstream_refs(self)
    }

    fn path_params(&self) -> Vec<(String, String)> {
        self.calls
            .iter()
            .enumerate()
            .flat_map(|(i, call)| {
                call.path.get().into_iter().flat_map(move |t| {
                    t.path_params()
                        .map(move |name| (format!("calls[{i}].path"), name.to_string()))
                })
            })
            .collect()
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Aggregate::build(self, env)
    }
}
