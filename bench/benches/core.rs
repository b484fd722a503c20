//! Hot-path pieces of the gateway core: path normalisation, route matching with many routes,
//! traceparent parsing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use sallyport::config::EscapedSlashes;
use sallyport::path::normalize;
use sallyport::router::{HostPattern, RouteMatch, Router};
use sallyport_plugins::trace::parse_traceparent;
use std::hint::black_box;

fn path(c: &mut Criterion) {
    let mut g = c.benchmark_group("path::normalize");
    g.bench_function("already_normal", |b| {
        b.iter(|| normalize(black_box("/api/orders/12345/items"), EscapedSlashes::Decode))
    });
    g.bench_function("dot_segments_and_escapes", |b| {
        b.iter(|| {
            normalize(
                black_box("/api/public/%2e%2e//orders/./12345"),
                EscapedSlashes::Decode,
            )
        })
    });
    g.finish();
}

fn router(c: &mut Criterion) {
    let routes: Vec<RouteMatch> = (0..1000)
        .map(|i| RouteMatch {
            hosts: if i % 10 == 0 {
                vec![HostPattern::parse(&format!("svc{i}.example.test")).unwrap()]
            } else {
                Vec::new()
            },
            exact: i % 3 == 0,
            path: format!("/api/v{}/service{i}/items", i % 4),
            methods: vec![Method::GET, Method::POST],
        })
        .collect();
    let router = Router::new(&routes);
    let mut g = c.benchmark_group("router::lookup_1000_routes");
    g.bench_function("prefix_hit", |b| {
        b.iter(|| {
            router.lookup(
                black_box("api.example.test"),
                black_box("/api/v1/service1/items/42/detail"),
                &Method::GET,
            )
        })
    });
    g.bench_function("exact_hit", |b| {
        b.iter(|| {
            router.lookup(
                black_box("api.example.test"),
                black_box("/api/v3/service3/items"),
                &Method::GET,
            )
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            router.lookup(
                black_box("api.example.test"),
                black_box("/nothing/here/at/all"),
                &Method::GET,
            )
        })
    });
    g.finish();
}

fn trace(c: &mut Criterion) {
    c.bench_function("trace::parse_traceparent", |b| {
        b.iter(|| {
            parse_traceparent(black_box(
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ))
        })
    });
}

criterion_group!(benches, path, router, trace);
criterion_main!(benches);
