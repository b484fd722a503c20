//! The per-request context shared by the gateway and every plugin of a chain.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// What every plugin of a request can read and enrich. The gateway creates it when a request
/// arrives and fills in what it knows (request id, client address, route) before the chain runs.
#[derive(Debug)]
pub struct RequestCtx {
    /// The request id: the client's `x-request-id` when sane, otherwise generated. Appears in
    /// error bodies and the access log; the `trace` plugin forwards and echoes it.
    pub request_id: String,
    /// Name of the matched route (`routes[].name`).
    pub route: Arc<str>,
    /// Name of the route's upstream pool, if it has one. A plugin's `request_filter` may set
    /// another `[upstreams.NAME]` (e.g. `traffic_split`): the request then goes to that pool,
    /// and the access log names it.
    pub upstream: Option<Arc<str>>,
    /// The client address: the peer address, or the first untrusted hop of
    /// `X-Forwarded-For` when the peer is one of `server.trusted_proxies`.
    pub client_ip: Option<IpAddr>,
    /// The normalised request path the route matched (before any prefix rewrite).
    pub path: String,
    /// Values of the `{name}` segments of the route's `path` template, in order.
    pub path_params: Vec<(Arc<str>, String)>,
    /// Identity verified by an authentication plugin, if any.
    pub principal: Option<Principal>,
    /// W3C trace context of this request, set by the `trace` plugin.
    pub trace: Option<TraceContext>,
    /// Headers set from verified credentials (e.g. `x-user-id` from a token's `sub`): the
    /// gateway sets them on the proxied request, and `aggregate` on every call. Their names
    /// are a plugin's `trusted_headers`, so a client can never send them itself.
    pub identity_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The cache's verdict for this request (`hit`, `miss`, `stale`, `revalidated`, `bypass`,
    /// `expired`), set by a cache plugin: counted in `sallyport_cache_lookups_total` and logged
    /// as the access-log field `cache`.
    pub cache_result: Option<&'static str>,
    /// Whether this is the gateway's own background request (a stale-while-revalidate
    /// refresh), not a client's: quotas do not count it.
    pub background: bool,
    /// Calls a plugin made on the request's behalf (`aggregate`), for their CLIENT spans
    /// when the gateway exports traces.
    pub call_spans: Vec<CallSpan>,
    /// Extra fields for this request's access-log line (e.g. aggregate call outcomes).
    pub log_fields: Vec<(&'static str, serde_json::Value)>,
    /// When the gateway received the request.
    pub received_at: Instant,
}

impl RequestCtx {
    /// The value of a `{name}` path segment of the matched route.
    pub fn path_param(&self, name: &str) -> Option<&str> {
        self.path_params
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn new(request_id: String, route: Arc<str>) -> Self {
        RequestCtx {
            request_id,
            route,
            upstream: None,
            client_ip: None,
            path: String::new(),
            path_params: Vec::new(),
            principal: None,
            trace: None,
            identity_headers: Vec::new(),
            cache_result: None,
            call_spans: Vec::new(),
            background: false,
            log_fields: Vec::new(),
            received_at: Instant::now(),
        }
    }
}

/// One call a plugin made for the request: the span id it sent in `traceparent`, when it ran,
/// and how it ended (`ok` or a failure code).
#[derive(Debug, Clone)]
pub struct CallSpan {
    pub name: Arc<str>,
    pub upstream: Arc<str>,
    pub span_id: [u8; 8],
    pub start: std::time::SystemTime,
    pub duration: std::time::Duration,
    pub outcome: &'static str,
}

/// A verified identity: who the caller is and the claims that proved it.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// The subject (`sub` claim, or the API key's consumer name).
    pub subject: Option<String>,
    /// Verified claims, as JSON (shared: a cached token's claims are not copied per request).
    pub claims: Arc<serde_json::Map<String, serde_json::Value>>,
    /// Which plugin type verified it, e.g. `"jwt"`.
    pub verified_by: &'static str,
}

impl Principal {
    /// A claim rendered as a header-friendly string: strings as they are, arrays of strings
    /// space-separated, numbers and booleans in JSON form; objects and null give `None`.
    pub fn claim_str(&self, name: &str) -> Option<String> {
        use serde_json::Value;
        match self.claims.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Array(items) => {
                let parts: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                parts.map(|p| p.join(" "))
            }
            Value::Object(_) | Value::Null => None,
        }
    }
}

/// The W3C trace context of a request (`traceparent` / `tracestate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16-byte trace id, never all zero.
    pub trace_id: [u8; 16],
    /// The span id the gateway sends upstream as the parent-id of the next hop.
    pub span_id: [u8; 8],
    /// The parent-id the client sent, when its `traceparent` was valid.
    pub client_parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
    /// The incoming `tracestate`, passed on unchanged when the trace was continued.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The version-00 `traceparent` value for the upstream hop.
    pub fn traceparent(&self) -> String {
        self.traceparent_with_span(&self.span_id)
    }

    /// The `traceparent` value for a hop with its own span id (e.g. one aggregate call).
    pub fn traceparent_with_span(&self, span_id: &[u8; 8]) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Digits are written into a stack buffer and appended once per 32 bytes: a `push` per
    // digit checks capacity and encodes a `char` each time (ids are written per request).
    let mut buf = [0u8; 64];
    for chunk in bytes.chunks(32) {
        for (i, b) in chunk.iter().enumerate() {
            buf[2 * i] = HEX[usize::from(b >> 4)];
            buf[2 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        out.push_str(std::str::from_utf8(&buf[..chunk.len() * 2]).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte_at_any_length() {
        for len in [0usize, 1, 8, 16, 31, 32, 33, 70] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 5) as u8).collect();
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex(&bytes), expected, "{len} bytes");
        }
    }
}
