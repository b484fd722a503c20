//! A small OpenID provider for the session plugin's tests and demo. It implements what a
//! real one checks, so the gateway's login is tested against the protocol, not a stub:
//!
//! | request | answer |
//! |---|---|
//! | `GET /.well-known/openid-configuration` | discovery (issuer = this server's URL) |
//! | `GET /jwks` | the ES256 signing key |
//! | `GET /authorize` | checks `client_id`, `redirect_uri`, `response_type=code`, PKCE `S256`; signs in `login_hint` (default `alice`) at once: 302 to `redirect_uri?code&state` |
//! | `POST /token` | client auth (Basic or post); `authorization_code`: single-use code, same `redirect_uri`, `code_verifier` whose S256 is the challenge; `refresh_token` (rotated) |
//! | `POST /revoke` | RFC 7009: the refresh token stops working |
//! | `GET /end_session` | RP-initiated logout: 200 |
//! | `POST /test/logout-token` | a signed back-channel logout token for `sid=` or `sub=` (test helper) |
//! | `GET /test/stats` | counters: `authorize`, `codes_redeemed`, `refreshes`, `revocations`, `pkce_failures` |
//!
//! Tokens: the first access token lives `first_ttl` seconds, refreshed ones `refresh_ttl`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

/// The demo signing key (public, demo-only; also in `conf/demo-keys/`).
const SIGNING_KEY: &[u8] = include_bytes!("../../conf/demo-keys/demo-es256.pem");
const KID: &str = "mock-oidc-es256";

/// How the provider behaves.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub client_id: String,
    pub client_secret: String,
    /// Redirect URIs the client registered; empty accepts any (the demo's).
    pub redirect_uris: Vec<String>,
    /// Lifetime of the access token a login gets, seconds.
    pub first_ttl: u64,
    /// Lifetime of a refreshed access token, seconds.
    pub refresh_ttl: u64,
    /// Put this `nonce` in ID tokens instead of the one the login sent (a replayed token).
    pub replay_nonce: Option<String>,
    /// The client's public JWK for `private_key_jwt` (RFC 7523): with it, the client must
    /// authenticate with a signed assertion instead of the secret.
    pub client_jwk: Option<Value>,
}

impl Default for OidcConfig {
    fn default() -> Self {
        OidcConfig {
            client_id: "web".into(),
            client_secret: "web-secret".into(),
            redirect_uris: Vec::new(),
            first_ttl: 3600,
            refresh_ttl: 3600,
            replay_nonce: None,
            client_jwk: None,
        }
    }
}

struct Grant {
    redirect_uri: String,
    challenge: String,
    nonce: String,
    sub: String,
    sid: String,
}

struct State {
    cfg: OidcConfig,
    issuer: String,
    key: EncodingKey,
    jwks: Value,
    codes: Mutex<HashMap<String, Grant>>,
    /// Live refresh tokens: token -> (sub, sid).
    refresh: Mutex<HashMap<String, (String, String)>>,
    authorize: AtomicUsize,
    codes_redeemed: AtomicUsize,
    refreshes: AtomicUsize,
    revocations: AtomicUsize,
    pkce_failures: AtomicUsize,
}

/// A running provider; stops when dropped.
pub struct OidcProvider {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

fn random() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `application/x-www-form-urlencoded` pairs (also a query string).
pub fn form(text: &str) -> HashMap<String, String> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

impl OidcProvider {
    /// Starts on an ephemeral loopback port.
    pub async fn start(cfg: OidcConfig) -> std::io::Result<OidcProvider> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        Self::from_listener(listener, cfg)
    }

    /// Serves on a bound listener; the issuer is `http://ADDR`.
    pub fn from_listener(listener: TcpListener, cfg: OidcConfig) -> std::io::Result<OidcProvider> {
        let addr = listener.local_addr()?;
        let key = EncodingKey::from_ec_pem(SIGNING_KEY).map_err(std::io::Error::other)?;
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(std::io::Error::other)?;
        jwk.common.key_id = Some(KID.into());
        let jwks = json!({ "keys": [jwk] });
        let state = Arc::new(State {
            cfg,
            issuer: format!("http://{addr}"),
            key,
            jwks,
            codes: Mutex::new(HashMap::new()),
            refresh: Mutex::new(HashMap::new()),
            authorize: AtomicUsize::new(0),
            codes_redeemed: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
            revocations: AtomicUsize::new(0),
            pkce_failures: AtomicUsize::new(0),
        });
        let served = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&served);
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(OidcProvider { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The issuer URL, `http://ADDR`.
    pub fn issuer(&self) -> String {
        self.state.issuer.clone()
    }

    /// A signed back-channel logout token for a provider session or a subject.
    pub fn logout_token(&self, sid: Option<&str>, sub: Option<&str>) -> String {
        logout_token(&self.state, sid, sub)
    }

    /// `(authorize, codes_redeemed, refreshes, revocations, pkce_failures)`.
    pub fn stats(&self) -> (usize, usize, usize, usize, usize) {
        let s = &self.state;
        (
            s.authorize.load(Ordering::SeqCst),
            s.codes_redeemed.load(Ordering::SeqCst),
            s.refreshes.load(Ordering::SeqCst),
            s.revocations.load(Ordering::SeqCst),
            s.pkce_failures.load(Ordering::SeqCst),
        )
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn sign(state: &State, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(KID.into());
    jsonwebtoken::encode(&header, claims, &state.key).unwrap_or_default()
}

fn logout_token(state: &State, sid: Option<&str>, sub: Option<&str>) -> String {
    let mut claims = json!({
        "iss": state.issuer, "aud": state.cfg.client_id, "iat": now(), "exp": now() + 120,
        "jti": random(),
        "events": { "http://schemas.openid.net/event/backchannel-logout": {} },
    });
    if let Some(sid) = sid {
        claims["sid"] = json!(sid);
    }
    if let Some(sub) = sub {
        claims["sub"] = json!(sub);
    }
    sign(state, &claims)
}

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn json_reply(status: u16, v: &Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", v.to_string())
}

fn oauth_error(code: &str) -> Response<Full<Bytes>> {
    json_reply(400, &json!({ "error": code }))
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let query = form(parts.uri.query().unwrap_or(""));
    let fields = form(&String::from_utf8_lossy(&body));
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/.well-known/openid-configuration") => {
            let i = &state.issuer;
            json_reply(
                200,
                &json!({
                    "issuer": i,
                    "authorization_endpoint": format!("{i}/authorize"),
                    "token_endpoint": format!("{i}/token"),
                    "jwks_uri": format!("{i}/jwks"),
                    "revocation_endpoint": format!("{i}/revoke"),
                    "end_session_endpoint": format!("{i}/end_session"),
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["ES256"],
                    "code_challenge_methods_supported": ["S256"],
                    "backchannel_logout_supported": true,
                    "backchannel_logout_session_supported": true,
                }),
            )
        }
        ("GET", "/jwks") => json_reply(200, &state.jwks),
        ("GET", "/authorize") => authorize(state, &query),
        ("POST", "/token") => token(state, &parts.headers, &fields),
        ("POST", "/revoke") => {
            if !client_ok(state, &parts.headers, &fields) {
                return json_reply(401, &json!({ "error": "invalid_client" }));
            }
            if let Some(t) = fields.get("token") {
                if state
                    .refresh
                    .lock()
                    .map(|mut m| m.remove(t).is_some())
                    .unwrap_or(false)
                {
                    state.revocations.fetch_add(1, Ordering::SeqCst);
                }
            }
            reply(200, "text/plain", "")
        }
        ("GET", "/end_session") => reply(200, "text/plain", "signed out"),
        ("POST", "/test/logout-token") => reply(
            200,
            "application/jwt",
            logout_token(
                state,
                fields.get("sid").map(String::as_str),
                fields.get("sub").map(String::as_str),
            ),
        ),
        ("GET", "/test/stats") => {
            let (a, c, r, v, p) = (
                state.authorize.load(Ordering::SeqCst),
                state.codes_redeemed.load(Ordering::SeqCst),
                state.refreshes.load(Ordering::SeqCst),
                state.revocations.load(Ordering::SeqCst),
                state.pkce_failures.load(Ordering::SeqCst),
            );
            json_reply(
                200,
                &json!({"authorize": a, "codes_redeemed": c, "refreshes": r, "revocations": v, "pkce_failures": p}),
            )
        }
        _ => json_reply(404, &json!({ "error": "not_found" })),
    }
}

fn authorize(state: &State, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != state.cfg.client_id {
        return reply(400, "text/plain", "unknown client_id");
    }
    let redirect_uri = get("redirect_uri");
    if !state.cfg.redirect_uris.is_empty() && !state.cfg.redirect_uris.contains(&redirect_uri) {
        return reply(400, "text/plain", "redirect_uri not registered");
    }
    if get("response_type") != "code" {
        return reply(400, "text/plain", "response_type must be code");
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").len() < 43 {
        return reply(400, "text/plain", "PKCE S256 is required");
    }
    if !get("scope").split(' ').any(|s| s == "openid") {
        return reply(400, "text/plain", "scope must include openid");
    }
    state.authorize.fetch_add(1, Ordering::SeqCst);
    let code = random();
    let sub = q
        .get("login_hint")
        .cloned()
        .unwrap_or_else(|| "alice".into());
    if let Ok(mut codes) = state.codes.lock() {
        codes.insert(
            code.clone(),
            Grant {
                redirect_uri: redirect_uri.clone(),
                challenge: get("code_challenge"),
                nonce: get("nonce"),
                sub,
                sid: random(),
            },
        );
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let location = format!(
        "{redirect_uri}{sep}code={}&state={}",
        enc(&code),
        enc(&get("state"))
    );
    let mut r = reply(302, "text/plain", "");
    if let Ok(v) = location.parse() {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
}

/// Client authentication: HTTP Basic, `client_secret_post`, or (with `client_jwk`) only
/// `private_key_jwt`: an assertion signed by the client's key, `iss` = `sub` = client id,
/// `aud` this provider's token or revocation endpoint, not expired.
fn client_ok(state: &State, headers: &http::HeaderMap, f: &HashMap<String, String>) -> bool {
    if let Some(jwk) = &state.cfg.client_jwk {
        let jwt_bearer = f.get("client_assertion_type").map(String::as_str)
            == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
        let (Some(assertion), true) = (f.get("client_assertion"), jwt_bearer) else {
            return false;
        };
        let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(jwk.clone()) else {
            return false;
        };
        let (Ok(key), Ok(header)) = (
            jsonwebtoken::DecodingKey::from_jwk(&jwk),
            jsonwebtoken::decode_header(assertion),
        ) else {
            return false;
        };
        let mut v = jsonwebtoken::Validation::new(header.alg);
        v.set_audience(&[
            format!("{}/token", state.issuer),
            format!("{}/revoke", state.issuer),
        ]);
        v.set_issuer(&[state.cfg.client_id.as_str()]);
        v.sub = Some(state.cfg.client_id.clone());
        return jsonwebtoken::decode::<Value>(assertion, &key, &v).is_ok();
    }
    let basic = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let (id, secret) = match basic {
        // RFC 6749 section 2.3.1: both parts are form-urlencoded inside Basic.
        Some(pair) => match pair.split_once(':') {
            Some((i, s)) => {
                let dec = |v: &str| {
                    percent_encoding::percent_decode_str(&v.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned()
                };
                (dec(i), dec(s))
            }
            None => return false,
        },
        None => (
            f.get("client_id").cloned().unwrap_or_default(),
            f.get("client_secret").cloned().unwrap_or_default(),
        ),
    };
    id == state.cfg.client_id && secret == state.cfg.client_secret
}

fn token(
    state: &State,
    headers: &http::HeaderMap,
    f: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    if !client_ok(state, headers, f) {
        return json_reply(401, &json!({ "error": "invalid_client" }));
    }
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    match get("grant_type").as_str() {
        "authorization_code" => {
            let Some(grant) = state
                .codes
                .lock()
                .ok()
                .and_then(|mut c| c.remove(&get("code")))
            else {
                return oauth_error("invalid_grant");
            };
            if grant.redirect_uri != get("redirect_uri") {
                return oauth_error("invalid_grant");
            }
            let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(Sha256::digest(get("code_verifier").as_bytes()));
            if challenge != grant.challenge {
                state.pkce_failures.fetch_add(1, Ordering::SeqCst);
                return oauth_error("invalid_grant");
            }
            state.codes_redeemed.fetch_add(1, Ordering::SeqCst);
            let t = now();
            let id_token = sign(
                state,
                &json!({
                    "iss": state.issuer, "aud": state.cfg.client_id, "sub": grant.sub,
                    "iat": t, "exp": t + 300,
                    "nonce": state.cfg.replay_nonce.clone().unwrap_or(grant.nonce),
                    "sid": grant.sid,
                    "name": format!("{} Example", grant.sub), "email": format!("{}@example.test", grant.sub),
                    "email_verified": true, "tenant": "acme",
                }),
            );
            let refresh = random();
            if let Ok(mut m) = state.refresh.lock() {
                m.insert(refresh.clone(), (grant.sub.clone(), grant.sid.clone()));
            }
            json_reply(
                200,
                &json!({
                    "access_token": format!("at-{}-{}", grant.sub, random()),
                    "token_type": "Bearer",
                    "expires_in": state.cfg.first_ttl,
                    "refresh_token": refresh,
                    "id_token": id_token,
                }),
            )
        }
        "refresh_token" => {
            let old = get("refresh_token");
            let Some((sub, sid)) = state.refresh.lock().ok().and_then(|mut m| m.remove(&old))
            else {
                return oauth_error("invalid_grant");
            };
            state.refreshes.fetch_add(1, Ordering::SeqCst);
            let refresh = random();
            if let Ok(mut m) = state.refresh.lock() {
                m.insert(refresh.clone(), (sub.clone(), sid));
            }
            json_reply(
                200,
                &json!({
                    "access_token": format!("at-{sub}-{}", random()),
                    "token_type": "Bearer",
                    "expires_in": state.cfg.refresh_ttl,
                    "refresh_token": refresh,
                }),
            )
        }
        _ => oauth_error("unsupported_grant_type"),
    }
}
