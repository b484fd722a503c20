//! The `trace` and `strip_headers` plugins through the real gateway: what the upstream
//! received and what the client got.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use support::*;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn gateway(up: &MockServer) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.trace]\ntype = \"trace\"\n\
         [plugins.strip]\ntype = \"strip_headers\"\nrequest = [\"x-user-id\", \"X-Internal-*\"]\nresponse = [\"server\", \"x-powered-by\", \"x-internal-*\"]\n\
         [[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        server("plugins = [\"trace\", \"strip\"]"),
        up.addr()
    );
    Gateway::start(&config).await
}

fn is_traceparent(v: &str) -> bool {
    sallyport_plugins::trace::parse_traceparent(v.as_bytes()).is_some_and(|p| p.version == 0)
}

#[tokio::test]
async fn strip_lists_apply_both_ways() {
    let up = mock("app").await;
    let gw = gateway(&up).await;
    let resp = client()
        .get(gw.url("/echo"))
        .header("x-user-id", "admin")
        .header("x-internal-token", "secret")
        .header("X-Internal-Other", "secret")
        .header("x-internalish", "kept")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The mock sets server, x-powered-by and x-internal-debug: all gone.
    for h in ["server", "x-powered-by", "x-internal-debug"] {
        assert!(resp.headers().get(h).is_none(), "{h} leaked to the client");
    }
    assert_eq!(resp.headers()["x-mock-name"], "app");
    let got = &up.requests()[0];
    assert_eq!(got.header("x-user-id"), None);
    assert_eq!(got.header("x-internal-token"), None);
    assert_eq!(got.header("x-internal-other"), None);
    assert_eq!(got.header("x-internalish"), Some("kept"));
    assert_eq!(got.header("accept"), Some("application/json"));
}

#[tokio::test]
async fn strip_applies_to_gateway_errors_too() {
    let up = mock("app").await;
    let gw = gateway(&up).await;
    let resp = raw_get(gw.addr, "/../x", &[]).await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("server"), None);
}

#[tokio::test]
async fn valid_traceparent_keeps_trace_id_with_new_parent() {
    let up = mock("app").await;
    let gw = gateway(&up).await;
    let resp = client()
        .get(gw.url("/echo"))
        .header("traceparent", VALID)
        .header("tracestate", "vendor=abc")
        .send()
        .await
        .unwrap();
    let echoed = resp.headers()["traceparent"].to_str().unwrap().to_string();
    let got = &up.requests()[0];
    let sent = got.header("traceparent").unwrap();
    assert!(is_traceparent(sent), "{sent}");
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
    assert!(!sent.contains("00f067aa0ba902b7"), "new parent-id: {sent}");
    assert!(sent.ends_with("-01"), "flags kept: {sent}");
    assert_eq!(got.header("tracestate"), Some("vendor=abc"));
    assert_eq!(echoed, sent, "the client sees the gateway's span");
}

#[tokio::test]
async fn malformed_or_absent_traceparent_is_replaced() {
    let up = mock("app").await;
    let gw = gateway(&up).await;
    let c = client();
    let cases: Vec<Option<String>> = vec![
        None,
        Some("garbage".into()),
        Some(VALID.to_uppercase()),
        Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01".into()),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into()),
        Some(format!("{VALID}-extra")),
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut req = c
            .get(gw.url(&format!("/echo/{i}")))
            .header("tracestate", "dropped=1");
        if let Some(tp) = case {
            req = req.header("traceparent", tp.as_str());
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
        let got = up.requests().pop().unwrap();
        let sent = got.header("traceparent").unwrap();
        assert!(is_traceparent(sent), "{case:?} -> {sent}");
        assert!(
            !sent.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{case:?} -> {sent}"
        );
        assert_eq!(
            got.header("tracestate"),
            None,
            "tracestate dropped with an invalid parent: {case:?}"
        );
    }
    // A higher version with extra fields is understood and forwarded as version 00.
    c.get(gw.url("/echo/v"))
        .header(
            "traceparent",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
        )
        .send()
        .await
        .unwrap();
    let sent = up
        .requests()
        .pop()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_string();
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{sent}"
    );
}

#[tokio::test]
async fn request_ids_are_kept_when_sane_and_echoed_everywhere() {
    let up = mock("app").await;
    let gw = gateway(&up).await;
    let c = client();
    let resp = c
        .get(gw.url("/echo"))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    assert_eq!(up.requests()[0].header("x-request-id"), Some("req-123"));

    let resp = c
        .get(gw.url("/echo"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(up.requests()[1].header("x-request-id"), Some(id.as_str()));

    // Errors carry it in the body and the header.
    let resp = raw_get(gw.addr, "/a/%zz", &[("x-request-id", "err-7")]).await;
    assert_eq!(resp.header("x-request-id"), Some("err-7"));
    assert_eq!(resp.json()["error"]["request_id"], "err-7");
    let log = gw.access_log_lines(3).await;
    let ids: Vec<&str> = log
        .iter()
        .filter_map(|l| l["request_id"].as_str())
        .collect();
    assert!(
        ids.contains(&"req-123") && ids.contains(&"err-7"),
        "{ids:?}"
    );
}

/// W3C Trace Context 3.3.1 (tracestate header) and 3.5 (mutating tracestate): an invalid
/// `tracestate` is dropped whole; a valid one, on one line or several, is passed on in order.
#[tokio::test]
async fn tracestate_is_validated_and_several_lines_are_one_list() {
    let up = mock("app").await;
    let gw = gateway(&up).await;
    let long_key = format!("a{}=v", "b".repeat(256));
    let too_many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
    let too_many = too_many.join(",");
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["vendor=abc"], Some("vendor=abc")),
        (vec!["a=1", "b=2"], Some("a=1,b=2")),
        (vec!["a=1,,b=2"], Some("a=1,b=2")),
        (vec!["tenant@sys=x,k=y"], Some("tenant@sys=x,k=y")),
        (vec!["Vendor=abc"], None),
        (vec!["a=1", "a=2"], None),
        (vec!["a=1,b"], None),
        (vec!["a=x=y"], None),
        (vec!["t@Sys=1"], None),
        (vec![long_key.as_str()], None),
        (vec![too_many.as_str()], None),
    ];
    let mut sent_lines = Vec::new();
    for (i, (lines, want)) in cases.iter().enumerate() {
        let mut head = format!(
            "GET /echo/ts{i} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\ntraceparent: {VALID}\r\n"
        );
        for l in lines {
            head.push_str(&format!("tracestate: {l}\r\n"));
        }
        head.push_str("\r\n");
        assert_eq!(raw(gw.addr, head.as_bytes()).await.status, 200);
        let got = up.requests().pop().unwrap();
        assert_eq!(got.header("tracestate"), *want, "{lines:?}");
        sent_lines.push(got.header("traceparent").map(str::to_string));
    }
    assert!(
        sent_lines.iter().all(|tp| tp
            .as_deref()
            .is_some_and(|t| t.contains("4bf92f3577b34da6a3ce929d0e0e4736"))),
        "an invalid tracestate does not invalidate the traceparent: {sent_lines:?}"
    );
}

async fn behind_proxy(up: &MockServer, extra: &str) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        server(&format!("trusted_proxies = [\"127.0.0.1/32\"]\n{extra}")),
        up.addr()
    );
    Gateway::start(&config).await
}

async fn logged_client(gw: &Gateway, path: &str) -> String {
    eventually(
        std::time::Duration::from_secs(5),
        &format!("an access-log line for {path}"),
        || async {
            let line = gw.access_log().into_iter().find(|l| l["path"] == path)?;
            Some(line["client"].as_str().unwrap_or_default().to_string())
        },
    )
    .await
}

/// RFC 9110 5.3: several X-Forwarded-For field lines are one list. A client-supplied first
/// line must not win over the line a load balancer appended; the whole chain goes upstream.
#[tokio::test]
async fn every_forwarded_for_line_counts_and_the_whole_chain_is_forwarded() {
    let up = mock("app").await;
    let gw = behind_proxy(&up, "").await;
    let two_lines = "GET /two HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                     X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n";
    assert_eq!(raw(gw.addr, two_lines.as_bytes()).await.status, 200);
    let one_line = "GET /one HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                    X-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\r\n";
    assert_eq!(raw(gw.addr, one_line.as_bytes()).await.status, 200);
    assert_eq!(logged_client(&gw, "/two").await, "5.6.7.8");
    assert_eq!(logged_client(&gw, "/one").await, "5.6.7.8");
    let got = up.requests();
    for r in &got {
        assert_eq!(
            r.header_all("x-forwarded-for"),
            ["1.2.3.4, 5.6.7.8, 127.0.0.1"],
            "{}",
            r.uri
        );
    }
}

/// RFC 7239: with `client_ip_header = "forwarded"` the client comes from `Forwarded` alone
/// (never X-Forwarded-For), and this hop is appended to the chain sent upstream.
#[tokio::test]
async fn forwarded_header_names_the_client_when_configured() {
    let up = mock("app").await;
    let gw = behind_proxy(&up, "client_ip_header = \"forwarded\"").await;
    let req = "GET /fwd HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
               Forwarded: for=1.2.3.4\r\nForwarded: for=\"[2001:db8::17]:4711\";proto=https\r\n\
               X-Forwarded-For: 6.6.6.6\r\n\r\n";
    assert_eq!(raw(gw.addr, req.as_bytes()).await.status, 200);
    assert_eq!(logged_client(&gw, "/fwd").await, "2001:db8::17");
    let got = up.requests().pop().unwrap();
    assert_eq!(
        got.header("forwarded"),
        Some("for=1.2.3.4, for=\"[2001:db8::17]:4711\";proto=https, for=127.0.0.1;proto=http;host=\"localhost\"")
    );
    let (code, _, err) =
        check("[server]\nlisten = [\"127.0.0.1:8080\"]\nclient_ip_header = \"x-real-ip\"\n");
    assert_eq!(code, 1);
    assert!(err.contains("server.client_ip_header"), "{err}");
}

/// The worked example plugin through the real gateway: the header reaches the client, and the
/// metric it registers for itself (`BuildEnv::registry`) keeps counting across a reload that
/// builds the plugin again.
#[tokio::test]
async fn example_header_sets_its_header_and_counts_across_reloads() {
    let up = mock("app").await;
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.served-by]\ntype = \"example_header\"\nname = \"x-served-by\"\nvalue = \"edge-1\"\n\
         [plugins.to-upstream]\ntype = \"example_header\"\nname = \"x-gateway\"\nvalue = \"sallyport\"\non = \"upstream\"\n\
         [[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\nplugins = [\"served-by\", \"to-upstream\"]\n",
        server(""),
        up.addr()
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    for i in 0..3 {
        let r = c.get(gw.url(&format!("/x/{i}"))).send().await.unwrap();
        assert_eq!(r.headers()["x-served-by"], "edge-1");
        assert!(r.headers().get("x-gateway").is_none());
    }
    assert!(up
        .requests()
        .iter()
        .all(|r| r.header("x-gateway") == Some("sallyport")));
    assert_eq!(gw.reload().await, "ok");
    c.get(gw.url("/after")).send().await.unwrap();
    let series = "sallyport_example_header_set_total{plugin=\"served-by\"}";
    assert_eq!(gw.metric_value(series).await, 4.0);
    assert_eq!(
        gw.metric_value("sallyport_example_header_set_total{plugin=\"to-upstream\"}")
            .await,
        4.0
    );
}
