//! `session`: browser sessions at the gateway (the "token handler" pattern of OAuth 2.0 for
//! Browser-Based Apps). The browser holds one Secure, HttpOnly, SameSite cookie with a sealed,
//! random session id; the gateway does the OpenID Connect login (authorization code + PKCE
//! S256, state, nonce), keeps the tokens server-side, refreshes the access token before it
//! expires, and sends it upstream as `Authorization: Bearer`. The session cookie never
//! reaches a service.
//!
//! Phases: `request_filter` answers the plugin's own paths (`login`, `callback`, `logout`,
//! `user`, `backchannel_logout`) and, on every other request, requires a live session,
//! checks CSRF defences on unsafe methods (the `csrf_header` and an allowed `Origin` or
//! `Referer`), refreshes the access token when near expiry (one refresh per session at a
//! time), and sets the principal (the ID token's claims) for the plugins after it;
//! `upstream_request_filter` removes the session's cookies from the proxied request.
//!
//! Answers: 401 `unauthenticated` (no, a foreign, a tampered or an expired session) as JSON,
//! or a redirect to `login` for a browser navigating (`GET` accepting `text/html`); 403
//! `csrf`; 400 `login_failed` on a bad callback; 503 `session_store_unavailable`. Tokens,
//! codes, cookies and session ids are never logged nor put in an error.
//! Metrics: `sallyport_session_events_total{plugin,event}`.

pub mod config;
pub mod cookies;
mod oidc;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use parking_lot::Mutex;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session as HttpSession;
use prometheus::IntCounterVec;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub use config::SessionConfig;
use config::{ClientAuth, SameSite, StoreKind};
use cookies::{request_cookie, CookieKeys, CookieStyle};
use oidc::{ClientCredentials, Provider};
use store::{MemoryStore, RedisSessions, SessionRecord, Store};

use crate::{
    ApiError, BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Principal, Reply,
    RequestCtx, Result,
};

/// The ID token claims `user` returns (OpenID Connect Core 1.0 section 5.1).
const PROFILE_CLAIMS: [&str; 17] = [
    "sub",
    "name",
    "given_name",
    "family_name",
    "middle_name",
    "nickname",
    "preferred_username",
    "profile",
    "picture",
    "website",
    "email",
    "email_verified",
    "gender",
    "birthdate",
    "zoneinfo",
    "locale",
    "updated_at",
];
/// Claims that describe the token rather than the user: not kept as the principal's.
const PROTOCOL_CLAIMS: [&str; 4] = ["nonce", "at_hash", "c_hash", "s_hash"];
/// What a `Location` path keeps encoded: controls, space, quotes, angle brackets, backtick
/// (and, by `utf8_percent_encode`, every non-ASCII byte).
const LOCATION_UNSAFE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'<')
    .add(b'>')
    .add(b'`');
/// How long a refresh may hold the fleet-wide lock of its session (Redis store).
const REFRESH_LOCK: Duration = Duration::from_secs(10);
/// How long a request waits for another gateway's refresh of its session.
const REFRESH_WAIT: Duration = Duration::from_secs(5);
/// Largest back-channel logout request body read.
const MAX_LOGOUT_BODY: usize = 16 * 1024;
/// Every event, so each series exists from the start.
const EVENTS: [&str; 8] = [
    "login",
    "callback_ok",
    "callback_error",
    "refresh",
    "refresh_error",
    "logout",
    "expired",
    "csrf_rejected",
];

/// The plugin keeps no per-request state (the gateway strips its cookies on every route).
#[derive(Default)]
pub struct SessionState;

/// What the login cookie carries from `login` to `callback` (sealed).
#[derive(Serialize, Deserialize)]
struct LoginState {
    state: String,
    nonce: String,
    verifier: String,
    /// The `redirect_uri` the authorization request named: the token request repeats it.
    redirect_uri: String,
    return_to: String,
    /// Unix seconds after which the login is void.
    exp: u64,
}

pub struct Session {
    name: Arc<str>,
    paths: config::SessionPaths,
    provider: Arc<Provider>,
    keys: CookieKeys,
    style: CookieStyle,
    cookie: String,
    login_cookie: String,
    client_id: String,
    scopes: String,
    public_url: Option<String>,
    return_to: Vec<String>,
    store: Store,
    idle: u64,
    absolute: u64,
    refresh_before: u64,
    login_timeout: u64,
    trusted_origins: Vec<String>,
    csrf_header: HeaderName,
    events: IntCounterVec,
    /// One refresh per session at a time: later requests wait for it, then read its result.
    refreshing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Unix seconds now (tests give their own clock).
    clock: fn() -> u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// 32 random bytes, base64url.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The PKCE S256 challenge of a verifier (RFC 7636 section 4.2).
fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The store key of a session id: its SHA-256, hex.
fn store_key(sid: &str) -> String {
    Sha256::digest(sid.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why a session is over, if it is: `idle_timeout` or `absolute_timeout` passed.
fn expired(rec: &SessionRecord, now: u64, idle: u64, absolute: u64) -> bool {
    now >= rec.last_seen.saturating_add(idle) || now >= rec.created_at.saturating_add(absolute)
}

/// When the session ends unless used again (unix seconds).
fn expires_at(rec: &SessionRecord, idle: u64, absolute: u64) -> u64 {
    rec.last_seen
        .saturating_add(idle)
        .min(rec.created_at.saturating_add(absolute))
}

/// The local path a login or logout returns to: `raw` when one of `allowed` admits it (an
/// exact path, or a prefix ending in `/` other than `/` itself), else `None`. Only single-slash local paths:
/// `//evil.example`, `/\evil`, schemes and encoded slashes are refused (no open redirect).
fn allowed_return_to(raw: &str, allowed: &[String]) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?;
    let local = decoded.starts_with('/')
        && !decoded.starts_with("//")
        && !decoded.contains('\\')
        && !decoded.chars().any(|c| c.is_control())
        && !raw.to_ascii_lowercase().contains("%2f")
        && !decoded.split('/').any(|seg| seg == "..");
    if !local {
        return None;
    }
    let path = decoded.split(['?', '#']).next().unwrap_or("");
    // `/` admits only the root; a longer entry ending in `/` admits everything below it.
    allowed
        .iter()
        .any(|a| path == a || (a.len() > 1 && a.ends_with('/') && path.starts_with(a.as_str())))
        .then(|| percent_encoding::utf8_percent_encode(&decoded, LOCATION_UNSAFE).to_string())
}

/// Whether an unsafe request comes from an allowed page: its `Origin`, or without one its
/// `Referer`'s origin, is listed.
fn origin_allowed(req: &RequestHeader, trusted: &[String]) -> bool {
    let origin = match req.headers.get(http::header::ORIGIN) {
        Some(o) => o.to_str().ok().map(str::to_string),
        None => req
            .headers
            .get(http::header::REFERER)
            .and_then(|r| r.to_str().ok())
            .and_then(|r| reqwest::Url::parse(r).ok())
            .map(|u| u.origin().ascii_serialization()),
    };
    origin.is_some_and(|o| trusted.contains(&o))
}

fn query_param(req: &RequestHeader, name: &str) -> Option<String> {
    let q = req.uri.query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn no_store(header: &mut ResponseHeader) -> Result<()> {
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    Ok(())
}

fn redirect(location: &str, cookies: &[String]) -> Result<Reply> {
    let mut header = ResponseHeader::build(302, Some(3 + cookies.len()))?;
    header.insert_header(http::header::LOCATION, location)?;
    no_store(&mut header)?;
    for c in cookies {
        header.append_header(http::header::SET_COOKIE, c.as_str())?;
    }
    Ok(Reply::Full {
        header: Box::new(header),
        body: Bytes::new(),
    })
}

fn json_reply(status: u16, value: &Value, cookies: &[String]) -> Result<Reply> {
    let body = serde_json::to_vec(value).map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InternalError, "encoding JSON", e)
    })?;
    let mut header = ResponseHeader::build(status, Some(3 + cookies.len()))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    no_store(&mut header)?;
    for c in cookies {
        header.append_header(http::header::SET_COOKIE, c.as_str())?;
    }
    Ok(Reply::Full {
        header: Box::new(header),
        body: Bytes::from(body),
    })
}

/// Why a session's access token could not be made fresh.
enum Stale {
    /// The session is over (logged out, or the provider refused the refresh).
    Ended,
    /// The provider or the store cannot be reached now; the session stays.
    Unavailable(String),
}

/// A waiter on a session's refresh lock; the last one out removes the lock from the map.
struct RefreshEntry<'a> {
    map: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: &'a str,
}

impl Drop for RefreshEntry<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock();
        // The map's own reference plus this waiter's clone.
        if map.get(self.key).is_some_and(|l| Arc::strong_count(l) <= 2) {
            map.remove(self.key);
        }
    }
}

/// The outcome of looking up the request's session.
enum Lookup {
    Live(String, Box<SessionRecord>),
    /// No cookie, a cookie no key opens, or no such session.
    None,
    /// The session's timeouts passed (it was deleted).
    Expired,
}

impl Session {
    fn count(&self, event: &str) {
        self.events.with_label_values(&[&*self.name, event]).inc();
    }

    fn error(&self, e: ApiError) -> Flow {
        Flow::Respond(Reply::Error(e))
    }

    fn clear(&self, name: &str) -> String {
        self.style.set_cookie(name, "", 0, None)
    }

    /// `scheme://host` of the gateway as the browser sees it.
    fn origin(&self, session: &HttpSession) -> String {
        if let Some(u) = &self.public_url {
            return u.trim_end_matches('/').to_string();
        }
        let req = session.req_header();
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri.authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        let tls = session
            .digest()
            .is_some_and(|d| d.ssl_digest.is_some());
        format!("{}://{host}", if tls { "https" } else { "http" })
    }

    fn redirect_uri(&self, session: &HttpSession) -> String {
        format!("{}{}", self.origin(session), self.paths.callback)
    }

    fn return_to(&self, req: &RequestHeader) -> String {
        query_param(req, "return_to")
            .and_then(|r| allowed_return_to(&r, &self.return_to))
            .unwrap_or_else(|| self.return_to.first().cloned().unwrap_or_else(|| "/".into()))
    }

    async fn lookup(&self, req: &RequestHeader) -> std::result::Result<Lookup, ApiError> {
        // Two cookies of the session's name (one planted by a sibling domain): none counts.
        let Some(sealed) = cookies::unique_request_cookie(&req.headers, &self.cookie) else {
            return Ok(Lookup::None);
        };
        let Some(sid) = self.keys.open(&self.cookie, sealed) else {
            return Ok(Lookup::None);
        };
        let key = store_key(&sid);
        let rec = match self.store.get(&key).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(Lookup::None),
            Err(e) => return Err(self.store_unavailable(&e)),
        };
        if expired(&rec, (self.clock)(), self.idle, self.absolute) {
            // A failed delete only leaves an entry that expires by itself.
            let _ = self.store.delete(&key).await;
            self.count("expired");
            return Ok(Lookup::Expired);
        }
        Ok(Lookup::Live(key, Box::new(rec)))
    }

    fn store_unavailable(&self, e: &str) -> ApiError {
        log::warn!("session {}: store unavailable: {e}", self.name);
        ApiError::new(
            503,
            "session_store_unavailable",
            "sessions cannot be read right now",
        )
    }

    /// What an unauthenticated request gets: a redirect to login for a browser navigating,
    /// else 401 JSON (an API call never gets a redirect).
    fn unauthenticated(&self, session: &HttpSession, ctx: &RequestCtx, why: &str) -> Result<Flow> {
        let req = session.req_header();
        let navigating = (req.method == Method::GET || req.method == Method::HEAD)
            && req
                .headers
                .get(http::header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("text/html") && !a.contains("application/json"));
        if navigating {
            let back = req
                .uri
                .path_and_query()
                .map_or(ctx.path.as_str(), |p| p.as_str());
            let mut location = self.paths.login.clone();
            if allowed_return_to(back, &self.return_to).is_some() {
                location.push_str("?return_to=");
                location.push_str(
                    &percent_encoding::utf8_percent_encode(back, percent_encoding::NON_ALPHANUMERIC)
                        .to_string(),
                );
            }
            return Ok(Flow::Respond(redirect(&location, &[])?));
        }
        let err = ApiError::new(401, "unauthenticated", format!("{why}; sign in at {}", self.paths.login))
            .with_reason(if why.contains("expired") { "expired" } else { "no_session" });
        Ok(self.error(err))
    }

    /// `GET login?return_to=`: to the provider's authorization endpoint with PKCE, state and
    /// nonce kept in a sealed, short-lived cookie.
    async fn login(&self, session: &HttpSession) -> Result<Flow> {
        let meta = match self.provider.metadata().await {
            Ok(m) => m,
            Err(e) => {
                log::warn!("session {}: OpenID provider unavailable: {e}", self.name);
                return Ok(self.error(ApiError::new(
                    503,
                    "provider_unavailable",
                    "the identity provider cannot be reached",
                )));
            }
        };
        let login = LoginState {
            state: random_token(),
            nonce: random_token(),
            verifier: random_token(),
            redirect_uri: self.redirect_uri(session),
            return_to: self.return_to(session.req_header()),
            exp: (self.clock)().saturating_add(self.login_timeout),
        };
        let Ok(mut url) = reqwest::Url::parse(&meta.authorization_endpoint) else {
            return Ok(self.error(ApiError::new(
                502,
                "provider_error",
                "the identity provider's authorization endpoint is not a URL",
            )));
        };
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", &login.redirect_uri)
            .append_pair("scope", &self.scopes)
            .append_pair("state", &login.state)
            .append_pair("nonce", &login.nonce)
            .append_pair("code_challenge", &pkce_challenge(&login.verifier))
            .append_pair("code_challenge_method", "S256");
        let plain = serde_json::to_string(&login).map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InternalError, "login state", e)
        })?;
        let sealed = self
            .keys
            .seal(&self.login_cookie, &plain)
            .ok_or_else(|| pingora::Error::explain(pingora::ErrorType::InternalError, "no key"))?;
        // Lax whatever `same_site` says: the provider's redirect back is a cross-site
        // top-level navigation, which a Strict cookie would miss.
        let cookie = self.style.set_cookie(
            &self.login_cookie,
            &sealed,
            self.login_timeout,
            Some(cookie::SameSite::Lax),
        );
        self.count("login");
        Ok(Flow::Respond(redirect(url.as_str(), &[cookie])?))
    }

    /// `GET callback?code&state`: checks the state against the login cookie, redeems the code
    /// with the PKCE verifier, verifies the ID token (and its nonce), and starts a session
    /// under a new random id (no fixation).
    async fn callback(&self, session: &HttpSession) -> Result<Flow> {
        let req = session.req_header();
        let clear_login = self.clear(&self.login_cookie);
        let fail = |me: &Session, why: &str, detail: &str| -> Result<Flow> {
            me.count("callback_error");
            log::warn!("session {}: login failed: {detail}", me.name);
            Ok(Flow::Respond(json_reply(
                400,
                &json!({"error": {"status": 400, "code": "login_failed", "message": why}}),
                std::slice::from_ref(&clear_login),
            )?))
        };
        // The state first: a cross-site link to the callback cannot even end a login.
        let login: Option<LoginState> = request_cookie(&req.headers, &self.login_cookie)
            .and_then(|sealed| self.keys.open(&self.login_cookie, sealed))
            .and_then(|plain| serde_json::from_str(&plain).ok());
        let Some(login) = login else {
            return fail(self, "no login in progress (start again)", "no or unreadable login cookie");
        };
        let state = query_param(req, "state").unwrap_or_default();
        let state_ok: bool =
            subtle::ConstantTimeEq::ct_eq(state.as_bytes(), login.state.as_bytes()).into();
        if !state_ok {
            return fail(self, "the login state does not match (start again)", "state mismatch");
        }
        if (self.clock)() >= login.exp {
            return fail(self, "the login took too long (start again)", "login cookie expired");
        }
        if let Some(code) = query_param(req, "error") {
            let code: String = code
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(40)
                .collect();
            return fail(self, "the identity provider refused the login", &format!("provider error {code}"));
        }
        let Some(code) = query_param(req, "code").filter(|c| !c.is_empty()) else {
            return fail(self, "the callback has no code", "no code");
        };
        let tokens = match self
            .provider
            .token(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &login.redirect_uri),
                ("code_verifier", &login.verifier),
            ])
            .await
        {
            Ok(t) => t,
            Err(e) => {
                return fail(self, "the identity provider did not accept the login", &e.message)
            }
        };
        let Some(id_token) = tokens.id_token.clone() else {
            return fail(self, "the identity provider sent no ID token", "no id_token");
        };
        let mut claims = match self.provider.verify_id_token(&id_token, &login.nonce).await {
            Ok(c) => c,
            Err(reason) => {
                return fail(self, "the ID token is not valid", &format!("ID token refused: {reason}"))
            }
        };
        for c in PROTOCOL_CLAIMS {
            claims.remove(c);
        }
        let now = (self.clock)();
        let rec = SessionRecord {
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            idp_sid: claims.get("sid").and_then(Value::as_str).map(str::to_string),
            claims,
            id_token,
            access_token: tokens.access_token,
            access_expires_at: now.saturating_add(tokens.expires_in.unwrap_or(300)),
            refresh_token: tokens.refresh_token,
            created_at: now,
            last_seen: now,
            version: 0,
        };
        let sid = random_token();
        let sealed = self
            .keys
            .seal(&self.cookie, &sid)
            .ok_or_else(|| pingora::Error::explain(pingora::ErrorType::InternalError, "no key"))?;
        let cookie = self.style.set_cookie(&self.cookie, &sealed, self.absolute, None);
        // The answer is built before the session exists: a failure leaves nothing behind.
        let answer = redirect(&login.return_to, &[cookie, clear_login])?;
        if let Err(e) = self
            .store
            .put(&store_key(&sid), &rec, Duration::from_secs(self.idle))
            .await
        {
            return Ok(self.error(self.store_unavailable(&e)));
        }
        self.count("callback_ok");
        Ok(Flow::Respond(answer))
    }

    /// The checks an unsafe method passes: the CSRF header, and an allowed origin.
    fn csrf_ok(&self, req: &RequestHeader) -> bool {
        req.headers.contains_key(&self.csrf_header) && origin_allowed(req, &self.trusted_origins)
    }

    /// Refreshes the access token when it expires within `refresh_before`: one refresh per
    /// session at a time (in this process, and across the fleet with the Redis store); the
    /// others wait and use its result.
    async fn fresh(&self, key: &str, rec: SessionRecord) -> std::result::Result<SessionRecord, Stale> {
        if !self.due(&rec, (self.clock)()) {
            return Ok(rec);
        }
        let lock = Arc::clone(self.refreshing.lock().entry(key.to_string()).or_default());
        // Removes the map entry when the last waiter is done, even if its request is dropped.
        let _entry = RefreshEntry {
            map: &self.refreshing,
            key,
        };
        let _one_at_a_time = lock.lock().await;
        self.refresh_locked(key).await
    }

    fn due(&self, r: &SessionRecord, now: u64) -> bool {
        r.access_expires_at <= now.saturating_add(self.refresh_before)
    }

    async fn refresh_locked(&self, key: &str) -> std::result::Result<SessionRecord, Stale> {
        let deadline = std::time::Instant::now() + REFRESH_WAIT;
        loop {
            // Another request (or gateway) may have refreshed while this one waited.
            let rec = match self.store.get(key).await {
                Ok(Some(current)) => current,
                Ok(None) => return Err(Stale::Ended),
                Err(e) => return Err(Stale::Unavailable(e)),
            };
            if !self.due(&rec, (self.clock)()) {
                return Ok(rec);
            }
            match self.store.lock(key, REFRESH_LOCK).await {
                Ok(true) => {
                    let result = self.refresh_now(key, rec).await;
                    self.store.unlock(key).await;
                    return result;
                }
                Ok(false) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(false) => {
                    return Err(Stale::Unavailable(
                        "another gateway's refresh did not finish".into(),
                    ))
                }
                Err(e) => return Err(Stale::Unavailable(e)),
            }
        }
    }

    async fn refresh_now(
        &self,
        key: &str,
        rec: SessionRecord,
    ) -> std::result::Result<SessionRecord, Stale> {
        let now = (self.clock)();
        let still_valid = rec.access_expires_at > now;
        let Some(refresh_token) = rec.refresh_token.clone() else {
            if still_valid {
                return Ok(rec);
            }
            return self.end_session(key).await;
        };
        let tokens = match self
            .provider
            .token(&[("grant_type", "refresh_token"), ("refresh_token", &refresh_token)])
            .await
        {
            Ok(t) => t,
            Err(e) if e.refused => {
                log::warn!("session {}: the provider refused the refresh, the session ends: {}", self.name, e.message);
                return self.end_session(key).await;
            }
            // The provider is down or failing: keep the session, and its token while valid.
            Err(e) => {
                self.count("refresh_error");
                log::warn!("session {}: token refresh failed: {}", self.name, e.message);
                return if still_valid {
                    Ok(rec)
                } else {
                    Err(Stale::Unavailable(e.message))
                };
            }
        };
        let mut next = rec;
        if let Some(id) = tokens.id_token {
            match self
                .provider
                .verify_refreshed_id_token(&id, &next.subject)
                .await
            {
                Ok(mut claims) => {
                    for c in PROTOCOL_CLAIMS {
                        claims.remove(c);
                    }
                    next.claims = claims;
                    next.id_token = id;
                }
                Err(reason) => {
                    log::warn!("session {}: refreshed ID token refused ({reason}), the session ends", self.name);
                    return self.end_session(key).await;
                }
            }
        }
        next.access_token = tokens.access_token;
        next.access_expires_at = now.saturating_add(tokens.expires_in.unwrap_or(300));
        if let Some(r) = tokens.refresh_token {
            next.refresh_token = Some(r);
        }
        next.version = next.version.saturating_add(1);
        let ttl = self.ttl(&next, now);
        match self.store.update(key, &next, ttl).await {
            Ok(true) => {
                self.count("refresh");
                Ok(next)
            }
            // Logged out meanwhile: the new tokens die with the session.
            Ok(false) => Err(Stale::Ended),
            Err(e) => Err(Stale::Unavailable(e)),
        }
    }

    /// The provider refused the refresh (or no token is left): the session is over.
    async fn end_session(&self, key: &str) -> std::result::Result<SessionRecord, Stale> {
        let _ = self.store.delete(key).await;
        self.count("refresh_error");
        Err(Stale::Ended)
    }

    /// How long the store keeps a session: until its idle or absolute timeout.
    fn ttl(&self, rec: &SessionRecord, now: u64) -> Duration {
        Duration::from_secs(expires_at(rec, self.idle, self.absolute).saturating_sub(now).max(1))
    }

    /// Every request on the plugin's routes that is not one of its own paths.
    async fn guard(
        &self,
        session: &mut HttpSession,
        ctx: &mut RequestCtx,
        state: &mut SessionState,
    ) -> Result<Flow> {
        let req = session.req_header();
        let (key, rec) = match self.lookup(req).await {
            Ok(Lookup::Live(k, r)) => (k, *r),
            Ok(Lookup::None) => return self.unauthenticated(session, ctx, "no session"),
            Ok(Lookup::Expired) => return self.unauthenticated(session, ctx, "the session expired"),
            Err(e) => return Ok(self.error(e)),
        };
        if req.method == Method::TRACE {
            // An echoing upstream would show the access token to the page.
            return Ok(self.error(
                ApiError::new(405, "method_not_allowed", "TRACE is not allowed with a session")
                    .with_header(http::header::ALLOW, "GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE"),
            ));
        }
        let safe = matches!(req.method, Method::GET | Method::HEAD | Method::OPTIONS);
        // A WebSocket handshake is a GET that carries the cookie cross-origin; browsers send
        // its Origin (they cannot add the CSRF header), so the origin is checked.
        let upgrade = req.headers.contains_key(http::header::UPGRADE);
        if upgrade && !origin_allowed(req, &self.trusted_origins) {
            self.count("csrf_rejected");
            return Ok(self.error(
                ApiError::new(403, "csrf", "upgrades need an allowed Origin").with_reason("csrf"),
            ));
        }
        if !safe && !self.csrf_ok(req) {
            self.count("csrf_rejected");
            return Ok(self.error(
                ApiError::new(
                    403,
                    "csrf",
                    format!(
                        "unsafe requests need the {} header and an allowed Origin",
                        self.csrf_header
                    ),
                )
                .with_reason("csrf"),
            ));
        }
        let mut rec = match self.fresh(&key, rec).await {
            Ok(rec) => rec,
            Err(Stale::Ended) => {
                return self.unauthenticated(session, ctx, "the session ended (refresh refused)")
            }
            Err(Stale::Unavailable(e)) => {
                log::warn!("session {}: cannot refresh now: {e}", self.name);
                return Ok(self.error(ApiError::new(
                    503,
                    "session_refresh_unavailable",
                    "the session's access token cannot be refreshed right now",
                )));
            }
        };
        let now = (self.clock)();
        // Writing `last_seen` on every request would cost a store write each: once per
        // twentieth of the idle timeout is precise enough. A lost race only skips one touch.
        if now.saturating_sub(rec.last_seen) >= (self.idle / 20).max(1) {
            let mut touched = rec.clone();
            touched.last_seen = now;
            touched.version = touched.version.saturating_add(1);
            if let Ok(true) = self.store.update(&key, &touched, self.ttl(&touched, now)).await {
                rec = touched;
            }
        }
        let bearer = format!("Bearer {}", rec.access_token);
        let value = HeaderValue::from_str(&bearer).map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InternalError, "access token", e)
        })?;
        ctx.identity_headers
            .push((http::header::AUTHORIZATION, value));
        ctx.principal = Some(Principal {
            subject: Some(rec.subject.clone()),
            claims: Arc::new(rec.claims),
            verified_by: "session",
        });
        let _ = state;
        // Later plugins (an aggregate forwarding `cookie`) never see the gateway's cookies.
        cookies::strip_cookies(
            session.req_header_mut(),
            &[&self.cookie, &self.login_cookie],
        )?;
        Ok(Flow::Continue)
    }

    /// `GET user`: the profile claims and when the session ends.
    async fn user(&self, session: &HttpSession, ctx: &RequestCtx) -> Result<Flow> {
        let (_, rec) = match self.lookup(session.req_header()).await {
            Ok(Lookup::Live(k, r)) => (k, *r),
            Ok(Lookup::None) => return self.unauthenticated(session, ctx, "no session"),
            Ok(Lookup::Expired) => return self.unauthenticated(session, ctx, "the session expired"),
            Err(e) => return Ok(self.error(e)),
        };
        let profile: Map<String, Value> = rec
            .claims
            .iter()
            .filter(|(k, _)| PROFILE_CLAIMS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = json!({
            "sub": rec.subject,
            "claims": profile,
            "expires_at": expires_at(&rec, self.idle, self.absolute),
        });
        Ok(Flow::Respond(json_reply(200, &body, &[])?))
    }

    /// `POST logout` (with the CSRF defences): ends the session here and its refresh token at
    /// the provider, clears the cookie, and returns the provider's end-session URL.
    async fn logout(&self, session: &HttpSession, ctx: &RequestCtx) -> Result<Flow> {
        let req = session.req_header();
        if req.method != Method::POST {
            return Ok(self.error(
                ApiError::new(405, "method_not_allowed", "logout is POST only")
                    .with_header(http::header::ALLOW, "POST"),
            ));
        }
        if !self.csrf_ok(req) {
            self.count("csrf_rejected");
            return Ok(self.error(
                ApiError::new(403, "csrf", format!("logout needs the {} header and an allowed Origin", self.csrf_header))
                    .with_reason("csrf"),
            ));
        }
        let _ = ctx;
        let back = format!("{}{}", self.origin(session), self.return_to(req));
        let mut logout_url = Value::Null;
        let found = match self.lookup(req).await {
            Ok(found) => found,
            Err(e) => return Ok(self.error(e)),
        };
        if let Lookup::Live(key, rec) = found {
            if let Err(e) = self.store.delete(&key).await {
                return Ok(self.error(self.store_unavailable(&e)));
            }
            if let Some(rt) = &rec.refresh_token {
                self.provider.revoke(rt).await;
            }
            if let Ok(meta) = self.provider.metadata().await {
                if let Some(end) = meta.end_session_endpoint.as_deref().and_then(|e| reqwest::Url::parse(e).ok()) {
                    let mut url = end;
                    url.query_pairs_mut()
                        .append_pair("id_token_hint", &rec.id_token)
                        .append_pair("client_id", &self.client_id)
                        .append_pair("post_logout_redirect_uri", &back);
                    logout_url = Value::String(url.into());
                }
            }
            self.count("logout");
        }
        let body = json!({ "logged_out": true, "logout_url": logout_url, "return_to": back });
        Ok(Flow::Respond(json_reply(200, &body, &[self.clear(&self.cookie)])?))
    }

    /// `POST backchannel_logout` from the provider: a signed logout token ends the sessions
    /// of its `sid` (or `sub`), across the fleet with the Redis store.
    async fn backchannel(&self, session: &mut HttpSession) -> Result<Flow> {
        if session.req_header().method != Method::POST {
            return Ok(self.error(
                ApiError::new(405, "method_not_allowed", "back-channel logout is POST only")
                    .with_header(http::header::ALLOW, "POST"),
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await? {
            if body.len() + chunk.len() > MAX_LOGOUT_BODY {
                return Ok(self.error(ApiError::new(413, "payload_too_large", "logout request too large")));
            }
            body.extend_from_slice(&chunk);
        }
        let token = String::from_utf8_lossy(&body)
            .split('&')
            .find_map(|pair| pair.strip_prefix("logout_token=").map(|t| {
                percent_encoding::percent_decode_str(t).decode_utf8_lossy().into_owned()
            }));
        let invalid = |why: &str| {
            json_reply(400, &json!({"error": "invalid_request", "error_description": why}), &[])
        };
        let Some(token) = token else {
            return Ok(Flow::Respond(invalid("no logout_token")?));
        };
        let claims = match self.provider.verify_logout_token(&token).await {
            Ok(c) => c,
            Err(reason) => {
                log::warn!("session {}: back-channel logout token refused: {reason}", self.name);
                return Ok(Flow::Respond(invalid("the logout token is not valid")?));
            }
        };
        // A logout token is good once (Back-Channel Logout 1.0 section 2.6).
        let jti = claims.get("jti").and_then(Value::as_str).unwrap_or_default();
        match self
            .store
            .first_use(&store_key(jti), Duration::from_secs(600))
            .await
        {
            Ok(true) => {}
            Ok(false) => return Ok(Flow::Respond(invalid("the logout token was used before")?)),
            Err(e) => return Ok(self.error(self.store_unavailable(&e))),
        }
        let sid = claims.get("sid").and_then(Value::as_str);
        let sub = claims.get("sub").and_then(Value::as_str);
        match self.store.delete_matching(sid, sub).await {
            Ok(n) => {
                for _ in 0..n {
                    self.count("logout");
                }
                let mut header = ResponseHeader::build(200, Some(1))?;
                no_store(&mut header)?;
                Ok(Flow::Respond(Reply::Full {
                    header: Box::new(header),
                    body: Bytes::new(),
                }))
            }
            Err(e) => Ok(self.error(self.store_unavailable(&e))),
        }
    }
}

#[async_trait]
impl Plugin for Session {
    type State = SessionState;

    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn start(&self) {
        if let Err(e) = self.provider.metadata().await {
            log::warn!(
                "session {}: OpenID provider discovery failed ({e}); retrying on the first login",
                self.name
            );
        }
    }

    async fn request_filter(
        &self,
        session: &mut HttpSession,
        ctx: &mut RequestCtx,
        state: &mut Self::State,
    ) -> Result<Flow> {
        let p = &self.paths;
        let path = ctx.path.as_str();
        if path == p.login {
            self.login(session).await
        } else if path == p.callback {
            self.callback(session).await
        } else if path == p.logout {
            self.logout(session, ctx).await
        } else if path == p.user {
            self.user(session, ctx).await
        } else if path == p.backchannel_logout {
            self.backchannel(session).await
        } else {
            self.guard(session, ctx, state).await
        }
    }
}

impl crate::PluginType for SessionConfig {
    const KIND: &'static str = "session";
    const RESPONDS: bool = true;

    fn validate(&self) -> Vec<BuildError> {
        self.problems()
    }

    /// Sessions (memory store) and the provider's keys outlive a reload of an unchanged
    /// config: a SIGHUP logs nobody out.
    fn keeps_state_across_reloads(&self) -> bool {
        true
    }

    /// The session and login cookies never reach an upstream, on any route.
    fn gateway_cookies(&self) -> Vec<String> {
        vec![self.cookie.clone(), format!("{}_login", self.cookie)]
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let mut errors = self.problems();
        let keys = match std::env::var(&self.cookie_keys_env) {
            Ok(v) => CookieKeys::parse(&v)
                .map_err(|e| errors.push(BuildError::new("cookie_keys_env", format!("${}: {e}", self.cookie_keys_env))))
                .ok(),
            Err(_) => {
                errors.push(BuildError::new(
                    "cookie_keys_env",
                    format!("the environment variable {} is not set", self.cookie_keys_env),
                ));
                None
            }
        };
        let secret = match &self.client_secret_env {
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.is_empty() => Some(s),
                _ => {
                    errors.push(BuildError::new(
                        "client_secret_env",
                        format!("the environment variable {var} is not set"),
                    ));
                    None
                }
            },
            None => None,
        };
        let client_key = match (&self.client_auth, &self.client_key_file) {
            (Some(ClientAuth::PrivateKeyJwt), Some(path)) => {
                let alg = match self.client_key_algorithm.as_str() {
                    "EdDSA" => jsonwebtoken::Algorithm::EdDSA,
                    "RS256" => jsonwebtoken::Algorithm::RS256,
                    _ => jsonwebtoken::Algorithm::ES256,
                };
                match std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}")).and_then(|text| {
                    crate::identity_token::keys::SigningKey::from_pem(&text, alg, self.client_key_id.as_deref())
                        .map_err(|e| format!("{path}: {e}"))
                }) {
                    Ok(k) => Some(Arc::new(k)),
                    Err(e) => {
                        errors.push(BuildError::new("client_key_file", e));
                        None
                    }
                }
            }
            _ => None,
        };
        let credentials = match (self.client_auth, secret) {
            (Some(ClientAuth::None), _) => ClientCredentials::Public,
            (Some(ClientAuth::PrivateKeyJwt), _) => match client_key {
                Some(k) => ClientCredentials::PrivateKeyJwt(k),
                None => ClientCredentials::Public,
            },
            (Some(ClientAuth::ClientSecretPost), Some(s)) => ClientCredentials::Post(s),
            (_, Some(s)) => ClientCredentials::Basic(s),
            (_, None) => ClientCredentials::Public,
        };
        let provider = Provider::new(
            &self.issuer,
            &self.client_id,
            credentials,
            self.discovery_refresh.get(),
            self.leeway.get(),
        )
        .map_err(|e| errors.push(BuildError::new("issuer", e)))
        .ok();
        let store = match self.store {
            StoreKind::Memory => Some(Store::Memory(MemoryStore::new(self.max_sessions))),
            StoreKind::Redis => match self.redis_target() {
                Ok(Some(target)) => RedisSessions::new(
                    &target,
                    self.redis_timeout.get(),
                    format!("sallyport:session:{}", env.name),
                    self.absolute_timeout.get(),
                )
                .map(|r| Store::Redis(Box::new(r)))
                .map_err(|e| errors.push(BuildError::new("redis_url", e)))
                .ok(),
                // validate() reported it.
                _ => None,
            },
        };
        let csrf_header = HeaderName::from_bytes(self.csrf_header.as_bytes()).ok();
        let events = env
            .registry
            .counter(
                "events_total",
                "Browser session events (login, callback_ok, callback_error, refresh, refresh_error, logout, expired, csrf_rejected).",
                &["plugin", "event"],
            )
            .map_err(|e| errors.push(e))
            .ok();
        let (Some(keys), Some(provider), Some(store), Some(csrf_header), Some(events), true) =
            (keys, provider, store, csrf_header, events, errors.is_empty())
        else {
            return Err(errors);
        };
        for e in EVENTS {
            events.with_label_values(&[&*env.name, e]);
        }
        Ok(Erased::into_dyn(Session {
            name: Arc::clone(&env.name),
            paths: self.paths.clone(),
            provider: Arc::new(provider),
            keys,
            style: CookieStyle {
                secure: self.secure,
                same_site: match self.same_site {
                    SameSite::Lax => cookie::SameSite::Lax,
                    SameSite::Strict => cookie::SameSite::Strict,
                },
            },
            login_cookie: format!("{}_login", self.cookie),
            cookie: self.cookie.clone(),
            client_id: self.client_id.clone(),
            scopes: self.scopes.join(" "),
            public_url: self.public_url.clone(),
            return_to: self.return_to.clone(),
            store,
            idle: self.idle_timeout.get().as_secs().max(1),
            absolute: self.absolute_timeout.get().as_secs().max(1),
            refresh_before: self.refresh_before.get().as_secs(),
            login_timeout: self.login_timeout.get().as_secs().max(1),
            trusted_origins: self.trusted_origins.clone(),
            csrf_header,
            events,
            refreshing: Mutex::new(HashMap::new()),
            clock: unix_now,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(created: u64, seen: u64) -> SessionRecord {
        SessionRecord {
            subject: "alice".into(),
            idp_sid: None,
            claims: Map::new(),
            id_token: String::new(),
            access_token: String::new(),
            access_expires_at: 0,
            refresh_token: None,
            created_at: created,
            last_seen: seen,
            version: 0,
        }
    }

    #[test]
    fn sessions_end_at_the_idle_or_the_absolute_timeout() {
        // Idle 30 min, absolute 12 h; times in seconds from an injected clock.
        let (idle, absolute) = (1800, 43_200);
        let r = rec(1_000, 1_000);
        assert!(!expired(&r, 1_000 + 1_799, idle, absolute));
        assert!(expired(&r, 1_000 + 1_800, idle, absolute), "idle");
        let busy = rec(1_000, 1_000 + 43_000);
        assert!(!expired(&busy, 1_000 + 43_199, idle, absolute));
        assert!(expired(&busy, 1_000 + 43_200, idle, absolute), "absolute, used or not");
        assert_eq!(expires_at(&busy, idle, absolute), 1_000 + 43_200);
        assert_eq!(expires_at(&r, idle, absolute), 1_000 + 1_800);
    }

    /// RFC 7636 appendix B.
    #[test]
    fn pkce_challenge_is_s256_of_the_verifier() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn return_to_admits_only_listed_local_paths() {
        let allowed = vec!["/".to_string(), "/app/".to_string()];
        let only_app = vec!["/app/".to_string()];
        assert_eq!(allowed_return_to("/app/orders?x=1", &only_app).as_deref(), Some("/app/orders?x=1"));
        assert_eq!(allowed_return_to("/", &allowed).as_deref(), Some("/"));
        assert_eq!(allowed_return_to("/admin", &allowed), None, "`/` admits only the root");
        for evil in [
            "https://evil.example/",
            "//evil.example",
            "/\\evil.example",
            "%2F%2Fevil.example",
            "/%2fevil.example",
            "/app/../admin",
            "javascript:alert(1)",
            "/admin",
        ] {
            assert_eq!(allowed_return_to(evil, &only_app), None, "{evil}");
        }
    }

    #[test]
    fn unsafe_requests_need_a_trusted_origin_or_referer() {
        let trusted = vec!["https://app.example.com".to_string()];
        let with = |name: &str, value: &str| {
            let mut r = RequestHeader::build("POST", b"/api", None).unwrap();
            r.insert_header(name.to_string(), value).unwrap();
            r
        };
        assert!(origin_allowed(&with("origin", "https://app.example.com"), &trusted));
        assert!(!origin_allowed(&with("origin", "https://evil.example"), &trusted));
        assert!(!origin_allowed(&with("origin", "null"), &trusted));
        assert!(origin_allowed(&with("referer", "https://app.example.com/page?q=1"), &trusted));
        assert!(!origin_allowed(&with("referer", "https://app.example.com.evil.example/"), &trusted));
        let bare = RequestHeader::build("POST", b"/api", None).unwrap();
        assert!(!origin_allowed(&bare, &trusted));
    }
}
