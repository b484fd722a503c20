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
    let key = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).unwrap();
    let cert_pem = key.cert.pem();
    std::fs::write(certs.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(
        certs.path().join("key.pem"),
        key.signing_key.serialize_pem(),
    )
    .unwrap();
    let tls = |http2: bool| {
        format!(
            "[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nhttp2 = {http2}\n",
            certs.path().join("cert.pem").display(),
            certs.path().join("key.pem").display(),
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
