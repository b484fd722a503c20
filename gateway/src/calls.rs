//! Outbound calls from plugins (aggregation) to the snapshot's pools, through Pingora's pooled
//! connector: same endpoint selection, health, timeouts and retry rule as proxied requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use sallyport_plugins::{CallError, RequestCtx, UpstreamRequest, UpstreamResponse, Upstreams};

use crate::upstream::Pool;

/// The pools of one snapshot, callable by plugins.
pub struct PoolCalls {
    pools: BTreeMap<String, Arc<Pool>>,
    connector: Arc<Connector>,
}

impl PoolCalls {
    pub fn new(pools: BTreeMap<String, Arc<Pool>>, connector: Arc<Connector>) -> Self {
        PoolCalls { pools, connector }
    }

    /// One attempt on one endpoint. `Err((error, connected))`: whether the failure came after
    /// a connection was established (then the request may have reached the upstream).
    async fn attempt(
        &self,
        pool: &Pool,
        addr_label: &str,
        peer: &pingora::upstreams::peer::HttpPeer,
        req: &UpstreamRequest,
    ) -> Result<UpstreamResponse, (CallError, bool)> {
        let (mut session, _reused) = self
            .connector
            .get_http_session(peer)
            .await
            .map_err(|e| (call_error(&e), false))?;
        let upstream_err = |e: Box<pingora::Error>| (call_error(&e), true);

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
        if !req.body.is_empty()
            || req.method == http::Method::POST
            || req.method == http::Method::PUT
        {
            header
                .insert_header(http::header::CONTENT_LENGTH, req.body.len())
                .map_err(upstream_err)?;
        }
        session.set_write_timeout(Some(pool.config.write_timeout.get()));
        session.set_read_timeout(Some(pool.config.read_timeout.get()));
        session
            .write_request_header(Box::new(header))
            .await
            .map_err(upstream_err)?;
        if !req.body.is_empty() {
            session
                .write_request_body(req.body.clone(), true)
                .await
                .map_err(upstream_err)?;
        }
        session.finish_request_body().await.map_err(upstream_err)?;
        session.read_response_header().await.map_err(upstream_err)?;
        let (status, headers) = match session.response_header() {
            Some(h) => (h.status.as_u16(), h.headers.clone()),
            None => return Err((CallError::Upstream("no response header".into()), true)),
        };
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_response_body().await.map_err(upstream_err)? {
            if body.len() + chunk.len() > req.max_body {
                // The connection still carries unread body: drop it rather than pool it.
                return Err((CallError::BodyTooLarge(req.max_body), true));
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

    async fn send_to_pool(
        &self,
        pool: &Pool,
        req: UpstreamRequest,
    ) -> Result<UpstreamResponse, CallError> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let Some(backend) = pool.select(req.balance_key.as_deref(), &tried) else {
                return Err(if tried.is_empty() {
                    CallError::Unavailable(pool.name.to_string())
                } else {
                    CallError::Upstream(format!("every endpoint of upstream {} failed", pool.name))
                });
            };
            let Some(addr) = backend.as_inet().copied() else {
                return Err(CallError::Upstream(
                    "endpoint is not an inet address".into(),
                ));
            };
            tried.push(addr);
            let peer = pool.peer(&backend);
            let host = pool
                .host_header(&addr)
                .map_or_else(|| addr.to_string(), str::to_string);
            match self.attempt(pool, &host, &peer, &req).await {
                Ok(resp) => return Ok(resp),
                Err((err, connected)) => {
                    // Nothing reached the upstream when connecting failed: any method may
                    // go to another endpoint, as proxied requests do.
                    let may_retry = !connected && tried.len() <= pool.config.retries;
                    if !may_retry {
                        return Err(err);
                    }
                }
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
        let deadline = req.timeout;
        match tokio::time::timeout(deadline, self.send_to_pool(pool, req)).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout),
        }
    }
}
