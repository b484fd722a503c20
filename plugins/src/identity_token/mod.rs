//! `identity_token`: the service gets a token meant for it, not the client's token or bare
//! trusted headers. Runs after the authenticating plugin of the route (`jwt`, `key_auth`);
//! without a verified principal it does nothing.
//!
//! - `mode = "sign"`: the gateway mints a short-lived JWT for the verified principal: `iss`,
//!   `aud` (default: the upstream pool the request goes to), `sub`, `iat`, `exp` (`iat` +
//!   `ttl`), `jti`, the listed `claims`, and `client_id` when the principal has one. Signed
//!   with the first `key_file` (EdDSA, ES256 or RS256); the public keys of every file are
//!   published as a JWKS at the admin listener's `GET /.well-known/jwks.json` (and by the `jwks`
//!   plugin on a public route). A token per (principal, audience) is reused until 20% of its
//!   lifetime is left.
//! - `mode = "exchange"`: RFC 8693 token exchange of the client's bearer token at the IdP's
//!   `token_endpoint` (client authentication: HTTP Basic), for `requested_audience` and
//!   `scopes`. The answer is reused until it expires; concurrent requests with the same token
//!   wait for one exchange. A refusal or an unreachable IdP: 502 `token_exchange_failed`.
//!
//! The token goes in `header` (`authorization`: `Bearer <token>`). Unless `forward_original`,
//! the client's own `Authorization` never reaches the service. A header other than
//! `authorization` is a trusted header: removed from every client request.
//! Metrics: `sallyport_identity_tokens_total{plugin,result}` (minted, cached, exchanged, failed).

pub mod config;
pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::header::AUTHORIZATION;
use http::HeaderName;
use jsonwebtoken::Header;
use parking_lot::Mutex;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use prometheus::IntCounterVec;
use sha2::{Digest, Sha256};

pub use config::IdentityTokenConfig;
use config::Mode;
use keys::SigningKey;

use crate::keys::KeyRegistry;
use crate::{
    ApiError, BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Principal, Reply,
    RequestCtx, Result,
};

/// Entries a token cache keeps at most (expired ones are dropped first when it is full).
const CACHE_ENTRIES: usize = 10_000;
/// How long the IdP may take to answer an exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The per-request state: the token for the upstream request, once decided.
#[derive(Default)]
pub struct TokenState {
    token: Option<String>,
}

/// A minted or exchanged token and when it stops being reused.
#[derive(Clone)]
struct Cached {
    token: String,
    reuse_until: SystemTime,
}

struct Signer {
    issuer: String,
    audience: Option<String>,
    key: SigningKey,
    ttl: Duration,
    claims: Vec<String>,
    cache: Mutex<HashMap<String, Cached>>,
}

type Inflight = Arc<tokio::sync::OnceCell<Option<Cached>>>;

struct Exchanger {
    endpoint: String,
    client_id: String,
    secret: String,
    audience: Option<String>,
    scopes: String,
    client: reqwest::Client,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    inflight: Mutex<HashMap<[u8; 32], Inflight>>,
}

enum Issue {
    Sign(Signer),
    Exchange(Exchanger),
}

/// The built `identity_token` plugin.
pub struct IdentityToken {
    name: Arc<str>,
    issue: Issue,
    header: HeaderName,
    forward_original: bool,
    /// Public keys of every key file (sign mode), published while the plugin runs.
    jwks: Vec<serde_json::Value>,
    registry: Arc<KeyRegistry>,
    owner: u64,
    results: IntCounterVec,
}

fn insert_bounded<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Cached>, key: K, value: Cached, now: SystemTime) {
    if map.len() >= CACHE_ENTRIES {
        map.retain(|_, c| c.reuse_until > now);
        if map.len() >= CACHE_ENTRIES {
            map.clear();
        }
    }
    map.insert(key, value);
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Signer {
    /// The token for `principal` and `audience` at `now`: a cached one with more than 20% of
    /// its lifetime left, or a new one. `Ok((token, minted))`.
    fn token(&self, principal: &Principal, audience: &str, now: SystemTime) -> Result<(String, bool)> {
        let copied: Vec<(&String, serde_json::Value)> = self
            .claims
            .iter()
            .filter(|c| c.as_str() != "sub")
            .filter_map(|c| principal.claims.get(c).map(|v| (c, v.clone())))
            .collect();
        let subject = principal.subject.clone().unwrap_or_default();
        let client_id = principal
            .claims
            .get("client_id")
            .or(principal.claims.get("azp"))
            .cloned();
        let cache_key = format!(
            "{audience}\0{}\0{}\0{subject}\0{}\0{}",
            principal.verified_by,
            principal.claim_str("iss").unwrap_or_default(),
            serde_json::to_string(&copied).unwrap_or_default(),
            client_id.as_ref().map(|c| c.to_string()).unwrap_or_default()
        );
        if let Some(c) = self.cache.lock().get(&cache_key) {
            if c.reuse_until > now {
                return Ok((c.token.clone(), false));
            }
        }
        let mut claims = serde_json::Map::new();
        claims.insert("iss".into(), self.issuer.clone().into());
        claims.insert("aud".into(), audience.into());
        if self.claims.iter().any(|c| c == "sub") && !subject.is_empty() {
            claims.insert("sub".into(), subject.into());
        }
        let iat = unix(now);
        claims.insert("iat".into(), iat.into());
        claims.insert("exp".into(), (iat + self.ttl.as_secs()).into());
        let mut jti = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut jti);
        claims.insert("jti".into(), crate::context::hex(&jti).into());
        for (name, value) in copied {
            claims.insert(name.clone(), value);
        }
        if !claims.contains_key("client_id") {
            if let Some(id) = client_id {
                claims.insert("client_id".into(), id);
            }
        }
        let mut header = Header::new(self.key.algorithm);
        header.kid = Some(self.key.kid.clone());
        header.typ = Some("JWT".into());
        let token = jsonwebtoken::encode(&header, &claims, &self.key.encoding)
            .map_err(|e| pingora::Error::because(pingora::ErrorType::InternalError, "signing an identity token", e))?;
        // Reused until 20% of its lifetime is left.
        let reuse_until = now + self.ttl.mul_f64(0.8);
        insert_bounded(
            &mut self.cache.lock(),
            cache_key,
            Cached {
                token: token.clone(),
                reuse_until,
            },
            now,
        );
        Ok((token, true))
    }
}

impl Exchanger {
    /// The exchanged token for the client's `subject` token: `Some((token, exchanged))`, or
    /// `None` when the IdP refused or could not be reached.
    async fn token(&self, subject: &str) -> Option<(String, bool)> {
        let key: [u8; 32] = Sha256::digest(subject.as_bytes()).into();
        let now = SystemTime::now();
        if let Some(c) = self.cache.lock().get(&key) {
            if c.reuse_until > now {
                return Some((c.token.clone(), false));
            }
        }
        // Concurrent requests with one token share one exchange.
        let (cell, leader) = {
            let mut inflight = self.inflight.lock();
            match inflight.get(&key) {
                Some(cell) => (Arc::clone(cell), false),
                None => {
                    let cell: Inflight = Arc::default();
                    inflight.insert(key, Arc::clone(&cell));
                    (cell, true)
                }
            }
        };
        // If the request running the exchange goes away, another waiter runs it; if none is
        // waiting, the guard takes the unfinished entry out.
        let _guard = InflightGuard {
            inflight: &self.inflight,
            key,
            cell: Arc::clone(&cell),
        };
        let answer = cell.get_or_init(|| self.exchange(subject)).await.clone();
        // Whoever finishes first retires the shared entry (and caches the answer), so an
        // abandoned exchange never leaves it behind.
        {
            let mut inflight = self.inflight.lock();
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
                if let Some(c) = &answer {
                    insert_bounded(&mut self.cache.lock(), key, c.clone(), now);
                }
            }
        }
        answer.map(|c| (c.token, leader))
    }

    async fn exchange(&self, subject: &str) -> Option<Cached> {
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", subject),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ];
        if let Some(a) = &self.audience {
            form.push(("audience", a));
        }
        if !self.scopes.is_empty() {
            form.push(("scope", &self.scopes));
        }
        let sent = SystemTime::now();
        let resp = self
            .client
            .post(&self.endpoint)
            // RFC 6749 2.3.1: both are form-encoded before they go into Basic.
            .basic_auth(form_encode(&self.client_id), Some(form_encode(&self.secret)))
            .form(&form)
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                log::warn!("identity_token: the token endpoint refused an exchange with {}", r.status());
                return None;
            }
            Err(e) => {
                log::warn!("identity_token: token exchange failed: {e}");
                return None;
            }
        };
        let body: serde_json::Value = resp.json().await.ok()?;
        let token = body.get("access_token")?.as_str()?.to_string();
        // At most a day, whatever the IdP says (no overflow, no token kept forever).
        let lifetime = body
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .unwrap_or(60)
            .min(86_400);
        // Reused for 90% of its lifetime, so it never expires on its way to the service.
        Some(Cached {
            token,
            reuse_until: sent
                .checked_add(Duration::from_secs(lifetime).mul_f64(0.9))
                .unwrap_or(sent),
        })
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The claims of a JWT's payload, read without checking anything: only to compare a token
/// with the principal `jwt` verified.
fn payload(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    use base64::Engine;
    let part = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Removes a shared exchange that nobody finished (its requests went away) from the map.
struct InflightGuard<'a> {
    inflight: &'a Mutex<HashMap<[u8; 32], Inflight>>,
    key: [u8; 32],
    cell: Inflight,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.cell.initialized() {
            return;
        }
        let mut inflight = self.inflight.lock();
        // Only the last holder besides the map (this guard) takes it out.
        if inflight.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &self.cell))
            && Arc::strong_count(&self.cell) <= 2
        {
            inflight.remove(&self.key);
        }
    }
}

/// The client's bearer token, the subject of an exchange.
fn bearer(req: &RequestHeader) -> Option<&str> {
    let value = req.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[async_trait]
impl Plugin for IdentityToken {
    type State = TokenState;

    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            upstream_request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn start(&self) {
        if !self.jwks.is_empty() {
            self.registry.publish(self.owner, self.jwks.clone());
        }
    }

    async fn stop(&self) {
        self.registry.withdraw(self.owner);
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        state: &mut TokenState,
    ) -> Result<Flow> {
        // Sign mode mints in upstream_request_filter, once the pool (the default audience) is
        // final: a traffic_split later in the chain may still change it.
        let (Some(principal), Issue::Exchange(exchanger)) = (&ctx.principal, &self.issue) else {
            return Ok(Flow::Continue);
        };
        // Only the token `jwt` verified is a subject token: an API key (`key_auth`) is not
        // exchanged, and a bearer other than the verified token (jwt reading another header
        // or a cookie) is refused rather than exchanged.
        if principal.verified_by != "jwt" {
            return Ok(Flow::Continue);
        }
        let subject = bearer(session.req_header())
            .filter(|t| payload(t).is_some_and(|claims| claims == *principal.claims));
        let answer = match subject {
            Some(subject) => exchanger.token(subject).await,
            None => None,
        };
        match answer {
            Some((token, exchanged)) => {
                self.count(if exchanged { "exchanged" } else { "cached" });
                state.token = Some(token);
                Ok(Flow::Continue)
            }
            None => {
                self.count("failed");
                Ok(Flow::Respond(Reply::Error(ApiError::new(
                    502,
                    "token_exchange_failed",
                    "the gateway could not obtain a token for the service",
                ))))
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
        state: &mut TokenState,
    ) -> Result<()> {
        if let (Some(principal), Issue::Sign(signer)) = (&ctx.principal, &self.issue) {
            if state.token.is_none() {
                let audience = signer
                    .audience
                    .as_deref()
                    .or(ctx.upstream.as_deref())
                    .unwrap_or(&ctx.route);
                match signer.token(principal, audience, SystemTime::now()) {
                    Ok((token, minted)) => {
                        self.count(if minted { "minted" } else { "cached" });
                        state.token = Some(token);
                    }
                    Err(e) => {
                        self.count("failed");
                        return Err(e);
                    }
                }
            }
        }
        let Some(token) = &state.token else {
            return Ok(());
        };
        if !self.forward_original {
            upstream_request.remove_header(&AUTHORIZATION);
        }
        if self.header == AUTHORIZATION {
            upstream_request.insert_header(AUTHORIZATION, format!("Bearer {token}"))?;
        } else {
            upstream_request.insert_header(self.header.clone(), token.as_str())?;
        }
        Ok(())
    }
}

impl IdentityToken {
    fn count(&self, result: &str) {
        self.results.with_label_values(&[&*self.name, result]).inc();
    }
}

impl crate::PluginType for IdentityTokenConfig {
    const KIND: &'static str = "identity_token";

    fn validate(&self) -> Vec<BuildError> {
        config::validate(self)
    }

    fn trusted_headers(&self) -> Vec<HeaderName> {
        self.header
            .get()
            .filter(|h| **h != AUTHORIZATION)
            .cloned()
            .into_iter()
            .collect()
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = config::validate(self);
        if !errors.is_empty() {
            return Err(errors);
        }
        let header = crate::conf::value("header", &self.header)?;
        let (issue, jwks) = match self.mode {
            Mode::Sign => {
                let mut keys = config::signing_keys(self)?;
                let jwks = keys.iter().map(|k| k.jwk.clone()).collect();
                let key = keys.remove(0);
                (
                    Issue::Sign(Signer {
                        issuer: self.issuer.clone().unwrap_or_default(),
                        audience: self.audience.clone(),
                        key,
                        ttl: self.ttl.get(),
                        claims: self.claims.clone(),
                        cache: Mutex::new(HashMap::new()),
                    }),
                    jwks,
                )
            }
            Mode::Exchange => {
                let client = reqwest::Client::builder()
                    .timeout(EXCHANGE_TIMEOUT)
                    .build()
                    .map_err(|e| vec![BuildError::new("token_endpoint", format!("HTTP client: {e}"))])?;
                let secret = self
                    .client_secret_env
                    .as_deref()
                    .and_then(|v| std::env::var(v).ok())
                    .unwrap_or_default();
                (
                    Issue::Exchange(Exchanger {
                        endpoint: self.token_endpoint.clone().unwrap_or_default(),
                        client_id: self.client_id.clone().unwrap_or_default(),
                        secret,
                        audience: self.requested_audience.clone(),
                        scopes: self.scopes.join(" "),
                        client,
                        cache: Mutex::new(HashMap::new()),
                        inflight: Mutex::new(HashMap::new()),
                    }),
                    Vec::new(),
                )
            }
        };
        Ok(Erased::into_dyn(IdentityToken {
            name: Arc::clone(&env.name),
            issue,
            header,
            forward_original: self.forward_original,
            jwks,
            owner: env.public_keys.owner(),
            registry: Arc::clone(&env.public_keys),
            results: env.metrics.identity_tokens.clone(),
        }))
    }
}
