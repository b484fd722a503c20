//! The compiled configuration: one immutable snapshot of routes, pools and plugins that the
//! gateway swaps atomically on reload. A request keeps the snapshot it started with.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderName, Method};
use ipnet::IpNet;
pub use sallyport_plugins::key::RequestKey;
use sallyport_plugins::strip_headers::HeaderSet;
use sallyport_plugins::{BuildEnv, BuiltPlugin, DynPlugin, Hooks, PluginMetrics, Upstreams};

use crate::calls::PoolCalls;

use crate::config::{ClientIpHeader, Config, ConfigError, ConfigErrors, EscapedSlashes};
use crate::router::{HostPattern, RouteMatch, Router};
use crate::upstream::Pool;

/// One plugin in a route's chain.
pub struct ChainEntry {
    /// The `[plugins.NAME]` name (a metric label).
    pub name: Arc<str>,
    /// The plugin type (e.g. `"trace"`).
    pub kind: &'static str,
    pub plugin: Arc<dyn DynPlugin>,
    pub hooks: Hooks,
}

/// A compiled route.
pub struct Route {
    pub name: Arc<str>,
    pub upstream: Option<Arc<Pool>>,
    pub rewrite: Option<Rewrite>,
    /// `server.plugins` then the route's own, in order.
    pub chain: Vec<ChainEntry>,
    /// Union of the chain's hooks, to skip whole phases cheaply.
    pub hooks: Hooks,
    /// The path rule as written (`http.route` of its spans).
    pub http_route: Arc<str>,
    /// `timeout`: the deadline of the exchange with the upstream, every try included.
    pub timeout: Option<std::time::Duration>,
    /// `websocket_idle_timeout`: the read and write timeouts of an upgraded connection.
    pub websocket_idle: std::time::Duration,
    /// `grpc`: gRPC errors, `grpc-timeout`, the gRPC-web bridge.
    pub grpc: bool,
    /// This route's series of the request metrics.
    pub metrics: RouteMetrics,
}

/// The method labels of the request metrics (bounded: any other method is `OTHER`), and
/// the statuses labelled without an allocation; a route keeps a handle to each pair's series.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
const STATUSES: [(u16, &str); 15] = [
    (200, "200"),
    (201, "201"),
    (204, "204"),
    (304, "304"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (413, "413"),
    (429, "429"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];

/// The method as a bounded label.
pub fn method_label(m: &Method) -> &'static str {
    let i = match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    };
    METHODS[i]
}

/// The status as a label, without allocating for the common codes.
pub fn status_label(code: u16) -> std::borrow::Cow<'static, str> {
    match STATUSES.iter().find(|(c, _)| *c == code) {
        Some((_, label)) => std::borrow::Cow::Borrowed(label),
        None => std::borrow::Cow::Owned(code.to_string()),
    }
}

/// A route's handles into the request metrics, so a request does not hash its labels and
/// search the families for them (three lookups a request in the passthrough profile). A
/// series is created when first counted, as before; a reload's new route finds the same
/// series again.
pub struct RouteMetrics {
    route: Arc<str>,
    requests: prometheus::IntCounterVec,
    durations: prometheus::HistogramVec,
    duration: std::sync::OnceLock<prometheus::Histogram>,
    counters: Box<[[std::sync::OnceLock<prometheus::IntCounter>; STATUSES.len()]; METHODS.len()]>,
}

impl RouteMetrics {
    pub fn new(route: &Arc<str>, families: &RequestMetrics) -> RouteMetrics {
        RouteMetrics {
            route: Arc::clone(route),
            requests: families.requests.clone(),
            durations: families.duration.clone(),
            duration: std::sync::OnceLock::new(),
            counters: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| std::sync::OnceLock::new())
            })),
        }
    }

    /// Observes a request's duration in `sallyport_request_duration_seconds{route}`.
    pub fn observe(&self, seconds: f64) {
        self.duration
            .get_or_init(|| self.durations.with_label_values(&[&*self.route]))
            .observe(seconds);
    }

    /// Counts a request in `sallyport_requests_total{route, method, status}` (`method` from
    /// [`method_label`]).
    pub fn count(&self, method: &str, status: u16) {
        let m = METHODS.iter().position(|x| *x == method);
        let s = STATUSES.iter().position(|(code, _)| *code == status);
        match (m, s) {
            (Some(m), Some(s)) => self.counters[m][s]
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[&*self.route, METHODS[m], STATUSES[s].1])
                })
                .inc(),
            _ => self
                .requests
                .with_label_values(&[&*self.route, method, &status_label(status)])
                .inc(),
        }
    }
}

/// The request metric families a route takes its handles from.
#[derive(Clone)]
pub struct RequestMetrics {
    /// `sallyport_requests_total{route, method, status}`.
    pub requests: prometheus::IntCounterVec,
    /// `sallyport_request_duration_seconds{route}`.
    pub duration: prometheus::HistogramVec,
}

impl Route {
    /// Indices of the chain entries a request reached (the first `reached`) whose plugin runs
    /// the hook `wants` picks, in chain order (`.rev()` for the response direction).
    pub fn entries_running(
        &self,
        reached: usize,
        wants: fn(&Hooks) -> bool,
    ) -> impl DoubleEndedIterator<Item = usize> + '_ {
        (0..reached.min(self.chain.len())).filter(move |&i| wants(&self.chain[i].hooks))
    }
}

/// `rewrite_prefix`: replaces the matched prefix, or the whole path of an exact route.
pub struct Rewrite {
    /// The matched prefix; `None` for exact (and template) routes.
    pub prefix: Option<String>,
    pub to: String,
}

impl Rewrite {
    pub fn apply(&self, path: &str) -> String {
        match &self.prefix {
            Some(prefix) => crate::router::rewrite(path, prefix, &self.to),
            None => self.to.clone(),
        }
    }
}

/// Process-lifetime services every snapshot shares: the pooled connector for plugin calls and
/// the plugin metrics.
pub struct Services {
    pub connector: Arc<pingora::connectors::http::Connector>,
    pub plugin_metrics: Arc<PluginMetrics>,
    pub plugin_registry: sallyport_plugins::MetricsRegistry,
    /// The JWKS of every token-signing plugin (admin `GET /.well-known/jwks.json`).
    pub public_keys: Arc<sallyport_plugins::keys::KeyRegistry>,
    /// `sallyport_telemetry_spans_total`.
    pub telemetry_spans: prometheus::IntCounterVec,
    /// The retry and ejection counters every pool writes to.
    pub resilience: crate::resilience::ResilienceMetrics,
    /// Resolves the endpoints written as host names (`server.dns_resolvers`).
    pub dns: Arc<crate::discovery::Dns>,
    /// The `forward_client_cert` headers of the listeners started with the process.
    pub client_cert_headers: Vec<HeaderName>,
    /// The families each route keeps handles into.
    pub request_metrics: RequestMetrics,
}

/// Everything a request needs, compiled from one config file.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub routes: Vec<Arc<Route>>,
    pub pools: BTreeMap<String, Arc<Pool>>,
    /// Built plugins by name; stateful ones are taken over by the next reload when unchanged.
    pub plugins: BTreeMap<String, BuiltPlugin>,
    /// The plugins this compile built (not taken over): they are started before the snapshot
    /// takes requests.
    pub fresh: Vec<Arc<dyn DynPlugin>>,
    /// Every fresh plugin's `start` finished.
    pub started: std::sync::atomic::AtomicBool,
    /// Headers that plugins set from verified credentials: removed from every request.
    pub trusted_headers: HeaderSet,
    /// Cookies that belong to the gateway (sessions): removed from every proxied request.
    pub gateway_cookies: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    /// `server.deny_connections`.
    pub deny_connections: Vec<IpNet>,
    pub client_ip_header: ClientIpHeader,
    pub max_body: u64,
    pub escaped_slashes: EscapedSlashes,
    /// The OTLP exporter of `[telemetry]`, if configured (kept across a reload that did not
    /// change the table).
    pub telemetry: Option<Arc<crate::telemetry::Telemetry>>,
}

impl Snapshot {
    /// Compiles a validated config. Pools whose config did not change are taken over from
    /// `previous`, with their health state, and so are unchanged stateful plugins (quota
    /// counters, bulkhead slots: see `PluginConfig::keeps_state_across_reloads`).
    pub fn compile(
        config: Config,
        previous: Option<&Snapshot>,
        services: &Services,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut errors = Vec::new();

        let mut pools = BTreeMap::new();
        for (name, up) in &config.upstreams {
            let before = previous.and_then(|p| p.pools.get(name));
            let reused = before.filter(|p| p.same_config(up)).cloned();
            match reused.map(Ok).unwrap_or_else(|| {
                Pool::build(name, up, before.map(|p| &**p), &services.resilience).map(Arc::new)
            }) {
                Ok(pool) => {
                    pools.insert(name.clone(), pool);
                }
                Err(m) => errors.push(ConfigError::new(format!("upstreams.{name}"), m)),
            }
        }

        let upstreams: Arc<dyn Upstreams> = Arc::new(PoolCalls::new(
            pools.clone(),
            Arc::clone(&services.connector),
        ));
        let mut plugins = BTreeMap::new();
        let mut fresh = Vec::new();
        // `forward_client_cert` headers are the gateway's to set: those of the running
        // listeners (set at start, kept until a restart) and those the config names.
        let mut trusted: Vec<HeaderName> = services.client_cert_headers.clone();
        for h in config
            .server
            .tls
            .iter()
            .filter_map(|t| t.client_cert_header())
        {
            if !trusted.contains(h) {
                trusted.push(h.clone());
            }
        }
        let mut gateway_cookies: Vec<String> = Vec::new();
        for (name, pc) in &config.plugins {
            let env = BuildEnv {
                name: Arc::from(name.as_str()),
                upstreams: Arc::clone(&upstreams),
                metrics: Arc::clone(&services.plugin_metrics),
                registry: services.plugin_registry.for_type(pc.kind()),
                public_keys: Arc::clone(&services.public_keys),
            };
            let kept = previous
                .filter(|p| {
                    pc.keeps_state_across_reloads() && p.config.plugins.get(name) == Some(pc)
                })
                .and_then(|p| p.plugins.get(name))
                .cloned();
            let was_kept = kept.is_some();
            match kept.map(Ok).unwrap_or_else(|| pc.build(&env)) {
                Ok(built) => {
                    if !was_kept {
                        fresh.push(Arc::clone(&built.plugin));
                    }
                    for h in &built.trusted_headers {
                        if !trusted.contains(h) {
                            trusted.push(h.clone());
                        }
                    }
                    for c in &built.gateway_cookies {
                        if !gateway_cookies.contains(c) {
                            gateway_cookies.push(c.clone());
                        }
                    }
                    plugins.insert(name.clone(), built);
                }
                Err(errs) => errors
                    .extend(errs.into_iter().map(|e| {
                        ConfigError::new(format!("plugins.{name}.{}", e.path), e.message)
                    })),
            }
        }

        let mut routes = Vec::new();
        let mut matches = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            let names = config
                .server
                .plugins
                .iter()
                .enumerate()
                .map(|(j, n)| (format!("server.plugins[{j}]"), n))
                .chain(
                    r.plugins
                        .iter()
                        .enumerate()
                        .map(|(j, n)| (format!("routes[{i}].plugins[{j}]"), n)),
                );
            let mut chain: Vec<ChainEntry> = every_or_errors(
                names.map(|(path, n)| {
                    let entry = plugins.get(n).map(|b| ChainEntry {
                        name: Arc::from(n.as_str()),
                        kind: b.kind,
                        plugin: Arc::clone(&b.plugin),
                        hooks: b.plugin.hooks(),
                    });
                    (
                        path,
                        entry.ok_or_else(|| format!("plugin {n:?} was not built")),
                    )
                }),
                &mut errors,
            );
            // Plugins that answer CORS preflights wrap the whole chain: their response hooks
            // must see every answer, rejections by the other plugins included (stable: the
            // others keep their order).
            chain.sort_by_key(|e| !e.hooks.preflight);
            let hooks = chain.iter().fold(Hooks::NONE, |acc, e| acc.union(e.hooks));
            let rule = match r.path_rule() {
                Ok(rule) => rule,
                Err(e) => {
                    errors.push(ConfigError::new(
                        format!("routes[{i}].{}", e.path),
                        e.message,
                    ));
                    continue;
                }
            };
            let rewrite = every_or_errors(
                r.rewrite_prefix.iter().map(|to| {
                    (
                        format!("routes[{i}].rewrite_prefix"),
                        to.value().map(|p| p.0.clone()),
                    )
                }),
                &mut errors,
            )
            .pop()
            .map(|to| Rewrite {
                prefix: (!rule.exact).then(|| rule.matched().to_string()),
                to,
            });
            let hosts: Vec<HostPattern> = every_or_errors(
                r.host_patterns()
                    .map(|(key, h)| (format!("routes[{i}].{key}"), h.value().cloned())),
                &mut errors,
            );
            let methods: Vec<Method> = every_or_errors(
                r.methods
                    .iter()
                    .enumerate()
                    .map(|(j, m)| (format!("routes[{i}].methods[{j}]"), m.value().cloned())),
                &mut errors,
            );
            let upstream = every_or_errors(
                r.upstream.iter().map(|u| {
                    (
                        format!("routes[{i}].upstream"),
                        pools
                            .get(u)
                            .cloned()
                            .ok_or_else(|| format!("unknown upstream {u:?}")),
                    )
                }),
                &mut errors,
            )
            .pop();
            let http_route: Arc<str> = Arc::from(rule.matched());
            matches.push(RouteMatch {
                hosts,
                exact: rule.exact,
                path: rule.path,
                methods,
            });
            let name: Arc<str> = Arc::from(r.name.as_str());
            routes.push(Arc::new(Route {
                http_route,
                metrics: RouteMetrics::new(&name, &services.request_metrics),
                name,
                upstream,
                rewrite,
                chain,
                hooks,
                timeout: r.timeout.map(|t| t.get()),
                websocket_idle: r.websocket_idle_timeout.get(),
                grpc: r.grpc,
            }));
        }

        let trusted_proxies = every_or_errors(
            config
                .server
                .trusted_proxies
                .iter()
                .enumerate()
                .map(|(j, p)| (format!("server.trusted_proxies[{j}]"), p.value().copied())),
            &mut errors,
        );
        let deny_connections = every_or_errors(
            config
                .server
                .deny_connections
                .iter()
                .enumerate()
                .map(|(j, p)| (format!("server.deny_connections[{j}]"), p.value().copied())),
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let telemetry = match &config.telemetry {
            None => None,
            Some(t) => match previous
                .and_then(|p| p.telemetry.as_ref())
                .filter(|p| p.config() == t)
            {
                Some(kept) => Some(Arc::clone(kept)),
                None => {
                    match crate::telemetry::Telemetry::start(t, services.telemetry_spans.clone()) {
                        Ok(started) => Some(Arc::new(started)),
                        Err(e) => {
                            return Err(ConfigErrors(vec![ConfigError::new(
                                "telemetry",
                                e.to_string(),
                            )]))
                        }
                    }
                }
            },
        };
        Ok(Snapshot {
            telemetry,
            deny_connections,
            router: Router::new(&matches),
            routes,
            pools,
            plugins,
            started: std::sync::atomic::AtomicBool::new(fresh.is_empty()),
            fresh,
            trusted_headers: HeaderSet::from_names(trusted),
            gateway_cookies,
            trusted_proxies,
            client_ip_header: config.server.client_ip_header,
            max_body: config.server.max_body.get(),
            escaped_slashes: config.server.escaped_slashes,
            config,
        })
    }

    /// Whether `ip` is one of `server.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped peer (dual-stack listener) is its IPv4 address, as for the client.
        crate::client_ip::is_trusted(&self.trusted_proxies, ip.to_canonical())
    }

    /// All pools ready (first health-check pass done).
    pub fn is_ready(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
            && self.pools.values().all(|p| p.is_ready())
    }

    /// Starts the plugins this compile built (each plugin's `start`, concurrently).
    /// Resolves the host names of pools this compile built (a reload swaps the snapshot in
    /// with their addresses known; the background task keeps them fresh afterwards).
    pub async fn resolve_new_names(&self, dns: &crate::discovery::Dns) {
        futures_util::future::join_all(self.pools.values().map(|p| p.resolve_new_names(dns))).await;
    }

    pub async fn start_plugins(&self) {
        futures_util::future::join_all(self.fresh.iter().map(|p| p.start())).await;
        self.started
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Stops this snapshot's plugins that `next` does not carry over (all of them when
    /// `next` is `None`, at shutdown).
    pub async fn stop_plugins_not_in(&self, next: Option<&Snapshot>) {
        let carried = |p: &Arc<dyn DynPlugin>| {
            next.is_some_and(|n| n.plugins.values().any(|b| Arc::ptr_eq(&b.plugin, p)))
        };
        let gone = self
            .plugins
            .values()
            .map(|b| &b.plugin)
            .filter(|p| !carried(p));
        futures_util::future::join_all(gone.map(|p| p.stop())).await;
    }
}

/// Every value parsed, in order; a value that does not parse is an error at its path. The
/// compile step never drops what it cannot read: a dropped host pattern would be a route
/// that matches every host, a dropped plugin a route without its authentication.
/// (`validate` reports these first; this keeps compile honest on its own.)
fn every_or_errors<T, E: std::fmt::Display>(
    items: impl Iterator<Item = (String, Result<T, E>)>,
    errors: &mut Vec<ConfigError>,
) -> Vec<T> {
    let mut out = Vec::new();
    for (path, item) in items {
        match item {
            Ok(v) => out.push(v),
            Err(e) => errors.push(ConfigError::new(path, e.to_string())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Services {
        let registry = prometheus::Registry::new();
        Services {
            connector: Arc::new(pingora::connectors::http::Connector::new(None)),
            plugin_metrics: Arc::new(PluginMetrics::register(&registry).unwrap()),
            plugin_registry: sallyport_plugins::MetricsRegistry::new(registry),
            public_keys: Arc::default(),
            resilience: crate::resilience::ResilienceMetrics::unregistered(),
            dns: Arc::new(crate::discovery::Dns::System),
            client_cert_headers: Vec::new(),
            telemetry_spans: prometheus::IntCounterVec::new(
                prometheus::Opts::new("spans", "spans"),
                &["result"],
            )
            .unwrap(),
            request_metrics: RequestMetrics {
                requests: prometheus::IntCounterVec::new(
                    prometheus::Opts::new("requests", "requests"),
                    &["route", "method", "status"],
                )
                .unwrap(),
                duration: prometheus::HistogramVec::new(
                    prometheus::HistogramOpts::new("duration", "duration"),
                    &["route"],
                )
                .unwrap(),
            },
        }
    }

    /// A route's handles count into the same series `with_label_values` names, for the
    /// statuses it keeps handles to and for the others.
    #[test]
    fn route_metrics_count_into_the_labelled_series() {
        let families = services().request_metrics;
        let route: Arc<str> = Arc::from("orders");
        let m = RouteMetrics::new(&route, &families);
        m.count("GET", 200);
        m.count("GET", 200);
        m.count("POST", 418);
        // A reload's new route finds the same series.
        RouteMetrics::new(&route, &families).count("GET", 200);
        let get = |labels: &[&str]| families.requests.with_label_values(labels).get();
        assert_eq!(get(&["orders", "GET", "200"]), 3);
        assert_eq!(get(&["orders", "POST", "418"]), 1);
        assert_eq!(
            prometheus::core::Collector::collect(&families.duration)[0]
                .get_metric()
                .len(),
            0,
            "no series before the first request"
        );
        m.observe(0.5);
        assert_eq!(
            families
                .duration
                .with_label_values(&["orders"])
                .get_sample_count(),
            1
        );
    }

    /// Fed a config that skipped `validate`, compile reports every value it cannot read at its
    /// path instead of dropping it (a dropped host would match every host, a dropped plugin
    /// would leave a route without it).
    #[test]
    fn compile_reports_what_it_cannot_read() {
        let config = crate::config::parse(
            r#"
            [server]
            listen = ["127.0.0.1:8080"]
            trusted_proxies = ["nope"]
            [upstreams.a]
            endpoints = ["127.0.0.1:1"]
            [[routes]]
            name = "r"
            hosts = ["ok.example", "bad host!"]
            methods = ["G E T"]
            plugins = ["ghost"]
            upstream = "gone"
            rewrite_prefix = "no-slash"
            "#,
        )
        .unwrap();
        let errors = match Snapshot::compile(config, None, &services()) {
            Ok(_) => panic!("compiled a config it cannot read"),
            Err(e) => e.0,
        };
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "routes[0].hosts[1]",
            "routes[0].methods[0]",
            "routes[0].plugins[0]",
            "routes[0].upstream",
            "routes[0].rewrite_prefix",
            "server.trusted_proxies[0]",
        ] {
            assert!(
                paths.contains(&expected),
                "missing {expected} in {errors:?}"
            );
        }
    }
}
