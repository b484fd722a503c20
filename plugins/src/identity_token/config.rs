//! `[plugins.NAME]` with `type = "identity_token"`.

use http::HeaderName;
use serde::Deserialize;

use crate::conf::{parse_error, HumanDuration, Parsed};
use crate::BuildError;

use super::keys::SigningKey;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The gateway mints a short-lived JWT from the verified principal.
    #[default]
    Sign,
    /// RFC 8693 token exchange at the identity provider.
    Exchange,
}

/// One key file, or several (the first signs, all are published).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum KeyFiles {
    One(String),
    Many(Vec<String>),
}

impl KeyFiles {
    pub fn paths(&self) -> Vec<&str> {
        match self {
            KeyFiles::One(p) => vec![p.as_str()],
            KeyFiles::Many(ps) => ps.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityTokenConfig {
    #[serde(default)]
    pub mode: Mode,
    // sign
    pub issuer: Option<String>,
    /// Default: the name of the upstream pool the request goes to.
    pub audience: Option<String>,
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    pub key_file: Option<KeyFiles>,
    /// The signing key's `kid` (default: its RFC 7638 thumbprint).
    pub kid: Option<String>,
    #[serde(default = "default_ttl")]
    pub ttl: HumanDuration,
    /// Claims copied from the verified principal.
    #[serde(default = "default_claims")]
    pub claims: Vec<String>,
    /// Where the token goes: `authorization` (as `Bearer <token>`) or any header (the token).
    #[serde(default = "default_header")]
    pub header: Parsed<HeaderName>,
    /// Whether the client's own `Authorization` still reaches the service.
    #[serde(default)]
    pub forward_original: bool,
    // exchange
    pub token_endpoint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_env: Option<String>,
    pub requested_audience: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

fn default_algorithm() -> String {
    "EdDSA".into()
}
fn default_ttl() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_claims() -> Vec<String> {
    vec!["sub".into()]
}
fn default_header() -> Parsed<HeaderName> {
    Parsed::from("authorization")
}

/// The longest lifetime a minted token may have.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

pub fn algorithm(c: &IdentityTokenConfig) -> Result<jsonwebtoken::Algorithm, String> {
    match c.algorithm.as_str() {
        "EdDSA" => Ok(jsonwebtoken::Algorithm::EdDSA),
        "ES256" => Ok(jsonwebtoken::Algorithm::ES256),
        "RS256" => Ok(jsonwebtoken::Algorithm::RS256),
        other => Err(format!("{other:?} is not supported; use EdDSA, ES256 or RS256")),
    }
}

/// Reads and checks the key files: `Err` with each problem at its path.
pub fn signing_keys(c: &IdentityTokenConfig) -> Result<Vec<SigningKey>, Vec<BuildError>> {
    let alg = algorithm(c).map_err(|e| vec![BuildError::new("algorithm", e)])?;
    let Some(files) = &c.key_file else {
        return Err(vec![BuildError::new("key_file", "sign mode needs a private key file")]);
    };
    let paths = files.paths();
    if paths.is_empty() {
        return Err(vec![BuildError::new("key_file", "list at least one key file")]);
    }
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let at = match files {
            KeyFiles::One(_) => "key_file".to_string(),
            KeyFiles::Many(_) => format!("key_file[{i}]"),
        };
        // `kid` names the signing (first) key only; the others keep their thumbprints.
        let kid = if i == 0 { c.kid.as_deref() } else { None };
        match std::fs::read_to_string(path) {
            Ok(text) => match SigningKey::from_pem(&text, alg, kid) {
                Ok(k) => keys.push(k),
                Err(e) => errors.push(BuildError::new(at, format!("{path}: {e}"))),
            },
            Err(e) => errors.push(BuildError::new(at, format!("cannot read {path}: {e}"))),
        }
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(errors)
    }
}

pub fn validate(c: &IdentityTokenConfig) -> Vec<BuildError> {
    let mut errors: Vec<BuildError> = parse_error("header", &c.header).into_iter().collect();
    match c.mode {
        Mode::Sign => {
            if c.issuer.as_deref().is_none_or(str::is_empty) {
                errors.push(BuildError::new("issuer", "sign mode needs the issuer of its tokens"));
            }
            if let Err(e) = signing_keys(c) {
                errors.extend(e);
            }
            if c.ttl.get() < std::time::Duration::from_secs(1) || c.ttl.get() > MAX_TTL {
                errors.push(BuildError::new("ttl", "must be from 1s to 1h"));
            }
            for (i, claim) in c.claims.iter().enumerate() {
                if ["iss", "aud", "iat", "exp", "nbf", "jti"].contains(&claim.as_str()) {
                    errors.push(BuildError::new(
                        format!("claims[{i}]"),
                        "is a registered claim the gateway controls",
                    ));
                }
            }
            for key in ["token_endpoint", "client_id", "client_secret_env", "requested_audience"] {
                let set = match key {
                    "token_endpoint" => c.token_endpoint.is_some(),
                    "client_id" => c.client_id.is_some(),
                    "client_secret_env" => c.client_secret_env.is_some(),
                    _ => c.requested_audience.is_some(),
                };
                if set {
                    errors.push(BuildError::new(key, "applies to mode = \"exchange\" only"));
                }
            }
        }
        Mode::Exchange => {
            match c.token_endpoint.as_deref().map(reqwest::Url::parse) {
                None => errors.push(BuildError::new("token_endpoint", "exchange mode needs the IdP's token endpoint")),
                Some(Err(e)) => errors.push(BuildError::new("token_endpoint", format!("not a URL: {e}"))),
                Some(Ok(u)) if !matches!(u.scheme(), "http" | "https") => {
                    errors.push(BuildError::new("token_endpoint", "must be an http(s) URL"))
                }
                Some(Ok(_)) => {}
            }
            if c.client_id.as_deref().is_none_or(str::is_empty) {
                errors.push(BuildError::new("client_id", "exchange mode authenticates as a client"));
            }
            match &c.client_secret_env {
                None => errors.push(BuildError::new("client_secret_env", "name the environment variable holding the client secret")),
                Some(var) if std::env::var(var).is_err() => errors.push(BuildError::new(
                    "client_secret_env",
                    format!("the environment variable {var} is not set"),
                )),
                Some(_) => {}
            }
            if c.key_file.is_some() {
                errors.push(BuildError::new("key_file", "applies to mode = \"sign\" only"));
            }
        }
    }
    errors
}
