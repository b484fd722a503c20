use std::collections::BTreeMap;

use serde::Deserialize;

use http::{HeaderName, Method};

use crate::template::Template;
use crate::conf::{ByteSize, HumanDuration, Parsed};

/// `[plugins.NAME]` with `type = "aggregate"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Overall deadline: calls still running then are cancelled.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Largest response body accepted from one call; larger ones are `bad_response`.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Client request headers passed on to every call (e.g. `accept-language`). Identity
    /// headers never are: calls get those from verified credentials only.
    #[serde(default)]
    pub forward_headers: Vec<Parsed<HeaderName>>,
    /// The calls, run in parallel; the response lists them in this order.
    pub calls: Vec<CallConfig>,
    /// `Cache-Control` of a complete answer (one with `warnings`, a degraded one, is always
    /// `no-store`). E.g. `"max-age=30"` lets a `cache` plugin listed before this one on the
    /// route keep it (per caller when the request carries credentials).
    #[serde(default = "default_cache_control")]
    pub cache_control: String,
}

fn default_cache_control() -> String {
    "no-store".into()
}

/// One call of an aggregate endpoint.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    /// Key of this call's data in the response.
    pub name: String,
    /// The `[upstreams.NAME]` pool to call.
    pub upstream: String,
    /// Path and query template: `{claim.NAME}`, `{path.NAME}`, `{query.NAME}` and
    /// `{header.NAME}` are replaced by percent-encoded values.
    pub path: Parsed<Template>,
    #[serde(default = "default_method")]
    pub method: Parsed<Method>,
    /// A failed required call fails the request (502, or 504 on timeout); a failed optional
    /// one yields `null` and a warning.
    #[serde(default)]
    pub required: bool,
    /// This call's deadline (at most the overall `timeout`).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Dotted path of the part of the response to keep, e.g. `"data.items"`.
    #[serde(default)]
    pub extract: Option<String>,
    /// Keep only the first N elements of an array.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Keep only these fields of an object, or of each object in an array.
    #[serde(default)]
    pub select: Vec<String>,
    /// Rename fields (`{ total = "amount" }`) of an object or of each object in an array.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_method() -> Parsed<Method> {
    Parsed::new("GET")
}
