//! OpenTelemetry export through the real gateway to a real OTLP/HTTP receiver started by the
//! test: the protobuf the gateway sends is decoded with the `opentelemetry-proto` types.
//! Attribute names are checked exactly as the HTTP semantic conventions spell them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::support;

use support::*;

const SECRET: &str = "telemetry-test-secret-of-at-least-32-bytes";
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// An OTLP/HTTP receiver: answers 200 to every export and keeps the requests.
async fn collector() -> Origin {
    Origin::start(|_| OriginResponse::new(200, "").header("content-type", "application/x-protobuf"))
        .await
}

/// Every span the collector received, with the resource's service name.
fn spans(c: &Origin) -> Vec<(String, Span)> {
    c.requests()
        .iter()
        .filter(|r| r.uri == "/v1/traces")
        .flat_map(|r| {
            let req = ExportTraceServiceRequest::decode(r.body.as_slice()).unwrap();
            req.resource_spans.into_iter().flat_map(|rs| {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|res| res.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                rs.scope_spans
                    .into_iter()
                    .flat_map(|ss| ss.spans)
                    .map(move |s| (service.clone(), s))
            })
        })
        .collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            Value::DoubleValue(d) => Some(d.to_string()),
            _ => None,
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn gateway(collector_addr: std::net::SocketAddr, upstreams: &str, extra: &str) -> Gateway {
    let config = format!(
        "{}\n{upstreams}\n\
         [telemetry]\notlp_endpoint = \"http://{collector_addr}/v1/traces\"\nservice_name = \"edge-test\"\n{extra}\n\
         [plugins.trace]\ntype = \"trace\"\n\
         [plugins.jwt]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\n\
         [[routes]]\nname = \"app\"\npath_prefix = \"/app\"\nupstream = \"app\"\n\
         [[routes]]\nname = \"secure\"\npath_prefix = \"/secure\"\nupstream = \"app\"\nplugins = [\"jwt\"]\n",
        server("plugins = [\"trace\"]")
    );
    Gateway::start(&config).await
}

async fn wait_spans(c: &Origin, n: usize) -> Vec<(String, Span)> {
    eventually(
        Duration::from_secs(10),
        "the spans are exported",
        || async {
            let s = spans(c);
            (s.len() >= n).then_some(s)
        },
    )
    .await
}

#[tokio::test]
async fn a_proxied_request_is_one_server_span_and_one_client_span_in_the_clients_trace() {
    let col = collector().await;
    let up = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let gw = gateway(
        col.addr,
        &format!("[upstreams.app]\nendpoints = [\"{}\"]", up.addr),
        "",
    )
    .await;
    let r = client()
        .get(gw.url("/app/items?secret=1"))
        .header("traceparent", PARENT)
        .header("user-agent", "otel-test/1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all = wait_spans(&col, 2).await;
    assert!(all.iter().all(|(service, _)| service == "edge-test"));
    let server = &all
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Server as i32)
        .unwrap()
        .1;
    let client_span = &all
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Client as i32)
        .unwrap()
        .1;
    assert_eq!(hex(&server.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&server.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(server.name, "GET app");
    assert_eq!(client_span.trace_id, server.trace_id);
    assert_eq!(client_span.parent_span_id, server.span_id);
    // The service's parent is the CLIENT span: the id sent upstream in traceparent.
    let sent = up.requests()[0].header("traceparent").unwrap().to_string();
    assert_eq!(sent.split('-').nth(2).unwrap(), hex(&client_span.span_id));
    for (key, want) in [
        ("http.request.method", "GET"),
        ("url.scheme", "http"),
        ("url.path", "/app/items"),
        ("http.route", "/app"),
        ("http.response.status_code", "200"),
        ("network.protocol.version", "1.1"),
        ("user_agent.original", "otel-test/1"),
        ("client.address", "127.0.0.1"),
        ("sallyport.route", "app"),
        ("sallyport.upstream", "app"),
    ] {
        assert_eq!(attr(server, key).as_deref(), Some(want), "server {key}");
    }
    assert!(attr(server, "server.address").is_some());
    assert_eq!(
        attr(client_span, "server.port"),
        Some(up.addr.port().to_string())
    );
    assert_eq!(
        attr(client_span, "server.address"),
        Some("127.0.0.1".into())
    );
    // `url.full`: the URL the gateway called. The gateway leaves the query out (the semantic
    // conventions keep it, redacted): a query may carry secrets.
    assert_eq!(
        attr(client_span, "url.full"),
        Some(format!("http://127.0.0.1:{}/app/items", up.addr.port()))
    );
    assert_eq!(
        attr(client_span, "http.response.status_code"),
        Some("200".into())
    );
    assert!(attr(server, "enduser.id").is_none());
    // The access log's trace id is the exported trace's.
    let log = gw.access_log_lines(1).await;
    assert_eq!(log[0]["trace_id"], hex(&server.trace_id));
    assert!(
        gw.metric_value("sallyport_telemetry_spans_total{result=\"exported\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn a_rejected_request_and_a_retried_one() {
    let col = collector().await;
    let up = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let dead = free_port();
    let gw = gateway(
        col.addr,
        &format!(
            "[upstreams.app]\nendpoints = [\"127.0.0.1:{dead}\", \"{}\"]\nretries = 1",
            up.addr
        ),
        "",
    )
    .await;
    // jwt refuses: a server span with who rejected it, not an error (4xx).
    let r = client()
        .get(gw.url("/secure/x"))
        .header("traceparent", PARENT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Round robin over [dead, live]: within two requests one starts at the dead endpoint.
    for _ in 0..2 {
        let r = client()
            .get(gw.url("/app/x"))
            .header("traceparent", PARENT)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let all = eventually(
        Duration::from_secs(10),
        "a retried request's spans",
        || async {
            let s = spans(&col);
            s.iter()
                .any(|(_, s)| attr(s, "http.request.resend_count").as_deref() == Some("1"))
                .then_some(s)
        },
    )
    .await;
    let rejected = all
        .iter()
        .find(|(_, s)| attr(s, "sallyport.rejected_by").is_some())
        .map(|(_, s)| s)
        .unwrap();
    assert_eq!(
        attr(rejected, "sallyport.rejected_by").as_deref(),
        Some("jwt")
    );
    assert_eq!(
        attr(rejected, "http.response.status_code").as_deref(),
        Some("401")
    );
    assert_ne!(
        rejected.status.as_ref().map_or(0, |s| s.code),
        2,
        "a 4xx is not a server error"
    );
    let retry = all
        .iter()
        .find(|(_, s)| attr(s, "http.request.resend_count").as_deref() == Some("1"))
        .map(|(_, s)| s)
        .unwrap();
    let first = all
        .iter()
        .filter(|(_, s)| {
            s.kind == SpanKind::Client as i32 && s.parent_span_id == retry.parent_span_id
        })
        .count();
    assert_eq!(
        first, 2,
        "two attempts, two client spans under one server span"
    );
    let failed = all
        .iter()
        .find(|(_, s)| s.parent_span_id == retry.parent_span_id && s.span_id != retry.span_id)
        .map(|(_, s)| s)
        .unwrap();
    assert!(attr(failed, "error.type").is_some());
}

#[tokio::test]
async fn sampling_is_parent_based_and_a_dead_collector_costs_requests_nothing() {
    let up = Origin::start(|_| OriginResponse::new(200, "ok")).await;
    let col = collector().await;
    let gw = gateway(
        col.addr,
        &format!("[upstreams.app]\nendpoints = [\"{}\"]", up.addr),
        "sample_ratio = 0.0",
    )
    .await;
    client().get(gw.url("/app/unsampled")).send().await.unwrap();
    client()
        .get(gw.url("/app/sampled"))
        .header("traceparent", PARENT)
        .send()
        .await
        .unwrap();
    let all = wait_spans(&col, 2).await;
    assert!(all
        .iter()
        .all(|(_, s)| hex(&s.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736"));

    // A collector that is not there: every request still answers, failures are counted.
    let nowhere = free_port();
    let gw = gateway(
        format!("127.0.0.1:{nowhere}").parse().unwrap(),
        &format!("[upstreams.app]\nendpoints = [\"{}\"]", up.addr),
        "export_timeout = \"200ms\"",
    )
    .await;
    for _ in 0..20 {
        assert_eq!(
            client()
                .get(gw.url("/app/x"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    eventually(
        Duration::from_secs(10),
        "failed exports counted",
        || async {
            (gw.metric_value("sallyport_telemetry_spans_total{result=\"failed\"}")
                .await
                > 0.0)
                .then_some(())
        },
    )
    .await;
}

/// An aggregate request: one CLIENT span per call, under the SERVER span, with the span id
/// each call's traceparent carried; a failed optional call is visible.
#[tokio::test]
async fn an_aggregate_request_has_a_client_span_per_call() {
    let col = collector().await;
    let up = Origin::start(|req| match req.uri.as_str() {
        "/fail" => OriginResponse::new(503, "down"),
        _ => OriginResponse::new(200, "{\"ok\":true}").header("content-type", "application/json"),
    })
    .await;
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [telemetry]\notlp_endpoint = \"http://{}/v1/traces\"\n\
         [plugins.trace]\ntype = \"trace\"\n\
         [plugins.dash]\ntype = \"aggregate\"\ncalls = [\n\
           {{ name = \"a\", upstream = \"app\", path = \"/a\" }},\n\
           {{ name = \"b\", upstream = \"app\", path = \"/fail\" }},\n]\n\
         [[routes]]\nname = \"dash\"\npath = \"/dash\"\nplugins = [\"dash\"]\n",
        server("plugins = [\"trace\"]"),
        up.addr,
        col.addr
    );
    let gw = Gateway::start(&config).await;
    let r = client()
        .get(gw.url("/dash"))
        .header("traceparent", PARENT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all = wait_spans(&col, 3).await;
    let server = &all
        .iter()
        .find(|(_, s)| s.kind == SpanKind::Server as i32)
        .unwrap()
        .1;
    let calls: Vec<&Span> = all
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(calls.len(), 2);
    for c in &calls {
        assert_eq!(c.parent_span_id, server.span_id);
        let call = attr(c, "sallyport.call").unwrap();
        let path = if call == "a" { "/a" } else { "/fail" };
        let sent = up
            .requests()
            .iter()
            .find(|q| q.uri == path)
            .unwrap()
            .header("traceparent")
            .unwrap()
            .to_string();
        assert_eq!(sent.split('-').nth(2).unwrap(), hex(&c.span_id), "{call}");
    }
    let failed = calls
        .iter()
        .find(|c| attr(c, "sallyport.call").as_deref() == Some("b"))
        .unwrap();
    assert!(attr(failed, "error.type").is_some());
    assert_eq!(failed.status.as_ref().map(|s| s.code), Some(2));
}

#[test]
fn telemetry_config_errors_have_their_path() {
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n\
         [telemetry]\notlp_endpoint = \"nowhere\"\nprotocol = \"grpc\"\nsample_ratio = 2.0\n\
         headers = { \"authorization\" = \"${SP_TEST_SURELY_UNSET_VAR}\" }\n",
    );
    assert_ne!(code, 0);
    for want in [
        "telemetry.otlp_endpoint",
        "telemetry.protocol",
        "telemetry.sample_ratio",
        "telemetry.headers.\"authorization\": the environment variable SP_TEST_SURELY_UNSET_VAR is not set",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
}
