//! Authentication and authorization through the real gateway: jwt (every algorithm, every
//! way a token can be wrong, JWKS over HTTP), authorize, key_auth, and identity headers that
//! clients can never forge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::*;

const ISS: &str = "https://id.example.test/";
const AUD: &str = "sallyport";
const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

/// Signing keys generated for this test run, and the matching JWKS.
struct Keys {
    rsa: EncodingKey,
    rsa_public_pem: String,
    p256: EncodingKey,
    p384: EncodingKey,
    ed: EncodingKey,
    jwks: String,
}

fn keys() -> Keys {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let rsa_key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let rsa_pem = rsa_key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let rsa_public_pem = rsa_key
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let ec = |alg: &'static rcgen::SignatureAlgorithm| {
        rcgen::KeyPair::generate_for(alg).unwrap().serialize_pem()
    };
    let rsa = EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).unwrap();
    let p256 = EncodingKey::from_ec_pem(ec(&rcgen::PKCS_ECDSA_P256_SHA256).as_bytes()).unwrap();
    let p384 = EncodingKey::from_ec_pem(ec(&rcgen::PKCS_ECDSA_P384_SHA384).as_bytes()).unwrap();
    let ed_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed = EncodingKey::from_ed_pem(ed_pair.serialize_pem().as_bytes()).unwrap();
    let jwk = |k: &EncodingKey, alg: Algorithm, kid: &str| {
        let mut j = Jwk::from_encoding_key(k, alg).unwrap();
        j.common.key_id = Some(kid.into());
        j
    };
    let set = JwkSet {
        keys: vec![
            jwk(&rsa, Algorithm::RS256, "rsa-1"),
            jwk(&p256, Algorithm::ES256, "ec-256"),
            jwk(&p384, Algorithm::ES384, "ec-384"),
        ],
    };
    // The RSA JWK names RS256; strip `alg` so the same key also verifies RS384/512 and PS*.
    let mut jwks = serde_json::to_value(&set).unwrap();
    jwks["keys"][0].as_object_mut().unwrap().remove("alg");
    // Ed25519 JWK by hand (RFC 8037): the raw public key as `x`.
    jwks["keys"].as_array_mut().unwrap().push(json!({
        "kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA", "use": "sig",
        "x": b64(ed_pair.public_key_raw()),
    }));
    Keys {
        rsa,
        rsa_public_pem,
        p256,
        p384,
        ed,
        jwks: jwks.to_string(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"iss": ISS, "aud": AUD, "sub": sub, "exp": now() + 600, "scope": "orders:read profile", "tenant": "acme"})
}

fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    claims: &serde_json::Value,
    key: &EncodingKey,
) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

struct Env {
    gw: Gateway,
    up: MockServer,
    keys: Keys,
    jwks: Option<JwksServer>,
    _dir: tempfile::TempDir,
}

/// A gateway with: /api (jwt from a JWKS file, all asymmetric algorithms), /hs (jwt with a
/// secret), /remote (jwt from a JWKS URL), /orders (jwt + authorize), /keyed (key_auth),
/// /open (no auth).
async fn env() -> Env {
    let keys = keys();
    let up = mock("app").await;
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, &keys.jwks).unwrap();
    let jwks = JwksServer::start(keys.jwks.clone()).await;
    let api_key_hash = hex(&sha256(b"k-123"));
    let config = format!(
        r#"{server}
[upstreams.app]
endpoints = ["{up}"]
[plugins.jwt]
type = "jwt"
issuer = "{ISS}"
audience = ["other", "{AUD}"]
algorithms = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
jwks_file = "{jwks_path}"
leeway = "5s"
forward_claims = {{ sub = "x-user-id", tenant = "x-tenant-id", scope = "x-user-scopes" }}
[plugins.jwt-hs]
type = "jwt"
issuer = "{ISS}"
audience = ["{AUD}"]
algorithms = ["HS256", "HS384", "HS512"]
secret = "{SECRET}"
forward_claims = {{ sub = "x-user-id" }}
[plugins.jwt-remote]
type = "jwt"
issuer = "{ISS}"
audience = ["{AUD}"]
algorithms = ["RS256"]
jwks_url = "{jwks_url}"
jwks_min_refetch = "1h"
forward_claims = {{ sub = "x-user-id" }}
[plugins.orders-read]
type = "authorize"
scopes = ["orders:read"]
[plugins.admin-only]
type = "authorize"
scopes = ["orders:read", "admin"]
claims = {{ tenant = "acme" }}
[plugins.keys]
type = "key_auth"
header = "x-api-key"
query = "api_key"
consumer_header = "x-consumer"
keys = [{{ consumer = "mobile-app", sha256 = "{api_key_hash}" }}]
[[routes]]
name = "api"
path_prefix = "/api"
upstream = "app"
plugins = ["jwt"]
[[routes]]
name = "hs"
path_prefix = "/hs"
upstream = "app"
plugins = ["jwt-hs"]
[[routes]]
name = "remote"
path_prefix = "/remote"
upstream = "app"
plugins = ["jwt-remote"]
[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "app"
plugins = ["jwt", "orders-read"]
[[routes]]
name = "admin"
path_prefix = "/admin"
upstream = "app"
plugins = ["jwt", "admin-only"]
[[routes]]
name = "keyed"
path_prefix = "/keyed"
upstream = "app"
plugins = ["keys"]
[[routes]]
name = "open"
path_prefix = "/open"
upstream = "app"
"#,
        server = server(""),
        up = up.addr(),
        jwks_path = jwks_path.display(),
        jwks_url = jwks.url(),
    );
    let gw = Gateway::start(&config).await;
    Env {
        gw,
        up,
        keys,
        jwks: Some(jwks),
        _dir: dir,
    }
}

fn sha256(v: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(v).to_vec()
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

async fn get(gw: &Gateway, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .get(gw.url(path))
        .header("x-user-id", "forged")
        .header("x-tenant-id", "forged");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn every_algorithm_verifies_and_identity_reaches_the_upstream() {
    let e = env().await;
    let k = &e.keys;
    let cases = [
        (
            "/api/rs256",
            sign(Algorithm::RS256, Some("rsa-1"), &claims("u-rs256"), &k.rsa),
        ),
        (
            "/api/rs384",
            sign(Algorithm::RS384, Some("rsa-1"), &claims("u-rs384"), &k.rsa),
        ),
        (
            "/api/rs512",
            sign(Algorithm::RS512, Some("rsa-1"), &claims("u-rs512"), &k.rsa),
        ),
        (
            "/api/ps256",
            sign(Algorithm::PS256, Some("rsa-1"), &claims("u-ps256"), &k.rsa),
        ),
        (
            "/api/es256",
            sign(
                Algorithm::ES256,
                Some("ec-256"),
                &claims("u-es256"),
                &k.p256,
            ),
        ),
        (
            "/api/es384",
            sign(
                Algorithm::ES384,
                Some("ec-384"),
                &claims("u-es384"),
                &k.p384,
            ),
        ),
        (
            "/api/eddsa",
            sign(Algorithm::EdDSA, Some("ed-1"), &claims("u-eddsa"), &k.ed),
        ),
        (
            "/api/nokid",
            sign(Algorithm::ES256, None, &claims("u-nokid"), &k.p256),
        ),
        (
            "/hs/hs256",
            sign(
                Algorithm::HS256,
                None,
                &claims("u-hs256"),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            ),
        ),
        (
            "/hs/hs384",
            sign(
                Algorithm::HS384,
                None,
                &claims("u-hs384"),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            ),
        ),
        (
            "/hs/hs512",
            sign(
                Algorithm::HS512,
                None,
                &claims("u-hs512"),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            ),
        ),
    ];
    for (path, token) in &cases {
        let resp = get(&e.gw, path, Some(token)).await;
        assert_eq!(resp.status(), 200, "{path}");
        let got = e.up.requests().pop().unwrap();
        let sub = format!("u-{}", &path[path.rfind('/').unwrap() + 1..]);
        assert_eq!(
            got.header("x-user-id"),
            Some(sub.as_str()),
            "{path}: the verified sub, never the forged one"
        );
        assert_eq!(got.header_all("x-user-id").len(), 1);
        assert!(
            got.header("authorization").is_some(),
            "the token itself is passed on"
        );
        if path.starts_with("/api") {
            assert_eq!(got.header("x-tenant-id"), Some("acme"));
            assert_eq!(got.header("x-user-scopes"), Some("orders:read profile"));
        } else {
            assert_eq!(
                got.header("x-tenant-id"),
                None,
                "forged and not forwarded by this route's jwt"
            );
        }
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_right_reason() {
    let e = env().await;
    let k = &e.keys;
    let rs = |c: &serde_json::Value| sign(Algorithm::RS256, Some("rsa-1"), c, &k.rsa);
    let mut expired = claims("u");
    expired["exp"] = json!(now() - 60);
    let mut future = claims("u");
    future["nbf"] = json!(now() + 600);
    let mut wrong_iss = claims("u");
    wrong_iss["iss"] = json!("https://evil.example/");
    let mut wrong_aud = claims("u");
    wrong_aud["aud"] = json!("someone-else");
    let mut no_aud = claims("u");
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut no_iss = claims("u");
    no_iss.as_object_mut().unwrap().remove("iss");
    let mut no_exp = claims("u");
    no_exp.as_object_mut().unwrap().remove("exp");
    let valid = rs(&claims("u"));
    let (head, rest) = valid.split_once('.').unwrap();
    let (payload, sig) = rest.split_once('.').unwrap();
    let mut forged_payload = claims("admin");
    forged_payload["scope"] = json!("admin");
    let tampered = format!(
        "{head}.{}.{sig}",
        b64(forged_payload.to_string().as_bytes())
    );
    let alg_none = format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
    // Key confusion: HS256 "signed" with the RSA public key as the secret.
    let confused = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &claims("u"),
        &EncodingKey::from_secret(k.rsa_public_pem.as_bytes()),
    );
    let not_allowed = sign(
        Algorithm::HS256,
        None,
        &claims("u"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    let unknown_kid = sign(Algorithm::RS256, Some("who"), &claims("u"), &k.rsa);
    let huge = format!("{head}.{}.{sig}", "A".repeat(100 * 1024));
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", rs(&expired), "expired"),
        ("nbf", rs(&future), "not_yet_valid"),
        ("iss", rs(&wrong_iss), "bad_issuer"),
        ("aud", rs(&wrong_aud), "bad_audience"),
        // With `audience`/`issuer` configured the token must name them (RFC 7519 4.1.1,
        // 4.1.3): leaving the claim out must not skip the check.
        ("no aud", rs(&no_aud), "bad_audience"),
        ("no iss", rs(&no_iss), "bad_issuer"),
        ("no exp", rs(&no_exp), "missing_claim"),
        ("tampered", tampered, "bad_signature"),
        ("alg none", alg_none, "malformed"),
        ("key confusion", confused, "algorithm_not_allowed"),
        ("HS not allowed", not_allowed, "algorithm_not_allowed"),
        ("unknown kid", unknown_kid, "unknown_kid"),
        ("garbage", "not-a-token".into(), "malformed"),
        ("bad base64", "@@@.###.$$$".into(), "malformed"),
        (
            "bad json",
            format!("{}.{}.sig", b64(b"{not json"), b64(b"{}")),
            "malformed",
        ),
        ("two segments", format!("{head}.{payload}"), "malformed"),
        ("huge", huge, "malformed"),
    ];
    for (what, token, reason) in &cases {
        let resp = get(&e.gw, "/api/x", Some(token)).await;
        let status = resp.status().as_u16();
        if *what == "huge" && status != 401 {
            // Pingora may refuse an oversized header itself: a client error, never a 500.
            assert!((400..500).contains(&status), "{what}: {status}");
            continue;
        }
        assert_eq!(status, 401, "{what}");
        let challenge = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            challenge.starts_with(
                "Bearer realm=\"sallyport\", error=\"invalid_token\", error_description="
            ),
            "{what}: {challenge}"
        );
        let body = json(resp).await;
        assert_eq!(body["error"]["code"], "invalid_token", "{what}");
        let m = e.gw.metrics().await;
        assert!(
            m.contains(&format!("sallyport_plugin_rejections_total{{plugin=\"jwt\",reason=\"{reason}\",route=\"api\"}}")),
            "{what}: reason {reason} not counted"
        );
    }
    // No token at all: a challenge without an error, per RFC 6750.
    let resp = get(&e.gw, "/api/x", None).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"sallyport\""
    );
    assert!(e.up.requests().is_empty(), "nothing reached the upstream");
    let logs = e.gw.stdout() + &e.gw.stderr();
    assert!(!logs.contains(&valid[..40]), "a token reached the logs");
}

#[tokio::test]
async fn jwks_url_refetches_unknown_kids_once_and_survives_the_idp_going_down() {
    let mut e = env().await;
    let jwks = e.jwks.take().unwrap();
    assert_eq!(jwks.hits(), 1, "fetched at start");
    let k = &e.keys;
    let good = sign(Algorithm::RS256, Some("rsa-1"), &claims("u"), &k.rsa);
    assert_eq!(get(&e.gw, "/remote/a", Some(&good)).await.status(), 200);
    // Random kids: the first triggers one refetch, the next ones are rate limited.
    for i in 0..5 {
        let t = sign(
            Algorithm::RS256,
            Some(&format!("random-{i}")),
            &claims("u"),
            &k.rsa,
        );
        assert_eq!(get(&e.gw, "/remote/b", Some(&t)).await.status(), 401);
    }
    assert_eq!(jwks.hits(), 2, "one refetch for a storm of unknown kids");
    // The IdP goes down: the last good keys keep working.
    jwks.set_up(false);
    jwks.set_body("{}".into());
    assert_eq!(get(&e.gw, "/remote/c", Some(&good)).await.status(), 200);
    // A reload while the IdP is down keeps the plugin (its config did not change) and with it
    // the keys: no refetch, no refused tokens, no reload blocked on the IdP.
    let hits = jwks.hits();
    assert_eq!(e.gw.reload().await, "ok");
    assert_eq!(get(&e.gw, "/remote/d", Some(&good)).await.status(), 200);
    assert_eq!(jwks.hits(), hits, "the reload fetched nothing");
}

#[tokio::test]
async fn scopes_and_claims_are_authorized() {
    let e = env().await;
    let k = &e.keys;
    let ok = sign(Algorithm::ES256, Some("ec-256"), &claims("u"), &k.p256);
    assert_eq!(get(&e.gw, "/orders/1", Some(&ok)).await.status(), 200);
    let mut no_scope = claims("u");
    no_scope["scope"] = json!("profile");
    let t = sign(Algorithm::ES256, Some("ec-256"), &no_scope, &k.p256);
    let resp = get(&e.gw, "/orders/1", Some(&t)).await;
    assert_eq!(resp.status(), 403);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("insufficient_scope"));
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "insufficient_scope");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("orders:read"));
    assert!(
        !body.to_string().contains(&t[..20]),
        "the token is never echoed"
    );
    // scp as an array works too; admin also needs the tenant claim.
    let mut admin = claims("u");
    admin["scp"] = json!(["admin"]);
    let t = sign(Algorithm::ES256, Some("ec-256"), &admin, &k.p256);
    assert_eq!(get(&e.gw, "/admin/1", Some(&t)).await.status(), 200);
    admin["tenant"] = json!("other");
    let t = sign(Algorithm::ES256, Some("ec-256"), &admin, &k.p256);
    let resp = get(&e.gw, "/admin/1", Some(&t)).await;
    assert_eq!(resp.status(), 403);
    assert!(json(resp).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tenant"));
}

#[tokio::test]
async fn api_keys_are_checked_and_never_forwarded() {
    let e = env().await;
    let c = client();
    let resp = c
        .get(e.gw.url("/keyed/1"))
        .header("x-api-key", "k-123")
        .header("x-consumer", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = e.up.requests().pop().unwrap();
    assert_eq!(got.header("x-api-key"), None, "the key is not forwarded");
    assert_eq!(got.header("x-consumer"), Some("mobile-app"));
    let resp = c
        .get(e.gw.url("/keyed/2?api_key=k-123&page=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(e.up.requests().pop().unwrap().uri, "/keyed/2?page=2");
    let resp = c
        .get(e.gw.url("/keyed/3"))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(json(resp).await["error"]["code"], "invalid_credentials");
    let resp = c.get(e.gw.url("/keyed/4")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(json(resp).await["error"]["code"], "missing_credentials");
    assert!(
        !(e.gw.stdout() + &e.gw.stderr()).contains("k-123"),
        "keys never reach the logs"
    );
}

#[tokio::test]
async fn identity_headers_are_stripped_on_every_route() {
    let e = env().await;
    // A route without any auth plugin: the client's identity headers are still removed.
    let resp = client()
        .get(e.gw.url("/open/x"))
        .header("x-user-id", "admin")
        .header("x-tenant-id", "acme")
        .header("x-user-scopes", "admin")
        .header("x-consumer", "mobile-app")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = e.up.requests().pop().unwrap();
    for h in ["x-user-id", "x-tenant-id", "x-user-scopes", "x-consumer"] {
        assert_eq!(
            got.header(h),
            None,
            "{h} forged by the client reached the upstream"
        );
    }
}
