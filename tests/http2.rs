//! HTTP/2 to the gateway (RFC 9113) with a real h2 client: over TLS by ALPN, and in clear
//! text with prior knowledge (`server.h2c`), HTTP/1.1 still served on the same ports. Routing
//! by `:authority`, plugins, errors and the upstream (HTTP/1.1) behave as over HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use support::*;

fn routes(upstream: std::net::SocketAddr) -> String {
    format!(
        "[upstreams.app]\nendpoints = [\"{upstream}\"]\n\
         [plugins.auth]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"an-http2-test-secret-of-32-bytes!!\"\n\
         [[routes]]\nname = \"app\"\nhost = \"app.test\"\npath_prefix = \"/\"\nupstream = \"app\"\n\
         [[routes]]\nname = \"secure\"\nhost = \"secure.test\"\npath_prefix = \"/\"\nupstream = \"app\"\nplugins = [\"auth\"]\n"
    )
}

#[tokio::test]
async fn h2c_with_prior_knowledge_and_http1_share_the_port() {
    let up = mock("app").await;
    let gw = Gateway::start(&format!("{}\n{}", server("h2c = true"), routes(up.addr()))).await;
    let resolving = |b: reqwest::ClientBuilder| {
        ["app.test", "secure.test", "nowhere.test"]
            .into_iter()
            .fold(b, |b, name| b.resolve(name, gw.addr))
    };
    let h2 = resolving(reqwest::Client::builder().http2_prior_knowledge())
        .build()
        .unwrap();
    let http1 = resolving(reqwest::Client::builder()).build().unwrap();
    let port = gw.addr.port();
    let at = |host: &str, path: &str| format!("http://{host}:{port}{path}");
    let url = at("app.test", "/users/7");
    // Routing by :authority (the h2 client sends the host there).
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mock-name"], "app");
    // A plugin's answer and the gateway's errors over h2.
    let r = h2.get(at("secure.test", "/orders")).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 401);
    let r = h2.get(at("nowhere.test", "/x")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(json(r).await["error"]["code"], "not_found");
    // A request body streams through to the HTTP/1.1 upstream, framed right.
    let body = vec![b'z'; 200_000];
    let r = h2
        .post(at("app.test", "/echo"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["body_bytes"], 200_000);
    // Many concurrent streams on one connection.
    let results = futures_util::future::join_all(
        (0..50).map(|i| h2.get(at("app.test", &format!("/users/{i}"))).send()),
    )
    .await;
    let statuses: Vec<u16> = results
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{statuses:?}\n{}",
        gw.stderr()
    );
    // The upstream learns the client's host from :authority.
    let echo = json(h2.get(at("app.test", "/echo/h")).send().await.unwrap()).await;
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        format!("app.test:{port}")
    );
    // HTTP/1.1 on the same port.
    let r = http1.get(&url).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let log = gw.access_log_lines(55).await;
    assert!(log
        .iter()
        .any(|l| l["status"] == 401 && l["route"] == "secure"));
}

/// Waiting for the HTTP/2 preface is bounded like a request head: a client that connects to
/// an h2c listener and sends nothing is closed after `header_timeout`.
#[tokio::test]
async fn a_silent_client_on_an_h2c_listener_is_closed_at_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let up = mock("app").await;
    let gw = Gateway::start(&format!(
        "{}\n{}",
        server("h2c = true\nheader_timeout = \"500ms\""),
        routes(up.addr())
    ))
    .await;
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        silent.read_to_end(&mut buf),
    )
    .await;
    assert!(closed.is_ok(), "closed, not held open");
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
}

#[tokio::test]
async fn tls_offers_h2_by_alpn_unless_turned_off() {
    let up = mock("app").await;
    let certs = tempfile::tempdir().unwrap();
    let (cert_pem, cert, key) = crate::tls::cert_files(certs.path(), "cert", &["app.test"]);
    let tls = |http2: bool| {
        format!(
            "[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{key}\"\nhttp2 = {http2}\n"
        )
    };
    for (http2, expected) in [
        (true, http::Version::HTTP_2),
        (false, http::Version::HTTP_11),
    ] {
        let gw = Gateway::start(&format!(
            "{}\n{}\n{}",
            server(""),
            tls(http2),
            routes(up.addr())
        ))
        .await;
        let port = crate::tls::tls_port(&gw).await;
        let c = crate::tls::sni_client(&[&cert_pem], &["app.test"], port);
        let r = c
            .get(format!("https://app.test:{port}/users/1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), expected, "http2 = {http2}");
        assert_eq!(r.status(), 200);
        let got = up.requests().last().unwrap().clone();
        assert_eq!(got.header("x-forwarded-proto"), Some("https"));
    }
}

/// Requests parsed from an HTTP/1.1 byte stream: `(request line, body)` each, and the bytes
/// that do not form a complete request (a framing error shows up there).
fn parse_http1(mut buf: &[u8]) -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    let mut out = Vec::new();
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (out, buf.to_vec());
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let mut rest = &buf[end + 4..];
        let line = head.lines().next().unwrap_or_default().to_string();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let mut body = Vec::new();
        if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return (out, buf.to_vec());
                };
                let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                    .unwrap_or(usize::MAX);
                if size == usize::MAX || rest.len() < eol + 2 + size + 2 {
                    return (out, buf.to_vec());
                }
                body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                rest = &rest[eol + 2 + size + 2..];
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            if rest.len() < n {
                return (out, buf.to_vec());
            }
            body.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        out.push((line, body));
        buf = rest;
    }
}

/// An HTTP/1.1 upstream that keeps every byte it receives and answers each complete request
/// with a small 200 on the same (kept-alive) connection.
async fn recording_http1_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Default::default();
    let kept = std::sync::Arc::clone(&streams);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let kept = std::sync::Arc::clone(&kept);
            tokio::spawn(async move {
                let index = {
                    let mut s = kept.lock().unwrap();
                    s.push(Vec::new());
                    s.len() - 1
                };
                let mut answered = 0;
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let complete = {
                        let mut s = kept.lock().unwrap();
                        s[index].extend_from_slice(&chunk[..n]);
                        parse_http1(&s[index]).0.len()
                    };
                    while answered < complete {
                        answered += 1;
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, streams)
}

/// An h2 request body without a length reaches an HTTP/1.1 upstream chunked, with exactly one
/// terminating chunk (RFC 9112 7.1): a second `0\r\n\r\n` would be read as the start of the
/// next request on the pooled connection and corrupt it. Requests after it on the same
/// connection are framed as sent.
#[tokio::test]
async fn h2_bodies_without_length_reach_an_http1_upstream_framed_once() {
    let (upstream, streams) = recording_http1_upstream().await;
    let gw = Gateway::start(&format!(
        "{}\n[upstreams.app]\nendpoints = [\"{upstream}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        server("h2c = true"),
    ))
    .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for i in 0..3 {
        let parts: Vec<Result<Vec<u8>, std::io::Error>> =
            vec![Ok(format!("part-{i}-a,").into_bytes()), Ok(b"b".to_vec())];
        let r = h2
            .post(gw.url("/upload"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                parts,
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "upload {i}");
        assert_eq!(r.text().await.unwrap(), "ok");
        let r = h2.get(gw.url("/after")).send().await.unwrap();
        assert_eq!(r.status(), 200, "the request after upload {i}");
    }
    let streams = streams.lock().unwrap().clone();
    let mut requests = Vec::new();
    for bytes in &streams {
        let (parsed, leftover) = parse_http1(bytes);
        assert!(
            leftover.is_empty(),
            "bytes after the last request: {:?}",
            String::from_utf8_lossy(&leftover)
        );
        requests.extend(parsed);
    }
    assert_eq!(requests.len(), 6, "{requests:?}");
    let uploads: Vec<&(String, Vec<u8>)> = requests
        .iter()
        .filter(|(l, _)| l.starts_with("POST /upload"))
        .collect();
    assert_eq!(uploads.len(), 3);
    for (i, (_, body)) in uploads.iter().enumerate() {
        assert_eq!(
            String::from_utf8_lossy(body),
            format!("part-{i}-a,b"),
            "uploads arrive in order on one connection"
        );
    }
    assert!(
        streams.len() <= 2,
        "connections were reused: {}",
        streams.len()
    );
}
