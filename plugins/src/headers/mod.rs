//! `headers`: sets and removes request headers on their way upstream and response headers on
//! their way to the client, with values from templates: `{claim.NAME}` (the verified
//! principal), `{header.NAME}`, `{query.NAME}`, `{path.NAME}`, `{route}`, `{request_id}`,
//! `{client_ip}`, and literal text.
//!
//! - A value is set only when every substitution has a value, and the result is a valid header
//!   value (CR, LF and NUL never pass); otherwise the header is removed, so the receiver sees
//!   the gateway's value or none.
//! - A request header set from a claim is a trusted header: the gateway removes it from every
//!   client request (as it does for `jwt`'s `forward_claims`), so a client cannot forge it on a
//!   route where the claim is missing.
//! - `remove` runs before `set`.
//!
//! ```toml
//! [plugins.add-context]
//! type = "headers"
//! request  = { set = { "x-tenant" = "{claim.tenant}", "x-route" = "{route}" }, remove = ["x-debug"] }
//! response = { set = { "x-content-type-options" = "nosniff" } }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderName;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use serde::Deserialize;

use crate::conf::{parse_errors, ConfigStr, Parsed};
use crate::template::Template;
use crate::{BuildEnv, BuildError, DynPlugin, Erased, Hooks, Plugin, RequestCtx, Result};

/// `[plugins.NAME]` with `type = "headers"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    #[serde(default)]
    pub request: HeaderOpsConfig,
    #[serde(default)]
    pub response: HeaderOpsConfig,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsConfig {
    /// Header name → value template.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<Parsed<HeaderName>>,
}

/// Headers the gateway itself manages on the way upstream or back: never set by this plugin.
const MANAGED: [&str; 9] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
];

struct Ops {
    set: Vec<(HeaderName, Template)>,
    remove: Vec<HeaderName>,
}

fn ops(side: &str, c: &HeaderOpsConfig) -> std::result::Result<Ops, Vec<BuildError>> {
    let mut errors = parse_errors(&format!("{side}.remove"), &c.remove);
    for (i, h) in c.remove.iter().enumerate() {
        if h.get().is_some_and(|h| MANAGED.contains(&h.as_str())) {
            errors.push(BuildError::new(
                format!("{side}.remove[{i}]"),
                "is managed by the gateway; it cannot be removed",
            ));
        }
    }
    let mut set = Vec::new();
    for (name, value) in &c.set {
        let at = format!("{side}.set.{name:?}");
        let header = match HeaderName::parse_config(name) {
            Ok(h) if MANAGED.contains(&h.as_str()) => {
                errors.push(BuildError::new(&at, "is managed by the gateway; it cannot be set"));
                continue;
            }
            Ok(h) => h,
            Err(e) => {
                errors.push(BuildError::new(&at, e));
                continue;
            }
        };
        match Template::parse_value(value) {
            Ok(t) => set.push((header, t)),
            Err(e) => errors.push(BuildError::new(at, e)),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Ops {
        set,
        remove: c.remove.iter().filter_map(|h| h.get().cloned()).collect(),
    })
}

/// What `ops` does to a message for this request: the headers to remove, then the ones to set.
/// A value that cannot be rendered (missing, or not a valid header value) removes its header.
fn changes(
    ops: &Ops,
    req: &RequestHeader,
    ctx: &RequestCtx,
) -> (Vec<HeaderName>, Vec<(HeaderName, http::HeaderValue)>) {
    let mut remove = ops.remove.clone();
    let mut set = Vec::new();
    for (name, template) in &ops.set {
        match template.render_value(req, ctx) {
            Ok(value) => set.push((name.clone(), value)),
            Err(_) => remove.push(name.clone()),
        }
    }
    (remove, set)
}

/// The built `headers` plugin.
pub struct Headers {
    request: Ops,
    response: Ops,
}

#[async_trait]
impl Plugin for Headers {
    type State = ();

    fn hooks(&self) -> Hooks {
        Hooks {
            upstream_request_filter: !self.request.set.is_empty() || !self.request.remove.is_empty(),
            response_filter: !self.response.set.is_empty() || !self.response.remove.is_empty(),
            ..Hooks::NONE
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        let (remove, set) = changes(&self.request, session.req_header(), ctx);
        for name in remove {
            upstream_request.remove_header(&name);
        }
        for (name, value) in set {
            upstream_request.insert_header(name, value)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        let (remove, set) = changes(&self.response, session.req_header(), ctx);
        for name in remove {
            response.remove_header(&name);
        }
        for (name, value) in set {
            response.insert_header(name, value)?;
        }
        Ok(())
    }
}

impl crate::PluginType for HeadersConfig {
    const KIND: &'static str = "headers";

    fn validate(&self) -> Vec<BuildError> {
        let mut errors = Vec::new();
        for (side, c) in [("request", &self.request), ("response", &self.response)] {
            if let Err(e) = ops(side, c) {
                errors.extend(e);
            }
        }
        if self.request.set.is_empty()
            && self.request.remove.is_empty()
            && self.response.set.is_empty()
            && self.response.remove.is_empty()
        {
            errors.push(BuildError::new("request", "set or remove at least one header"));
        }
        errors
    }

    fn path_params(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (side, c) in [("request", &self.request), ("response", &self.response)] {
            for (name, value) in &c.set {
                if let Ok(t) = Template::parse_value(value) {
                    for p in t.path_params() {
                        out.push((format!("{side}.set.{name:?}"), p.to_string()));
                    }
                }
            }
        }
        out
    }

    /// Request headers set from a claim: a client must never be able to send them itself.
    fn trusted_headers(&self) -> Vec<HeaderName> {
        self.request
            .set
            .iter()
            .filter(|(_, v)| {
                Template::parse_value(v).is_ok_and(|t| t.claims().next().is_some())
            })
            .filter_map(|(n, _)| HeaderName::parse_config(n).ok())
            .collect()
    }

    fn build(&self, _env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = self.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Erased::into_dyn(Headers {
            request: ops("request", &self.request)?,
            response: ops("response", &self.response)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PluginType;

    #[test]
    fn config_errors_and_trusted_headers() {
        let c: HeadersConfig = toml::from_str(
            r#"request = { set = { "x-tenant" = "{claim.tenant}", "x-route" = "{route}", "host" = "x", "bad name" = "1", "x-t" = "{nope}" } }"#,
        )
        .unwrap();
        let mut paths: Vec<String> = c.validate().into_iter().map(|e| e.path).collect();
        paths.sort();
        assert_eq!(
            paths,
            [r#"request.set."bad name""#, r#"request.set."host""#, r#"request.set."x-t""#]
        );
        let ok: HeadersConfig = toml::from_str(
            r#"request = { set = { "x-tenant" = "{claim.tenant}", "x-route" = "{route}" } }"#,
        )
        .unwrap();
        assert_eq!(ok.trusted_headers(), [HeaderName::from_static("x-tenant")]);
    }
}
