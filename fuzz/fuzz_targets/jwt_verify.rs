//! JWT verification as the `jwt` plugin does it (`Jwt::verify`): header decoding, key choice,
//! signature, then claims. Two shapes of input:
//! - raw bytes as the token: never accepted (nothing here can forge an HMAC), never a panic,
//!   for tokens up to 1 MiB;
//! - arbitrary header and claims bytes, correctly signed with the configured HS256 secret: the
//!   claims decoder and checks run on hostile JSON; an accepted token always carries the
//!   configured issuer and audience and an `exp` in the future.
#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sallyport_plugins::jwt::{Jwt, JwtConfig};

const SECRET: &str = "fuzzing-secret-0123456789abcdef0123";

fn jwt() -> &'static (Jwt, tokio::runtime::Runtime) {
    static JWT: OnceLock<(Jwt, tokio::runtime::Runtime)> = OnceLock::new();
    JWT.get_or_init(|| {
        let config: JwtConfig = toml::from_str(&format!(
            "algorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\nissuer = \"https://id.test/\"\n\
             audience = [\"api\"]\nmax_token_bytes = 1048576\ncache_size = 0\n"
        ))
        .expect("config");
        let jwt = Jwt::new(&config)
            .map_err(|e| format!("{e:?}"))
            .expect("build");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        (jwt, rt)
    })
}

fn sign(header: &[u8], claims: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fuzz_target!(|input: (bool, &[u8], &[u8])| {
    let (signed, a, b) = input;
    let (jwt, rt) = jwt();
    let token = if signed {
        sign(a, b)
    } else {
        match std::str::from_utf8(a) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        }
    };
    let result = rt.block_on(jwt.verify(&token));
    if !signed {
        assert!(result.is_err(), "an unsigned token was accepted: {token:?}");
        return;
    }
    if let Ok(claims) = result {
        assert_eq!(
            claims.get("iss").and_then(|v| v.as_str()),
            Some("https://id.test/")
        );
        let aud = claims.get("aud").expect("aud");
        assert!(
            aud.as_str() == Some("api")
                || aud
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("api"))),
            "{aud}"
        );
        let exp = claims.get("exp").and_then(|v| v.as_f64()).expect("exp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        assert!(exp + 120.0 > now, "expired token accepted: {exp}");
    }
});
