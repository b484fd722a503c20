//! The OpenID provider as the session plugin talks to it: discovery (cached, refreshed),
//! the token endpoint (authorization code with PKCE, refresh), revocation (RFC 7009), and
//! verification of ID tokens and back-channel logout tokens with the provider's JWKS.
//!
//! Why not the `openidconnect` crate: ID and logout tokens are verified with the keys and
//! the verification code the `jwt` plugin already runs in production (`RemoteKeys`: periodic
//! refresh, rate-limited refetch on an unknown `kid`, the last good set kept), over the same
//! `reqwest` client; what is left is three form POSTs and a discovery document, which the
//! code below does with `reqwest` in less than its generic client plumbing would take.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jwt::keys::RemoteKeys;

/// What `application/x-www-form-urlencoded` leaves as it is: letters, digits, `*-._`.
const FORM_URLENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

/// How long the provider may take to answer one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Algorithms accepted for ID and logout tokens (asymmetric only).
const ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
/// The `events` member a back-channel logout token must carry (OpenID Back-Channel Logout
/// 1.0, section 2.4).
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// The parts of the discovery document the plugin uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub end_session_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
}

/// A token endpoint answer.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub id_token: Option<String>,
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

/// A token endpoint call that produced no tokens.
#[derive(Debug)]
pub struct TokenError {
    /// The provider refused the grant (`invalid_grant`, a 400/401): the code or refresh
    /// token is no good. Otherwise the provider was unreachable or failing (try later).
    pub refused: bool,
    pub message: String,
}

/// Longest a back-channel logout token is accepted after its `iat`.
const LOGOUT_TOKEN_AGE: u64 = 120;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How the gateway authenticates to the token and revocation endpoints.
#[derive(Clone)]
pub enum ClientCredentials {
    Basic(String),
    Post(String),
    /// RFC 7523 section 2.2 / OIDC Core section 9: a JWT signed with the client's key.
    PrivateKeyJwt(Arc<crate::identity_token::keys::SigningKey>),
    Public,
}

pub struct Provider {
    issuer: String,
    client_id: String,
    credentials: ClientCredentials,
    http: reqwest::Client,
    refresh: Duration,
    leeway: u64,
    meta: ArcSwapOption<(Metadata, Instant)>,
    keys: ArcSwapOption<RemoteKeys>,
    fetch: tokio::sync::Mutex<()>,
}

impl Provider {
    pub fn new(
        issuer: &str,
        client_id: &str,
        credentials: ClientCredentials,
        refresh: Duration,
        leeway: Duration,
    ) -> Result<Provider, String> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Provider {
            issuer: issuer.to_string(),
            client_id: client_id.to_string(),
            credentials,
            http,
            refresh,
            leeway: leeway.as_secs(),
            meta: ArcSwapOption::empty(),
            keys: ArcSwapOption::empty(),
            fetch: tokio::sync::Mutex::new(()),
        })
    }

    /// The discovery document: fetched on first use and when older than `refresh` (the old
    /// one is kept when a refresh fails).
    pub async fn metadata(&self) -> Result<Metadata, String> {
        if let Some(m) = self.meta.load_full() {
            if m.1.elapsed() < self.refresh {
                return Ok(m.0.clone());
            }
        }
        let _one_at_a_time = self.fetch.lock().await;
        let current = self.meta.load_full();
        if let Some(m) = &current {
            if m.1.elapsed() < self.refresh {
                return Ok(m.0.clone());
            }
        }
        match self.discover().await {
            Ok(meta) => {
                let moved = current
                    .as_ref()
                    .is_some_and(|c| c.0.jwks_uri != meta.jwks_uri);
                if self.keys.load().is_none() || moved {
                    let keys = RemoteKeys::new(
                        &meta.jwks_uri,
                        Duration::from_secs(300),
                        Duration::from_secs(30),
                    )?;
                    keys.first_fetch().await;
                    self.keys.store(Some(keys));
                }
                self.meta.store(Some(Arc::new((meta.clone(), Instant::now()))));
                Ok(meta)
            }
            Err(e) => match current {
                Some(m) => {
                    log::warn!("OpenID provider {}: discovery refresh failed ({e}); keeping the last document", self.issuer);
                    Ok(m.0.clone())
                }
                None => Err(e),
            },
        }
    }

    async fn discover(&self) -> Result<Metadata, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("discovery: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("discovery: status {}", resp.status()));
        }
        let meta: Metadata = resp
            .json()
            .await
            .map_err(|e| format!("discovery document: {e}"))?;
        if meta.issuer.trim_end_matches('/') != self.issuer.trim_end_matches('/') {
            return Err(format!(
                "discovery names issuer {:?}, configured {:?}",
                meta.issuer, self.issuer
            ));
        }
        Ok(meta)
    }

    /// Calls the token endpoint with a grant (`authorization_code`, `refresh_token`).
    pub async fn token(&self, form: &[(&str, &str)]) -> Result<TokenResponse, TokenError> {
        let transient = |message: String| TokenError {
            refused: false,
            message,
        };
        let meta = self.metadata().await.map_err(transient)?;
        let resp = self
            .authenticated(self.http.post(&meta.token_endpoint), &meta.token_endpoint, form)
            .send()
            .await
            .map_err(|e| transient(format!("token endpoint: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            // The provider's `error` code only (RFC 6749 section 5.2), as a bounded word;
            // never its description, which may echo what was sent.
            let code: String = resp
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(40)
                .collect();
            return Err(TokenError {
                refused: status == reqwest::StatusCode::BAD_REQUEST
                    || status == reqwest::StatusCode::UNAUTHORIZED,
                message: format!("token endpoint: status {status} {code}"),
            });
        }
        resp.json()
            .await
            .map_err(|e| transient(format!("token endpoint answer: {e}")))
    }

    /// Revokes a refresh token (RFC 7009) when the provider has a revocation endpoint.
    pub async fn revoke(&self, refresh_token: &str) {
        let Ok(meta) = self.metadata().await else {
            return;
        };
        let Some(url) = &meta.revocation_endpoint else {
            return;
        };
        let form = [
            ("token", refresh_token),
            ("token_type_hint", "refresh_token"),
        ];
        match self.authenticated(self.http.post(url), url, &form).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => log::warn!("OpenID provider {}: revocation answered {}", self.issuer, r.status()),
            Err(e) => log::warn!("OpenID provider {}: revocation failed: {e}", self.issuer),
        }
    }

    fn authenticated(
        &self,
        req: reqwest::RequestBuilder,
        endpoint: &str,
        form: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        let assertion;
        let req = match &self.credentials {
            ClientCredentials::Basic(secret) => {
                // RFC 6749 section 2.3.1: both parts form-urlencoded before Basic.
                let enc = |s: &str| {
                    percent_encoding::utf8_percent_encode(s, FORM_URLENCODED).to_string()
                };
                req.basic_auth(enc(&self.client_id), Some(enc(secret)))
            }
            ClientCredentials::Post(secret) => {
                fields.push(("client_id", &self.client_id));
                fields.push(("client_secret", secret));
                return req.form(&fields);
            }
            ClientCredentials::PrivateKeyJwt(key) => {
                let now = now_secs();
                let claims = serde_json::json!({
                    "iss": self.client_id, "sub": self.client_id, "aud": endpoint,
                    "iat": now, "exp": now + 60,
                    "jti": super::random_token(),
                });
                let mut header = jsonwebtoken::Header::new(key.algorithm);
                header.kid = Some(key.kid.clone());
                assertion = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap_or_default();
                fields.push(("client_id", &self.client_id));
                fields.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
                fields.push(("client_assertion", &assertion));
                req
            }
            ClientCredentials::Public => {
                fields.push(("client_id", &self.client_id));
                req
            }
        };
        req.form(&fields)
    }

    /// Verifies an ID token (OpenID Connect Core 1.0 section 3.1.3.7): signature by the
    /// provider's keys, `iss`, `aud` (this client), `exp`, `iat`, and `nonce`.
    pub async fn verify_id_token(
        &self,
        token: &str,
        nonce: &str,
    ) -> Result<Map<String, Value>, &'static str> {
        let claims = self.verify_id(token).await?;
        if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
            return Err("bad_nonce");
        }
        Ok(claims)
    }

    /// Verifies an ID token from a refresh (OIDC Core 1.0 section 12.2): as at login, without
    /// a nonce, and for the same subject.
    pub async fn verify_refreshed_id_token(
        &self,
        token: &str,
        subject: &str,
    ) -> Result<Map<String, Value>, &'static str> {
        let claims = self.verify_id(token).await?;
        if claims.get("sub").and_then(Value::as_str) != Some(subject) {
            return Err("other_subject");
        }
        Ok(claims)
    }

    /// The checks every ID token passes: signature, `iss`, `aud`, `exp`, `iat` (not in the
    /// future), a string `sub`, and `azp` (when present, or when `aud` names several).
    async fn verify_id(&self, token: &str) -> Result<Map<String, Value>, &'static str> {
        let claims = self.verify(token, &["iss", "aud", "exp", "iat", "sub"]).await?;
        if claims
            .get("sub")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err("bad_subject");
        }
        let iat = claims.get("iat").and_then(Value::as_u64).ok_or("bad_iat")?;
        if iat > now_secs().saturating_add(self.leeway) {
            return Err("issued_in_the_future");
        }
        let several = matches!(claims.get("aud"), Some(Value::Array(a)) if a.len() > 1);
        let azp = claims.get("azp");
        if (several || azp.is_some()) && azp.and_then(Value::as_str) != Some(&self.client_id) {
            return Err("bad_azp");
        }
        Ok(claims)
    }

    /// Verifies a back-channel logout token (OpenID Back-Channel Logout 1.0 section 2.6).
    pub async fn verify_logout_token(
        &self,
        token: &str,
    ) -> Result<Map<String, Value>, &'static str> {
        if let Ok(h) = jsonwebtoken::decode_header(token) {
            if h.typ.as_deref().is_some_and(|t| {
                !t.eq_ignore_ascii_case("logout+jwt") && !t.eq_ignore_ascii_case("JWT")
            }) {
                return Err("bad_typ");
            }
        }
        let claims = self.verify(token, &["iss", "aud", "iat", "exp", "jti"]).await?;
        let iat = claims.get("iat").and_then(Value::as_u64).ok_or("bad_iat")?;
        let now = now_secs();
        if iat > now.saturating_add(self.leeway)
            || now > iat.saturating_add(LOGOUT_TOKEN_AGE + self.leeway)
        {
            return Err("stale_or_future_iat");
        }
        if claims.get("jti").and_then(Value::as_str).is_none_or(str::is_empty) {
            return Err("bad_jti");
        }
        let has_event = claims
            .get("events")
            .and_then(Value::as_object)
            .is_some_and(|e| e.contains_key(BACKCHANNEL_EVENT));
        if !has_event {
            return Err("not_a_logout_token");
        }
        if claims.contains_key("nonce") {
            return Err("nonce_in_logout_token");
        }
        let sid = claims.get("sid").and_then(Value::as_str);
        let sub = claims.get("sub").and_then(Value::as_str);
        if sid.is_none() && sub.is_none() {
            return Err("no_sid_or_sub");
        }
        Ok(claims)
    }

    async fn verify(
        &self,
        token: &str,
        required: &[&str],
    ) -> Result<Map<String, Value>, &'static str> {
        let meta = self.metadata().await.map_err(|_| "provider_unavailable")?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed")?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err("algorithm_not_allowed");
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[meta.issuer.as_str()]);
        v.set_audience(&[self.client_id.as_str()]);
        v.set_required_spec_claims(required);
        v.validate_exp = required.contains(&"exp");
        v.leeway = self.leeway;
        let keys = self.keys.load_full().ok_or("provider_unavailable")?;
        keys.refresh_if_stale();
        let first = crate::jwt::decode_claims(&keys.set.load(), header.kid.as_deref(), header.alg, token, &v);
        let claims = match (first, header.kid.as_deref()) {
            (Err("unknown_kid"), Some(kid)) => {
                keys.refetch_for_unknown_kid(kid).await;
                crate::jwt::decode_claims(&keys.set.load(), Some(kid), header.alg, token, &v)?
            }
            (result, _) => result?,
        };
        Ok(claims)
    }
}
