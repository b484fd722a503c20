use serde::Deserialize;

use crate::conf::{HumanDuration, Parsed};
use crate::key::RequestKey;
use crate::redis_conn::{RedisTarget, SentinelConfig};

/// `[plugins.NAME]` with `type = "quota"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// What a quota is counted per: `"ip"`, `"header:NAME"`, `"claim:NAME"`, `"api_key"`,
    /// `"route"`, or a list of them combined (e.g. `["route", "claim:sub"]`).
    #[serde(default = "default_key")]
    pub key: KeySpec,
    /// Requests allowed per `window` (advertised in `RateLimit-Policy`).
    pub limit: u64,
    /// The sliding window.
    #[serde(default = "default_window")]
    pub window: HumanDuration,
    /// Extra requests tolerated above `limit` within a window, for short spikes.
    #[serde(default)]
    pub burst: u64,
    /// `"local"` (this gateway's memory) or `"redis"` (shared by every gateway on it).
    #[serde(default)]
    pub store: Store,
    /// For `store = "redis"`: `redis://[user:password@]host:port[/db]` or `redis+unix://PATH`
    /// (TLS `rediss://` is not built in and is rejected at load).
    #[serde(default)]
    pub redis_url: Option<String>,
    /// For `store = "redis"` on a Redis Cluster: seed nodes (`redis://host:port`); the rest
    /// of the cluster is learned from them.
    #[serde(default)]
    pub redis_cluster: Option<Vec<String>>,
    /// For `store = "redis"` behind Sentinels: `{ master = "NAME", nodes = ["redis://..."] }`.
    #[serde(default)]
    pub redis_sentinel: Option<SentinelConfig>,
    /// Deadline of one Redis decision; slower answers count as store errors.
    #[serde(default = "default_redis_timeout")]
    pub redis_timeout: HumanDuration,
    /// Prefix of the Redis keys.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// When Redis fails: `"allow"` the request, `"deny"` it (503), or count it in this
    /// gateway's `"local"` store instead.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// When the request lacks the key (no claim, no header): count it per client `"ip"`,
    /// answer 401 (`"unauthorized"`), or answer 429 (`"reject"`). Never a shared bucket.
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Also send `X-RateLimit-Limit/Remaining/Reset`.
    #[serde(default)]
    pub legacy_headers: bool,
    /// Most keys the local store tracks; beyond it the stalest are forgotten.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

impl QuotaConfig {
    /// The Redis the store uses, from `redis_url`, `redis_cluster` or `redis_sentinel`.
    pub fn redis_target(&self) -> Result<Option<RedisTarget>, Vec<crate::BuildError>> {
        RedisTarget::from_keys(
            self.redis_url.as_deref(),
            self.redis_cluster.as_deref(),
            self.redis_sentinel.as_ref(),
        )
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeySpec {
    One(Parsed<RequestKey>),
    Many(Vec<Parsed<RequestKey>>),
}

impl KeySpec {
    /// Each part with its path in the config (`key`, or `key[i]`).
    pub fn parts(&self) -> Vec<(String, &Parsed<RequestKey>)> {
        match self {
            KeySpec::One(k) => vec![("key".to_string(), k)],
            KeySpec::Many(ks) => ks
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("key[{i}]"), k))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Store {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    #[default]
    Allow,
    Deny,
    Local,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    #[default]
    Ip,
    Unauthorized,
    Reject,
}

fn default_key() -> KeySpec {
    KeySpec::One("ip".into())
}
fn default_window() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_redis_timeout() -> HumanDuration {
    HumanDuration::from_millis(50)
}
fn default_key_prefix() -> String {
    "sallyport:quota".into()
}
fn default_max_keys() -> usize {
    100_000
}
