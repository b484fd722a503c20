//! TLS listeners (rustls): a client that trusts the certificate reaches the upstream, which
//! learns the original scheme from X-Forwarded-Proto.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use support::*;

#[tokio::test]
async fn tls_listener_serves_and_forwards_the_scheme() {
    let up = mock("app").await;
    let certs = tempfile::tempdir().unwrap();
    let (cert_pem, cert, key) = cert_files(certs.path(), "cert", &["localhost"]);
    let config = format!(
        "{}\n[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        server(""),
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
    // A key that is not the certificate's (Pingora would fail or panic at connect time).
    let other = rcgen::generate_simple_self_signed(vec!["other".to_string()]).unwrap();
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
    let (code, _, err) = check(&tls_pool(
        addr.port(),
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            crt.display(),
            other_key.display()
        ),
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("upstreams.secure.client_key") && err.contains("is not the key of"),
        "{err}"
    );
}

/// The TLS listener's port, once it accepts connections (the admin listener that `start`
/// waits for may come up a moment before the proxy's).
pub async fn tls_port(gw: &Gateway) -> u16 {
    let port = logged_listener(&gw.stderr(), "server.tls[0].listen")
        .unwrap()
        .port();
    eventually(
        std::time::Duration::from_secs(10),
        "the TLS listener accepts",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    port
}

/// A self-signed certificate for `names`, written to `dir` as `<file>.pem` / `<file>.key`;
/// returns the certificate PEM and the two paths.
pub fn cert_files(dir: &std::path::Path, file: &str, names: &[&str]) -> (String, String, String) {
    let generated =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let (crt, key) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    std::fs::write(&crt, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (
        generated.cert.pem(),
        crt.display().to_string(),
        key.display().to_string(),
    )
}

/// A client that trusts `roots` and sends `name` (resolved to the listener) as SNI.
pub fn sni_client(roots: &[&str], names: &[&str], port: u16) -> reqwest::Client {
    let mut b = reqwest::Client::builder();
    for r in roots {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(r.as_bytes()).unwrap());
    }
    for n in names {
        b = b.resolve(n, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    b.build().unwrap()
}

/// SNI picks the certificate: an exact name, a one-label wildcard, else the default; a reload
/// puts new certificate files in place for new connections, without a restart, while a
/// request already under way finishes.
#[tokio::test]
async fn sni_selects_certificates_and_a_reload_rotates_them() {
    let up = Origin::start(|r| {
        let delay = if r.uri.starts_with("/slow") { 800 } else { 0 };
        OriginResponse::new(200, "ok").delay(std::time::Duration::from_millis(delay))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (default_pem, dc, dk) = cert_files(dir.path(), "default", &["default.test"]);
    let (api_pem, ac, ak) = cert_files(dir.path(), "api", &["api.example.com"]);
    let (org_pem, oc, ok) = cert_files(dir.path(), "org", &["*.example.org"]);
    let config = |api_cert: &str, api_key: &str| {
        format!(
            "{}\n[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{dc}\"\nkey = \"{dk}\"\n\
             certs = [ {{ names = [\"api.example.com\"], cert = \"{api_cert}\", key = \"{api_key}\" }},\n\
                       {{ names = [\"*.example.org\"], cert = \"{oc}\", key = \"{ok}\" }} ]\n\
             [upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
            server(""),
            up.addr
        )
    };
    let gw = Gateway::start(&config(&ac, &ak)).await;
    let port = tls_port(&gw).await;
    let names = [
        "api.example.com",
        "a.example.org",
        "a.b.example.org",
        "default.test",
    ];
    let all = sni_client(&[&default_pem, &api_pem, &org_pem], &names, port);
    let get = |c: &reqwest::Client, host: &str| {
        let req = c.get(format!("https://{host}:{port}/x")).send();
        async move { req.await.map(|r| r.status().as_u16()) }
    };
    // Each name verifies only if the gateway presented the certificate made for it.
    assert_eq!(get(&all, "api.example.com").await.unwrap(), 200);
    assert_eq!(get(&all, "a.example.org").await.unwrap(), 200);
    assert_eq!(get(&all, "default.test").await.unwrap(), 200);
    assert!(
        get(&all, "a.b.example.org").await.is_err(),
        "a wildcard covers one label: the default certificate is not for that name"
    );

    // Rotate api.example.com to a new key and certificate; a slow request is under way.
    let slow = {
        let c = all.clone();
        tokio::spawn(async move {
            c.get(format!("https://api.example.com:{port}/slow"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (new_pem, nc, nk) = cert_files(dir.path(), "api2", &["api.example.com"]);
    gw.write_config(&config(&nc, &nk));
    assert_eq!(gw.reload().await, "ok");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the request in flight finished"
    );
    let only_new = sni_client(&[&new_pem], &["api.example.com"], port);
    assert_eq!(get(&only_new, "api.example.com").await.unwrap(), 200);
    let only_old = sni_client(&[&api_pem], &["api.example.com"], port);
    assert!(
        get(&only_old, "api.example.com").await.is_err(),
        "the old one is gone"
    );

    // A bad file on reload: the reload fails and the certificates stay.
    gw.write_config(&config(&nk, &nc));
    assert_eq!(gw.reload().await, "error");
    assert_eq!(get(&only_new, "api.example.com").await.unwrap(), 200);
}

/// mTLS from clients: `require` refuses a client without a certificate or with one from
/// another CA; `optional` lets one without through.
#[tokio::test]
async fn client_certificates_are_required_or_optional() {
    let up = mock("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (server_pem, sc, sk) = cert_files(dir.path(), "server", &["app.test"]);
    let client_id = rcgen::generate_simple_self_signed(vec!["alice".to_string()]).unwrap();
    let client_pem = client_id.cert.pem();
    let ca = dir.path().join("clients-ca.pem");
    std::fs::write(&ca, &client_pem).unwrap();
    let identity = reqwest::Identity::from_pem(
        format!("{}{}", client_pem, client_id.signing_key.serialize_pem()).as_bytes(),
    )
    .unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["mallory".to_string()]).unwrap();
    let stranger_identity = reqwest::Identity::from_pem(
        format!(
            "{}{}",
            stranger.cert.pem(),
            stranger.signing_key.serialize_pem()
        )
        .as_bytes(),
    )
    .unwrap();
    for mode in ["require", "optional"] {
        let gw = Gateway::start(&format!(
            "{}\n[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{sc}\"\nkey = \"{sk}\"\n\
             client_auth = \"{mode}\"\nclient_ca = \"{}\"\nforward_client_cert = \"x-client-cert-subject\"\n\
             [upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
            server(""),
            ca.display(),
            up.addr()
        ))
        .await;
        let port = tls_port(&gw).await;
        let with = |id: Option<reqwest::Identity>| {
            let mut b = reqwest::Client::builder()
                .add_root_certificate(
                    reqwest::Certificate::from_pem(server_pem.as_bytes()).unwrap(),
                )
                .resolve(
                    "app.test",
                    std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                );
            if let Some(id) = id {
                b = b.identity(id);
            }
            b.build().unwrap()
        };
        let url = format!("https://app.test:{port}/x");
        let ok = with(Some(identity.clone()))
            .get(&url)
            .header("x-client-cert-subject", "CN=forged")
            .send()
            .await
            .unwrap();
        assert_eq!(
            ok.status(),
            200,
            "{mode}: a client with a certificate of the CA"
        );
        // The verified subject goes upstream, never what the client wrote.
        let seen = up.requests();
        let subjects = seen.last().unwrap().header_all("x-client-cert-subject");
        assert_eq!(subjects, ["CN=rcgen self signed cert"], "{mode}");
        let wrong = with(Some(stranger_identity.clone())).get(&url).send().await;
        assert!(
            wrong.is_err(),
            "{mode}: a certificate of another CA is refused"
        );
        let none = with(None).get(&url).send().await;
        match mode {
            "require" => assert!(none.is_err(), "require: no certificate, no connection"),
            _ => {
                assert_eq!(
                    none.unwrap().status(),
                    200,
                    "optional: no certificate is fine"
                );
                let forged = with(None)
                    .get(&url)
                    .header("x-client-cert-subject", "CN=forged")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(forged.status(), 200);
                let seen = up.requests();
                assert!(
                    seen.last()
                        .unwrap()
                        .header("x-client-cert-subject")
                        .is_none(),
                    "optional without a certificate: no subject, and no forged one"
                );
            }
        }
    }
}

/// Certificate mistakes are `--check` errors with their paths.
#[test]
fn certificate_mistakes_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ac, ak) = cert_files(dir.path(), "a", &["a.test"]);
    let (_, bc, bk) = cert_files(dir.path(), "b", &["b.test"]);
    let (code, _, err) = check(&format!(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\n\
         cert = \"{ac}\"\nkey = \"{bk}\"\n\
         certs = [ {{ names = [\"x.test\", \"*.test\"], cert = \"{bc}\", key = \"{bk}\" }},\n\
                   {{ names = [\"x.test\"], cert = \"{ac}\", key = \"{ak}\" }},\n\
                   {{ names = [\"y.test\"], cert = \"/nonexistent.pem\", key = \"{ak}\" }} ]\n\
         client_auth = \"require\"\n\
         [upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"a\"\nupstream = \"a\"\n"
    ));
    assert_eq!(code, 1);
    for expected in [
        "server.tls[0].cert",
        "server.tls[0].certs[1].names[0]",
        "server.tls[0].certs[2].cert",
        "server.tls[0].client_ca",
    ] {
        assert!(err.contains(expected), "missing {expected}: {err}");
    }
    assert!(err.contains("is not the key of"), "{err}");

    // A subject header needs client certificates to come from.
    let (code, _, err) = check(&format!(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[[server.tls]]\nlisten = \"127.0.0.1:8443\"\n\
         cert = \"{ac}\"\nkey = \"{ak}\"\nforward_client_cert = \"x-client-cert-subject\"\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("server.tls[0].forward_client_cert") && err.contains("needs client_auth"),
        "{err}"
    );
}

/// With `server.watch`, a certificate renewed in place (cert-manager or certbot replacing the
/// files the config names) is picked up by itself: new connections get the new certificate,
/// without a SIGHUP or an edit of the config.
#[tokio::test]
async fn watch_picks_up_a_renewed_certificate() {
    let up = mock("app").await;
    let dir = tempfile::tempdir().unwrap();
    let (old_pem, cert, key) = cert_files(dir.path(), "site", &["app.test"]);
    let gw = Gateway::start(&format!(
        "{}\n[[server.tls]]\nlisten = \"127.0.0.1:0\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        server("watch = true"),
        up.addr()
    ))
    .await;
    let port = tls_port(&gw).await;
    let get = |roots: &[&str]| {
        let c = sni_client(roots, &["app.test"], port);
        async move {
            c.get(format!("https://app.test:{port}/x"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    };
    assert_eq!(get(&[&old_pem]).await.unwrap(), 200);
    // Renewed: a new key and certificate written over the same two files.
    let renewed = tempfile::tempdir().unwrap();
    let (new_pem, nc, nk) = cert_files(renewed.path(), "site", &["app.test"]);
    std::fs::copy(&nk, &key).unwrap();
    std::fs::copy(&nc, &cert).unwrap();
    let new_pem_ref = new_pem.as_str();
    eventually(
        std::time::Duration::from_secs(10),
        "the renewed certificate is served",
        || async { get(&[new_pem_ref]).await.ok().filter(|s| *s == 200) },
    )
    .await;
    assert!(get(&[&old_pem]).await.is_err(), "the old one is gone");
    assert!(gw.stderr().contains("a certificate file changed"));
}
