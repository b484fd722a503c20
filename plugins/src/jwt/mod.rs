//! `jwt`: bearer-token authentication.
//!
//! Phases: `request_filter` (verify; 401 with `WWW-Authenticate` otherwise). Per-request
//! state: none; the verified claims become `RequestCtx::principal`, and `forward_claims`
//! become identity headers for the upstream (and aggregate calls). Those header names are
//! this plugin's trusted headers: the gateway removes them from every incoming request, so a
//! client can never set them, with or without a valid token.
//!
//! Algorithms are pinned to the configured list and to each key's own type (and `alg` when
//! its JWK names one): no RSA/HMAC key confusion, and `none` never parses. `iss`, `aud`,
//! `exp`, `nbf` (with `leeway`) and `required_claims` are checked. Keys come from
//! `jwks_file`, `jwks_url` (cached, refreshed, re-fetched on an unknown `kid` at most once
//! per `jwks_min_refetch`, last good set kept) or an HS `secret`/`secret_env`. Recently
//! verified tokens are remembered by SHA-256 until their `exp` (`cache_size`). Signatures
//! are checked with `ring` (RSA, ECDSA, Ed25519; see `crypto`).
//!
//! ```toml
//! [plugins.jwt]
//! type = "jwt"
//! issuer = "https://id.example.test/"
//! audience = ["sallyport"]
//! algorithms = ["RS256", "ES256"]
//! jwks_url = "https://id.example.test/.well-known/jwks.json"
//! forward_claims = { sub = "x-user-id", tenant = "x-tenant-id", scope = "x-user-scopes" }
//! ```
//! Metrics: rejections in `sallyport_plugin_rejections_total` with reasons `missing`,
//! `malformed`, `algorithm_not_allowed`, `unknown_kid`, `bad_signature`, `expired`,
//! `not_yet_valid`, `bad_issuer`, `bad_audience`, `missing_claim`.

mod cache;
mod config;
pub mod crypto;
pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::header::{AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use pingora::proxy::Session;
use serde_json::{Map, Value};

pub use config::JwtConfig;
use keys::{KeySet, RemoteKeys};

use crate::conf::{parse_error, value, values};

use crate::{
    ApiError, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Principal, Reply, RequestCtx,
    Result,
};

enum Keys {
    Static(KeySet),
    Remote(Arc<RemoteKeys>),
}

/// The built `jwt` plugin.
pub struct Jwt {
    keys: Keys,
    validations: HashMap<Algorithm, Validation>,
    required_claims: Vec<String>,
    forward: Vec<(String, HeaderName)>,
    cookie: Option<String>,
    header: Option<HeaderName>,
    max_token_bytes: usize,
    leeway_secs: u64,
    cache: Option<cache::VerifiedCache>,
    realm: String,
}

/// Why a token was refused: the bounded metric reason and the client-facing description.
struct Refusal {
    reason: &'static str,
    description: &'static str,
}

const fn refusal(reason: &'static str, description: &'static str) -> Refusal {
    Refusal {
        reason,
        description,
    }
}

pub fn validate(c: &JwtConfig) -> Vec<BuildError> {
    let mut errors = Vec::new();
    if c.algorithms.is_empty() {
        errors.push(BuildError::new(
            "algorithms",
            "list the accepted algorithms, e.g. [\"RS256\"]",
        ));
    }
    let mut kinds = Vec::new();
    for (i, a) in c.algorithms.iter().enumerate() {
        match a.value() {
            Ok(alg) => kinds.push(keys::kind_of(*alg)),
            Err(m) => errors.push(BuildError::new(format!("algorithms[{i}]"), m)),
        }
    }
    let sources = [
        c.jwks_file.is_some(),
        c.jwks_url.is_some(),
        c.secret.is_some() || c.secret_env.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if sources != 1 {
        errors.push(BuildError::new(
            "jwks_file",
            "set exactly one key source: jwks_file, jwks_url, or secret/secret_env",
        ));
    }
    if c.secret.is_some() && c.secret_env.is_some() {
        errors.push(BuildError::new(
            "secret_env",
            "set secret or secret_env, not both",
        ));
    }
    let hmac = kinds.contains(&keys::Kind::Hmac);
    let secret = c.secret.is_some() || c.secret_env.is_some();
    if secret && kinds.iter().any(|k| *k != keys::Kind::Hmac) {
        errors.push(BuildError::new(
            "algorithms",
            "a secret verifies HS256/384/512 only",
        ));
    }
    if hmac && !secret && c.jwks_file.is_none() && c.jwks_url.is_none() {
        errors.push(BuildError::new("secret", "HS algorithms need a secret"));
    }
    if let Some(env) = &c.secret_env {
        match std::env::var(env) {
            Ok(v) if v.len() >= 32 => {}
            Ok(_) => errors.push(BuildError::new(
                "secret_env",
                format!("${env} must hold at least 32 bytes"),
            )),
            Err(_) => errors.push(BuildError::new("secret_env", format!("${env} is not set"))),
        }
    }
    if c.secret.as_ref().is_some_and(|s| s.len() < 32) {
        errors.push(BuildError::new("secret", "must be at least 32 bytes"));
    }
    if let Some(file) = &c.jwks_file {
        match std::fs::read_to_string(file) {
            Ok(text) => {
                if let Err(e) = KeySet::from_jwks(&text) {
                    errors.push(BuildError::new("jwks_file", format!("{file}: {e}")));
                }
            }
            Err(e) => errors.push(BuildError::new(
                "jwks_file",
                format!("cannot read {file}: {e}"),
            )),
        }
    }
    if let Some(url) = &c.jwks_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            errors.push(BuildError::new(
                "jwks_url",
                "must be an http:// or https:// URL",
            ));
        }
    }
    for (claim, header) in &c.forward_claims {
        errors.extend(parse_error(format!("forward_claims.{claim}"), header));
    }
    if let Some(h) = &c.header {
        errors.extend(parse_error("header", h));
    }
    // RFC 9110 11.2: the realm is sent as a quoted-string in WWW-Authenticate; keep it to
    // characters that need no escaping there.
    if !c
        .realm
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        errors.push(BuildError::new(
            "realm",
            "must be printable ASCII without \" or \\ (it is sent as a quoted string)",
        ));
    }
    if c.jwks_min_refetch.get().is_zero() || c.jwks_refresh.get().is_zero() {
        errors.push(BuildError::new(
            "jwks_refresh",
            "refresh intervals must be greater than 0",
        ));
    }
    errors
}

/// Header names this plugin sets from credentials.
pub fn trusted_headers(c: &JwtConfig) -> Vec<HeaderName> {
    // Only a validated config is ever built, so every name here parsed.
    c.forward_claims
        .values()
        .filter_map(|h| h.get().cloned())
        .collect()
}

impl Jwt {
    pub fn build(c: &JwtConfig) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Ok(Erased::into_dyn(Self::new(c)?))
    }

    pub fn new(c: &JwtConfig) -> std::result::Result<Jwt, Vec<BuildError>> {
        let errors = validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        crypto::install();
        let fail = |path: &str, m: String| vec![BuildError::new(path, m)];
        let keys = if let Some(file) = &c.jwks_file {
            let text =
                std::fs::read_to_string(file).map_err(|e| fail("jwks_file", e.to_string()))?;
            Keys::Static(KeySet::from_jwks(&text).map_err(|e| fail("jwks_file", e))?)
        } else if let Some(url) = &c.jwks_url {
            Keys::Remote(
                RemoteKeys::new(url, c.jwks_refresh.get(), c.jwks_min_refetch.get())
                    .map_err(|e| fail("jwks_url", e))?,
            )
        } else {
            let secret = match (&c.secret, &c.secret_env) {
                (Some(s), _) => s.clone(),
                (None, Some(env)) => {
                    std::env::var(env).map_err(|e| fail("secret_env", e.to_string()))?
                }
                (None, None) => return Err(fail("secret", "missing".into())),
            };
            Keys::Static(KeySet::secret(secret.as_bytes()))
        };
        let leeway_secs = c.leeway.get().as_secs();
        let mut spec_claims: Vec<&str> = vec!["exp"];
        for claim in &c.required_claims {
            if ["iss", "aud", "sub", "nbf"].contains(&claim.as_str()) {
                spec_claims.push(claim.as_str());
            }
        }
        // A configured issuer or audience must be named by the token: jsonwebtoken checks
        // `iss`/`aud` only when present unless they are required, so a token without `aud`
        // would pass an audience check.
        if c.issuer.is_some() {
            spec_claims.push("iss");
        }
        if !c.audience.is_empty() {
            spec_claims.push("aud");
        }
        let validations = values("algorithms", &c.algorithms)?
            .into_iter()
            .map(|alg| {
                let mut v = Validation::new(alg);
                v.leeway = leeway_secs;
                v.validate_nbf = true;
                v.validate_exp = true;
                match &c.issuer {
                    Some(iss) => v.set_issuer(&[iss]),
                    None => v.iss = None,
                }
                if c.audience.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(&c.audience);
                }
                v.set_required_spec_claims(&spec_claims);
                (alg, v)
            })
            .collect();
        Ok(Jwt {
            keys,
            validations,
            required_claims: c.required_claims.clone(),
            forward: c
                .forward_claims
                .iter()
                .map(|(claim, h)| {
                    Ok((claim.clone(), value(&format!("forward_claims.{claim}"), h)?))
                })
                .collect::<std::result::Result<_, Vec<BuildError>>>()?,
            cookie: c.cookie.clone(),
            header: c.header.as_ref().map(|h| value("header", h)).transpose()?,
            max_token_bytes: c.max_token_bytes,
            leeway_secs,
            cache: (c.cache_size > 0).then(|| cache::VerifiedCache::new(c.cache_size)),
            realm: c.realm.clone(),
        })
    }

    /// The token of a request, if it carries one where this plugin looks.
    fn token<'a>(&self, session: &'a Session) -> Option<&'a str> {
        let headers = &session.req_header().headers;
        if let Some(h) = &self.header {
            return headers
                .get(h)?
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|t| !t.is_empty());
        }
        if let Some(auth) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            let (scheme, token) = auth.trim().split_once(' ')?;
            return (scheme.eq_ignore_ascii_case("bearer"))
                .then_some(token.trim())
                .filter(|t| !t.is_empty());
        }
        let name = self.cookie.as_deref()?;
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then_some(v.trim()).filter(|t| !t.is_empty())
            })
    }

    /// Verifies a token: its claims, or why it is refused.
    pub async fn verify(
        &self,
        token: &str,
    ) -> std::result::Result<Arc<Map<String, Value>>, &'static str> {
        self.verify_inner(token)
            .await
            .map(|v| Arc::clone(&v.principal.claims))
            .map_err(|r| r.reason)
    }

    async fn verify_inner(&self, token: &str) -> std::result::Result<Arc<Verified>, Refusal> {
        if token.len() > self.max_token_bytes {
            return Err(refusal("malformed", "the token is too large"));
        }
        let now = now_secs();
        if let Some(hit) = self
            .cache
            .as_ref()
            .and_then(|c| c.get(token, now, self.leeway_secs))
        {
            return Ok(hit);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refusal("malformed", "the token is malformed"))?;
        let Some(validation) = self.validations.get(&header.alg) else {
            return Err(refusal(
                "algorithm_not_allowed",
                "the token's algorithm is not accepted",
            ));
        };
        let claims = match &self.keys {
            Keys::Static(set) => decode(set, header.kid.as_deref(), header.alg, token, validation)?,
            Keys::Remote(remote) => {
                remote.refresh_if_stale();
                let first = decode(
                    &remote.set.load(),
                    header.kid.as_deref(),
                    header.alg,
                    token,
                    validation,
                );
                match (first, header.kid.as_deref()) {
                    (Err(r), Some(kid)) if r.reason == "unknown_kid" => {
                        remote.refetch_for_unknown_kid(kid).await;
                        decode(&remote.set.load(), Some(kid), header.alg, token, validation)?
                    }
                    (result, _) => result?,
                }
            }
        };
        for name in &self.required_claims {
            if claims.get(name).is_none_or(Value::is_null) {
                return Err(refusal("missing_claim", "the token lacks a required claim"));
            }
        }
        let exp = claims.get("exp").and_then(Value::as_u64);
        let verified = Arc::new(self.verified(claims));
        if let (Some(cache), Some(exp)) = (&self.cache, exp) {
            cache.insert(token, exp, &verified);
        }
        Ok(verified)
    }

    /// What a request needs from verified claims, computed once per token (a cache hit reuses
    /// it): the principal and the identity headers to forward.
    fn verified(&self, claims: Map<String, Value>) -> Verified {
        let principal = Principal {
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .map(str::to_string),
            claims: Arc::new(claims),
            verified_by: "jwt",
        };
        let forwarded = self
            .forward
            .iter()
            .filter_map(|(claim, header)| {
                let value = principal.claim_str(claim)?;
                Some((header.clone(), HeaderValue::from_str(&value).ok()?))
            })
            .collect();
        Verified {
            principal,
            forwarded,
        }
    }

    fn unauthorized(&self, r: Refusal) -> ApiError {
        let challenge = if r.reason == "missing" {
            format!("Bearer realm=\"{}\"", self.realm)
        } else {
            format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{}\"",
                self.realm, r.description
            )
        };
        ApiError::new(
            401,
            if r.reason == "missing" {
                "missing_token"
            } else {
                "invalid_token"
            },
            r.description,
        )
        .with_reason(r.reason)
        .with_header(WWW_AUTHENTICATE, challenge)
    }
}

/// Verifies a token's signature with a key of `set` and its claims by `validation`: the
/// claims, or the reason it is refused (`unknown_kid`, `expired`, `bad_signature`, ...).
/// The `session` plugin verifies ID and logout tokens with it.
pub(crate) fn decode_claims(
    set: &KeySet,
    kid: Option<&str>,
    alg: Algorithm,
    token: &str,
    validation: &Validation,
) -> std::result::Result<Map<String, Value>, &'static str> {
    decode(set, kid, alg, token, validation).map_err(|r| r.reason)
}

fn decode(
    set: &KeySet,
    kid: Option<&str>,
    alg: Algorithm,
    token: &str,
    validation: &Validation,
) -> std::result::Result<Map<String, Value>, Refusal> {
    let key = set.find(kid, alg).ok_or(match kid {
        Some(_) => refusal("unknown_kid", "the token's signing key is unknown"),
        None => refusal("unknown_kid", "no key can verify this token"),
    })?;
    jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => refusal("expired", "the token has expired"),
            ErrorKind::ImmatureSignature => refusal("not_yet_valid", "the token is not valid yet"),
            ErrorKind::InvalidIssuer => refusal("bad_issuer", "the token's issuer is not accepted"),
            ErrorKind::InvalidAudience => {
                refusal("bad_audience", "the token's audience is not accepted")
            }
            ErrorKind::InvalidSignature => {
                refusal("bad_signature", "the token's signature is invalid")
            }
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => refusal(
                "algorithm_not_allowed",
                "the token's algorithm does not match its key",
            ),
            ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
                refusal("bad_audience", "the token names no audience")
            }
            ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => {
                refusal("bad_issuer", "the token names no issuer")
            }
            ErrorKind::MissingRequiredClaim(_) => {
                refusal("missing_claim", "the token lacks a required claim")
            }
            _ => refusal("malformed", "the token is malformed"),
        })
}

/// A verified token: its principal and the identity headers it forwards.
pub(crate) struct Verified {
    principal: Principal,
    forwarded: Vec<(HeaderName, HeaderValue)>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait]
impl Plugin for Jwt {
    type State = ();

    /// Fetches the JWKS of a `jwks_url` once before the plugin takes requests.
    async fn start(&self) {
        if let Keys::Remote(remote) = &self.keys {
            remote.first_fetch().await;
        }
    }

    /// The hooks this plugin runs in; the gateway skips the others without a call.
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
        let Some(token) = self.token(session) else {
            return Ok(Flow::Respond(Reply::Error(
                self.unauthorized(refusal("missing", "a bearer token is required")),
            )));
        };
        let verified = match self.verify_inner(token).await {
            Ok(v) => v,
            Err(r) => return Ok(Flow::Respond(Reply::Error(self.unauthorized(r)))),
        };
        // This token's values replace any an earlier authentication plugin of the chain set
        // under the same names; a configured header whose claim the token lacks is not sent.
        for (_, header) in &self.forward {
            ctx.identity_headers.retain(|(h, _)| h != header);
        }
        ctx.identity_headers
            .extend(verified.forwarded.iter().cloned());
        let principal = verified.principal.clone();
        ctx.principal = Some(principal);
        Ok(Flow::Continue)
    }
}

impl crate::PluginType for JwtConfig {
    const KIND: &'static str = "jwt";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn trusted_headers(&self) -> Vec<HeaderName> {
        trusted_headers(self)
    }

    /// Keys fetched from `jwks_url` survive a reload that leaves this config unchanged: a
    /// rebuilt plugin would start without keys and refuse every token while the IdP is down.
    /// Keys from a file or a secret are re-read on every load.
    fn keeps_state_across_reloads(&self) -> bool {
        self.jwks_url.is_some()
    }

    fn build(
        &self,
        _env: &crate::BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Jwt::build(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs256(max_token_bytes: usize) -> Jwt {
        let config: JwtConfig = toml::from_str(&format!(
            "algorithms = [\"HS256\"]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
             max_token_bytes = {max_token_bytes}\n"
        ))
        .unwrap();
        Jwt::new(&config).map_err(|e| format!("{e:?}")).unwrap()
    }

    #[test]
    fn a_realm_that_would_break_the_challenge_is_refused() {
        let with_realm = |realm: &str| {
            let config: JwtConfig = toml::from_str(&format!(
                "algorithms = [\"HS256\"]\nsecret = \"0123456789abcdef0123456789abcdef\"\nrealm = {realm:?}\n"
            ))
            .unwrap();
            validate(&config).into_iter().map(|e| e.path).collect::<Vec<_>>()
        };
        assert!(with_realm("api.example.com").is_empty());
        for bad in ["a\"b", "a\\b", "tab\there", "caf\u{e9}"] {
            assert_eq!(with_realm(bad), ["realm"], "{bad:?}");
        }
    }

    /// A 1 MiB token of garbage is refused, whether over the size limit or under it (then it
    /// goes through the decoder; the jwt_verify fuzz target covers the shapes in between).
    #[tokio::test]
    async fn a_one_mib_token_is_refused_without_a_panic() {
        let token = format!("{}.{}.{}", "e".repeat(512 << 10), "f".repeat(512 << 10), "g");
        assert_eq!(hs256(8192).verify(&token).await.err(), Some("malformed"));
        assert!(hs256(2 << 20).verify(&token).await.is_err());
    }
}
