//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz` (the process is alive),
//! `GET /readyz` (a config is loaded and every pool finished its first health-check pass),
//! `POST /cache/purge` (removes stored responses of every `cache` plugin that allows it),
//! `GET /config` (the running config's hash, load time, files, and its effective form with
//! secrets redacted).

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use sallyport_plugins::CachePurge;

use crate::snapshot::Snapshot;
use crate::Shared;

pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Admin { shared }
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let len = body.len();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    if let Ok(v) = content_type.parse() {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::CONTENT_LENGTH, len.into());
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// The largest purge request body read.
const MAX_PURGE_BODY: usize = 64 * 1024;

fn admin_error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    let body = serde_json::json!({
        "error": { "status": status.as_u16(), "code": code, "message": message }
    });
    reply(status, "application/json", body.to_string().into_bytes())
}

/// `{"url": "/api/items/1"}` or `{"prefix": "/api/items/"}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    url: Option<String>,
    prefix: Option<String>,
}

impl PurgeBody {
    fn target(self) -> Result<CachePurge, &'static str> {
        match (self.url, self.prefix) {
            (Some(url), None) if url.starts_with('/') => Ok(CachePurge::Url(url)),
            (None, Some(prefix)) if prefix.starts_with('/') => Ok(CachePurge::Prefix(prefix)),
            (Some(_), None) | (None, Some(_)) => Err("the url or prefix must start with /"),
            _ => Err("give exactly one of url and prefix"),
        }
    }
}

impl Admin {
    /// `POST /cache/purge`: answers `{"purged": N}`, the entries removed by every cache plugin.
    async fn purge(&self, session: &mut ServerSession, snapshot: &Snapshot) -> Response<Vec<u8>> {
        if session.req_header().method != http::Method::POST {
            let mut resp = admin_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST",
            );
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            return resp;
        }
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_PURGE_BODY => {
                    body.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => {
                    return admin_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "the purge request is too large",
                    )
                }
                Ok(None) => break,
                Err(_) => {
                    return admin_error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "could not read the request body",
                    )
                }
            }
        }
        let target = match serde_json::from_slice::<PurgeBody>(&body) {
            Ok(b) => b.target(),
            Err(_) => Err(r#"expected {"url": "/path"} or {"prefix": "/path/"}"#),
        };
        let target = match target {
            Ok(t) => t,
            Err(m) => return admin_error(StatusCode::BAD_REQUEST, "bad_request", m),
        };
        let purged: usize = snapshot
            .plugins
            .values()
            .map(|p| p.plugin.cache_purge(&target))
            .sum();
        let body = serde_json::json!({ "purged": purged });
        reply(
            StatusCode::OK,
            "application/json",
            body.to_string().into_bytes(),
        )
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let snapshot = self.shared.snapshot.load_full();
        match path.as_str() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.shared
                    .metrics
                    .render(&snapshot, self.shared.access_log.dropped()),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let pending: Vec<&str> = snapshot
                    .pools
                    .iter()
                    .filter(|(_, p)| !p.is_ready())
                    .map(|(n, _)| n.as_str())
                    .collect();
                let starting = !snapshot.started.load(std::sync::atomic::Ordering::Acquire);
                if pending.is_empty() && !starting {
                    reply(StatusCode::OK, "application/json", br#"{"ready":true}"#.to_vec())
                } else {
                    let body = serde_json::json!({
                        "ready": false,
                        "waiting_for_health_checks": pending,
                        "starting_plugins": starting,
                    });
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        body.to_string().into_bytes(),
                    )
                }
            }
            "/cache/purge" => self.purge(session, &snapshot).await,
            "/config" => {
                let source = self.shared.source.load_full();
                let loaded_at = humantime::format_rfc3339_seconds(source.loaded_at).to_string();
                let body = serde_json::json!({
                    "hash": source.hash,
                    "loaded_at": loaded_at,
                    "files": source.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                    "config": source.effective,
                });
                reply(StatusCode::OK, "application/json", body.to_string().into_bytes())
            }
            "/.well-known/jwks.json" => reply(
                StatusCode::OK,
                "application/jwk-set+json",
                self.shared.services.public_keys.jwks().to_string().into_bytes(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                br#"{"error":{"status":404,"code":"not_found","message":"admin endpoints: /metrics, /healthz, /readyz, /config, /.well-known/jwks.json, POST /cache/purge"}}"#.to_vec(),
            ),
        }
    }
}
