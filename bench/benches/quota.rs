//! Cost of one quota decision: the local sliding-window store (10,000 keys in rotation), and
//! the Redis store against a `redis-server` started here on a free port (skipped with a
//! message when none is installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sallyport_plugins::quota::window::Policy;
use sallyport_plugins::quota::{LocalStore, RedisStore};

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

fn redis(c: &mut Criterion) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut server) = Command::new("redis-server")
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
    else {
        eprintln!("quota::redis_decision skipped: no redis-server");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = RedisStore::new(
        &format!("redis://127.0.0.1:{port}"),
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

criterion_group!(benches, local, redis);
criterion_main!(benches);
