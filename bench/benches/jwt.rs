//! Cost of verifying one token, per algorithm, with the verified-token cache off (every
//! request pays the signature check) and on (a repeat token costs a SHA-256 and a lookup).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sallyport_plugins::jwt::{Jwt, JwtConfig};

const SECRET: &str = "bench-secret-of-at-least-32-bytes!!!";

fn config(jwks: &str, algorithms: &[&str], cache_size: usize, secret: bool) -> JwtConfig {
    let mut text = format!(
        "algorithms = {:?}\nissuer = \"bench\"\naudience = [\"bench\"]\ncache_size = {cache_size}\n",
        algorithms
    );
    if secret {
        text.push_str(&format!("secret = \"{SECRET}\"\n"));
    } else {
        text.push_str(&format!("jwks_file = \"{jwks}\"\n"));
    }
    toml::from_str(&text).unwrap()
}

fn token(alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(
        &h,
        &serde_json::json!({"iss": "bench", "aud": "bench", "sub": "user-1", "exp": exp, "scope": "a b"}),
        key,
    )
    .unwrap()
}

fn verify(c: &mut Criterion) {
    // The gateway's backend (ring), chosen before the tokens below are signed.
    sallyport_plugins::jwt::crypto::install();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../conf");
    let jwks = format!("{root}/demo-jwks.json");
    let es = EncodingKey::from_ec_pem(
        &std::fs::read(format!("{root}/demo-keys/demo-es256.pem")).unwrap(),
    )
    .unwrap();
    let rs = EncodingKey::from_rsa_pem(
        &std::fs::read(format!("{root}/demo-keys/demo-rs256.pem")).unwrap(),
    )
    .unwrap();
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let cases = [
        (
            "RS256",
            token(Algorithm::RS256, Some("demo-rs256"), &rs),
            false,
        ),
        (
            "ES256",
            token(Algorithm::ES256, Some("demo-es256"), &es),
            false,
        ),
        ("HS256", token(Algorithm::HS256, None, &hs), true),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("jwt::verify");
    for (alg, tok, secret) in &cases {
        for cache in [0usize, 10_000] {
            let jwt = Jwt::new(&config(&jwks, &[alg], cache, *secret)).unwrap();
            assert!(rt.block_on(jwt.verify(tok)).is_ok());
            let label = if cache == 0 { "no_cache" } else { "cached" };
            g.bench_with_input(BenchmarkId::new(*alg, label), tok, |b, tok| {
                b.iter(|| rt.block_on(jwt.verify(tok)).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
