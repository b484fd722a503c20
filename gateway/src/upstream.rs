//! Upstream pools: Pingora load balancers (round robin, random, consistent hash; weighted)
//! and power-of-two-choices over load or latency (least_request, ewma), over endpoints whose
//! health the gateway tracks itself, actively and passively.
//!
//! Health lives in one [`EndpointHealth`] per endpoint, shared by the pools of successive
//! snapshots that list the same address under the same pool name: a reload that rebuilds a
//! pool keeps what the checks learned, so a dead endpoint stays out of rotation. An endpoint
//! of a pool with active checks is not used until its first check passes; one of a pool
//! without checks counts as healthy. Checks are driven by the gateway's background task over
//! the current snapshot, so pools swapped in by a reload are checked too.
//!
//! Passive health (`[outlier]`) counts the failures of real traffic per endpoint and ejects
//! an endpoint for a while after `consecutive_failures` in a row; it returns by itself when
//! the time is up (and, with active checks, only while it passes them too). A pool kept
//! whole by a reload keeps its ejections. The pool also owns the retry policy and budget,
//! the in-flight count of `limits.max_in_flight`, and each endpoint's load and latency.
//!
//! DNS service discovery: an endpoint written as a host name stands for every address the
//! name resolves to, resolved again every `resolve_interval` by the background task. The
//! pool's members (its endpoints, balancer and checks) are swapped as one when an answer
//! changes: a request keeps the endpoint it holds, an address that stays keeps its health,
//! load, latency and ejection, and a failed resolution keeps the last good addresses.
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::Consistent;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::upstreams::peer::HttpPeer;

use crate::config::{
    Balance, HealthConfig, HealthKind, OutlierConfig, UpstreamConfig, UpstreamProtocol,
};
use crate::resilience::{
    ejection_time, Failure, NoRetry, PeakEwma, ResilienceMetrics, RetryBudget, RetryPolicy,
    TryState, FAILURE_PENALTY,
};
use sallyport_plugins::key::RequestKey;

/// The least latency `ewma` assumes (nanoseconds), so load still counts for an endpoint
/// without a sample yet.
const MIN_LATENCY_NS: f64 = 100_000.0;

/// Bound on the selection walk (Pingora's `max_iterations`).
const MAX_SELECT_ITERATIONS: usize = 256;

/// How a pool picks an endpoint. Round robin and random walk the pool's own weighted list
/// (`Members::weighted`) and hand back the endpoint itself: Pingora's `LoadBalancer` would
/// clone a `Backend` (its extensions map included) and hash every candidate into a fresh
/// set on each request: ~2,300 of the ~115,000 instructions a proxied request took here
/// (callgrind). Consistent hashing keeps Pingora's Ketama ring.
enum Balancer {
    RoundRobin,
    Random,
    /// Consistent hashing, and round robin over the same endpoints for requests that lack
    /// the hash key (hashing an empty key would send all of them to one endpoint).
    Hash(LoadBalancer<Consistent>),
    /// Power of two choices over the pool's own endpoint list (`ewma`: by latency x load,
    /// else by requests in flight).
    TwoChoices {
        ewma: bool,
    },
}

/// The endpoint a selection picked.
pub struct Pick(Arc<Endpoint>);

impl Pick {
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
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
    /// `authority` as a header value (shared, not copied, per request).
    authority_value: Option<http::HeaderValue>,
    health: Arc<EndpointHealth>,
    /// Selection weight (least_request and ewma divide the cost by it).
    weight: f64,
    /// Tries under way on this endpoint.
    in_flight: AtomicUsize,
    /// Time to the response header (`ewma`).
    latency: PeakEwma,
    /// Failures of real traffic in a row (outlier detection).
    failures: AtomicU32,
    /// Nanoseconds after the pool's epoch until which it is ejected; 0: in rotation.
    ejected_until: AtomicU64,
    /// `(times ejected, when it last returned)`: the next ejection lasts longer, unless it
    /// stayed in rotation for `max_ejection`.
    ejections: Mutex<(u32, Option<Instant>)>,
}

impl Endpoint {
    fn ejected_at(&self, now_ns: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && now_ns < until
    }
}

/// One try on one endpoint: counted in the endpoint's in-flight requests until dropped.
pub struct Try {
    endpoint: Arc<Endpoint>,
    pub started: Instant,
}

impl Try {
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// The `Host` header for this endpoint when `preserve_host = false`: the endpoint as
    /// written in the config (`api.internal:8443`), without a default port.
    pub fn authority(&self) -> &str {
        &self.endpoint.authority
    }

    /// [`Self::authority`] as a header value.
    pub fn authority_value(&self) -> Option<http::HeaderValue> {
        self.endpoint.authority_value.clone()
    }
}

impl Drop for Try {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's slot in its pool's `limits.max_in_flight`, released when dropped.
pub struct PoolSlot(Arc<Pool>);

impl Drop for PoolSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An endpoint's state, for metrics and `/readyz`.
pub struct EndpointState {
    pub label: String,
    pub healthy: bool,
    pub ejected: bool,
}

/// Scheduling state of a pool's active health checks.
struct HealthSchedule {
    config: HealthConfig,
    passes: Passes,
}

/// When a periodic background pass (health checks, name resolution) is due, and whether one
/// is under way: one pass at a time per pool.
struct Passes {
    next_due: Mutex<Instant>,
    running: AtomicBool,
}

impl Passes {
    /// The first pass is due at once.
    fn new() -> Passes {
        Passes {
            next_due: Mutex::new(Instant::now()),
            running: AtomicBool::new(false),
        }
    }

    /// Starts a pass when one is due and none runs; the next is due `interval` later.
    fn start_due(&self, now: Instant, interval: Duration) -> bool {
        let mut next = self.next_due.lock();
        if now < *next || self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        *next = now + interval;
        true
    }

    /// Starts a pass now unless one runs.
    fn start_now(&self) -> bool {
        !self.running.swap(true, Ordering::AcqRel)
    }

    fn done(&self) {
        self.running.store(false, Ordering::Release);
    }

    /// The next pass is due at once.
    fn due_now(&self) {
        *self.next_due.lock() = Instant::now();
    }
}

/// An endpoint the pool should have: an address, and the names it was written with.
struct Wanted {
    addr: SocketAddr,
    /// For SNI: the host name (or IP) as written.
    host: String,
    /// For `Host` when `preserve_host = false`.
    authority: String,
    weight: usize,
}

/// What a pool balances over now; replaced as a whole when a name's addresses change.
struct Members {
    balancer: Balancer,
    /// Endpoints in config order (a name's addresses in sorted order), with their backends.
    endpoints: Vec<(Backend, Arc<Endpoint>)>,
    /// Indexes into `endpoints`, each endpoint `weight` times, interleaved (weights 2 and 1:
    /// `[0, 1, 0]`): round robin and random pick from it.
    weighted: Vec<u32>,
    /// Round robin's position in `weighted`.
    next: AtomicUsize,
    /// Round robin's position among the usable endpoints when its pick is not usable.
    spill: AtomicUsize,
    /// With active checks: one per endpoint, in the same order (each names its endpoint's
    /// host as SNI when the pool speaks TLS).
    checks: Vec<Box<dyn HealthCheck + Send + Sync>>,
}

/// A host name among a pool's endpoints.
struct Name {
    host: String,
    /// `host:port` as written.
    hostport: String,
    /// The last good answer, sorted; `None` until the first one.
    addrs: Mutex<Option<Vec<IpAddr>>>,
    /// The last resolution failed (failures and recoveries are logged once each).
    failing: AtomicBool,
}

/// Scheduling state of a pool's name resolutions.
struct Discovery {
    names: Vec<Name>,
    /// Every name was resolved (or tried) once and the members were built from the answers:
    /// `/readyz` waits for it at start. A name that does not resolve leaves its addresses out
    /// (counted and logged) but does not hold readiness: one missing Service must not take
    /// every route of the fleet out of its load balancer.
    attempted: AtomicBool,
    interval: Duration,
    passes: Passes,
    /// Serialises member rebuilds (read the answers, build, swap), so an older set can never
    /// be stored over a newer one.
    rebuilding: Mutex<()>,
}

/// A named, health-checked pool of endpoints.
pub struct Pool {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    pub hash_key: RequestKey,
    members: ArcSwap<Members>,
    health: Option<HealthSchedule>,
    /// The host names among the endpoints (`None`: every endpoint is an address).
    discovery: Option<Discovery>,
    /// The pool was ready once: endpoints a later resolution adds wait for their first check
    /// before they get traffic, but do not make the gateway unready meanwhile.
    was_ready: AtomicBool,
    /// Rate limit of this pool's request-failure log lines.
    pub error_log: crate::log_window::LogWindow,
    pub retry: RetryPolicy,
    budget: RetryBudget,
    outlier: Option<OutlierConfig>,
    /// The zero of the endpoints' ejection times.
    epoch: Instant,
    /// Endpoints with an ejection time set (0: selection need not look at the clock).
    ejected: AtomicUsize,
    /// Serialises ejections and returns (the share of ejected endpoints is a pool rule).
    ejecting: Mutex<()>,
    /// Requests being proxied to the pool.
    in_flight: AtomicUsize,
    metrics: ResilienceMetrics,
    /// This pool's `sallyport_upstream_requests_total` series of the response classes
    /// (`CLASSES`), each resolved on its first use: every proxied request counts into one.
    class_counters: [std::sync::OnceLock<prometheus::IntCounter>; 4],
    /// TLS to the endpoints: verification, own CAs, a client certificate.
    tls: UpstreamTls,
    /// The connection-pool group of this pool's TLS connections (by pool name and CA file).
    tls_group: u64,
    /// What `ca_file`, `client_cert` and `client_key` held at build: a reload after they were
    /// replaced (a renewed client certificate) builds the pool again.
    tls_files: u64,
}

/// How the gateway speaks TLS to a pool's endpoints.
#[derive(Clone)]
struct UpstreamTls {
    verify: bool,
    ca: Option<Arc<pingora::protocols::tls::CaType>>,
    client: Option<Arc<pingora::utils::tls::CertKey>>,
}

impl UpstreamTls {
    /// Reads `ca_file`, `client_cert` and `client_key` (checked again: a reload may race an
    /// edit of the files).
    fn load(config: &UpstreamConfig) -> Result<UpstreamTls, String> {
        use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
        let ca = match &config.ca_file {
            Some(f) => {
                let certs = crate::config::read_certs(f).map_err(|e| format!("ca_file: {e}"))?;
                let list: Vec<WrappedX509> = certs
                    .into_iter()
                    .map(|der| WrappedX509::new(der, parse_x509))
                    .collect();
                Some(Arc::from(list))
            }
            None => None,
        };
        let client = match (&config.client_cert, &config.client_key) {
            (Some(c), Some(k)) => {
                let certs =
                    crate::config::read_certs(c).map_err(|e| format!("client_cert: {e}"))?;
                let key = crate::config::read_key(k).map_err(|e| format!("client_key: {e}"))?;
                // Pingora unwraps this conversion on every connection: prove it here, and
                // that the key belongs to the certificate.
                rustls::pki_types::PrivateKeyDer::try_from(key.as_slice())
                    .map_err(|e| format!("client_key: {e}"))?;
                crate::certs::load_pair(c, k).map_err(|e| format!("client_key: {e}"))?;
                Some(Arc::new(CertKey::new(certs, key)))
            }
            _ => None,
        };
        Ok(UpstreamTls {
            verify: config.verify.unwrap_or(true),
            ca,
            client,
        })
    }

    /// Applies the pool's TLS settings to a peer (proxied requests and health checks).
    fn apply(&self, options: &mut pingora::upstreams::peer::PeerOptions) {
        options.verify_cert = self.verify;
        options.verify_hostname = self.verify;
        options.ca = self.ca.clone();
    }
}

impl Pool {
    /// Builds a pool from a validated config. Endpoints that `previous` (the pool of the same
    /// name in the running snapshot) also has keep their health, when both pools run active
    /// checks.
    pub fn build(
        name: &str,
        config: &UpstreamConfig,
        previous: Option<&Pool>,
        metrics: &ResilienceMetrics,
    ) -> Result<Pool, String> {
        let checked = config.health.is_some();
        let epoch = Instant::now();
        let tls = UpstreamTls::load(config)?;
        let mut names = Vec::new();
        for e in &config.endpoints {
            let spec = e.value()?;
            if spec.addr.is_some() {
                continue;
            }
            // A reload starts from the addresses the running pool resolved the name to.
            let known = previous
                .and_then(|p| p.discovery.as_ref())
                .and_then(|d| d.names.iter().find(|n| n.hostport == spec.hostport))
                .and_then(|n| n.addrs.lock().clone());
            names.push(Name {
                host: spec.host.clone(),
                hostport: spec.hostport.clone(),
                addrs: Mutex::new(known),
                failing: AtomicBool::new(false),
            });
        }
        let discovery = (!names.is_empty()).then(|| Discovery {
            attempted: AtomicBool::new(names.iter().all(|n| n.addrs.lock().is_some())),
            names,
            interval: config.resolve_interval.get(),
            passes: Passes::new(),
            rebuilding: Mutex::new(()),
        });
        let wanted = wanted(config, discovery.as_ref())?;
        let members = Members::build(&wanted, config, &tls, epoch, |w| {
            // Endpoints that `previous` also has keep their health when both pools check.
            let health = previous
                .filter(|p| checked && p.health.is_some())
                .and_then(|p| p.endpoint(&w.addr))
                .map(|x| Arc::clone(&x.health));
            (None, health)
        })
        .map_err(|e| format!("building pool {name}: {e}"))?;
        let hash_key = match &config.hash_key {
            Some(k) => k.value()?.clone(),
            None => RequestKey::Ip,
        };
        let health = config.health.as_ref().map(|h| HealthSchedule {
            config: h.clone(),
            passes: Passes::new(),
        });
        let budget = config.retry.as_ref().map(|r| r.budget).unwrap_or_default();
        // Series a dashboard expects to see at 0 before the first event.
        metrics.budget_exhausted.with_label_values(&[name]);
        Ok(Pool {
            name: Arc::from(name),
            config: config.clone(),
            hash_key,
            members: ArcSwap::from_pointee(members),
            health,
            discovery,
            was_ready: AtomicBool::new(false),
            error_log: crate::log_window::LogWindow::default(),
            retry: RetryPolicy::new(config),
            budget: RetryBudget::new(budget.ratio, budget.min_per_second, epoch),
            outlier: config.outlier.clone(),
            epoch,
            ejected: AtomicUsize::new(0),
            ejecting: Mutex::new(()),
            in_flight: AtomicUsize::new(0),
            metrics: metrics.clone(),
            class_counters: Default::default(),
            tls,
            tls_files: tls_files_hash(config),
            tls_group: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                name.hash(&mut h);
                config.ca_file.hash(&mut h);
                h.finish()
            },
        })
    }

    /// Counts a request to this pool into `sallyport_upstream_requests_total{upstream,
    /// outcome}` (`family`); a response class goes through the pool's own handle.
    pub fn count_outcome(&self, family: &prometheus::IntCounterVec, outcome: &str) {
        const CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];
        match CLASSES
            .iter()
            .position(|c| *c == outcome)
            .and_then(|i| self.class_counters.get(i))
        {
            Some(handle) => handle
                .get_or_init(|| family.with_label_values(&[&*self.name, outcome]))
                .inc(),
            None => family.with_label_values(&[&*self.name, outcome]).inc(),
        }
    }

    /// Nanoseconds since the pool's epoch, never 0 (0 marks "not ejected").
    fn since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// A healthy endpoint chosen by the pool's balance, in order of preference: one not in
    /// `exclude` (the endpoints a request already tried) and not ejected; one tried already
    /// but not ejected; then, when every such endpoint is ejected, the ejected ones (the
    /// pool keeps serving at its worst rather than failing). `key` is the consistent-hash
    /// key; `None` (the request lacks it) balances round robin instead. `None` when no
    /// endpoint is healthy.
    pub fn select(&self, key: Option<&[u8]>, exclude: &[SocketAddr]) -> Option<Pick> {
        let members = self.members.load();
        let ejections = self.ejected.load(Ordering::Acquire) > 0;
        let now_ns = if ejections {
            self.since_epoch(Instant::now())
        } else {
            0
        };
        let pick = |skip_ejected: bool, exclude: &[SocketAddr]| {
            let usable = |e: &Endpoint| {
                e.health.is_healthy()
                    && !exclude.contains(&e.addr)
                    && !(skip_ejected && e.ejected_at(now_ns))
            };
            members.pick(key, usable)
        };
        pick(ejections, exclude)
            .or_else(|| {
                (!exclude.is_empty())
                    .then(|| pick(ejections, &[]))
                    .flatten()
            })
            .or_else(|| ejections.then(|| pick(false, exclude)).flatten())
            .or_else(|| {
                (ejections && !exclude.is_empty())
                    .then(|| pick(false, &[]))
                    .flatten()
            })
    }

    /// Starts a try on the selected endpoint.
    pub fn begin_try(&self, pick: &Pick) -> Try {
        let endpoint = Arc::clone(&pick.0);
        endpoint.in_flight.fetch_add(1, Ordering::AcqRel);
        Try {
            endpoint,
            started: Instant::now(),
        }
    }

    /// The try got a response header with this status: a success for passive health unless
    /// the status is one of `outlier.failure_statuses` (or 502-504 without `[outlier]`).
    pub fn answered(&self, t: &Try, status: u16, now: Instant) {
        let failed = match &self.outlier {
            Some(o) => o.failure_statuses.contains(&status),
            None => (502..=504).contains(&status),
        };
        if failed {
            self.failed(t, now);
            return;
        }
        let e = &t.endpoint;
        if self.tracks_latency() {
            e.latency
                .observe(now.saturating_duration_since(t.started), now);
        }
        if e.failures.load(Ordering::Relaxed) != 0 {
            e.failures.store(0, Ordering::Relaxed);
        }
    }

    /// The try failed (no connection, timeout, reset, or a failure status): counts towards
    /// the endpoint's ejection, and as a slow answer for `ewma`.
    pub fn failed(&self, t: &Try, now: Instant) {
        let e = &t.endpoint;
        if self.tracks_latency() {
            let took = now.saturating_duration_since(t.started);
            e.latency.observe(took.max(FAILURE_PENALTY), now);
        }
        let Some(o) = &self.outlier else {
            return;
        };
        // Tries still under way when it was ejected do not count towards the next ejection.
        if e.ejected_at(self.since_epoch(now)) {
            return;
        }
        let failures = e.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < o.consecutive_failures {
            return;
        }
        let _one_at_a_time = self.ejecting.lock();
        self.return_due(now);
        let now_ns = self.since_epoch(now);
        if e.ejected_at(now_ns) || e.failures.load(Ordering::Acquire) < o.consecutive_failures {
            return;
        }
        let members = self.members.load();
        // An endpoint a resolution removed meanwhile is not ejected (nor counted).
        if !members.endpoints.iter().any(|(_, x)| Arc::ptr_eq(x, e)) {
            return;
        }
        e.failures.store(0, Ordering::Release);
        let total = members.endpoints.len();
        let ejected = members
            .endpoints
            .iter()
            .filter(|(_, x)| x.ejected_at(now_ns))
            .count();
        let allowed = (total * o.max_ejected_percent.min(100) as usize / 100).min(total - 1);
        if ejected >= allowed {
            return;
        }
        let times = {
            let mut record = e.ejections.lock();
            let max = o.max_ejection.get();
            if record
                .1
                .is_some_and(|back| now.saturating_duration_since(back) >= max)
            {
                record.0 = 0;
            }
            record.0 = record.0.saturating_add(1);
            record.0
        };
        let time = ejection_time(
            o.base_ejection.get(),
            o.max_ejection.get(),
            times,
            rand::random::<f64>(),
        );
        let until = now
            .checked_add(time)
            .map_or(u64::MAX, |t| self.since_epoch(t));
        e.ejected_until.store(until, Ordering::Release);
        self.ejected.fetch_add(1, Ordering::AcqRel);
        self.metrics
            .ejections
            .with_label_values(&[&*self.name, &e.label, "consecutive_failures"])
            .inc();
        log::warn!(
            "upstream {}: endpoint {} ejected for {} after {} failures in a row (ejection {times})",
            self.name,
            e.label,
            humantime::format_duration(Duration::from_millis(time.as_millis() as u64)),
            o.consecutive_failures,
        );
    }

    /// Only `ewma` reads the latency estimate.
    fn tracks_latency(&self) -> bool {
        self.config.balance == Balance::Ewma
    }

    /// Puts endpoints whose ejection time is up back into rotation (the background task calls
    /// this often; selection already ignores an ejection that ran out).
    pub fn return_ejected(&self, now: Instant) {
        if self.ejected.load(Ordering::Acquire) == 0 {
            return;
        }
        let _one_at_a_time = self.ejecting.lock();
        self.return_due(now);
    }

    /// [`Pool::return_ejected`] under the ejection lock.
    fn return_due(&self, now: Instant) {
        let now_ns = self.since_epoch(now);
        for (_, e) in &self.members.load().endpoints {
            let until = e.ejected_until.load(Ordering::Acquire);
            if until != 0 && now_ns >= until {
                // Failures seen since the time ran out (selection no longer skipped it) still
                // count: the counter was reset when it was ejected.
                e.ejected_until.store(0, Ordering::Release);
                e.ejections.lock().1 = Some(now);
                self.ejected.fetch_sub(1, Ordering::AcqRel);
                log::warn!(
                    "upstream {}: endpoint {} returns to rotation after its ejection",
                    self.name,
                    e.label
                );
            }
        }
    }

    /// Whether a failed try is repeated and after what wait: the policy, then the budget
    /// (counted in the metrics either way; a stale pooled connection is not charged).
    pub fn retry(&self, f: Failure, t: &TryState, now: Instant) -> Result<Duration, NoRetry> {
        let wait = self.retry.decide(f, t, now, rand::random::<f64>())?;
        // A pooled connection the endpoint had closed is the gateway's miss, not the
        // endpoint's failure: repeating it is not charged to the budget.
        let stale = t.stale_connection && f == Failure::Reset;
        if !stale && !self.budget.try_retry(now) {
            self.metrics
                .budget_exhausted
                .with_label_values(&[&*self.name])
                .inc();
            return Err(NoRetry::Budget);
        }
        self.metrics
            .retries
            .with_label_values(&[&*self.name, f.label()])
            .inc();
        Ok(wait)
    }

    /// A request's first try: it counts towards the retry budget.
    pub fn first_try(&self, now: Instant) {
        self.budget.request(now);
    }

    /// Takes a slot of `limits.max_in_flight`; `None` when the pool is full.
    pub fn enter(self: &Arc<Self>) -> Option<PoolSlot> {
        match self.config.limits.max_in_flight {
            None => {
                self.in_flight.fetch_add(1, Ordering::AcqRel);
            }
            // A compare-and-swap, so a transient over-count never refuses anyone.
            Some(max) => {
                self.in_flight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    })
                    .ok()?;
            }
        }
        Some(PoolSlot(Arc::clone(self)))
    }

    /// Requests being proxied to the pool now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    fn endpoint(&self, addr: &SocketAddr) -> Option<Arc<Endpoint>> {
        self.members
            .load()
            .endpoints
            .iter()
            .find(|(_, e)| e.addr == *addr)
            .map(|(_, e)| Arc::clone(e))
    }

    /// Endpoints in the pool now.
    pub fn endpoint_count(&self) -> usize {
        self.members.load().endpoints.len()
    }

    /// The peer to proxy to for a selected endpoint, with the pool's timeouts. TLS names the
    /// endpoint's host as written in the config unless `sni` is set.
    pub fn peer(&self, pick: &Pick) -> HttpPeer {
        let sni = match (&self.config.sni, self.config.tls) {
            (Some(s), _) => s.clone(),
            (None, true) => pick.0.host.clone(),
            (None, false) => String::new(),
        };
        let mut peer = HttpPeer::new(pick.0.addr, self.config.tls, sni);
        let c = &self.config;
        peer.options.connection_timeout = Some(c.connect_timeout.get());
        peer.options.total_connection_timeout = Some(c.connect_timeout.get());
        peer.options.read_timeout = Some(c.read_timeout.get());
        peer.options.write_timeout = Some(c.write_timeout.get());
        peer.options.idle_timeout = Some(c.idle_timeout.get());
        apply_protocol(c, &mut peer.options);
        if c.tls {
            self.tls.apply(&mut peer.options);
            peer.client_cert_key = self.tls.client.clone();
            // Pingora's connection pool does not key on the CA: a pool with its own CA
            // keeps its connections apart from other pools reaching the same address.
            if self.tls.ca.is_some() {
                peer.group_key = self.tls_group;
            }
        }
        peer
    }

    /// Every endpoint's health, in config order.
    pub fn endpoint_states(&self, now: Instant) -> Vec<EndpointState> {
        let now_ns = self.since_epoch(now);
        self.members
            .load()
            .endpoints
            .iter()
            .map(|(_, e)| EndpointState {
                label: e.label.clone(),
                healthy: e.health.is_healthy(),
                ejected: e.ejected_at(now_ns),
            })
            .collect()
    }

    /// Ready to serve: every host name was resolved (or tried) once, and every endpoint of a
    /// pool with active checks was checked at least once; once ready, a pool stays ready.
    pub fn is_ready(&self) -> bool {
        if self.was_ready.load(Ordering::Acquire) {
            return true;
        }
        let resolved = self
            .discovery
            .as_ref()
            .is_none_or(|d| d.attempted.load(Ordering::Acquire));
        let ready = resolved
            && (self.health.is_none()
                || self
                    .members
                    .load()
                    .endpoints
                    .iter()
                    .all(|(_, e)| e.health.checked.load(Ordering::Acquire)));
        if ready {
            self.was_ready.store(true, Ordering::Release);
        }
        ready
    }

    /// Starts a health-check pass when one is due and none is running. Returns the pass to
    /// await (the caller spawns it), or `None`.
    pub fn due_health_check(
        self: &Arc<Self>,
        now: Instant,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let schedule = self.health.as_ref()?;
        if !schedule
            .passes
            .start_due(now, schedule.config.interval.get())
        {
            return None;
        }
        let pool = Arc::clone(self);
        Some(async move {
            if let Some(s) = &pool.health {
                pool.run_checks(s).await;
                s.passes.done();
            }
        })
    }

    /// Checks every endpoint once, concurrently, each bounded by the check timeout.
    async fn run_checks(&self, s: &HealthSchedule) {
        // The connect and read timeouts bound one check; this bounds a check that trickles.
        let limit = s.config.timeout.get() * 2;
        let members = self.members.load_full();
        let checks =
            members
                .endpoints
                .iter()
                .zip(&members.checks)
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
        &self.config == other && self.tls_files == tls_files_hash(other)
    }
}

/// Power of two choices: two distinct random usable endpoints, the cheaper one wins
/// (requests in flight, or peak-EWMA latency x (in flight + 1); divided by the weight).
fn two_choices(
    endpoints: &[(Backend, Arc<Endpoint>)],
    ewma: bool,
    usable: impl Fn(&Endpoint) -> bool,
) -> Option<Pick> {
    use rand::Rng;
    // Evaluated once: health may change while we choose.
    let candidates: Vec<&(Backend, Arc<Endpoint>)> =
        endpoints.iter().filter(|(_, e)| usable(e)).collect();

    let mut rng = rand::rng();
    let (first, second) = match candidates.len() {
        0 => return None,
        1 => return Some(Pick(Arc::clone(&candidates[0].1))),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            (candidates[a], candidates[b])
        }
    };
    let now = Instant::now();
    let cost = |e: &Endpoint| {
        let load = e.in_flight.load(Ordering::Acquire) as f64;
        let c = if ewma {
            // An endpoint without a sample would cost 0 whatever its load.
            e.latency.estimate(now).max(MIN_LATENCY_NS) * (load + 1.0)
        } else {
            load
        };
        c / e.weight
    };
    let chosen = if cost(&second.1) < cost(&first.1) {
        second
    } else {
        first
    };
    Some(Pick(Arc::clone(&chosen.1)))
}

/// The endpoints a pool should have: the addresses written in the config, and every address
/// of every name as last resolved, in config order; an address met twice is one endpoint.
fn wanted(config: &UpstreamConfig, discovery: Option<&Discovery>) -> Result<Vec<Wanted>, String> {
    let mut out: Vec<Wanted> = Vec::with_capacity(config.endpoints.len());
    let mut push = |w: Wanted| {
        if !out.iter().any(|x| x.addr == w.addr) {
            out.push(w);
        }
    };
    for e in &config.endpoints {
        let spec = e.value()?;
        let (host, authority) = endpoint_names(&spec.hostport, config.tls);
        match spec.addr {
            Some(addr) => push(Wanted {
                addr,
                host,
                authority,
                weight: spec.weight,
            }),
            None => {
                let name =
                    discovery.and_then(|d| d.names.iter().find(|n| n.hostport == spec.hostport));
                let addrs = name
                    .and_then(|n| n.addrs.lock().clone())
                    .unwrap_or_default();
                for ip in addrs {
                    push(Wanted {
                        addr: SocketAddr::new(ip, spec.port),
                        host: host.clone(),
                        authority: authority.clone(),
                        weight: spec.weight,
                    });
                }
            }
        }
    }
    Ok(out)
}

impl Members {
    /// Endpoints, balancer and checks for `wanted`. `known` gives, per endpoint, one to keep
    /// as it is (the running pool's, after a resolution) or the health to carry over (the
    /// previous pool's, after a reload).
    fn build(
        wanted: &[Wanted],
        config: &UpstreamConfig,
        tls: &UpstreamTls,
        epoch: Instant,
        known: impl Fn(&Wanted) -> (Option<Arc<Endpoint>>, Option<Arc<EndpointHealth>>),
    ) -> Result<Members, String> {
        let checked = config.health.is_some();
        let mut endpoints = Vec::with_capacity(wanted.len());
        for w in wanted {
            let mut backend = Backend::new_with_weight(&w.addr.to_string(), w.weight)
                .map_err(|err| format!("endpoint {}: {err}", w.addr))?;
            let (kept, health) = known(w);
            let endpoint = kept.unwrap_or_else(|| {
                Arc::new(Endpoint {
                    addr: w.addr,
                    label: w.addr.to_string(),
                    host: w.host.clone(),
                    authority: w.authority.clone(),
                    authority_value: http::HeaderValue::from_str(&w.authority).ok(),
                    health: health.unwrap_or_else(|| Arc::new(EndpointHealth::new(!checked))),
                    weight: w.weight.max(1) as f64,
                    in_flight: AtomicUsize::new(0),
                    latency: PeakEwma::new(epoch),
                    failures: AtomicU32::new(0),
                    ejected_until: AtomicU64::new(0),
                    ejections: Mutex::new((0, None)),
                })
            });
            backend.ext.insert(Arc::clone(&endpoint));
            endpoints.push((backend, endpoint));
        }
        let balancer = match config.balance {
            Balance::RoundRobin => Balancer::RoundRobin,
            Balance::Random => Balancer::Random,
            Balance::ConsistentHash => {
                let set: std::collections::BTreeSet<Backend> =
                    endpoints.iter().map(|(b, _)| b.clone()).collect();
                let lb = LoadBalancer::from_backends(Backends::new(Static::new(set)));
                // A static discovery completes immediately; this publishes the endpoints.
                futures_now(lb.update())?;
                Balancer::Hash(lb)
            }
            Balance::LeastRequest => Balancer::TwoChoices { ewma: false },
            Balance::Ewma => Balancer::TwoChoices { ewma: true },
        };
        let weights: Vec<u32> = wanted
            .iter()
            .map(|w| u32::try_from(w.weight.max(1)).unwrap_or(u32::MAX))
            .collect();
        let weighted = interleave(&weights);
        let checks = match &config.health {
            Some(h) => endpoints
                .iter()
                .map(|(_, e)| {
                    health_check(h, config, config.sni.as_deref().unwrap_or(&e.host), tls)
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        Ok(Members {
            balancer,
            endpoints,
            weighted,
            next: AtomicUsize::new(0),
            spill: AtomicUsize::new(0),
            checks,
        })
    }

    /// One endpoint `usable` accepts, by the pool's balance: the weighted pick, or when that
    /// is not usable a weighted choice among the usable ones.
    fn pick(&self, key: Option<&[u8]>, usable: impl Fn(&Endpoint) -> bool) -> Option<Pick> {
        let start = match (&self.balancer, key) {
            (Balancer::TwoChoices { ewma }, _) => {
                return two_choices(&self.endpoints, *ewma, usable)
            }
            (Balancer::Hash(lb, ..), Some(key)) => {
                return lb
                    .select_with(key, MAX_SELECT_ITERATIONS, |b, _pingora_health| {
                        b.ext.get::<Arc<Endpoint>>().is_some_and(|e| usable(e))
                    })
                    .and_then(|b| b.ext.get::<Arc<Endpoint>>().cloned())
                    .map(Pick);
            }
            (Balancer::Random, _) => {
                use rand::Rng;
                rand::rng().random_range(0..self.weighted.len().max(1))
            }
            (Balancer::RoundRobin | Balancer::Hash(..), _) => {
                self.next.fetch_add(1, Ordering::Relaxed)
            }
        };
        let index = *self.weighted.get(start % self.weighted.len().max(1))? as usize;
        let (_, first) = self.endpoints.get(index)?;
        if usable(first) {
            return Some(Pick(Arc::clone(first)));
        }
        // The pick is out (unhealthy, ejected, tried): its share goes to the usable endpoints
        // by weight, in turn (round robin, a counter of its own) or at random, so an outage
        // does not land on one neighbour alone.
        let weight = |e: &Endpoint| e.weight as u64;
        let total: u64 = self
            .endpoints
            .iter()
            .filter(|(_, e)| usable(e))
            .map(|(_, e)| weight(e))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = match self.balancer {
            Balancer::Random => {
                use rand::Rng;
                rand::rng().random_range(0..total)
            }
            _ => self.spill.fetch_add(1, Ordering::Relaxed) as u64 % total,
        };
        let mut last = None;
        for (_, e) in &self.endpoints {
            if !usable(e) {
                continue;
            }
            if r < weight(e) {
                return Some(Pick(Arc::clone(e)));
            }
            r -= weight(e);
            last = Some(e);
        }
        // Health changed between the two walks.
        last.map(|e| Pick(Arc::clone(e)))
    }
}

/// Each index `weights[i]` times, round by round: `[2, 1]` gives `[0, 1, 0]`.
fn interleave(weights: &[u32]) -> Vec<u32> {
    let rounds = weights.iter().copied().max().unwrap_or(0);
    let mut out = Vec::with_capacity(weights.iter().map(|&w| w as usize).sum());
    for round in 0..rounds {
        for (i, &w) in weights.iter().enumerate() {
            if w > round {
                out.push(i as u32);
            }
        }
    }
    out
}

impl Pool {
    /// Starts a resolution of the pool's host names when one is due and none is running.
    /// Returns the pass to await (the caller spawns it), or `None`.
    pub fn due_resolution(
        self: &Arc<Self>,
        now: Instant,
        dns: &Arc<crate::discovery::Dns>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let d = self.discovery.as_ref()?;
        if !d.passes.start_due(now, d.interval) {
            return None;
        }
        let (pool, dns) = (Arc::clone(self), Arc::clone(dns));
        Some(async move {
            pool.resolve(&dns).await;
            if let Some(d) = &pool.discovery {
                d.passes.done();
            }
        })
    }

    /// Resolves the host names no answer is known for yet (a pool a reload just built), so
    /// the snapshot is not swapped in with an empty pool.
    pub async fn resolve_new_names(&self, dns: &crate::discovery::Dns) {
        if let Some(d) = &self.discovery {
            // A pass of the background task under way (a pool a reload kept) does the work.
            if d.names.iter().any(|n| n.addrs.lock().is_none()) && d.passes.start_now() {
                self.resolve(dns).await;
                d.passes.done();
            }
        }
    }

    /// Resolves every host name once, concurrently; applies the answers that changed.
    async fn resolve(&self, dns: &crate::discovery::Dns) {
        let Some(d) = &self.discovery else {
            return;
        };
        let answers =
            futures_util::future::join_all(d.names.iter().map(|n| dns.lookup(&n.host))).await;
        let mut changed = false;
        for (n, answer) in d.names.iter().zip(answers) {
            match answer {
                Ok(addrs) => {
                    if n.failing.swap(false, Ordering::AcqRel) {
                        log::info!("upstream {}: {} resolves again", self.name, n.host);
                    }
                    let mut known = n.addrs.lock();
                    if known.as_ref() != Some(&addrs) {
                        *known = Some(addrs);
                        changed = true;
                    }
                }
                Err(e) => {
                    self.metrics
                        .resolve_failures
                        .with_label_values(&[&*self.name])
                        .inc();
                    if !n.failing.swap(true, Ordering::AcqRel) {
                        let kept = n.addrs.lock().as_ref().map_or(0, Vec::len);
                        log::warn!(
                            "upstream {}: resolving {} failed ({e}); keeping its {kept} last known address(es)",
                            self.name,
                            n.host
                        );
                    }
                }
            }
        }
        if changed {
            self.refresh_members();
        }
        d.attempted.store(true, Ordering::Release);
    }

    /// Rebuilds the members from the names' current answers. Endpoints that stay are kept
    /// as they are (health, load, latency, ejection); requests under way on a removed one
    /// finish on it (their try holds it).
    fn refresh_members(&self) {
        let Some(d) = &self.discovery else {
            return;
        };
        let _one_at_a_time = d.rebuilding.lock();
        let wanted = match wanted(&self.config, Some(d)) {
            Ok(w) => w,
            Err(e) => {
                log::error!("upstream {}: {e}", self.name);
                return;
            }
        };
        let current = self.members.load_full();
        let keep = |w: &Wanted| {
            let same = current.endpoints.iter().find(|(_, e)| {
                e.addr == w.addr && e.host == w.host && e.weight == w.weight.max(1) as f64
            });
            (same.map(|(_, e)| Arc::clone(e)), None)
        };
        let members = match Members::build(&wanted, &self.config, &self.tls, self.epoch, keep) {
            Ok(m) => m,
            Err(e) => {
                log::error!("upstream {}: keeping its endpoints: {e}", self.name);
                return;
            }
        };
        let before: std::collections::BTreeSet<SocketAddr> =
            current.endpoints.iter().map(|(_, e)| e.addr).collect();
        let after: std::collections::BTreeSet<SocketAddr> =
            members.endpoints.iter().map(|(_, e)| e.addr).collect();
        let added: Vec<String> = after.difference(&before).map(|a| a.to_string()).collect();
        let removed: Vec<String> = before.difference(&after).map(|a| a.to_string()).collect();
        {
            let _one_at_a_time = self.ejecting.lock();
            let ejected = members
                .endpoints
                .iter()
                .filter(|(_, e)| e.ejected_until.load(Ordering::Acquire) != 0)
                .count();
            self.members.store(Arc::new(members));
            self.ejected.store(ejected, Ordering::Release);
        }
        // New endpoints of a checked pool wait for their first check: run it now.
        if let Some(h) = &self.health {
            if !added.is_empty() {
                h.passes.due_now();
            }
        }
        log::info!(
            "upstream {}: {} endpoint(s) after resolving (added [{}], removed [{}])",
            self.name,
            after.len(),
            added.join(", "),
            removed.join(", ")
        );
    }
}

/// A hash of the pool's TLS files' contents (0 without any).
fn tls_files_hash(config: &UpstreamConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in [&config.ca_file, &config.client_cert, &config.client_key]
        .into_iter()
        .flatten()
    {
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// The HTTP versions a pool's connections may speak: `h2` only (ALPN h2 with TLS, h2c with
/// prior knowledge without), `auto` (ALPN h2 or http/1.1 with TLS; HTTP/1.1 without, where
/// nothing negotiates), or HTTP/1.1.
fn apply_protocol(c: &UpstreamConfig, options: &mut pingora::upstreams::peer::PeerOptions) {
    match (c.protocol, c.tls) {
        (UpstreamProtocol::H2, _) => options.set_http_version(2, 2),
        (UpstreamProtocol::Auto, true) => options.set_http_version(2, 1),
        _ => options.set_http_version(1, 1),
    }
    options.max_h2_streams = c.max_h2_streams;
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
    tls: &UpstreamTls,
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
            if up.tls {
                tls.apply(&mut check.peer_template.options);
            }
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
                tls.apply(&mut check.peer_template.options);
                check.peer_template.client_cert_key = tls.client.clone();
            }
            apply_protocol(up, &mut check.peer_template.options);
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

    fn pool(balance: &str, endpoints: &str) -> Pool {
        let text = format!(
            "[server]\nlisten=[\"127.0.0.1:1\"]\n[upstreams.a]\nendpoints=[{endpoints}]\nbalance=\"{balance}\"\n"
        );
        let config = crate::config::parse(&text).unwrap();
        Pool::build(
            "a",
            &config.upstreams["a"],
            None,
            &ResilienceMetrics::unregistered(),
        )
        .unwrap()
    }

    #[test]
    fn round_robin_follows_weights_interleaved_and_skips_excluded() {
        assert_eq!(interleave(&[2, 1, 3]), vec![0, 1, 2, 0, 2, 2]);
        let p = pool("round_robin", "\"127.0.0.1:2@2\", \"127.0.0.1:3\"");
        let picks: Vec<u16> = (0..6)
            .map(|_| p.select(None, &[]).unwrap().addr().port())
            .collect();
        assert_eq!(picks, vec![2, 3, 2, 2, 3, 2]);
        let two: SocketAddr = "127.0.0.1:2".parse().unwrap();
        for _ in 0..4 {
            assert_eq!(p.select(None, &[two]).unwrap().addr().port(), 3);
        }
    }

    #[test]
    fn an_unusable_pick_is_shared_among_the_others_by_weight() {
        // A heavy endpoint that is out: its share must not all land on its neighbour.
        let p = pool(
            "round_robin",
            "\"127.0.0.1:2@10\", \"127.0.0.1:3\", \"127.0.0.1:4\", \"127.0.0.1:5@2\"",
        );
        let out: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..1600 {
            *counts
                .entry(p.select(None, &[out]).unwrap().addr().port())
                .or_insert(0) += 1;
        }
        // The usable ones get 1, 1, 2 parts, also of the heavy one's share: in turn, so
        // 400, 400, 800 of 1,600 (give or take the cycle the counters start in).
        for (port, expected) in [(3u16, 400u32), (4, 400), (5, 800)] {
            let got: u32 = counts.get(&port).copied().unwrap_or(0);
            assert!(got.abs_diff(expected) <= 2, "{port}: {got} of {counts:?}");
        }
        assert!(p.select(None, &["127.0.0.1:3".parse().unwrap()]).is_some());

        let r = pool(
            "random",
            "\"127.0.0.1:2@10\", \"127.0.0.1:3\", \"127.0.0.1:4\"",
        );
        let three = (0..2000)
            .filter(|_| r.select(None, &[out]).unwrap().addr().port() == 3)
            .count();
        assert!((850..1150).contains(&three), "{three}");
    }

    #[test]
    fn random_follows_weights() {
        let p = pool("random", "\"127.0.0.1:2@3\", \"127.0.0.1:3\"");
        let heavy = (0..4000)
            .filter(|_| p.select(None, &[]).unwrap().addr().port() == 2)
            .count();
        // 3 in 4 expected; 4,000 draws put 2,800..3,200 far beyond chance.
        assert!((2800..3200).contains(&heavy), "{heavy}");
    }
}
