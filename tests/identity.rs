//! The `identity_token` plugin through the real gateway: the service receives a token meant
//! for it, which verifies against the JWKS the gateway publishes (checked with a JOSE library,
//! `jsonwebtoken`), or one exchanged at a token endpoint that implements RFC 8693.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};

use crate::support;

use support::*;

const SECRET: &str = "identity-test-secret-of-at-least-32-bytes";

fn ed25519_pem() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .unwrap()
        .serialize_pem()
}

fn p256_pem() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem()
}

fn rsa_pem() -> String {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string()
}

/// An upstream that answers with the Authorization it received.
async fn service() -> Origin {
    Origin::start(|req| {
        OriginResponse::new(
            200,
            req.header("authorization").unwrap_or("none").to_string(),
        )
    })
    .await
}

fn client_token(sub: &str) -> String {
    format!(
        "Bearer {}",
        hs256(
            SECRET,
            serde_json::json!({"sub": sub, "tenant": "acme", "scope": "orders:read", "client_id": "web"})
        )
    )
}

async fn sign_gateway(upstream: &Origin, key_files: &[String], algorithm: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<String> = key_files
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let p = dir.path().join(format!("key{i}.pem"));
            std::fs::write(&p, k).unwrap();
            format!("\"{}\"", p.display())
        })
        .collect();
    let config = format!(
        "{}\n[upstreams.orders]\nendpoints = [\"{}\"]\n\
         [plugins.jwt]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\n\
         [plugins.orders-identity]\ntype = \"identity_token\"\nissuer = \"https://gateway.test/\"\n\
         algorithm = \"{algorithm}\"\nkey_file = [{}]\nttl = \"60s\"\nclaims = [\"sub\", \"tenant\", \"scope\"]\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nupstream = \"orders\"\nplugins = [\"jwt\", \"orders-identity\"]\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"orders\"\nplugins = [\"orders-identity\"]\n\
         [plugins.jwks]\ntype = \"jwks\"\n\
         [[routes]]\nname = \"jwks\"\npath = \"/.well-known/jwks.json\"\nmethods = [\"GET\"]\nplugins = [\"jwks\"]\n",
        server(""),
        upstream.addr,
        paths.join(", ")
    );
    let gw = Gateway::start(&config).await;
    // The key files are read at start; the directory may go.
    drop(dir);
    gw
}

async fn jwks(gw: &Gateway) -> JwkSet {
    let r = client()
        .get(format!("http://{}/.well-known/jwks.json", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/jwk-set+json");
    r.json().await.unwrap()
}

fn verify(token: &str, set: &JwkSet, audience: &str) -> serde_json::Value {
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.clone().unwrap();
    let jwk = set.find(&kid).expect("the token's kid is published");
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut v = Validation::new(header.alg);
    v.set_audience(&[audience]);
    v.set_issuer(&["https://gateway.test/"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .unwrap()
        .claims
}

async fn upstream_token(gw: &Gateway, path: &str, auth: &str) -> String {
    let r = client()
        .get(gw.url(path))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

#[tokio::test]
async fn a_signed_token_for_the_service_verifies_against_the_published_jwks() {
    for (alg, key) in [
        ("EdDSA", ed25519_pem()),
        ("ES256", p256_pem()),
        ("RS256", rsa_pem()),
    ] {
        let up = service().await;
        let gw = sign_gateway(&up, &[key], alg).await;
        let original = client_token("alice");
        let got = upstream_token(&gw, "/orders/1", &original).await;
        let token = got.strip_prefix("Bearer ").expect("a bearer token");
        assert_ne!(
            got, original,
            "{alg}: the client's own token never reaches the service"
        );
        let claims = verify(token, &jwks(&gw).await, "orders");
        assert_eq!(claims["sub"], "alice", "{alg}");
        assert_eq!(claims["tenant"], "acme");
        assert_eq!(claims["scope"], "orders:read");
        assert_eq!(claims["client_id"], "web");
        assert_eq!(claims["iss"], "https://gateway.test/");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            60
        );
        assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
        // The same principal and audience: the same token, until 20% of its life is left.
        assert_eq!(upstream_token(&gw, "/orders/2", &original).await, got);
        assert_ne!(
            upstream_token(&gw, "/orders/3", &client_token("bob")).await,
            got
        );
        for (result, n) in [("minted", 2.0), ("cached", 1.0)] {
            let series = format!(
                "sallyport_identity_tokens_total{{plugin=\"orders-identity\",result=\"{result}\"}}"
            );
            assert_eq!(gw.metric_value(&series).await, n, "{alg} {series}");
        }
    }
}

#[tokio::test]
async fn without_a_principal_no_token_is_made() {
    let up = service().await;
    let gw = sign_gateway(&up, &[ed25519_pem()], "EdDSA").await;
    let r = client().get(gw.url("/open/x")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "none");
}

#[tokio::test]
async fn key_rotation_publishes_every_key_and_signs_with_the_first() {
    let up = service().await;
    let (new, old) = (ed25519_pem(), ed25519_pem());
    let gw = sign_gateway(&up, &[new, old], "EdDSA").await;
    let set = jwks(&gw).await;
    assert_eq!(set.keys.len(), 2);
    // The same document on the public route of the `jwks` plugin.
    let public: serde_json::Value = client()
        .get(gw.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(public, serde_json::to_value(&set).unwrap());
    let got = upstream_token(&gw, "/orders/1", &client_token("alice")).await;
    let kid = jsonwebtoken::decode_header(got.strip_prefix("Bearer ").unwrap())
        .unwrap()
        .kid
        .unwrap();
    assert_eq!(set.keys[0].common.key_id.as_deref(), Some(kid.as_str()));
    verify(got.strip_prefix("Bearer ").unwrap(), &set, "orders");
}

#[test]
fn unreadable_keys_wrong_algorithms_and_long_ttls_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ec = dir.path().join("ec.pem");
    std::fs::write(&ec, p256_pem()).unwrap();
    let (code, _, err) = check(&format!(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n\
         [plugins.a]\ntype = \"identity_token\"\nissuer = \"i\"\nkey_file = \"/nonexistent.pem\"\n\
         [plugins.b]\ntype = \"identity_token\"\nissuer = \"i\"\nalgorithm = \"EdDSA\"\nkey_file = \"{}\"\nttl = \"2h\"\n",
        ec.display()
    ));
    assert_ne!(code, 0);
    for want in [
        "plugins.a.key_file: cannot read",
        "plugins.b.key_file:",
        "plugins.b.ttl",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// RFC 8693 token exchange against a token endpoint the test scripts.
#[tokio::test]
async fn rfc8693_exchange_caches_coalesces_and_fails_closed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let mallory = client_token("mallory");
    let refused = mallory.trim_start_matches("Bearer ").to_string();
    let idp = Origin::start(move |req| {
        let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
        let form: Vec<(String, String)> = url_form(&req.body);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("gateway:s3cret")
        );
        let ok = req.method == "POST"
            && req.header("authorization") == Some(basic.as_str())
            && get("grant_type") == Some("urn:ietf:params:oauth:grant-type:token-exchange")
            && get("subject_token_type") == Some("urn:ietf:params:oauth:token-type:access_token")
            && get("audience") == Some("orders")
            && get("scope") == Some("orders:read");
        let subject = get("subject_token").unwrap_or("");
        if !ok || subject == refused {
            return OriginResponse::new(400, r#"{"error":"invalid_request"}"#)
                .header("content-type", "application/json");
        }
        let body = serde_json::json!({
            "access_token": format!("exchanged-{n}"),
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": 60,
        });
        OriginResponse::new(200, body.to_string())
            .header("content-type", "application/json")
            .delay(Duration::from_millis(200))
    })
    .await;
    let up = service().await;
    let config = format!(
        "{}\n[upstreams.orders]\nendpoints = [\"{}\"]\n\
         [plugins.jwt]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\n\
         [plugins.x]\ntype = \"identity_token\"\nmode = \"exchange\"\n\
         token_endpoint = \"http://{}/oauth/token\"\nclient_id = \"gateway\"\nclient_secret_env = \"SP_TEST_GW_SECRET\"\n\
         requested_audience = \"orders\"\nscopes = [\"orders:read\"]\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/\"\nupstream = \"orders\"\nplugins = [\"jwt\", \"x\"]\n",
        server(""),
        up.addr,
        idp.addr
    );
    let gw = Gateway::start_with_env(&config, &[("SP_TEST_GW_SECRET", "s3cret")]).await;
    let alice = client_token("alice");
    // 20 concurrent requests with one token: one exchange.
    let c = client();
    let answers = futures_util::future::join_all((0..20).map(|i| {
        let req = c
            .get(gw.url(&format!("/o/{i}")))
            .header("authorization", &alice);
        async move { req.send().await.unwrap().text().await.unwrap() }
    }))
    .await;
    assert!(
        answers.iter().all(|a| a == "Bearer exchanged-1"),
        "{answers:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Cached until it expires.
    assert_eq!(
        upstream_token(&gw, "/o/x", &alice).await,
        "Bearer exchanged-1"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The IdP refuses: 502, nothing about why.
    let r = client()
        .get(gw.url("/o/y"))
        .header("authorization", &mallory)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("token_exchange_failed") && !body.contains("invalid_request"),
        "{body}"
    );
    assert_eq!(
        up.requests().len(),
        21,
        "the refused request never reached the service"
    );
    let failed = "sallyport_identity_tokens_total{plugin=\"x\",result=\"failed\"}";
    assert_eq!(gw.metric_value(failed).await, 1.0);
}

/// `application/x-www-form-urlencoded` pairs.
fn url_form(body: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}
