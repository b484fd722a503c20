//! Upstream pools through the real gateway: balancing, health checks that eject and re-admit
//! endpoints, retry on connect failure, and the 502/503/504 answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

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
    wait_for(|| async { gw.metric_value(&healthy_b).await == 0.0 }).await;
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
    wait_for(|| async { gw.metric_value(&healthy_b).await == 1.0 }).await;
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
    wait_for(|| async { gw.metric_value(&series).await == 0.0 }).await;
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "unavailable");
    a.set_healthy(true);
    wait_for(|| async { gw.metric_value(&series).await == 1.0 }).await;
    assert_eq!(
        client().get(gw.url("/x")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn connect_failure_retries_another_endpoint_for_idempotent_methods() {
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
    // Round robin alternates: every GET that lands on the dead endpoint is retried on a.
    for i in 0..6 {
        let resp = c.get(gw.url(&format!("/get/{i}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {i}");
    }
    assert_eq!(a.requests().len(), 6);
    // POST is not idempotent: one of two attempts hits the dead endpoint and is not retried.
    let mut statuses = Vec::new();
    for i in 0..2 {
        let resp = c
            .post(gw.url(&format!("/post/{i}")))
            .body("x")
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 502 {
            assert_eq!(json(resp).await["error"]["code"], "upstream_error");
        }
    }
    statuses.sort();
    assert_eq!(statuses, [200, 502]);
    let log = gw.access_log_lines(8).await;
    assert!(
        log.iter().any(|l| l["attempts"] == 2),
        "a retried request logs 2 attempts"
    );
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

/// Polls a condition every 20 ms for up to 10 s.
async fn wait_for<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
