//! `sallyport-demo-token`: mints a token the demo gateway accepts, signed with the demo keys
//! in `conf/demo-keys/` (public, demo-only). `--jwks` prints the matching JWKS instead.
//!
//! ```sh
//! TOKEN=$(cargo run -q --bin sallyport-demo-token -- --sub alice --scope "orders:read")
//! curl -H "Authorization: Bearer $TOKEN" localhost:8080/api/secure/orders
//! ```

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const ISSUER: &str = "https://id.demo.sallyport.test/";
const AUDIENCE: &str = "sallyport-demo";

#[derive(Parser)]
#[command(name = "sallyport-demo-token")]
struct Cli {
    /// Subject (`sub`).
    #[arg(long, default_value = "alice")]
    sub: String,
    /// Space-separated scopes (`scope`).
    #[arg(long, default_value = "orders:read profile")]
    scope: String,
    /// Tenant claim.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// Lifetime.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// ES256 (default) or RS256.
    #[arg(long, default_value = "ES256")]
    alg: String,
    /// Directory of the demo keys.
    #[arg(long, default_value = "conf/demo-keys")]
    keys: PathBuf,
    /// Print the JWKS of the demo keys instead of a token.
    #[arg(long)]
    jwks: bool,
}

fn load(dir: &std::path::Path, alg: Algorithm) -> anyhow::Result<(EncodingKey, &'static str)> {
    Ok(match alg {
        Algorithm::ES256 => {
            let pem =
                std::fs::read(dir.join("demo-es256.pem")).context("reading demo-es256.pem")?;
            (EncodingKey::from_ec_pem(&pem)?, "demo-es256")
        }
        Algorithm::RS256 => {
            let pem =
                std::fs::read(dir.join("demo-rs256.pem")).context("reading demo-rs256.pem")?;
            (EncodingKey::from_rsa_pem(&pem)?, "demo-rs256")
        }
        other => anyhow::bail!("the demo keys sign ES256 and RS256, not {other:?}"),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.jwks {
        let mut keys = Vec::new();
        for alg in [Algorithm::ES256, Algorithm::RS256] {
            let (key, kid) = load(&cli.keys, alg)?;
            let mut jwk = Jwk::from_encoding_key(&key, alg)?;
            jwk.common.key_id = Some(kid.into());
            keys.push(jwk);
        }
        println!("{}", serde_json::to_string_pretty(&JwkSet { keys })?);
        return Ok(());
    }
    let alg: Algorithm = cli.alg.parse().context("--alg")?;
    let (key, kid) = load(&cli.keys, alg)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": cli.sub, "scope": cli.scope, "tenant": cli.tenant,
        "iat": now, "exp": now + cli.ttl.as_secs(),
    });
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    println!("{}", jsonwebtoken::encode(&header, &claims, &key)?);
    Ok(())
}
