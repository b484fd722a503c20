//! Outbound calls from plugins (aggregation) to the snapshot's pools, through Pingora's pooled
//! connector: same endpoint selection, health (active and passive), timeouts, retry policy,
//! retry budget and `max_in_flight` as proxied requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use sallyport_plugins::{CallError, RequestCtx, UpstreamRequest, UpstreamResponse, Upstreams};

use crate::resilience::{Failure, TryState, X_SALLYPORT_ATTEMPT};
use crate::upstream::Pool;

/// How a try failed.
struct TryError {
    error: CallError,
    /// The connection was made (the request may have reached the endpoint).
    connected: bool,
    /// It failed on a reused pooled connection before any answer: the endpoint had closed
    /// it, so the request never reached it.
    stale: bool,
}

/// The pools of one snapshot, callable by plugins.
pub struct PoolCalls {
    pools: BTreeMap<String, Arc<Pool>>,
    connector: Arc<Connector>,
}

impl PoolCalls {
    pub fn new(pools: BTreeMap<String, Arc<Pool>>, connector: Arc<Connector>) -> Self {
        PoolCalls { pools, connector }
    }

    /// One try on one endpoint.
    async fn attempt(
        &self,
        pool: &Pool,
        addr_label: &str,
        peer: &pingora::upstreams::peer::HttpPeer,
        req: &UpstreamRequest,
        timeout: std::time::Duration,
        number: usize,
    ) -> Result<UpstreamResponse, TryError> {
        let (mut session, reused) =
            self.connector
                .get_http_session(peer)
                .await
                .map_err(|e| TryError {
                    error: call_error(&e),
                    connected: false,
                    stale: false,
                })?;
        let mut answered = false;
        let upstream_err = |e: Box<pingora::Error>| TryError {
            error: call_error(&e),
            connected: true,
            stale: false,
        };

        let mut header = RequestHeader::build(
            req.method.clone(),
            req.path_and_query.as_bytes(),
            Some(req.headers.len() + 2),
        )
        .map_err(upstream_err)?;
        header
            .insert_header(http::header::HOST, addr_label)
            .map_err(upstream_err)?;
        for (name, value) in &req.headers {
            header
                .insert_header(name.clone(), value.clone())
                .map_err(upstream_err)?;
        }
        if number > 1 {
            header
                .insert_header(X_SALLYPORT_ATTEMPT, number.to_string())
                .map_err(upstream_err)?;
        }
        if !req.body.is_empty()
            || req.method == http::Method::POST
            || req.method == http::Method::PUT
        {
            header
                .insert_header(http::header::CONTENT_LENGTH, req.body.len())
                .map_err(upstream_err)?;
        }
        session.set_write_timeout(Some(pool.config.write_timeout.get().min(timeout)));
        session.set_read_timeout(Some(pool.config.read_timeout.get().min(timeout)));
        let exchange = async {
            session.write_request_header(Box::new(header)).await?;
            if !req.body.is_empty() {
                session.write_request_body(req.body.clone(), true).await?;
            }
            session.finish_request_body().await?;
            session.read_response_header().await?;
            answered = true;
            Ok::<_, Box<pingora::Error>>(())
        };
        // Pingora marks an error on a pooled connection the endpoint had closed as
        // `ReusedOnly` (the proxy's stale-connection case).
        exchange.await.map_err(|e| TryError {
            stale: reused && !answered && matches!(e.retry, pingora::RetryType::ReusedOnly),
            ..upstream_err(e)
        })?;
        let (status, headers) = match session.response_header() {
            Some(h) => (h.status.as_u16(), h.headers.clone()),
            None => {
                return Err(TryError {
                    error: CallError::Upstream("no response header".into()),
                    connected: true,
                    stale: false,
                })
            }
        };
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_response_body().await.map_err(upstream_err)? {
            if body.len() + chunk.len() > req.max_body {
                // The connection still carries unread body: drop it rather than pool it.
                return Err(TryError {
                    error: CallError::BodyTooLarge(req.max_body),
                    connected: true,
                    stale: false,
                });
            }
            body.extend_from_slice(&chunk);
        }
        self.connector
            .release_http_session(session, peer, Some(pool.config.idle_timeout.get()))
            .await;
        Ok(UpstreamResponse {
            status,
            headers,
            body: Bytes::from(body),
        })
    }

    /// Tries endpoints of the pool until one answers or the pool's retry policy (with its
    /// budget, and `deadline`) says to stop; a status `retry_on` names is tried again too.
    async fn send_to_pool(
        &self,
        pool: &Arc<Pool>,
        req: UpstreamRequest,
        deadline: Instant,
    ) -> Result<UpstreamResponse, CallError> {
        let Some(_slot) = pool.enter() else {
            return Err(CallError::Overloaded(pool.name.to_string()));
        };
        pool.first_try(Instant::now());
        let key = req.balance_key.as_deref();
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            // A retry goes back to a tried endpoint only when no other one is left.
            let Some(backend) = pool.select(key, &tried) else {
                return Err(CallError::Unavailable(pool.name.to_string()));
            };
            let addr = backend.addr();
            tried.push(addr);
            let current = pool.begin_try(&backend);
            let left = deadline.saturating_duration_since(Instant::now());
            let per_try =
                pool.retry
                    .try_timeout(pool.config.read_timeout.get(), None, Instant::now());
            let timeout = per_try.min(left);
            // A timeout of a try the deadline cut short is no sign of a sick endpoint.
            let cut_by_deadline = left < per_try;
            let mut peer = pool.peer(&backend);
            let cut = |d: Option<std::time::Duration>| d.map(|d| d.min(timeout));
            peer.options.connection_timeout = cut(peer.options.connection_timeout);
            peer.options.total_connection_timeout = cut(peer.options.total_connection_timeout);
            let host = current.authority().to_string();
            let outcome = match tokio::time::timeout(
                timeout,
                self.attempt(pool, &host, &peer, &req, timeout, tried.len()),
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(TryError {
                    error: CallError::Timeout,
                    connected: true,
                    stale: false,
                }),
            };
            let now = Instant::now();
            let (failure, stale) = match &outcome {
                Ok(resp) => {
                    pool.answered(&current, resp.status, now);
                    if !pool.retry.retries_status(resp.status) {
                        return outcome.map_err(|e| e.error);
                    }
                    (Failure::Status(resp.status), false)
                }
                Err(e) if matches!(e.error, CallError::BodyTooLarge(_)) => {
                    return outcome.map_err(|e| e.error);
                }
                Err(e) => {
                    let blameless =
                        e.stale || (matches!(e.error, CallError::Timeout) && cut_by_deadline);
                    if !blameless {
                        pool.failed(&current, now);
                    }
                    let kind = match (&e.error, e.connected) {
                        (_, false) => Failure::ConnectFailure,
                        (CallError::Timeout, true) => Failure::Timeout,
                        (_, true) => Failure::Reset,
                    };
                    (kind, e.stale)
                }
            };
            drop(current);
            let state = TryState {
                tries: tried.len(),
                idempotent_method: req.method.is_idempotent(),
                idempotency_key: req.headers.iter().any(|(n, _)| n == "idempotency-key"),
                replayable: true,
                deadline: Some(deadline),
                stale_connection: stale,
            };
            match pool.retry(failure, &state, now) {
                Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Ok(_) => {}
                Err(_) => return outcome.map_err(|e| e.error),
            }
        }
    }
}

/// A Pingora error as a call outcome: the pool's own timeouts count as timeouts.
fn call_error(e: &pingora::Error) -> CallError {
    match e.etype() {
        pingora::ErrorType::ConnectTimedout
        | pingora::ErrorType::ReadTimedout
        | pingora::ErrorType::WriteTimedout => CallError::Timeout,
        _ => CallError::Upstream(e.to_string()),
    }
}

#[async_trait]
impl Upstreams for PoolCalls {
    fn has(&self, upstream: &str) -> bool {
        self.pools.contains_key(upstream)
    }

    fn balance_key(
        &self,
        upstream: &str,
        req: &RequestHeader,
        ctx: &RequestCtx,
    ) -> Option<Vec<u8>> {
        let pool = self.pools.get(upstream)?;
        if pool.config.balance != crate::config::Balance::ConsistentHash {
            return None;
        }
        pool.hash_key.value(req, ctx).map(String::into_bytes)
    }

    async fn send(
        &self,
        upstream: &str,
        req: UpstreamRequest,
    ) -> Result<UpstreamResponse, CallError> {
        let pool = self
            .pools
            .get(upstream)
            .ok_or_else(|| CallError::UnknownUpstream(upstream.to_string()))?;
        let limit = req.timeout;
        let Some(deadline) = Instant::now().checked_add(limit) else {
            return Err(CallError::Timeout);
        };
        match tokio::time::timeout(limit, self.send_to_pool(pool, req, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout),
        }
    }
}
