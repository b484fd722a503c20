//! `trace`: W3C trace context and request ids.
//!
//! Phases: `request_filter` (reads `traceparent`/`tracestate`), `upstream_request_filter`
//! (sends `traceparent` with a new parent-id, `tracestate`, `x-request-id` upstream),
//! `response_filter` (echoes `x-request-id` and the gateway's `traceparent` to the client).
//! Per-request state: none; the trace context goes into [`crate::RequestCtx::trace`] so other
//! plugins (aggregate calls, access log) use the same trace id.
//!
//! A valid incoming `traceparent` keeps its trace-id and flags and gets a new parent-id for the
//! upstream hop; an absent or invalid one is replaced by a fresh trace. `tracestate` is passed
//! on only with a valid `traceparent`, as the W3C spec requires, and only when it is valid
//! itself (keys, values, at most 32 members, no duplicate key): an invalid one is dropped whole.
//!
//! ```toml
//! [plugins.trace]
//! type = "trace"
//! trust_incoming = true    # false: always start a new trace at the edge
//! sample_new = true        # sampled flag for traces the gateway starts
//! echo = true              # x-request-id and traceparent on responses
//! ```
//! Metrics: none of its own.

mod config;
mod parse;

use std::sync::Arc;

use async_trait::async_trait;
use http::header::HeaderName;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use rand::Rng;

pub use config::TraceConfig;
pub use parse::{parse_traceparent, valid_tracestate, ParsedTraceparent, MAX_TRACESTATE_MEMBERS};

use crate::{BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, RequestCtx, Result, TraceContext};

// Each name spelled once: the `&'static str` is what Pingora's `insert_header` takes without
// copying a `HeaderName` into its case map; the `HeaderName` is for lookups.
pub const TRACEPARENT_NAME: &str = "traceparent";
pub const TRACESTATE_NAME: &str = "tracestate";
pub const X_REQUEST_ID_NAME: &str = "x-request-id";
pub const TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT_NAME);
pub const TRACESTATE: HeaderName = HeaderName::from_static(TRACESTATE_NAME);
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static(X_REQUEST_ID_NAME);

/// Longest `tracestate` passed on (the spec asks for at least 512 characters).
const MAX_TRACESTATE: usize = 8192;

/// The built `trace` plugin.
#[derive(Debug)]
pub struct Trace {
    trust_incoming: bool,
    sample_new: bool,
    echo: bool,
}

impl Trace {
    pub fn build(config: &TraceConfig) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let plugin = Trace {
            trust_incoming: config.trust_incoming,
            sample_new: config.sample_new,
            echo: config.echo,
        };
        Ok(Erased::into_dyn(plugin))
    }

    /// The trace context for a request with these headers.
    pub fn context_for(&self, req: &RequestHeader) -> TraceContext {
        let mut rng = rand::rng();
        let span_id = nonzero_span_id(&mut rng);
        if self.trust_incoming {
            if let Some(parsed) = single_header(req, &TRACEPARENT).and_then(parse_traceparent) {
                return TraceContext {
                    trace_id: parsed.trace_id,
                    span_id,
                    client_parent_id: Some(parsed.parent_id),
                    flags: parsed.flags,
                    tracestate: tracestate(req),
                };
            }
        }
        let mut trace_id = [0u8; 16];
        while trace_id == [0u8; 16] {
            rng.fill(&mut trace_id);
        }
        TraceContext {
            trace_id,
            span_id,
            client_parent_id: None,
            flags: u8::from(self.sample_new),
            tracestate: None,
        }
    }
}

/// A random 8-byte span id that is not all zero (all-zero ids are invalid).
pub fn nonzero_span_id(rng: &mut impl Rng) -> [u8; 8] {
    loop {
        let id: [u8; 8] = rng.random();
        if id != [0u8; 8] {
            return id;
        }
    }
}

/// The header's value when it is present exactly once (a repeated `traceparent` is invalid).
fn single_header<'a>(req: &'a RequestHeader, name: &HeaderName) -> Option<&'a [u8]> {
    let mut values = req.headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    Some(first.as_bytes())
}

/// The request's `tracestate` lines as one list when valid (see [`parse::valid_tracestate`])
/// and within the size bound; an invalid one is dropped whole.
fn tracestate(req: &RequestHeader) -> Option<String> {
    parse::valid_tracestate(
        req.headers
            .get_all(&TRACESTATE)
            .iter()
            .map(|v| v.as_bytes()),
    )
    .filter(|s| s.len() <= MAX_TRACESTATE)
}

#[async_trait]
impl Plugin for Trace {
    type State = ();

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            upstream_request_filter: true,
            response_filter: self.echo,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        ctx.trace = Some(self.context_for(session.req_header()));
        Ok(Flow::Continue)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        if let Some(trace) = &ctx.trace {
            upstream_request.insert_header(TRACEPARENT_NAME, trace.traceparent())?;
            match &trace.tracestate {
                Some(state) => upstream_request.insert_header(TRACESTATE_NAME, state.as_str())?,
                None => {
                    upstream_request.remove_header(&TRACESTATE);
                }
            }
        }
        upstream_request.insert_header(X_REQUEST_ID_NAME, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        if !self.echo {
            return Ok(());
        }
        response.insert_header(X_REQUEST_ID_NAME, ctx.request_id.as_str())?;
        if let Some(trace) = &ctx.trace {
            response.insert_header(TRACEPARENT_NAME, trace.traceparent())?;
        }
        Ok(())
    }
}

impl crate::PluginType for TraceConfig {
    const KIND: &'static str = "trace";

    fn build(
        &self,
        _env: &crate::BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Trace::build(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> Trace {
        Trace {
            trust_incoming: true,
            sample_new: true,
            echo: true,
        }
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_traceparent_keeps_trace_id_and_gets_new_parent() {
        let t = plugin().context_for(&req(&[("traceparent", VALID), ("tracestate", "a=1")]));
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(t.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(t.flags, 1);
        assert_eq!(t.tracestate.as_deref(), Some("a=1"));
        assert!(t
            .traceparent()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(parse_traceparent(t.traceparent().as_bytes()).is_some());
    }

    #[test]
    fn invalid_or_repeated_traceparent_starts_new_trace_and_drops_tracestate() {
        for headers in [
            vec![("traceparent", "garbage"), ("tracestate", "a=1")],
            vec![("traceparent", VALID), ("traceparent", VALID)],
            vec![],
        ] {
            let t = plugin().context_for(&req(&headers));
            assert_ne!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(t.tracestate, None);
            assert_eq!(t.flags, 1);
            assert_eq!(t.client_parent_id, None);
        }
    }

    #[test]
    fn untrusted_incoming_always_restarts() {
        let p = Trace {
            trust_incoming: false,
            sample_new: false,
            echo: true,
        };
        let t = p.context_for(&req(&[("traceparent", VALID)]));
        assert_ne!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 0);
    }

    #[test]
    fn tracestate_lines_are_joined() {
        let t = plugin().context_for(&req(&[
            ("traceparent", VALID),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]));
        assert_eq!(t.tracestate.as_deref(), Some("a=1,b=2"));
    }
}
