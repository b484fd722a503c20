//! DNS service discovery: an endpoint written as a host name is every address the name
//! resolves to, resolved again every `resolve_interval` through the name servers of
//! `server.dns_resolvers` (here a test name server whose answers the test changes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// Three upstreams on one port of three loopback addresses, as a headless Service's pods.
async fn three_pods() -> Vec<sallyport_mock::MockServer> {
    let first = sallyport_mock::MockServer::start_on(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        sallyport_mock::MockConfig {
            name: "pod-1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let port = first.addr().port();
    let mut pods = vec![first];
    for i in 2..=3u8 {
        pods.push(
            sallyport_mock::MockServer::start_on(
                SocketAddr::from(([127, 0, 0, i], port)),
                sallyport_mock::MockConfig {
                    name: format!("pod-{i}"),
                    ..Default::default()
                },
            )
            .await
            .unwrap(),
        );
    }
    pods
}

fn config(dns: &DnsServer, port: u16, extra: &str) -> String {
    format!(
        "{}\n[upstreams.orders]\nendpoints = [\"orders.test:{port}\"]\nresolve_interval = \"1s\"\npreserve_host = false\n{extra}\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/\"\nupstream = \"orders\"\n",
        server(&format!("dns_resolvers = [\"{}\"]", dns.addr)),
    )
}

async fn endpoints(gw: &Gateway) -> f64 {
    gw.metric_value("sallyport_upstream_endpoints{upstream=\"orders\"}")
        .await
}

/// Requests in a loop until stopped: the pods that answered each, and any failure.
fn client_loop(
    url: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Result<String, String>>> {
    tokio::spawn(async move {
        let c = client();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let r = match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => {
                    Ok(r.headers()["x-mock-name"].to_str().unwrap().to_string())
                }
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            seen.push(r);
        }
        seen
    })
}

#[tokio::test]
async fn every_address_of_a_name_is_an_endpoint_and_changes_apply_without_failed_requests() {
    let pods = three_pods().await;
    let port = pods[0].addr().port();
    let dns = DnsServer::start().await;
    dns.set("orders.test", &["127.0.0.1"]);
    let gw = Gateway::start(&config(&dns, port, "")).await;
    assert_eq!(endpoints(&gw).await, 1.0);
    let r = client().get(gw.url("/o")).send().await.unwrap();
    assert_eq!(r.headers()["x-mock-name"], "pod-1");
    // Host (preserve_host = false) names the service, not the address.
    let got = pods[0].requests();
    assert_eq!(
        got.last().unwrap().header("host"),
        Some(format!("orders.test:{port}").as_str())
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = client_loop(gw.url("/o"), Arc::clone(&stop));

    // Scale out: three records, three endpoints, all used.
    dns.set("orders.test", &["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
    eventually(Duration::from_secs(10), "three endpoints", || async {
        (endpoints(&gw).await == 3.0).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "every pod gets requests",
        || async { pods.iter().all(|p| !p.requests().is_empty()).then_some(()) },
    )
    .await;

    // Scale in to the third pod only.
    dns.set("orders.test", &["127.0.0.3"]);
    eventually(Duration::from_secs(10), "one endpoint", || async {
        (endpoints(&gw).await == 1.0).then_some(())
    })
    .await;
    let before: Vec<usize> = pods.iter().map(|p| p.requests().len()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after: Vec<usize> = pods.iter().map(|p| p.requests().len()).collect();
    assert_eq!(
        (after[0], after[1]),
        (before[0], before[1]),
        "removed pods get no new requests"
    );
    assert!(after[2] > before[2], "the remaining pod serves");

    // The name server fails: the last good address stays in use.
    dns.fail(true);
    eventually(
        Duration::from_secs(10),
        "a failed resolution is counted",
        || async {
            (gw.metric_value("sallyport_upstream_resolve_failures_total{upstream=\"orders\"}")
                .await
                >= 2.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(endpoints(&gw).await, 1.0);
    dns.fail(false);

    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    let failed: Vec<_> = seen.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        seen.len()
    );
    let log = gw.stderr();
    assert_eq!(
        log.matches("resolving orders.test failed").count(),
        1,
        "logged once: {log}"
    );
}

#[tokio::test]
async fn a_name_that_does_not_resolve_leaves_its_pool_empty_until_it_does() {
    let pods = three_pods().await;
    let port = pods[0].addr().port();
    let dns = DnsServer::start().await;
    // Ready once the name was tried: one missing Service does not hold every route back.
    let gw = Gateway::start(&config(&dns, port, "")).await;
    assert_eq!(endpoints(&gw).await, 0.0);
    let c = client();
    let r = c.get(gw.url("/o")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(json(r).await["error"]["code"], "unavailable");
    assert!(
        gw.metric_value("sallyport_upstream_resolve_failures_total{upstream=\"orders\"}")
            .await
            >= 1.0
    );

    dns.set("orders.test", &["127.0.0.2"]);
    eventually(Duration::from_secs(10), "the name resolves", || async {
        (endpoints(&gw).await == 1.0).then_some(())
    })
    .await;
    let r = c.get(gw.url("/o")).send().await.unwrap();
    assert_eq!(r.headers()["x-mock-name"], "pod-2");
}

#[tokio::test]
async fn a_reload_keeps_the_resolved_addresses_and_health_of_a_changed_pool() {
    let pods = three_pods().await;
    let port = pods[0].addr().port();
    let dns = DnsServer::start().await;
    dns.set("orders.test", &["127.0.0.1", "127.0.0.2"]);
    let health = "[upstreams.orders.health]\npath = \"/healthz\"\ninterval = \"200ms\"\n";
    let gw = Gateway::start(&config(&dns, port, health)).await;
    assert_eq!(endpoints(&gw).await, 2.0);
    // The name server goes away; a reload that changes the pool (a timeout) keeps what the
    // running pool resolved, checked and healthy, instead of starting empty.
    dns.fail(true);
    gw.write_config(&config(
        &dns,
        port,
        &format!("connect_timeout = \"2s\"\n{health}"),
    ));
    assert_eq!(gw.reload().await, "ok");
    assert_eq!(endpoints(&gw).await, 2.0);
    for _ in 0..4 {
        let r = client().get(gw.url("/o")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test]
async fn bad_names_and_intervals_are_refused_with_their_paths() {
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\ndns_resolvers = [\"not-an-address\"]\n\
         [upstreams.a]\nendpoints = [\"bad_name!:80\", \"ok.internal\", \"[::1]:8080\", \"x.internal:0\"]\nresolve_interval = \"100ms\"\n",
    );
    assert_eq!(code, 1, "{err}");
    for path in [
        "server.dns_resolvers[0]",
        "upstreams.a.endpoints[0]",
        "upstreams.a.endpoints[1]",
        "upstreams.a.endpoints[3]",
        "upstreams.a.resolve_interval",
    ] {
        assert!(err.contains(path), "{path} missing in {err}");
    }
    assert!(!err.contains("endpoints[2]"), "{err}");
}
