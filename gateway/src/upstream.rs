//! Upstream pools: Pingora load balancers (round robin, random, consistent hash; weighted)
//! over endpoints whose health the gateway tracks itself.
//!
//! Health lives in one [`EndpointHealth`] per endpoint, shared by the pools of successive
//! snapshots that list the same address under the same pool name: a reload that rebuilds a
//! pool keeps what the checks learned, so a dead endpoint stays out of rotation. An endpoint
//! of a pool with active checks is not used until its first check passes; one of a pool
//! without checks counts as healthy. Checks are driven by the gateway's background task over
//! the current snapshot, so pools swapped in by a reload are checked too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{Balance, HealthConfig, HealthKind, UpstreamConfig};
use sallyport_plugins::key::RequestKey;

/// Bound on the selection walk (Pingora's `max_iterations`).
const MAX_SELECT_ITERATIONS: usize = 256;

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    /// Consistent hashing, and round robin over the same endpoints for requests that lack
    /// the hash key (hashing an empty key would send all of them to one endpoint).
    Hash(LoadBalancer<Consistent>, LoadBalancer<RoundRobin>),
}

impl Balancer {
    fn select(&self, key: Option<&[u8]>, accept: impl Fn(&Backend) -> bool) -> Option<Backend> {
        let accept = |b: &Backend, _pingora_health: bool| accept(b);
        match (self, key) {
            (Balancer::RoundRobin(lb), _) => lb.select_with(b"", MAX_SELECT_ITERATIONS, accept),
            (Balancer::Random(lb), _) => lb.select_with(b"", MAX_SELECT_ITERATIONS, accept),
            (Balancer::Hash(lb, _), Some(key)) => {
                lb.select_with(key, MAX_SELECT_ITERATIONS, accept)
            }
            (Balancer::Hash(_, rr), None) => rr.select_with(b"", MAX_SELECT_ITERATIONS, accept),
        }
    }
}

/// The health of one endpoint as active checks see it.
#[derive(Debug)]
pub struct EndpointHealth {
    /// Read on every selection; written by checks.
    healthy: AtomicBool,
    /// At least one check completed.
    checked: AtomicBool,
    /// Consecutive results of the same kind: `(last result, how many)`.
    streak: Mutex<(bool, usize)>,
}

impl EndpointHealth {
    fn new(healthy: bool) -> Self {
        EndpointHealth {
            healthy: AtomicBool::new(healthy),
            checked: AtomicBool::new(false),
            streak: Mutex::new((healthy, 0)),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records one check result. The first check decides on its own (an endpoint is not used
    /// before it passes one); later ones flip the state after `healthy_after` successes or
    /// `unhealthy_after` failures in a row. Returns the new state when it changed.
    fn observe(&self, ok: bool, h: &HealthConfig) -> Option<bool> {
        let mut streak = self.streak.lock();
        if streak.0 == ok {
            streak.1 += 1;
        } else {
            *streak = (ok, 1);
        }
        let was = self.is_healthy();
        let first = !self.checked.swap(true, Ordering::AcqRel);
        let now = if first {
            ok
        } else if ok {
            was || streak.1 >= h.healthy_after
        } else {
            was && streak.1 < h.unhealthy_after
        };
        self.healthy.store(now, Ordering::Release);
        (now != was).then_some(now)
    }
}

/// One endpoint of a pool; also attached to its `Backend` (`ext`), so a selection reads its
/// health without a lookup.
struct Endpoint {
    addr: SocketAddr,
    /// `ip:port`, the metric label.
    label: String,
    /// The host as written in `endpoints` (a name or an IP), for SNI.
    host: String,
    /// `host[:port]` as written, for the `Host` header when `preserve_host = false`.
    authority: String,
    health: Arc<EndpointHealth>,
}

/// Scheduling state of a pool's active health checks.
struct HealthSchedule {
    config: HealthConfig,
    /// One check per endpoint, in the pool's endpoint order (each names its endpoint's host
    /// as SNI when the pool speaks TLS).
    checks: Vec<Box<dyn HealthCheck + Send + Sync>>,
    next_due: Mutex<Instant>,
    running: AtomicBool,
}

/// A named, health-checked pool of endpoints.
pub struct Pool {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    balancer: Balancer,
    pub hash_key: RequestKey,
    /// Endpoints in config order, with their backends.
    endpoints: Vec<(Backend, Arc<Endpoint>)>,
    health: Option<HealthSchedule>,
    /// Rate limit of this pool's request-failure log lines.
    pub error_log: crate::log_window::LogWindow,
}

impl Pool {
    /// Builds a pool from a validated config. Endpoints that `previous` (the pool of the same
    /// name in the running snapshot) also has keep their health, when both pools run active
    /// checks.
    pub fn build(
        name: &str,
        config: &UpstreamConfig,
        previous: Option<&Pool>,
    ) -> Result<Pool, String> {
        let checked = config.health.is_some();
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let spec = e.value()?;
            let addr = spec.addr;
            let mut backend = Backend::new_with_weight(&addr.to_string(), spec.weight)
                .map_err(|err| format!("endpoint {}: {err}", e.text()))?;
            let (host, authority) = endpoint_names(&spec.hostport, config.tls);
            let health = previous
                .filter(|p| checked && p.health.is_some())
                .and_then(|p| p.endpoint(&addr))
                .map(|x| Arc::clone(&x.health))
                .unwrap_or_else(|| Arc::new(EndpointHealth::new(!checked)));
            let endpoint = Arc::new(Endpoint {
                addr,
                label: addr.to_string(),
                host,
                authority,
                health,
            });
            backend.ext.insert(Arc::clone(&endpoint));
            endpoints.push((backend, endpoint));
        }
        let set: std::collections::BTreeSet<Backend> =
            endpoints.iter().map(|(b, _)| b.clone()).collect();
        let make_backends = || Backends::new(Static::new(set.clone()));
        let balancer = match config.balance {
            Balance::RoundRobin => {
                Balancer::RoundRobin(LoadBalancer::from_backends(make_backends()))
            }
            Balance::Random => Balancer::Random(LoadBalancer::from_backends(make_backends())),
            Balance::ConsistentHash => Balancer::Hash(
                LoadBalancer::from_backends(make_backends()),
                LoadBalancer::from_backends(make_backends()),
            ),
        };
        // A static discovery completes immediately; this publishes the endpoints.
        let update = match &balancer {
            Balancer::RoundRobin(lb) => futures_now(lb.update()),
            Balancer::Random(lb) => futures_now(lb.update()),
            Balancer::Hash(lb, rr) => futures_now(lb.update()).and(futures_now(rr.update())),
        };
        update.map_err(|e| format!("building pool {name}: {e}"))?;
        let hash_key = match &config.hash_key {
            Some(k) => k.value()?.clone(),
            None => RequestKey::Ip,
        };
        let health = match &config.health {
            Some(h) => Some(HealthSchedule {
                config: h.clone(),
                checks: endpoints
                    .iter()
                    .map(|(_, e)| health_check(h, config, config.sni.as_deref().unwrap_or(&e.host)))
                    .collect::<Result<_, _>>()?,
                next_due: Mutex::new(Instant::now()),
                running: AtomicBool::new(false),
            }),
            None => None,
        };
        Ok(Pool {
            name: Arc::from(name),
            config: config.clone(),
            balancer,
            hash_key,
            endpoints,
            health,
            error_log: crate::log_window::LogWindow::default(),
        })
    }

    /// A healthy endpoint not in `exclude`, chosen by the pool's balance. `key` is the
    /// consistent-hash key; `None` (the request lacks it) balances round robin instead.
    /// `None` when no endpoint is left.
    pub fn select(&self, key: Option<&[u8]>, exclude: &[SocketAddr]) -> Option<Backend> {
        self.balancer.select(key, |b| {
            b.ext
                .get::<Arc<Endpoint>>()
                .is_some_and(|e| e.health.is_healthy() && !exclude.contains(&e.addr))
        })
    }

    fn endpoint(&self, addr: &SocketAddr) -> Option<&Endpoint> {
        self.endpoints
            .iter()
            .map(|(_, e)| &**e)
            .find(|e| e.addr == *addr)
    }

    /// The `Host` header for requests to this endpoint when `preserve_host = false`: the
    /// endpoint as written in the config (`api.internal:8443`), without a default port.
    pub fn host_header(&self, addr: &SocketAddr) -> Option<&str> {
        self.endpoint(addr).map(|e| e.authority.as_str())
    }

    /// The peer to proxy to for a selected endpoint, with the pool's timeouts. TLS names the
    /// endpoint's host as written in the config unless `sni` is set.
    pub fn peer(&self, backend: &Backend) -> HttpPeer {
        let sni = match (&self.config.sni, self.config.tls) {
            (Some(s), _) => s.clone(),
            (None, true) => backend
                .ext
                .get::<Arc<Endpoint>>()
                .map(|e| e.host.clone())
                .unwrap_or_default(),
            (None, false) => String::new(),
        };
        let mut peer = HttpPeer::new(backend.addr.clone(), self.config.tls, sni);
        let c = &self.config;
        peer.options.connection_timeout = Some(c.connect_timeout.get());
        peer.options.total_connection_timeout = Some(c.connect_timeout.get());
        peer.options.read_timeout = Some(c.read_timeout.get());
        peer.options.write_timeout = Some(c.write_timeout.get());
        peer.options.idle_timeout = Some(c.idle_timeout.get());
        peer
    }

    /// `(endpoint, healthy)` for every endpoint, in config order.
    pub fn endpoint_health(&self) -> Vec<(&str, bool)> {
        self.endpoints
            .iter()
            .map(|(_, e)| (e.label.as_str(), e.health.is_healthy()))
            .collect()
    }

    /// Ready to serve: every endpoint of a pool with active checks was checked at least once.
    pub fn is_ready(&self) -> bool {
        self.health.is_none()
            || self
                .endpoints
                .iter()
                .all(|(_, e)| e.health.checked.load(Ordering::Acquire))
    }

    /// Starts a health-check pass when one is due and none is running. Returns the pass to
    /// await (the caller spawns it), or `None`.
    pub fn due_health_check(
        self: &Arc<Self>,
        now: Instant,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let schedule = self.health.as_ref()?;
        {
            let mut next = schedule.next_due.lock();
            if now < *next || schedule.running.swap(true, Ordering::AcqRel) {
                return None;
            }
            *next = now + schedule.config.interval.get();
        }
        let pool = Arc::clone(self);
        Some(async move {
            if let Some(s) = &pool.health {
                pool.run_checks(s).await;
                s.running.store(false, Ordering::Release);
            }
        })
    }

    /// Checks every endpoint once, concurrently, each bounded by the check timeout.
    async fn run_checks(&self, s: &HealthSchedule) {
        // The connect and read timeouts bound one check; this bounds a check that trickles.
        let limit = s.config.timeout.get() * 2;
        let checks = self
            .endpoints
            .iter()
            .zip(&s.checks)
            .map(|((backend, e), check)| async move {
                let ok = matches!(
                    tokio::time::timeout(limit, check.check(backend)).await,
                    Ok(Ok(()))
                );
                if let Some(healthy) = e.health.observe(ok, &s.config) {
                    if healthy {
                        log::info!("upstream {}: endpoint {} is healthy", self.name, e.label);
                    } else {
                        log::warn!(
                            "upstream {}: endpoint {} failed its health check",
                            self.name,
                            e.label
                        );
                    }
                }
            });
        futures_util::future::join_all(checks).await;
    }

    /// Whether another pool config would build an identical pool (so a reload can keep this
    /// one, with its health state and connections).
    pub fn same_config(&self, other: &UpstreamConfig) -> bool {
        &self.config == other
    }
}

/// `(host, authority)` of an endpoint as written: `"api.internal:8443@2"` gives
/// `("api.internal", "api.internal:8443")`; the port is left out of the authority when it is
/// the scheme's default; `"[::1]:80"` gives `("::1", "[::1]")`.
fn endpoint_names(endpoint: &str, tls: bool) -> (String, String) {
    let hostport = endpoint
        .rsplit_once('@')
        .map_or(endpoint, |(a, _)| a)
        .trim();
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, ""));
    let default_port = if tls { "443" } else { "80" };
    let authority = if port == default_port || port.is_empty() {
        host.to_string()
    } else {
        hostport.to_string()
    };
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    (bare, authority)
}

fn futures_now<F, T>(f: F) -> Result<T, String>
where
    F: std::future::Future<Output = pingora::Result<T>>,
{
    // Static discovery never awaits: one poll on a no-op waker completes it.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(r) => r.map_err(|e| e.to_string()),
        std::task::Poll::Pending => Err("endpoint discovery did not complete".into()),
    }
}

/// The active check of one endpoint; `sni` names it in the TLS handshake when `up.tls`.
fn health_check(
    h: &HealthConfig,
    up: &UpstreamConfig,
    sni: &str,
) -> Result<Box<dyn HealthCheck + Send + Sync>, String> {
    Ok(match h.kind {
        HealthKind::Tcp => {
            let mut check = if up.tls {
                TcpHealthCheck::new_tls(sni)
            } else {
                TcpHealthCheck::new()
            };
            check.consecutive_success = h.healthy_after;
            check.consecutive_failure = h.unhealthy_after;
            check.peer_template.options.connection_timeout = Some(h.timeout.get());
            check.peer_template.options.total_connection_timeout = Some(h.timeout.get());
            check
        }
        HealthKind::Http => {
            let mut check = HttpHealthCheck::new(&h.host, up.tls);
            check.consecutive_success = h.healthy_after;
            check.consecutive_failure = h.unhealthy_after;
            check.peer_template.options.connection_timeout = Some(h.timeout.get());
            check.peer_template.options.total_connection_timeout = Some(h.timeout.get());
            check.peer_template.options.read_timeout = Some(h.timeout.get());
            if up.tls {
                check.peer_template.sni = sni.to_string();
            }
            check.req.set_uri(h.path.value()?.0.clone());
            let expected = h.expected_status.clone();
            check.validator = Some(Box::new(move |resp| {
                let status = resp.status.as_u16();
                let ok = if expected.is_empty() {
                    resp.status.is_success()
                } else {
                    expected.contains(&status)
                };
                if ok {
                    Ok(())
                } else {
                    pingora::Error::e_explain(
                        pingora::ErrorType::CustomCode("unexpected health status", status),
                        "during http health check",
                    )
                }
            }));
            Box::new(check)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_names_keep_the_host_as_written() {
        assert_eq!(
            endpoint_names("api.internal:8443@2", true),
            ("api.internal".into(), "api.internal:8443".into())
        );
        assert_eq!(
            endpoint_names("api.internal:443", true),
            ("api.internal".into(), "api.internal".into())
        );
        assert_eq!(
            endpoint_names("127.0.0.1:80", false),
            ("127.0.0.1".into(), "127.0.0.1".into())
        );
        assert_eq!(
            endpoint_names("[::1]:8080", false),
            ("::1".into(), "[::1]:8080".into())
        );
    }

    fn health(healthy_after: usize, unhealthy_after: usize) -> HealthConfig {
        let text = format!(
            "[server]\nlisten=[\"127.0.0.1:1\"]\n[upstreams.a]\nendpoints=[\"127.0.0.1:2\"]\n[upstreams.a.health]\nhealthy_after={healthy_after}\nunhealthy_after={unhealthy_after}\n"
        );
        crate::config::parse(&text).unwrap().upstreams["a"]
            .health
            .clone()
            .unwrap()
    }

    #[test]
    fn first_check_decides_then_thresholds_apply() {
        let h = health(2, 3);
        let e = EndpointHealth::new(false);
        assert!(!e.is_healthy(), "not used before its first check");
        assert_eq!(e.observe(true, &h), Some(true), "the first pass admits it");
        assert_eq!(e.observe(false, &h), None);
        assert_eq!(e.observe(false, &h), None);
        assert_eq!(
            e.observe(false, &h),
            Some(false),
            "third failure in a row ejects"
        );
        assert_eq!(e.observe(true, &h), None);
        assert_eq!(
            e.observe(true, &h),
            Some(true),
            "second success in a row re-admits"
        );

        let dead = EndpointHealth::new(false);
        assert_eq!(
            dead.observe(false, &h),
            None,
            "a failed first check keeps it out"
        );
        assert!(!dead.is_healthy());
        assert!(dead.checked.load(Ordering::Acquire));
    }
}
