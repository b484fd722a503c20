//! Idle and slow clients through real sockets: whole-head and body deadlines answer 408, idle
//! keep-alive connections close, and `server.max_connections` caps what one gateway holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

async fn gateway(up: &MockServer, limits: &str) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        server(limits),
        up.addr()
    );
    Gateway::start(&config).await
}

/// Reads until the server closes the connection (or 10 s pass): what it sent.
async fn read_until_closed(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 9110 15.5.9: a request head that trickles in (one byte every 200 ms, which every
/// per-read timeout allows) gets 408 once `header_timeout` has passed since accept.
#[tokio::test]
async fn a_slow_request_head_gets_408_within_header_timeout() {
    let up = mock("app").await;
    let gw = gateway(&up, "header_timeout = \"1s\"").await;
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut answer = Vec::new();
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.ends_with(b"}") {
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let elapsed = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    assert!(up.requests().is_empty(), "nothing reached the upstream");
    // A connection that never sends a byte is answered the same way.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let answer = read_until_closed(&mut silent).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let m = gw.metrics().await;
    assert!(
        m.contains("sallyport_client_timeouts_total{phase=\"header\"} 2"),
        "{m}"
    );
}

/// A body that trickles below `body_min_rate` gets 408 (the request is known, so it is the
/// gateway's JSON error, logged with its route), and the upstream connection carrying the
/// half-sent request is released rather than pinned.
#[tokio::test]
async fn a_trickling_body_gets_408_and_releases_the_upstream() {
    let up = mock("app").await;
    let gw = gateway(&up, "body_timeout = \"1s\"\nbody_min_rate = 100").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // 10 bytes every 200 ms is 50 B/s: the 1 s deadline grows by at most 0.1 s per 10 bytes.
    while started.elapsed() < Duration::from_secs(5) {
        if s.write_all(&[b'x'; 10]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}}") {
            break;
        }
    }
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let log = gw.access_log_lines(1).await;
    assert_eq!(log[0]["status"], 408);
    assert_eq!(log[0]["route"], "app");
    let m = gw.metrics().await;
    assert!(
        m.contains("sallyport_client_timeouts_total{phase=\"body\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("sallyport_requests_total{method=\"POST\",route=\"app\",status=\"408\"} 1"),
        "{m}"
    );
    // The upstream saw the request start, then its connection end: the mock's body read
    // failed, so it recorded an empty or partial body and no second request is pending.
    let got = up.requests();
    assert_eq!(got.len(), 1);
    assert!(got[0].body.len() < 1000, "{}", got[0].body.len());
}

/// A large body at a fair rate is not cut off: every `body_min_rate` bytes extend the deadline.
#[tokio::test]
async fn a_steady_upload_outlasts_body_timeout() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "body_timeout = \"500ms\"\nbody_min_rate = 1000\nmax_body = \"1MiB\"",
    )
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let total = 8 * 2000;
    s.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {total}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    // 2000 bytes every 250 ms (8 KB/s): 2 s in all, well past the fixed 500 ms.
    for _ in 0..8 {
        s.write_all(&[b'y'; 2000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let answer = read_until_closed(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.requests()[0].body.len(), total);
}

/// An idle kept-alive connection is closed after `idle_timeout`, without an answer (RFC 9112
/// 9.5); the request before it was served normally.
#[tokio::test]
async fn idle_keep_alive_connections_close_after_idle_timeout() {
    let up = mock("app").await;
    let gw = gateway(&up, "idle_timeout = \"500ms\"").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let rest = read_until_closed(&mut s).await;
    let elapsed = started.elapsed();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert_eq!(rest.matches("HTTP/1.1").count(), 1, "{rest}");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("sallyport_client_timeouts_total{phase=\"idle\"} 1"),
        "{m}"
    );
}

/// Beyond `max_connections` new connections are closed at accept and counted; a slot that
/// frees up is usable again.
#[tokio::test]
async fn max_connections_caps_open_connections() {
    let up = mock("app").await;
    let gw = gateway(&up, "max_connections = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        // A served request proves the connection was admitted; it stays open (keep-alive).
        s.write_all(b"GET /held HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(gw.addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /extra HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut extra).await;
    assert_eq!(answer, "", "closed without an answer");
    let m = gw.metrics().await;
    assert!(m.contains("sallyport_connections_refused_total 1"), "{m}");
    assert!(m.contains("sallyport_connections_open 3"), "{m}");
    drop(held.pop());
    // Until the gateway has seen the close, a new connection may still be refused.
    eventually(
        Duration::from_secs(5),
        "the freed slot is reused",
        || async {
            let mut s = TcpStream::connect(gw.addr).await.ok()?;
            s.write_all(b"GET /again HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            read_until_closed(&mut s)
                .await
                .starts_with("HTTP/1.1 200")
                .then_some(())
        },
    )
    .await;
}
