//! Upstream pools: Pingora load balancers (round robin, random, consistent hash; weighted)
//! with active HTTP/TCP health checks driven by the gateway's own background task, so pools
//! swapped in by a reload are checked too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::{Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{parse_endpoint, Balance, HealthConfig, HealthKind, UpstreamConfig};
use crate::snapshot::RequestKey;

/// Bound on the selection walk (Pingora's `max_iterations`).
const MAX_SELECT_ITERATIONS: usize = 256;

enum Balancer {
    RoundRobin(LoadBalancer<RoundRobin>),
    Random(LoadBalancer<Random>),
    Hash(LoadBalancer<Consistent>),
}

impl Balancer {
    fn backends(&self) -> &Backends {
        match self {
            Balancer::RoundRobin(lb) => lb.backends(),
            Balancer::Random(lb) => lb.backends(),
            Balancer::Hash(lb) => lb.backends(),
        }
    }

    fn select(&self, key: &[u8], accept: impl Fn(&Backend, bool) -> bool) -> Option<Backend> {
        match self {
            Balancer::RoundRobin(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Balancer::Random(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
            Balancer::Hash(lb) => lb.select_with(key, MAX_SELECT_ITERATIONS, accept),
        }
    }
}

/// Scheduling state of a pool's active health checks.
struct HealthSchedule {
    interval: Duration,
    next_due: Mutex<Instant>,
    running: AtomicBool,
    first_pass_done: AtomicBool,
}

/// A named, health-checked pool of endpoints.
pub struct Pool {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    balancer: Balancer,
    pub hash_key: RequestKey,
    /// Endpoints in config order, with their metric label.
    endpoints: Vec<(Backend, String)>,
    health: Option<HealthSchedule>,
}

impl Pool {
    /// Builds a pool from a validated config.
    pub fn build(name: &str, config: &UpstreamConfig) -> Result<Pool, String> {
        let mut backends = Vec::with_capacity(config.endpoints.len());
        for e in &config.endpoints {
            let (addr, weight) = parse_endpoint(e)?;
            let backend = Backend::new_with_weight(&addr.to_string(), weight)
                .map_err(|err| format!("endpoint {e}: {err}"))?;
            backends.push((backend, addr.to_string()));
        }
        let set = backends.iter().map(|(b, _)| b.clone()).collect();
        let make_backends = || {
            let mut b = Backends::new(Static::new(set));
            if let Some(h) = &config.health {
                b.set_health_check(health_check(h, config));
            }
            b
        };
        let balancer = match config.balance {
            Balance::RoundRobin => {
                Balancer::RoundRobin(LoadBalancer::from_backends(make_backends()))
            }
            Balance::Random => Balancer::Random(LoadBalancer::from_backends(make_backends())),
            Balance::ConsistentHash => Balancer::Hash(LoadBalancer::from_backends(make_backends())),
        };
        // A static discovery completes immediately; this publishes the endpoints.
        let update = match &balancer {
            Balancer::RoundRobin(lb) => futures_now(lb.update()),
            Balancer::Random(lb) => futures_now(lb.update()),
            Balancer::Hash(lb) => futures_now(lb.update()),
        };
        update.map_err(|e| format!("building pool {name}: {e}"))?;
        let hash_key = match &config.hash_key {
            Some(k) => RequestKey::parse(k)?,
            None => RequestKey::Ip,
        };
        Ok(Pool {
            name: Arc::from(name),
            config: config.clone(),
            balancer,
            hash_key,
            endpoints: backends,
            health: config.health.as_ref().map(|h| HealthSchedule {
                interval: h.interval.get(),
                next_due: Mutex::new(Instant::now()),
                running: AtomicBool::new(false),
                first_pass_done: AtomicBool::new(false),
            }),
        })
    }

    /// A healthy endpoint not in `exclude`, chosen by the pool's balance (`key` is used by
    /// consistent hashing). `None` when none is left.
    pub fn select(&self, key: &[u8], exclude: &[SocketAddr]) -> Option<Backend> {
        self.balancer.select(key, |b, healthy| {
            healthy && b.as_inet().is_none_or(|addr| !exclude.contains(addr))
        })
    }

    /// The peer to proxy to for a selected endpoint, with the pool's timeouts.
    pub fn peer(&self, backend: &Backend) -> HttpPeer {
        let sni = match (&self.config.sni, self.config.tls) {
            (Some(s), _) => s.clone(),
            (None, true) => backend
                .as_inet()
                .map(|a| a.ip().to_string())
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
        let backends = self.balancer.backends();
        self.endpoints
            .iter()
            .map(|(b, label)| (label.as_str(), backends.ready(b)))
            .collect()
    }

    /// Ready to serve: health checks (if any) completed their first pass.
    pub fn is_ready(&self) -> bool {
        self.health
            .as_ref()
            .is_none_or(|h| h.first_pass_done.load(Ordering::Acquire))
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
            *next = now + schedule.interval;
        }
        let pool = Arc::clone(self);
        Some(async move {
            pool.balancer.backends().run_health_check(true).await;
            if let Some(s) = &pool.health {
                s.first_pass_done.store(true, Ordering::Release);
                s.running.store(false, Ordering::Release);
            }
        })
    }

    /// Whether another pool config would build an identical pool (so a reload can keep this
    /// one, with its health state and connections).
    pub fn same_config(&self, other: &UpstreamConfig) -> bool {
        &self.config == other
    }
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

fn health_check(h: &HealthConfig, up: &UpstreamConfig) -> Box<dyn HealthCheck + Send + Sync> {
    match h.kind {
        HealthKind::Tcp => {
            let mut check = match (&up.sni, up.tls) {
                (Some(sni), true) => TcpHealthCheck::new_tls(sni),
                _ => TcpHealthCheck::new(),
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
            if let Some(sni) = &up.sni {
                check.peer_template.sni = sni.clone();
            }
            if let Ok(uri) = h.path.parse() {
                check.req.set_uri(uri);
            }
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
    }
}
