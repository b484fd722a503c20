//! Upstream pools through the real gateway: balancing, health checks that eject and re-admit
//! endpoints, retry on connect failure, and the 502/503/504 answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::*;

fn route(upstream: &str) -> String {
    format!("[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"{upstream}\"\n")
}

/// Counts which mock answered each of `n` requests (the `x-mock-name` header).
async fn spread(gw: &Gateway, n: usize, header: Option<(&str, String)>) -> HashMap<String, usize> {
    let c = client();
    let mut seen = HashMap::new();
    for i in 0..n {
        let mut req = c.get(gw.url(&format!("/echo/{i}")));
        if let Some((k, v)) = &header {
            req = req.header(*k, v.as_str());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let name = resp.headers()["x-mock-name"].to_str().unwrap().to_string();
        *seen.entry(name).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn round_robin_honours_weights() {
    let (a, b, c) = (mock("a").await, mock("b").await, mock("c").await);
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\", \"{}\", \"{}@2\"]\n{}",
        server(""),
        a.addr(),
        b.addr(),
        c.addr(),
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    let seen = spread(&gw, 40, None).await;
    assert_eq!(seen["a"], 10, "{seen:?}");
    assert_eq!(seen["b"], 10, "{seen:?}");
    assert_eq!(seen["c"], 20, "{seen:?}");
}

#[tokio::test]
async fn random_reaches_every_endpoint() {
    let (a, b) = (mock("a").await, mock("b").await);
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\nbalance = \"random\"\n{}",
        server(""),
        a.addr(),
        b.addr(),
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    let seen = spread(&gw, 60, None).await;
    assert!(seen.get("a").copied().unwrap_or(0) >= 10, "{seen:?}");
    assert!(seen.get("b").copied().unwrap_or(0) >= 10, "{seen:?}");
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let (a, b, c) = (mock("a").await, mock("b").await, mock("c").await);
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\", \"{}\", \"{}\"]\nbalance = \"consistent_hash\"\nhash_key = \"header:x-user-id\"\n{}",
        server(""),
        a.addr(),
        b.addr(),
        c.addr(),
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    let mut owners = Vec::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let seen = spread(&gw, 5, Some(("x-user-id", user.to_string()))).await;
        assert_eq!(seen.len(), 1, "{user} spread over {seen:?}");
        owners.push(seen.into_keys().next().unwrap());
    }
    owners.sort();
    owners.dedup();
    assert!(owners.len() >= 2, "keys spread over endpoints: {owners:?}");
}

#[tokio::test]
async fn health_checks_eject_and_readmit_an_endpoint() {
    let (a, b) = (mock("a").await, mock("b").await);
    let b_addr = b.addr();
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\", \"{}\"]\n[upstreams.pool.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\nunhealthy_after = 2\nhealthy_after = 2\n{}",
        server(""),
        a.addr(),
        b_addr,
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    let healthy_b =
        format!("sallyport_upstream_endpoint_healthy{{endpoint=\"{b_addr}\",upstream=\"pool\"}}");
    assert_eq!(gw.metric_value(&healthy_b).await, 1.0);

    // Kill b: the checks eject it and every request goes to a.
    b.stop().await;
    eventually(Duration::from_secs(10), "endpoint ejected", || async {
        (gw.metric_value(&healthy_b).await == 0.0).then_some(())
    })
    .await;
    let seen = spread(&gw, 10, None).await;
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");

    // Restart b on the same port: re-admitted after healthy_after passes.
    let b = MockServer::start_on(
        b_addr,
        MockConfig {
            name: "b".into(),
            ..MockConfig::default()
        },
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "endpoint healthy", || async {
        (gw.metric_value(&healthy_b).await == 1.0).then_some(())
    })
    .await;
    let seen = spread(&gw, 10, None).await;
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");
    drop(b);
}

#[tokio::test]
async fn failing_health_status_ejects_and_all_down_is_503() {
    let a = mock("a").await;
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\"]\n[upstreams.pool.health]\npath = \"/healthz\"\ninterval = \"100ms\"\nunhealthy_after = 1\nhealthy_after = 1\n{}",
        server(""),
        a.addr(),
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    a.set_healthy(false);
    let series = format!(
        "sallyport_upstream_endpoint_healthy{{endpoint=\"{}\",upstream=\"pool\"}}",
        a.addr()
    );
    eventually(Duration::from_secs(10), "endpoint ejected", || async {
        (gw.metric_value(&series).await == 0.0).then_some(())
    })
    .await;
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "unavailable");
    a.set_healthy(true);
    eventually(Duration::from_secs(10), "endpoint healthy", || async {
        (gw.metric_value(&series).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        client().get(gw.url("/x")).send().await.unwrap().status(),
        200
    );
}

/// A refused connect sent nothing, so every method is retried on another endpoint (RFC 9110
/// 9.2.2 limits automatic retries of non-idempotent requests that may have been received;
/// this one never was).
#[tokio::test]
async fn connect_failure_retries_another_endpoint_for_every_method() {
    let a = mock("a").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{dead}\", \"{}\"]\nretries = 1\nconnect_timeout = \"500ms\"\n{}",
        server(""),
        a.addr(),
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    // Round robin alternates: every request that lands on the dead endpoint is retried on a.
    for i in 0..6 {
        let resp = c.get(gw.url(&format!("/get/{i}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {i}");
    }
    assert_eq!(a.requests().len(), 6);
    for i in 0..4 {
        let resp = c
            .post(gw.url(&format!("/post/{i}")))
            .body(format!("body-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "POST {i}");
    }
    let posts: Vec<_> = a
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    assert_eq!(posts.len(), 4, "each POST reached the live endpoint once");
    for (i, r) in posts.iter().enumerate() {
        assert_eq!(
            r.body,
            format!("body-{i}").as_bytes(),
            "the body survives the retry"
        );
    }
    let log = gw.access_log_lines(10).await;
    assert!(
        log.iter().any(|l| l["attempts"] == 2),
        "a retried request logs 2 attempts"
    );
}

/// A request without the hash key is balanced round robin instead of hashing an empty key
/// onto one endpoint; requests with the key keep their endpoint.
#[tokio::test]
async fn consistent_hash_without_the_key_spreads_over_endpoints() {
    let (a, b, c) = (mock("a").await, mock("b").await, mock("c").await);
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\", \"{}\", \"{}\"]\nbalance = \"consistent_hash\"\nhash_key = \"header:x-user-id\"\n{}",
        server(""),
        a.addr(),
        b.addr(),
        c.addr(),
        route("pool")
    );
    let gw = Gateway::start(&config).await;
    let seen = spread(&gw, 30, None).await;
    assert_eq!(
        seen.len(),
        3,
        "keyless requests reach every endpoint: {seen:?}"
    );
    assert!(seen.values().all(|&n| n == 10), "round robin: {seen:?}");
    let keyed = spread(&gw, 10, Some(("x-user-id", "alice".into()))).await;
    assert_eq!(keyed.len(), 1, "one key, one endpoint: {keyed:?}");
}

/// `preserve_host = false` sends the endpoint's host as written in the config (port left out
/// when it is the default), for virtual-hosted upstreams; the default keeps the client's.
#[tokio::test]
async fn preserve_host_false_sends_the_endpoint_host() {
    let a = mock("a").await;
    let port = a.addr().port();
    let config = format!(
        "{}\n[upstreams.named]\nendpoints = [\"localhost:{port}\"]\npreserve_host = false\n\
         [upstreams.kept]\nendpoints = [\"localhost:{port}\"]\n\
         [[routes]]\nname = \"named\"\npath_prefix = \"/named\"\nupstream = \"named\"\n\
         [[routes]]\nname = \"kept\"\npath_prefix = \"/kept\"\nupstream = \"kept\"\n",
        server(""),
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    c.get(gw.url("/named"))
        .header("host", "api.example.com")
        .send()
        .await
        .unwrap();
    c.get(gw.url("/kept"))
        .header("host", "api.example.com")
        .send()
        .await
        .unwrap();
    let got = a.requests();
    assert_eq!(
        got[0].header("host"),
        Some(format!("localhost:{port}").as_str())
    );
    assert_eq!(got[0].header("x-forwarded-host"), Some("api.example.com"));
    assert_eq!(got[1].header("host"), Some("api.example.com"));
}

/// A TLS upstream written by name gets that name as SNI (RFC 6066 3), not the resolved IP
/// (which rustls cannot send as SNI at all).
#[tokio::test]
async fn tls_upstream_gets_the_endpoint_host_name_as_sni() {
    let (addr, seen) = sni_recorder().await;
    let config = format!(
        "{}\n[upstreams.tls]\nendpoints = [\"localhost:{}\"]\ntls = true\nretries = 0\n{}",
        server(""),
        addr.port(),
        route("tls")
    );
    let gw = Gateway::start(&config).await;
    // The recorder's certificate is not trusted: the handshake fails after the ClientHello.
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let names = seen.lock().unwrap().clone();
    assert_eq!(names, [Some("localhost".to_string())]);
}

/// Active TLS health checks name the endpoint too: each endpoint's check sends its own host
/// name as SNI.
#[tokio::test]
async fn tls_health_checks_send_the_endpoint_host_name_as_sni() {
    let (addr, seen) = sni_recorder().await;
    let config = format!(
        "{}\n[upstreams.tls]\nendpoints = [\"localhost:{}\"]\ntls = true\n[upstreams.tls.health]\ntype = \"tcp\"\ninterval = \"10s\"\n{}",
        server(""),
        addr.port(),
        route("tls")
    );
    // Ready after the first pass, which fails: the recorder's certificate is not trusted.
    let _gw = Gateway::start(&config).await;
    let names = seen.lock().unwrap().clone();
    assert_eq!(names, [Some("localhost".to_string())]);
}

/// A TLS server that records the SNI of every ClientHello and offers a self-signed certificate.
async fn sni_recorder() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
) {
    use std::sync::{Arc, Mutex};
    use tokio_rustls::rustls;

    #[derive(Debug)]
    struct Record {
        seen: Arc<Mutex<Vec<Option<String>>>>,
        key: Arc<rustls::sign::CertifiedKey>,
    }
    impl rustls::server::ResolvesServerCert for Record {
        fn resolve(
            &self,
            hello: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            self.seen
                .lock()
                .unwrap()
                .push(hello.server_name().map(str::to_string));
            Some(Arc::clone(&self.key))
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der =
        rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
    let key = provider.key_provider.load_private_key(der).unwrap();
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        vec![generated.cert.der().clone()],
        key,
    ));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Record {
            seen: Arc::clone(&seen),
            key: certified,
        }));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    // "localhost" as the gateway resolves it.
    let local = std::net::ToSocketAddrs::to_socket_addrs("localhost:0")
        .unwrap()
        .next()
        .unwrap();
    let listener = tokio::net::TcpListener::bind(local).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    (addr, seen)
}

#[test]
fn a_health_check_path_that_is_not_a_uri_is_a_config_error() {
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n[upstreams.a.health]\npath = \"/health check\"\n[[routes]]\nname = \"a\"\nupstream = \"a\"\n",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("upstreams.a.health.path"), "{err}");
}

/// An endpoint of a checked pool is not used before its first check passes, and a reload that
/// rebuilds the pool keeps what the checks learned: a dead endpoint never gets a request.
#[tokio::test]
async fn dead_endpoint_stays_out_at_start_and_across_pool_reloads() {
    let a = mock("a").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let pool = |retries: usize| {
        format!(
            "{}\n[upstreams.pool]\nendpoints = [\"{dead}\", \"{}\"]\nretries = {retries}\n\
             [upstreams.pool.health]\ntype = \"tcp\"\ninterval = \"10s\"\n{}",
            server(""),
            a.addr(),
            route("pool")
        )
    };
    let gw = Gateway::start(&pool(0)).await;
    let c = client();
    let post_all = |tag: &'static str| {
        let c = c.clone();
        let url = gw.url("/p");
        async move {
            let mut statuses = Vec::new();
            for i in 0..10 {
                let r = c
                    .post(format!("{url}/{tag}{i}"))
                    .body("x")
                    .send()
                    .await
                    .unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        }
    };
    // retries = 0: a request sent to the dead endpoint would be a 502.
    assert_eq!(post_all("start").await, [200; 10]);
    for _ in 0..3 {
        // A changed pool config rebuilds the pool; the 10 s interval means no new check runs.
        gw.write_config(
            &pool(0).replace("retries = 0", "retries = 0\nconnect_timeout = \"900ms\""),
        );
        assert_eq!(gw.reload().await, "ok");
        assert_eq!(post_all("reload").await, [200; 10]);
        gw.write_config(&pool(0));
        assert_eq!(gw.reload().await, "ok");
        assert_eq!(post_all("back").await, [200; 10]);
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            "sallyport_upstream_endpoint_healthy{{endpoint=\"{dead}\",upstream=\"pool\"}} 0"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn readyz_waits_for_the_first_health_check() {
    let a = mock("a").await;
    a.set_healthy(false);
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\"]\n[upstreams.pool.health]\npath = \"/healthz\"\ninterval = \"100ms\"\n{}",
        server(""),
        a.addr(),
        route("pool")
    );
    let mut gw = Gateway::spawn(&config).await;
    // Ready once the first pass ran, even though it failed; requests get 503 until it passes.
    gw.wait_ready().await;
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(
        a.requests().is_empty(),
        "an endpoint that never passed gets no request"
    );
    a.set_healthy(true);
    eventually(Duration::from_secs(10), "served once healthy", || async {
        let r = client().get(gw.url("/x")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn slow_upstream_is_504_and_dead_pool_is_502() {
    let a = mock("a").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{}\n[upstreams.slow]\nendpoints = [\"{}\"]\nread_timeout = \"200ms\"\n[upstreams.dead]\nendpoints = [\"{dead}\"]\nretries = 0\n\
         [[routes]]\nname = \"slow\"\npath_prefix = \"/slow\"\nupstream = \"slow\"\n\
         [[routes]]\nname = \"dead\"\npath_prefix = \"/dead\"\nupstream = \"dead\"\n",
        server(""),
        a.addr()
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    let started = Instant::now();
    let resp = c
        .get(gw.url("/slow/x"))
        .header("x-mock-delay", "2s")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "answered before the upstream"
    );
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "upstream_timeout");
    let resp = c.get(gw.url("/slow/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "fast requests still pass");

    let resp = c.get(gw.url("/dead/x")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(json(resp).await["error"]["code"], "upstream_error");
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .contains("sallyport_upstream_requests_total{outcome=\"timeout\",upstream=\"slow\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "sallyport_upstream_requests_total{outcome=\"connect_error\",upstream=\"dead\"} 1"
        ),
        "{metrics}"
    );
}

/// During an outage every failed request would log an ERROR line; per pool the first one is
/// logged and the rest are counted (one summary line per 10 s window).
#[tokio::test]
async fn an_upstream_outage_logs_once_not_once_per_request() {
    let dead = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{}\n[upstreams.dead]\nendpoints = [\"{dead}\"]\nretries = 0\n{}",
        server(""),
        route("dead")
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    for i in 0..40 {
        let r = c.get(gw.url(&format!("/x/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 502);
    }
    gw.access_log_lines(40).await;
    let stderr = gw.stderr();
    let lines = stderr
        .lines()
        .filter(|l| l.contains("Fail to proxy"))
        .count();
    assert_eq!(lines, 1, "{stderr}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            "sallyport_upstream_requests_total{outcome=\"connect_error\",upstream=\"dead\"} 40"
        ),
        "every failure is still counted: {metrics}"
    );
}

/// The `upstream_failure` and `upstream_response` hooks, seen by the test-only `probe`
/// plugin through real sockets: a refused connect is reported (retrying) before the retry's
/// response, with the endpoint and attempt number; a read timeout is reported as final.
#[tokio::test]
async fn upstream_failure_and_response_hooks_run_per_attempt() {
    let a = mock("a").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{dead}\", \"{}\"]\nretries = 1\nread_timeout = \"300ms\"\n\
         [plugins.probe]\ntype = \"probe\"\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"pool\"\nplugins = [\"probe\"]\n",
        server(""),
        a.addr(),
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    let mut seen = Vec::new();
    for i in 0..2 {
        let r = c.get(gw.url(&format!("/x/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        seen.push(r.headers()["x-probe-hooks"].to_str().unwrap().to_string());
    }
    let live = a.addr();
    let direct = format!(
        "request_filter upstream_request_filter request_body(0) upstream_response(200,pool#1@{live}) response_filter"
    );
    let retried = format!(
        "request_filter upstream_failure(connect_error,pool#1@{dead},retrying) \
         upstream_request_filter request_body(0) upstream_response(200,pool#2@{live}) response_filter"
    );
    assert!(
        seen.iter().all(|s| *s == direct || *s == retried),
        "{seen:#?}"
    );
    assert!(seen.contains(&retried), "{seen:#?}");

    // A read timeout after connecting: reported once, final (a fresh connection is not
    // retried), and the 504 still passes the response hook.
    let mut timed_out = None;
    for i in 0..2 {
        let r = c
            .get(gw.url(&format!("/slow/{i}")))
            .header("x-mock-delay", "2s")
            .send()
            .await
            .unwrap();
        let hooks = r.headers()["x-probe-hooks"].to_str().unwrap().to_string();
        if hooks.contains("timeout") {
            assert_eq!(r.status(), 504);
            timed_out = Some(hooks);
        }
    }
    let hooks = timed_out.expect("one of two requests reached the live, slow endpoint");
    assert!(
        hooks.ends_with(&format!(
            "upstream_request_filter request_body(0) upstream_failure(timeout,pool#{}@{live},final) response_filter",
            if hooks.contains("connect_error") { 2 } else { 1 }
        )),
        "{hooks}"
    );
}

/// One route `r` on `/` to the pool of `upstream`, with the test-only `probe` plugin.
fn probe_route(upstream: &MockServer) -> String {
    format!(
        "{}\n[upstreams.pool]\nendpoints = [\"{}\"]\n[plugins.probe]\ntype = \"probe\"\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"pool\"\nplugins = [\"probe\"]\n",
        server(""),
        upstream.addr(),
    )
}

/// The body hooks, seen by the `probe` plugin: `request_body` gets the request body on its way
/// upstream (the upstream still receives it whole), `response_body` the endpoint's body on its
/// way to the client, and may change it (then the response goes out chunked).
#[tokio::test]
async fn body_hooks_see_and_may_change_bodies() {
    let a = mock("a").await;
    let gw = Gateway::start(&probe_route(&a)).await;
    let resp = client()
        .post(gw.url("/upload"))
        .header("x-probe-body", "append")
        .body("hello probe")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("content-length").is_none());
    let hooks = resp.headers()["x-probe-hooks"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(hooks.contains("request_body(11)"), "{hooks}");
    let body = resp.text().await.unwrap();
    let (json_part, tail) = body.rsplit_once('\n').unwrap();
    assert_eq!(
        tail,
        format!("[probe] response_body bytes={}", json_part.len())
    );
    let doc: serde_json::Value = serde_json::from_str(json_part).unwrap();
    assert_eq!(doc["body_bytes"], 11);
    assert_eq!(a.requests()[0].body, b"hello probe");
}

/// The cache hooks, seen by the `probe` plugin: a plugin turns Pingora's cache on in
/// `request_cache`, keys it in `cache_key` and stores in `response_cache`; the next request is
/// answered from the store (`cache_hit`) without reaching the upstream, and the gateway counts
/// both lookups in `sallyport_cache_lookups_total`.
#[tokio::test]
async fn cache_hooks_let_a_plugin_answer_from_a_store() {
    let a = mock("a").await;
    let gw = Gateway::start(&probe_route(&a)).await;
    let gw = &gw;
    let get = |path: &'static str| async move {
        let resp = client()
            .get(gw.url(path))
            .header("x-probe-cache", "on")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let hooks = resp.headers()["x-probe-hooks"]
            .to_str()
            .unwrap()
            .to_string();
        (hooks, resp.text().await.unwrap())
    };
    let (first, first_body) = get("/items/1").await;
    assert!(
        first.starts_with("request_filter request_cache cache_key upstream_request_filter"),
        "{first}"
    );
    assert!(first.contains("response_cache"), "{first}");
    let (second, second_body) = get("/items/1").await;
    assert_eq!(
        second, "request_filter request_cache cache_key cache_hit(fresh=true) response_filter",
        "a hit never goes upstream"
    );
    assert_eq!(second_body, first_body);
    assert_eq!(a.requests().len(), 1);
    // Another path is another entry.
    let (other, _) = get("/items/2").await;
    assert!(!other.contains("cache_hit"), "{other}");
    assert_eq!(a.requests().len(), 2);

    // Without the plugin turning it on, nothing is looked up.
    let plain = client().get(gw.url("/items/1")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(a.requests().len(), 3);

    for (result, n) in [("miss", 2.0), ("hit", 1.0)] {
        let series = format!("sallyport_cache_lookups_total{{result=\"{result}\",route=\"r\"}}");
        assert_eq!(gw.metric_value(&series).await, n, "{series}");
    }
}
