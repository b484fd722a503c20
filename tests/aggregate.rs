//! The `aggregate` plugin through the real gateway with real upstreams: parallel calls,
//! deadlines, partial answers, shaping, identity and trace propagation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{Duration, Instant};

use support::*;

struct Fixture {
    gw: Gateway,
    users: MockServer,
    orders: MockServer,
    recs: MockServer,
}

async fn fixture(latency_ms: [u64; 3], plugins: &str) -> Fixture {
    let start = |name: &str, ms: u64| {
        MockServer::start(MockConfig {
            name: name.into(),
            latency: Duration::from_millis(ms),
            ..MockConfig::default()
        })
    };
    let users = start("users", latency_ms[0]).await.unwrap();
    let orders = start("orders", latency_ms[1]).await.unwrap();
    let recs = start("recs", latency_ms[2]).await.unwrap();
    let config = format!(
        "{}\n[upstreams.users]\nendpoints = [\"{}\"]\n[upstreams.orders]\nendpoints = [\"{}\"]\n[upstreams.recs]\nendpoints = [\"{}\"]\n\
         [plugins.trace]\ntype = \"trace\"\n{plugins}\n",
        server("plugins = [\"trace\"]"),
        users.addr(),
        orders.addr(),
        recs.addr()
    );
    let gw = Gateway::start(&config).await;
    Fixture {
        gw,
        users,
        orders,
        recs,
    }
}

const DASHBOARDS: &str = r#"
[plugins.web]
type = "aggregate"
timeout = "800ms"
calls = [
  { name = "user", upstream = "users", path = "/users/{path.id}", required = true, timeout = "500ms" },
  { name = "orders", upstream = "orders", path = "/orders?user={path.id}&limit=5" },
  { name = "recommendations", upstream = "recs", path = "/recs/{path.id}", timeout = "300ms" },
]
[plugins.mobile]
type = "aggregate"
timeout = "800ms"
calls = [
  { name = "user", upstream = "users", path = "/users/{path.id}", required = true, select = ["name"] },
  { name = "orders", upstream = "orders", path = "/orders?user={path.id}&limit=5", extract = "items", limit = 2, select = ["id", "total"], rename = { total = "amount" } },
]
[[routes]]
name = "web-dashboard"
path = "/api/web/users/{id}/dashboard"
methods = ["GET"]
plugins = ["web"]
[[routes]]
name = "mobile-dashboard"
path = "/api/mobile/users/{id}/dashboard"
methods = ["GET"]
plugins = ["mobile"]
"#;

#[tokio::test]
async fn calls_run_in_parallel_and_keys_keep_config_order() {
    let f = fixture([200, 200, 200], DASHBOARDS).await;
    let c = client();
    let started = Instant::now();
    let resp = c
        .get(f.gw.url("/api/web/users/42/dashboard"))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-aggregate-complete"], "true");
    let text = resp.text().await.unwrap();
    assert!(
        took < Duration::from_millis(500),
        "three 200 ms calls took {took:?}"
    );
    let (u, o, r, w) = (
        text.find("\"user\"").unwrap(),
        text.find("\"orders\"").unwrap(),
        text.find("\"recommendations\"").unwrap(),
        text.find("\"warnings\"").unwrap(),
    );
    assert!(u < o && o < r && r < w, "config order: {text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["user"]["id"], "42");
    assert_eq!(body["orders"]["items"].as_array().unwrap().len(), 5);
    assert_eq!(body["recommendations"]["items"][0]["title"], "Item 1");
    assert_eq!(body["warnings"], serde_json::json!([]));
    assert_eq!(f.users.requests()[0].uri, "/users/42");
    assert_eq!(f.orders.requests()[0].uri, "/orders?user=42&limit=5");
}

#[tokio::test]
async fn mobile_shape_is_slimmer() {
    let f = fixture([0, 0, 0], DASHBOARDS).await;
    let body = json(
        client()
            .get(f.gw.url("/api/mobile/users/7/dashboard"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        body,
        serde_json::json!({
            "user": {"name": "User 7"},
            "orders": [{"id": "o-1", "amount": 12.5}, {"id": "o-2", "amount": 15.0}],
            "warnings": []
        })
    );
    assert!(f.recs.requests().is_empty());
}

#[tokio::test]
async fn optional_timeout_gives_partial_answer_with_warning() {
    // recs takes 600 ms, its call deadline is 300 ms.
    let f = fixture([0, 0, 600], DASHBOARDS).await;
    let started = Instant::now();
    let resp = client()
        .get(f.gw.url("/api/web/users/1/dashboard"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "late call cancelled at its deadline"
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-aggregate-complete"], "false");
    let body = json(resp).await;
    assert_eq!(body["recommendations"], serde_json::Value::Null);
    assert_eq!(
        body["warnings"],
        serde_json::json!([{"call": "recommendations", "code": "timeout"}])
    );
    assert_eq!(body["user"]["id"], "1");
    let m = f.gw.metrics().await;
    assert!(m.contains("sallyport_aggregate_calls_total{call=\"recommendations\",outcome=\"timeout\",route=\"web-dashboard\"} 1"), "{m}");
    assert!(m.contains("sallyport_aggregate_calls_total{call=\"user\",outcome=\"ok\",route=\"web-dashboard\"} 1"), "{m}");
    let log = f.gw.access_log_lines(1).await;
    let calls = log[0]["calls"].as_array().unwrap();
    assert_eq!(calls[2]["call"], "recommendations");
    assert_eq!(calls[2]["outcome"], "timeout");
    assert!(calls[0]["ms"].as_f64().is_some());
}

#[tokio::test]
async fn required_call_failure_fails_the_request() {
    // users too slow for its 500 ms deadline: 504 naming the call.
    let f = fixture([700, 0, 0], DASHBOARDS).await;
    let resp = client()
        .get(f.gw.url("/api/web/users/1/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(body["error"]["message"].as_str().unwrap().contains("user"));

    // users answering 500: 502.
    let users = MockServer::start(MockConfig {
        name: "users".into(),
        status: 500,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let config = format!(
        "{}\n[upstreams.users]\nendpoints = [\"{}\"]\n[upstreams.orders]\nendpoints = [\"{}\"]\n[upstreams.recs]\nendpoints = [\"{}\"]\n{DASHBOARDS}",
        server(""),
        users.addr(),
        f.orders.addr(),
        f.recs.addr()
    );
    let gw = Gateway::start(&config).await;
    let resp = client()
        .get(gw.url("/api/web/users/1/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(json(resp).await["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn html_garbage_oversized_and_dead_upstreams_are_warnings() {
    let f = fixture(
        [0, 0, 0],
        r#"
[upstreams.dead]
endpoints = ["127.0.0.1:1"]
[plugins.odd]
type = "aggregate"
timeout = "800ms"
max_body = "4KiB"
calls = [
  { name = "html", upstream = "users", path = "/html" },
  { name = "garbage", upstream = "users", path = "/garbage" },
  { name = "big", upstream = "users", path = "/big?bytes=10000" },
  { name = "status", upstream = "users", path = "/x", timeout = "200ms" },
  { name = "dead", upstream = "dead", path = "/x" },
  { name = "missing", upstream = "users", path = "/users/{query.nope}" },
  { name = "fine", upstream = "users", path = "/users/{query.id}" },
]
[[routes]]
name = "odd"
path = "/odd"
plugins = ["odd"]
"#,
    )
    .await;
    let resp = client()
        .get(f.gw.url("/odd?id=..%2Fadmin%3Fx%3D1%23frag"))
        .header("x-mock-status", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = json(resp).await;
    let codes: Vec<(String, String)> = body["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["call"].as_str().unwrap().into(),
                w["code"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expect = |call: &str, code: &str| {
        assert!(
            codes.contains(&(call.into(), code.into())),
            "{call}:{code} in {codes:?}"
        )
    };
    expect("html", "bad_response");
    expect("garbage", "bad_response");
    expect("big", "bad_response");
    expect("dead", "upstream_error");
    expect("missing", "unavailable");
    // The client's x-mock-status is not forwarded (not in forward_headers), so /x answers 200.
    assert!(body["status"].is_object(), "{body}");
    // A query value with ../, ? and # stays one path segment (the mock echoes the raw one).
    assert_eq!(body["fine"]["id"], "..%2Fadmin%3Fx%3D1%23frag");
    let uris: Vec<String> = f.users.requests().iter().map(|r| r.uri.clone()).collect();
    assert!(
        uris.contains(&"/users/..%2Fadmin%3Fx%3D1%23frag".to_string()),
        "{uris:?}"
    );
}

#[tokio::test]
async fn trace_and_request_id_reach_every_call_but_forged_identity_does_not() {
    let f = fixture([0, 0, 0], DASHBOARDS).await;
    let resp = client()
        .get(f.gw.url("/api/web/users/5/dashboard"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-request-id", "agg-1")
        .header("x-user-id", "admin")
        .header("x-tenant-id", "other")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut spans = Vec::new();
    for up in [&f.users, &f.orders, &f.recs] {
        let got = &up.requests()[0];
        let tp = got.header("traceparent").unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        spans.push(tp[36..52].to_string());
        assert_eq!(got.header("x-request-id"), Some("agg-1"));
        assert_eq!(
            got.header("x-user-id"),
            None,
            "forged identity reached a call"
        );
        assert_eq!(got.header("x-tenant-id"), None);
    }
    spans.sort();
    spans.dedup();
    assert_eq!(spans.len(), 3, "a new parent id per call");
}

#[test]
fn config_errors_name_the_call() {
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[upstreams.users]\nendpoints = [\"127.0.0.1:3001\"]\n\
         [plugins.a]\ntype = \"aggregate\"\ntimeout = \"100ms\"\ncalls = [\n\
         { name = \"x\", upstream = \"nope\", path = \"/a\" },\n\
         { name = \"x\", upstream = \"users\", path = \"/a/{cookie.s}\", timeout = \"1s\" },\n]\n",
    );
    assert_eq!(code, 1);
    for path in [
        "plugins.a.calls[0].upstream",
        "plugins.a.calls[1].name",
        "plugins.a.calls[1].path",
        "plugins.a.calls[1].timeout",
    ] {
        assert!(err.contains(path), "{path} missing in {err}");
    }
}

#[tokio::test]
async fn verified_identity_reaches_every_call_and_claims_stay_in_their_segment() {
    const SECRET: &str = "aggregate-test-secret-of-32-bytes!!";
    let f = fixture(
        [0, 0, 0],
        &format!(
            r#"
[plugins.jwt]
type = "jwt"
algorithms = ["HS256"]
secret = "{SECRET}"
forward_claims = {{ sub = "x-user-id", tenant = "x-tenant-id" }}
[plugins.me]
type = "aggregate"
calls = [
  {{ name = "user", upstream = "users", path = "/users/{{claim.sub}}", required = true }},
  {{ name = "orders", upstream = "orders", path = "/orders?user={{claim.sub}}&limit=1" }},
]
[[routes]]
name = "me"
path = "/api/me"
plugins = ["jwt", "me"]
"#
        ),
    )
    .await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "../admin?role=root&x", "tenant": "acme", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let resp = client()
        .get(f.gw.url("/api/me"))
        .bearer_auth(&token)
        .header("x-user-id", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for (up, uri) in [
        (&f.users, "/users/..%2Fadmin%3Frole%3Droot%26x"),
        (
            &f.orders,
            "/orders?user=..%2Fadmin%3Frole%3Droot%26x&limit=1",
        ),
    ] {
        let got = &up.requests()[0];
        assert_eq!(got.uri, uri);
        assert_eq!(got.header("x-user-id"), Some("../admin?role=root&x"));
        assert_eq!(got.header_all("x-user-id").len(), 1);
        assert_eq!(got.header("x-tenant-id"), Some("acme"));
        assert_eq!(
            got.header("authorization"),
            None,
            "the caller's token is not fanned out"
        );
    }
}

#[tokio::test]
async fn pool_timeouts_count_as_timeouts_and_dot_values_never_climb() {
    let users = MockServer::start(MockConfig {
        name: "users".into(),
        latency: Duration::from_millis(400),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let config = format!(
        "{}\n[upstreams.users]\nendpoints = [\"{}\"]\nread_timeout = \"100ms\"\n\
         [plugins.a]\ntype = \"aggregate\"\ntimeout = \"900ms\"\ncalls = [\n\
         {{ name = \"user\", upstream = \"users\", path = \"/users/{{query.u}}\", required = true }},\n]\n\
         [[routes]]\nname = \"a\"\npath = \"/a\"\nplugins = [\"a\"]\n",
        server(""),
        users.addr()
    );
    let gw = Gateway::start(&config).await;
    let resp = client().get(gw.url("/a?u=7")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        504,
        "the pool's read_timeout is a timeout, not an upstream error"
    );
    let body = json(resp).await;
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1"),
        "no internal addresses"
    );
    for bad in ["..", ".", "", "%2E%2E"] {
        let resp = client()
            .get(gw.url(&format!("/a?u={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "u={bad}");
    }
    assert!(
        users.requests().iter().all(|r| !r.uri.contains("..")),
        "{:?}",
        users.requests()
    );
}

/// Calls to a consistent-hash pool hash on the client request's key (here a header), so a
/// user's aggregate calls land on the endpoint their proxied requests land on; before, every
/// call hashed an empty key and one endpoint took all of them.
#[tokio::test]
async fn calls_to_a_hashing_pool_follow_the_clients_key() {
    let (a, b, c) = (mock("a").await, mock("b").await, mock("c").await);
    let config = format!(
        "{}\n[upstreams.sharded]\nendpoints = [\"{}\", \"{}\", \"{}\"]\nbalance = \"consistent_hash\"\nhash_key = \"header:x-user-id\"\n\
         [plugins.agg]\ntype = \"aggregate\"\ncalls = [{{ name = \"profile\", upstream = \"sharded\", path = \"/profile\" }}]\n\
         [[routes]]\nname = \"agg\"\npath = \"/agg\"\nplugins = [\"agg\"]\n\
         [[routes]]\nname = \"direct\"\npath_prefix = \"/direct\"\nupstream = \"sharded\"\n",
        server(""),
        a.addr(),
        b.addr(),
        c.addr()
    );
    let gw = Gateway::start(&config).await;
    let cl = client();
    let mut owners = std::collections::BTreeSet::new();
    for user in ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"] {
        let direct = cl
            .get(gw.url("/direct/x"))
            .header("x-user-id", user)
            .send()
            .await
            .unwrap();
        let owner = direct.headers()["x-mock-name"]
            .to_str()
            .unwrap()
            .to_string();
        for _ in 0..3 {
            let body = json(
                cl.get(gw.url("/agg"))
                    .header("x-user-id", user)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(body["profile"]["service"], owner.as_str(), "{user}: {body}");
        }
        owners.insert(owner);
    }
    assert!(owners.len() >= 2, "users spread over endpoints: {owners:?}");
}
