//! The TOML file format: what users write. Read with `deny_unknown_fields` everywhere; every
//! value with a syntax of its own (addresses, CIDRs, endpoints, host patterns, paths, methods,
//! request keys, header names, durations, sizes) becomes a typed value as the file is read
//! ([`Parsed`]), and [`validate`] reports **every** problem with its path. This module is a
//! leaf of the crate: it imports only the path rules (`path`, `router`'s pattern parsers) and
//! the plugin crate. The runtime model compiled from it is the snapshot; pools keep their
//! `UpstreamConfig` and read a few of its plain values (balance, preserve_host, limits) per
//! request.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use http::Method;
use ipnet::IpNet;
use serde::Deserialize;

pub use crate::path::EscapedSlashes;
use crate::router::{HostPattern, RoutePath};
use sallyport_plugins::conf::{ByteSize, HumanDuration};
pub use sallyport_plugins::conf::{ConfigStr, Parsed};
use sallyport_plugins::key::RequestKey;
use sallyport_plugins::PluginConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// `[telemetry]`: OpenTelemetry trace export; absent = no export and no cost.
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
    /// More files (glob patterns relative to this file's folder) whose `[upstreams.*]`,
    /// `[plugins.*]` and `[[routes]]` are merged in (see `source`).
    #[serde(default)]
    pub include: Vec<String>,
}

/// `[telemetry]`: spans exported over OTLP/HTTP (protobuf) to a collector.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's traces URL, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: String,
    /// `http/protobuf` (the only one built in).
    #[serde(default = "default_otlp_protocol")]
    pub protocol: String,
    /// The resource's `service.name`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of traces recorded when the client did not send a sampled `traceparent`
    /// (parent-based: a sampled parent is always recorded).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Headers sent to the collector; `${NAME}` takes the environment variable NAME.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Spans waiting for export at most; beyond, spans are dropped and counted.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    #[serde(default = "default_export_timeout")]
    pub export_timeout: HumanDuration,
    /// Whether the server span carries `enduser.id` (the verified subject: personal data).
    #[serde(default)]
    pub record_enduser: bool,
}

fn default_otlp_protocol() -> String {
    "http/protobuf".into()
}
fn default_service_name() -> String {
    "sallyport".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_max_queue() -> usize {
    4096
}
fn default_export_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

/// `${NAME}` in a value replaced by the environment variable NAME; `Err` names a missing one.
pub fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| "an unclosed ${".to_string())?;
        let name = &rest[start + 2..start + end];
        out.push_str(
            &std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
        );
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn validate_telemetry(t: &TelemetryConfig, errors: &mut Vec<ConfigError>) {
    match t.otlp_endpoint.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
        _ => errors.push(ConfigError::new(
            "telemetry.otlp_endpoint",
            "must be an http(s) URL, e.g. \"http://127.0.0.1:4318/v1/traces\"",
        )),
    }
    if t.protocol != "http/protobuf" {
        errors.push(ConfigError::new(
            "telemetry.protocol",
            format!("{:?} is not supported; use \"http/protobuf\"", t.protocol),
        ));
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        errors.push(ConfigError::new(
            "telemetry.sample_ratio",
            "must be from 0 to 1",
        ));
    }
    if t.max_queue == 0 {
        errors.push(ConfigError::new(
            "telemetry.max_queue",
            "must be at least 1",
        ));
    }
    if t.export_timeout.get().is_zero() {
        errors.push(ConfigError::new(
            "telemetry.export_timeout",
            "must be greater than 0",
        ));
    }
    if t.service_name.is_empty() {
        errors.push(ConfigError::new(
            "telemetry.service_name",
            "must not be empty",
        ));
    }
    for (name, value) in &t.headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            errors.push(ConfigError::new(
                format!("telemetry.headers.{name:?}"),
                "is not a header name",
            ));
        }
        match expand_env(value) {
            Err(e) => errors.push(ConfigError::new(format!("telemetry.headers.{name:?}"), e)),
            Ok(v) if http::HeaderValue::from_str(&v).is_err() => errors.push(ConfigError::new(
                format!("telemetry.headers.{name:?}"),
                "is not a valid header value (after ${} expansion)",
            )),
            Ok(_) => {}
        }
    }
}

/// `[server]`: listeners and process-wide settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain HTTP listeners, `"ip:port"`.
    pub listen: Vec<Parsed<SocketAddr>>,
    /// Reload by itself when the config file or an included file changes (also a
    /// Kubernetes ConfigMap's atomic symlink swap), as a SIGHUP would.
    #[serde(default)]
    pub watch: bool,
    /// Plain listeners also accept HTTP/2 with prior knowledge (h2c); HTTP/1 keeps working
    /// on the same port.
    #[serde(default)]
    pub h2c: bool,
    /// Streams one HTTP/2 client connection may have open at once (SETTINGS_MAX_CONCURRENT_
    /// STREAMS, RFC 9113 6.5.2); more are refused with REFUSED_STREAM.
    #[serde(default = "default_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// Name servers (`"ip:port"`) that resolve endpoints written as host names; empty: the
    /// system's (`/etc/resolv.conf`, and `/etc/hosts`).
    #[serde(default)]
    pub dns_resolvers: Vec<Parsed<SocketAddr>>,
    /// TLS listeners: `[[server.tls]] listen = "..", cert = "..", key = ".."`.
    #[serde(default)]
    pub tls: Vec<TlsListener>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`) as `"ip:port"`; `"off"` disables
    /// it.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: Parsed<AdminListen>,
    /// Worker threads of the proxy service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Let idle worker threads steal tasks from busy ones. Off by default: a runtime per
    /// thread served 1.15x the requests at 0.89x the CPU per request with two threads
    /// (bench/run, threads-2); turn it on when a few long connections carry most of the work.
    #[serde(default)]
    pub work_stealing: bool,
    /// How long in-flight requests may take to finish on SIGTERM or upgrade.
    #[serde(default = "default_grace_period")]
    pub grace_period: HumanDuration,
    /// Largest request body accepted; larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Client connections open at once; beyond it new ones are closed at accept (counted in
    /// `sallyport_connections_refused_total`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a whole request head (from accept, or from its first byte
    /// on a kept-alive connection); beyond it: 408 and the connection closes.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// Time a client has to send a request body, extended by one second per
    /// `body_min_rate` bytes received; beyond it: 408, and the upstream connection is
    /// released.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: HumanDuration,
    /// Bytes per second that extend `body_timeout` (a large upload at a fair rate finishes;
    /// a trickle does not); `0` makes `body_timeout` a fixed deadline.
    #[serde(default = "default_body_min_rate")]
    pub body_min_rate: ByteSize,
    /// How long a kept-alive client connection may wait for its next request.
    #[serde(default = "default_client_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Read buffer of each client connection, allocated when it is accepted and held while
    /// it stays open; `0` reads straight into the request buffers.
    #[serde(default = "default_read_buffer")]
    pub read_buffer: ByteSize,
    /// Peers whose `X-Forwarded-For` (or `Forwarded`) is believed, as CIDRs or addresses.
    #[serde(default)]
    pub trusted_proxies: Vec<Parsed<IpNet>>,
    /// Client networks whose connections are closed at accept, before TLS and before any
    /// request is read (reloadable). Counted in `sallyport_connections_denied_total`.
    #[serde(default)]
    pub deny_connections: Vec<Parsed<IpNet>>,
    /// Which header names the client behind `trusted_proxies`: `"x-forwarded-for"` or the
    /// RFC 7239 `"forwarded"`. Only this one is read, never both.
    #[serde(default)]
    pub client_ip_header: ClientIpHeader,
    /// Plugins that run first on every route, in order.
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Where access-log lines go: `"stdout"`, `"off"`, or a file path containing a `/`
    /// (`"/var/log/sallyport/access.log"`, `"./access.log"`), appended to.
    #[serde(default = "default_access_log")]
    pub access_log: Parsed<AccessLogTarget>,
    /// Access-log lines that may wait for the writer thread; beyond, lines are dropped (and
    /// counted in `sallyport_access_log_dropped_total`) rather than slow a request down.
    #[serde(default = "default_access_log_queue")]
    pub access_log_queue: usize,
    /// What to do with `%2F` in request paths: `"decode"` (treat as `/`, then normalise),
    /// `"reject"` (400), or `"keep"` (leave encoded, part of the segment).
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// Directory of this instance's run files (`upgrade.sock`, `sallyport.pid`). Default: a
    /// directory in the system's temp dir named after the config file's absolute path, so
    /// two instances with different config files never share them.
    #[serde(default)]
    pub run_dir: Option<String>,
    /// Unix socket used to hand listeners to a new process on upgrade (`-u`); overrides
    /// `run_dir`'s `upgrade.sock`. Absolute.
    #[serde(default)]
    pub upgrade_sock: Option<String>,
    /// File holding the running process's pid; overrides `run_dir`'s `sallyport.pid`.
    /// Absolute.
    #[serde(default)]
    pub pid_file: Option<String>,
}

/// Where one instance keeps its upgrade socket and pid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFiles {
    pub upgrade_sock: String,
    pub pid_file: String,
}

impl RunFiles {
    /// The run files of the instance started with `config_path`.
    pub fn of(server: &ServerConfig, config_path: &Path) -> RunFiles {
        let dir = match &server.run_dir {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                let absolute = std::fs::canonicalize(config_path)
                    .unwrap_or_else(|_| config_path.to_path_buf());
                std::env::temp_dir().join(format!(
                    "sallyport-{:016x}",
                    fnv1a(absolute.as_os_str().as_encoded_bytes())
                ))
            }
        };
        let in_dir = |name: &str| dir.join(name).display().to_string();
        RunFiles {
            upgrade_sock: server
                .upgrade_sock
                .clone()
                .unwrap_or_else(|| in_dir("upgrade.sock")),
            pid_file: server
                .pid_file
                .clone()
                .unwrap_or_else(|| in_dir("sallyport.pid")),
        }
    }
}

/// FNV-1a, 64 bits: a hash that every build of the gateway computes alike (the old and the
/// new binary of an upgrade must derive the same socket path; std's hasher promises no such
/// stability).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    pub listen: Parsed<SocketAddr>,
    pub cert: String,
    pub key: String,
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`).
    #[serde(default = "default_true")]
    pub http2: bool,
    /// More certificates, chosen by the client's SNI: exact names beat `*.suffix` wildcards;
    /// `cert`/`key` above is the default (no SNI, or no match). Re-read on reload.
    #[serde(default)]
    pub certs: Vec<SniCert>,
    /// Client certificates (mTLS): `none`, `optional` (verified when sent) or `require`.
    #[serde(default)]
    pub client_auth: ClientAuthMode,
    /// PEM file of the CAs that sign client certificates (with `client_auth`).
    #[serde(default)]
    pub client_ca: Option<String>,
    /// A header sent upstream with the subject of the client's verified certificate
    /// (`CN=alice, O=Acme`); removed from every client request, so only the gateway sets it.
    #[serde(default)]
    pub forward_client_cert: Option<Parsed<http::HeaderName>>,
}

impl TlsListener {
    /// The `forward_client_cert` header, when set and valid.
    pub fn client_cert_header(&self) -> Option<&http::HeaderName> {
        self.forward_client_cert.as_ref()?.value().ok()
    }
}

/// One SNI certificate of a TLS listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// Exact host names (`api.example.com`) or one-label wildcards (`*.example.org`).
    pub names: Vec<String>,
    pub cert: String,
    pub key: String,
}

/// `client_auth` of a TLS listener.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    #[default]
    None,
    Optional,
    Require,
}

/// `server.client_ip_header`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum ClientIpHeader {
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// `[upstreams.NAME]`: a pool of endpoints.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `"host:port"`, optionally weighted: `"host:port@3"`.
    pub endpoints: Vec<Parsed<EndpointSpec>>,
    #[serde(default)]
    pub balance: Balance,
    /// For `consistent_hash`: `ip`, `header:NAME` or `claim:NAME`.
    #[serde(default)]
    pub hash_key: Option<Parsed<RequestKey>>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    #[serde(default = "default_read_timeout")]
    pub read_timeout: HumanDuration,
    #[serde(default = "default_read_timeout")]
    pub write_timeout: HumanDuration,
    /// How long an idle pooled connection to an endpoint is kept.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Further tries after a failed connect (the older spelling of `retry.attempts - 1`).
    #[serde(default)]
    pub retries: Option<usize>,
    /// Speak TLS to the endpoints.
    #[serde(default)]
    pub tls: bool,
    /// `http1` (default), `h2` (TLS with ALPN h2, or h2c with prior knowledge without TLS),
    /// or `auto` (TLS ALPN offers h2 and http/1.1; HTTP/1.1 without TLS).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Concurrent streams the gateway opens on one HTTP/2 connection to an endpoint.
    #[serde(default = "default_max_h2_streams")]
    pub max_h2_streams: usize,
    /// SNI (and certificate name) for TLS; defaults to the endpoint's host name as written
    /// in `endpoints` (its IP address when written as one).
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the endpoints' certificates and host names (TLS only). Default: true.
    #[serde(default)]
    pub verify: Option<bool>,
    /// PEM file of the CAs that sign the endpoints' certificates (instead of the system's).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM certificate chain (leaf first) the gateway presents to the endpoints (mTLS).
    #[serde(default)]
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
    /// Send the client's `Host` upstream (`true`), or the endpoint's host as written in
    /// `endpoints` (`false`, for virtual-hosted upstreams).
    #[serde(default = "default_true")]
    pub preserve_host: bool,
    /// Active health checks; without this table endpoints count as healthy.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Passive health: endpoints that fail real traffic are ejected for a while.
    #[serde(default)]
    pub outlier: Option<OutlierConfig>,
    /// When and how a failed try is repeated; without it, a failed connect is tried once more.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Load limits of the pool (a circuit breaker on concurrency).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How often endpoints written as host names are resolved again (every A/AAAA record is
    /// an endpoint); at least 1s.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval: HumanDuration,
}

fn default_access_log_queue() -> usize {
    16_384
}

fn default_h2_max_concurrent_streams() -> u32 {
    100
}

/// `upstreams.NAME.protocol`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2,
    Auto,
}

fn default_max_h2_streams() -> usize {
    100
}

/// The shortest `resolve_interval`: a fleet must not flood its name servers.
pub const MIN_RESOLVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn default_resolve_interval() -> HumanDuration {
    HumanDuration::from_secs(10)
}

impl UpstreamConfig {
    /// Total tries of one request: `retry.attempts`, else `retries + 1`, else 2.
    pub fn attempts(&self) -> usize {
        match (&self.retry, self.retries) {
            (
                Some(RetryConfig {
                    attempts: Some(n), ..
                }),
                _,
            ) => *n,
            (_, Some(r)) => r.saturating_add(1),
            _ => DEFAULT_ATTEMPTS,
        }
        .min(MAX_ATTEMPTS)
    }
}

/// A failed connect is tried once more on another endpoint unless configured otherwise.
const DEFAULT_ATTEMPTS: usize = 2;
/// Pingora's `max_retries` (tries of one request), which the gateway keeps at its default.
pub const MAX_ATTEMPTS: usize = 16;

/// `[upstreams.NAME.outlier]`: passive health.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row (connect errors, timeouts, resets, `failure_statuses`) that eject
    /// an endpoint.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u16>,
    /// Ejection time = `base_ejection` x times ejected, at most `max_ejection`, plus jitter.
    #[serde(default = "default_base_ejection")]
    pub base_ejection: HumanDuration,
    #[serde(default = "default_max_ejection")]
    pub max_ejection: HumanDuration,
    /// Never eject more than this share of the pool; at least one endpoint always stays.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

/// `[upstreams.NAME.retry]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total tries, the first included.
    #[serde(default)]
    pub attempts: Option<usize>,
    /// `connect_failure`, `timeout`, `reset`, `502`, `503`, `504`.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<Parsed<RetryCondition>>,
    /// Only idempotent methods are retried after the request may have reached an endpoint;
    /// `false` also retries requests that carry an `Idempotency-Key`.
    #[serde(default = "default_true")]
    pub idempotent_only: bool,
    /// Deadline of one try (connect and each read/write), within the route's `timeout`.
    #[serde(default)]
    pub per_try_timeout: Option<HumanDuration>,
    #[serde(default)]
    pub backoff: BackoffConfig,
    #[serde(default)]
    pub budget: BudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: None,
            retry_on: default_retry_on(),
            idempotent_only: true,
            per_try_timeout: None,
            backoff: BackoffConfig::default(),
            budget: BudgetConfig::default(),
        }
    }
}

/// Full-jitter exponential backoff between tries: a random wait up to
/// `min(max, base x 2^(retry - 1))`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(default = "default_backoff_base")]
    pub base: HumanDuration,
    #[serde(default = "default_backoff_max")]
    pub max: HumanDuration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

/// Retries a pool may add: at most `ratio` x its requests plus `min_per_second` x 10 over the
/// last 10 seconds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    #[serde(default = "default_budget_ratio")]
    pub ratio: f64,
    #[serde(default = "default_budget_min")]
    pub min_per_second: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: default_budget_ratio(),
            min_per_second: default_budget_min(),
        }
    }
}

/// `[upstreams.NAME.limits]`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests in flight to the pool beyond which new ones get 503 `upstream_overloaded`.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
}

/// A failure that `retry_on` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCondition {
    /// The connection could not be made (refused, unreachable, connect timeout).
    ConnectFailure,
    /// Connected, then no answer within the try's read or write deadline.
    Timeout,
    /// Connected, then the connection was reset or closed before an answer.
    Reset,
    /// The endpoint answered 502, 503 or 504.
    Status(u16),
}

impl ConfigStr for RetryCondition {
    fn parse_config(s: &str) -> Result<Self, String> {
        Ok(match s {
            "connect_failure" => RetryCondition::ConnectFailure,
            "timeout" => RetryCondition::Timeout,
            "reset" => RetryCondition::Reset,
            "502" => RetryCondition::Status(502),
            "503" => RetryCondition::Status(503),
            "504" => RetryCondition::Status(504),
            other => {
                return Err(format!(
                    "unknown retry condition {other:?}: use connect_failure, timeout, reset, \
                     \"502\", \"503\" or \"504\""
                ))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    ConsistentHash,
    /// The less loaded of two random endpoints (requests in flight).
    LeastRequest,
    /// The cheaper of two random endpoints: peak-EWMA latency x (requests in flight + 1).
    Ewma,
}

/// `[upstreams.NAME.health]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(rename = "type", default)]
    pub kind: HealthKind,
    /// Path requested by HTTP checks.
    #[serde(default = "default_health_path")]
    pub path: Parsed<HealthPath>,
    /// `Host` header of HTTP checks.
    #[serde(default = "default_health_host")]
    pub host: String,
    /// Statuses that count as healthy; empty means any 2xx.
    #[serde(default)]
    pub expected_status: Vec<u16>,
    #[serde(default = "default_health_interval")]
    pub interval: HumanDuration,
    /// Connect and read deadline of one check.
    #[serde(default = "default_health_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive failures that eject an endpoint.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: usize,
    /// Consecutive successes that re-admit it.
    #[serde(default = "default_healthy_after")]
    pub healthy_after: usize,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    #[default]
    Http,
    Tcp,
}

/// `[[routes]]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// One host pattern: exact (`api.example.com`) or wildcard (`*.example.com`).
    #[serde(default)]
    pub host: Option<Parsed<HostPattern>>,
    /// Several host patterns.
    #[serde(default)]
    pub hosts: Vec<Parsed<HostPattern>>,
    /// Matches this path and everything below it (on segment boundaries).
    #[serde(default)]
    pub path_prefix: Option<Parsed<RoutePath>>,
    /// Matches exactly this path.
    #[serde(default)]
    pub path: Option<Parsed<RoutePath>>,
    /// Accepted methods; empty accepts any.
    #[serde(default)]
    pub methods: Vec<Parsed<Method>>,
    #[serde(default)]
    pub upstream: Option<String>,
    /// Replaces the matched prefix (or exact path) before proxying.
    #[serde(default)]
    pub rewrite_prefix: Option<Parsed<RoutePath>>,
    #[serde(default)]
    pub plugins: Vec<String>,
    /// Deadline of the whole exchange with the upstream, across every try: no retry starts
    /// after it, and each try's timeouts are cut to the time left.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// How long an upgraded connection (WebSocket) may stay quiet in either direction before
    /// the gateway closes it; replaces the pool's read and write timeouts after the upgrade.
    #[serde(default = "default_websocket_idle")]
    pub websocket_idle_timeout: HumanDuration,
    /// A gRPC route: errors the gateway makes are gRPC errors (HTTP 200 with `grpc-status`),
    /// `grpc-timeout` bounds the call, and gRPC-web requests are bridged to gRPC.
    #[serde(default)]
    pub grpc: bool,
}

fn default_websocket_idle() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

impl RouteConfig {
    /// The route's host patterns, each with its path (`host`, or `hosts[i]`).
    pub fn host_patterns(&self) -> impl Iterator<Item = (String, &Parsed<HostPattern>)> {
        self.host.iter().map(|h| ("host".to_string(), h)).chain(
            self.hosts
                .iter()
                .enumerate()
                .map(|(j, h)| (format!("hosts[{j}]"), h)),
        )
    }

    /// What the route's path matches. The one place that reads `path` and `path_prefix`:
    /// validation and the router both take it from here.
    pub fn path_rule(&self) -> Result<PathRule, ConfigError> {
        let (exact, key, written) = match (&self.path, &self.path_prefix) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "path",
                    "set either path or path_prefix, not both",
                ))
            }
            (Some(p), None) => (true, "path", Some(p)),
            (None, Some(p)) => (false, "path_prefix", Some(p)),
            (None, None) => (false, "path_prefix", None),
        };
        let path = match written.map(Parsed::value) {
            None => "/".to_string(),
            Some(Ok(p)) => p.0.clone(),
            Some(Err(m)) => return Err(ConfigError::new(key, m)),
        };
        if crate::router::is_template(&path) {
            if !exact {
                return Err(ConfigError::new(
                    key,
                    "{name} parameters are only allowed in an exact path",
                ));
            }
            crate::router::check_template(&path).map_err(|m| ConfigError::new(key, m))?;
        }
        Ok(PathRule { exact, path })
    }
}

/// A route's path match: an exact path, or a prefix matched on segment boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathRule {
    pub exact: bool,
    /// Normalised (`/a/./b/` is `/a/b/`).
    pub path: String,
}

impl PathRule {
    /// The path as matched: a prefix loses its trailing slash (`/api/` matches what `/api`
    /// does), except the root `/`.
    pub fn matched(&self) -> &str {
        if self.exact || self.path == "/" {
            &self.path
        } else {
            self.path.trim_end_matches('/')
        }
    }
}

/// `server.admin_listen`: an address, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminListen {
    Off,
    At(SocketAddr),
}

impl ConfigStr for AdminListen {
    fn parse_config(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" => Err("write \"off\" to disable the admin listener, or an address like \"127.0.0.1:9090\"".into()),
            ADMIN_OFF => Ok(AdminListen::Off),
            _ => SocketAddr::parse_config(s).map(AdminListen::At),
        }
    }
}

/// An upstream endpoint as written: `"ip:port"` or `"host:port"`, optionally weighted
/// (`"host:port@3"`). A host name is not resolved here: the pool resolves it, again every
/// `resolve_interval`, and every address it has is an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// `host:port` as written, without the weight.
    pub hostport: String,
    /// The address, when written as one.
    pub addr: Option<SocketAddr>,
    /// The host as written (no brackets around an IPv6 address), lowercased when a name.
    pub host: String,
    pub port: u16,
    pub weight: usize,
}

impl ConfigStr for EndpointSpec {
    fn parse_config(s: &str) -> Result<Self, String> {
        parse_endpoint(s)
    }
}

/// An HTTP health-check path as the request target it becomes: starts with `/` and is a
/// valid URI (`/healthz`, `/status?full=1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPath(pub http::Uri);

impl ConfigStr for HealthPath {
    fn parse_config(path: &str) -> Result<Self, String> {
        if !path.starts_with('/') {
            return Err(format!("{path:?} must start with /"));
        }
        path.parse::<http::Uri>()
            .map(HealthPath)
            .map_err(|e| format!("{path:?} is not a valid request path: {e}"))
    }
}

fn default_true() -> bool {
    true
}
fn default_admin_listen() -> Parsed<AdminListen> {
    Parsed::new("127.0.0.1:9090")
}
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
fn default_grace_period() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_body_timeout() -> HumanDuration {
    HumanDuration::from_secs(20)
}
fn default_body_min_rate() -> ByteSize {
    ByteSize(500)
}
fn default_client_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_read_buffer() -> ByteSize {
    ByteSize(0)
}
fn default_access_log() -> Parsed<AccessLogTarget> {
    Parsed::new("stdout")
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_read_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_failure_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_base_ejection() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_ejection() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_max_ejected_percent() -> u32 {
    50
}
fn default_retry_on() -> Vec<Parsed<RetryCondition>> {
    vec![Parsed::new("connect_failure")]
}
fn default_backoff_base() -> HumanDuration {
    HumanDuration::from_millis(25)
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration::from_millis(250)
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_budget_min() -> u32 {
    10
}
fn default_health_path() -> Parsed<HealthPath> {
    Parsed::new("/")
}
fn default_health_host() -> String {
    "localhost".into()
}
fn default_health_interval() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_unhealthy_after() -> usize {
    3
}
fn default_healthy_after() -> usize {
    2
}

/// One problem in a config file, with the path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Reads and parses a config file (syntax and types only; see [`validate`]).
pub fn read(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
    parse(&text)
}

/// Parses config text (syntax and types only; see [`validate`]).
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let de = toml::Deserializer::parse(text).map_err(|e| toml_error(text, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = toml_message(text, &inner);
        ConfigErrors(vec![ConfigError::new(
            if path == "." { String::new() } else { path },
            message,
        )])
    })
}

fn toml_error(text: &str, e: &toml::de::Error) -> ConfigErrors {
    ConfigErrors(vec![ConfigError::new("", toml_message(text, e))])
}

/// The error message with its line and column, when toml knows the span.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{msg} (line {line})")
        }
        None => msg,
    }
}

/// Reads, parses and validates a config file: `Ok` only when the gateway can run on it.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let config = read(path)?;
    let errors = validate(&config);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Checks everything types cannot: references between tables, addresses, ranges, paths,
/// conflicts. Returns every problem found, each with its path.
pub fn validate(config: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    validate_server(config, &mut errors);
    if let Some(t) = &config.telemetry {
        validate_telemetry(t, &mut errors);
    }
    for (name, up) in &config.upstreams {
        validate_upstream(&format!("upstreams.{name}"), up, &mut errors);
    }
    let mut responders = HashSet::new();
    for (name, plugin) in &config.plugins {
        if plugin.responds() {
            responders.insert(name.as_str());
        }
        for e in plugin.validate() {
            errors.push(ConfigError::new(
                format!("plugins.{name}.{}", e.path),
                e.message,
            ));
        }
        for (path, upstream) in plugin.upstream_refs() {
            if !config.upstreams.contains_key(&upstream) {
                errors.push(ConfigError::new(
                    format!("plugins.{name}.{path}"),
                    format!("unknown upstream {upstream:?}"),
                ));
            }
        }
    }
    validate_routes(config, &responders, &mut errors);
    errors
}

fn validate_server(config: &Config, errors: &mut Vec<ConfigError>) {
    let s = &config.server;
    if s.listen.is_empty() && s.tls.is_empty() {
        errors.push(ConfigError::new(
            "server.listen",
            "at least one listener is required, e.g. [\"127.0.0.1:8080\"]",
        ));
    }
    let mut seen = HashSet::new();
    for (i, addr) in s.listen.iter().enumerate() {
        check_listen_addr(&format!("server.listen[{i}]"), addr, &mut seen, errors);
    }
    if s.access_log_queue == 0 {
        errors.push(ConfigError::new(
            "server.access_log_queue",
            "must be at least 1",
        ));
    }
    if s.h2_max_concurrent_streams == 0 {
        errors.push(ConfigError::new(
            "server.h2_max_concurrent_streams",
            "must be at least 1",
        ));
    }
    for (i, r) in s.dns_resolvers.iter().enumerate() {
        if let Err(m) = r.value() {
            errors.push(ConfigError::new(format!("server.dns_resolvers[{i}]"), m));
        }
    }
    for (i, tls) in s.tls.iter().enumerate() {
        check_listen_addr(
            &format!("server.tls[{i}].listen"),
            &tls.listen,
            &mut seen,
            errors,
        );
        for (key, file) in [("cert", &tls.cert), ("key", &tls.key)] {
            if !Path::new(file).is_file() {
                errors.push(ConfigError::new(
                    format!("server.tls[{i}].{key}"),
                    format!("no such file: {file}"),
                ));
            }
        }
    }
    match s.admin_listen.value() {
        Ok(AdminListen::At(addr)) => {
            if addr.port() != 0 && !seen.insert(*addr) {
                errors.push(ConfigError::new(
                    "server.admin_listen",
                    format!("{addr} is used twice"),
                ));
            }
        }
        Ok(AdminListen::Off) => {}
        Err(m) => errors.push(ConfigError::new("server.admin_listen", m)),
    }
    report("server.access_log", &s.access_log, errors);
    if s.threads == 0 {
        errors.push(ConfigError::new("server.threads", "must be at least 1"));
    }
    if s.max_connections == 0 {
        errors.push(ConfigError::new(
            "server.max_connections",
            "must be at least 1",
        ));
    }
    for (key, d) in [
        ("header_timeout", s.header_timeout),
        ("body_timeout", s.body_timeout),
        ("idle_timeout", s.idle_timeout),
    ] {
        if d.get().is_zero() {
            errors.push(ConfigError::new(
                format!("server.{key}"),
                "must be greater than 0",
            ));
        }
    }
    if s.max_body.get() == 0 {
        errors.push(ConfigError::new(
            "server.max_body",
            "must be greater than 0",
        ));
    }
    if s.read_buffer.get() > 1 << 20 {
        errors.push(ConfigError::new(
            "server.read_buffer",
            "must be at most 1MiB (it is allocated for every open client connection)",
        ));
    }
    for (i, p) in s.trusted_proxies.iter().enumerate() {
        report(&format!("server.trusted_proxies[{i}]"), p, errors);
    }
    for (i, p) in s.deny_connections.iter().enumerate() {
        report(&format!("server.deny_connections[{i}]"), p, errors);
    }
    for (i, p) in s.plugins.iter().enumerate() {
        if !config.plugins.contains_key(p) {
            errors.push(unknown_plugin(&format!("server.plugins[{i}]"), p, config));
        }
    }
    for (key, value) in [
        ("run_dir", &s.run_dir),
        ("upgrade_sock", &s.upgrade_sock),
        ("pid_file", &s.pid_file),
    ] {
        if value.as_ref().is_some_and(|v| !v.starts_with('/')) {
            errors.push(ConfigError::new(
                format!("server.{key}"),
                "must be an absolute path",
            ));
        }
    }
}

/// Reports a value that did not parse, at `path`.
fn report<T>(path: &str, value: &Parsed<T>, errors: &mut Vec<ConfigError>) {
    if let Some(m) = value.error() {
        errors.push(ConfigError::new(path, m));
    }
}

fn check_listen_addr(
    path: &str,
    addr: &Parsed<SocketAddr>,
    seen: &mut HashSet<SocketAddr>,
    errors: &mut Vec<ConfigError>,
) {
    match addr.value() {
        Ok(a) => {
            // Port 0 means "any free port": two of them never collide.
            if a.port() != 0 && !seen.insert(*a) {
                errors.push(ConfigError::new(path, format!("{a} is used twice")));
            }
        }
        Err(m) => errors.push(ConfigError::new(path, m)),
    }
}

/// `server.admin_listen` value that disables the admin listener.
pub const ADMIN_OFF: &str = "off";

/// Where `server.access_log` sends lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(std::path::PathBuf),
}

/// `server.access_log`: `"stdout"`, `"off"`, or a file path with a `/` in it whose directory
/// exists (so a typo such as `"stdot"` is an error, not a file of that name).
impl ConfigStr for AccessLogTarget {
    fn parse_config(value: &str) -> Result<Self, String> {
        match value {
            "off" => Ok(AccessLogTarget::Off),
            "stdout" => Ok(AccessLogTarget::Stdout),
            path if path.contains('/') => {
                let p = Path::new(path);
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                if p.file_name().is_none() {
                    Err(format!("{path:?} names a directory, not a file"))
                } else if !dir.is_dir() {
                    Err(format!("the directory of {path:?} does not exist"))
                } else {
                    Ok(AccessLogTarget::File(p.to_path_buf()))
                }
            }
            other => Err(format!(
                "{other:?} is not \"stdout\", \"off\" or a file path (a path contains a /, e.g. \"./access.log\")"
            )),
        }
    }
}

fn unknown_plugin(path: &str, name: &str, config: &Config) -> ConfigError {
    let known: Vec<&str> = config.plugins.keys().map(String::as_str).collect();
    ConfigError::new(
        path,
        format!(
            "unknown plugin {name:?}; defined plugins: [{}]",
            known.join(", ")
        ),
    )
}

/// An endpoint `"host:port"` or `"host:port@weight"`.
fn parse_endpoint(s: &str) -> Result<EndpointSpec, String> {
    let (hostport, weight) = match s.rsplit_once('@') {
        Some((a, w)) => {
            let w: usize = w
                .parse()
                .map_err(|_| format!("weight {w:?} in {s:?} is not a whole number"))?;
            if w == 0 || w > 1000 {
                return Err(format!("weight in {s:?} must be between 1 and 1000"));
            }
            (a.trim(), w)
        }
        None => (s.trim(), 1),
    };
    if let Ok(a) = hostport.parse::<SocketAddr>() {
        return Ok(EndpointSpec {
            hostport: hostport.to_string(),
            addr: Some(a),
            host: a.ip().to_string(),
            port: a.port(),
            weight,
        });
    }
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return Err(format!("{s:?} has no port; write \"host:port\""));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("port {port:?} in {s:?} is not a port number")),
    };
    let labels_ok = !host.is_empty()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !labels_ok || host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{host:?} in {s:?} is neither an IP address (IPv6 in brackets: \"[::1]:8080\") nor a host name"
        ));
    }
    Ok(EndpointSpec {
        hostport: hostport.to_string(),
        addr: None,
        host: host.to_ascii_lowercase(),
        port,
        weight,
    })
}

fn validate_upstream(path: &str, up: &UpstreamConfig, errors: &mut Vec<ConfigError>) {
    if up.endpoints.is_empty() {
        errors.push(ConfigError::new(
            format!("{path}.endpoints"),
            "at least one endpoint is required",
        ));
    }
    let mut seen = HashSet::new();
    for (i, e) in up.endpoints.iter().enumerate() {
        match e.value() {
            Ok(spec) => {
                if !seen.insert((spec.host.clone(), spec.port)) {
                    errors.push(ConfigError::new(
                        format!("{path}.endpoints[{i}]"),
                        format!("{} is listed twice", e.text()),
                    ));
                }
            }
            Err(m) => errors.push(ConfigError::new(format!("{path}.endpoints[{i}]"), m)),
        }
    }
    if up.max_h2_streams == 0 {
        errors.push(ConfigError::new(
            format!("{path}.max_h2_streams"),
            "must be at least 1",
        ));
    }
    if up.resolve_interval.get() < MIN_RESOLVE_INTERVAL {
        errors.push(ConfigError::new(
            format!("{path}.resolve_interval"),
            "must be at least 1s",
        ));
    }
    match (&up.balance, &up.hash_key) {
        (Balance::ConsistentHash, Some(k)) => match k.value() {
            Ok(RequestKey::Ip | RequestKey::Header(_) | RequestKey::Claim(_)) => {}
            Ok(_) => errors.push(ConfigError::new(
                format!("{path}.hash_key"),
                "use \"ip\", \"header:NAME\" or \"claim:NAME\"",
            )),
            Err(m) => errors.push(ConfigError::new(format!("{path}.hash_key"), m)),
        },
        (Balance::ConsistentHash, None) => {}
        (_, Some(_)) => errors.push(ConfigError::new(
            format!("{path}.hash_key"),
            "only used with balance = \"consistent_hash\"",
        )),
        (_, None) => {}
    }
    for (key, d) in [
        ("connect_timeout", up.connect_timeout),
        ("read_timeout", up.read_timeout),
        ("write_timeout", up.write_timeout),
        ("idle_timeout", up.idle_timeout),
    ] {
        if d.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "must be greater than 0",
            ));
        }
    }
    for (key, set) in [
        ("sni", up.sni.is_some()),
        ("verify", up.verify.is_some()),
        ("ca_file", up.ca_file.is_some()),
        ("client_cert", up.client_cert.is_some()),
        ("client_key", up.client_key.is_some()),
    ] {
        if set && !up.tls {
            errors.push(ConfigError::new(
                format!("{path}.{key}"),
                "only used with tls = true",
            ));
        }
    }
    if up.client_cert.is_some() != up.client_key.is_some() {
        errors.push(ConfigError::new(
            format!("{path}.client_key"),
            "client_cert and client_key go together",
        ));
    }
    if let Some(f) = &up.ca_file {
        if let Err(m) = read_certs(f) {
            errors.push(ConfigError::new(format!("{path}.ca_file"), m));
        }
    }
    if let Some(f) = &up.client_cert {
        if let Err(m) = read_certs(f) {
            errors.push(ConfigError::new(format!("{path}.client_cert"), m));
        }
    }
    if let Some(f) = &up.client_key {
        if let Err(m) = read_key(f) {
            errors.push(ConfigError::new(format!("{path}.client_key"), m));
        }
    }
    if let Some(h) = &up.health {
        let hp = format!("{path}.health");
        if h.interval.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{hp}.interval"),
                "must be greater than 0",
            ));
        }
        if h.timeout.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{hp}.timeout"),
                "must be greater than 0",
            ));
        }
        if h.unhealthy_after == 0 {
            errors.push(ConfigError::new(
                format!("{hp}.unhealthy_after"),
                "must be at least 1",
            ));
        }
        if h.healthy_after == 0 {
            errors.push(ConfigError::new(
                format!("{hp}.healthy_after"),
                "must be at least 1",
            ));
        }
        if h.kind == HealthKind::Http {
            report(&format!("{hp}.path"), &h.path, errors);
        }
        for (i, s) in h.expected_status.iter().enumerate() {
            if !(100..=599).contains(s) {
                errors.push(ConfigError::new(
                    format!("{hp}.expected_status[{i}]"),
                    format!("{s} is not an HTTP status"),
                ));
            }
        }
    }
    validate_resilience(path, up, errors);
}

/// The DER certificates of a PEM file, each checked to be a readable X.509 certificate.
pub fn read_certs(path: &str) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path}: {e}"))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{path}: not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path}: no certificate in it"));
    }
    for der in &certs {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("{path}: a certificate cannot be parsed: {e}"))?;
    }
    Ok(certs)
}

/// The DER private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_file(path)
        .map(|k| k.secret_der().to_vec())
        .map_err(|e| format!("{path}: no private key read: {e}"))
}

/// `outlier`, `retry` (and the older `retries`), `limits`.
fn validate_resilience(path: &str, up: &UpstreamConfig, errors: &mut Vec<ConfigError>) {
    let mut err = |key: &str, m: &str| errors.push(ConfigError::new(format!("{path}.{key}"), m));
    if let Some(o) = &up.outlier {
        if o.consecutive_failures == 0 {
            err("outlier.consecutive_failures", "must be at least 1");
        }
        if o.failure_statuses.is_empty() {
            err(
                "outlier.failure_statuses",
                "name at least one status (e.g. 503)",
            );
        }
        for (i, s) in o.failure_statuses.iter().enumerate() {
            if !(400..=599).contains(s) {
                err(
                    &format!("outlier.failure_statuses[{i}]"),
                    &format!("{s} is not an error status (400-599)"),
                );
            }
        }
        if o.base_ejection.get().is_zero() {
            err("outlier.base_ejection", "must be greater than 0");
        }
        if o.max_ejection.get() < o.base_ejection.get() {
            err("outlier.max_ejection", "must be at least base_ejection");
        }
        if o.max_ejected_percent > 100 {
            err("outlier.max_ejected_percent", "must be between 0 and 100");
        }
    }
    if up.retries.is_some_and(|r| r >= MAX_ATTEMPTS) {
        err(
            "retries",
            &format!(
                "at most {} (Pingora's limit of tries per request)",
                MAX_ATTEMPTS - 1
            ),
        );
    }
    if let Some(r) = &up.retry {
        if r.attempts.is_some() && up.retries.is_some() {
            err(
                "retries",
                "set either retries or retry.attempts (retries = N means attempts = N + 1)",
            );
        }
        match r.attempts {
            Some(0) => err(
                "retry.attempts",
                "must be at least 1 (the first try counts)",
            ),
            Some(n) if n > MAX_ATTEMPTS => err(
                "retry.attempts",
                &format!("at most {MAX_ATTEMPTS} (Pingora's limit of tries per request)"),
            ),
            _ => {}
        }
        for (i, c) in r.retry_on.iter().enumerate() {
            if let Some(m) = c.error() {
                err(&format!("retry.retry_on[{i}]"), m);
            }
        }
        if r.per_try_timeout.is_some_and(|d| d.get().is_zero()) {
            err("retry.per_try_timeout", "must be greater than 0");
        }
        if r.backoff.max.get() < r.backoff.base.get() {
            err("retry.backoff.max", "must be at least backoff.base");
        }
        let ratio = r.budget.ratio;
        if !(0.0..=1.0).contains(&ratio) {
            err("retry.budget.ratio", "must be between 0 and 1");
        }
    }
    if up.limits.max_in_flight == Some(0) {
        err("limits.max_in_flight", "must be at least 1");
    }
}

/// The normalised identity of a route's match, for finding routes that can never match.
#[derive(PartialEq, Eq, Hash)]
struct MatchKey {
    hosts: Vec<HostPattern>,
    exact: bool,
    path: String,
}

fn validate_routes(config: &Config, responders: &HashSet<&str>, errors: &mut Vec<ConfigError>) {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut seen_matches: Vec<(MatchKey, Vec<Method>, usize)> = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        if r.name.trim().is_empty() {
            errors.push(ConfigError::new(format!("{p}.name"), "must not be empty"));
        } else if let Some(first) = names.insert(r.name.as_str(), i) {
            errors.push(ConfigError::new(
                format!("{p}.name"),
                format!("duplicate route name {:?} (also routes[{first}])", r.name),
            ));
        }
        if r.host.is_some() && !r.hosts.is_empty() {
            errors.push(ConfigError::new(
                format!("{p}.hosts"),
                "set either host or hosts, not both",
            ));
        }
        let mut hosts: Vec<HostPattern> = Vec::new();
        for (key, h) in r.host_patterns() {
            match h.value() {
                Ok(pattern) => hosts.push(pattern.clone()),
                Err(m) => errors.push(ConfigError::new(format!("{p}.{key}"), m)),
            }
        }
        hosts.sort();
        let rule = match r.path_rule() {
            Ok(rule) => Some(rule),
            Err(e) => {
                errors.push(ConfigError::new(format!("{p}.{}", e.path), e.message));
                None
            }
        };
        let mut methods: Vec<Method> = Vec::new();
        for (j, m) in r.methods.iter().enumerate() {
            match m.value() {
                Ok(method) => {
                    if methods.contains(method) {
                        errors.push(ConfigError::new(
                            format!("{p}.methods[{j}]"),
                            format!("{} is listed twice", m.text()),
                        ));
                    }
                    methods.push(method.clone());
                }
                Err(msg) => errors.push(ConfigError::new(format!("{p}.methods[{j}]"), msg)),
            }
        }
        if let Some(up) = &r.upstream {
            if !config.upstreams.contains_key(up) {
                let known: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
                errors.push(ConfigError::new(
                    format!("{p}.upstream"),
                    format!(
                        "unknown upstream {up:?}; defined upstreams: [{}]",
                        known.join(", ")
                    ),
                ));
            }
        }
        for (j, name) in r.plugins.iter().enumerate() {
            if !config.plugins.contains_key(name) {
                errors.push(unknown_plugin(&format!("{p}.plugins[{j}]"), name, config));
            }
        }
        if r.websocket_idle_timeout.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{p}.websocket_idle_timeout"),
                "must be greater than 0",
            ));
        }
        if r.timeout.is_some_and(|t| t.get().is_zero()) {
            errors.push(ConfigError::new(
                format!("{p}.timeout"),
                "must be greater than 0",
            ));
        }
        if r.upstream.is_none() {
            let responds = config
                .server
                .plugins
                .iter()
                .chain(r.plugins.iter())
                .any(|n| responders.contains(n.as_str()));
            if !responds {
                errors.push(ConfigError::new(
                    format!("{p}.upstream"),
                    "a route needs an upstream, or a plugin that answers requests itself \
                     (such as an aggregate plugin)",
                ));
            }
        }
        if let Some(rw) = &r.rewrite_prefix {
            if r.upstream.is_none() {
                errors.push(ConfigError::new(
                    format!("{p}.rewrite_prefix"),
                    "only used with an upstream",
                ));
            }
            report(&format!("{p}.rewrite_prefix"), rw, errors);
        }
        if let Some(rule) = &rule {
            let captured = crate::router::template_params(&rule.path);
            for name in config.server.plugins.iter().chain(r.plugins.iter()) {
                let Some(plugin) = config.plugins.get(name) else {
                    continue;
                };
                for (path, param) in plugin.path_params() {
                    if !captured.iter().any(|c| *c == param) {
                        errors.push(ConfigError::new(
                            format!("plugins.{name}.{path}"),
                            format!(
                                "{{path.{param}}} is not captured by route {:?}: its path needs a \
                                 {{{param}}} segment (e.g. path = \"/users/{{{param}}}\")",
                                r.name
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(rule) = rule {
            let key = MatchKey {
                hosts,
                exact: rule.exact,
                path: rule.matched().to_string(),
            };
            for (other, other_methods, j) in &seen_matches {
                let overlap = other_methods.is_empty()
                    || other_methods
                        .iter()
                        .any(|m| methods.is_empty() || methods.contains(m));
                if *other == key && overlap {
                    errors.push(ConfigError::new(
                        p.clone(),
                        format!(
                            "can never match: routes[{j}] has the same host, path and methods \
                             and comes first"
                        ),
                    ));
                }
            }
            seen_matches.push((key, methods, i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = ["127.0.0.1:8080"]
        [upstreams.a]
        endpoints = ["127.0.0.1:3001"]
        [[routes]]
        name = "a"
        upstream = "a"
    "#;

    fn errors_of(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(c) => validate(&c).iter().map(|e| e.to_string()).collect(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_is_valid() {
        assert_eq!(errors_of(MINIMAL), Vec::<String>::new());
    }

    #[test]
    fn read_buffer_is_bounded() {
        let with = |v: &str| {
            errors_of(&MINIMAL.replace(
                "listen = [\"127.0.0.1:8080\"]",
                &format!("listen = [\"127.0.0.1:8080\"]\nread_buffer = {v}"),
            ))
        };
        assert_eq!(with("\"64KiB\""), Vec::<String>::new());
        assert_eq!(with("0"), Vec::<String>::new());
        let e = with("\"2MiB\"");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("server.read_buffer"), "{e:?}");
    }

    #[test]
    fn off_and_log_targets_are_explicit() {
        let with = |line: &str| {
            errors_of(&MINIMAL.replace(
                "listen = [\"127.0.0.1:8080\"]",
                &format!("listen = [\"127.0.0.1:8080\"]\n{line}"),
            ))
        };
        for ok in [
            "admin_listen = \"off\"",
            "access_log = \"off\"",
            "access_log = \"stdout\"",
            "access_log = \"/tmp/sallyport-access.log\"",
            "access_log = \"./access.log\"",
        ] {
            assert_eq!(with(ok), Vec::<String>::new(), "{ok}");
        }
        for bad in [
            "admin_listen = \"\"",
            "access_log = \"\"",
            "access_log = \"stdot\"",
            "access_log = \"/no/such/dir/access.log\"",
        ] {
            let e = with(bad);
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            let key = bad.split(' ').next().unwrap();
            assert!(e[0].starts_with(&format!("server.{key}")), "{bad}: {e:?}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_path() {
        let e = errors_of(&MINIMAL.replace("name = \"a\"", "name = \"a\"\nupstreem = \"a\""));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("routes[0]"), "{e:?}");
        assert!(e[0].contains("upstreem"), "{e:?}");
    }

    #[test]
    fn unknown_plugin_type_is_an_error() {
        let e = errors_of(&format!("{MINIMAL}\n[plugins.x]\ntype = \"teleport\"\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("plugins.x") || e[0].contains("teleport"),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_key_in_every_plugin_type_is_rejected() {
        for (kind, required) in [
            ("trace", ""),
            ("strip_headers", ""),
            ("quota", "limit = 1\n"),
            ("concurrency", "limit = 1\n"),
            (
                "aggregate",
                "calls = [{ name = \"a\", upstream = \"a\", path = \"/\" }]\n",
            ),
            (
                "jwt",
                "algorithms = [\"HS256\"]\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
            ),
            ("authorize", "scopes = [\"a\"]\n"),
            (
                "key_auth",
                "keys = [{ consumer = \"c\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }]\n",
            ),
        ] {
            let e = errors_of(&format!(
                "{MINIMAL}\n[plugins.x]\ntype = \"{kind}\"\n{required}bogus_key = 1\n"
            ));
            assert_eq!(e.len(), 1, "{kind}: {e:?}");
            assert!(e[0].contains("bogus_key"), "{kind}: {e:?}");
        }
    }

    #[test]
    fn resilience_mistakes_are_reported_with_their_paths() {
        let text = r#"
            [server]
            listen = ["127.0.0.1:8080"]
            [upstreams.a]
            endpoints = ["127.0.0.1:3001"]
            retries = 2
            [upstreams.a.outlier]
            consecutive_failures = 0
            failure_statuses = [200, 503]
            max_ejected_percent = 120
            base_ejection = "1m"
            max_ejection = "10s"
            [upstreams.a.retry]
            attempts = 0
            retry_on = ["503", "500", "teapot", "reset"]
            per_try_timeout = "0s"
            budget = { ratio = 1.5 }
            backoff = { base = "1s", max = "10ms" }
            [upstreams.a.limits]
            max_in_flight = 0
            [[routes]]
            name = "r"
            upstream = "a"
            timeout = "0s"
        "#;
        let e = errors_of(text);
        let paths: Vec<&str> = e
            .iter()
            .map(|s| s.split(':').next().unwrap_or(""))
            .collect();
        for expected in [
            "upstreams.a.retries",
            "upstreams.a.outlier.consecutive_failures",
            "upstreams.a.outlier.failure_statuses[0]",
            "upstreams.a.outlier.max_ejected_percent",
            "upstreams.a.outlier.max_ejection",
            "upstreams.a.retry.attempts",
            "upstreams.a.retry.retry_on[1]",
            "upstreams.a.retry.retry_on[2]",
            "upstreams.a.retry.per_try_timeout",
            "upstreams.a.retry.budget.ratio",
            "upstreams.a.retry.backoff.max",
            "upstreams.a.limits.max_in_flight",
            "routes[0].timeout",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {e:#?}");
        }
        assert_eq!(paths.len(), 13, "{e:#?}");

        let ok = r#"
            [server]
            listen = ["127.0.0.1:8080"]
            [upstreams.a]
            endpoints = ["127.0.0.1:3001"]
            balance = "ewma"
            retries = 3
            [upstreams.b]
            endpoints = ["127.0.0.1:3002"]
            balance = "least_request"
            [upstreams.b.retry]
            attempts = 4
            [[routes]]
            name = "r"
            upstream = "a"
        "#;
        let c = parse(ok).unwrap();
        assert!(validate(&c).is_empty(), "{:?}", validate(&c));
        assert_eq!(
            c.upstreams["a"].attempts(),
            4,
            "retries = 3 means four tries"
        );
        assert_eq!(c.upstreams["b"].attempts(), 4);
    }

    #[test]
    fn collects_every_error_with_paths() {
        let text = r#"
            [server]
            listen = ["nonsense", "127.0.0.1:8080"]
            admin_listen = "127.0.0.1:8080"
            plugins = ["nope"]
            trusted_proxies = ["10.0.0.0/8", "bad"]
            [upstreams.a]
            endpoints = ["127.0.0.1:3001@0", "127.0.0.1"]
            hash_key = "ip"
            [upstreams.a.health]
            interval = "0s"
            unhealthy_after = 0
            [plugins.s]
            type = "strip_headers"
            request = ["bad header"]
            [[routes]]
            name = "r"
            upstream = "missing"
            methods = ["GET", "G E T"]
            [[routes]]
            name = "r"
            path = "/x"
            path_prefix = "/x"
            plugins = ["s", "other"]
            [[routes]]
            name = "noup"
            path = "/a/../../b"
        "#;
        let e = errors_of(text);
        let paths: Vec<&str> = e
            .iter()
            .map(|s| s.split(':').next().unwrap_or(""))
            .collect();
        for expected in [
            "server.listen[0]",
            "server.admin_listen",
            "server.trusted_proxies[1]",
            "server.plugins[0]",
            "upstreams.a.endpoints[0]",
            "upstreams.a.endpoints[1]",
            "upstreams.a.hash_key",
            "upstreams.a.health.interval",
            "upstreams.a.health.unhealthy_after",
            "plugins.s.request[0]",
            "routes[0].upstream",
            "routes[0].methods[1]",
            "routes[1].name",
            "routes[1].path",
            "routes[1].plugins[1]",
            "routes[2].path",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {e:#?}");
        }
    }

    #[test]
    fn methods_and_hosts_are_case_insensitive_values() {
        let e = errors_of(&MINIMAL.replace(
            "name = \"a\"",
            "name = \"a\"\nmethods = [\"get\", \"GET\"]\nhosts = [\"API.example.com\"]",
        ));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("routes[0].methods[1]: GET is listed twice"),
            "{e:?}"
        );
        let c = parse(&MINIMAL.replace(
            "name = \"a\"",
            "name = \"a\"\nhosts = [\"API.example.com\"]",
        ))
        .unwrap();
        assert_eq!(
            c.routes[0].hosts[0].get(),
            Some(&HostPattern::Exact("api.example.com".into()))
        );
    }

    #[test]
    fn a_prefix_with_a_trailing_slash_shadows_the_same_prefix() {
        let text = format!(
            "{MINIMAL}\n[[routes]]\nname = \"b\"\nupstream = \"a\"\npath_prefix = \"/api\"\n\
             [[routes]]\nname = \"c\"\nupstream = \"a\"\npath_prefix = \"/api/\"\n"
        );
        let e = errors_of(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("routes[2]: can never match"), "{e:?}");
    }

    #[test]
    fn a_template_path_parameter_the_route_does_not_capture_is_reported() {
        let with_path = |path: &str| {
            errors_of(&format!(
                "{MINIMAL}\n[plugins.dash]\ntype = \"aggregate\"\n\
                 calls = [{{ name = \"u\", upstream = \"a\", path = \"/users/{{path.id}}\" }}]\n\
                 [[routes]]\nname = \"dash\"\npath = \"{path}\"\nplugins = [\"dash\"]\n"
            ))
        };
        assert_eq!(with_path("/dash/{id}"), Vec::<String>::new());
        let e = with_path("/dash/{user}");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "plugins.dash.calls[0].path: {path.id} is not captured by route \"dash\""
            ),
            "{e:?}"
        );
    }

    #[test]
    fn shadowed_route_is_reported() {
        let text =
            format!("{MINIMAL}\n[[routes]]\nname = \"b\"\nupstream = \"a\"\npath_prefix = \"/\"\n");
        let e = errors_of(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("routes[1]: can never match"), "{e:?}");
    }

    #[test]
    fn bad_duration_reports_path() {
        let e = errors_of(&MINIMAL.replace(
            "endpoints = [\"127.0.0.1:3001\"]",
            "endpoints = [\"127.0.0.1:3001\"]\nconnect_timeout = \"fast\"",
        ));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("upstreams.a.connect_timeout"), "{e:?}");
    }

    #[test]
    fn toml_syntax_error_has_line() {
        let e = errors_of("[server\nlisten = 1");
        assert!(e[0].contains("line 1"), "{e:?}");
    }
}
