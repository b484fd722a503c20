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

use crate::config::{parse_net, ClientIpHeader, Config, ConfigError, ConfigErrors, EscapedSlashes};
use crate::router::{config_path, HostPattern, RouteMatch, Router};
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
    pub trusted_proxies: Vec<IpNet>,
    pub client_ip_header: ClientIpHeader,
    pub max_body: u64,
    pub escaped_slashes: EscapedSlashes,
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
            match reused
                .map(Ok)
                .unwrap_or_else(|| Pool::build(name, up, before.map(|p| &**p)).map(Arc::new))
            {
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
        let mut trusted: Vec<HeaderName> = Vec::new();
        for (name, pc) in &config.plugins {
            let env = BuildEnv {
                name: Arc::from(name.as_str()),
                upstreams: Arc::clone(&upstreams),
                metrics: Arc::clone(&services.plugin_metrics),
                registry: services.plugin_registry.for_type(pc.kind()),
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
            let chain: Vec<ChainEntry> = config
                .server
                .plugins
                .iter()
                .chain(r.plugins.iter())
                .filter_map(|n| {
                    plugins.get(n).map(|b| ChainEntry {
                        name: Arc::from(n.as_str()),
                        kind: b.kind,
                        plugin: Arc::clone(&b.plugin),
                        hooks: b.plugin.hooks(),
                    })
                })
                .collect();
            let hooks = chain.iter().fold(Hooks::NONE, |acc, e| acc.union(e.hooks));
            let (exact, raw) = match (&r.path, &r.path_prefix) {
                (Some(p), _) => (true, p.as_str()),
                (None, Some(p)) => (false, p.as_str()),
                (None, None) => (false, "/"),
            };
            let path = match config_path(raw) {
                Ok(p) => p,
                Err(m) => {
                    errors.push(ConfigError::new(format!("routes[{i}]"), m));
                    continue;
                }
            };
            let matched = if exact || path == "/" {
                path.clone()
            } else {
                path.trim_end_matches('/').to_string()
            };
            let rewrite = r
                .rewrite_prefix
                .as_ref()
                .and_then(|to| config_path(to).ok())
                .map(|to| Rewrite {
                    prefix: (!exact).then_some(matched),
                    to,
                });
            let hosts: Vec<HostPattern> = r
                .host
                .iter()
                .chain(r.hosts.iter())
                .filter_map(|h| HostPattern::parse(h).ok())
                .collect();
            let methods: Vec<Method> = r
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).ok())
                .collect();
            matches.push(RouteMatch {
                hosts,
                exact,
                path,
                methods,
            });
            routes.push(Arc::new(Route {
                name: Arc::from(r.name.as_str()),
                upstream: r.upstream.as_ref().and_then(|u| pools.get(u).cloned()),
                rewrite,
                chain,
                hooks,
            }));
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let trusted_proxies = config
            .server
            .trusted_proxies
            .iter()
            .filter_map(|p| parse_net(p))
            .collect();
        Ok(Snapshot {
            router: Router::new(&matches),
            routes,
            pools,
            plugins,
            started: std::sync::atomic::AtomicBool::new(fresh.is_empty()),
            fresh,
            trusted_headers: HeaderSet::from_names(trusted),
            trusted_proxies,
            client_ip_header: config.server.client_ip_header,
            max_body: config.server.max_body.get(),
            escaped_slashes: config.server.escaped_slashes,
            config,
        })
    }

    /// Whether `ip` is one of `server.trusted_proxies`.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        crate::client_ip::is_trusted(&self.trusted_proxies, ip)
    }

    /// All pools ready (first health-check pass done).
    pub fn is_ready(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::Acquire)
            && self.pools.values().all(|p| p.is_ready())
    }

    /// Starts the plugins this compile built (each plugin's `start`, concurrently).
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
