use std::collections::BTreeMap;

use serde::Deserialize;

use http::HeaderName;
use jsonwebtoken::Algorithm;

use crate::conf::{HumanDuration, Parsed};

/// `[plugins.NAME]` with `type = "jwt"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`. Unset: any issuer (not recommended).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values: the token must name one of them. Empty: `aud` not checked.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Accepted algorithms (RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512).
    /// Required: tokens signed otherwise are rejected, `none` always is.
    pub algorithms: Vec<Parsed<Algorithm>>,
    /// A JWKS file.
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// A JWKS URL: fetched at start, refreshed every `jwks_refresh`, re-fetched on an unknown
    /// `kid` at most once per `jwks_min_refetch`; the last good set is kept when it fails.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "default_refresh")]
    pub jwks_refresh: HumanDuration,
    #[serde(default = "default_min_refetch")]
    pub jwks_min_refetch: HumanDuration,
    /// Shared secret for HS256/384/512, inline (prefer `secret_env`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of the environment variable holding the HS secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    /// Claims every token must carry (besides `exp`).
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Verified claims sent upstream as headers: `{ sub = "x-user-id" }`. Always overwritten,
    /// removed when the claim is absent; clients can never send these headers themselves.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, Parsed<HeaderName>>,
    /// Also read the token from this cookie when there is no `Authorization: Bearer`.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Read the token from this header instead of `Authorization` (value is the bare token).
    #[serde(default)]
    pub header: Option<Parsed<HeaderName>>,
    /// Tokens longer than this are rejected without parsing.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    /// Recently verified tokens remembered (by SHA-256, until their `exp`); 0 disables.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// `realm` of `WWW-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
}

fn default_refresh() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_min_refetch() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_leeway() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_token() -> usize {
    8192
}
fn default_cache_size() -> usize {
    10_000
}
fn default_realm() -> String {
    "sallyport".into()
}
