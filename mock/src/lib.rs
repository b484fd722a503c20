//! A fast mock upstream for Sallyport's demo, integration tests (in-process) and benchmarks
//! (the `sallyport-mock` binary). Every server answers all of these:
//!
//! | request | answer |
//! |---|---|
//! | `GET /healthz` | `ok` (503 after `set_healthy(false)`); never delayed or failed |
//! | `GET /fast` | `{"ok":true}`, a static body (the benchmark endpoint) |
//! | `GET /users/{id}` | `{"id","name","email","service"}` |
//! | `GET /orders?user=U&limit=N` | `{"user","items":[N orders],"service"}`; `/orders/{id}`: one order |
//! | `GET /recs/{id}` | `{"user","items":[5 recs with id,title,score,extra],"service"}` |
//! | `/html`, `/garbage` | HTML, and a JSON content type over a broken body |
//! | `/big?bytes=N` | a body of N bytes (at most 16 MiB) |
//! | anything else | an echo: `{"service","method","uri","headers":{..},"body_bytes"}` |
//!
//! Request headers steer one request: `x-mock-delay: 250ms`, `x-mock-status: 503`,
//! `x-mock-close: 1` (close the connection after answering). [`MockConfig`] sets a latency,
//! status and failure rate for every request but `/healthz`. Every response carries
//! `x-mock-name`, `server: sallyport-mock`, `x-powered-by: mock` and `x-internal-debug: 1`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod grpc;
pub mod oidc;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;

/// How a mock server behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Echoed as `"service"` and in `x-mock-name`.
    pub name: String,
    /// Delay before every answer except `/healthz`.
    pub latency: Duration,
    /// Status of every answer except `/healthz`.
    pub status: u16,
    /// Share (0..=1) of requests answered with 500.
    pub fail_rate: f64,
    /// Keep every request for [`MockServer::requests`] (off in benchmarks).
    pub record: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            name: "mock".into(),
            latency: Duration::ZERO,
            status: 200,
            fail_rate: 0.0,
            record: true,
        }
    }
}

/// A request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as received.
    pub uri: String,
    /// Lowercase names, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The request body as received (empty when the client sent none or it failed).
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

struct State {
    cfg: MockConfig,
    name_header: HeaderValue,
    healthy: AtomicBool,
    health_checks: AtomicUsize,
    requests: Mutex<Vec<Recorded>>,
}

/// A running mock server; stops (listener and every connection) when dropped.
pub struct MockServer {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl MockServer {
    /// Starts on an ephemeral loopback port.
    pub async fn start(cfg: MockConfig) -> std::io::Result<MockServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), cfg).await
    }

    /// Starts on a given address (with `SO_REUSEADDR`, so a stopped server's port can be
    /// bound again at once).
    pub async fn start_on(addr: SocketAddr, cfg: MockConfig) -> std::io::Result<MockServer> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(1024)?;
        Self::from_listener(listener, cfg)
    }

    /// Serves on an already bound listener.
    pub fn from_listener(listener: TcpListener, cfg: MockConfig) -> std::io::Result<MockServer> {
        let addr = listener.local_addr()?;
        let name_header =
            HeaderValue::from_str(&cfg.name).unwrap_or_else(|_| HeaderValue::from_static("mock"));
        let state = Arc::new(State {
            cfg,
            name_header,
            healthy: AtomicBool::new(true),
            health_checks: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(MockServer {
            addr,
            state,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received except `/healthz`, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many `/healthz` requests arrived.
    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::Relaxed)
    }

    pub fn clear(&self) {
        if let Ok(mut r) = self.state.requests.lock() {
            r.clear();
        }
    }

    /// `false`: `/healthz` answers 503.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Stops accepting and closes every open connection.
    pub async fn stop(mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection.
        self.accept.abort();
        let _ = (&mut self.accept).await;
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Accepts connections until aborted; dropping this future closes every connection.
async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(Arc::clone(&state), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

type Resp = Response<Full<Bytes>>;

static FAST_BODY: &[u8] = br#"{"ok":true}"#;

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        state.health_checks.fetch_add(1, Ordering::Relaxed);
        let (status, body) = if state.healthy.load(Ordering::Relaxed) {
            (StatusCode::OK, &b"ok"[..])
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, &b"unhealthy"[..])
        };
        return Ok(finish(
            &state,
            status,
            "text/plain",
            Bytes::from_static(body),
            false,
        ));
    }

    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let delay = header("x-mock-delay").and_then(|d| humantime::parse_duration(d).ok());
    let forced = header("x-mock-status").and_then(|s| s.parse::<u16>().ok());
    let close = header("x-mock-close").is_some();
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let method = req.method().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body_bytes = body.len();
    if state.cfg.record {
        if let Ok(mut r) = state.requests.lock() {
            r.push(Recorded {
                method: method.clone(),
                uri: uri.clone(),
                headers: headers.clone(),
                body: body.to_vec(),
            });
        }
    }

    let total_delay = state.cfg.latency + delay.unwrap_or_default();
    if !total_delay.is_zero() {
        tokio::time::sleep(total_delay).await;
    }
    if let Some(code) = forced {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(finish(
            &state,
            status,
            "application/json",
            Bytes::from_static(br#"{"error":"forced"}"#),
            close,
        ));
    }
    if state.cfg.fail_rate > 0.0 && rand::random::<f64>() < state.cfg.fail_rate {
        return Ok(finish(
            &state,
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            Bytes::from_static(br#"{"error":"injected failure"}"#),
            close,
        ));
    }
    let status = StatusCode::from_u16(state.cfg.status).unwrap_or(StatusCode::OK);
    let name = state.cfg.name.as_str();
    let query = |key: &str| -> Option<String> {
        uri.split_once('?').and_then(|(_, q)| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == key).then(|| v.to_string())
            })
        })
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (content_type, body): (&str, Bytes) = match segments.as_slice() {
        ["fast"] => ("application/json", Bytes::from_static(FAST_BODY)),
        ["users", id] => (
            "application/json",
            json(&serde_json::json!({
                "id": id, "name": format!("User {id}"), "email": format!("{id}@example.test"), "service": name,
            })),
        ),
        ["orders"] => {
            let user = query("user").unwrap_or_default();
            let limit = query("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(5)
                .min(100);
            let items: Vec<serde_json::Value> =
                (1..=limit).map(|i| order(&format!("o-{i}"), i)).collect();
            (
                "application/json",
                json(&serde_json::json!({"user": user, "items": items, "service": name})),
            )
        }
        ["orders", id] => {
            let mut o = order(id, 1);
            o["service"] = name.into();
            ("application/json", json(&o))
        }
        ["recs", id] => {
            let items: Vec<serde_json::Value> = (1..=5)
                .map(|i| serde_json::json!({"id": format!("r-{i}"), "title": format!("Item {i}"), "score": 1.0 - i as f64 / 10.0, "extra": "details only the web needs"}))
                .collect();
            (
                "application/json",
                json(&serde_json::json!({"user": id, "items": items, "service": name})),
            )
        }
        ["html"] => ("text/html", Bytes::from_static(b"<html>not json</html>")),
        ["garbage"] => ("application/json", Bytes::from_static(b"{not json")),
        ["big"] => {
            let n = query("bytes")
                .and_then(|b| b.parse::<usize>().ok())
                .unwrap_or(1024)
                .min(16 << 20);
            ("application/json", Bytes::from(vec![b'x'; n]))
        }
        _ => {
            let mut map = serde_json::Map::new();
            for (k, v) in &headers {
                match map.get_mut(k) {
                    Some(serde_json::Value::String(prev)) => {
                        prev.push_str(", ");
                        prev.push_str(v);
                    }
                    _ => {
                        map.insert(k.clone(), serde_json::Value::String(v.clone()));
                    }
                }
            }
            (
                "application/json",
                json(&serde_json::json!({
                    "service": name, "method": method, "uri": uri, "headers": map, "body_bytes": body_bytes,
                })),
            )
        }
    };
    Ok(finish(&state, status, content_type, body, close))
}

fn order(id: &str, i: usize) -> serde_json::Value {
    serde_json::json!({"id": id, "total": 10.0 + i as f64 * 2.5, "status": if i.is_multiple_of(2) { "pending" } else { "shipped" }})
}

fn json(v: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn finish(
    state: &State,
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    close: bool,
) -> Resp {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(
        http::header::SERVER,
        HeaderValue::from_static("sallyport-mock"),
    );
    h.insert("x-powered-by", HeaderValue::from_static("mock"));
    h.insert("x-internal-debug", HeaderValue::from_static("1"));
    h.insert("x-mock-name", state.name_header.clone());
    if close {
        h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, target: &str, extra: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn endpoints_and_recording() {
        let m = MockServer::start(MockConfig {
            name: "users".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(get(m.addr(), "/users/7", "")
            .await
            .contains(r#""email":"7@example.test""#));
        let orders = get(m.addr(), "/orders?user=7&limit=2", "").await;
        assert!(
            orders.contains("o-2") && !orders.contains("o-3"),
            "{orders}"
        );
        assert!(get(m.addr(), "/recs/7", "").await.contains("r-5"));
        let echo = get(m.addr(), "/any/thing?q=1", "X-Test: yes\r\n").await;
        assert!(
            echo.contains(r#""uri":"/any/thing?q=1""#) && echo.contains(r#""x-test":"yes""#),
            "{echo}"
        );
        assert!(get(m.addr(), "/x", "x-mock-status: 418\r\n")
            .await
            .starts_with("HTTP/1.1 418"));
        let recorded = m.requests();
        assert_eq!(recorded.len(), 5);
        assert_eq!(recorded[3].header("X-TEST"), Some("yes"));
        assert!(get(m.addr(), "/healthz", "").await.ends_with("ok"));
        m.set_healthy(false);
        assert!(get(m.addr(), "/healthz", "")
            .await
            .starts_with("HTTP/1.1 503"));
        assert_eq!(m.health_checks(), 2);
        assert_eq!(m.requests().len(), 5);
    }

    #[tokio::test]
    async fn stop_closes_connections_and_port_can_be_reused() {
        let m = MockServer::start(MockConfig::default()).await.unwrap();
        let addr = m.addr();
        let mut keepalive = tokio::net::TcpStream::connect(addr).await.unwrap();
        keepalive
            .write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = keepalive.read(&mut buf).await.unwrap();
        assert!(n > 0);
        m.stop().await;
        let n = tokio::time::timeout(Duration::from_secs(2), keepalive.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "open connection closed");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        let again = MockServer::start_on(addr, MockConfig::default())
            .await
            .unwrap();
        assert!(get(again.addr(), "/fast", "")
            .await
            .ends_with(r#"{"ok":true}"#));
    }

    #[tokio::test]
    async fn delay_header() {
        let m = MockServer::start(MockConfig::default()).await.unwrap();
        let t = std::time::Instant::now();
        get(m.addr(), "/fast", "x-mock-delay: 150ms\r\n").await;
        assert!(t.elapsed() >= Duration::from_millis(150));
    }
}
