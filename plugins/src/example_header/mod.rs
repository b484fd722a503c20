//! `example_header`: sets one configured header on every response to the client, or on every
//! request sent upstream. Small on purpose: it is the worked example of
//! docs/writing-a-plugin.md, and shows every part a plugin has.
//!
//! Phases: `response_filter` (with `on = "response"`) or `upstream_request_filter` (with
//! `on = "upstream"`); no other hook is called. Per-request state: none.
//!
//! ```toml
//! [plugins.served-by]
//! type = "example_header"
//! name = "x-served-by"
//! value = "sallyport"
//! on = "response"          # or "upstream"
//! ```
//! Errors at load: `name` not a header name, `value` not a header value, or a name the
//! gateway owns (`host`, `content-length`, `transfer-encoding`, `connection`).
//! Metrics: `sallyport_example_header_set_total{plugin}`, headers set, registered through
//! `BuildEnv::registry` (the plugin's own, without editing a shared struct).

mod config;

use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use prometheus::IntCounter;

pub use config::{Direction, ExampleHeaderConfig};

use crate::{BuildEnv, BuildError, DynPlugin, Erased, Hooks, Plugin, PluginType, RequestCtx, Result};

/// Headers that describe the message itself: setting them from config would break framing.
const OWNED_BY_THE_GATEWAY: [&str; 4] = ["host", "content-length", "transfer-encoding", "connection"];

/// The built plugin: the header, parsed once.
pub struct ExampleHeader {
    name: HeaderName,
    value: HeaderValue,
    on: Direction,
    /// `sallyport_example_header_set_total{plugin="NAME"}`.
    set: IntCounter,
}

/// Parses the config into the header it sets, reporting every problem with its key.
fn parse(
    c: &ExampleHeaderConfig,
) -> std::result::Result<(HeaderName, HeaderValue), Vec<BuildError>> {
    let mut errors = Vec::new();
    let name = match c.name.value() {
        Ok(n) if OWNED_BY_THE_GATEWAY.contains(&n.as_str()) => {
            errors.push(BuildError::new("name", format!("{n} is set by the gateway itself")));
            None
        }
        Ok(n) => Some(n.clone()),
        Err(m) => {
            errors.push(BuildError::new("name", m));
            None
        }
    };
    // RFC 9110 5.5: new field values are visible US-ASCII, spaces and tabs.
    let ascii = c
        .value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    let value = match HeaderValue::from_str(&c.value) {
        Ok(v) if ascii => Some(v),
        _ => {
            errors.push(BuildError::new(
                "value",
                "must be visible US-ASCII characters, spaces and tabs",
            ));
            None
        }
    };
    match (name, value) {
        (Some(name), Some(value)) if errors.is_empty() => Ok((name, value)),
        _ => Err(errors),
    }
}

impl PluginType for ExampleHeaderConfig {
    const KIND: &'static str = "example_header";

    fn validate(&self) -> Vec<BuildError> {
        parse(self).err().unwrap_or_default()
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let (name, value) = parse(self)?;
        let set = env
            .registry
            .counter("set_total", "Headers the example_header plugin set.", &["plugin"])
            .map_err(|e| vec![e])?
            .with_label_values(&[&*env.name]);
        Ok(Erased::into_dyn(ExampleHeader {
            name,
            value,
            on: self.on,
            set,
        }))
    }
}

#[async_trait]
impl Plugin for ExampleHeader {
    type State = ();

    fn hooks(&self) -> Hooks {
        Hooks {
            response_filter: self.on == Direction::Response,
            upstream_request_filter: self.on == Direction::Upstream,
            ..Hooks::NONE
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        self.set.inc();
        upstream_request.insert_header(self.name.clone(), self.value.clone())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        self.set.inc();
        response.insert_header(self.name.clone(), self.value.clone())
    }
}

#[cfg(test)]
mod tests {
    use crate::testkit::{session, Harness};
    use crate::Flow;
    use pingora::http::{RequestHeader, ResponseHeader};

    const GET: &[u8] = b"GET /orders HTTP/1.1\r\nHost: api.test\r\n\r\n";

    #[tokio::test]
    async fn sets_the_header_on_responses_by_default() {
        let mut h = Harness::build(
            "type = \"example_header\"\nname = \"X-Served-By\"\nvalue = \"sallyport\"",
        )
        .unwrap();
        let (mut s, _client) = session(GET).await.unwrap();
        assert!(matches!(h.request(&mut s).await.unwrap(), Flow::Continue));
        let upstream = RequestHeader::build("GET", b"/orders", None).unwrap();
        let upstream = h.upstream_request(&mut s, upstream).await.unwrap();
        assert!(upstream.headers.get("x-served-by").is_none(), "not upstream");
        let resp = ResponseHeader::build(200, None).unwrap();
        let resp = h.response(&mut s, resp).await.unwrap();
        assert_eq!(resp.headers["x-served-by"], "sallyport");
    }

    #[tokio::test]
    async fn on_upstream_sets_it_on_the_proxied_request_only() {
        let mut h = Harness::build(
            "type = \"example_header\"\nname = \"x-gateway\"\nvalue = \"edge-1\"\non = \"upstream\"",
        )
        .unwrap();
        let (mut s, _client) = session(GET).await.unwrap();
        let upstream = RequestHeader::build("GET", b"/orders", None).unwrap();
        let upstream = h.upstream_request(&mut s, upstream).await.unwrap();
        assert_eq!(upstream.headers["x-gateway"], "edge-1");
        let resp = h
            .response(&mut s, ResponseHeader::build(200, None).unwrap())
            .await
            .unwrap();
        assert!(resp.headers.get("x-gateway").is_none());
    }

    #[test]
    fn bad_configs_name_every_key() {
        let errors = |table: &str| -> Vec<String> {
            match Harness::build(table) {
                Ok(_) => Vec::new(),
                Err(e) => e.into_iter().map(|e| e.path).collect(),
            }
        };
        assert_eq!(
            errors("type = \"example_header\"\nname = \"bad name\"\nvalue = \"caf\u{e9}\""),
            ["name", "value"]
        );
        assert_eq!(
            errors("type = \"example_header\"\nname = \"Content-Length\"\nvalue = \"1\""),
            ["name"]
        );
        // Unknown keys and values are refused by serde before build.
        assert_eq!(
            errors("type = \"example_header\"\nname = \"x\"\nvalue = \"1\"\nonn = \"upstream\"").len(),
            1
        );
        assert_eq!(
            errors("type = \"example_header\"\nname = \"x\"\nvalue = \"1\"\non = \"sideways\"").len(),
            1
        );
    }
}
