//! The `ProxyHttp` implementation: normalise, route, run the plugin chain, pick an endpoint,
//! proxy, and always log. Every phase documents what it adds to Pingora's defaults.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH};
use http::{HeaderName, HeaderValue, Method};
use pingora::cache::key::HashBinary;
use pingora::cache::{
    CacheKey, CacheMeta, CachePhase, ForcedFreshness, HitHandler, NoCacheReason, RespCacheable,
};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use sallyport_plugins::trace::{X_REQUEST_ID, X_REQUEST_ID_NAME};
use sallyport_plugins::{
    request_id, ApiError, Attempt, DynPlugin, ErasedState, Flow, Reply, RequestCtx, UpstreamFailure,
};

use crate::access_log::AccessRecord;
use crate::client_ip::{FORWARDED, X_FORWARDED_FOR};
use crate::config::ClientIpHeader;
use crate::conn::{ConnState, Overrun};
use crate::log_window::{LogWindow, Verdict, ERROR_LOG_INTERVAL};
use crate::path::normalize;
use crate::resilience::{Failure, TryState, X_SALLYPORT_ATTEMPT};
use crate::router::{request_host, Lookup};
use crate::snapshot::{method_label, status_label, ChainEntry, Route, Snapshot};
use crate::telemetry::SpanRecorder;
use crate::upstream::{Pool, PoolSlot, Try};
use crate::Shared;

// Each name spelled once: the `&'static str` is what Pingora's `insert_header` takes without
// copying a `HeaderName` into its case map; the `HeaderName` is for lookups.
const X_FORWARDED_FOR_NAME: &str = "x-forwarded-for";
const X_FORWARDED_PROTO_NAME: &str = "x-forwarded-proto";
const X_FORWARDED_HOST_NAME: &str = "x-forwarded-host";
const FORWARDED_NAME: &str = "forwarded";
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static(X_FORWARDED_PROTO_NAME);
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static(X_FORWARDED_HOST_NAME);
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The error `upstream_response_filter` raises to try again after a status `retry_on` names.
const RETRY_STATUS: &str = "retried upstream status";

/// The gateway's `ProxyHttp` app.
pub struct Gateway {
    shared: Arc<Shared>,
    /// The route label of requests no route matched (shared, so no allocation per request).
    unmatched: Arc<str>,
    /// Rate limit of failure log lines of requests that have no upstream pool.
    error_log: LogWindow,
}

impl Gateway {
    pub fn new(shared: Arc<Shared>) -> Self {
        Gateway {
            shared,
            unmatched: Arc::from("unmatched"),
            error_log: LogWindow::default(),
        }
    }

    /// Whether Pingora should skip its log line for this failure: per upstream pool, the
    /// first failure of a window is logged and the rest are counted, then reported in one
    /// line (see [`LogWindow`]). Failures stay fully visible in metrics and the access log.
    fn quiet_failure(&self, ctx: &Ctx) -> bool {
        let (window, source) = match &ctx.pool {
            Some(p) => (&p.error_log, &*p.name),
            None => (&self.error_log, "gateway"),
        };
        match window.observe(Instant::now()) {
            Verdict::Suppress => true,
            Verdict::Log { suppressed: 0 } => false,
            Verdict::Log { suppressed } => {
                log::error!(
                    "upstream {source}: {suppressed} more failed requests were not logged in the \
                     last {}s (see sallyport_upstream_requests_total and the access log)",
                    ERROR_LOG_INTERVAL.as_secs()
                );
                false
            }
        }
    }
}

/// Per-request state of the gateway.
pub struct Ctx {
    /// The client connection's phase (see [`crate::conn`]); `None` for HTTP/2 streams.
    conn: Option<Arc<ConnState>>,
    snapshot: Option<Arc<Snapshot>>,
    route: Option<Arc<Route>>,
    pub req: RequestCtx,
    states: Vec<ErasedState>,
    /// How many chain entries ran their `request_filter` (response hooks run for these).
    ran: usize,
    /// Endpoints tried so far (retries go elsewhere).
    tried: Vec<SocketAddr>,
    /// The error to answer with when a phase fails with an `HTTPStatus` error.
    pending_error: Option<ApiError>,
    /// Code of the error the client got, for the access log.
    error_code: Option<&'static str>,
    /// `(plugin name, reason)` when a plugin rejected the request.
    rejected_by: Option<(Arc<str>, &'static str)>,
    status: u16,
    body_bytes: u64,
    upstream_started: Option<Instant>,
    upstream_response: Option<Instant>,
    /// `miss` or `expired` when a cache lookup went upstream (the cache phase may later turn
    /// to disabled when the response is not stored).
    cache_missed: Option<&'static str>,
    /// The pool the request goes to: the route's, or the one a plugin chose instead
    /// (`RequestCtx::upstream`, e.g. `traffic_split`).
    pool: Option<Arc<Pool>>,
    /// This request's spans while it runs, when `[telemetry]` is configured.
    spans: Option<SpanRecorder>,
    /// The try under way (its endpoint's load, latency and passive health).
    current_try: Option<Try>,
    /// The request's slot in its pool's `limits.max_in_flight`.
    slot: Option<PoolSlot>,
    /// The wait before the next try, decided when the last one failed.
    backoff: Option<std::time::Duration>,
    /// The try's timeouts were cut to the time left before the route's deadline.
    cut_by_deadline: bool,
    /// Errors the gateway makes are gRPC errors (a `grpc = true` route, or a gRPC request
    /// that matched no route).
    grpc: bool,
    /// `received_at + grpc-timeout` on a gRPC route.
    grpc_deadline: Option<Instant>,
    /// A gRPC-web request the bridge did not turn into gRPC: errors in its content type.
    grpc_web: bool,
}

/// The host a request is routed by: the URI's (HTTP/2 `:authority`, absolute form), else
/// `Host`.
fn routing_host(req: &pingora::http::RequestHeader) -> Cow<'_, str> {
    req.uri
        .host()
        .map(request_host)
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(request_host)
        })
        .unwrap_or_default()
}

impl Gateway {
    /// Whether the request would be routed to a `grpc = true` route.
    fn routes_to_grpc(&self, req: &pingora::http::RequestHeader) -> bool {
        let snapshot = self.shared.snapshot.load();
        let Ok(path) = normalize(req.uri.path(), snapshot.escaped_slashes) else {
            return false;
        };
        matches!(
            snapshot.router.lookup(&routing_host(req), &path, &req.method),
            Lookup::Found(i, _) if snapshot.routes[i].grpc
        )
    }

    /// Answers an error in the gateway's JSON shape (a gRPC error on a gRPC route).
    async fn respond_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        err: ApiError,
    ) -> Result<()> {
        let (mut header, body) = if ctx.grpc {
            (crate::grpc::error_header(&err, ctx.grpc_web)?, Bytes::new())
        } else {
            let body = Bytes::from(err.body(&ctx.req.request_id));
            (err.header()?, body)
        };
        header.insert_header(X_REQUEST_ID_NAME, ctx.req.request_id.as_str())?;
        ctx.error_code = Some(err.code);
        self.respond(session, ctx, header, body).await
    }

    /// Sends a complete response produced by the gateway or a plugin, after the response hooks
    /// of every plugin that ran.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        mut header: ResponseHeader,
        body: Bytes,
    ) -> Result<()> {
        let h2 = session.req_header().version == http::Version::HTTP_2;
        // A gRPC Trailers-Only answer over HTTP/2 ends on its HEADERS frame (END_STREAM on
        // it, not on an empty DATA frame after it: gRPC over HTTP/2, "Responses"), so no
        // framing header.
        let trailers_only = h2 && header.headers.contains_key(crate::grpc::GRPC_STATUS);
        // RFC 9110 8.6: no Content-Length in a 204 or 304 (nor a 1xx).
        if !matches!(header.status.as_u16(), 100..=199 | 204 | 304) && !trailers_only {
            header.insert_header(CONTENT_LENGTH, body.len())?;
        }
        self.response_hooks(session, &mut header, ctx).await?;
        ctx.status = header.status.as_u16();
        if trailers_only {
            session
                .write_response_tasks(vec![pingora::protocols::http::HttpTask::Header(
                    Box::new(header),
                    true,
                )])
                .await?;
            return Ok(());
        }
        let head = session.req_header().method == Method::HEAD;
        let end = body.is_empty() || head;
        session.write_response_header(Box::new(header), end).await?;
        if !end {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    async fn response_hooks(
        &self,
        session: &mut Session,
        header: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        if !route.hooks.response_filter {
            return Ok(());
        }
        for i in route.entries_running(ctx.ran, |h| h.response_filter).rev() {
            let entry = &route.chain[i];
            entry
                .plugin
                .response_filter(session, header, &mut ctx.req, &mut ctx.states[i])
                .await?;
        }
        Ok(())
    }

    /// A plugin answered with an error: who refused the request, for the access log and
    /// `sallyport_plugin_rejections_total`.
    fn note_rejection(&self, ctx: &mut Ctx, route: &Route, entry: &ChainEntry, reply: &Reply) {
        if let Reply::Error(err) = reply {
            ctx.rejected_by = Some((Arc::clone(&entry.name), err.reason));
            self.shared
                .metrics
                .plugin_rejections
                .with_label_values(&[&*route.name, &*entry.name, err.reason])
                .inc();
        }
    }

    /// Applies a plugin's answer.
    async fn reply(&self, session: &mut Session, ctx: &mut Ctx, reply: Reply) -> Result<()> {
        match reply {
            Reply::Error(err) => self.respond_error(session, ctx, err).await,
            Reply::Full { header, body } => {
                // A cache plugin ahead of the answering one may keep the answer.
                if let Some(route) = ctx.route.as_ref().filter(|r| r.hooks.cache).cloned() {
                    for i in route.entries_running(ctx.ran, |h| h.cache) {
                        route.chain[i].plugin.reply_cache(
                            session,
                            &header,
                            &body,
                            &mut ctx.req,
                            &mut ctx.states[i],
                        );
                    }
                }
                self.respond(session, ctx, *header, body).await
            }
        }
    }

    fn client_ip(&self, session: &Session, snapshot: &Snapshot) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip();
        Some(crate::client_ip::client_ip(
            peer,
            &session.req_header().headers,
            &snapshot.trusted_proxies,
            snapshot.client_ip_header,
        ))
    }

    /// The error a failed request answers with.
    fn error_for(&self, e: &Error, ctx: &mut Ctx) -> Option<ApiError> {
        if let Some(err) = ctx.pending_error.take() {
            return Some(err);
        }
        let body_overrun = ctx
            .conn
            .as_ref()
            .is_some_and(|c| c.overrun() == Some(Overrun::Body));
        let status = match e.etype() {
            _ if body_overrun => 408,
            ErrorType::HTTPStatus(code) => *code,
            // A client too slow for Pingora's own read timeout: its fault, not a bad request.
            ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => 408,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert
                if e.esource() == &ErrorSource::Upstream =>
            {
                return Some(ApiError::new(
                    502,
                    "upstream_tls",
                    "the TLS handshake with the upstream failed (certificate or protocol)",
                ));
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        return None
                    }
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        Some(match status {
            400 => ApiError::new(400, "bad_request", "the request could not be parsed"),
            408 => ApiError::new(
                408,
                "request_timeout",
                "the request body was not received in time (server.body_timeout)",
            ),
            413 => ApiError::new(
                413,
                "payload_too_large",
                "the request body exceeds server.max_body",
            ),
            502 => ApiError::new(502, "upstream_error", "the upstream failed to answer"),
            503 => ApiError::new(503, "unavailable", "no healthy upstream endpoint"),
            504 => ApiError::new(
                504,
                "upstream_timeout",
                "the upstream did not answer in time",
            ),
            500 => ApiError::new(
                500,
                "internal_error",
                "the gateway failed to handle the request",
            ),
            other => ApiError::new(other, "error", "the request failed"),
        })
    }

    /// `X-Forwarded-For/Proto/Host`, and `Forwarded` when it is the configured client-address
    /// header. From a trusted proxy the whole incoming chain (every field line) is kept and
    /// this hop appended; from anyone else the chain starts at the peer.
    fn forwarding_headers(
        &self,
        session: &Session,
        upstream_request: &mut RequestHeader,
        ctx: &Ctx,
        peer: IpAddr,
    ) -> Result<()> {
        let Some(snapshot) = ctx.snapshot.as_ref() else {
            return Ok(());
        };
        let trusted = snapshot.is_trusted_proxy(peer);
        let https = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        let chain = |name: &HeaderName| {
            trusted
                .then(|| crate::client_ip::joined(&upstream_request.headers, name))
                .flatten()
        };
        // Static names (see the constants) and static values where possible.
        // The address is written without `fmt` (`push_ip`): this runs for every request.
        let xff = match chain(&X_FORWARDED_FOR) {
            Some(mut prev) => {
                prev.push_str(", ");
                crate::telemetry::push_ip(&mut prev, peer);
                prev
            }
            None => {
                let mut out = String::with_capacity(15);
                crate::telemetry::push_ip(&mut out, peer);
                out
            }
        };
        // `Host`, or an HTTP/2 client's `:authority`.
        let req = session.req_header();
        // The `Host` header with its text, when it is text.
        let host_header = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| Some((h, h.to_str().ok()?)));
        let client_host = host_header
            .map(|(_, text)| text)
            .or_else(|| req.uri.authority().map(|a| a.as_str()));
        if snapshot.client_ip_header == ClientIpHeader::Forwarded {
            let host = client_host;
            let hop = crate::client_ip::forwarded_element(
                peer,
                if https { "https" } else { "http" },
                host,
            );
            let forwarded = match chain(&FORWARDED) {
                Some(prev) => format!("{prev}, {hop}"),
                None => hop,
            };
            upstream_request.insert_header(FORWARDED_NAME, forwarded)?;
        }
        upstream_request.insert_header(X_FORWARDED_FOR_NAME, xff)?;
        if !trusted || !upstream_request.headers.contains_key(&X_FORWARDED_PROTO) {
            let proto = if https {
                HeaderValue::from_static("https")
            } else {
                HeaderValue::from_static("http")
            };
            upstream_request.insert_header(X_FORWARDED_PROTO_NAME, proto)?;
        }
        if !trusted || !upstream_request.headers.contains_key(&X_FORWARDED_HOST) {
            // The `Host` value itself (shared bytes, no copy) when there is one.
            let host = host_header
                .map(|(value, _)| value.clone())
                .or_else(|| client_host.and_then(|h| HeaderValue::from_str(h).ok()));
            match host {
                Some(host) => upstream_request.insert_header(X_FORWARDED_HOST_NAME, host)?,
                None => {
                    upstream_request.remove_header(&X_FORWARDED_HOST);
                }
            }
        }
        Ok(())
    }

    /// The try that is under way: the route's pool, the endpoint last picked, its number.
    fn attempt(ctx: &Ctx) -> Option<Attempt> {
        let pool = ctx.pool.as_ref()?;
        Some(Attempt {
            upstream: Arc::clone(&pool.name),
            endpoint: *ctx.tried.last()?,
            number: ctx.tried.len(),
        })
    }

    /// Tells the chain's `upstream_failure` hooks about a failed try.
    fn failure_hooks(ctx: &mut Ctx, failure: UpstreamFailure, retrying: bool) {
        let Some(route) = ctx.route.clone() else {
            return;
        };
        if !route.hooks.upstream_failure {
            return;
        }
        let Some(attempt) = Self::attempt(ctx) else {
            return;
        };
        for i in route.entries_running(ctx.ran, |h| h.upstream_failure) {
            let entry = &route.chain[i];
            entry.plugin.upstream_failure(
                &attempt,
                failure,
                retrying,
                &mut ctx.req,
                &mut ctx.states[i],
            );
        }
    }

    /// Whether the failed try is repeated (the pool's policy, the route's deadline and the
    /// retry budget); the wait before the next try is kept for `upstream_peer`.
    fn decide_retry(
        session: &Session,
        ctx: &mut Ctx,
        failure: Failure,
        stale_connection: bool,
        now: Instant,
    ) -> bool {
        let Some(pool) = ctx.pool.clone() else {
            return false;
        };
        let req = session.req_header();
        let state = TryState {
            tries: ctx.tried.len(),
            idempotent_method: req.method.is_idempotent(),
            idempotency_key: req.headers.contains_key(&IDEMPOTENCY_KEY),
            replayable: !session.as_ref().retry_buffer_truncated(),
            deadline: Self::deadline(ctx),
            stale_connection,
        };
        match pool.retry(failure, &state, now) {
            Ok(wait) => {
                ctx.backoff = Some(wait);
                true
            }
            Err(_) => false,
        }
    }

    /// When the route's `timeout` (or a gRPC call's `grpc-timeout`) runs out.
    fn deadline(ctx: &Ctx) -> Option<Instant> {
        let route = ctx
            .route
            .as_ref()?
            .timeout
            .and_then(|t| ctx.req.received_at.checked_add(t));
        match (route, ctx.grpc_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn upstream_outcome(&self, ctx: &Ctx, outcome: &str) {
        if let Some(pool) = &ctx.pool {
            pool.count_outcome(&self.shared.metrics.upstream_requests, outcome);
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            conn: None,
            snapshot: None,
            route: None,
            req: RequestCtx::new(String::new(), Arc::clone(&self.unmatched)),
            states: Vec::new(),
            ran: 0,
            tried: Vec::new(),
            pending_error: None,
            error_code: None,
            rejected_by: None,
            status: 0,
            body_bytes: 0,
            upstream_started: None,
            upstream_response: None,
            cache_missed: None,
            pool: None,
            spans: None,
            current_try: None,
            slot: None,
            backoff: None,
            cut_by_deadline: false,
            grpc: false,
            grpc_deadline: None,
            grpc_web: false,
        }
    }

    /// The head is parsed: the client's deadline moves on to the body, if one follows.
    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        // Pingora's default (a disabled compression module), and the gRPC-web bridge, which
        // only acts on requests it is initialised for (`early_request_filter`).
        modules
            .add_module(pingora::modules::http::compression::ResponseCompressionBuilder::enable(0));
        modules.add_module(Box::new(pingora::modules::http::grpc_web::GrpcWeb));
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // gRPC-web on a `grpc = true` route becomes gRPC upstream, and its answer gRPC-web
        // again (trailers in the body). Routed here already: the bridge rewrites the request
        // head before `request_filter`.
        let content_type = session.req_header().headers.get(http::header::CONTENT_TYPE);
        if crate::grpc::is_grpc_web(content_type)
            && !crate::grpc::is_grpc_web_text(content_type)
            && self.routes_to_grpc(session.req_header())
        {
            if let Some(bridge) = session
                .downstream_modules_ctx
                .get_mut::<pingora::modules::http::grpc_web::GrpcWebBridge>()
            {
                bridge.init();
            }
        }
        ctx.conn = ConnState::of(session.stream());
        if let Some(conn) = &ctx.conn {
            let headers = &session.req_header().headers;
            let has_body = headers.contains_key(http::header::TRANSFER_ENCODING)
                || headers
                    .get(CONTENT_LENGTH)
                    .is_some_and(|v| v.as_bytes() != b"0");
            conn.head_done(has_body);
        }
        Ok(())
    }

    /// Normalises the path, routes, removes trusted identity headers, enforces `max_body` on
    /// a declared length, then runs the chain's `request_filter`s. `Ok(true)`: answered.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snapshot = self.shared.snapshot.load_full();
        if let Some(t) = &snapshot.telemetry {
            let mut spans = SpanRecorder::new(Arc::clone(t));
            spans.start = std::time::SystemTime::now()
                .checked_sub(ctx.req.received_at.elapsed())
                .unwrap_or(spans.start);
            ctx.spans = Some(spans);
        }
        ctx.snapshot = Some(Arc::clone(&snapshot));
        let req = session.req_header();
        ctx.req.request_id =
            request_id::from_header(req.headers.get(&X_REQUEST_ID).map(|v| v.as_bytes()));
        ctx.req.client_ip = self.client_ip(session, &snapshot);
        // Pingora's background refresh of a stale entry runs the whole chain again.
        ctx.req.background = session.subrequest_ctx.is_some();

        let req = session.req_header();
        // Until a route says otherwise: a gRPC client gets its "no route" as a gRPC error.
        let content_type = req.headers.get(http::header::CONTENT_TYPE);
        ctx.grpc = crate::grpc::is_grpc(content_type);
        // The bridge has made a bridged gRPC-web request `application/grpc` by now.
        ctx.grpc_web = crate::grpc::is_grpc_web(content_type);
        let path = match normalize(req.uri.path(), snapshot.escaped_slashes) {
            Ok(p) => p.into_owned(),
            Err(e) => {
                self.respond_error(session, ctx, ApiError::new(400, "bad_path", e.message()))
                    .await?;
                return Ok(true);
            }
        };
        let host = routing_host(req);
        let method = req.method.clone();
        // A CORS preflight is routed by the method it asks about, and answered by a plugin of
        // that route, whatever the route's `methods` say (see `Plugin::preflight`).
        let preflight = sallyport_plugins::cors::is_preflight(req)
            .then(|| req.headers.get(http::header::ACCESS_CONTROL_REQUEST_METHOD))
            .flatten()
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .map(|asked| snapshot.router.lookup(&host, &path, &asked))
            .and_then(|found| match found {
                Lookup::Found(i, params) if snapshot.routes[i].hooks.preflight => {
                    Some(Lookup::Found(i, params))
                }
                _ => None,
            });
        let is_preflight = preflight.is_some();
        let found = preflight.unwrap_or_else(|| snapshot.router.lookup(&host, &path, &method));
        let route = match found {
            Lookup::Found(i, params) => {
                ctx.req.path_params = params;
                Arc::clone(&snapshot.routes[i])
            }
            Lookup::NotFound => {
                let err = ApiError::new(404, "not_found", "no route matches this request");
                self.respond_error(session, ctx, err).await?;
                return Ok(true);
            }
            Lookup::MethodNotAllowed(allow) => {
                let err = ApiError::new(
                    405,
                    "method_not_allowed",
                    format!("{method} is not allowed here; allowed: {allow}"),
                )
                .with_header(ALLOW, allow);
                self.respond_error(session, ctx, err).await?;
                return Ok(true);
            }
        };
        ctx.req.route = Arc::clone(&route.name);
        ctx.req.upstream = route.upstream.as_ref().map(|p| Arc::clone(&p.name));
        ctx.pool = route.upstream.clone();
        ctx.req.path = path;
        ctx.route = Some(Arc::clone(&route));
        // gRPC errors for gRPC clients (a bridged gRPC-web request reads `application/grpc` by
        // now); anyone else on the route (a probe, curl) gets the JSON error.
        ctx.grpc = route.grpc && ctx.grpc;
        if ctx.grpc
            && ctx.grpc_web
            && crate::grpc::is_grpc_web_text(
                session.req_header().headers.get(http::header::CONTENT_TYPE),
            )
        {
            let err = ApiError::new(
                415,
                "unsupported_media_type",
                "gRPC-web text (base64) is not bridged; use application/grpc-web+proto",
            );
            self.respond_error(session, ctx, err).await?;
            return Ok(true);
        }
        if route.grpc {
            ctx.grpc_deadline = session
                .req_header()
                .headers
                .get("grpc-timeout")
                .and_then(crate::grpc::parse_timeout)
                .and_then(|t| ctx.req.received_at.checked_add(t));
        }

        // Every plugin of the chain gets its `logging`, also for a request refused below.
        ctx.states = route.chain.iter().map(|e| e.plugin.new_state()).collect();

        if is_preflight {
            for (i, entry) in route.chain.iter().enumerate() {
                if !entry.hooks.preflight {
                    continue;
                }
                let flow = entry
                    .plugin
                    .preflight(session, &mut ctx.req, &mut ctx.states[i])?;
                if let Flow::Respond(reply) = flow {
                    self.note_rejection(ctx, &route, entry, &reply);
                    // The preflight answer is complete: no response hook runs for it.
                    ctx.ran = 0;
                    self.reply(session, ctx, reply).await?;
                    return Ok(true);
                }
            }
        }

        if !snapshot.trusted_headers.is_empty() {
            let req = session.req_header_mut();
            for name in snapshot.trusted_headers.present_in(&req.headers) {
                req.remove_header(&name);
            }
        }

        let declared = session
            .req_header()
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > snapshot.max_body) {
            let err = ApiError::new(
                413,
                "payload_too_large",
                "the request body exceeds server.max_body",
            );
            self.respond_error(session, ctx, err).await?;
            return Ok(true);
        }

        for (i, entry) in route.chain.iter().enumerate() {
            ctx.ran = i + 1;
            if !entry.hooks.request_filter {
                continue;
            }
            let flow = entry
                .plugin
                .request_filter(session, &mut ctx.req, &mut ctx.states[i])
                .await?;
            decide_sampling(ctx);
            if let Flow::Respond(reply) = flow {
                self.note_rejection(ctx, &route, entry, &reply);
                self.reply(session, ctx, reply).await?;
                return Ok(true);
            }
        }
        // A plugin may have sent the request to another pool.
        let chosen = ctx.req.upstream.as_deref();
        if chosen != ctx.pool.as_ref().map(|p| &*p.name) {
            ctx.pool = chosen.and_then(|name| snapshot.pools.get(name)).cloned();
        }
        if ctx.pool.is_none() {
            let err = ApiError::new(502, "no_upstream", "this route has no upstream");
            self.respond_error(session, ctx, err).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Counts body bytes and stops a body that grows past `max_body` (413), then runs the
    /// chain's `request_body` hooks.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if end_of_stream {
            if let Some(conn) = &ctx.conn {
                conn.body_done();
            }
        }
        // After an upgrade (WebSocket) the body is a stream of frames: `max_body` bounds
        // request bodies, not a conversation.
        if let (Some(b), false) = (body.as_ref(), session.was_upgraded()) {
            ctx.body_bytes += b.len() as u64;
            let max = ctx.snapshot.as_ref().map_or(u64::MAX, |s| s.max_body);
            if ctx.body_bytes > max {
                ctx.pending_error = Some(ApiError::new(
                    413,
                    "payload_too_large",
                    "the request body exceeds server.max_body",
                ));
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        if let Some(route) = ctx.route.clone().filter(|r| r.hooks.request_body) {
            for i in route.entries_running(ctx.ran, |h| h.request_body) {
                let entry = &route.chain[i];
                entry
                    .plugin
                    .request_body(
                        session,
                        body,
                        end_of_stream,
                        &mut ctx.req,
                        &mut ctx.states[i],
                    )
                    .await?;
            }
        }
        // An HTTP/2 body often ends with an empty DATA frame (END_STREAM). Pingora writes an
        // empty chunk to an HTTP/1.1 upstream as `0\r\n\r\n`, then the terminating chunk
        // again, and the extra one would be read as the start of the next request on the
        // pooled connection. No bytes at the end: nothing to write but the end. (After the
        // plugins: one that hands back an empty buffer at the end is covered too.)
        if end_of_stream && body.as_ref().is_some_and(Bytes::is_empty) && !session.was_upgraded() {
            *body = None;
        }
        Ok(())
    }

    /// Runs the chain's `response_body` hooks (reverse chain order) on body chunks from an
    /// endpoint.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(route) = ctx.route.clone() else {
            return Ok(None);
        };
        if route.hooks.response_body {
            for i in route.entries_running(ctx.ran, |h| h.response_body).rev() {
                let entry = &route.chain[i];
                entry.plugin.response_body(
                    body,
                    end_of_stream,
                    &mut ctx.req,
                    &mut ctx.states[i],
                )?;
            }
        }
        Ok(None)
    }

    /// Takes a slot of the pool's `max_in_flight` (503 `upstream_overloaded` when full), waits
    /// out a retry's backoff, picks a healthy endpoint the request has not tried yet (one it
    /// tried when no other is left; 503 when none is healthy), and cuts the try's timeouts to
    /// `per_try_timeout` and the route's deadline.
    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route selected"))?;
        let pool = ctx
            .pool
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route has no upstream"))?;
        if ctx.tried.is_empty() {
            let Some(slot) = pool.enter() else {
                self.upstream_outcome(ctx, "overloaded");
                ctx.pending_error = Some(ApiError::new(
                    503,
                    "upstream_overloaded",
                    format!(
                        "upstream {} has its limits.max_in_flight requests under way",
                        pool.name
                    ),
                ));
                return Error::e_explain(ErrorType::HTTPStatus(503), "upstream overloaded");
            };
            ctx.slot = Some(slot);
            pool.first_try(Instant::now());
        } else {
            if let Some(wait) = ctx.backoff.take() {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            // Pingora replays the buffered body through `request_body_filter`.
            ctx.body_bytes = 0;
        }
        let deadline = Self::deadline(ctx);
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            ctx.pending_error = Some(ApiError::new(
                504,
                "upstream_timeout",
                "the upstream did not answer within the route's timeout",
            ));
            return Error::e_explain(ErrorType::HTTPStatus(504), "route timeout passed");
        }
        let key = match pool.config.balance {
            crate::config::Balance::ConsistentHash => {
                pool.hash_key.value(session.req_header(), &ctx.req)
            }
            _ => None,
        };
        let key = key.as_deref().map(str::as_bytes);
        // A retry goes back to a tried endpoint only when no other one is left.
        let Some(backend) = pool.select(key, &ctx.tried) else {
            let err = if ctx.tried.is_empty() {
                self.upstream_outcome(ctx, "unavailable");
                ApiError::new(
                    503,
                    "unavailable",
                    format!("no healthy endpoint in upstream {}", pool.name),
                )
            } else {
                ApiError::new(
                    502,
                    "upstream_error",
                    format!("every endpoint of upstream {} failed", pool.name),
                )
            };
            let status = err.status;
            ctx.pending_error = Some(err);
            return Error::e_explain(ErrorType::HTTPStatus(status), "no endpoint to try");
        };
        let addr = backend.addr();
        ctx.tried.push(addr);
        if let Some(spans) = &mut ctx.spans {
            spans.attempt(addr, ctx.req.trace.as_ref().map(|t| t.span_id));
        }
        ctx.current_try = Some(pool.begin_try(&backend));
        let mut peer = pool.peer(&backend);
        ctx.cut_by_deadline = false;
        if deadline.is_some() || pool.retry.per_try_timeout.is_some() {
            let per_try = |d: std::time::Duration| pool.retry.try_timeout(d, None, now);
            let cut = |d: Option<std::time::Duration>| {
                d.map(|d| pool.retry.try_timeout(d, deadline, now))
            };
            // A timeout of a try the deadline cut short is no sign of a sick endpoint.
            ctx.cut_by_deadline = peer
                .options
                .read_timeout
                .is_some_and(|d| cut(Some(d)) < Some(per_try(d)));
            let o = &mut peer.options;
            o.connection_timeout = cut(o.connection_timeout);
            o.total_connection_timeout = cut(o.total_connection_timeout);
            o.read_timeout = cut(o.read_timeout);
            o.write_timeout = cut(o.write_timeout);
        }
        // An upgrade (WebSocket) becomes a long-lived stream: quiet periods are bounded by
        // the route's `websocket_idle_timeout`, not by the pool's per-read timeout.
        if session.is_upgrade_req() {
            // An upgrade is HTTP/1.1 only (RFC 9110 7.8), whatever the pool's protocol.
            peer.options.set_http_version(1, 1);
            peer.options.read_timeout = Some(route.websocket_idle);
            peer.options.write_timeout = Some(route.websocket_idle);
            // The client's side too: Pingora's per-read timeout would end a quiet socket.
            session.set_read_timeout(Some(route.websocket_idle));
            session.set_write_timeout(Some(route.websocket_idle));
        }
        if route.hooks.upstream_peer {
            for (i, entry) in route.chain.iter().enumerate() {
                if entry.hooks.upstream_peer {
                    entry
                        .plugin
                        .upstream_peer(session, &mut peer, &mut ctx.req, &mut ctx.states[i])
                        .await?;
                }
            }
        }
        ctx.upstream_started.get_or_insert_with(Instant::now);
        Ok(Box::new(peer))
    }

    /// The try reached its endpoint (a new or a reused connection): an event of its span.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(a) = ctx.spans.as_mut().and_then(|s| s.last()) {
            a.connected = Some(std::time::SystemTime::now());
        }
        Ok(())
    }

    /// Counts the failure against the endpoint (passive health), then retries on another
    /// endpoint when `retry_on` has `connect_failure`, for every method: nothing was sent, so
    /// a second endpoint cannot see the request twice.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let outcome = if matches!(e.etype(), ErrorType::ConnectTimedout) {
            "timeout"
        } else {
            "connect_error"
        };
        if let Some(a) = ctx.spans.as_mut().and_then(|s| s.last()) {
            a.error = Some(if outcome == "timeout" {
                "connect_timeout"
            } else {
                "connect_error"
            });
        }
        self.upstream_outcome(ctx, outcome);
        let now = Instant::now();
        if let (Some(pool), Some(t)) = (&ctx.pool, &ctx.current_try) {
            pool.failed(t, now);
        }
        let retrying = Self::decide_retry(session, ctx, Failure::ConnectFailure, false, now);
        e.set_retry(retrying);
        let failure = if matches!(e.etype(), ErrorType::ConnectTimedout) {
            UpstreamFailure::ConnectTimeout
        } else {
            UpstreamFailure::ConnectError
        };
        Self::failure_hooks(ctx, failure, retrying);
        e
    }

    /// An upstream failure after connecting counts against the endpoint and is retried by the
    /// pool's policy (`timeout`, `reset`; a request on a pooled connection the endpoint had
    /// closed is always repeated when idempotent), never once the response has started; then
    /// the chain's `upstream_failure` hooks. A status retry was decided by
    /// `upstream_response_filter` already.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if matches!(e.etype(), ErrorType::Custom(RETRY_STATUS)) {
            e.set_retry(true);
            return e;
        }
        // An upgraded connection (WebSocket) idles or closes as it likes: no failure, no retry.
        if e.esource() != &ErrorSource::Upstream || session.was_upgraded() {
            e.set_retry(false);
            return e;
        }
        let (failure, kind) = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                (UpstreamFailure::Timeout, Failure::Timeout)
            }
            _ => (UpstreamFailure::Error, Failure::Reset),
        };
        // Every try's outcome is counted here (connect failures in fail_to_connect; a failure
        // after the response head was counted by its status class).
        let started = ctx.upstream_response.is_some();
        if !started {
            self.upstream_outcome(
                ctx,
                if failure == UpstreamFailure::Timeout {
                    "timeout"
                } else {
                    "error"
                },
            );
        }
        let now = Instant::now();
        let stale = matches!(e.retry, pingora::RetryType::ReusedOnly) && client_reused;
        // Not the endpoint's fault: a pooled connection it had closed, or a try whose
        // deadline the route's timeout had cut short.
        let blameless = stale || (failure == UpstreamFailure::Timeout && ctx.cut_by_deadline);
        if let (Some(pool), Some(t), false) = (&ctx.pool, &ctx.current_try, blameless) {
            pool.failed(t, now);
        }
        if let Some(a) = ctx.spans.as_mut().and_then(|s| s.last()) {
            a.error = Some(failure.as_str());
        }
        // Once the response head went to the client, another try would answer twice.
        let retrying = !started && Self::decide_retry(session, ctx, kind, stale, now);
        e.set_retry(retrying);
        Self::failure_hooks(ctx, failure, retrying);
        e
    }

    /// Forwards the normalised (and rewritten) path, sets `X-Forwarded-*`, then runs the
    /// chain's `upstream_request_filter`s.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        let new_path = match &route.rewrite {
            Some(rw) => Some(rw.apply(&ctx.req.path)),
            None if ctx.req.path != upstream_request.uri.path() => Some(ctx.req.path.clone()),
            None => None,
        };
        if let Some(path) = new_path {
            let uri = match upstream_request.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let uri = uri.parse::<http::Uri>().map_err(|e| {
                Error::because(
                    ErrorType::HTTPStatus(400),
                    "rewritten path is not a valid URI",
                    e,
                )
            })?;
            upstream_request.set_uri(uri);
        }

        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            self.forwarding_headers(session, upstream_request, ctx, peer)?;
        }
        if let (Some(pool), Some(t)) = (&ctx.pool, &ctx.current_try) {
            if !pool.config.preserve_host {
                match t.authority_value() {
                    Some(v) => upstream_request.insert_header(http::header::HOST, v)?,
                    None => upstream_request.insert_header(http::header::HOST, t.authority())?,
                }
            }
        }
        // `forward_client_cert`: the verified client certificate's subject (the client's own
        // header of that name was removed with the trusted headers).
        if let Some(cert) = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|t| t.extension.get::<crate::certs::ClientCert>())
        {
            upstream_request.insert_header(cert.header.clone(), cert.subject.clone())?;
        }

        for (name, value) in &ctx.req.identity_headers {
            upstream_request.insert_header(name.clone(), value.clone())?;
        }
        if let Some(snapshot) = ctx
            .snapshot
            .as_ref()
            .filter(|s| !s.gateway_cookies.is_empty())
        {
            sallyport_plugins::session::cookies::strip_cookies(
                upstream_request,
                &snapshot.gateway_cookies,
            )?;
        }
        if ctx.tried.len() > 1 {
            upstream_request.insert_header(X_SALLYPORT_ATTEMPT, ctx.tried.len().to_string())?;
        } else {
            upstream_request.remove_header(X_SALLYPORT_ATTEMPT);
        }

        if route.hooks.upstream_request_filter {
            for (i, entry) in route.chain.iter().enumerate() {
                if entry.hooks.upstream_request_filter {
                    entry
                        .plugin
                        .upstream_request_filter(
                            session,
                            upstream_request,
                            &mut ctx.req,
                            &mut ctx.states[i],
                        )
                        .await?;
                }
            }
        }
        // A retry is a span of its own: its traceparent names it, so the service's spans of
        // that try nest under it.
        if let (Some(spans), Some(trace)) = (&ctx.spans, &ctx.req.trace) {
            if spans.attempts.len() > 1 && upstream_request.headers.contains_key("traceparent") {
                if let Some(a) = spans.attempts.last() {
                    upstream_request
                        .insert_header("traceparent", trace.traceparent_with_span(&a.span_id))?;
                }
            }
        }
        Ok(())
    }

    /// Counts the outcome and the endpoint's passive health; a status `retry_on` names is
    /// tried again when the policy allows (the client never sees it); otherwise runs the
    /// chain's `upstream_response` hooks.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let now = Instant::now();
        let status = upstream_response.status.as_u16();
        if let Some(a) = ctx.spans.as_mut().and_then(|s| s.last()) {
            a.response = Some(std::time::SystemTime::now());
            a.status = Some(status);
        }
        let class = match status {
            100..=199 => {
                // An interim answer (or a `101` upgrade) reached the client: no retry now.
                ctx.upstream_response = Some(now);
                if let (Some(pool), Some(t)) = (&ctx.pool, &ctx.current_try) {
                    pool.answered(t, status, now);
                }
                return Ok(());
            }
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream_outcome(ctx, class);
        if let Some(pool) = ctx.pool.clone() {
            if let Some(t) = &ctx.current_try {
                pool.answered(t, status, now);
            }
            // (Not after an interim answer went to the client.)
            if pool.retry.retries_status(status)
                && ctx.upstream_response.is_none()
                && Self::decide_retry(session, ctx, Failure::Status(status), false, now)
            {
                if let Some(a) = ctx.spans.as_mut().and_then(|s| s.last()) {
                    a.error = Some("status");
                }
                Self::failure_hooks(ctx, UpstreamFailure::Status(status), true);
                return Error::e_explain(
                    ErrorType::Custom(RETRY_STATUS),
                    format!("upstream answered {status}, trying again"),
                );
            }
        }
        ctx.upstream_response = Some(now);
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        if route.hooks.upstream_response {
            if let Some(attempt) = Self::attempt(ctx) {
                for i in route.entries_running(ctx.ran, |h| h.upstream_response) {
                    let entry = &route.chain[i];
                    entry
                        .plugin
                        .upstream_response(
                            session,
                            upstream_response,
                            &attempt,
                            &mut ctx.req,
                            &mut ctx.states[i],
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Runs the chain's `request_cache` hooks: a cache plugin turns the cache on here.
    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        // Called for every request: no route clone unless a plugin of the route caches.
        let Some(route) = ctx.route.as_ref().filter(|r| r.hooks.cache).cloned() else {
            return Ok(());
        };
        for i in route.entries_running(ctx.ran, |h| h.cache) {
            route.chain[i]
                .plugin
                .request_cache(session, &mut ctx.req, &mut ctx.states[i])?;
        }
        Ok(())
    }

    /// The first key a plugin's `cache_key` gives; otherwise `Host` and request target.
    fn cache_key_callback(&self, session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        if let Some(key) = first_cache_answer(ctx, |p, req, st| p.cache_key(session, req, st))? {
            return Ok(key);
        }
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default();
        // Only the primary part is hashed. The host's length first, so `a` + `b/c` never
        // collides with `ab` + `/c`.
        Ok(CacheKey::new(
            format!("{}:{host}{}", host.len(), req.uri),
            String::new(),
        ))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        first_cache_answer(ctx, |p, r, st| Ok(p.cache_vary(meta, req, r, st)))
            .ok()
            .flatten()
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        hit: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        let Some(route) = ctx.route.clone() else {
            return Ok(None);
        };
        for i in route.entries_running(ctx.ran, |h| h.cache) {
            let forced = route.chain[i]
                .plugin
                .cache_hit(
                    session,
                    meta,
                    hit,
                    is_fresh,
                    &mut ctx.req,
                    &mut ctx.states[i],
                )
                .await?;
            if forced.is_some() {
                return Ok(forced);
            }
        }
        Ok(None)
    }

    /// The first verdict a plugin's `response_cache` gives; otherwise not stored.
    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let verdict = first_cache_answer(ctx, |p, r, st| p.response_cache(session, resp, r, st))?;
        Ok(
            verdict.unwrap_or(RespCacheable::Uncacheable(NoCacheReason::Custom(
                "no plugin stores it",
            ))),
        )
    }

    /// Pingora's miss handling, remembering that the lookup missed (for the metric).
    fn cache_miss(&self, session: &mut Session, ctx: &mut Ctx) {
        session.cache.cache_miss();
        ctx.cache_missed = Some(match session.cache.phase() {
            CachePhase::Expired => "expired",
            _ => "miss",
        });
    }

    /// Whether a stale entry may be served: the first answer of a cache plugin; otherwise
    /// only when the upstream failed (Pingora's default).
    fn should_serve_stale(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        error: Option<&Error>,
    ) -> bool {
        let answer = first_cache_answer(ctx, |p, r, st| {
            Ok(p.cache_serve_stale(session, error, r, st))
        });
        match answer {
            Ok(Some(serve)) => serve,
            _ => error.is_some_and(|e| e.esource() == &ErrorSource::Upstream),
        }
    }

    /// Before a request of a caching route goes upstream: a cache plugin may answer instead
    /// (`only-if-cached` on a miss).
    async fn proxy_upstream_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let Some(route) = ctx.route.as_ref().filter(|r| r.hooks.cache).cloned() else {
            return Ok(true);
        };
        for i in route.entries_running(ctx.ran, |h| h.cache) {
            let flow =
                route.chain[i]
                    .plugin
                    .cache_miss(session, &mut ctx.req, &mut ctx.states[i])?;
            if let Flow::Respond(reply) = flow {
                self.reply(session, ctx, reply).await?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs the response hooks (reverse chain order) on proxied and cached responses.
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.response_hooks(session, upstream_response, ctx).await?;
        ctx.status = upstream_response.status.as_u16();
        Ok(())
    }

    /// Answers a failed request with a JSON error (after the response hooks), unless the
    /// response already started or the client is gone.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if ctx.req.request_id.is_empty() {
            ctx.req.request_id = request_id::generate();
        }
        let Some(err) = self.error_for(e, ctx) else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let code = err.status;
        // A relayed `100 Continue` is not the response: the final one is still owed (a
        // chunked upload past max_body after `Expect: 100-continue` gets its 413).
        if session
            .response_written()
            .is_none_or(|r| r.status.is_informational())
        {
            // The connection is not reused after a failure: say so, or a client would send
            // its next request into a closing socket.
            session.set_keepalive(None);
            if let Err(write_err) = self.respond_error(session, ctx, err).await {
                log::debug!("could not send error response: {write_err}");
            }
        } else {
            ctx.error_code = Some(err.code);
        }
        ctx.status = code;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        self.quiet_failure(ctx)
    }

    /// A status the pool retries is no failure of the gateway: it is counted, not logged.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        matches!(error.etype(), ErrorType::Custom(RETRY_STATUS)) || self.quiet_failure(ctx)
    }

    /// Runs every plugin's `logging`, then records metrics and one access-log line.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if let Some(conn) = &ctx.conn {
            conn.request_done();
        }
        if let Some(route) = ctx.route.clone() {
            if route.hooks.logging {
                for (i, entry) in route.chain.iter().enumerate() {
                    if entry.hooks.logging && i < ctx.states.len() {
                        entry
                            .plugin
                            .logging(session, e, &mut ctx.req, &mut ctx.states[i])
                            .await;
                    }
                }
            }
        }
        let status = session
            .response_written()
            .filter(|r| !r.status.is_informational())
            .map(|r| r.status.as_u16())
            .unwrap_or(ctx.status);
        let elapsed = ctx.req.received_at.elapsed();
        let method = method_label(&session.req_header().method);
        let route_label: &str = &ctx.req.route;
        let metrics = &self.shared.metrics;
        let cache = ctx
            .req
            .cache_result
            .or_else(|| cache_result(session.cache.phase(), ctx.cache_missed));
        if let Some(result) = cache {
            metrics
                .cache_lookups
                .with_label_values(&[route_label, result])
                .inc();
        }
        match &ctx.route {
            Some(route) => {
                route.metrics.count(method, status);
                route.metrics.observe(elapsed.as_secs_f64());
            }
            // Not routed (404, 405, a bad path): the `unmatched` series.
            None => {
                metrics
                    .requests
                    .with_label_values(&[route_label, method, &status_label(status)])
                    .inc();
                metrics
                    .request_duration
                    .with_label_values(&[route_label])
                    .observe(elapsed.as_secs_f64());
            }
        }

        if self.shared.access_log.enabled() {
            let upstream_ms = match (ctx.upstream_started, ctx.upstream_response) {
                (Some(a), Some(b)) => Some(millis(b.saturating_duration_since(a))),
                _ => None,
            };
            let record = AccessRecord {
                ts: crate::access_log::now(),
                request_id: &ctx.req.request_id,
                client: ctx.req.client_ip,
                method: session.req_header().method.as_str(),
                proto: match session.req_header().version {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                path: if ctx.req.path.is_empty() {
                    session.req_header().uri.path()
                } else {
                    &ctx.req.path
                },
                route: route_label,
                status,
                upstream: ctx.req.upstream.as_deref(),
                endpoint: ctx.tried.last().copied(),
                attempts: ctx.tried.len(),
                duration_ms: millis(elapsed),
                upstream_ms,
                body_bytes: session.body_bytes_sent(),
                error: ctx.error_code.or_else(|| e.map(|_| "error")),
                rejected_by: ctx.rejected_by.as_ref().map(|(p, r)| (&**p, *r)),
                trace_id: ctx.req.trace.as_ref().map(|t| t.trace_id_hex()),
                cache,
                extra: &ctx.req.log_fields,
            };
            self.shared.access_log.write(&record);
        }
        if let Some(spans) = ctx.spans.take() {
            let trace = match &ctx.req.trace {
                Some(t) => (
                    t.trace_id,
                    t.client_parent_id,
                    t.client_parent_id.map(|_| t.flags & 1 == 1),
                ),
                None => (rand::random::<[u8; 16]>(), None, None),
            };
            // Decided before anything is built: an unsampled request builds no attribute.
            if !spans.telemetry.sampled(&trace.0, trace.2) {
                return;
            }
            let end = std::time::SystemTime::now();
            let enduser = spans.telemetry.record_enduser();
            // What allocates is made before the spans are written under the buffer's lock
            // (addresses are rendered there, into the buffer's own scratch text).
            let facts = SpanFacts::new(session, ctx, status);
            spans
                .telemetry
                .write(spans.count(&ctx.req.call_spans), |out| {
                    write_spans(
                        out, session, ctx, &spans, &facts, trace, end, status, cache, enduser,
                    )
                });
        }
    }
}

/// Once the `trace` plugin made the request's trace context: a trace the gateway starts is
/// sampled as telemetry decides, before any call or answer carries its `traceparent`, so
/// services record exactly the traces whose gateway spans are exported.
/// An unsampled request stops recording here: it costs nothing more.
fn decide_sampling(ctx: &mut Ctx) {
    let (Some(spans), Some(trace)) = (&mut ctx.spans, &mut ctx.req.trace) else {
        return;
    };
    if spans.sampling_decided {
        return;
    }
    spans.sampling_decided = true;
    let parent_sampled = trace.client_parent_id.map(|_| trace.flags & 1 == 1);
    let sampled = spans.telemetry.sampled(&trace.trace_id, parent_sampled);
    if trace.client_parent_id.is_none() {
        if sampled {
            trace.flags |= 1;
        } else {
            trace.flags &= !1;
        }
    }
    if !sampled {
        ctx.spans = None;
    }
}

/// A sampled request's values the spans need that take an allocation to make.
struct SpanFacts<'a> {
    /// The method as the semantic conventions name it (`_OTHER` for any other).
    method: &'a str,
    path: &'a str,
    /// The path sent upstream (after `rewrite_prefix`).
    upstream_path: std::borrow::Cow<'a, str>,
    /// A 5xx's `error.type`: the gateway's own error code, or the status passed on.
    error: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> SpanFacts<'a> {
    fn new(session: &'a Session, ctx: &'a Ctx, status: u16) -> SpanFacts<'a> {
        let req = session.req_header();
        let method = match req.method.as_str() {
            m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH") => m,
            _ => "_OTHER",
        };
        let path: &str = if ctx.req.path.is_empty() {
            req.uri.path()
        } else {
            &ctx.req.path
        };
        let upstream_path = ctx
            .route
            .as_ref()
            .and_then(|r| r.rewrite.as_ref())
            .map_or(std::borrow::Cow::Borrowed(path), |rw| {
                std::borrow::Cow::Owned(rw.apply(path))
            });
        // Status Error only for 5xx (a 4xx is the client's failure, not the server's).
        let error = (status >= 500).then(|| {
            ctx.error_code.map_or_else(
                || std::borrow::Cow::Owned(status.to_string()),
                std::borrow::Cow::Borrowed,
            )
        });
        SpanFacts {
            method,
            path,
            upstream_path,
            error,
        }
    }
}

/// A sampled request's spans ([`SpanRecorder::finish`]); the SERVER span per the HTTP
/// semantic conventions (stable v1.2x): named `{METHOD} {route}` (the route's name, never
/// the raw path).
#[allow(clippy::too_many_arguments)]
fn write_spans(
    out: &mut crate::telemetry::Spans<'_>,
    session: &Session,
    ctx: &Ctx,
    spans: &SpanRecorder,
    facts: &SpanFacts<'_>,
    trace: crate::telemetry::TraceOf,
    end: std::time::SystemTime,
    status: u16,
    cache: Option<&str>,
    enduser: bool,
) {
    let method = facts.method;
    let route_name = ctx.route.as_ref().map(|r| &*r.name);
    let name: &[&str] = match route_name {
        Some(route) => &[method, " ", route],
        None => &[method],
    };
    spans.finish(
        out,
        trace,
        end,
        name,
        method,
        &facts.upstream_path,
        facts.error.as_deref(),
        &ctx.req.call_spans,
        |w, text| server_attributes(w, text, session, ctx, facts, status, cache, enduser),
    )
}

/// The SERVER span's attributes (HTTP semantic conventions, plus `sallyport.*`).
#[allow(clippy::too_many_arguments)]
fn server_attributes(
    w: &mut crate::telemetry::SpanWriter<'_>,
    text: &mut String,
    session: &Session,
    ctx: &Ctx,
    facts: &SpanFacts<'_>,
    status: u16,
    cache: Option<&str>,
    enduser: bool,
) {
    let req = session.req_header();
    let (method, path) = (facts.method, facts.path);
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some();
    w.str("http.request.method", method)
        .str("url.scheme", if tls { "https" } else { "http" })
        .str("url.path", path)
        .int("http.response.status_code", i64::from(status))
        .str(
            "network.protocol.version",
            match req.version {
                http::Version::HTTP_10 => "1.0",
                http::Version::HTTP_2 => "2",
                _ => "1.1",
            },
        )
        .str("sallyport.route", &ctx.req.route);
    if method == "_OTHER" {
        w.str("http.request.method_original", req.method.as_str());
    }
    let host = req.uri.host().or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| match h.strip_prefix('[') {
                // An IPv6 literal: the address inside the brackets.
                Some(rest) => rest.split(']').next().unwrap_or(rest),
                None => h.rsplit_once(':').map_or(h, |(h, _)| h),
            })
    });
    if let Some(host) = host {
        w.str("server.address", host);
    }
    if let Some(port) = session
        .server_addr()
        .and_then(|s| s.as_inet())
        .map(|s| s.port())
    {
        w.int("server.port", i64::from(port));
    }
    if let Some(ip) = ctx.req.client_ip {
        text.clear();
        crate::telemetry::push_ip(text, ip);
        w.str("client.address", text);
    }
    if let Some(ua) = req
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        w.str("user_agent.original", ua);
    }
    if let Some(route) = &ctx.route {
        w.str("http.route", &route.http_route);
    }
    if let Some(up) = &ctx.req.upstream {
        w.str("sallyport.upstream", up);
    }
    if let Some((plugin, _)) = &ctx.rejected_by {
        w.str("sallyport.rejected_by", plugin);
    }
    if let Some(c) = cache {
        w.str("sallyport.cache", c);
    }
    if let Some((_, decision)) = ctx.req.log_fields.iter().rev().find(|(k, _)| *k == "quota") {
        if let Some(d) = decision.as_str() {
            w.str("sallyport.quota.decision", d);
        }
    }
    if enduser {
        if let Some(sub) = ctx
            .req
            .principal
            .as_ref()
            .and_then(|p| p.subject.as_deref())
        {
            w.str("enduser.id", sub);
        }
    }
}

/// The first answer of the route's cache plugins, in chain order: `cache_key`, `cache_vary`
/// and `response_cache` are decided by the first plugin that has one.
fn first_cache_answer<T>(
    ctx: &mut Ctx,
    mut ask: impl FnMut(&dyn DynPlugin, &mut RequestCtx, &mut ErasedState) -> Result<Option<T>>,
) -> Result<Option<T>> {
    let Some(route) = ctx.route.as_ref().filter(|r| r.hooks.cache).cloned() else {
        return Ok(None);
    };
    for i in route.entries_running(ctx.ran, |h| h.cache) {
        if let Some(answer) = ask(&*route.chain[i].plugin, &mut ctx.req, &mut ctx.states[i])? {
            return Ok(Some(answer));
        }
    }
    Ok(None)
}

/// The `result` of `sallyport_cache_lookups_total` for a request's final cache phase; `None`
/// when no plugin turned the cache on.
fn cache_result(phase: CachePhase, missed: Option<&'static str>) -> Option<&'static str> {
    match phase {
        CachePhase::Hit => Some("hit"),
        CachePhase::Stale | CachePhase::StaleUpdating => Some("stale"),
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => Some("revalidated"),
        CachePhase::Bypass => Some("bypass"),
        CachePhase::Miss => Some("miss"),
        CachePhase::Expired => Some("expired"),
        CachePhase::Disabled(_) | CachePhase::Uninit | CachePhase::CacheKey => missed,
    }
}

/// Milliseconds with microsecond precision, for the access log.
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
