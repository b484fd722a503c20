//! `traffic_split`: canary and version routing at the edge. Rules are tried in order; the first
//! that matches sends the request to its `upstream` pool instead of the route's:
//! - `when = { header = "x-api-version", equals = "2" }` (also `cookie = NAME`, `query = NAME`):
//!   an exact value;
//! - `weight = 5`: that percent of requests; with `sticky = "claim:sub"` (any request key:
//!   `ip`, `header:NAME`, `claim:NAME`, `api_key`) that percent of *keys*, always the same
//!   ones: the key's SHA-256 (with the plugin's name) picks one of 10,000 buckets, so the
//!   choice is the same on every gateway of a fleet and across reloads. Weight rules take
//!   consecutive bucket ranges, so two 5 % rules on one key never overlap. A request without
//!   the sticky key is not part of the split; without `sticky`, each request draws at random.
//!
//! No rule matched: the route's own upstream. The chosen pool is in the access log
//! (`upstream`) and in `sallyport_traffic_split_total{route,plugin,upstream}`. List the plugin
//! after the authentication plugins when a rule reads a claim.
//!
//! ```toml
//! [plugins.orders-canary]
//! type = "traffic_split"
//! rules = [
//!   { when = { header = "x-api-version", equals = "2" }, upstream = "orders-v2" },
//!   { weight = 5, upstream = "orders-v2", sticky = "claim:sub" },
//! ]
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderName;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use prometheus::IntCounterVec;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::conf::{parse_error, Parsed};
use crate::key::RequestKey;
use crate::{BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, RequestCtx, Result};

/// Buckets a sticky key falls into: weights have a resolution of 0.01 %.
pub const BUCKETS: u64 = 10_000;

/// `[plugins.NAME]` with `type = "traffic_split"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplitConfig {
    pub rules: Vec<RuleConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default)]
    pub when: Option<WhenConfig>,
    /// Percent of requests (or of sticky keys), 0.01 to 100.
    #[serde(default)]
    pub weight: Option<f64>,
    pub upstream: String,
    #[serde(default)]
    pub sticky: Option<Parsed<RequestKey>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WhenConfig {
    #[serde(default)]
    pub header: Option<Parsed<HeaderName>>,
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(default)]
    pub query: Option<String>,
    pub equals: String,
}

#[derive(Debug, Clone)]
enum Match {
    Header(HeaderName, String),
    Cookie(String, String),
    Query(String, String),
    /// `[from, to)` of the buckets, and the sticky key.
    Weight(u64, u64, Option<RequestKey>),
}

#[derive(Debug, Clone)]
struct Rule {
    matcher: Match,
    upstream: Arc<str>,
}

pub fn validate(c: &TrafficSplitConfig) -> Vec<BuildError> {
    let mut errors = Vec::new();
    if c.rules.is_empty() {
        errors.push(BuildError::new("rules", "list at least one rule"));
    }
    let mut total = 0.0;
    for (i, r) in c.rules.iter().enumerate() {
        let at = |key: &str| format!("rules[{i}].{key}");
        match (&r.when, r.weight) {
            (Some(_), Some(_)) | (None, None) => errors.push(BuildError::new(
                format!("rules[{i}]"),
                "give either `when` or `weight`",
            )),
            (Some(w), None) => {
                let sources = [w.header.is_some(), w.cookie.is_some(), w.query.is_some()];
                if sources.iter().filter(|s| **s).count() != 1 {
                    errors.push(BuildError::new(
                        at("when"),
                        "give exactly one of header, cookie and query",
                    ));
                }
                if let Some(h) = &w.header {
                    errors.extend(parse_error(at("when.header"), h));
                }
                if r.sticky.is_some() {
                    errors.push(BuildError::new(at("sticky"), "applies to weight rules only"));
                }
            }
            (None, Some(w)) => {
                if !(0.01..=100.0).contains(&w) {
                    errors.push(BuildError::new(at("weight"), "must be a percent from 0.01 to 100"));
                }
                total += w;
            }
        }
        if let Some(s) = &r.sticky {
            errors.extend(parse_error(at("sticky"), s));
            if s.get() == Some(&RequestKey::Route) {
                errors.push(BuildError::new(
                    at("sticky"),
                    "\"route\" is the same for every request of the route: all or none would go",
                ));
            }
        }
        if r.upstream.is_empty() {
            errors.push(BuildError::new(at("upstream"), "must name an [upstreams.NAME] pool"));
        }
    }
    if total > 100.0 + 1e-9 {
        errors.push(BuildError::new("rules", format!("the weights add up to {total}%, over 100%")));
    }
    errors
}

/// The bucket of a sticky key, the same on every gateway and across reloads.
pub fn bucket(plugin: &str, key: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(plugin.as_bytes())
        .chain_update([0u8])
        .chain_update(key.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265 5.4 syntax).
pub fn cookie<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    crate::session::cookies::cookie_pairs(&req.headers)
        .find_map(|(k, v)| (k == name).then(|| v.trim_matches('"')))
}

fn query<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// The built `traffic_split` plugin.
pub struct TrafficSplit {
    name: Arc<str>,
    rules: Vec<Rule>,
    chosen: IntCounterVec,
}

impl TrafficSplit {
    fn choose(&self, req: &RequestHeader, ctx: &RequestCtx) -> Option<&Arc<str>> {
        // One draw per request for every weight rule without `sticky`, so their consecutive
        // ranges split the requests as written (two 50% rules take half each).
        let mut draw = None;
        self.rules.iter().find_map(|rule| {
            let hit = match &rule.matcher {
                Match::Header(h, want) => req.headers.get(h).is_some_and(|v| v.as_bytes() == want.as_bytes()),
                Match::Cookie(c, want) => cookie(req, c) == Some(want.as_str()),
                Match::Query(q, want) => query(req, q) == Some(want.as_str()),
                Match::Weight(from, to, sticky) => {
                    let b = match sticky {
                        // No key to stick to (an anonymous request): not part of the split.
                        Some(key) => key.value(req, ctx).map(|k| bucket(&self.name, &k)),
                        None => Some(*draw.get_or_insert_with(|| rand::random::<u64>() % BUCKETS)),
                    };
                    b.is_some_and(|b| (*from..*to).contains(&b))
                }
            };
            hit.then_some(&rule.upstream)
        })
    }
}

#[async_trait]
impl Plugin for TrafficSplit {
    type State = ();

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
        if let Some(upstream) = self.choose(session.req_header(), ctx) {
            self.chosen
                .with_label_values(&[&*ctx.route, &*self.name, upstream])
                .inc();
            ctx.upstream = Some(Arc::clone(upstream));
        }
        Ok(Flow::Continue)
    }
}

impl crate::PluginType for TrafficSplitConfig {
    const KIND: &'static str = "traffic_split";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn upstream_refs(&self) -> Vec<(String, String)> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("rules[{i}].upstream"), r.upstream.clone()))
            .collect()
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = validate(self);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut next = 0u64;
        let mut rules = Vec::new();
        for r in &self.rules {
            let matcher = match (&r.when, r.weight) {
                (Some(w), _) => {
                    let want = w.equals.clone();
                    match (w.header.as_ref().and_then(Parsed::get), &w.cookie, &w.query) {
                        (Some(h), _, _) => Match::Header(h.clone(), want),
                        (None, Some(c), _) => Match::Cookie(c.clone(), want),
                        (None, None, Some(q)) => Match::Query(q.clone(), want),
                        _ => continue,
                    }
                }
                (None, Some(weight)) => {
                    let width = (weight * (BUCKETS as f64) / 100.0).round() as u64;
                    let from = next;
                    next = (next + width).min(BUCKETS);
                    Match::Weight(from, next, r.sticky.as_ref().and_then(Parsed::get).cloned())
                }
                (None, None) => continue,
            };
            rules.push(Rule {
                matcher,
                upstream: Arc::from(r.upstream.as_str()),
            });
        }
        Ok(Erased::into_dyn(TrafficSplit {
            name: Arc::clone(&env.name),
            rules,
            chosen: env.metrics.traffic_split.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_even() {
        assert_eq!(bucket("canary", "alice"), bucket("canary", "alice"));
        assert_ne!(bucket("canary", "alice"), bucket("other", "alice"));
        // 5% of 10,000 distinct keys land in the first 500 buckets, within 1%.
        let n = (0..10_000)
            .filter(|i| bucket("canary", &format!("user-{i}")) < 500)
            .count();
        assert!((400..=600).contains(&n), "{n}");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("cookie", "a=1; sp_canary=1").unwrap();
        req.append_header("cookie", "b=\"q\"").unwrap();
        assert_eq!(cookie(&req, "sp_canary"), Some("1"));
        assert_eq!(cookie(&req, "b"), Some("q"));
        assert_eq!(cookie(&req, "canary"), None);
    }

    #[test]
    fn config_errors() {
        let c: TrafficSplitConfig = toml::from_str(
            r#"rules = [
              { when = { header = "x", cookie = "y", equals = "1" }, upstream = "a" },
              { weight = 60, upstream = "b" },
              { weight = 50, upstream = "c", sticky = "nonsense" },
              { upstream = "d" },
            ]"#,
        )
        .unwrap();
        let paths: Vec<String> = validate(&c).into_iter().map(|e| e.path).collect();
        assert_eq!(paths, ["rules[0].when", "rules[2].sticky", "rules[3]", "rules"]);
    }
}
