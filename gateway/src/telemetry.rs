//! OpenTelemetry trace export (`[telemetry]`): the gateway writes each request's spans itself
//! (one SERVER span, a CLIENT span per upstream attempt and per aggregate call) with the ids
//! the `trace` plugin put in `traceparent`, and a thread of its own posts them to the
//! collector as OTLP/HTTP protobuf (`ExportTraceServiceRequest`).
//!
//! The cost on the request path is what the bench measured and shaped:
//! - A sampled request's spans are encoded once, straight into a buffer in the OTLP wire
//!   format (`Span` messages, see [`Spans`]): no attribute is allocated, copied into an SDK
//!   `SpanData`, converted into the generated protobuf types and encoded again. The SDK's
//!   exporter path cost 4.3 µs of CPU per request (two spans) on top of 2.6 µs to build the
//!   `SpanData`; this one is checked against the `opentelemetry-proto` types in the tests.
//! - That buffer is the one the export thread takes (see [`Telemetry::write`]), bounded at
//!   `max_queue` spans: beyond, spans are dropped and counted, so a slow or absent collector
//!   never delays a request.
//! - Writing never wakes the export thread: it wakes every `BATCH_DELAY`, or when a request
//!   completes a batch. (A channel that woke its receiver per span cost a context switch per
//!   span on the gateway's core: 9 µs per request.)
//!
//! The export thread sends about 512 spans per request (a request's spans are never split)
//! with `export_timeout`, through a
//! `reqwest` client (keep-alive, `headers`, https). A reload builds a new exporter when
//! `[telemetry]` changed; the old thread flushes what it holds and ends once the last request
//! using it finished.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus::IntCounterVec;
use prost::Message;

use crate::config::{expand_env, TelemetryConfig};

/// Spans exported in one request to the collector at most.
const BATCH: usize = 512;
/// How long a span may wait for a batch to fill.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// A span's kind (OTLP `Span.SpanKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
}

/// The OTLP wire format, as far as spans need it (protobuf encoding: field keys, varints,
/// length-delimited and fixed-width fields). Written here rather than through the generated
/// `opentelemetry-proto` types so a span's attributes go from the request's own strings to
/// the wire without an allocation each; the tests decode the result with those types.
mod wire {
    pub const VARINT: u8 = 0;
    pub const FIXED64: u8 = 1;
    pub const LEN: u8 = 2;
    pub const FIXED32: u8 = 5;

    /// Appends `v` as a varint. Byte by byte: a span writes a few hundred of these, nearly
    /// all one byte long, and a push into the queue's buffer (kept between batches, so it
    /// rarely grows) is the cheapest way to write one (going through a stack array and
    /// `extend_from_slice` cost ten times as much).
    #[inline]
    pub fn varint(buf: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }

    #[inline]
    pub fn varint_len(v: u64) -> usize {
        // 7 bits a byte, and 1 for zero.
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    #[inline]
    pub fn key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
        varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
    }

    /// The length of a length-delimited field of `len` bytes, key included (fields < 16).
    #[inline]
    pub fn field_len(len: usize) -> usize {
        1 + varint_len(len as u64) + len
    }

    #[inline]
    pub fn bytes(buf: &mut Vec<u8>, field: u32, value: &[u8]) {
        key(buf, field, LEN);
        varint(buf, value.len() as u64);
        buf.extend_from_slice(value);
    }

    #[inline]
    pub fn fixed64(buf: &mut Vec<u8>, field: u32, value: u64) {
        key(buf, field, FIXED64);
        buf.extend_from_slice(&value.to_le_bytes());
    }

    #[inline]
    pub fn fixed32(buf: &mut Vec<u8>, field: u32, value: u32) {
        key(buf, field, FIXED32);
        buf.extend_from_slice(&value.to_le_bytes());
    }

    /// Opens a length-delimited field whose length is known once its content is written:
    /// returns where the content starts, for [`close`].
    #[inline]
    pub fn open(buf: &mut Vec<u8>, field: u32) -> usize {
        key(buf, field, LEN);
        buf.len()
    }

    /// Puts the content's length in front of it: written after the content, then rotated
    /// into place.
    #[inline]
    pub fn close(buf: &mut Vec<u8>, start: usize) {
        let len = (buf.len() - start) as u64;
        varint(buf, len);
        buf[start..].rotate_right(varint_len(len));
    }
}

/// `Span` fields (opentelemetry/proto/trace/v1/trace.proto).
mod field {
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const EVENTS: u32 = 11;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    /// `ScopeSpans.spans`.
    pub const SCOPE_SPANS_SPANS: u32 = 2;
}

/// `Span.flags`: the W3C trace flags (sampled), and whether the parent is remote is known
/// (bit 8) and true (bit 9).
const FLAGS_SAMPLED: u32 = 0x01;
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;
/// `Status.code` ERROR.
const STATUS_CODE_ERROR: u64 = 2;

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Finished spans, encoded into a buffer: each an OTLP `Span` message as a field of
/// `ScopeSpans`, ready to be framed into an export request.
pub struct Spans<'a> {
    buf: &'a mut Vec<u8>,
    count: usize,
    /// Room to render a value (an address, a URL) before it is written: the queue keeps it
    /// between requests, so rendering allocates nothing.
    text: String,
}

/// What starts a span.
pub struct SpanStart<'a> {
    pub kind: SpanKind,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub parent_is_remote: bool,
    /// The name's parts, written one after the other (`GET` `" "` `route`).
    pub name: &'a [&'a str],
    pub start: SystemTime,
    pub end: SystemTime,
}

impl<'a> Spans<'a> {
    /// Spans appended to `buf`.
    pub fn new(buf: &'a mut Vec<u8>) -> Spans<'a> {
        Spans::with_text(buf, String::new())
    }

    /// Spans appended to `buf`, rendering values in `text`.
    fn with_text(buf: &'a mut Vec<u8>, text: String) -> Spans<'a> {
        Spans {
            buf,
            count: 0,
            text,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Opens a span; its attributes, events and status go through the writer, which closes
    /// it when dropped.
    pub fn span(&mut self, s: SpanStart<'_>) -> SpanWriter<'_> {
        let buf = &mut *self.buf;
        let start = wire::open(buf, field::SCOPE_SPANS_SPANS);
        wire::bytes(buf, field::TRACE_ID, &s.trace_id);
        wire::bytes(buf, field::SPAN_ID, &s.span_id);
        if let Some(parent) = s.parent_id {
            wire::bytes(buf, field::PARENT_SPAN_ID, &parent);
        }
        wire::key(buf, field::NAME, wire::LEN);
        wire::varint(buf, s.name.iter().map(|p| p.len()).sum::<usize>() as u64);
        for part in s.name {
            buf.extend_from_slice(part.as_bytes());
        }
        wire::key(buf, field::KIND, wire::VARINT);
        wire::varint(buf, s.kind as u64);
        let start_ns = unix_nanos(s.start);
        wire::fixed64(buf, field::START, start_ns);
        wire::fixed64(buf, field::END, unix_nanos(s.end).max(start_ns));
        let remote = if s.parent_is_remote {
            FLAGS_IS_REMOTE
        } else {
            0
        };
        wire::fixed32(
            buf,
            field::FLAGS,
            FLAGS_SAMPLED | FLAGS_HAS_IS_REMOTE | remote,
        );
        self.count += 1;
        SpanWriter { buf, start }
    }
}

/// Writes one span's attributes, events and status; closes the span when dropped.
pub struct SpanWriter<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl SpanWriter<'_> {
    /// Opens an attribute: `KeyValue { key, value: AnyValue { ... } }` up to the `AnyValue`
    /// content of `any` bytes, which the caller writes.
    #[inline]
    fn attribute(&mut self, key: &str, any: usize) {
        wire::key(self.buf, field::ATTRIBUTES, wire::LEN);
        wire::varint(
            self.buf,
            (wire::field_len(key.len()) + wire::field_len(any)) as u64,
        );
        wire::bytes(self.buf, 1, key.as_bytes());
        wire::key(self.buf, 2, wire::LEN);
        wire::varint(self.buf, any as u64);
    }

    /// A string attribute (`AnyValue { string_value }`).
    #[inline]
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.attribute(key, wire::field_len(value.len()));
        wire::bytes(self.buf, 1, value.as_bytes());
        self
    }

    /// An integer attribute (`AnyValue { int_value }`).
    #[inline]
    pub fn int(&mut self, key: &str, value: i64) -> &mut Self {
        self.attribute(key, 1 + wire::varint_len(value as u64));
        wire::key(self.buf, 3, wire::VARINT);
        wire::varint(self.buf, value as u64);
        self
    }

    /// An event without attributes (`Event { time_unix_nano, name }`).
    #[inline]
    pub fn event(&mut self, name: &str, at: SystemTime) -> &mut Self {
        wire::key(self.buf, field::EVENTS, wire::LEN);
        wire::varint(self.buf, (9 + wire::field_len(name.len())) as u64);
        wire::fixed64(self.buf, 1, unix_nanos(at));
        wire::bytes(self.buf, 2, name.as_bytes());
        self
    }

    /// Status ERROR with its description (`Status { message, code }`).
    pub fn error(&mut self, description: &str) -> &mut Self {
        wire::key(self.buf, field::STATUS, wire::LEN);
        wire::varint(self.buf, (wire::field_len(description.len()) + 2) as u64);
        wire::bytes(self.buf, 2, description.as_bytes());
        wire::key(self.buf, 3, wire::VARINT);
        wire::varint(self.buf, STATUS_CODE_ERROR);
        self
    }
}

impl Drop for SpanWriter<'_> {
    fn drop(&mut self) {
        wire::close(self.buf, self.start);
    }
}

/// Spans waiting for export: encoded one after the other, cut every `BATCH` spans.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// [`Spans::text`] between requests.
    text: String,
    count: usize,
    /// `(end offset, spans)` of each full batch in `buf`.
    cuts: Vec<(usize, usize)>,
    /// Spans since the last cut.
    since_cut: usize,
}

/// What the request path and the export thread share.
struct Queue {
    pending: parking_lot::Mutex<Pending>,
    /// Spans waiting at most (`max_queue`).
    max: usize,
    /// The export thread was woken for a full batch and has not taken it yet.
    woken: AtomicBool,
    /// The last sender is gone: flush and end.
    closed: AtomicBool,
}

impl Queue {
    /// Appends a request's `n` spans unless that would make more than `max` wait (`None`);
    /// `Some(true)` when a full batch waits.
    fn write(&self, n: usize, write: impl FnOnce(&mut Spans<'_>)) -> Option<bool> {
        let mut p = self.lock();
        if p.count + n > self.max {
            return None;
        }
        let p = &mut *p;
        let mut spans = Spans::with_text(&mut p.buf, std::mem::take(&mut p.text));
        write(&mut spans);
        let written = spans.count;
        p.text = spans.text;
        p.count += written;
        p.since_cut += written;
        if p.since_cut >= BATCH {
            p.cuts.push((p.buf.len(), p.since_cut));
            p.since_cut = 0;
        }
        Some(!p.cuts.is_empty())
    }

    /// Takes what waits, leaving `spare` (emptied) in its place: the spans in `buf`, and
    /// where each batch of them ends, with its count.
    fn take(&self, spare: &mut Vec<u8>) -> Vec<(usize, usize)> {
        spare.clear();
        let mut p = self.lock();
        let p = &mut *p;
        std::mem::swap(spare, &mut p.buf);
        let mut cuts = std::mem::take(&mut p.cuts);
        if p.since_cut > 0 {
            cuts.push((spare.len(), p.since_cut));
        }
        p.count = 0;
        p.since_cut = 0;
        cuts
    }

    /// Not poisoned by a panicking writer: a span it opened is closed by `SpanWriter`'s drop,
    /// so the buffer stays a valid run of spans (those not counted are exported uncounted).
    fn lock(&self) -> parking_lot::MutexGuard<'_, Pending> {
        self.pending.lock()
    }
}

/// A running exporter: the queue into its thread, and the sampling decision.
pub struct Telemetry {
    config: TelemetryConfig,
    queue: Arc<Queue>,
    thread: std::thread::Thread,
    spans: IntCounterVec,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// The parts of every export request that do not change: the `Resource` and the
/// `InstrumentationScope`, encoded once as their fields.
struct Envelope {
    url: String,
    client: reqwest::Client,
    /// `ResourceSpans.resource`.
    resource: Vec<u8>,
    /// `ScopeSpans.scope`.
    scope: Vec<u8>,
}

fn string_kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `name=value` pairs separated by commas, values
/// percent-encoded (OpenTelemetry's exporter configuration).
fn env_headers(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .ok()?;
            Some((name.trim().to_string(), value.into_owned()))
        })
        .filter(|(name, _)| !name.is_empty())
        .collect()
}

impl Envelope {
    fn new(config: &TelemetryConfig) -> anyhow::Result<Envelope> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/x-protobuf"),
        );
        // The OTLP exporter's standard variables, then `headers`, which win.
        for var in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Ok(list) = std::env::var(var) {
                for (name, value) in env_headers(&list) {
                    match (
                        reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                        reqwest::header::HeaderValue::from_str(&value),
                    ) {
                        (Ok(name), Ok(mut value)) => {
                            value.set_sensitive(true);
                            headers.insert(name, value);
                        }
                        _ => log::warn!("telemetry: {var}: a header is not valid, ignored"),
                    }
                }
            }
        }
        for (name, value) in &config.headers {
            let value = expand_env(value)
                .map_err(|e| anyhow::anyhow!("telemetry.headers.{name:?}: {e}"))?;
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| anyhow::anyhow!("telemetry.headers.{name:?}: {e}"))?;
            let mut value = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|e| anyhow::anyhow!("telemetry.headers.{name:?}: {e}"))?;
            // Credentials: kept out of any debug output of the client.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.export_timeout.get())
            .build()
            .map_err(|e| anyhow::anyhow!("telemetry: the OTLP client: {e}"))?;
        let instance = format!(
            "{}/{}",
            hostname().unwrap_or_else(|| "unknown".into()),
            std::process::id()
        );
        let resource = Resource {
            attributes: vec![
                string_kv("service.name", config.service_name.clone()),
                string_kv("service.instance.id", instance),
                string_kv("service.version", env!("CARGO_PKG_VERSION").into()),
                string_kv("telemetry.sdk.name", "sallyport".into()),
                string_kv("telemetry.sdk.language", "rust".into()),
                string_kv("telemetry.sdk.version", env!("CARGO_PKG_VERSION").into()),
            ],
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: "sallyport".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let mut r = Vec::new();
        wire::bytes(&mut r, 1, &resource.encode_to_vec());
        let mut s = Vec::new();
        wire::bytes(&mut s, 1, &scope.encode_to_vec());
        Ok(Envelope {
            url: config.otlp_endpoint.clone(),
            client,
            resource: r,
            scope: s,
        })
    }

    /// `ExportTraceServiceRequest { resource_spans: [ResourceSpans { resource, scope_spans:
    /// [ScopeSpans { scope, spans }] }] }` around the encoded spans.
    fn request(&self, spans: &[u8]) -> Vec<u8> {
        let scope_spans = self.scope.len() + spans.len();
        let resource_spans = self.resource.len() + wire::field_len(scope_spans);
        let mut out = Vec::with_capacity(wire::field_len(resource_spans));
        wire::key(&mut out, 1, wire::LEN);
        wire::varint(&mut out, resource_spans as u64);
        out.extend_from_slice(&self.resource);
        wire::key(&mut out, 2, wire::LEN);
        wire::varint(&mut out, scope_spans as u64);
        out.extend_from_slice(&self.scope);
        out.extend_from_slice(spans);
        out
    }

    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let response = self
            .client
            .post(&self.url)
            .body(body)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        let status = response.status();
        // Read to the end so the connection is kept for the next export.
        let _ = response.bytes().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }
}

impl Telemetry {
    /// Builds the exporter and starts its thread.
    pub fn start(config: &TelemetryConfig, spans: IntCounterVec) -> anyhow::Result<Telemetry> {
        let envelope = Envelope::new(config)?;
        let max = config.max_queue.max(1);
        let queue = Arc::new(Queue {
            pending: parking_lot::Mutex::new(Pending::default()),
            max,
            woken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let counter = spans.clone();
        let shared = Arc::clone(&queue);
        let thread = std::thread::Builder::new()
            .name("sallyport-otlp".into())
            .spawn(move || export_loop(envelope, &shared, counter))?
            .thread()
            .clone();
        Ok(Telemetry {
            config: config.clone(),
            queue,
            thread,
            spans,
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

    /// Writes a request's `n` spans (`write`) for export; never waits for the exporter.
    /// With `max_queue` spans already waiting, they are dropped and counted instead.
    ///
    /// The spans are encoded straight into the shared buffer the export thread takes, under
    /// a lock held for the encoding only (about a microsecond): no buffer is allocated per
    /// request, and the writes go to memory the previous request just warmed. (A buffer per
    /// request handed through a queue cost 1.5 µs a request more, in cache misses and frees
    /// on the other thread.)
    pub fn write(&self, n: usize, write: impl FnOnce(&mut Spans<'_>)) {
        match self.queue.write(n, write) {
            None => self.spans.with_label_values(&["dropped"]).inc_by(n as u64),
            // One wake-up per full batch, not per span.
            Some(true) if !self.queue.woken.swap(true, Ordering::AcqRel) => self.thread.unpark(),
            Some(_) => {}
        }
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The export thread: every `BATCH_DELAY` (sooner when a full batch waits) it exports what
/// the queue holds, up to `BATCH` spans a request, until the last sender is gone and the
/// queue is empty.
fn export_loop(envelope: Envelope, queue: &Queue, spans: IntCounterVec) {
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
    let mut failing = false;
    // Two buffers: the request path writes one while the other is exported.
    let mut taken = Vec::new();
    loop {
        let closed = queue.closed.load(Ordering::Acquire);
        queue.woken.store(false, Ordering::Release);
        let cuts = queue.take(&mut taken);
        let mut from = 0;
        for (to, n) in cuts {
            let body = envelope.request(&taken[from..to]);
            from = to;
            match runtime.block_on(envelope.post(body)) {
                Ok(()) => {
                    spans.with_label_values(&["exported"]).inc_by(n as u64);
                    if failing {
                        log::info!("telemetry: the collector takes spans again");
                        failing = false;
                    }
                }
                Err(e) => {
                    spans.with_label_values(&["failed"]).inc_by(n as u64);
                    if !failing {
                        log::warn!("telemetry: export failed ({n} spans lost): {e}");
                        failing = true;
                    }
                }
            }
        }
        if closed {
            return;
        }
        std::thread::park_timeout(BATCH_DELAY);
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

/// What the request path records for a request's spans while it runs; written as spans (or
/// dropped, when not sampled) at the end.
pub struct SpanRecorder {
    pub telemetry: Arc<Telemetry>,
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

/// Appends an address as `Display` writes it; IPv4 without the formatter, whose padding
/// support made it half of a request's span encoding.
pub fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u16(out, u16::from(octet));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

fn push_u16(out: &mut String, n: u16) {
    let mut digits = [0u8; 5];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// The trace a request's spans belong to: `(trace id, the client's parent span id, sampled by
/// the client?)`.
pub type TraceOf = ([u8; 16], Option<[u8; 8]>, Option<bool>);

impl SpanRecorder {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
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

    /// The request's spans, but for the SERVER span's attributes, which `server` writes:
    /// a CLIENT span per attempt (`method` to `path` on the endpoint) and per plugin call, then
    /// the SERVER span named `name`, with `error` (a 5xx) as its status.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        out: &mut Spans<'_>,
        trace: TraceOf,
        end: SystemTime,
        name: &[&str],
        method: &str,
        path: &str,
        error: Option<&str>,
        calls: &[sallyport_plugins::CallSpan],
        server: impl FnOnce(&mut SpanWriter<'_>, &mut String),
    ) {
        let (trace_id, parent, _) = trace;
        let mut url = std::mem::take(&mut out.text);
        for (i, a) in self.attempts.iter().enumerate() {
            let span_end = self.attempts.get(i + 1).map_or(end, |next| next.start);
            let mut w = out.span(SpanStart {
                kind: SpanKind::Client,
                trace_id,
                span_id: a.span_id,
                parent_id: Some(self.span_id),
                parent_is_remote: false,
                name: &[method],
                start: a.start,
                end: span_end,
            });
            // `http://{ip}:{port}{path}` (`[{ip}]` for IPv6); `server.address` is the ip in it.
            url.clear();
            url.push_str("http://");
            let bracket = a.endpoint.is_ipv6();
            if bracket {
                url.push('[');
            }
            let ip_start = url.len();
            push_ip(&mut url, a.endpoint.ip());
            let ip_end = url.len();
            if bracket {
                url.push(']');
            }
            url.push(':');
            push_u16(&mut url, a.endpoint.port());
            url.push_str(path);
            w.str("http.request.method", method)
                .str(
                    "server.address",
                    url.get(ip_start..ip_end).unwrap_or_default(),
                )
                .int("server.port", i64::from(a.endpoint.port()))
                .str("url.full", &url);
            if i > 0 {
                w.int("http.request.resend_count", i as i64);
            }
            if let Some(s) = a.status {
                w.int("http.response.status_code", i64::from(s));
            }
            match (a.error, a.status) {
                (Some(e), _) => {
                    w.str("error.type", e);
                }
                (None, Some(s)) if s >= 500 => {
                    w.str("error.type", &s.to_string());
                }
                _ => {}
            }
            if let Some(t) = a.connected {
                w.event("connected", t);
            }
            if let Some(t) = a.response {
                w.event("response_head", t);
            }
            match (a.error, a.status) {
                (Some(e), _) => {
                    w.error(e);
                }
                (None, Some(s)) if s >= 500 => {
                    w.error("upstream answered 5xx");
                }
                _ => {}
            }
        }
        // A plugin's calls (aggregate): one CLIENT span each, with the id its traceparent sent.
        for call in calls {
            let mut w = out.span(SpanStart {
                kind: SpanKind::Client,
                trace_id,
                span_id: call.span_id,
                parent_id: Some(self.span_id),
                parent_is_remote: false,
                name: &["call ", &call.name],
                start: call.start,
                end: call.start + call.duration,
            });
            w.str("sallyport.call", &call.name)
                .str("sallyport.upstream", &call.upstream);
            if call.outcome != "ok" {
                w.str("error.type", call.outcome).error(call.outcome);
            }
        }
        {
            let mut w = out.span(SpanStart {
                kind: SpanKind::Server,
                trace_id,
                span_id: self.span_id,
                parent_id: parent,
                parent_is_remote: parent.is_some(),
                name,
                start: self.start,
                end,
            });
            server(&mut w, &mut url);
            if let Some(e) = error {
                w.str("error.type", e).error(e);
            }
        }
        out.text = url;
    }

    /// How many spans [`SpanRecorder::finish`] writes with these calls.
    pub fn count(&self, calls: &[sallyport_plugins::CallSpan]) -> usize {
        1 + self.attempts.len() + calls.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{span, status, Span};

    fn config(max_queue: usize) -> TelemetryConfig {
        toml::from_str(&format!(
            "otlp_endpoint = \"http://127.0.0.1:9/v1/traces\"\nmax_queue = {max_queue}\nservice_name = \"unit\""
        ))
        .unwrap()
    }

    fn value(span: &Span, key: &str) -> Option<any_value::Value> {
        span.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone()?.value)
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            wire::varint(&mut buf, v);
            assert_eq!(buf.len(), wire::varint_len(v), "{v}");
            assert_eq!(
                prost::encoding::decode_varint(&mut buf.as_slice()).unwrap(),
                v
            );
        }
    }

    /// Every field the request path writes, decoded with the generated OTLP types; strings
    /// long enough for two- and three-byte length prefixes, at every level of nesting.
    #[test]
    fn spans_decode_as_otlp_spans() {
        let t0 = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let long = "x".repeat(200);
        let huge = "y".repeat(20_000);
        let mut buf = Vec::new();
        let mut spans = Spans::new(&mut buf);
        {
            let mut w = spans.span(SpanStart {
                kind: SpanKind::Server,
                trace_id: [7; 16],
                span_id: [1; 8],
                parent_id: Some([9; 8]),
                parent_is_remote: true,
                name: &["GET", " ", "orders"],
                start: t0,
                end: t0 + Duration::from_millis(3),
            });
            w.str("http.request.method", "GET")
                .int("http.response.status_code", 503)
                .int("negative", -5)
                .str("url.path", &long)
                .str("user_agent.original", &huge)
                .event("connected", t0 + Duration::from_micros(5))
                .str("error.type", "unavailable")
                .error("unavailable");
        }
        {
            let mut w = spans.span(SpanStart {
                kind: SpanKind::Client,
                trace_id: [7; 16],
                span_id: [2; 8],
                parent_id: Some([1; 8]),
                parent_is_remote: false,
                name: &["GET"],
                start: t0 + Duration::from_millis(1),
                // An end before the start is written as the start.
                end: t0,
            });
            w.str("server.address", "10.0.0.1");
        }
        assert_eq!(spans.len(), 2);
        let mut none = Vec::new();
        drop(Spans::new(&mut none).span(SpanStart {
            kind: SpanKind::Server,
            trace_id: [3; 16],
            span_id: [4; 8],
            parent_id: None,
            parent_is_remote: false,
            name: &[],
            start: t0,
            end: t0,
        }));

        let envelope = Envelope::new(&config(8)).unwrap();
        let mut all = buf.clone();
        all.extend_from_slice(&none);
        let req = ExportTraceServiceRequest::decode(envelope.request(&all).as_slice()).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let resource = rs.resource.as_ref().unwrap();
        let service = resource
            .attributes
            .iter()
            .find(|a| a.key == "service.name")
            .unwrap();
        assert_eq!(
            service.value.clone().unwrap().value,
            Some(any_value::Value::StringValue("unit".into()))
        );
        assert!(resource
            .attributes
            .iter()
            .any(|a| a.key == "service.instance.id"));
        let scope = &rs.scope_spans[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "sallyport");
        let [server, client, root] = &scope.spans[..] else {
            panic!("three spans: {:?}", scope.spans.len());
        };

        assert_eq!(server.trace_id, vec![7; 16]);
        assert_eq!(server.span_id, vec![1; 8]);
        assert_eq!(server.parent_span_id, vec![9; 8]);
        assert_eq!(server.name, "GET orders");
        assert_eq!(server.kind, span::SpanKind::Server as i32);
        assert_eq!(server.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(server.end_time_unix_nano, 1_700_000_000_126_456_789);
        assert_eq!(server.flags, 0x301, "sampled, parent known to be remote");
        assert_eq!(
            value(server, "http.request.method"),
            Some(any_value::Value::StringValue("GET".into()))
        );
        assert_eq!(
            value(server, "http.response.status_code"),
            Some(any_value::Value::IntValue(503))
        );
        assert_eq!(
            value(server, "negative"),
            Some(any_value::Value::IntValue(-5))
        );
        assert_eq!(
            value(server, "url.path"),
            Some(any_value::Value::StringValue(long))
        );
        assert_eq!(
            value(server, "user_agent.original"),
            Some(any_value::Value::StringValue(huge))
        );
        assert_eq!(server.events.len(), 1);
        assert_eq!(server.events[0].name, "connected");
        assert_eq!(server.events[0].time_unix_nano, 1_700_000_000_123_461_789);
        let st = server.status.as_ref().unwrap();
        assert_eq!(st.code, status::StatusCode::Error as i32);
        assert_eq!(st.message, "unavailable");

        assert_eq!(client.kind, span::SpanKind::Client as i32);
        assert_eq!(client.parent_span_id, vec![1; 8]);
        assert_eq!(client.flags, 0x101, "sampled, parent known to be local");
        assert_eq!(client.end_time_unix_nano, client.start_time_unix_nano);
        assert!(client.status.is_none());

        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.name, "");
    }

    #[test]
    fn otlp_header_variables_are_parsed_as_the_spec_writes_them() {
        assert_eq!(
            env_headers("api-key=abc%20def, x-tenant = t1,bad,=x"),
            vec![
                ("api-key".to_string(), "abc def".to_string()),
                ("x-tenant".to_string(), "t1".to_string()),
            ]
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.20.255.7",
            "192.168.1.100",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
        for n in [0u16, 9, 10, 80, 443, 8080, 65535] {
            let mut out = String::new();
            push_u16(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }

    fn one_span(out: &mut Spans<'_>) {
        drop(out.span(SpanStart {
            kind: SpanKind::Server,
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: None,
            parent_is_remote: false,
            name: &["GET"],
            start: SystemTime::now(),
            end: SystemTime::now(),
        }))
    }

    /// `max_queue` bounds the spans waiting; beyond, they are dropped. What waits is taken
    /// in batches of `BATCH` spans, each a valid run of `Span` fields.
    #[test]
    fn the_queue_is_bounded_and_cut_into_batches() {
        let q = Queue {
            pending: parking_lot::Mutex::new(Pending::default()),
            max: BATCH + 10,
            woken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        };
        let mut full_batch_at = None;
        let mut dropped = 0;
        for i in 0..BATCH + 15 {
            match q.write(1, one_span) {
                None => dropped += 1,
                Some(true) if full_batch_at.is_none() => full_batch_at = Some(i + 1),
                Some(_) => {}
            }
        }
        assert_eq!(dropped, 5);
        assert_eq!(full_batch_at, Some(BATCH));
        let mut taken = Vec::new();
        let cuts = q.take(&mut taken);
        assert_eq!(
            cuts.iter().map(|c| c.1).collect::<Vec<_>>(),
            vec![BATCH, 10]
        );
        let envelope = Envelope::new(&config(8)).unwrap();
        let mut from = 0;
        for (to, n) in cuts {
            let req =
                ExportTraceServiceRequest::decode(envelope.request(&taken[from..to]).as_slice())
                    .unwrap();
            assert_eq!(req.resource_spans[0].scope_spans[0].spans.len(), n);
            from = to;
        }
        // Emptied: the next write starts a new batch.
        assert_eq!(q.write(1, one_span), Some(false));
        let cuts = q.take(&mut taken);
        assert_eq!(cuts, vec![(taken.len(), 1)]);
        // A request whose spans would not all fit is dropped whole.
        let q = Queue {
            pending: parking_lot::Mutex::new(Pending::default()),
            max: 2,
            woken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        };
        assert_eq!(q.write(3, |out| (0..3).for_each(|_| one_span(out))), None);
        assert_eq!(
            q.write(2, |out| (0..2).for_each(|_| one_span(out))),
            Some(false)
        );
        let cuts = q.take(&mut taken);
        assert_eq!(cuts, vec![(taken.len(), 2)]);
    }
}
