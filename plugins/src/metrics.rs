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
    /// `sallyport_cache_bytes{plugin}`: bytes a cache plugin holds (bodies and metadata).
    pub cache_bytes: IntGaugeVec,
    /// `sallyport_cache_evictions_total{plugin}`: entries removed to stay within `max_size`.
    pub cache_evictions: IntCounterVec,
    /// `sallyport_traffic_split_total{route,plugin,upstream}`: requests a split sent elsewhere.
    pub traffic_split: IntCounterVec,
    /// `sallyport_identity_tokens_total{plugin,result}`: minted, cached, exchanged, failed.
    pub identity_tokens: IntCounterVec,
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
        let cache_bytes = IntGaugeVec::new(
            Opts::new(
                "sallyport_cache_bytes",
                "Bytes held by a cache plugin's store (bodies and metadata).",
            ),
            &["plugin"],
        )?;
        registry.register(Box::new(cache_bytes.clone()))?;
        let cache_evictions = counter(
            "sallyport_cache_evictions_total",
            "Cache entries evicted to stay within the plugin's max_size.",
            &["plugin"],
        )?;
        let traffic_split = counter(
            "sallyport_traffic_split_total",
            "Requests a traffic_split rule sent to another upstream pool, by pool.",
            &["route", "plugin", "upstream"],
        )?;
        let identity_tokens = counter(
            "sallyport_identity_tokens_total",
            "Tokens identity_token plugins gave services, by result (minted, cached, exchanged, failed).",
            &["plugin", "result"],
        )?;
        Ok(PluginMetrics {
            identity_tokens,
            traffic_split,
            cache_bytes,
            cache_evictions,
            concurrency_in_flight,
            aggregate_calls,
            aggregate_call_duration,
            quota_decisions,
            quota_store_errors,
        })
    }
}

/// The gateway's registry as plugins see it: one for the process lifetime, shared by every
/// build. A plugin gets a view named after its type ([`TypeMetrics`]) in
/// [`crate::BuildEnv::registry`] and registers its own collectors there, without editing a
/// shared struct.
#[derive(Clone)]
pub struct MetricsRegistry {
    registry: Registry,
    /// Collectors registered so far, by full name: a reload builds plugins again, and asking
    /// for a name again must return the collector that holds the counts.
    known: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<String, Known>>>,
}

#[derive(Clone)]
enum Known {
    Counter(IntCounterVec, Vec<String>),
    Gauge(IntGaugeVec, Vec<String>),
    Histogram(HistogramVec, Vec<String>),
}

impl MetricsRegistry {
    pub fn new(registry: Registry) -> Self {
        MetricsRegistry {
            registry,
            known: Default::default(),
        }
    }

    /// The view of one plugin type: its metrics are named `sallyport_<kind>_<name>`.
    pub fn for_type(&self, kind: &'static str) -> TypeMetrics {
        TypeMetrics {
            registry: self.clone(),
            prefix: format!("sallyport_{kind}_"),
        }
    }

    fn get_or_register(
        &self,
        name: String,
        labels: &[&str],
        make: impl FnOnce(&str) -> Result<Known, prometheus::Error>,
    ) -> Result<Known, crate::BuildError> {
        let fail = |m: String| crate::BuildError::new("", format!("metric {name}: {m}"));
        let mut known = self.known.lock();
        if let Some(k) = known.get(&name) {
            let same_labels =
                |l: &Vec<String>| l.iter().map(String::as_str).eq(labels.iter().copied());
            let matches = match k {
                Known::Counter(_, l) | Known::Gauge(_, l) | Known::Histogram(_, l) => {
                    same_labels(l)
                }
            };
            return if matches {
                Ok(k.clone())
            } else {
                Err(fail("registered before with other labels".into()))
            };
        }
        let k = make(&name).map_err(|e| fail(e.to_string()))?;
        let collector: Box<dyn prometheus::core::Collector> = match &k {
            Known::Counter(c, _) => Box::new(c.clone()),
            Known::Gauge(g, _) => Box::new(g.clone()),
            Known::Histogram(h, _) => Box::new(h.clone()),
        };
        self.registry
            .register(collector)
            .map_err(|e| fail(e.to_string()))?;
        known.insert(name, k.clone());
        Ok(k)
    }
}

/// One plugin type's metrics (`sallyport_<kind>_<name>`), from [`MetricsRegistry::for_type`].
/// Asking again for a name returns the same collector (reloads keep counting); the same name
/// with other labels or of another kind is a build error. Label values must stay bounded.
#[derive(Clone)]
pub struct TypeMetrics {
    registry: MetricsRegistry,
    prefix: String,
}

impl TypeMetrics {
    /// A counter family `sallyport_<kind>_<name>`.
    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, crate::BuildError> {
        let owned = labels.iter().map(|l| l.to_string()).collect();
        match self
            .registry
            .get_or_register(format!("{}{name}", self.prefix), labels, |full| {
                IntCounterVec::new(Opts::new(full, help), labels).map(|c| Known::Counter(c, owned))
            })? {
            Known::Counter(c, _) => Ok(c),
            _ => Err(crate::BuildError::new(
                "",
                format!("metric {name} is not a counter"),
            )),
        }
    }

    /// A gauge family `sallyport_<kind>_<name>`.
    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, crate::BuildError> {
        let owned = labels.iter().map(|l| l.to_string()).collect();
        match self
            .registry
            .get_or_register(format!("{}{name}", self.prefix), labels, |full| {
                IntGaugeVec::new(Opts::new(full, help), labels).map(|g| Known::Gauge(g, owned))
            })? {
            Known::Gauge(g, _) => Ok(g),
            _ => Err(crate::BuildError::new(
                "",
                format!("metric {name} is not a gauge"),
            )),
        }
    }

    /// A histogram family `sallyport_<kind>_<name>` with these bucket bounds.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<HistogramVec, crate::BuildError> {
        let owned = labels.iter().map(|l| l.to_string()).collect();
        match self
            .registry
            .get_or_register(format!("{}{name}", self.prefix), labels, |full| {
                HistogramVec::new(
                    HistogramOpts::new(full, help).buckets(buckets.to_vec()),
                    labels,
                )
                .map(|h| Known::Histogram(h, owned))
            })? {
            Known::Histogram(h, _) => Ok(h),
            _ => Err(crate::BuildError::new(
                "",
                format!("metric {name} is not a histogram"),
            )),
        }
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    #[test]
    fn names_are_namespaced_and_asking_again_returns_the_same_collector() {
        let registry = Registry::new();
        let metrics = MetricsRegistry::new(registry.clone());
        let a = metrics.for_type("example_header");
        let first = a.counter("set_total", "Headers set.", &["plugin"]).unwrap();
        first.with_label_values(&["p"]).inc();
        // A reload builds the plugin again: the counter carries on.
        let again = a.counter("set_total", "Headers set.", &["plugin"]).unwrap();
        again.with_label_values(&["p"]).inc();
        let families = registry.gather();
        assert_eq!(families.len(), 1);
        assert_eq!(families[0].name(), "sallyport_example_header_set_total");
        assert_eq!(first.with_label_values(&["p"]).get(), 2);
        // Other labels or another kind under the same name are refused.
        assert!(a.counter("set_total", "x", &["route"]).is_err());
        assert!(a.gauge("set_total", "x", &["plugin"]).is_err());
        assert!(a.counter("bad name", "x", &[]).is_err());
        // Another type's view cannot collide with it.
        let b = metrics.for_type("other");
        assert!(b.counter("set_total", "x", &["route"]).is_ok());
    }
}
