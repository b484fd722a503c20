//! Unit-testing a plugin without the gateway: a real Pingora [`Session`] read from raw request
//! bytes over an in-memory stream, and a [`Harness`] that builds a plugin from its TOML table
//! and runs its hooks in the order the gateway does.
//!
//! ```ignore
//! let mut h = Harness::build("type = \"example_header\"\nname = \"x-a\"\nvalue = \"1\"")?;
//! let (mut s, _client) = testkit::session(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await?;
//! assert!(matches!(h.request(&mut s).await?, Flow::Continue));
//! let resp = h.response(&mut s, ResponseHeader::build(200, None)?).await?;
//! ```
//!
//! Integration tests (`tests/`) still prove behaviour through real sockets; this kit is for the
//! fast, exhaustive cases of one plugin's logic.

use std::sync::Arc;

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use tokio::io::AsyncWriteExt;

use crate::{
    BuildEnv, BuildError, BuiltPlugin, ErasedState, Flow, PluginConfig, PluginMetrics, RequestCtx,
    Result,
};

/// The client end of a [`session`]: keep it while the session is used (dropping it reads as
/// the client closing); [`Client::received`] returns what the session wrote to it.
pub struct Client(tokio::io::DuplexStream);

impl Client {
    /// Everything written to the client so far (the session must be dropped or finished).
    pub async fn received(mut self) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let _ = self.0.read_to_end(&mut out).await;
        out
    }
}

/// A Pingora session that has read `raw` (an HTTP/1.1 request head, and body if any) from an
/// in-memory client. Fails when the bytes are not a request Pingora accepts.
pub async fn session(raw: &[u8]) -> Result<(Session, Client)> {
    let (mut client, server) = tokio::io::duplex(raw.len().max(1024) * 2);
    client
        .write_all(raw)
        .await
        .map_err(|e| pingora::Error::because(pingora::ErrorType::WriteError, "test client", e))?;
    let mut s = Session::new_h1(Box::new(server));
    if !s.read_request().await? {
        return pingora::Error::e_explain(pingora::ErrorType::ReadError, "no request in bytes");
    }
    Ok((s, Client(client)))
}

/// A [`BuildEnv`] for tests: no upstream pools, metrics in a registry of its own.
pub fn build_env(name: &str, kind: &'static str) -> BuildEnv {
    BuildEnv {
        registry: crate::MetricsRegistry::new(prometheus::Registry::new()).for_type(kind),
        name: Arc::from(name),
        upstreams: Arc::new(crate::upstream::NoUpstreams),
        public_keys: Arc::default(),
        metrics: Arc::new(
            PluginMetrics::register(&prometheus::Registry::new())
                .unwrap_or_else(|e| unreachable!("a fresh registry has no duplicates: {e}")),
        ),
    }
}

/// One built plugin and its per-request state, driven hook by hook.
pub struct Harness {
    pub built: BuiltPlugin,
    pub ctx: RequestCtx,
    state: ErasedState,
}

impl Harness {
    /// Reads a `[plugins.NAME]` table (with its `type`) and builds the plugin, as the gateway
    /// does on a config load: `Err` lists every problem with its path.
    pub fn build(table: &str) -> std::result::Result<Harness, Vec<BuildError>> {
        let config: PluginConfig =
            toml::from_str(table).map_err(|e| vec![BuildError::new("", e.to_string())])?;
        let built = config.build(&build_env("test", config.kind()))?;
        let state = built.plugin.new_state();
        Ok(Harness {
            built,
            ctx: RequestCtx::new("test-request".into(), Arc::from("test-route")),
            state,
        })
    }

    /// `request_filter`, when the plugin runs it.
    pub async fn request(&mut self, session: &mut Session) -> Result<Flow> {
        if !self.built.plugin.hooks().request_filter {
            return Ok(Flow::Continue);
        }
        self.built
            .plugin
            .request_filter(session, &mut self.ctx, &mut self.state)
            .await
    }

    /// `upstream_request_filter` on the request header that would go upstream.
    pub async fn upstream_request(
        &mut self,
        session: &mut Session,
        mut upstream: RequestHeader,
    ) -> Result<RequestHeader> {
        if self.built.plugin.hooks().upstream_request_filter {
            self.built
                .plugin
                .upstream_request_filter(session, &mut upstream, &mut self.ctx, &mut self.state)
                .await?;
        }
        Ok(upstream)
    }

    /// `response_filter` on a response header.
    pub async fn response(
        &mut self,
        session: &mut Session,
        mut response: ResponseHeader,
    ) -> Result<ResponseHeader> {
        if self.built.plugin.hooks().response_filter {
            self.built
                .plugin
                .response_filter(session, &mut response, &mut self.ctx, &mut self.state)
                .await?;
        }
        Ok(response)
    }

    /// `logging`, as at the end of every request.
    pub async fn logging(&mut self, session: &mut Session, error: Option<&pingora::Error>) {
        if self.built.plugin.hooks().logging {
            self.built
                .plugin
                .logging(session, error, &mut self.ctx, &mut self.state)
                .await;
        }
    }
}
