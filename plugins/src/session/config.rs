//! `[plugins.NAME]` with `type = "session"`.

use serde::Deserialize;

use crate::conf::HumanDuration;
use crate::redis_conn::{RedisTarget, SentinelConfig};
use crate::BuildError;

/// The browser session (token handler) plugin's config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// The OpenID provider: its `/.well-known/openid-configuration` is read at start and
    /// refreshed every `discovery_refresh`.
    pub issuer: String,
    pub client_id: String,
    /// The environment variable holding the client secret (`client_secret_basic`).
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// How the gateway authenticates at the token endpoint: `client_secret_basic` (default
    /// when a secret is set), `client_secret_post`, `private_key_jwt` (a signed assertion,
    /// RFC 7523, with `client_key_file`), or `none` (a public client; PKCE only).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// The private key (PEM) of `private_key_jwt`.
    #[serde(default)]
    pub client_key_file: Option<String>,
    /// Its algorithm: `ES256` (default), `EdDSA` or `RS256`.
    #[serde(default = "default_client_key_algorithm")]
    pub client_key_algorithm: String,
    /// The `kid` of its assertions (default: the key's RFC 7638 thumbprint).
    #[serde(default)]
    pub client_key_id: Option<String>,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub paths: SessionPaths,
    /// The gateway's public origin (`https://app.example.com`), for the `redirect_uri` and
    /// the post-logout redirect. Unset: the request's own scheme and `Host`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Local paths a login or logout may return to: exact, or everything below an entry that
    /// ends in `/` (`/` itself admits only the root). The first is the default.
    #[serde(default = "default_return_to")]
    pub return_to: Vec<String>,
    /// The session cookie. A `__Host-` name requires `secure = true` (the default).
    #[serde(default = "default_cookie")]
    pub cookie: String,
    /// `Secure` on the cookies; turn off only for local plain-HTTP development.
    #[serde(default = "default_true")]
    pub secure: bool,
    /// `lax` (default) or `strict`.
    #[serde(default)]
    pub same_site: SameSite,
    /// The environment variable with the cookie keys: comma-separated, base64, 32 bytes each.
    /// The first encrypts; every one decrypts (rotation without logging anyone out).
    pub cookie_keys_env: String,
    /// `memory` (this gateway) or `redis` (shared by the fleet; `redis_url`).
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub redis_url: Option<String>,
    /// A Redis Cluster's seed nodes instead of `redis_url`.
    #[serde(default)]
    pub redis_cluster: Option<Vec<String>>,
    /// The master a set of Sentinels names, instead of `redis_url`.
    #[serde(default)]
    pub redis_sentinel: Option<SentinelConfig>,
    #[serde(default = "default_redis_timeout")]
    pub redis_timeout: HumanDuration,
    /// A session unused this long ends.
    #[serde(default = "default_idle")]
    pub idle_timeout: HumanDuration,
    /// A session ends this long after login, used or not.
    #[serde(default = "default_absolute")]
    pub absolute_timeout: HumanDuration,
    /// The access token is refreshed this long before it expires.
    #[serde(default = "default_refresh_before")]
    pub refresh_before: HumanDuration,
    /// Origins whose pages may send unsafe requests (`Origin`, else `Referer`).
    #[serde(default)]
    pub trusted_origins: Vec<String>,
    /// Unsafe methods must also carry this header (any value): a cross-site form cannot.
    #[serde(default = "default_csrf_header")]
    pub csrf_header: String,
    /// `bearer`: the access token goes upstream as `Authorization: Bearer`.
    #[serde(default)]
    pub forward: Forward,
    /// How long a login may take between the redirect to the provider and the callback.
    #[serde(default = "default_login_timeout")]
    pub login_timeout: HumanDuration,
    #[serde(default = "default_discovery_refresh")]
    pub discovery_refresh: HumanDuration,
    /// Clock skew tolerated on the ID token's `exp`/`iat`.
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    /// Sessions a `memory` store holds at most (the least recently used go first).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionPaths {
    #[serde(default = "default_login")]
    pub login: String,
    #[serde(default = "default_callback")]
    pub callback: String,
    #[serde(default = "default_logout")]
    pub logout: String,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default = "default_backchannel")]
    pub backchannel_logout: String,
}

impl Default for SessionPaths {
    fn default() -> Self {
        SessionPaths {
            login: default_login(),
            callback: default_callback(),
            logout: default_logout(),
            user: default_user(),
            backchannel_logout: default_backchannel(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    None,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    #[default]
    Lax,
    Strict,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Forward {
    #[default]
    Bearer,
}

fn default_client_key_algorithm() -> String {
    "ES256".into()
}
fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "profile".into()]
}
fn default_return_to() -> Vec<String> {
    vec!["/".into()]
}
fn default_cookie() -> String {
    "__Host-sp_session".into()
}
fn default_true() -> bool {
    true
}
fn default_redis_timeout() -> HumanDuration {
    HumanDuration::from_millis(500)
}
fn default_idle() -> HumanDuration {
    HumanDuration::from_secs(30 * 60)
}
fn default_absolute() -> HumanDuration {
    HumanDuration::from_secs(12 * 3600)
}
fn default_refresh_before() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_csrf_header() -> String {
    "x-csrf".into()
}
fn default_login_timeout() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_discovery_refresh() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_leeway() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_sessions() -> usize {
    100_000
}
fn default_login() -> String {
    "/auth/login".into()
}
fn default_callback() -> String {
    "/auth/callback".into()
}
fn default_logout() -> String {
    "/auth/logout".into()
}
fn default_user() -> String {
    "/auth/user".into()
}
fn default_backchannel() -> String {
    "/auth/backchannel-logout".into()
}

impl SessionConfig {
    /// The Redis of `store = "redis"`, from `redis_url`, `redis_cluster` or `redis_sentinel`.
    pub fn redis_target(&self) -> Result<Option<RedisTarget>, Vec<BuildError>> {
        RedisTarget::from_keys(
            self.redis_url.as_deref(),
            self.redis_cluster.as_deref(),
            self.redis_sentinel.as_ref(),
        )
    }

    /// Every problem of the config, without reading the environment or the network.
    pub fn problems(&self) -> Vec<BuildError> {
        let mut errors = Vec::new();
        let mut err = |path: &str, m: &str| errors.push(BuildError::new(path, m));
        match reqwest::Url::parse(&self.issuer) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => {}
            _ => err("issuer", "must be an http(s) URL"),
        }
        if self.client_id.is_empty() {
            err("client_id", "must not be empty");
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            err("scopes", "must include \"openid\"");
        }
        let needs_secret = !matches!(
            self.client_auth,
            Some(ClientAuth::None | ClientAuth::PrivateKeyJwt)
        );
        if needs_secret && self.client_secret_env.is_none() {
            err(
                "client_secret_env",
                "name the variable holding the client secret, or set client_auth = \"none\" or \"private_key_jwt\"",
            );
        }
        let jwt = matches!(self.client_auth, Some(ClientAuth::PrivateKeyJwt));
        if jwt && self.client_key_file.is_none() {
            err("client_key_file", "private_key_jwt needs the client's private key file");
        }
        if !jwt && self.client_key_file.is_some() {
            err("client_key_file", "only used with client_auth = \"private_key_jwt\"");
        }
        if !["ES256", "EdDSA", "RS256"].contains(&self.client_key_algorithm.as_str()) {
            err("client_key_algorithm", "use ES256, EdDSA or RS256");
        }
        let p = &self.paths;
        let all = [
            ("paths.login", &p.login),
            ("paths.callback", &p.callback),
            ("paths.logout", &p.logout),
            ("paths.user", &p.user),
            ("paths.backchannel_logout", &p.backchannel_logout),
        ];
        for (i, (key, path)) in all.iter().enumerate() {
            if !path.starts_with('/') || path.contains(['?', '#']) {
                err(key, "must be a path starting with / (no query)");
            }
            if all[..i].iter().any(|(_, other)| other == path) {
                err(key, "is the same path as another of paths");
            }
        }
        if let Some(u) = &self.public_url {
            match reqwest::Url::parse(u) {
                Ok(url) if url.path() == "/" && url.query().is_none() => {}
                _ => err("public_url", "must be an origin like \"https://app.example.com\""),
            }
        }
        if self.return_to.is_empty() {
            err("return_to", "list at least one local path, e.g. \"/\"");
        }
        for (i, r) in self.return_to.iter().enumerate() {
            if !r.starts_with('/') || r.starts_with("//") || r.contains(['\\', '?', '#']) {
                err(
                    &format!("return_to[{i}]"),
                    "must be a local path starting with a single /",
                );
            }
        }
        if self.cookie.is_empty()
            || !self
                .cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            err("cookie", "use letters, digits, '-', '_' or '.'");
        }
        if self.cookie.starts_with("__Host-") && !self.secure {
            err("secure", "a __Host- cookie must be Secure");
        }
        match (self.store, self.redis_target()) {
            (_, Err(errors)) => {
                for e in errors {
                    err(&e.path, &e.message);
                }
            }
            (StoreKind::Redis, Ok(None)) => err(
                "redis_url",
                "required with store = \"redis\" (or redis_cluster, redis_sentinel)",
            ),
            (StoreKind::Memory, Ok(Some(_))) => err(
                "store",
                "redis_url, redis_cluster and redis_sentinel are only used with store = \"redis\"",
            ),
            _ => {}
        }
        if self.idle_timeout.get().is_zero() {
            err("idle_timeout", "must be greater than 0");
        }
        if self.absolute_timeout.get() < self.idle_timeout.get() {
            err("absolute_timeout", "must be at least idle_timeout");
        }
        if self.login_timeout.get().is_zero() {
            err("login_timeout", "must be greater than 0");
        }
        if self.trusted_origins.is_empty() {
            err(
                "trusted_origins",
                "list the origins of your app's pages (e.g. \"https://app.example.com\"): unsafe requests and logout are refused from any other",
            );
        }
        for (i, o) in self.trusted_origins.iter().enumerate() {
            let ok = reqwest::Url::parse(o).is_ok_and(|u| {
                u.path() == "/" && u.query().is_none() && o.trim_end_matches('/') == o
            });
            if !ok {
                err(
                    &format!("trusted_origins[{i}]"),
                    "must be an origin like \"https://app.example.com\" (no path)",
                );
            }
        }
        if http::HeaderName::from_bytes(self.csrf_header.as_bytes()).is_err() {
            err("csrf_header", "is not a valid header name");
        }
        if self.max_sessions == 0 {
            err("max_sessions", "must be at least 1");
        }
        errors
    }
}
