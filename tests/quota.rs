//! The `quota` and `concurrency` plugins through the real gateway, local store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

async fn gateway(
    up: &MockServer,
    server_extra: &str,
    plugins: &str,
    route_plugins: &str,
) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{plugins}\n\
         [[routes]]\nname = \"limited\"\npath_prefix = \"/limited\"\nupstream = \"app\"\nplugins = [{route_plugins}]\n\
         [[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"app\"\nplugins = [{route_plugins}]\n",
        server(server_extra),
        up.addr()
    );
    Gateway::start(&config).await
}

#[tokio::test]
async fn per_header_quota_with_headers_on_every_response() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "",
        "[plugins.per-client]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = 3\nwindow = \"1h\"\nlegacy_headers = true\n",
        "\"per-client\"",
    )
    .await;
    let c = client();
    for remaining in [2, 1, 0] {
        let r = c
            .get(gw.url("/limited/x"))
            .header("x-client", "a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"per-client\";q=3;w=3600");
        let rl = r.headers()["ratelimit"].to_str().unwrap().to_string();
        assert!(
            rl.starts_with(&format!("\"per-client\";r={remaining};t=")),
            "{rl}"
        );
        assert_eq!(r.headers()["x-ratelimit-limit"], "3");
        assert_eq!(
            r.headers()["x-ratelimit-remaining"],
            remaining.to_string().as_str()
        );
    }
    let r = c
        .get(gw.url("/limited/x"))
        .header("x-client", "a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The sliding window frees a slot once a third of the 3 requests has aged out: somewhere
    // within the next two windows, and the RateLimit reset says the same.
    assert!((1..=7200).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        r.headers()["ratelimit"].to_str().unwrap(),
        format!("\"per-client\";r=0;t={retry}")
    );
    let body = json(r).await;
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another client has its own quota; the rejected request never reached the upstream.
    assert_eq!(
        c.get(gw.url("/limited/x"))
            .header("x-client", "b")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(up.requests().len(), 4);
    let m = gw.metrics().await;
    assert!(m.contains("sallyport_quota_decisions_total{decision=\"allowed\",plugin=\"per-client\",route=\"limited\"} 4"), "{m}");
    assert!(m.contains("sallyport_quota_decisions_total{decision=\"rejected\",plugin=\"per-client\",route=\"limited\"} 1"), "{m}");
    assert!(m.contains("sallyport_plugin_rejections_total{plugin=\"per-client\",reason=\"rate_limited\",route=\"limited\"} 1"), "{m}");
}

#[tokio::test]
async fn missing_key_policies() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "",
        "[plugins.q-ip]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = 1\nwindow = \"1h\"\n\
         [plugins.q-401]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = 1\nwindow = \"1h\"\nmissing_key = \"unauthorized\"\n\
         [[routes]]\nname = \"strict\"\npath_prefix = \"/strict\"\nupstream = \"app\"\nplugins = [\"q-401\"]\n",
        "\"q-ip\"",
    )
    .await;
    let c = client();
    // Without the header, clients are counted per address: never one shared empty-key bucket.
    assert_eq!(
        c.get(gw.url("/limited/1")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(gw.url("/limited/2")).send().await.unwrap().status(),
        429
    );
    assert_eq!(
        c.get(gw.url("/limited/3"))
            .header("x-client", "k")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c.get(gw.url("/strict/1")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn per_ip_uses_forwarded_for_only_from_trusted_proxies() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "trusted_proxies = [\"127.0.0.1\"]",
        "[plugins.per-ip]\ntype = \"quota\"\nkey = \"ip\"\nlimit = 2\nwindow = \"1h\"\n",
        "\"per-ip\"",
    )
    .await;
    let c = client();
    let hit = |ip: &'static str| {
        let c = c.clone();
        let url = gw.url("/limited/x");
        async move {
            c.get(url)
                .header("x-forwarded-for", ip)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        [
            hit("203.0.113.1").await,
            hit("203.0.113.1").await,
            hit("203.0.113.1").await
        ],
        [200, 200, 429]
    );
    assert_eq!(
        hit("203.0.113.2").await,
        200,
        "a different client behind the proxy"
    );
    // A spoofed chain: only the hop the trusted proxy saw counts.
    assert_eq!(hit("1.1.1.1, 203.0.113.1").await, 429);
}

#[tokio::test]
async fn combined_key_route_and_header() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "",
        "[plugins.per-route-client]\ntype = \"quota\"\nkey = [\"route\", \"header:x-client\"]\nlimit = 1\nwindow = \"1h\"\n",
        "\"per-route-client\"",
    )
    .await;
    let c = client();
    let get = |path: &str| c.get(gw.url(path)).header("x-client", "a").send();
    assert_eq!(get("/limited/1").await.unwrap().status(), 200);
    assert_eq!(get("/limited/2").await.unwrap().status(), 429);
    assert_eq!(
        get("/other/1").await.unwrap().status(),
        200,
        "the same client on another route"
    );
}

#[tokio::test]
async fn bad_quota_config_is_reported_with_paths() {
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[plugins.q]\ntype = \"quota\"\nlimit = 0\nkey = [\"ip\", \"cookie:x\"]\nstore = \"redis\"\n",
    );
    assert_eq!(code, 1);
    for path in ["plugins.q.limit", "plugins.q.key[1]", "plugins.q.redis_url"] {
        assert!(err.contains(path), "{path} missing in {err}");
    }
}

#[tokio::test]
async fn concurrency_limit_is_a_bulkhead() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "",
        "[plugins.bulkhead]\ntype = \"concurrency\"\nlimit = 2\n",
        "\"bulkhead\"",
    )
    .await;
    let c = client();
    let slow: Vec<_> = (0..2)
        .map(|i| {
            let (c, url) = (c.clone(), gw.url(&format!("/limited/slow{i}")));
            tokio::spawn(async move {
                c.get(url)
                    .header("x-mock-delay", "600ms")
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    // Wait until both slow requests hold their slots at the upstream.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while up.requests().len() < 2 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let r = c.get(gw.url("/other/fast")).send().await.unwrap();
    assert_eq!(r.status(), 503, "the instance is shared by both routes");
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(json(r).await["error"]["code"], "overloaded");
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    // Slots are given back when responses complete.
    assert_eq!(
        c.get(gw.url("/other/fast")).send().await.unwrap().status(),
        200
    );
}
