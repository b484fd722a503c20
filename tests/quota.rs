//! The `quota` and `concurrency` plugins through the real gateway, local store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

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
    eventually(
        std::time::Duration::from_secs(5),
        "both slow requests reach the upstream",
        || std::future::ready((up.requests().len() >= 2).then_some(())),
    )
    .await;
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

/// A config with the given plugin tables and routes on one upstream.
fn config(up: &MockServer, plugins: &str, routes: &[(&str, &str)]) -> String {
    let mut c = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n{plugins}\n",
        server(""),
        up.addr()
    );
    for (name, plugins) in routes {
        c.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"app\"\nplugins = [{plugins}]\n"
        ));
    }
    c
}

fn all(r: &reqwest::Response, name: &str) -> Vec<String> {
    r.headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn per_claim_quota_with_the_jwt_plugin() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let up = mock("app").await;
    let gw = Gateway::start(&config(
        &up,
        &format!(
            "[plugins.jwt]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\n\
             [plugins.per-user]\ntype = \"quota\"\nkey = [\"route\", \"claim:sub\"]\nlimit = 2\nwindow = \"1h\"\nmissing_key = \"unauthorized\"\n"
        ),
        &[("orders", "\"jwt\", \"per-user\""), ("users", "\"jwt\", \"per-user\"")],
    ))
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |claims: serde_json::Value| {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let (alice, bob) = (
        token(serde_json::json!({"sub": "alice", "exp": exp})),
        token(serde_json::json!({"sub": "bob", "exp": exp})),
    );
    let c = client();
    let get = |path: &'static str, token: String| {
        c.get(gw.url(path))
            .header("authorization", format!("Bearer {token}"))
            .send()
    };
    assert_eq!(get("/orders/1", alice.clone()).await.unwrap().status(), 200);
    assert_eq!(get("/orders/2", alice.clone()).await.unwrap().status(), 200);
    let r = get("/orders/3", alice.clone()).await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Same address, another subject: its own quota; same subject on another route: too.
    assert_eq!(get("/orders/4", bob).await.unwrap().status(), 200);
    assert_eq!(get("/users/1", alice).await.unwrap().status(), 200);
    // A verified token without the claim gets 401, never a shared bucket.
    let r = get("/orders/5", token(serde_json::json!({"exp": exp})))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(json(r).await["error"]["code"], "unauthorized");
    assert_eq!(
        gw.metric_value("sallyport_plugin_rejections_total{plugin=\"per-user\",reason=\"missing_key\",route=\"orders\"}")
            .await,
        1.0
    );
    assert_eq!(up.requests().len(), 4);
}

#[tokio::test]
async fn per_consumer_quota_with_key_auth() {
    use sha2::Digest;
    let hash = |k: &str| -> String {
        sha2::Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let up = mock("app").await;
    let gw = Gateway::start(&config(
        &up,
        &format!(
            "[plugins.keys]\ntype = \"key_auth\"\nheader = \"x-api-key\"\n\
             keys = [{{ consumer = \"mobile\", sha256 = \"{}\" }}, {{ consumer = \"partner\", sha256 = \"{}\" }}]\n\
             [plugins.per-consumer]\ntype = \"quota\"\nkey = \"api_key\"\nlimit = 1\nwindow = \"1h\"\n",
            hash("k-mobile"),
            hash("k-partner")
        ),
        &[("api", "\"keys\", \"per-consumer\"")],
    ))
    .await;
    let c = client();
    let get = |key: &'static str| c.get(gw.url("/api/x")).header("x-api-key", key).send();
    assert_eq!(get("k-mobile").await.unwrap().status(), 200);
    assert_eq!(get("k-mobile").await.unwrap().status(), 429);
    let r = get("k-partner").await.unwrap();
    assert_eq!(r.status(), 200, "another consumer from the same address");
    assert_eq!(all(&r, "ratelimit-policy"), ["\"per-consumer\";q=1;w=3600"]);
}

#[tokio::test]
async fn two_quotas_on_one_route_report_both_policies() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(
        &up,
        "[plugins.per-route]\ntype = \"quota\"\nkey = \"route\"\nlimit = 5\nwindow = \"1h\"\nlegacy_headers = true\n\
         [plugins.per-client]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = 2\nwindow = \"1m\"\nlegacy_headers = true\n",
        &[("api", "\"per-route\", \"per-client\"")],
    ))
    .await;
    let c = client();
    let get = |who: &'static str| c.get(gw.url("/api/x")).header("x-client", who).send();
    let r = get("a").await.unwrap();
    assert_eq!(r.status(), 200);
    let mut policies = all(&r, "ratelimit-policy");
    policies.sort();
    assert_eq!(
        policies,
        ["\"per-client\";q=2;w=60", "\"per-route\";q=5;w=3600"]
    );
    let limits = all(&r, "ratelimit");
    assert_eq!(limits.len(), 2, "{limits:?}");
    assert!(limits.iter().any(|l| l.starts_with("\"per-route\";r=4;t=")));
    assert!(limits
        .iter()
        .any(|l| l.starts_with("\"per-client\";r=1;t=")));
    // The legacy triple reports the most restrictive quota.
    assert_eq!(r.headers()["x-ratelimit-limit"], "2");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "1");

    assert_eq!(get("a").await.unwrap().status(), 200);
    // The per-client quota refuses; the per-route one has counted it and still reports.
    let r = get("a").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let limits = all(&r, "ratelimit");
    assert!(limits.iter().any(|l| l.starts_with("\"per-route\";r=2;t=")));
    assert!(limits
        .iter()
        .any(|l| l.starts_with("\"per-client\";r=0;t=")));
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    // Another client exhausts the route's quota: now the per-route quota refuses first.
    assert_eq!(get("b").await.unwrap().status(), 200);
    assert_eq!(get("b").await.unwrap().status(), 200);
    let r = get("b").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        all(&r, "ratelimit"),
        ["\"per-route\";r=0;t=".to_string() + r.headers()["retry-after"].to_str().unwrap()]
    );
    assert_eq!(up.requests().len(), 4);
}

#[tokio::test]
async fn reload_keeps_quota_counters_and_bulkhead_slots() {
    let up = mock("app").await;
    let plugins = |limit: u32| {
        format!(
            "[plugins.q]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = {limit}\nwindow = \"1h\"\n\
             [plugins.bulkhead]\ntype = \"concurrency\"\nlimit = 1\n"
        )
    };
    let routes = [("limited", "\"q\""), ("slow", "\"bulkhead\"")];
    let gw = Gateway::start(&config(&up, &plugins(2), &routes)).await;
    let c = client();
    let limited = || c.get(gw.url("/limited/x")).header("x-client", "a").send();
    assert_eq!(limited().await.unwrap().status(), 200);
    assert_eq!(limited().await.unwrap().status(), 200);
    assert_eq!(limited().await.unwrap().status(), 429);

    // One slow request holds the bulkhead's only slot across the reload.
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), gw.url("/slow/1"));
        async move {
            c.get(url)
                .header("x-mock-delay", "1500ms")
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    eventually(
        std::time::Duration::from_secs(5),
        "the slow request reaches the upstream",
        || {
            let there = up.requests().iter().any(|r| r.uri.starts_with("/slow"));
            std::future::ready(there.then_some(()))
        },
    )
    .await;
    let in_flight = "sallyport_concurrency_in_flight{plugin=\"bulkhead\"}";
    assert_eq!(gw.metric_value(in_flight).await, 1.0);

    // A reload that changes something else (a new route) keeps both plugins' state.
    let mut more = routes.to_vec();
    more.push(("new", "\"q\""));
    gw.write_config(&config(&up, &plugins(2), &more));
    assert_eq!(gw.reload().await, "ok");
    assert_eq!(
        limited().await.unwrap().status(),
        429,
        "the quota was not reset by the reload"
    );
    let r = c.get(gw.url("/slow/2")).send().await.unwrap();
    assert_eq!(
        r.status(),
        503,
        "the slot taken before the reload still counts"
    );
    assert_eq!(slow.await.unwrap(), 200);
    eventually(
        std::time::Duration::from_secs(5),
        "the slot is given back",
        || async { (gw.metric_value(in_flight).await == 0.0).then_some(()) },
    )
    .await;
    assert_eq!(c.get(gw.url("/slow/3")).send().await.unwrap().status(), 200);

    // Changing the quota itself starts it afresh with the new numbers.
    gw.write_config(&config(&up, &plugins(3), &more));
    assert_eq!(gw.reload().await, "ok");
    let r = limited().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(all(&r, "ratelimit-policy"), ["\"q\";q=3;w=3600"]);
}

#[tokio::test]
async fn concurrency_queue_waits_for_a_slot_then_gives_up() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(
        &up,
        "[plugins.patient]\ntype = \"concurrency\"\nlimit = 1\nqueue = 1\nqueue_timeout = \"10s\"\n\
         [plugins.impatient]\ntype = \"concurrency\"\nlimit = 1\nqueue = 1\nqueue_timeout = \"50ms\"\n",
        &[("patient", "\"patient\""), ("impatient", "\"impatient\"")],
    ))
    .await;
    let c = client();
    let send = |path: String, delay: &'static str| {
        let (c, url) = (c.clone(), gw.url(&path));
        tokio::spawn(async move {
            c.get(url)
                .header("x-mock-delay", delay)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let wait_upstream = |prefix: &'static str| {
        let up = &up;
        async move {
            eventually(
                std::time::Duration::from_secs(5),
                &format!("a request to {prefix} reaches the upstream"),
                || {
                    let there = up.requests().iter().any(|r| r.uri.starts_with(prefix));
                    std::future::ready(there.then_some(()))
                },
            )
            .await
        }
    };
    // patient: one in flight, one queued until it finishes, a third finds the queue full.
    let first = send("/patient/1".into(), "500ms");
    wait_upstream("/patient/1").await;
    let (second, third) = (
        send("/patient/2".into(), "0ms"),
        send("/patient/3".into(), "0ms"),
    );
    let mut rest = [second.await.unwrap(), third.await.unwrap()];
    rest.sort();
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(
        rest,
        [200, 503],
        "one waited for the slot, one found the queue full"
    );

    // impatient: the queued request gives up after queue_timeout, long before the slot frees.
    let slow = send("/impatient/1".into(), "2s");
    wait_upstream("/impatient/1").await;
    let started = std::time::Instant::now();
    let r = c.get(gw.url("/impatient/2")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < std::time::Duration::from_millis(1500));
    assert_eq!(json(r).await["error"]["code"], "overloaded");
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(
        gw.metric_value("sallyport_plugin_rejections_total{plugin=\"impatient\",reason=\"concurrency_limit\",route=\"impatient\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn long_key_values_are_counted_apart() {
    let up = mock("app").await;
    let gw = gateway(
        &up,
        "",
        "[plugins.per-client]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = 1\nwindow = \"1h\"\n",
        "\"per-client\"",
    )
    .await;
    let c = client();
    // 100 KB values that differ only in their last character (stored as digests).
    let (a, b) = ("x".repeat(100_000) + "a", "x".repeat(100_000) + "b");
    let get = |v: &str| c.get(gw.url("/limited/x")).header("x-client", v).send();
    assert_eq!(get(&a).await.unwrap().status(), 200);
    assert_eq!(get(&a).await.unwrap().status(), 429);
    assert_eq!(get(&b).await.unwrap().status(), 200);
}

#[tokio::test]
async fn unsupported_redis_urls_are_refused_at_load() {
    let base = "[server]\nlisten = [\"127.0.0.1:8080\"]\n[plugins.q]\ntype = \"quota\"\nlimit = 1\nstore = \"redis\"\n";
    for url in [
        "rediss://cache.example:6380",
        "http://cache.example",
        "not a url",
    ] {
        let (code, _, err) = check(&format!("{base}redis_url = \"{url}\"\n"));
        assert_eq!(code, 1, "{url}");
        assert!(err.contains("plugins.q.redis_url"), "{url}: {err}");
    }
    let (_, _, err) = check(&format!(
        "{base}redis_url = \"rediss://cache.example:6380\"\n"
    ));
    assert!(err.contains("TLS to Redis is not built in"), "{err}");
}
