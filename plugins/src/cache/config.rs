//! `[plugins.NAME]` with `type = "cache"`.

use http::HeaderName;
use serde::Deserialize;

use crate::conf::{parse_errors, ByteSize, HumanDuration, Parsed};
use crate::BuildError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory budget of this plugin's entries (bodies and metadata).
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// Larger responses are sent to the client and not stored.
    #[serde(default = "default_max_object_size")]
    pub max_object_size: ByteSize,
    /// RFC 9111 4.2.2 heuristic freshness: 10% of the time since `Last-Modified`.
    #[serde(default = "default_true")]
    pub heuristic: bool,
    /// Freshness of a storable response without explicit freshness when the heuristic does not
    /// apply (0: not stored).
    #[serde(default = "zero")]
    pub default_ttl: HumanDuration,
    /// Cap on any freshness lifetime.
    #[serde(default = "default_max_ttl")]
    pub max_ttl: HumanDuration,
    /// Default stale-while-revalidate window (a response's own directive wins).
    #[serde(default = "zero")]
    pub stale_while_revalidate: HumanDuration,
    /// Default stale-if-error window (a response's own directive wins).
    #[serde(default = "zero")]
    pub stale_if_error: HumanDuration,
    /// How long concurrent misses for one key wait for the one that went upstream (0: no
    /// coalescing).
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: HumanDuration,
    /// Request headers that are part of the key, beyond what a response's `Vary` names.
    #[serde(default)]
    pub key_headers: Vec<Parsed<HeaderName>>,
    /// `true`: a credentialed request shares entries only when the response explicitly allows
    /// it (RFC 9111 3.5) and nothing else of it is stored. `false`: such responses are also
    /// stored, keyed by the caller's identity.
    #[serde(default)]
    pub shared_when_authenticated: bool,
    /// Whether the admin API's `POST /cache/purge` may remove this plugin's entries.
    #[serde(default = "default_true")]
    pub purge: bool,
}

fn default_max_size() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_object_size() -> ByteSize {
    ByteSize(2 << 20)
}
fn default_true() -> bool {
    true
}
fn zero() -> HumanDuration {
    HumanDuration::from_secs(0)
}
fn default_max_ttl() -> HumanDuration {
    HumanDuration::from_secs(86_400)
}
fn default_lock_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}

pub fn validate(c: &CacheConfig) -> Vec<BuildError> {
    let mut errors = parse_errors("key_headers", &c.key_headers);
    if c.max_size.get() == 0 {
        errors.push(BuildError::new("max_size", "must be greater than 0"));
    }
    if usize::try_from(c.max_size.get()).is_err() {
        errors.push(BuildError::new("max_size", "is too large for this machine"));
    }
    if c.max_object_size.get() == 0 {
        errors.push(BuildError::new("max_object_size", "must be greater than 0"));
    }
    if c.max_object_size.get() > c.max_size.get() {
        errors.push(BuildError::new(
            "max_object_size",
            format!(
                "{} is larger than max_size ({}): no such response could ever be stored",
                c.max_object_size.get(),
                c.max_size.get()
            ),
        ));
    }
    if c.max_ttl.get().is_zero() {
        errors.push(BuildError::new(
            "max_ttl",
            "must be greater than 0 (to store nothing, do not list the plugin)",
        ));
    }
    if c.default_ttl.get() > c.max_ttl.get() {
        errors.push(BuildError::new("default_ttl", "is larger than max_ttl"));
    }
    for (i, h) in c.key_headers.iter().enumerate() {
        if h.get().is_some_and(|h| c.key_headers[..i].iter().any(|o| o.get() == Some(h))) {
            errors.push(BuildError::new(format!("key_headers[{i}]"), "is listed twice"));
        }
    }
    errors
}
