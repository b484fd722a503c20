//! The plugin chain's dispatch cost: N plugins that do nothing, called through the erased
//! `DynPlugin` interface the gateway uses (state creation, request_filter,
//! upstream_request_filter, response_filter, logging), on a real Pingora session read from
//! in-memory bytes. N = 0 is the floor (the executor and session setup).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use sallyport_plugins::{DynPlugin, Erased, Flow, Plugin, RequestCtx, Result};

struct NoOp;

#[async_trait]
impl Plugin for NoOp {
    type State = u64;

    async fn request_filter(
        &self,
        _s: &mut Session,
        _c: &mut RequestCtx,
        state: &mut u64,
    ) -> Result<Flow> {
        *state += 1;
        Ok(Flow::Continue)
    }
    async fn upstream_request_filter(
        &self,
        _s: &mut Session,
        _r: &mut RequestHeader,
        _c: &mut RequestCtx,
        state: &mut u64,
    ) -> Result<()> {
        *state += 1;
        Ok(())
    }
    async fn response_filter(
        &self,
        _s: &mut Session,
        _r: &mut ResponseHeader,
        _c: &mut RequestCtx,
        state: &mut u64,
    ) -> Result<()> {
        *state += 1;
        Ok(())
    }
    async fn logging(
        &self,
        _s: &mut Session,
        _e: Option<&pingora::Error>,
        _c: &mut RequestCtx,
        state: &mut u64,
    ) {
        *state += 1;
    }
}

async fn session() -> Session {
    let io = tokio_test::io::Builder::new()
        .read(b"GET /api/orders/7 HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n")
        .build();
    let mut s = Session::new_h1(Box::new(io));
    s.read_request().await.unwrap();
    s
}

async fn run_chain(chain: &[Arc<dyn DynPlugin>], session: &mut Session, ctx: &mut RequestCtx) {
    let mut states: Vec<_> = chain.iter().map(|p| p.new_state()).collect();
    for (p, st) in chain.iter().zip(states.iter_mut()) {
        let _ = p.request_filter(session, ctx, st).await.unwrap();
    }
    let mut upstream = RequestHeader::build("GET", b"/orders/7", None).unwrap();
    for (p, st) in chain.iter().zip(states.iter_mut()) {
        p.upstream_request_filter(session, &mut upstream, ctx, st)
            .await
            .unwrap();
    }
    let mut resp = ResponseHeader::build(200, None).unwrap();
    for (p, st) in chain.iter().zip(states.iter_mut()).rev() {
        p.response_filter(session, &mut resp, ctx, st)
            .await
            .unwrap();
    }
    for (p, st) in chain.iter().zip(states.iter_mut()) {
        p.logging(session, None, ctx, st).await;
    }
}

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut session = rt.block_on(session());
    let mut g = c.benchmark_group("plugins::dispatch");
    for n in [0usize, 1, 4, 16] {
        let chain: Vec<Arc<dyn DynPlugin>> = (0..n).map(|_| Erased::into_dyn(NoOp)).collect();
        g.bench_with_input(BenchmarkId::new("noop_plugins_all_hooks", n), &n, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    let mut ctx = RequestCtx::new(String::new(), Arc::from("r"));
                    run_chain(&chain, &mut session, &mut ctx).await;
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
