//! `key_auth`: API keys.
//!
//! Phases: `request_filter` (check the key; 401 otherwise) and `upstream_request_filter`
//! (remove the key from the header and query, so the upstream never sees it). Per-request
//! state: none. Keys are stored as SHA-256 hashes (inline or in a `keys_file`), each with a
//! consumer name; the presented key's hash is compared with every stored hash in constant
//! time. The consumer becomes the principal (`verified_by = "key_auth"`, usable by quotas as
//! `key = "api_key"`) and the `consumer_header` sent upstream (a trusted header: clients can
//! never set it).
//!
//! ```toml
//! [plugins.api-keys]
//! type = "key_auth"
//! header = "x-api-key"
//! query = "api_key"
//! consumer_header = "x-consumer"
//! keys = [{ consumer = "mobile-app", sha256 = "<hex of sha256(key)>" }]
//! ```
//! Hash a key with `printf %s "$KEY" | sha256sum`.
//! Metrics: rejections in `sallyport_plugin_rejections_total` (reasons `missing`, `invalid_key`).

use std::sync::Arc;

use async_trait::async_trait;
use http::header::WWW_AUTHENTICATE;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::conf::{parse_error, value, Parsed};

use crate::{
    ApiError, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Principal, Reply, RequestCtx,
    Result,
};

/// `[plugins.NAME]` with `type = "key_auth"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthConfig {
    /// Header carrying the key.
    #[serde(default = "default_header")]
    pub header: Parsed<HeaderName>,
    /// Also accept the key from this query parameter.
    #[serde(default)]
    pub query: Option<String>,
    /// Header sent upstream with the consumer name.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: Parsed<HeaderName>,
    #[serde(default)]
    pub keys: Vec<StoredKey>,
    /// A TOML file with `keys = [{ consumer, sha256 }]`, read at load and reload.
    #[serde(default)]
    pub keys_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    pub consumer: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<StoredKey>,
}

fn default_header() -> Parsed<HeaderName> {
    Parsed::new("x-api-key")
}
fn default_consumer_header() -> Parsed<HeaderName> {
    Parsed::new("x-consumer")
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn load(c: &KeyAuthConfig) -> (Vec<(String, [u8; 32])>, Vec<BuildError>) {
    let mut errors = Vec::new();
    let mut keys = Vec::new();
    let mut check = |path: String, k: &StoredKey| match parse_hex(&k.sha256) {
        Some(h) if !k.consumer.trim().is_empty() => keys.push((k.consumer.clone(), h)),
        Some(_) => errors.push(BuildError::new(
            format!("{path}.consumer"),
            "must not be empty",
        )),
        None => errors.push(BuildError::new(
            format!("{path}.sha256"),
            "must be 64 hex digits (the SHA-256 of the key)",
        )),
    };
    for (i, k) in c.keys.iter().enumerate() {
        check(format!("keys[{i}]"), k);
    }
    if let Some(file) = &c.keys_file {
        match std::fs::read_to_string(file)
            .map_err(|e| e.to_string())
            .and_then(|t| toml_keys(&t))
        {
            Ok(list) => {
                for (i, k) in list.iter().enumerate() {
                    check(format!("keys_file({file}).keys[{i}]"), k);
                }
            }
            Err(e) => errors.push(BuildError::new("keys_file", format!("{file}: {e}"))),
        }
    }
    if keys.is_empty() && errors.is_empty() {
        errors.push(BuildError::new("keys", "no keys: add keys or a keys_file"));
    }
    errors.extend(parse_error("header", &c.header));
    errors.extend(parse_error("consumer_header", &c.consumer_header));
    if let Some(q) = &c.query {
        let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if q.is_empty() || !q.bytes().all(plain) {
            errors.push(BuildError::new(
                "query",
                format!("{q:?} is not a query parameter name (letters, digits, - . _ ~)"),
            ));
        }
    }
    (keys, errors)
}

fn toml_keys(text: &str) -> std::result::Result<Vec<StoredKey>, String> {
    let parsed: KeysFile =
        serde_json::from_value(toml_to_json(text).map_err(|e| format!("not valid TOML: {e}"))?)
            .map_err(|e| format!("expected keys = [{{ consumer, sha256 }}]: {e}"))?;
    Ok(parsed.keys)
}

/// Minimal TOML reading through serde: the plugins crate parses keys files with the same
/// `toml` crate the gateway uses for its config.
fn toml_to_json(text: &str) -> std::result::Result<serde_json::Value, String> {
    let value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
    serde_json::to_value(value).map_err(|e| e.to_string())
}

pub fn validate(c: &KeyAuthConfig) -> Vec<BuildError> {
    load(c).1
}

pub fn trusted_headers(c: &KeyAuthConfig) -> Vec<HeaderName> {
    // Only a validated config is ever built, so the name parsed.
    c.consumer_header.get().cloned().into_iter().collect()
}

pub struct KeyAuth {
    header: HeaderName,
    query: Option<String>,
    consumer_header: HeaderName,
    keys: Vec<(String, [u8; 32])>,
}

impl KeyAuth {
    pub fn build(c: &KeyAuthConfig) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let (keys, errors) = load(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        let header = value("header", &c.header)?;
        let consumer_header = value("consumer_header", &c.consumer_header)?;
        Ok(Erased::into_dyn(KeyAuth {
            header,
            query: c.query.clone(),
            consumer_header,
            keys,
        }))
    }

    fn presented(&self, req: &RequestHeader) -> Option<String> {
        // An empty header is no key: the query parameter may still carry one.
        if let Some(v) = req.headers.get(&self.header).and_then(|v| v.to_str().ok()) {
            if !v.trim().is_empty() {
                return Some(v.trim().to_string());
            }
        }
        let name = self.query.as_deref()?;
        req.uri.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
    }

    /// The consumer of a key; every stored hash is compared, in constant time.
    fn consumer(&self, key: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found: Option<&str> = None;
        for (consumer, hash) in &self.keys {
            if bool::from(hash.ct_eq(&digest)) && found.is_none() {
                found = Some(consumer);
            }
        }
        found
    }
}

#[async_trait]
impl Plugin for KeyAuth {
    type State = ();

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            upstream_request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        let Some(key) = self.presented(session.req_header()) else {
            return Ok(Flow::Respond(Reply::Error(
                ApiError::new(401, "missing_credentials", "an API key is required")
                    .with_reason("missing")
                    .with_header(WWW_AUTHENTICATE, "ApiKey"),
            )));
        };
        let Some(consumer) = self.consumer(&key) else {
            return Ok(Flow::Respond(Reply::Error(
                ApiError::new(401, "invalid_credentials", "the API key is not valid")
                    .with_reason("invalid_key")
                    .with_header(WWW_AUTHENTICATE, "ApiKey"),
            )));
        };
        let mut claims = serde_json::Map::new();
        claims.insert("consumer".into(), consumer.into());
        claims.insert("sub".into(), consumer.into());
        ctx.identity_headers
            .retain(|(h, _)| h != self.consumer_header);
        if let Ok(v) = HeaderValue::from_str(consumer) {
            ctx.identity_headers.push((self.consumer_header.clone(), v));
        }
        ctx.principal = Some(Principal {
            subject: Some(consumer.to_string()),
            claims: Arc::new(claims),
            verified_by: "key_auth",
        });
        Ok(Flow::Continue)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        upstream_request.remove_header(&self.header);
        let Some(name) = self.query.as_deref() else {
            return Ok(());
        };
        let Some(query) = upstream_request.uri.query() else {
            return Ok(());
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| kv.split_once('=').map_or(*kv, |(k, _)| k) != name)
            .collect();
        let path = upstream_request.uri.path().to_string();
        let uri = if kept.is_empty() {
            path
        } else {
            format!("{path}?{}", kept.join("&"))
        };
        if let Ok(uri) = uri.parse() {
            upstream_request.set_uri(uri);
        }
        Ok(())
    }
}

impl crate::PluginType for KeyAuthConfig {
    const KIND: &'static str = "key_auth";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn trusted_headers(&self) -> Vec<HeaderName> {
        trusted_headers(self)
    }

    fn build(
        &self,
        _env: &crate::BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        KeyAuth::build(self)
    }
}

#[cfg(test)]
mod tests {
    use crate::testkit::{session, Harness};
    use crate::Flow;

    /// SHA-256 of `s3cret`.
    const TABLE: &str = "type = \"key_auth\"\nquery = \"api_key\"\nkeys = [{ consumer = \"mobile\", sha256 = \"2a9fd3b59f0e4f0d3e62c2d1a2b8f3e0c0a5d9e1b4b6c5d7e8f9a0b1c2d3e4f5\" }]";

    fn table() -> String {
        use sha2::Digest;
        let hash: String = sha2::Sha256::digest(b"s3cret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        TABLE.replace(
            "2a9fd3b59f0e4f0d3e62c2d1a2b8f3e0c0a5d9e1b4b6c5d7e8f9a0b1c2d3e4f5",
            &hash,
        )
    }

    #[tokio::test]
    async fn an_empty_header_leaves_the_query_to_carry_the_key() {
        let mut h = Harness::build(&table()).unwrap();
        let (mut s, _c) =
            session(b"GET /o?api_key=s3cret HTTP/1.1\r\nHost: t\r\nX-Api-Key: \r\n\r\n")
                .await
                .unwrap();
        assert!(matches!(h.request(&mut s).await.unwrap(), Flow::Continue));
        let p = h.ctx.principal.as_ref().unwrap();
        assert_eq!(p.subject.as_deref(), Some("mobile"));
    }

    #[test]
    fn a_query_name_that_cannot_be_one_is_refused() {
        for bad in ["", "a&b", "k=v", "a b"] {
            let errors = Harness::build(&table().replace("\"api_key\"", &format!("{bad:?}")))
                .err()
                .unwrap_or_default();
            assert!(errors.iter().any(|e| e.path == "query"), "{bad:?}: {errors:?}");
        }
    }
}
