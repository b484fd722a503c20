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

/// A TLS upstream (rustls) answering `200 tls ok` over HTTP/1.1, with a self-signed
/// certificate for `localhost`; with `client_ca`, it requires a client certificate that CA
/// (here: the self-signed client certificate itself) signed. Returns its address and its
/// certificate (PEM).
async fn tls_upstream(client_ca: Option<&str>) -> (std::net::SocketAddr, String) {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&provider),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(vec![generated.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"tls ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, generated.cert.pem())
}

fn tls_pool(port: u16, extra: &str) -> String {
    format!(
        "{}\n[upstreams.secure]\nendpoints = [\"localhost:{port}\"]\ntls = true\nretries = 0\n{extra}\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"secure\"\n",
        server("")
    )
}

/// Upstream certificates are verified by default (against the system's CAs, or `ca_file`);
/// a failed verification is a 502 `upstream_tls`; `verify = false` skips it.
#[tokio::test]
async fn upstream_certificates_are_verified_with_the_pools_ca() {
    let (addr, cert) = tls_upstream(None).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();

    let gw = Gateway::start(&tls_pool(
        addr.port(),
        &format!("ca_file = \"{}\"", ca.display()),
    ))
    .await;
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tls ok");

    let gw = Gateway::start(&tls_pool(addr.port(), "")).await;
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(json(r).await["error"]["code"], "upstream_tls");

    let gw = Gateway::start(&tls_pool(addr.port(), "verify = false")).await;
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// mTLS to the upstream: with `client_cert`/`client_key` the gateway passes an upstream that
/// requires a client certificate; without them the upstream refuses the connection (502).
#[tokio::test]
async fn the_gateway_presents_its_client_certificate_to_an_mtls_upstream() {
    let client_id =
        rcgen::generate_simple_self_signed(vec!["gateway.internal".to_string()]).unwrap();
    let client_pem = client_id.cert.pem();
    let (addr, cert) = tls_upstream(Some(&client_pem)).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, crt, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("gw.pem"),
        dir.path().join("gw.key"),
    );
    std::fs::write(&ca, &cert).unwrap();
    std::fs::write(&crt, &client_pem).unwrap();
    std::fs::write(&key, client_id.signing_key.serialize_pem()).unwrap();

    let with_cert = format!(
        "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        ca.display(),
        crt.display(),
        key.display()
    );
    let gw = Gateway::start(&tls_pool(addr.port(), &with_cert)).await;
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let gw = Gateway::start(&tls_pool(
        addr.port(),
        &format!("ca_file = \"{}\"", ca.display()),
    ))
    .await;
    let r = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    // TLS 1.3: the upstream refuses the missing certificate after the client's side of the
    // handshake is done, so the gateway sees a broken connection (`upstream_error`).
    let code = json(r).await["error"]["code"].as_str().unwrap().to_string();
    assert!(code == "upstream_tls" || code == "upstream_error", "{code}");

    // Files that are not what they should be are config errors with their path.
    let (code, _, err) = check(&tls_pool(
        addr.port(),
        &format!(
            "ca_file = \"{}\"\nclient_cert = \"{}\"",
            key.display(),
            crt.display()
        ),
    ));
    assert_eq!(code, 1);
    assert!(err.contains("upstreams.secure.ca_file"), "{err}");
    assert!(err.contains("upstreams.secure.client_key"), "{err}");
}
