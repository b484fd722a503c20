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

/// How the gateway authenticates to the token and revocation endpoints.
#[derive(Clone)]
pub enum ClientCredentials {
    Basic(String),
    Post(String),
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
    pub async fn token(&self, form: &[(&str, &str)]) -> Result<TokenResponse, String> {
        let meta = self.metadata().await?;
        let resp = self
            .authenticated(self.http.post(&meta.token_endpoint), form)
            .send()
            .await
            .map_err(|e| format!("token endpoint: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            // The provider's `error` code only (RFC 6749 section 5.2); never its description,
            // which may echo what was sent.
            let code = resp
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            return Err(format!("token endpoint: status {status} {code}"));
        }
        resp.json()
            .await
            .map_err(|e| format!("token endpoint answer: {e}"))
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
        match self.authenticated(self.http.post(url), &form).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => log::warn!("OpenID provider {}: revocation answered {}", self.issuer, r.status()),
            Err(e) => log::warn!("OpenID provider {}: revocation failed: {e}", self.issuer),
        }
    }

    fn authenticated(
        &self,
        req: reqwest::RequestBuilder,
        form: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut fields: Vec<(&str, &str)> = form.to_vec();
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
        let claims = self.verify(token, &["iss", "aud", "exp", "iat", "sub"]).await?;
        if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
            return Err("bad_nonce");
        }
        if let Some(Value::Array(aud)) = claims.get("aud") {
            if aud.len() > 1 && claims.get("azp").and_then(Value::as_str) != Some(&self.client_id)
            {
                return Err("bad_azp");
            }
        }
        Ok(claims)
    }

    /// Verifies a back-channel logout token (OpenID Back-Channel Logout 1.0 section 2.6).
    pub async fn verify_logout_token(
        &self,
        token: &str,
    ) -> Result<Map<String, Value>, &'static str> {
        let claims = self.verify(token, &["iss", "aud", "iat"]).await?;
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
        if !claims.contains_key("sid") && !claims.contains_key("sub") {
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
