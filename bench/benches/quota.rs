//! Cost of one quota decision: the local sliding-window store (10,000 keys in rotation), and
//! the Redis store against a `redis-server` started here on a free port (skipped with a
//! message when none is installed). Then the whole plugin per request as the gateway calls
//! it (key from the request, decision, metrics, `RateLimit` headers on the response), local
//! and Redis, on a real Pingora session.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use sallyport_plugins::quota::window::Policy;
use sallyport_plugins::quota::{LocalStore, RedisStore};
use sallyport_plugins::upstream::NoUpstreams;
use sallyport_plugins::{BuildEnv, DynPlugin, Erased, Flow, Plugin, PluginConfig, RequestCtx};

const POLICY: Policy = Policy {
    quota: 1_000_000,
    ceiling: 1_000_000,
    window_ms: 60_000,
};

fn local(c: &mut Criterion) {
    let store = LocalStore::new(100_000);
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let mut i = 0usize;
    let mut now = 1_700_000_000_000u64;
    c.bench_function("quota::local_decision", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            now += 1;
            store.hit(&POLICY, &keys[i], now)
        })
    });
}

/// A `redis-server` on a free loopback port, or `None` when none is installed.
fn start_redis() -> Option<(std::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    Some((server, port))
}

struct NoOp;

#[async_trait::async_trait]
impl Plugin for NoOp {
    type State = ();
}

fn plugin(toml: &str) -> Arc<dyn DynPlugin> {
    let config: PluginConfig = toml::from_str(toml).unwrap();
    let metrics = sallyport::metrics::Metrics::new().unwrap();
    let env = BuildEnv {
        name: Arc::from("bench-quota"),
        upstreams: Arc::new(NoUpstreams),
        registry: metrics.plugin_registry.for_type(config.kind()),
        metrics: metrics.plugins,
        public_keys: Arc::default(),
    };
    config.build(&env).unwrap().plugin
}

/// One request through the plugin: request_filter (key, decision, metrics) and
/// response_filter (headers), client addresses rotating over 10,000.
async fn one_request(p: &dyn DynPlugin, session: &mut Session, i: u32) {
    let mut ctx = RequestCtx::new(String::new(), Arc::from("orders"));
    ctx.client_ip = Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i % 10_000)));
    let mut state = p.new_state();
    let flow = p
        .request_filter(session, &mut ctx, &mut state)
        .await
        .unwrap();
    assert!(matches!(flow, Flow::Continue));
    let mut resp = ResponseHeader::build(200, None).unwrap();
    p.response_filter(session, &mut resp, &mut ctx, &mut state)
        .await
        .unwrap();
}

fn whole_plugin(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut session = rt.block_on(async {
        let io = tokio_test::io::Builder::new()
            .read(b"GET /api/orders/7 HTTP/1.1\r\nHost: example.test\r\n\r\n")
            .build();
        let mut s = Session::new_h1(Box::new(io));
        s.read_request().await.unwrap();
        s
    });
    // The floor: the same calls on a plugin that does nothing (context, state, runtime).
    let noop = Erased::into_dyn(NoOp);
    let mut i = 0u32;
    c.bench_function("quota::plugin_request_floor", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            rt.block_on(one_request(&*noop, &mut session, i))
        })
    });
    let local = plugin("type = \"quota\"\nkey = \"ip\"\nlimit = 1000000000\nwindow = \"1m\"\n");
    c.bench_function("quota::plugin_request_local", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            rt.block_on(one_request(&*local, &mut session, i))
        })
    });
    let Some((mut server, port)) = start_redis() else {
        eprintln!("quota::plugin_request_redis skipped: no redis-server");
        return;
    };
    let redis = plugin(&format!(
        "type = \"quota\"\nkey = \"ip\"\nlimit = 1000000000\nwindow = \"1m\"\nstore = \"redis\"\n\
         redis_url = \"redis://127.0.0.1:{port}\"\nredis_timeout = \"500ms\"\non_store_error = \"deny\"\n"
    ));
    // Wait for the server: with on_store_error = "deny" a decision only continues once Redis
    // answers.
    rt.block_on(async {
        for _ in 0..200 {
            let mut ctx = RequestCtx::new(String::new(), Arc::from("orders"));
            ctx.client_ip = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
            let mut state = redis.new_state();
            if let Ok(Flow::Continue) = redis
                .request_filter(&mut session, &mut ctx, &mut state)
                .await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not come up");
    });
    c.bench_function("quota::plugin_request_redis", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            rt.block_on(one_request(&*redis, &mut session, i))
        })
    });
    let _ = server.kill();
    let _ = server.wait();
}

fn redis(c: &mut Criterion) {
    let Some((mut server, port)) = start_redis() else {
        eprintln!("quota::redis_decision skipped: no redis-server");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = RedisStore::new(
        &sallyport_plugins::redis_conn::RedisTarget::Node(format!("redis://127.0.0.1:{port}")),
        Duration::from_millis(500),
        "bench",
    )
    .unwrap();
    // Wait for the server: the first decisions fail until it accepts connections.
    rt.block_on(async {
        for _ in 0..200 {
            if store.hit(&POLICY, "warmup").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not come up");
    });
    let mut i = 0u64;
    c.bench_function("quota::redis_decision", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(store.hit(&POLICY, if i.is_multiple_of(2) { "a" } else { "b" }))
                .unwrap()
        })
    });
    let _ = server.kill();
    let _ = server.wait();
}

criterion_group!(benches, local, redis, whole_plugin);
criterion_main!(benches);
