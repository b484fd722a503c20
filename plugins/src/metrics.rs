//! Metrics that plugins record. The gateway creates one `PluginMetrics` for its lifetime and
//! registers it in its own registry; every build of a plugin (at start and at each reload)
//! receives the same instance, so reloads never re-register a collector. Labels are bounded:
//! route, plugin and call names come from the config.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub struct PluginMetrics {
    /// `sallyport_aggregate_calls_total{route,call,outcome}`.
    pub aggregate_calls: IntCounterVec,
    /// `sallyport_aggregate_call_duration_seconds{route,call}`.
    pub aggregate_call_duration: HistogramVec,
    /// `sallyport_quota_decisions_total{route,plugin,decision}`.
    pub quota_decisions: IntCounterVec,
    /// `sallyport_quota_store_errors_total{plugin}`.
    pub quota_store_errors: IntCounterVec,
    /// `sallyport_concurrency_in_flight{plugin}`: slots of a bulkhead in use.
    pub concurrency_in_flight: IntGaugeVec,
}

/// Creates a counter family and registers it: the one way Sallyport makes counters.
pub fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl PluginMetrics {
    /// Creates the collectors and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<PluginMetrics, prometheus::Error> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| counter(registry, name, help, labels);
        let aggregate_calls = counter(
            "sallyport_aggregate_calls_total",
            "Aggregate sub-calls, by outcome (ok, timeout, upstream_error, unavailable, bad_response).",
            &["route", "call", "outcome"],
        )?;
        let quota_decisions = counter(
            "sallyport_quota_decisions_total",
            "Quota decisions, by decision (allowed, rejected, store_error_allowed, store_error_denied, store_error_local).",
            &["route", "plugin", "decision"],
        )?;
        let quota_store_errors = counter(
            "sallyport_quota_store_errors_total",
            "Quota store (Redis) failures.",
            &["plugin"],
        )?;
        let aggregate_call_duration = HistogramVec::new(
            HistogramOpts::new(
                "sallyport_aggregate_call_duration_seconds",
                "Duration of aggregate sub-calls.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route", "call"],
        )?;
        registry.register(Box::new(aggregate_call_duration.clone()))?;
        let concurrency_in_flight = IntGaugeVec::new(
            Opts::new(
                "sallyport_concurrency_in_flight",
                "Requests holding a slot of a concurrency bulkhead.",
            ),
            &["plugin"],
        )?;
        registry.register(Box::new(concurrency_in_flight.clone()))?;
        Ok(PluginMetrics {
            concurrency_in_flight,
            aggregate_calls,
            aggregate_call_duration,
            quota_decisions,
            quota_store_errors,
        })
    }
}
