//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz` (the process is alive),
//! `GET /readyz` (a config is loaded and every pool finished its first health-check pass).

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let snapshot = self.shared.snapshot.load_full();
        match path.as_str() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.shared.metrics.render(&snapshot),
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
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                br#"{"error":{"status":404,"code":"not_found","message":"admin endpoints: /metrics, /healthz, /readyz"}}"#.to_vec(),
            ),
        }
    }
}
