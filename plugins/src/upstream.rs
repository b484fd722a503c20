//! Calls from a plugin to the gateway's upstream pools (used by `aggregate`): the same load
//! balancing, health checks, timeouts and pooled connections as proxied requests.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// One request to an upstream pool.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: Method,
    /// Path and query, already encoded, starting with `/`.
    pub path_and_query: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Deadline for the whole call (connect, send, receive).
    pub timeout: Duration,
    /// Bodies larger than this fail with [`CallError::BodyTooLarge`].
    pub max_body: usize,
    /// The consistent-hash key of the client request that caused the call (see
    /// [`Upstreams::balance_key`]); `None` balances round robin.
    pub balance_key: Option<Vec<u8>>,
}

/// An upstream's complete answer.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a call produced no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the call did not finish within its deadline")]
    Timeout,
    #[error("no healthy endpoint in upstream {0}")]
    Unavailable(String),
    #[error("upstream {0} has its limits.max_in_flight requests under way")]
    Overloaded(String),
    #[error("no upstream named {0}")]
    UnknownUpstream(String),
    #[error("the upstream failed: {0}")]
    Upstream(String),
    #[error("the upstream's body exceeds {0} bytes")]
    BodyTooLarge(usize),
}

/// The gateway's pools, as a plugin sees them.
#[async_trait]
pub trait Upstreams: Send + Sync {
    /// Whether a pool of this name exists (checked when a plugin is built).
    fn has(&self, upstream: &str) -> bool;

    /// The pool's consistent-hash key (`hash_key`) evaluated on the client's request, so a
    /// call lands where a proxied request of the same client would; `None` when the pool
    /// does not hash or the request lacks the key.
    fn balance_key(
        &self,
        _upstream: &str,
        _req: &pingora::http::RequestHeader,
        _ctx: &crate::RequestCtx,
    ) -> Option<Vec<u8>> {
        None
    }

    /// Sends one request to a healthy endpoint of the pool, with the pool's retry policy,
    /// retry budget, outlier ejection and `max_in_flight`, all within `request.timeout`.
    async fn send(
        &self,
        upstream: &str,
        request: UpstreamRequest,
    ) -> Result<UpstreamResponse, CallError>;
}

/// An `Upstreams` with no pools, for tests and for validating plugin configs alone.
pub struct NoUpstreams;

#[async_trait]
impl Upstreams for NoUpstreams {
    fn has(&self, _upstream: &str) -> bool {
        false
    }

    async fn send(
        &self,
        upstream: &str,
        _request: UpstreamRequest,
    ) -> Result<UpstreamResponse, CallError> {
        Err(CallError::UnknownUpstream(upstream.to_string()))
    }
}
