//! TLS listeners (rustls): a client that trusts the certificate reaches the upstream, which
//! learns the original scheme from X-Forwarded-Proto.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use support::*;

#[tokio::test]
async fn tls_listener_serves_and_forwards_the_scheme() {
    let up = mock("app").await;
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = key.cert.pem();
    std::fs::write(certs.path().join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(
        certs.path().join("key.pem"),
        key.signing_key.serialize_pem(),
    )
    .unwrap();
    let config = format!(
        "{}\n[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        server(""),
        certs.path().join("cert.pem").display(),
        certs.path().join("key.pem").display(),
        up.addr()
    );
    let gw = Gateway::start(&config).await;
    let tls_port = logged_listener(&gw.stderr(), "server.tls[0].listen")
        .expect("the TLS listener is logged")
        .port();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .resolve(
            "localhost",
            std::net::SocketAddr::from(([127, 0, 0, 1], tls_port)),
        )
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{tls_port}/secure"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = &up.requests()[0];
    assert_eq!(got.uri, "/secure");
    assert_eq!(got.header("x-forwarded-proto"), Some("https"));
    // The plain listener keeps working beside it and says http.
    client.get(gw.url("/plain")).send().await.unwrap();
    assert_eq!(up.requests()[1].header("x-forwarded-proto"), Some("http"));
}
