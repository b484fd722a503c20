//! The `session` plugin (browser BFF) against a real OpenID provider started by the test
//! (`sallyport_mock::oidc`: discovery, JWKS, authorize, token with a PKCE check, refresh,
//! revocation, end-session, logout tokens), with a client that keeps cookies by hand so every
//! cookie attribute is checked. OAuth 2.0 for Browser-Based Apps (token handler pattern),
//! RFC 7636 (PKCE), OpenID Connect Core 1.0 section 3.1, Back-Channel Logout 1.0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use sallyport_mock::oidc::{OidcConfig, OidcProvider};
use support::*;

const CLIENT_SECRET: &str = "web-secret";

fn key(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// A gateway with the session plugin on `/auth` and on `/api` (proxied to `upstream`).
fn config(provider: &OidcProvider, upstream: &Origin, extra: &str) -> String {
    format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.web]\ntype = \"session\"\nissuer = \"{}\"\nclient_id = \"web\"\n\
         client_secret_env = \"WEB_SECRET\"\ncookie = \"sp_session\"\nsecure = false\n\
         cookie_keys_env = \"SESSION_KEYS\"\nreturn_to = [\"/\", \"/app/\"]\n\
         trusted_origins = [\"http://app.test\"]\n{extra}\n\
         [[routes]]\nname = \"auth\"\npath_prefix = \"/auth\"\nplugins = [\"web\"]\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"app\"\nplugins = [\"web\"]\n\
         [[routes]]\nname = \"public\"\npath_prefix = \"/public\"\nupstream = \"app\"\n",
        server(""),
        upstream.addr,
        provider.issuer(),
    )
}

async fn start(config: &str, keys: &str) -> Gateway {
    Gateway::start_with_env(
        config,
        &[("WEB_SECRET", CLIENT_SECRET), ("SESSION_KEYS", keys)],
    )
    .await
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `name -> (value, attributes)` of every `Set-Cookie` of a response.
fn set_cookies(r: &reqwest::Response) -> BTreeMap<String, (String, String)> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            (name.to_string(), (value.to_string(), attrs.to_string()))
        })
        .collect()
}

fn location(r: &reqwest::Response) -> String {
    r.headers()["location"].to_str().unwrap().to_string()
}

/// The login as a browser does it: gateway login, provider authorize, gateway callback.
/// Returns the callback's response.
async fn login_response(gw: &Gateway, return_to: &str) -> reqwest::Response {
    let c = no_redirects();
    let r = c
        .get(gw.url(&format!("/auth/login?return_to={return_to}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let login_cookie = set_cookies(&r)["sp_session_login"].0.clone();
    let authorize = location(&r);
    let r = c.get(&authorize).send().await.unwrap();
    assert_eq!(
        r.status(),
        302,
        "the provider accepts the authorization request"
    );
    let callback = location(&r);
    c.get(&callback)
        .header("cookie", format!("sp_session_login={login_cookie}"))
        .send()
        .await
        .unwrap()
}

/// Logs in and returns the session cookie's value.
async fn login(gw: &Gateway) -> String {
    let r = login_response(gw, "/app/").await;
    if r.status() != 302 {
        panic!(
            "login failed: {} {}\n{}",
            r.status(),
            r.text().await.unwrap(),
            gw.stderr()
        );
    }
    set_cookies(&r)["sp_session"].0.clone()
}

fn api(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    session: &str,
) -> reqwest::RequestBuilder {
    no_redirects()
        .request(method, gw.url(path))
        .header("cookie", format!("theme=dark; sp_session={session}"))
}

#[tokio::test]
async fn login_flow_sets_an_httponly_session_and_proxies_with_bearer_only() {
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "orders")).await;
    let gw = start(&config(&provider, &upstream, ""), &key(1)).await;
    let c = no_redirects();

    // The authorization request carries PKCE S256, state and nonce.
    let r = c
        .get(gw.url("/auth/login?return_to=/app/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let authorize = reqwest::Url::parse(&location(&r)).unwrap();
    let q: BTreeMap<String, String> = authorize.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert!(q["state"].len() >= 32 && q["nonce"].len() >= 32);
    assert_eq!(q["redirect_uri"], gw.url("/auth/callback"));
    let cookies = set_cookies(&r);
    let (login_value, attrs) = &cookies["sp_session_login"];
    assert!(
        attrs.contains("HttpOnly") && attrs.contains("SameSite=Lax") && attrs.contains("Path=/"),
        "{attrs}"
    );
    assert!(
        !login_value.contains(&q["state"]),
        "the login state is sealed"
    );

    // Callback: a session cookie, the login cookie cleared, back to the allowed return_to.
    let r = login_response(&gw, "/app/").await;
    assert_eq!(r.status(), 302);
    assert_eq!(location(&r), "/app/");
    let cookies = set_cookies(&r);
    let (session, attrs) = &cookies["sp_session"];
    assert!(
        attrs.contains("HttpOnly") && attrs.contains("SameSite=Lax") && attrs.contains("Path=/"),
        "{attrs}"
    );
    assert!(cookies["sp_session_login"].1.contains("Max-Age=0"));
    assert!(session.len() > 40);

    // A proxied call: Bearer upstream, the session cookie stays at the gateway.
    let r = api(&gw, reqwest::Method::GET, "/api/orders", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.requests();
    let last = seen.last().unwrap();
    assert!(last
        .header("authorization")
        .unwrap()
        .starts_with("Bearer at-alice-"));
    assert_eq!(
        last.header("cookie"),
        Some("theme=dark"),
        "only the app's own cookies go upstream"
    );

    // A route without the plugin never forwards the gateway's cookies either.
    let r = api(&gw, reqwest::Method::GET, "/public/page", session)
        .header("cookie", "sp_session_login=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let public = upstream.requests().last().unwrap().clone();
    assert_eq!(public.header("cookie"), Some("theme=dark"));
    assert!(public.header("authorization").is_none());

    // TRACE would echo the token; a WebSocket handshake from another origin is refused.
    let r = api(&gw, reqwest::Method::TRACE, "/api/orders", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = api(&gw, reqwest::Method::GET, "/api/ws", session)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The user endpoint shows the profile and the session's end.
    let r = api(&gw, reqwest::Method::GET, "/auth/user", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let user = json(r).await;
    assert_eq!(user["sub"], "alice");
    assert_eq!(user["claims"]["email"], "alice@example.test");
    assert!(
        user["claims"].get("tenant").is_none(),
        "profile claims only"
    );
    assert!(user["expires_at"].as_u64().unwrap() > 0);

    // Without a session: JSON 401 for an API call, a redirect to login for a navigation.
    let r = c
        .get(gw.url("/api/orders"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"]["code"], "unauthenticated");
    let r = c
        .get(gw.url("/api/orders"))
        .header("accept", "text/html,*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert!(location(&r).starts_with("/auth/login"));

    // No token, code or cookie in any log line.
    let logs = format!("{}{}", gw.stderr(), gw.stdout());
    assert!(
        !logs.contains(session.as_str()) && !logs.contains("at-alice-"),
        "{logs}"
    );
    assert_eq!(
        gw.metric_value("sallyport_session_events_total{event=\"callback_ok\",plugin=\"web\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn bad_callbacks_and_open_redirects_are_refused() {
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = start(&config(&provider, &upstream, ""), &key(1)).await;
    let c = no_redirects();
    let begin = |return_to: &'static str| {
        let c = c.clone();
        let url = gw.url(&format!("/auth/login?return_to={return_to}"));
        async move {
            let r = c.get(url).send().await.unwrap();
            let cookie = set_cookies(&r)["sp_session_login"].0.clone();
            let r = c.get(location(&r)).send().await.unwrap();
            let callback = reqwest::Url::parse(&location(&r)).unwrap();
            (cookie, callback)
        }
    };
    let param = |u: &reqwest::Url, k: &str| {
        u.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    let call = |url: String, cookie: String| {
        let c = c.clone();
        async move {
            c.get(url)
                .header("cookie", format!("sp_session_login={cookie}"))
                .send()
                .await
                .unwrap()
        }
    };

    // State mismatch.
    let (cookie, cb) = begin("/app/").await;
    let forged = format!(
        "{}?code={}&state=forged-state",
        gw.url("/auth/callback"),
        param(&cb, "code")
    );
    let r = call(forged, cookie).await;
    assert_eq!(r.status(), 400);
    assert_eq!(json(r).await["error"]["code"], "login_failed");

    // PKCE mismatch: login A's code redeemed with login B's cookie (B's verifier).
    let (_cookie_a, cb_a) = begin("/app/").await;
    let (cookie_b, cb_b) = begin("/app/").await;
    let mixed = format!(
        "{}?code={}&state={}",
        gw.url("/auth/callback"),
        param(&cb_a, "code"),
        param(&cb_b, "state")
    );
    let r = call(mixed, cookie_b).await;
    assert_eq!(r.status(), 400);
    assert_eq!(provider.stats().4, 1, "the provider saw a PKCE mismatch");

    // Replay: a completed callback used again (same code, same login cookie) is refused.
    let (cookie, cb) = begin("/app/").await;
    assert_eq!(call(cb.to_string(), cookie.clone()).await.status(), 302);
    assert_eq!(call(cb.to_string(), cookie).await.status(), 400);

    // No login cookie at all.
    let (_, cb) = begin("/app/").await;
    let r = c.get(cb.as_str()).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // Open redirects: anything but a listed local path returns to the default.
    for evil in [
        "https://evil.example/",
        "//evil.example",
        "/%2F%2Fevil.example",
        "/admin",
    ] {
        let encoded = percent_encode(evil);
        let r = login_response(&gw, &encoded).await;
        assert_eq!(r.status(), 302, "{evil}");
        assert_eq!(location(&r), "/", "{evil}");
    }
    let r = login_response(&gw, "/app/orders%3Fx%3D1").await;
    assert_eq!(location(&r), "/app/orders?x=1");
    assert!(
        gw.metric_value("sallyport_session_events_total{event=\"callback_error\",plugin=\"web\"}")
            .await
            >= 4.0
    );
}

/// An ID token minted for another login (its `nonce` is not this login's) is refused, even
/// though its signature, issuer and audience are right (OIDC Core 1.0 section 3.1.3.7 #11).
#[tokio::test]
async fn an_id_token_with_another_logins_nonce_is_refused() {
    let provider = OidcProvider::start(OidcConfig {
        replay_nonce: Some("nonce-of-an-earlier-login".into()),
        ..OidcConfig::default()
    })
    .await
    .unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = start(&config(&provider, &upstream, ""), &key(1)).await;
    let r = login_response(&gw, "/app/").await;
    assert_eq!(r.status(), 400);
    assert!(!set_cookies(&r).contains_key("sp_session"), "no session");
    assert!(gw.stderr().contains("ID token refused: bad_nonce"));
    assert_eq!(
        provider.stats().1,
        1,
        "the code was redeemed, the token then refused"
    );
}

/// `private_key_jwt` (RFC 7523, OIDC Core section 9): the gateway authenticates to the
/// token and revocation endpoints with an assertion signed by its key; the provider accepts
/// nothing else from this client.
#[tokio::test]
async fn private_key_jwt_authenticates_the_gateway_without_a_secret() {
    let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let signing = sallyport_plugins::identity_token::keys::SigningKey::from_pem(
        &pem,
        jsonwebtoken::Algorithm::ES256,
        None,
    )
    .unwrap();
    let provider = OidcProvider::start(OidcConfig {
        client_jwk: Some(signing.jwk.clone()),
        ..OidcConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("client.pem");
    std::fs::write(&key_file, pem).unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let cfg = config(
        &provider,
        &upstream,
        &format!(
            "client_auth = \"private_key_jwt\"\nclient_key_file = \"{}\"",
            key_file.display()
        ),
    )
    .replace("client_secret_env = \"WEB_SECRET\"\n", "");
    let gw = Gateway::start_with_env(&cfg, &[("SESSION_KEYS", &key(1))]).await;
    let session = login(&gw).await;
    assert_eq!(
        api(&gw, reqwest::Method::GET, "/api/x", &session)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Revocation at logout is authenticated the same way.
    let r = api(&gw, reqwest::Method::POST, "/auth/logout", &session)
        .header("x-csrf", "1")
        .header("origin", "http://app.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(provider.stats().3, 1, "revoked with the assertion");
}

/// Plugins after `session` see its principal: `authorize` checks the ID token's claims.
#[tokio::test]
async fn later_plugins_see_the_sessions_principal() {
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let extra = "[plugins.acme-only]\ntype = \"authorize\"\nclaims = { tenant = \"acme\" }\n\
                 [plugins.globex-only]\ntype = \"authorize\"\nclaims = { tenant = \"globex\" }\n\
                 [[routes]]\nname = \"acme\"\npath_prefix = \"/acme\"\nupstream = \"app\"\nplugins = [\"web\", \"acme-only\"]\n\
                 [[routes]]\nname = \"globex\"\npath_prefix = \"/globex\"\nupstream = \"app\"\nplugins = [\"web\", \"globex-only\"]\n";
    let cfg = format!("{}{extra}", config(&provider, &upstream, ""));
    let gw = start(&cfg, &key(1)).await;
    let session = login(&gw).await;
    let r = api(&gw, reqwest::Method::GET, "/acme/x", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = api(&gw, reqwest::Method::GET, "/globex/x", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn unsafe_methods_need_the_csrf_header_and_a_trusted_origin() {
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = start(&config(&provider, &upstream, ""), &key(1)).await;
    let session = login(&gw).await;
    let post = || api(&gw, reqwest::Method::POST, "/api/orders", &session).body("{}");

    let r = post()
        .header("origin", "http://app.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "no CSRF header");
    assert_eq!(json(r).await["error"]["code"], "csrf");
    let r = post()
        .header("x-csrf", "1")
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "foreign origin");
    let r = post().header("x-csrf", "1").send().await.unwrap();
    assert_eq!(r.status(), 403, "neither Origin nor Referer");
    let r = post()
        .header("x-csrf", "1")
        .header("origin", "http://app.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post()
        .header("x-csrf", "1")
        .header("referer", "http://app.test/page")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a same-origin Referer will do without Origin"
    );
    assert_eq!(upstream.hits(), 2);
    assert_eq!(
        gw.metric_value("sallyport_session_events_total{event=\"csrf_rejected\",plugin=\"web\"}")
            .await,
        3.0
    );
}

/// The access token expires within `refresh_before`: twenty concurrent requests cause exactly
/// one refresh, and all of them go upstream with the new token.
#[tokio::test]
async fn near_expiry_twenty_concurrent_requests_refresh_once() {
    let provider = OidcProvider::start(OidcConfig {
        first_ttl: 30,
        refresh_ttl: 3600,
        ..OidcConfig::default()
    })
    .await
    .unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = start(
        &config(&provider, &upstream, "refresh_before = \"60s\""),
        &key(1),
    )
    .await;
    let session = login(&gw).await;
    let results = futures_util::future::join_all(
        (0..20).map(|_| api(&gw, reqwest::Method::GET, "/api/x", &session).send()),
    )
    .await;
    for r in results {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(provider.stats().2, 1, "exactly one refresh");
    let tokens: std::collections::HashSet<String> = upstream
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        tokens.len(),
        1,
        "every request used the refreshed token: {tokens:?}"
    );
    assert_eq!(
        gw.metric_value("sallyport_session_events_total{event=\"refresh\",plugin=\"web\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn logout_ends_the_session_revokes_and_returns_the_end_session_url() {
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = start(&config(&provider, &upstream, ""), &key(1)).await;
    let session = login(&gw).await;
    let r = api(&gw, reqwest::Method::GET, "/auth/logout", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = api(&gw, reqwest::Method::POST, "/auth/logout", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "logout is protected against CSRF too");
    let r = api(
        &gw,
        reqwest::Method::POST,
        "/auth/logout?return_to=/app/",
        &session,
    )
    .header("x-csrf", "1")
    .header("origin", "http://app.test")
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(set_cookies(&r)["sp_session"].1.contains("Max-Age=0"));
    let body = json(r).await;
    let url = reqwest::Url::parse(body["logout_url"].as_str().unwrap()).unwrap();
    assert_eq!(url.path(), "/end_session");
    let q: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
    assert!(q["id_token_hint"].split('.').count() == 3);
    assert_eq!(q["post_logout_redirect_uri"], gw.url("/app/"));
    assert_eq!(provider.stats().3, 1, "the refresh token was revoked");
    let r = api(&gw, reqwest::Method::GET, "/api/x", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Two gateways share sessions through Redis: a session started on one works on the other, a
/// back-channel logout sent to the second ends it on the first, and key rotation keeps old
/// cookies working while a cookie sealed with an unknown key (or tampered with) is a 401.
#[tokio::test]
async fn redis_sessions_are_shared_logged_out_by_back_channel_and_survive_key_rotation() {
    let redis = RedisServer::start().await;
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let extra = format!("store = \"redis\"\nredis_url = \"{}\"", redis.url());
    let cfg = config(&provider, &upstream, &extra);
    let one = start(&cfg, &key(1)).await;
    let rotated = start(&cfg, &format!("{},{}", key(2), key(1))).await;
    let other = start(&cfg, &key(3)).await;

    let session = login(&one).await;
    let get = |gw: &Gateway, s: &str| api(gw, reqwest::Method::GET, "/api/x", s).send();
    assert_eq!(get(&one, &session).await.unwrap().status(), 200);
    assert_eq!(
        get(&rotated, &session).await.unwrap().status(),
        200,
        "old key still opens"
    );
    assert_eq!(
        get(&other, &session).await.unwrap().status(),
        401,
        "unknown key"
    );
    let mut tampered = session.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let r = get(&one, &tampered).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"]["code"], "unauthenticated");

    // Back-channel logout at the second gateway, for the subject.
    let token = provider.logout_token(None, Some("alice"));
    let r = reqwest::Client::new()
        .post(rotated.url("/auth/backchannel-logout"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("logout_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        get(&one, &session).await.unwrap().status(),
        401,
        "ended fleet-wide"
    );

    // The same logout token again is refused (it is good once).
    let r = reqwest::Client::new()
        .post(one.url("/auth/backchannel-logout"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("logout_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "replayed logout token");

    // A logout token that is not one (no events claim) or is forged is refused.
    let r = reqwest::Client::new()
        .post(rotated.url("/auth/backchannel-logout"))
        .body("logout_token=eyJhbGciOiJub25lIn0.e30.")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    drop(redis);
}

/// A session unused for `idle_timeout` ends (the absolute timeout is covered with an injected
/// clock in the plugin's unit tests).
#[tokio::test]
async fn an_idle_session_expires() {
    let provider = OidcProvider::start(OidcConfig::default()).await.unwrap();
    let upstream = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = start(
        &config(
            &provider,
            &upstream,
            "idle_timeout = \"2s\"\nabsolute_timeout = \"1h\"",
        ),
        &key(1),
    )
    .await;
    let session = login(&gw).await;
    assert_eq!(
        api(&gw, reqwest::Method::GET, "/api/x", &session)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = api(&gw, reqwest::Method::GET, "/api/x", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        gw.metric_value("sallyport_session_events_total{event=\"expired\",plugin=\"web\"}")
            .await,
        1.0
    );
    let _ = Arc::new(());
}
