//! `strip_headers`: remove headers from requests before they go upstream and from responses
//! before they reach the client.
//!
//! Phases: `request_filter` (strips the request list from the incoming request, so later
//! plugins and the upstream never see them) and `response_filter` (strips the response list;
//! runs on every response, errors and plugin answers included). Per-request state: none.
//!
//! Names are case-insensitive; a trailing `*` matches every header with that prefix.
//! ```toml
//! [plugins.strip-identity]
//! type = "strip_headers"
//! request = ["x-user-id", "x-tenant-id", "x-user-scopes", "x-internal-*"]
//! response = ["server", "x-powered-by", "x-internal-*"]
//! ```
//! Metrics: none of its own.

mod config;

use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderMap;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

pub use config::StripHeadersConfig;

use crate::conf::{values, ConfigStr, Parsed};
use crate::{BuildError, DynPlugin, Erased, Flow, HeaderName, Hooks, Plugin, RequestCtx, Result};

/// A set of header names and `prefix*` patterns, matched case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSet {
    exact: Vec<HeaderName>,
    prefixes: Vec<String>,
}

/// One entry of a header list: a name, or a `prefix*` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    Exact(HeaderName),
    /// Lower-cased, without the `*`.
    Prefix(String),
}

impl ConfigStr for HeaderPattern {
    fn parse_config(raw: &str) -> std::result::Result<Self, String> {
        let lower = raw.trim().to_ascii_lowercase();
        let (name, wildcard) = match lower.strip_suffix('*') {
            Some(prefix) => (prefix.to_string(), true),
            None => (lower, false),
        };
        let valid_chars = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'+-.^_`|~".contains(&b));
        if !valid_chars {
            return Err(format!(
                "{raw:?} is not a header name (a trailing * is allowed)"
            ));
        }
        if wildcard {
            Ok(HeaderPattern::Prefix(name))
        } else {
            HeaderName::from_bytes(name.as_bytes())
                .map(HeaderPattern::Exact)
                .map_err(|_| format!("{raw:?} is not a header name"))
        }
    }
}

impl HeaderSet {
    /// The set of a config list; `key` names the list in errors.
    pub fn parse(
        key: &str,
        patterns: &[Parsed<HeaderPattern>],
    ) -> std::result::Result<Self, Vec<BuildError>> {
        let mut set = HeaderSet::default();
        for p in values(key, patterns)? {
            match p {
                HeaderPattern::Exact(h) => set.exact.push(h),
                HeaderPattern::Prefix(prefix) => set.prefixes.push(prefix),
            }
        }
        Ok(set)
    }

    pub fn from_names(names: impl IntoIterator<Item = HeaderName>) -> Self {
        HeaderSet {
            exact: names.into_iter().collect(),
            prefixes: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    pub fn matches(&self, name: &HeaderName) -> bool {
        self.exact.contains(name)
            || self
                .prefixes
                .iter()
                .any(|p| name.as_str().starts_with(p.as_str()))
    }

    /// The names present in `headers` that this set matches.
    pub fn present_in(&self, headers: &HeaderMap) -> Vec<HeaderName> {
        if self.prefixes.is_empty() {
            return self
                .exact
                .iter()
                .filter(|h| headers.contains_key(*h))
                .cloned()
                .collect();
        }
        // With a prefix every name is looked at anyway: one pass finds the exact names too
        // (`keys` yields each name once).
        headers
            .keys()
            .filter(|name| self.matches(name))
            .cloned()
            .collect()
    }
}

/// The built `strip_headers` plugin.
#[derive(Debug)]
pub struct StripHeaders {
    request: HeaderSet,
    response: HeaderSet,
}

impl StripHeaders {
    pub fn build(
        config: &StripHeadersConfig,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let request = HeaderSet::parse("request", &config.request);
        let response = HeaderSet::parse("response", &config.response);
        let (request, response) = match (request, response) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => {
                let mut errors = a.err().unwrap_or_default();
                errors.extend(b.err().unwrap_or_default());
                return Err(errors);
            }
        };
        Ok(Erased::into_dyn(StripHeaders { request, response }))
    }
}

#[async_trait]
impl Plugin for StripHeaders {
    type State = ();

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: !self.request.is_empty(),
            response_filter: !self.response.is_empty(),
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        let req = session.req_header_mut();
        for name in self.request.present_in(&req.headers) {
            req.remove_header(&name);
        }
        Ok(Flow::Continue)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        for name in self.response.present_in(&response.headers) {
            response.remove_header(&name);
        }
        Ok(())
    }
}

impl crate::PluginType for StripHeadersConfig {
    const KIND: &'static str = "strip_headers";

    fn validate(&self) -> Vec<BuildError> {
        StripHeaders::build(self).err().unwrap_or_default()
    }

    fn build(
        &self,
        _env: &crate::BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        StripHeaders::build(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(p: &[&str]) -> HeaderSet {
        HeaderSet::parse("x", &p.iter().map(|s| Parsed::new(*s)).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn exact_and_wildcard_case_insensitive() {
        let s = set(&["X-User-Id", "x-internal-*"]);
        let mut h = HeaderMap::new();
        h.insert("x-user-id", "1".parse().unwrap());
        h.insert("X-Internal-Token", "t".parse().unwrap());
        h.insert("x-internal", "keep".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        let mut found: Vec<String> = s.present_in(&h).iter().map(|n| n.to_string()).collect();
        found.sort();
        assert_eq!(found, ["x-internal-token", "x-user-id"]);
    }

    #[test]
    fn rejects_bad_names_with_paths() {
        let err = HeaderSet::parse(
            "request",
            &["ok", "bad name", "*", "a*b"].map(Parsed::new),
        )
        .unwrap_err();
        let paths: Vec<_> = err.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["request[1]", "request[2]", "request[3]"]);
    }

    proptest! {
        #[test]
        fn wildcard_matches_exactly_the_prefix(suffix in "[a-z0-9-]{0,12}") {
            let s = set(&["x-internal-*"]);
            let name = HeaderName::from_bytes(format!("x-internal-{suffix}").as_bytes()).unwrap();
            prop_assert!(s.matches(&name));
            let other = HeaderName::from_bytes(format!("x-external-{suffix}").as_bytes()).unwrap();
            prop_assert!(!s.matches(&other));
        }
    }
}
