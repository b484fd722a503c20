//! Routing through the real gateway: prefixes on segment boundaries, exact paths, templates,
//! hosts, methods, rewrites, path normalisation and the JSON error shape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use support::*;

async fn gateway_with(up: &MockServer, routes: &str) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{routes}",
        server(""),
        up.addr()
    );
    Gateway::start(&config).await
}

const ROUTES: &str = r#"
[[routes]]
name = "orders"
path_prefix = "/api/orders"
methods = ["GET", "POST"]
upstream = "app"
rewrite_prefix = "/orders"

[[routes]]
name = "orders-special"
path = "/api/orders/special"
upstream = "app"

[[routes]]
name = "user-summary"
path = "/api/users/{id}/summary"
upstream = "app"
rewrite_prefix = "/summary"

[[routes]]
name = "admin-host"
host = "admin.example.test"
path_prefix = "/"
upstream = "app"
rewrite_prefix = "/admin-host"

[[routes]]
name = "wild-host"
hosts = ["*.tenants.test"]
path_prefix = "/"
upstream = "app"
rewrite_prefix = "/tenant"

[[routes]]
name = "public"
path_prefix = "/api/public"
upstream = "app"
"#;

#[tokio::test]
async fn prefix_routes_rewrite_and_keep_query() {
    let up = mock("app").await;
    let gw = gateway_with(&up, ROUTES).await;
    let c = client();
    for path in [
        "/api/orders",
        "/api/orders/7?expand=items",
        "/api/orders/special",
        "/api/orders/special/x",
        "/api/public/a",
    ] {
        let resp = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let received: Vec<String> = up.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(
        received,
        [
            "/orders",
            "/orders/7?expand=items",
            "/api/orders/special",
            "/orders/special/x",
            "/api/public/a"
        ]
    );
}

#[tokio::test]
async fn segment_boundaries_and_404_shape() {
    let up = mock("app").await;
    let gw = gateway_with(&up, ROUTES).await;
    let resp = client().get(gw.url("/api/ordersx")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = json(resp).await;
    assert_eq!(body["error"]["status"], 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["request_id"], request_id.as_str());
    assert!(up.requests().is_empty(), "nothing reaches the upstream");
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let up = mock("app").await;
    let gw = gateway_with(&up, ROUTES).await;
    let resp = client()
        .delete(gw.url("/api/orders/7"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD, POST");
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // HEAD is accepted where GET is.
    let head = client().head(gw.url("/api/orders/7")).send().await.unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn template_segments_and_hosts() {
    let up = mock("app").await;
    let gw = gateway_with(&up, ROUTES).await;
    let c = client();
    let body = json(c.get(gw.url("/api/users/42/summary")).send().await.unwrap()).await;
    assert_eq!(body["uri"], "/summary");
    let body = json(
        c.get(gw.url("/api/orders"))
            .header("host", "Admin.Example.Test:8080")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["uri"], "/admin-host/api/orders");
    let body = json(
        c.get(gw.url("/x"))
            .header("host", "acme.tenants.test")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(body["uri"], "/tenant/x");
    // The wildcard needs a label before the suffix.
    let resp = c
        .get(gw.url("/x"))
        .header("host", "tenants.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn paths_are_normalised_before_matching() {
    let up = mock("app").await;
    let gw = gateway_with(&up, ROUTES).await;
    // (raw request target, status, what the upstream must receive)
    let cases = [
        ("/api/public/../orders/1", 200, Some("/orders/1")),
        ("/api/public/%2e%2e/orders/2", 200, Some("/orders/2")),
        ("/api/public/..%2Forders/3", 200, Some("/orders/3")),
        ("/api//orders///4", 200, Some("/orders/4")),
        ("/api/./orders/5", 200, Some("/orders/5")),
        ("/%61pi/orders/6", 200, Some("/orders/6")),
        ("/api/public/../../../etc/passwd", 400, None),
        ("/a/%zz", 400, None),
        ("/a/%00", 400, None),
    ];
    for (target, status, upstream_uri) in cases {
        let resp = raw_get(gw.addr, target, &[]).await;
        assert_eq!(resp.status, status, "{target}");
        if status == 400 {
            assert_eq!(resp.json()["error"]["code"], "bad_path", "{target}");
        }
        if let Some(want) = upstream_uri {
            let last = up.requests().last().cloned().unwrap();
            assert_eq!(last.uri, want, "{target}");
        }
    }
    assert_eq!(up.requests().len(), 6);
}

#[tokio::test]
async fn escaped_slashes_can_be_rejected() {
    let up = mock("app").await;
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{ROUTES}",
        server("escaped_slashes = \"reject\""),
        up.addr()
    );
    let gw = Gateway::start(&config).await;
    let resp = raw_get(gw.addr, "/api/public/a%2Fb", &[]).await;
    assert_eq!(resp.status, 400);
    let resp = raw_get(gw.addr, "/api/public/a/b", &[]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let up = mock("app").await;
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{ROUTES}",
        server("max_body = \"1KiB\""),
        up.addr()
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    let ok = c
        .post(gw.url("/api/public/upload"))
        .body(vec![b'a'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(json(ok).await["body_bytes"], 1024);
    let big = c
        .post(gw.url("/api/public/upload"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    assert_eq!(json(big).await["error"]["code"], "payload_too_large");
    // A chunked body without a declared length is cut off too.
    let chunks = vec![vec![b'b'; 800], vec![b'b'; 800]];
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let chunked = c
        .post(gw.url("/api/public/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 413);
}

/// RFC 9110 10.1.1 (Expect): a declared length over max_body is refused with 413 before any
/// `100 Continue`; a chunked upload that grows past it after `100 Continue` still gets a
/// final 413 (not a closed connection), and the log and metrics record 413.
#[tokio::test]
async fn expect_continue_uploads_over_max_body_get_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock("app").await;
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{ROUTES}",
        server("max_body = \"1KiB\""),
        up.addr()
    );
    let gw = Gateway::start(&config).await;

    let declared = raw(
        gw.addr,
        b"POST /api/public/declared HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    assert_eq!(declared.status, 413, "no 100 Continue first: {declared:?}");

    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(
        b"POST /api/public/chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("an interim answer")
        .unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    let chunk = format!("400\r\n{}\r\n", "c".repeat(0x400));
    for _ in 0..2 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest).to_string();
    let final_head = text
        .split("\r\n\r\n")
        .find(|part| part.starts_with("HTTP/1.1 4"))
        .unwrap_or_else(|| panic!("no final response after 100 Continue: {text:?}"));
    assert!(final_head.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
    let log = gw.access_log_lines(2).await;
    let line = log
        .iter()
        .find(|l| l["path"] == "/api/public/chunked")
        .expect("access-log line");
    assert_eq!(line["status"], 413);
    let metrics = gw.metrics().await;
    assert!(!metrics.contains("status=\"100\""), "{metrics}");
}

#[tokio::test]
async fn client_read_buffer_sizes_serve_large_requests_on_kept_alive_connections() {
    let up = mock("app").await;
    for setting in ["", "read_buffer = \"64KiB\"", "read_buffer = 512"] {
        let config = format!(
            "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{ROUTES}",
            server(setting),
            up.addr()
        );
        let gw = Gateway::start(&config).await;
        // One client, so one kept-alive connection: a header and a body larger than any of
        // the buffers, then small requests on the same connection.
        let c = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .unwrap();
        let big_header = "h".repeat(20_000);
        for round in 0..3 {
            let resp = c
                .post(gw.url(&format!("/api/public/big/{round}")))
                .header("x-big", &big_header)
                .body(vec![b'b'; 100_000])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "{setting}");
            let body = json(resp).await;
            assert_eq!(body["body_bytes"], 100_000, "{setting}");
            assert_eq!(body["headers"]["x-big"], big_header.as_str(), "{setting}");
            let small = c
                .get(gw.url(&format!("/api/public/small/{round}")))
                .send()
                .await
                .unwrap();
            assert_eq!(small.status(), 200, "{setting}");
            assert_eq!(
                json(small).await["uri"],
                format!("/api/public/small/{round}")
            );
        }
    }
}
