//! Sallyport's plugin API and its built-in plugins.
//!
//! A plugin lives three lifetimes:
//! 1. its **config**: a serde struct read from `[plugins.NAME]` (`deny_unknown_fields`), chosen
//!    by `type` from the closed enum [`PluginConfig`];
//! 2. the **built plugin**: produced once per config load by [`PluginConfig::build`], validated,
//!    immutable and shared by every request (and every route that names it);
//! 3. its **per-request state**: the typed [`Plugin::State`], created fresh for every request
//!    and handed back to each hook.
//!
//! The gateway hosts an ordered chain of plugins in Pingora's `ProxyHttp` phases:
//! `request_filter` in chain order (the first [`Flow::Respond`] ends the chain and is sent),
//! `upstream_peer` and `upstream_request_filter` in chain order before the request goes
//! upstream, `request_body` for each chunk of the request body (chain order) and
//! `response_body` for each chunk of an endpoint's body (reverse order; `BodyBuffer` holds a
//! body back until it is whole), `upstream_failure` for every failed try and
//! `upstream_response` on the
//! endpoint's response head (both in chain order), `response_filter` in reverse order for
//! every plugin the chain reached (also for responses that a plugin or the gateway produced
//! itself), and `logging` for every plugin of the chain, always, also after an early
//! response or an error.
//!
//! Writing a plugin = a folder with its config (implementing [`PluginType`]), its [`Plugin`]
//! impl (with [`Plugin::hooks`]), its docs page and tests, plus one line in
//! [`plugin_registry!`]. See docs/writing-a-plugin.md.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod body;
pub mod conf;
mod context;
pub mod key;
pub mod keys;
pub mod metrics;
pub mod redis_conn;
mod reply;
pub mod request_id;
pub mod template;
pub mod upstream;

pub mod testkit;

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
pub use pingora::cache::key::HashBinary;
pub use pingora::cache::{CacheKey, CacheMeta, ForcedFreshness, HitHandler, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use serde::Deserialize;

pub use body::{BodyBuffer, BodyTooLarge};
pub use context::{CallSpan, Principal, RequestCtx, TraceContext};
pub use http::HeaderName;
pub use metrics::{MetricsRegistry, PluginMetrics, TypeMetrics};
pub use reply::{ApiError, Flow, Reply};
pub use upstream::{CallError, UpstreamRequest, UpstreamResponse, Upstreams};

/// The result type of every hook: an `Err` ends the request with the error's HTTP status
/// (`pingora::ErrorType::HTTPStatus(code)`), or 500 for anything else; prefer
/// [`Flow::Respond`] with an [`ApiError`] for answers a client should see.
pub type Result<T> = pingora::Result<T>;

/// A compiled-in plugin. Every hook has a no-op default; a plugin overrides what it needs.
///
/// The built plugin is shared by all requests at once (`&self`), so anything that changes per
/// request goes into [`Plugin::State`] or the shared [`RequestCtx`].
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Typed per-request state, created with `Default` when a request enters the chain.
    type State: Default + Send + Sync + 'static;

    /// The hooks the gateway calls; the others are skipped without a call (each call costs a
    /// boxed future). Defaults to every hook but `preflight` (which also moves the plugin to
    /// the front of its chains, so a plugin asks for it explicitly), so a hook the author wrote
    /// is never silently skipped: a plugin narrows it here, next to the hooks it implements.
    /// Asked once, when the plugin is built.
    fn hooks(&self) -> Hooks {
        Hooks {
            preflight: false,
            ..Hooks::ALL
        }
    }

    /// Runs once on the gateway's runtime after the plugin was built and before the config
    /// that built it takes requests: at start-up (`/readyz` waits for it) and on a reload
    /// (the new config is swapped in after it). The place for background work and first
    /// fetches; `build` stays synchronous and side-effect free. Not called for a plugin a
    /// reload kept (see `PluginType::keeps_state_across_reloads`).
    async fn start(&self) {}

    /// Runs once when a reload replaced the plugin (and at shutdown): stop background work.
    /// Requests that started before the swap may still be using the plugin.
    async fn stop(&self) {}

    /// Answers a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
    /// for the route that would serve the method it asks about, before any `request_filter` of
    /// the chain runs and whatever the route's `methods` say. The first plugin that returns
    /// `Flow::Respond` answers; the response hooks do not run for it. A plugin with this hook
    /// is moved to the front of every chain it is in, so its `response_filter` sees every
    /// answer of the route, rejections by other plugins included.
    fn preflight(
        &self,
        _session: &Session,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    /// Runs in `request_filter`, in chain order, after routing and after the gateway removed
    /// every trusted identity header from the request. `Ok(Flow::Continue)` passes the request
    /// on to the next plugin; `Ok(Flow::Respond(..))` answers the client and ends the chain.
    async fn request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    /// Runs in `upstream_peer` after the gateway chose an endpoint of the route's pool (and
    /// again on a retry). `Ok(())` keeps the (possibly adjusted) peer.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _peer: &mut HttpPeer,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs in `upstream_request_filter` in chain order, after the gateway applied the prefix
    /// rewrite and forwarding headers: the place to set headers the upstream trusts.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        _upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs in chain order for every chunk of the request body on its way upstream (after the
    /// gateway counted it against `server.max_body`). A plugin may replace or hold back a
    /// chunk (`*body = None` sends nothing now; see [`BodyBuffer`]); `end_of_stream` marks the
    /// last call. Changing the body's length means the upstream must not rely on the client's
    /// `Content-Length`: remove it in `upstream_request_filter`.
    async fn request_body(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs in reverse chain order for every chunk of a response body that came from an
    /// endpoint, on its way to the client (not for answers of the gateway or a plugin, which
    /// are complete when made). Replace or hold back chunks as in `request_body`; a plugin that
    /// changes the length removes `Content-Length` in `response_filter` (the response is then
    /// sent chunked). Synchronous, as Pingora's body filter is.
    fn response_body(
        &self,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs in chain order on the upstream's response head, before `response_filter`, for every
    /// plugin whose `request_filter` ran: only for responses that came from an endpoint (not
    /// for answers of the gateway or a plugin). `attempt` says which endpoint answered and on
    /// which try. The place to observe an endpoint's health or latency, or adjust the head
    /// before anything else sees it.
    async fn upstream_response(
        &self,
        _session: &mut Session,
        _response: &mut ResponseHeader,
        _attempt: &Attempt,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Called once for every failed try to reach an endpoint, in chain order, for every plugin
    /// whose `request_filter` ran: a refused or timed-out connect, or an upstream error or
    /// timeout after connecting. `retrying` tells whether the gateway tries another endpoint.
    /// Synchronous (Pingora decides retries synchronously): record, do not wait.
    fn upstream_failure(
        &self,
        _attempt: &Attempt,
        _failure: UpstreamFailure,
        _retrying: bool,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) {
    }

    /// Runs in Pingora's `request_cache_filter`, in chain order, once every `request_filter`
    /// let the request through (so authentication and quotas have run): a cache plugin turns
    /// the cache on for this request here with `session.cache.enable(storage, eviction,
    /// predictor, lock, overrides)`. Nothing is looked up or stored unless a plugin does.
    fn request_cache(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Pingora's `cache_key_callback`, for a request whose cache was turned on: the first
    /// plugin in chain order that returns a key decides it. When none does, the gateway keys
    /// by `Host` and request target.
    fn cache_key(
        &self,
        _session: &Session,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<Option<CacheKey>> {
        Ok(None)
    }

    /// Pingora's `cache_vary_filter`: the variance of a stored response for this request
    /// (built from the response's `Vary` with [`pingora::cache::VarianceBuilder`]). The first
    /// plugin that returns one decides; `None` everywhere means no variance.
    fn cache_vary(
        &self,
        _meta: &CacheMeta,
        _request: &RequestHeader,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Option<HashBinary> {
        None
    }

    /// Pingora's `cache_hit_filter`, after a lookup found an entry (`is_fresh` false for a
    /// stale one), before it is used: the first plugin that returns `Some` forces the entry
    /// expired, fresh or missed; `None` everywhere keeps Pingora's verdict.
    async fn cache_hit(
        &self,
        _session: &mut Session,
        _meta: &CacheMeta,
        _hit: &mut HitHandler,
        _is_fresh: bool,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<Option<ForcedFreshness>> {
        Ok(None)
    }

    /// Pingora's `response_cache_filter`, on the upstream's response to a cache-enabled
    /// request: whether (and how long) it may be stored. The first plugin that returns `Some`
    /// decides; `None` everywhere stores nothing.
    fn response_cache(
        &self,
        _session: &Session,
        _response: &ResponseHeader,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<Option<RespCacheable>> {
        Ok(None)
    }

    /// Pingora's `should_serve_stale`: whether a stale entry may be served, while it is
    /// revalidated in the background (`error` is `None`: stale-while-revalidate) or because the
    /// upstream failed (`error` is set: stale-if-error). The first plugin that returns `Some`
    /// decides; `None` everywhere serves stale only on an upstream error.
    fn cache_serve_stale(
        &self,
        _session: &Session,
        _error: Option<&pingora::Error>,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Option<bool> {
        None
    }

    /// Runs in chain order when a request of a route with a cache plugin is about to go
    /// upstream because the cache could not answer it (miss, expired entry, bypass):
    /// `Flow::Respond` answers instead (e.g. `Cache-Control: only-if-cached` gets 504).
    fn cache_miss(
        &self,
        _session: &Session,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    /// A plugin of the chain answered the request itself with a complete response
    /// (`Reply::Full`, e.g. `aggregate`): the route's cache plugins that ran before it may
    /// store it (the header as the plugin made it, before any response hook). Chain order.
    fn reply_cache(
        &self,
        _session: &Session,
        _header: &ResponseHeader,
        _body: &bytes::Bytes,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) {
    }

    /// The admin API's `POST /cache/purge`: removes this plugin's stored entries for one
    /// request target or every target under a prefix, and says how many it removed. Called
    /// outside any request, on every plugin of the running config.
    fn cache_purge(&self, _target: &CachePurge) -> usize {
        0
    }

    /// Runs in reverse chain order on every response to the client, proxied or produced by a
    /// plugin or the gateway (errors included), for every plugin the chain reached: those
    /// before and including the one that answered, all of them for a proxied request.
    async fn response_filter(
        &self,
        _session: &mut Session,
        _response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) -> Result<()> {
        Ok(())
    }

    /// Runs once per request for every plugin of the chain, when the response is complete or
    /// the request failed (`error` is then set). Cannot change the response any more.
    async fn logging(
        &self,
        _session: &mut Session,
        _error: Option<&pingora::Error>,
        _ctx: &mut RequestCtx,
        _state: &mut Self::State,
    ) {
    }
}

/// Which hooks a plugin overrides, so the gateway skips the rest without a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// [`Plugin::preflight`]; also puts the plugin first in its chains.
    pub preflight: bool,
    pub request_filter: bool,
    pub upstream_peer: bool,
    pub upstream_request_filter: bool,
    pub request_body: bool,
    pub response_body: bool,
    pub upstream_response: bool,
    pub upstream_failure: bool,
    /// The cache hooks (`request_cache`, `cache_key`, `cache_vary`, `cache_hit`,
    /// `response_cache`, `cache_serve_stale`, `cache_miss`): a cache plugin implements them
    /// together.
    pub cache: bool,
    pub response_filter: bool,
    pub logging: bool,
}

impl Hooks {
    pub const NONE: Hooks = Hooks {
        preflight: false,
        request_filter: false,
        upstream_peer: false,
        upstream_request_filter: false,
        request_body: false,
        response_body: false,
        upstream_response: false,
        upstream_failure: false,
        cache: false,
        response_filter: false,
        logging: false,
    };

    /// The hooks either set runs (a route's chain runs the union of its plugins').
    pub fn union(self, other: Hooks) -> Hooks {
        Hooks {
            preflight: self.preflight || other.preflight,
            request_filter: self.request_filter || other.request_filter,
            upstream_peer: self.upstream_peer || other.upstream_peer,
            upstream_request_filter: self.upstream_request_filter || other.upstream_request_filter,
            request_body: self.request_body || other.request_body,
            response_body: self.response_body || other.response_body,
            upstream_response: self.upstream_response || other.upstream_response,
            upstream_failure: self.upstream_failure || other.upstream_failure,
            cache: self.cache || other.cache,
            response_filter: self.response_filter || other.response_filter,
            logging: self.logging || other.logging,
        }
    }

    pub const ALL: Hooks = Hooks {
        preflight: true,
        request_filter: true,
        upstream_peer: true,
        upstream_request_filter: true,
        request_body: true,
        response_body: true,
        upstream_response: true,
        upstream_failure: true,
        cache: true,
        response_filter: true,
        logging: true,
    };
}

/// One try to reach an endpoint of the route's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The pool (`[upstreams.NAME]`).
    pub upstream: Arc<str>,
    /// The endpoint tried.
    pub endpoint: std::net::SocketAddr,
    /// 1 for the first try, 2 for the first retry, and so on.
    pub number: usize,
}

/// Why a try to reach an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The connection was refused or could not be made (nothing was sent).
    ConnectError,
    /// Connecting took longer than the pool's `connect_timeout` (nothing was sent).
    ConnectTimeout,
    /// Connected, then no (complete) answer within the pool's read or write timeout.
    Timeout,
    /// Connected, then the endpoint failed: reset, closed, or answered something unreadable.
    Error,
    /// The endpoint answered a status the pool's `retry_on` names (502, 503, 504), and the
    /// gateway tries again instead of passing it on.
    Status(u16),
}

impl UpstreamFailure {
    /// A bounded label (`connect_error`, `connect_timeout`, `timeout`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::ConnectError => "connect_error",
            UpstreamFailure::ConnectTimeout => "connect_timeout",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Error => "error",
            UpstreamFailure::Status(_) => "status",
        }
    }

    /// Whether the request may have reached the endpoint.
    pub fn after_connect(self) -> bool {
        matches!(
            self,
            UpstreamFailure::Timeout | UpstreamFailure::Error | UpstreamFailure::Status(_)
        )
    }
}

/// What `POST /cache/purge` on the admin listener removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachePurge {
    /// Every stored variant of one request target (path and query, e.g. `/api/items/1`).
    Url(String),
    /// Every stored entry whose request target starts with this prefix.
    Prefix(String),
}

/// Per-request state of one plugin, type-erased so a chain can hold plugins of any type.
pub type ErasedState = Box<dyn Any + Send + Sync>;

/// The object-safe face of a [`Plugin`] that the gateway's chain holds. Implemented for every
/// `Plugin` through [`Erased`]; plugin authors never implement it by hand.
#[async_trait]
pub trait DynPlugin: Send + Sync + 'static {
    fn new_state(&self) -> ErasedState;
    fn hooks(&self) -> Hooks;
    async fn start(&self);
    async fn stop(&self);
    fn preflight(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Flow>;
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Flow>;
    async fn upstream_peer(
        &self,
        session: &mut Session,
        peer: &mut HttpPeer,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    async fn request_body(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    fn response_body(
        &self,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    async fn upstream_response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        attempt: &Attempt,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    fn upstream_failure(
        &self,
        attempt: &Attempt,
        failure: UpstreamFailure,
        retrying: bool,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    );
    fn request_cache(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    fn cache_key(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Option<CacheKey>>;
    fn cache_vary(
        &self,
        meta: &CacheMeta,
        request: &RequestHeader,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Option<HashBinary>;
    async fn cache_hit(
        &self,
        session: &mut Session,
        meta: &CacheMeta,
        hit: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Option<ForcedFreshness>>;
    fn response_cache(
        &self,
        session: &Session,
        response: &ResponseHeader,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Option<RespCacheable>>;
    fn cache_serve_stale(
        &self,
        session: &Session,
        error: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Option<bool>;
    fn cache_miss(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Flow>;
    fn cache_purge(&self, target: &CachePurge) -> usize;
    fn reply_cache(
        &self,
        session: &Session,
        header: &ResponseHeader,
        body: &bytes::Bytes,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    );
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()>;
    async fn logging(
        &self,
        session: &mut Session,
        error: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    );
}

/// Adapts a typed [`Plugin`] to [`DynPlugin`], with the hooks it declares ([`Plugin::hooks`]).
pub struct Erased<P> {
    plugin: P,
    hooks: Hooks,
}

impl<P: Plugin> Erased<P> {
    pub fn new(plugin: P) -> Self {
        let hooks = plugin.hooks();
        Erased { plugin, hooks }
    }

    pub fn into_dyn(plugin: P) -> Arc<dyn DynPlugin> {
        Arc::new(Self::new(plugin))
    }
}

fn typed<S: 'static>(state: &mut ErasedState) -> Result<&mut S> {
    // A mismatch would be a gateway bug (states are created by the same plugin); answer it as
    // an internal error rather than panicking on the request path.
    state.downcast_mut::<S>().ok_or_else(|| {
        pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "plugin state of an unexpected type",
        )
    })
}

/// The boxed future every hook of a [`DynPlugin`] returns.
type HookFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// Written out rather than with `async fn`: each hook hands back the plugin's own boxed future
// instead of boxing it a second time, which saves an allocation per hook call per request.
impl<P: Plugin> DynPlugin for Erased<P> {
    fn new_state(&self) -> ErasedState {
        Box::new(P::State::default())
    }

    fn hooks(&self) -> Hooks {
        self.hooks
    }

    fn start<'a, 'f>(&'a self) -> HookFuture<'f, ()>
    where
        'a: 'f,
        Self: 'f,
    {
        self.plugin.start()
    }

    fn stop<'a, 'f>(&'a self) -> HookFuture<'f, ()>
    where
        'a: 'f,
        Self: 'f,
    {
        self.plugin.stop()
    }

    fn preflight(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Flow> {
        self.plugin.preflight(session, ctx, typed(state)?)
    }

    fn request_filter<'a, 's, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<Flow>>
    where
        'a: 'f,
        's: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self.plugin.request_filter(session, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn upstream_peer<'a, 's, 'p, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        peer: &'p mut HttpPeer,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<()>>
    where
        'a: 'f,
        's: 'f,
        'p: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self.plugin.upstream_peer(session, peer, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn upstream_request_filter<'a, 's, 'r, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        upstream_request: &'r mut RequestHeader,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<()>>
    where
        'a: 'f,
        's: 'f,
        'r: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self
                .plugin
                .upstream_request_filter(session, upstream_request, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn request_body<'a, 's, 'b, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        body: &'b mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<()>>
    where
        'a: 'f,
        's: 'f,
        'b: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self
                .plugin
                .request_body(session, body, end_of_stream, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn response_body(
        &self,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()> {
        self.plugin
            .response_body(body, end_of_stream, ctx, typed(state)?)
    }

    fn upstream_response<'a, 's, 'r, 'at, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        response: &'r mut ResponseHeader,
        attempt: &'at Attempt,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<()>>
    where
        'a: 'f,
        's: 'f,
        'r: 'f,
        'at: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self
                .plugin
                .upstream_response(session, response, attempt, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn upstream_failure(
        &self,
        attempt: &Attempt,
        failure: UpstreamFailure,
        retrying: bool,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) {
        if let Ok(state) = typed(state) {
            self.plugin
                .upstream_failure(attempt, failure, retrying, ctx, state);
        }
    }

    fn request_cache(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<()> {
        self.plugin.request_cache(session, ctx, typed(state)?)
    }

    fn cache_key(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Option<CacheKey>> {
        self.plugin.cache_key(session, ctx, typed(state)?)
    }

    fn cache_vary(
        &self,
        meta: &CacheMeta,
        request: &RequestHeader,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Option<HashBinary> {
        self.plugin
            .cache_vary(meta, request, ctx, typed(state).ok()?)
    }

    fn cache_hit<'a, 's, 'm, 'h, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        meta: &'m CacheMeta,
        hit: &'h mut HitHandler,
        is_fresh: bool,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<Option<ForcedFreshness>>>
    where
        'a: 'f,
        's: 'f,
        'm: 'f,
        'h: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self
                .plugin
                .cache_hit(session, meta, hit, is_fresh, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn response_cache(
        &self,
        session: &Session,
        response: &ResponseHeader,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Option<RespCacheable>> {
        self.plugin
            .response_cache(session, response, ctx, typed(state)?)
    }

    fn cache_serve_stale(
        &self,
        session: &Session,
        error: Option<&pingora::Error>,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Option<bool> {
        self.plugin
            .cache_serve_stale(session, error, ctx, typed(state).ok()?)
    }

    fn cache_miss(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) -> Result<Flow> {
        self.plugin.cache_miss(session, ctx, typed(state)?)
    }

    fn cache_purge(&self, target: &CachePurge) -> usize {
        self.plugin.cache_purge(target)
    }

    fn reply_cache(
        &self,
        session: &Session,
        header: &ResponseHeader,
        body: &bytes::Bytes,
        ctx: &mut RequestCtx,
        state: &mut ErasedState,
    ) {
        if let Ok(state) = typed(state) {
            self.plugin.reply_cache(session, header, body, ctx, state);
        }
    }

    fn response_filter<'a, 's, 'r, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        response: &'r mut ResponseHeader,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, Result<()>>
    where
        'a: 'f,
        's: 'f,
        'r: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self.plugin.response_filter(session, response, ctx, state),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    fn logging<'a, 's, 'e, 'c, 'st, 'f>(
        &'a self,
        session: &'s mut Session,
        error: Option<&'e pingora::Error>,
        ctx: &'c mut RequestCtx,
        state: &'st mut ErasedState,
    ) -> HookFuture<'f, ()>
    where
        'a: 'f,
        's: 'f,
        'e: 'f,
        'c: 'f,
        'st: 'f,
        Self: 'f,
    {
        match typed(state) {
            Ok(state) => self.plugin.logging(session, error, ctx, state),
            Err(_) => Box::pin(std::future::ready(())),
        }
    }
}

/// What a built plugin is, for the gateway: the erased plugin and what it promises.
#[derive(Clone)]
pub struct BuiltPlugin {
    /// The `type` it was built from, e.g. `"strip_headers"` (a bounded metric label).
    pub kind: &'static str,
    pub plugin: Arc<dyn DynPlugin>,
    /// True when the plugin answers every request itself (e.g. `aggregate`): a route with no
    /// upstream is valid only when one of its plugins responds.
    pub responds: bool,
    /// Request headers this plugin sets from verified credentials. The gateway removes all of
    /// them from every incoming request before any plugin runs, so clients cannot forge them.
    pub trusted_headers: Vec<HeaderName>,
    /// Cookies that belong to the gateway (a session's): removed from every proxied request,
    /// on every route, so no upstream ever holds one.
    pub gateway_cookies: Vec<String>,
}

/// What the gateway hands to a plugin's `build`.
///
/// `build` is synchronous and may run outside any async runtime (at start-up) or on a blocking
/// thread (on reload): it validates and constructs, nothing more. Background work and first
/// fetches belong in [`Plugin::start`] (on the gateway's runtime, before the config serves),
/// and end in [`Plugin::stop`].
#[derive(Clone)]
pub struct BuildEnv {
    /// The plugin's config name (`[plugins.NAME]`), e.g. for metric labels.
    pub name: Arc<str>,
    /// The upstream pools of the snapshot being built.
    pub upstreams: Arc<dyn Upstreams>,
    /// The gateway's plugin metrics (one instance for the process lifetime).
    pub metrics: Arc<PluginMetrics>,
    /// This plugin type's own metrics, `sallyport_<type>_<name>`, in the gateway's registry
    /// (see [`metrics::TypeMetrics`]): register what the plugin counts here.
    pub registry: metrics::TypeMetrics,
    /// The public keys the gateway publishes as a JWKS (one registry for the process).
    pub public_keys: Arc<keys::KeyRegistry>,
}

/// An error found while building a plugin from its config; `path` is relative to the
/// plugin's table (e.g. `request[2]`), the gateway prefixes it with `plugins.NAME`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

impl BuildError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A plugin type, implemented by its config struct in the plugin's own folder: everything
/// the gateway needs to know about the type besides its one line in [`plugin_registry!`].
pub trait PluginType: Sized + Send + Sync + 'static {
    /// The `type = "..."` value: the snake_case name of its registry variant (a test checks).
    const KIND: &'static str;
    /// Answers every request itself (e.g. `aggregate`): a route with no upstream is valid only
    /// when one of its plugins responds.
    const RESPONDS: bool = false;

    /// Checks the config without side effects (no network, no background tasks): what
    /// `sallyport --check` reports. `build` checks the same and more.
    fn validate(&self) -> Vec<BuildError> {
        Vec::new()
    }

    /// Upstream pools the config refers to, as `(path, name)`: `--check` reports unknown ones.
    fn upstream_refs(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Path parameters the plugin reads (`{path.NAME}` in a template), as `(path, NAME)`: a
    /// route listing the plugin must capture each of them (`path = "/users/{NAME}"`), or
    /// `--check` reports it; otherwise every request would fail at run time.
    fn path_params(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// The built plugin holds state that must outlive a reload (quota counters, bulkhead slots
    /// in use, keys fetched from an identity provider): when this config is unchanged, the
    /// gateway keeps the built plugin instead of building a new one, so a SIGHUP neither
    /// resets quotas, nor lets a second full bulkhead in, nor depends on the IdP being up.
    /// Plugins that read files or hold the snapshot's pools are rebuilt on every load.
    fn keeps_state_across_reloads(&self) -> bool {
        false
    }

    /// Request headers the plugin sets from verified credentials: the gateway removes them
    /// from every incoming request before any plugin runs, so clients cannot forge them.
    fn trusted_headers(&self) -> Vec<HeaderName> {
        Vec::new()
    }

    /// Cookies the plugin sets for the gateway itself (e.g. a session cookie): the gateway
    /// removes them from every request it proxies, on every route, not only the plugin's.
    fn gateway_cookies(&self) -> Vec<String> {
        Vec::new()
    }

    /// Validates the config and builds the shared plugin; every problem is reported.
    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>>;
}

/// The registry of plugin types: one line per type, `folder => Variant(ConfigType)`, which
/// declares the plugin's module (`plugins/src/<folder>/`) and its variant, whose snake_case
/// name is the `type` users write. Generates [`PluginConfig`], the closed
/// enum a `[plugins.NAME]` table is read into (unknown types and unknown keys are errors, never
/// silently skipped), and its dispatch to [`PluginType`].
macro_rules! plugin_registry {
    ($($(#[$meta:meta])* $module:ident => $variant:ident($config:ident)),* $(,)?) => {
        $($(#[$meta])* pub mod $module;)*

        /// The closed set of plugin types a `[plugins.NAME]` table can name with
        /// `type = "..."`. (Variants differ in size; configs are read once per load, so
        /// boxing them would buy nothing.)
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, Deserialize, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        pub enum PluginConfig {
            $($(#[$meta])* $variant($module::$config),)*
        }

        impl PluginConfig {
            /// Every `type` value, in registry order.
            // One push per line: a registry line may be `#[cfg]`-gated, which `vec![..]`
            // elements cannot be.
            #[allow(clippy::vec_init_then_push)]
            pub fn kinds() -> Vec<&'static str> {
                let mut kinds = Vec::new();
                $($(#[$meta])* kinds.push(<$module::$config as PluginType>::KIND);)*
                kinds
            }

            /// The `type` string of this config.
            pub fn kind(&self) -> &'static str {
                match self {
                    $($(#[$meta])* PluginConfig::$variant(_) => <$module::$config as PluginType>::KIND,)*
                }
            }

            /// See [`PluginType::RESPONDS`].
            pub fn responds(&self) -> bool {
                match self {
                    $($(#[$meta])* PluginConfig::$variant(_) => <$module::$config as PluginType>::RESPONDS,)*
                }
            }

            /// See [`PluginType::keeps_state_across_reloads`].
            pub fn keeps_state_across_reloads(&self) -> bool {
                match self {
                    $($(#[$meta])* PluginConfig::$variant(c) => c.keeps_state_across_reloads(),)*
                }
            }

            /// See [`PluginType::validate`].
            pub fn validate(&self) -> Vec<BuildError> {
                match self {
                    $($(#[$meta])* PluginConfig::$variant(c) => c.validate(),)*
                }
            }

            /// See [`PluginType::upstream_refs`].
            pub fn upstream_refs(&self) -> Vec<(String, String)> {
                match self {
                    $($(#[$meta])* PluginConfig::$variant(c) => c.upstream_refs(),)*
                }
            }

            /// See [`PluginType::path_params`].
            pub fn path_params(&self) -> Vec<(String, String)> {
                match self {
                    $($(#[$meta])* PluginConfig::$variant(c) => c.path_params(),)*
                }
            }

            /// Validates the config and builds the shared plugin; every problem is reported.
            pub fn build(
                &self,
                env: &BuildEnv,
            ) -> std::result::Result<BuiltPlugin, Vec<BuildError>> {
                let (plugin, trusted_headers, gateway_cookies) = match self {
                    $($(#[$meta])* PluginConfig::$variant(c) => (c.build(env)?, c.trusted_headers(), c.gateway_cookies()),)*
                };
                Ok(BuiltPlugin {
                    kind: self.kind(),
                    plugin,
                    responds: self.responds(),
                    trusted_headers,
                    gateway_cookies,
                })
            }
        }
    };
}

plugin_registry! {
    trace => Trace(TraceConfig),
    strip_headers => StripHeaders(StripHeadersConfig),
    quota => Quota(QuotaConfig),
    concurrency => Concurrency(ConcurrencyConfig),
    aggregate => Aggregate(AggregateConfig),
    jwt => Jwt(JwtConfig),
    authorize => Authorize(AuthorizeConfig),
    key_auth => KeyAuth(KeyAuthConfig),
    example_header => ExampleHeader(ExampleHeaderConfig),
    cache => Cache(CacheConfig),
    cors => Cors(CorsConfig),
    ip_filter => IpFilter(IpFilterConfig),
    traffic_split => TrafficSplit(TrafficSplitConfig),
    headers => Headers(HeadersConfig),
    json_transform => JsonTransform(JsonTransformConfig),
    identity_token => IdentityToken(IdentityTokenConfig),
    jwks => Jwks(JwksConfig),
    session => Session(SessionConfig),
    // Test builds only (feature `testing`): records the hooks it sees in a response header.
    #[cfg(feature = "testing")]
    probe => Probe(ProbeConfig),
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    /// Each type's `KIND` is the `type` value that selects it (the variant's snake_case).
    #[test]
    fn every_kind_selects_its_own_variant() {
        for kind in &PluginConfig::kinds() {
            // A table with only its `type` either parses as that type or fails on a missing
            // key of it; never on an unknown variant.
            let text = format!("type = \"{kind}\"\n");
            match toml::from_str::<PluginConfig>(&text) {
                Ok(config) => assert_eq!(config.kind(), *kind),
                Err(e) => assert!(!e.to_string().contains("unknown variant"), "{kind}: {e}"),
            }
        }
    }
}
