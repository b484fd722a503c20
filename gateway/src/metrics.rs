//! Prometheus metrics, owned in the gateway's own registry (two gateways in one process never
//! collide, and no second `prometheus` default registry can hide them). Labels are bounded:
//! route, upstream, plugin and call names come from the config; methods outside the standard
//! set are reported as `OTHER`; endpoints are config addresses.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::snapshot::Snapshot;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub endpoint_healthy: GaugeVec,
    /// `sallyport_upstream_endpoint_ejected{upstream,endpoint}`, read from the pools.
    pub endpoint_ejected: GaugeVec,
    /// `sallyport_upstream_in_flight{upstream}`, read from the pools.
    pub upstream_in_flight: GaugeVec,
    /// `sallyport_upstream_endpoints{upstream}`: the addresses a pool balances over now
    /// (those written as IPs and those its names resolve to).
    pub upstream_endpoints: GaugeVec,
    /// Retries, ejections and spent retry budgets, counted by the pools.
    pub resilience: crate::resilience::ResilienceMetrics,
    pub plugin_rejections: IntCounterVec,
    pub plugins: std::sync::Arc<sallyport_plugins::PluginMetrics>,
    pub cache_lookups: IntCounterVec,
    pub config_reloads: IntCounterVec,
    /// `sallyport_access_log_dropped_total`: lines the access log's queue had no room for.
    pub access_log_dropped: prometheus::IntCounter,
    /// `sallyport_config_info{hash}` = 1 for the running config.
    pub config_info: GaugeVec,
    /// `sallyport_telemetry_spans_total{result}`: exported, dropped, failed.
    pub telemetry_spans: IntCounterVec,
    pub connections: crate::conn::ConnMetrics,
    /// Where plugin types register their own metrics.
    pub plugin_registry: sallyport_plugins::MetricsRegistry,
}

/// Latency buckets from 0.5 ms to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            sallyport_plugins::metrics::counter(&registry, name, help, labels)
        };
        let requests = counter(
            "sallyport_requests_total",
            "Requests answered, by route, method and status.",
            &["route", "method", "status"],
        )?;
        let upstream_requests = counter(
            "sallyport_upstream_requests_total",
            "Attempts to reach an upstream, by outcome (a 2xx-5xx class, connect_error, timeout, error).",
            &["upstream", "outcome"],
        )?;
        let plugin_rejections = counter(
            "sallyport_plugin_rejections_total",
            "Requests a plugin answered with an error, by reason.",
            &["route", "plugin", "reason"],
        )?;
        let cache_lookups = counter(
            "sallyport_cache_lookups_total",
            "Cache lookups, by result.",
            &["route", "result"],
        )?;
        let config_reloads = counter(
            "sallyport_config_reloads_total",
            "Config reloads, by result (ok or error).",
            &["result"],
        )?;
        let access_log_dropped = prometheus::IntCounter::new(
            "sallyport_access_log_dropped_total",
            "Access-log lines dropped because the writer could not keep up (server.access_log_queue was full).",
        )?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let config_info = GaugeVec::new(
            Opts::new(
                "sallyport_config_info",
                "1, labelled with the hash of the running (effective, merged) config.",
            ),
            &["hash"],
        )?;
        registry.register(Box::new(config_info.clone()))?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sallyport_request_duration_seconds",
                "Time from request received to response completed, by route.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let endpoint_healthy = GaugeVec::new(
            Opts::new(
                "sallyport_upstream_endpoint_healthy",
                "1 when the endpoint passes its health checks (or has none), else 0.",
            ),
            &["upstream", "endpoint"],
        )?;
        registry.register(Box::new(endpoint_healthy.clone()))?;
        let endpoint_ejected = GaugeVec::new(
            Opts::new(
                "sallyport_upstream_endpoint_ejected",
                "1 while passive health (outlier detection) keeps the endpoint out of rotation, else 0.",
            ),
            &["upstream", "endpoint"],
        )?;
        registry.register(Box::new(endpoint_ejected.clone()))?;
        let upstream_in_flight = GaugeVec::new(
            Opts::new(
                "sallyport_upstream_in_flight",
                "Requests being proxied to the upstream now (limits.max_in_flight caps it).",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_in_flight.clone()))?;
        let upstream_endpoints = GaugeVec::new(
            Opts::new(
                "sallyport_upstream_endpoints",
                "Endpoints in the upstream's pool now: its IP addresses and every address its host names resolve to.",
            ),
            &["upstream"],
        )?;
        registry.register(Box::new(upstream_endpoints.clone()))?;
        let resilience = crate::resilience::ResilienceMetrics {
            ejections: counter(
                "sallyport_upstream_ejections_total",
                "Endpoints ejected by outlier detection, by reason (consecutive_failures).",
                &["upstream", "endpoint", "reason"],
            )?,
            retries: counter(
                "sallyport_upstream_retries_total",
                "Tries repeated after a failed one, by the failure (connect_failure, timeout, reset, 502, 503, 504).",
                &["upstream", "reason"],
            )?,
            budget_exhausted: counter(
                "sallyport_upstream_retry_budget_exhausted_total",
                "Retries not made because the upstream's retry budget was spent.",
                &["upstream"],
            )?,
            resolve_failures: counter(
                "sallyport_upstream_resolve_failures_total",
                "Resolutions of an endpoint host name that failed (the last good addresses stay in use).",
                &["upstream"],
            )?,
        };
        // Both results exist from the start, so a dashboard sees 0 rather than no series.
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let connections_open =
            IntGauge::new("sallyport_connections_open", "Client connections open now.")?;
        registry.register(Box::new(connections_open.clone()))?;
        let connections_refused = IntCounter::new(
            "sallyport_connections_refused_total",
            "Client connections closed at accept because server.max_connections were open.",
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let connections_denied = IntCounter::new(
            "sallyport_connections_denied_total",
            "Client connections closed at accept because their address is in server.deny_connections.",
        )?;
        registry.register(Box::new(connections_denied.clone()))?;
        let client_timeouts = counter(
            "sallyport_client_timeouts_total",
            "Client connections closed for overrunning a deadline, by phase (header, body, idle).",
            &["phase"],
        )?;
        for phase in ["header", "body", "idle"] {
            client_timeouts.with_label_values(&[phase]);
        }
        let plugins = std::sync::Arc::new(sallyport_plugins::PluginMetrics::register(&registry)?);
        let telemetry_spans = counter(
            "sallyport_telemetry_spans_total",
            "Spans given to the OTLP exporter, by result (exported, dropped: queue full, failed: the collector refused or was unreachable).",
            &["result"],
        )?;
        for result in ["exported", "dropped", "failed"] {
            telemetry_spans.with_label_values(&[result]);
        }
        Ok(Metrics {
            plugin_registry: sallyport_plugins::MetricsRegistry::new(registry.clone()),
            registry,
            requests,
            request_duration,
            upstream_requests,
            endpoint_healthy,
            endpoint_ejected,
            upstream_in_flight,
            upstream_endpoints,
            resilience,
            plugin_rejections,
            plugins,
            cache_lookups,
            config_reloads,
            access_log_dropped,
            config_info,
            telemetry_spans,
            connections: crate::conn::ConnMetrics {
                open: connections_open,
                refused: connections_refused,
                denied: connections_denied,
                timeouts: client_timeouts,
            },
        })
    }

    /// A config with this hash is now running.
    pub fn config_loaded(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1.0);
    }

    /// The Prometheus text exposition, with endpoint health read from the current snapshot
    /// (so endpoints removed by a reload disappear).
    pub fn render(&self, snapshot: &Snapshot, access_log_dropped: u64) -> Vec<u8> {
        let counted = self.access_log_dropped.get();
        if access_log_dropped > counted {
            self.access_log_dropped.inc_by(access_log_dropped - counted);
        }
        self.endpoint_healthy.reset();
        self.endpoint_ejected.reset();
        self.upstream_in_flight.reset();
        self.upstream_endpoints.reset();
        let now = std::time::Instant::now();
        for (name, pool) in &snapshot.pools {
            for e in pool.endpoint_states(now) {
                let labels = [name.as_str(), e.label.as_str()];
                self.endpoint_healthy
                    .with_label_values(&labels)
                    .set(if e.healthy { 1.0 } else { 0.0 });
                self.endpoint_ejected
                    .with_label_values(&labels)
                    .set(if e.ejected { 1.0 } else { 0.0 });
            }
            self.upstream_in_flight
                .with_label_values(&[name.as_str()])
                .set(pool.in_flight() as f64);
            self.upstream_endpoints
                .with_label_values(&[name.as_str()])
                .set(pool.endpoint_count() as f64);
        }
        let mut out = Vec::with_capacity(8192);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("encoding metrics failed: {e}");
        }
        out
    }
}
