//! OpenTelemetry trace export (`[telemetry]`): the gateway builds each request's spans itself
//! (one SERVER span, a CLIENT span per upstream attempt and per aggregate call) with the ids
//! the `trace` plugin put in `traceparent`, and hands them to an OTLP/HTTP exporter of the
//! `opentelemetry-otlp` crate on a thread of its own.
//!
//! The request path only pushes finished spans into a bounded queue (`max_queue`): a full
//! queue drops the span and counts it, so a slow or absent collector never delays a request.
//! The export thread batches (up to 512 spans or 1 s) and exports with `export_timeout`. A
//! reload builds a new exporter when `[telemetry]` changed; the old thread flushes what it
//! holds and ends when the last request using it finished.
//!
//! Written around the SDK's exporter rather than its tracer: the tracer generates span ids of
//! its own, while these spans must carry the ids already sent upstream in `traceparent`.

use std::borrow::Cow;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use prometheus::IntCounterVec;

use crate::config::{expand_env, TelemetryConfig};

/// Spans exported in one request to the collector at most.
const BATCH: usize = 512;
/// How long a span may wait for a batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// One finished span, as the request path describes it.
pub struct FinishedSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
    pub kind: SpanKind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    pub events: Vec<(&'static str, SystemTime)>,
    pub error: Option<String>,
}

/// A running exporter: the queue into its thread, and the sampling decision.
pub struct Telemetry {
    config: TelemetryConfig,
    queue: SyncSender<SpanData>,
    spans: IntCounterVec,
    scope: InstrumentationScope,
}

impl Telemetry {
    /// Builds the exporter and starts its thread.
    pub fn start(config: &TelemetryConfig, spans: IntCounterVec) -> anyhow::Result<Telemetry> {
        let mut headers = std::collections::HashMap::new();
        for (name, value) in &config.headers {
            headers.insert(
                name.clone(),
                expand_env(value)
                    .map_err(|e| anyhow::anyhow!("telemetry.headers.{name:?}: {e}"))?,
            );
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.otlp_endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(config.export_timeout.get())
            .with_headers(headers)
            .build()
            .map_err(|e| anyhow::anyhow!("telemetry: the OTLP exporter: {e}"))?;
        let instance = format!(
            "{}/{}",
            hostname().unwrap_or_else(|| "unknown".into()),
            std::process::id()
        );
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attributes([
                KeyValue::new("service.instance.id", instance),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        exporter.set_resource(&resource);
        let (queue, rx) = std::sync::mpsc::sync_channel(config.max_queue);
        let counter = spans.clone();
        std::thread::Builder::new()
            .name("sallyport-otlp".into())
            .spawn(move || export_loop(exporter, rx, counter))?;
        Ok(Telemetry {
            config: config.clone(),
            queue,
            spans,
            scope: InstrumentationScope::builder("sallyport")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        })
    }

    pub fn config(&self) -> &TelemetryConfig {
        &self.config
    }

    pub fn record_enduser(&self) -> bool {
        self.config.record_enduser
    }

    /// Whether a trace is recorded: always when the client's `traceparent` was sampled
    /// (parent-based), otherwise by `sample_ratio` on the trace id (the same answer on every
    /// gateway for one trace).
    pub fn sampled(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match parent_sampled {
            Some(sampled) => sampled,
            None => {
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                let x = u64::from_be_bytes(low) >> 11;
                (x as f64) < self.config.sample_ratio * (1u64 << 53) as f64
            }
        }
    }

    /// Queues a finished span for export; never waits.
    pub fn record(&self, span: FinishedSpan) {
        let data = SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(span.trace_id),
                SpanId::from_bytes(span.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: span.parent_id.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: span.parent_is_remote,
            span_kind: span.kind,
            name: Cow::Owned(span.name),
            start_time: span.start,
            end_time: span.end.max(span.start),
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: {
                let mut events = SpanEvents::default();
                events.events = span
                    .events
                    .into_iter()
                    .map(|(name, at)| Event::new(name, at, Vec::new(), 0))
                    .collect();
                events
            },
            links: SpanLinks::default(),
            status: match span.error {
                Some(description) => Status::error(description),
                None => Status::Unset,
            },
            instrumentation_scope: self.scope.clone(),
        };
        match self.queue.try_send(data) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.spans.with_label_values(&["dropped"]).inc();
            }
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The export thread: batches spans and exports them until every sender is gone.
fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    rx: Receiver<SpanData>,
    spans: IntCounterVec,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("telemetry: cannot start the export runtime: {e}");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut open = true;
    while open {
        let deadline = std::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        let sent = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
        match runtime.block_on(exporter.export(sent)) {
            Ok(()) => spans.with_label_values(&["exported"]).inc_by(n),
            Err(e) => {
                spans.with_label_values(&["failed"]).inc_by(n);
                log::debug!("telemetry: export failed: {e}");
            }
        }
    }
}

/// One try to reach an endpoint, for its CLIENT span.
pub struct AttemptSpan {
    pub span_id: [u8; 8],
    pub endpoint: std::net::SocketAddr,
    pub start: SystemTime,
    pub connected: Option<SystemTime>,
    pub response: Option<SystemTime>,
    pub status: Option<u16>,
    pub error: Option<&'static str>,
}

/// What the request path records for a request's spans while it runs; turned into spans
/// (or dropped, when not sampled) at the end.
pub struct SpanRecorder {
    pub telemetry: std::sync::Arc<Telemetry>,
    pub start: SystemTime,
    /// The SERVER span's id.
    pub span_id: [u8; 8],
    pub attempts: Vec<AttemptSpan>,
    /// The trace's sampled flag was set from telemetry's decision (see `decide_sampling`).
    pub sampling_decided: bool,
}

/// A random span id (never all zero).
pub fn new_span_id() -> [u8; 8] {
    sallyport_plugins::trace::nonzero_span_id(&mut rand::rng())
}

impl SpanRecorder {
    pub fn new(telemetry: std::sync::Arc<Telemetry>) -> Self {
        SpanRecorder {
            telemetry,
            start: SystemTime::now(),
            span_id: new_span_id(),
            attempts: Vec::new(),
            sampling_decided: false,
        }
    }

    /// A try begins: the first carries the span id the `trace` plugin sends upstream.
    pub fn attempt(&mut self, endpoint: std::net::SocketAddr, first_id: Option<[u8; 8]>) {
        let span_id = match (self.attempts.is_empty(), first_id) {
            (true, Some(id)) => id,
            _ => new_span_id(),
        };
        self.attempts.push(AttemptSpan {
            span_id,
            endpoint,
            start: SystemTime::now(),
            connected: None,
            response: None,
            status: None,
            error: None,
        });
    }

    pub fn last(&mut self) -> Option<&mut AttemptSpan> {
        self.attempts.last_mut()
    }
}

/// The SERVER span's description, filled in by the request path at the end.
pub struct ServerSpan {
    pub name: String,
    pub attributes: Vec<KeyValue>,
    pub method: String,
    pub path: String,
    /// The 5xx failure, if any (`error.type`).
    pub error: Option<String>,
}

/// The trace a request's spans belong to: `(trace id, the client's parent span id, sampled by
/// the client?)`.
pub type TraceOf = ([u8; 16], Option<[u8; 8]>, Option<bool>);

impl SpanRecorder {
    /// Records the request's spans (for a sampled trace: see [`Telemetry::sampled`]).
    pub fn finish(self, trace: TraceOf, server: ServerSpan, calls: &[sallyport_plugins::CallSpan]) {
        let (trace_id, parent, _) = trace;
        let end = SystemTime::now();
        for (i, a) in self.attempts.iter().enumerate() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", server.method.clone()),
                KeyValue::new("server.address", a.endpoint.ip().to_string()),
                KeyValue::new("server.port", i64::from(a.endpoint.port())),
                KeyValue::new("url.full", format!("http://{}{}", a.endpoint, server.path)),
            ];
            if i > 0 {
                attributes.push(KeyValue::new("http.request.resend_count", i as i64));
            }
            if let Some(s) = a.status {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(s)));
            }
            match (a.error, a.status) {
                (Some(e), _) => attributes.push(KeyValue::new("error.type", e)),
                (None, Some(s)) if s >= 500 => {
                    attributes.push(KeyValue::new("error.type", s.to_string()))
                }
                _ => {}
            }
            let mut events = Vec::new();
            if let Some(t) = a.connected {
                events.push(("connected", t));
            }
            if let Some(t) = a.response {
                events.push(("response_head", t));
            }
            let failed = a.error.is_some() || a.status.is_some_and(|s| s >= 500);
            let span_end = self.attempts.get(i + 1).map_or(end, |next| next.start);
            self.telemetry.record(FinishedSpan {
                trace_id,
                span_id: a.span_id,
                parent_id: Some(self.span_id),
                parent_is_remote: false,
                kind: SpanKind::Client,
                name: server.method.clone(),
                start: a.start,
                end: span_end,
                attributes,
                events,
                error: failed.then(|| a.error.unwrap_or("upstream answered 5xx").to_string()),
            });
        }
        // A plugin's calls (aggregate): one CLIENT span each, with the id its traceparent sent.
        for call in calls {
            let mut attributes = vec![
                KeyValue::new("sallyport.call", call.name.to_string()),
                KeyValue::new("sallyport.upstream", call.upstream.to_string()),
            ];
            let failed = call.outcome != "ok";
            if failed {
                attributes.push(KeyValue::new("error.type", call.outcome));
            }
            self.telemetry.record(FinishedSpan {
                trace_id,
                span_id: call.span_id,
                parent_id: Some(self.span_id),
                parent_is_remote: false,
                kind: SpanKind::Client,
                name: format!("call {}", call.name),
                start: call.start,
                end: call.start + call.duration,
                attributes,
                events: Vec::new(),
                error: failed.then(|| call.outcome.to_string()),
            });
        }
        self.telemetry.record(FinishedSpan {
            trace_id,
            span_id: self.span_id,
            parent_id: parent,
            parent_is_remote: parent.is_some(),
            kind: SpanKind::Server,
            name: server.name,
            start: self.start,
            end,
            attributes: server.attributes,
            events: Vec::new(),
            error: server.error,
        });
    }
}
