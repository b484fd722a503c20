//! The rules of resilience that do not touch a socket: which failed try is repeated (and
//! after what wait), the per-pool retry budget, how long an outlier stays ejected, and the
//! peak-EWMA latency estimate of `balance = "ewma"`. Every rule takes the time as an argument,
//! so tests drive it with their own clock; `upstream` holds the state per pool and endpoint,
//! `proxy` and `calls` apply the decisions to proxied requests and plugin calls alike.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::IntCounterVec;

use crate::config::{RetryCondition, RetryConfig, UpstreamConfig};

/// Sent on the second and later tries of a request (proxied or a plugin's call), with the
/// try's number, so a service can tell a retry from a new request.
pub const X_SALLYPORT_ATTEMPT: &str = "x-sallyport-attempt";

/// No try starts with less than this left before the route's deadline.
pub const MIN_TRY_TIME: Duration = Duration::from_millis(5);

/// The window of the retry budget.
pub const BUDGET_WINDOW_SECS: u64 = 10;

/// How a try failed, as `retry_on` and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, unreachable, connect timeout): nothing was sent.
    ConnectFailure,
    /// Connected, then no answer within the try's read or write deadline.
    Timeout,
    /// Connected, then the connection broke before a complete answer.
    Reset,
    /// The endpoint answered with this status.
    Status(u16),
}

impl Failure {
    /// The `reason` label of `sallyport_upstream_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::ConnectFailure => "connect_failure",
            Failure::Timeout => "timeout",
            Failure::Reset => "reset",
            Failure::Status(502) => "502",
            Failure::Status(503) => "503",
            Failure::Status(504) => "504",
            Failure::Status(_) => "status",
        }
    }
}

/// Why a failed try is not repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRetry {
    /// `retry_on` does not name this failure.
    NotListed,
    /// The request already had `attempts` tries.
    Attempts,
    /// The method is not idempotent and the request may have reached the endpoint.
    Method,
    /// The request body was streamed further than the gateway keeps for a replay.
    Body,
    /// The route's `timeout` would pass before the next try starts.
    Deadline,
    /// The pool's retry budget is spent.
    Budget,
}

/// What is known about a request when one of its tries failed.
#[derive(Debug, Clone, Copy)]
pub struct TryState {
    /// Tries made so far, the failed one included.
    pub tries: usize,
    /// GET, HEAD, OPTIONS, TRACE, PUT, DELETE (RFC 9110 section 9.2.2).
    pub idempotent_method: bool,
    /// The request carries an `Idempotency-Key`.
    pub idempotency_key: bool,
    /// The request body can be sent again.
    pub replayable: bool,
    /// When the route's `timeout` runs out.
    pub deadline: Option<Instant>,
    /// The connection was a reused pooled one that the endpoint had closed: an idempotent
    /// request is repeated even when `retry_on` lacks `reset` (and without charging the
    /// budget); a non-idempotent one is not (it may have been written already).
    pub stale_connection: bool,
}

/// A pool's retry rules, compiled from `[upstreams.X.retry]` (or the older `retries`).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts: usize,
    on: Vec<RetryCondition>,
    idempotent_only: bool,
    pub per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl RetryPolicy {
    pub fn new(up: &UpstreamConfig) -> RetryPolicy {
        let default = RetryConfig::default();
        let r = up.retry.as_ref().unwrap_or(&default);
        RetryPolicy {
            attempts: up.attempts(),
            on: r
                .retry_on
                .iter()
                .filter_map(|c| c.value().ok().copied())
                .collect(),
            idempotent_only: r.idempotent_only,
            per_try_timeout: r.per_try_timeout.map(|d| d.get()),
            backoff_base: r.backoff.base.get(),
            backoff_max: r.backoff.max.get(),
        }
    }

    /// Whether `retry_on` names this status (checked on every response, so it is cheap).
    pub fn retries_status(&self, status: u16) -> bool {
        (502..=504).contains(&status) && self.on.contains(&RetryCondition::Status(status))
    }

    fn lists(&self, f: Failure) -> bool {
        let c = match f {
            Failure::ConnectFailure => RetryCondition::ConnectFailure,
            Failure::Timeout => RetryCondition::Timeout,
            Failure::Reset => RetryCondition::Reset,
            Failure::Status(s) => RetryCondition::Status(s),
        };
        self.on.contains(&c)
    }

    /// Whether the failed try may be repeated, budget aside, and after what wait. `jitter`
    /// is a random number in `[0, 1)` (full jitter: the wait is that share of the cap).
    pub fn decide(
        &self,
        f: Failure,
        t: &TryState,
        now: Instant,
        jitter: f64,
    ) -> Result<Duration, NoRetry> {
        let stale = t.stale_connection && f == Failure::Reset;
        if !self.lists(f) && !stale {
            return Err(NoRetry::NotListed);
        }
        if t.tries >= self.attempts {
            return Err(NoRetry::Attempts);
        }
        // Nothing was sent on a failed connect: any request may go again. Otherwise the
        // endpoint may have acted on it (RFC 9110 section 9.2.2), a stale pooled connection
        // included (the request was written before the close was noticed).
        let reached = f != Failure::ConnectFailure;
        let method_ok =
            t.idempotent_method || !reached || (!self.idempotent_only && t.idempotency_key);
        if !method_ok {
            return Err(NoRetry::Method);
        }
        if !t.replayable {
            return Err(NoRetry::Body);
        }
        let wait = self.backoff(t.tries, jitter);
        if let Some(deadline) = t.deadline {
            // A try needs some time to be worth starting.
            let starts = now.checked_add(wait + MIN_TRY_TIME);
            if starts.is_none_or(|s| s > deadline) {
                return Err(NoRetry::Deadline);
            }
        }
        Ok(wait)
    }

    /// Full jitter: a share `jitter` of `min(max, base x 2^(tries - 1))`.
    fn backoff(&self, tries: usize, jitter: f64) -> Duration {
        let shift = u32::try_from(tries.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(20);
        let cap = self
            .backoff_base
            .saturating_mul(1 << shift)
            .min(self.backoff_max);
        cap.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The deadline of one try: the pool's own timeout, cut by `per_try_timeout` and by the
    /// time left before the route's deadline.
    pub fn try_timeout(
        &self,
        pool_timeout: Duration,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Duration {
        let mut t = pool_timeout;
        if let Some(p) = self.per_try_timeout {
            t = t.min(p);
        }
        if let Some(d) = deadline {
            t = t.min(d.saturating_duration_since(now));
        }
        t
    }
}

/// Retries may add at most `ratio` x requests + `min_per_second` x window over a sliding
/// window of [`BUDGET_WINDOW_SECS`] one-second buckets (the rule Linkerd and Finagle use), so
/// a failing pool sees a bounded multiple of its traffic instead of `attempts` x.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    epoch: Instant,
    buckets: Mutex<[Bucket; BUDGET_WINDOW_SECS as usize]>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32, epoch: Instant) -> RetryBudget {
        RetryBudget {
            ratio,
            min_per_second,
            epoch,
            buckets: Mutex::new([Bucket::default(); BUDGET_WINDOW_SECS as usize]),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        // +1: second 0 would look like an unused bucket.
        now.saturating_duration_since(self.epoch).as_secs() + 1
    }

    fn bucket(buckets: &mut [Bucket], second: u64) -> &mut Bucket {
        let len = buckets.len() as u64;
        let b = &mut buckets[(second % len) as usize];
        if b.second != second {
            *b = Bucket {
                second,
                ..Bucket::default()
            };
        }
        b
    }

    /// A request's first try.
    pub fn request(&self, now: Instant) {
        let second = self.second(now);
        Self::bucket(&mut *self.buckets.lock(), second).requests += 1;
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        let second = self.second(now);
        let mut buckets = self.buckets.lock();
        let oldest = second.saturating_sub(BUDGET_WINDOW_SECS - 1);
        let (requests, retries) = buckets
            .iter()
            .filter(|b| b.second >= oldest && b.second <= second)
            .fold((0u64, 0u64), |(q, r), b| (q + b.requests, r + b.retries));
        let allowed = self.ratio * requests as f64
            + f64::from(self.min_per_second) * BUDGET_WINDOW_SECS as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        Self::bucket(&mut *buckets, second).retries += 1;
        true
    }
}

/// How long the `times`-th ejection lasts: `base x times`, plus up to 10% jitter, at most
/// `max`. `jitter` is a random number in `[0, 1)`.
pub fn ejection_time(base: Duration, max: Duration, times: u32, jitter: f64) -> Duration {
    let d = base.saturating_mul(times.max(1)).min(max);
    let extra = Duration::try_from_secs_f64(d.as_secs_f64() * 0.1 * jitter.clamp(0.0, 1.0))
        .unwrap_or_default();
    d.saturating_add(extra).min(max)
}

/// How fast an endpoint's latency estimate forgets (Linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// A failed try counts as at least this slow, so a fast-failing endpoint does not attract
/// traffic by its quick errors.
pub const FAILURE_PENALTY: Duration = Duration::from_millis(100);

/// Peak-EWMA latency of one endpoint: a slower sample is taken at once, faster ones blend in
/// with a weight that grows with the time since the last one, and the estimate decays
/// towards zero while the endpoint gets no traffic (so it is tried again).
#[derive(Debug)]
pub struct PeakEwma {
    /// `(estimate in nanoseconds, when it was last updated)`.
    state: Mutex<(f64, Instant)>,
}

impl PeakEwma {
    pub fn new(now: Instant) -> PeakEwma {
        PeakEwma {
            state: Mutex::new((0.0, now)),
        }
    }

    fn decay(elapsed: Duration) -> f64 {
        (-elapsed.as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
    }

    pub fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let mut s = self.state.lock();
        let w = Self::decay(now.saturating_duration_since(s.1));
        s.0 = if sample > s.0 {
            sample
        } else {
            s.0 * w + sample * (1.0 - w)
        };
        s.1 = now;
    }

    /// The estimate now, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        let s = self.state.lock();
        s.0 * Self::decay(now.saturating_duration_since(s.1))
    }
}

/// The counters of retries and ejections (the gauges are read from the pools when metrics
/// are rendered).
#[derive(Clone)]
pub struct ResilienceMetrics {
    /// `sallyport_upstream_ejections_total{upstream,endpoint,reason}`.
    pub ejections: IntCounterVec,
    /// `sallyport_upstream_retries_total{upstream,reason}`.
    pub retries: IntCounterVec,
    /// `sallyport_upstream_retry_budget_exhausted_total{upstream}`.
    pub budget_exhausted: IntCounterVec,
    /// `sallyport_upstream_resolve_failures_total{upstream}`.
    pub resolve_failures: IntCounterVec,
}

impl ResilienceMetrics {
    /// Counters that no registry exports (unit tests, `--check`).
    pub fn unregistered() -> ResilienceMetrics {
        let make = |name: &str, labels: &[&str]| {
            IntCounterVec::new(prometheus::Opts::new(name, name), labels)
                .unwrap_or_else(|_| unreachable!("static metric definition"))
        };
        ResilienceMetrics {
            ejections: make("ejections", &["upstream", "endpoint", "reason"]),
            retries: make("retries", &["upstream", "reason"]),
            budget_exhausted: make("budget_exhausted", &["upstream"]),
            resolve_failures: make("resolve_failures", &["upstream"]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra: &str) -> RetryPolicy {
        let text = format!(
            "[server]\nlisten=[\"127.0.0.1:1\"]\n[upstreams.a]\nendpoints=[\"127.0.0.1:2\"]\n[upstreams.a.retry]\n{extra}\n"
        );
        RetryPolicy::new(&crate::config::parse(&text).unwrap().upstreams["a"])
    }

    fn state(tries: usize) -> TryState {
        TryState {
            tries,
            idempotent_method: true,
            idempotency_key: false,
            replayable: true,
            deadline: None,
            stale_connection: false,
        }
    }

    #[test]
    fn retries_only_listed_failures_within_attempts() {
        let p = policy("attempts = 3\nretry_on = [\"connect_failure\", \"503\"]");
        let now = Instant::now();
        assert!(p.decide(Failure::Status(503), &state(1), now, 0.5).is_ok());
        assert!(p.decide(Failure::Status(503), &state(2), now, 0.5).is_ok());
        assert_eq!(
            p.decide(Failure::Status(503), &state(3), now, 0.5),
            Err(NoRetry::Attempts)
        );
        assert_eq!(
            p.decide(Failure::Status(502), &state(1), now, 0.5),
            Err(NoRetry::NotListed)
        );
        assert_eq!(
            p.decide(Failure::Timeout, &state(1), now, 0.5),
            Err(NoRetry::NotListed)
        );
        assert!(p.retries_status(503) && !p.retries_status(502) && !p.retries_status(200));
    }

    /// RFC 9110 section 9.2.2: a request that may have been received is repeated only when
    /// its method is idempotent (or, when allowed, it carries an Idempotency-Key).
    #[test]
    fn non_idempotent_requests_repeat_only_when_nothing_was_sent() {
        let now = Instant::now();
        let post = TryState {
            idempotent_method: false,
            ..state(1)
        };
        let p = policy("retry_on = [\"connect_failure\", \"timeout\", \"reset\"]");
        assert!(p.decide(Failure::ConnectFailure, &post, now, 0.0).is_ok());
        assert_eq!(
            p.decide(Failure::Timeout, &post, now, 0.0),
            Err(NoRetry::Method)
        );
        let keyed = TryState {
            idempotency_key: true,
            ..post
        };
        assert_eq!(
            p.decide(Failure::Timeout, &keyed, now, 0.0),
            Err(NoRetry::Method),
            "idempotent_only (the default) ignores the key"
        );
        let lenient = policy("retry_on = [\"timeout\"]\nidempotent_only = false");
        assert!(lenient.decide(Failure::Timeout, &keyed, now, 0.0).is_ok());
        assert_eq!(
            lenient.decide(Failure::Timeout, &post, now, 0.0),
            Err(NoRetry::Method)
        );
        // A pooled connection the endpoint had closed: repeated without `reset` listed, but
        // only when idempotent (the request may have been written before the close).
        let stale = TryState {
            stale_connection: true,
            ..state(1)
        };
        assert!(policy("retry_on = []")
            .decide(Failure::Reset, &stale, now, 0.0)
            .is_ok());
        let stale_post = TryState {
            idempotent_method: false,
            ..stale
        };
        assert_eq!(
            policy("retry_on = []").decide(Failure::Reset, &stale_post, now, 0.0),
            Err(NoRetry::Method)
        );
        let unreplayable = TryState {
            replayable: false,
            ..state(1)
        };
        assert_eq!(
            p.decide(Failure::Timeout, &unreplayable, now, 0.0),
            Err(NoRetry::Body)
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let p = policy("attempts = 5\nbackoff = { base = \"10ms\", max = \"30ms\" }");
        let now = Instant::now();
        let wait = |tries, j| p.decide(Failure::ConnectFailure, &state(tries), now, j);
        assert_eq!(wait(1, 0.0), Ok(Duration::ZERO));
        assert_eq!(wait(1, 0.5), Ok(Duration::from_millis(5)));
        assert_eq!(wait(2, 0.5), Ok(Duration::from_millis(10)));
        assert_eq!(wait(3, 0.5), Ok(Duration::from_millis(15)), "capped at max");
        assert_eq!(wait(4, 0.999_999), Ok(Duration::from_nanos(29_999_970)));
    }

    #[test]
    fn no_retry_starts_past_the_deadline() {
        let p = policy("backoff = { base = \"100ms\", max = \"100ms\" }");
        let now = Instant::now();
        let with_deadline = |left_ms| TryState {
            deadline: Some(now + Duration::from_millis(left_ms)),
            ..state(1)
        };
        assert!(p
            .decide(Failure::ConnectFailure, &with_deadline(200), now, 0.5)
            .is_ok());
        assert_eq!(
            p.decide(Failure::ConnectFailure, &with_deadline(40), now, 0.5),
            Err(NoRetry::Deadline)
        );
        assert_eq!(
            p.try_timeout(
                Duration::from_secs(30),
                Some(now + Duration::from_millis(40)),
                now
            ),
            Duration::from_millis(40)
        );
        let per_try = policy("per_try_timeout = \"300ms\"");
        assert_eq!(
            per_try.try_timeout(Duration::from_secs(30), None, now),
            Duration::from_millis(300)
        );
        assert_eq!(
            per_try.try_timeout(Duration::from_millis(100), None, now),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn budget_bounds_retries_to_a_share_of_requests_over_a_sliding_window() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.2, 0, t0);
        for _ in 0..100 {
            b.request(t0);
        }
        let granted = (0..100).filter(|_| b.try_retry(t0)).count();
        assert_eq!(granted, 20, "20% of 100 requests");
        // 9 s later the window still holds them; 10 s later it does not.
        assert!(!b.try_retry(t0 + Duration::from_secs(9)));
        assert!(!b.try_retry(t0 + Duration::from_secs(10)));
        for _ in 0..10 {
            b.request(t0 + Duration::from_secs(10));
        }
        assert_eq!(
            (0..10)
                .filter(|_| b.try_retry(t0 + Duration::from_secs(10)))
                .count(),
            2
        );

        let floor = RetryBudget::new(0.0, 1, t0);
        let granted = (0..100).filter(|_| floor.try_retry(t0)).count();
        assert_eq!(
            granted, 10,
            "min_per_second x the 10 s window with no traffic"
        );
    }

    #[test]
    fn ejections_grow_with_each_one_up_to_the_cap() {
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(300);
        assert_eq!(ejection_time(base, max, 1, 0.0), base);
        assert_eq!(ejection_time(base, max, 2, 0.0), 2 * base);
        assert_eq!(ejection_time(base, max, 2, 0.5), Duration::from_secs(63));
        assert_eq!(ejection_time(base, max, 50, 0.9), max);
    }

    #[test]
    fn peak_ewma_takes_a_slow_sample_at_once_and_forgets_it_over_time() {
        let t0 = Instant::now();
        let e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(1), t0);
        assert_eq!(e.estimate(t0), 1e6);
        e.observe(Duration::from_millis(50), t0 + Duration::from_millis(10));
        assert_eq!(e.estimate(t0 + Duration::from_millis(10)), 50e6, "peak");
        let later = e.estimate(t0 + Duration::from_millis(10) + EWMA_DECAY);
        assert!((later - 50e6 / std::f64::consts::E).abs() < 1.0, "{later}");
        // Fast samples pull it down as time passes between them.
        let mut t = t0 + Duration::from_millis(10);
        for _ in 0..100 {
            t += Duration::from_millis(100);
            e.observe(Duration::from_millis(1), t);
        }
        assert!(e.estimate(t) < 30e6, "{}", e.estimate(t));
    }
}
