//! Resilience under load, through real sockets: passive health (outlier ejection), the retry
//! budget, the route deadline with per-try timeouts, the RFC 9110 section 9.2.2 rule for
//! non-idempotent requests, `max_in_flight`, and the least_request / ewma balancers. The
//! numbers each test measures are printed (`--nocapture`) for the record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

fn route(extra: &str) -> String {
    format!("[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"pool\"\n{extra}\n")
}

fn pool(endpoints: &[&Origin], extra: &str) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|o| format!("\"{}\"", o.addr))
        .collect();
    format!(
        "[upstreams.pool]\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// An origin answering 200 with its name, or `status` while `failing` is set.
async fn switchable(name: &'static str, failing: Arc<AtomicBool>, status: u16) -> Origin {
    Origin::start(move |_| {
        if failing.load(Ordering::SeqCst) {
            OriginResponse::new(status, "failing")
        } else {
            OriginResponse::new(200, name)
        }
    })
    .await
}

/// Pool of three, no active checks: one endpoint starts answering 503 under a steady client
/// loop. It is ejected after `consecutive_failures`, the client sees no error while it is
/// out, it returns after `base_ejection` by itself, and its second ejection lasts twice as
/// long.
#[tokio::test]
async fn outlier_is_ejected_returns_on_its_own_and_stays_out_longer_the_second_time() {
    let bad = Arc::new(AtomicBool::new(false));
    let never = Arc::new(AtomicBool::new(false));
    let a = switchable("a", Arc::clone(&never), 503).await;
    let b = switchable("b", Arc::clone(&never), 503).await;
    let c = switchable("c", Arc::clone(&bad), 503).await;
    let config = format!(
        "{}\n{}[upstreams.pool.outlier]\nconsecutive_failures = 3\nbase_ejection = \"1s\"\nmax_ejection = \"10s\"\n{}",
        server(""),
        pool(&[&a, &b, &c], ""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let client = client();

    // Steady load: one request every 5 ms; record each answer with its time.
    let mut answers: Vec<(Instant, u16)> = Vec::new();
    let url = gw.url("/x");
    let send = async |answers: &mut Vec<(Instant, u16)>| {
        let r = client.get(&url).send().await.unwrap();
        answers.push((Instant::now(), r.status().as_u16()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for _ in 0..30 {
        send(&mut answers).await;
    }
    assert!(answers.iter().all(|(_, s)| *s == 200));

    bad.store(true, Ordering::SeqCst);
    let flipped = Instant::now();
    // Each answer with whether it came from the bad endpoint (its hit count moved).
    let mut log: Vec<(Instant, u16, bool)> = Vec::new();
    let mut hits = c.hits();
    let end = flipped + Duration::from_millis(5500);
    while Instant::now() < end {
        send(&mut answers).await;
        let now_hits = c.hits();
        let (t, status) = *answers.last().unwrap();
        log.push((t, status, now_hits != hits));
        hits = now_hits;
    }
    // Ejections are the runs of answers none of which came from the bad endpoint, longer
    // than 0.5 s; within them the client saw no error.
    let mut runs: Vec<&[(Instant, u16, bool)]> = log
        .split(|(_, _, bad)| *bad)
        .filter(|run| run.len() > 1 && run[run.len() - 1].0 - run[0].0 > Duration::from_millis(500))
        .collect();
    // The last run may be cut short by the end of the loop.
    if runs.len() > 2 {
        runs.truncate(2);
    }
    let gaps: Vec<Duration> = runs.iter().map(|r| r[r.len() - 1].0 - r[0].0).collect();
    let errors = log.iter().filter(|(_, s, _)| *s != 200).count();
    let during: usize = runs.iter().map(|r| r.len()).sum();
    let errors_during = runs
        .iter()
        .flat_map(|r| r.iter())
        .filter(|(_, s, _)| *s != 200)
        .count();
    eprintln!(
        "outlier: ejections lasted {gaps:?}; {} requests after the endpoint broke, {errors} errors \
         (all from the broken endpoint before each ejection); {during} requests during the ejections, {errors_during} errors",
        log.len()
    );
    assert_eq!(runs.len(), 2, "two ejections in 5.5 s: {gaps:?}");
    assert!(
        gaps[0] >= Duration::from_millis(900) && gaps[0] < Duration::from_millis(1600),
        "first ejection ~1 s (+10% jitter): {gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(1900) && gaps[1] < Duration::from_millis(2700),
        "second ejection ~2 s: {gaps:?}"
    );
    assert_eq!(errors_during, 0);
    assert!(during > 100, "load kept flowing");
    let from_bad = log.iter().filter(|(_, _, bad)| *bad).count();
    assert_eq!(
        errors, from_bad,
        "every error came from the broken endpoint"
    );

    let ejections = gw
        .metric_value(&format!(
            "sallyport_upstream_ejections_total{{endpoint=\"{}\",reason=\"consecutive_failures\",upstream=\"pool\"}}",
            c.addr
        ))
        .await;
    assert!(ejections >= 2.0, "{ejections}");
    assert!(
        errors as f64 <= 3.0 * ejections + 2.0,
        "3 failures per ejection (and at most 2 towards one more): {errors} errors, {ejections} ejections"
    );
    let log = gw.stderr();
    assert!(
        log.matches("ejected for").count() >= 2 && log.contains("returns to rotation"),
        "{log}"
    );
    assert!(
        !log.contains("Fail to proxy"),
        "no log line per failed request: {log}"
    );
}

/// An ejection outlives a reload that did not change the pool, and ejection never takes the
/// pool below `100 - max_ejected_percent`: with 2 of 2 endpoints failing at 50%, one stays.
#[tokio::test]
async fn ejection_survives_reload_and_never_empties_the_pool() {
    let bad = Arc::new(AtomicBool::new(true));
    let a = switchable("a", Arc::clone(&bad), 503).await;
    let b = switchable("b", Arc::clone(&bad), 503).await;
    let outlier = "[upstreams.pool.outlier]\nconsecutive_failures = 2\nbase_ejection = \"30s\"\n";
    let config = format!(
        "{}\n{}{outlier}{}",
        server(""),
        pool(&[&a, &b], ""),
        route("")
    );
    let mut gw = Gateway::start(&config).await;
    let client = client();
    for _ in 0..10 {
        client.get(gw.url("/x")).send().await.unwrap();
    }
    let state: Vec<bool> = vec![ejected(&gw, &a).await, ejected(&gw, &b).await];
    assert_eq!(
        state.iter().filter(|e| **e).count(),
        1,
        "exactly one of two ejected at 50%: {state:?}"
    );
    let (out, kept) = if state[0] { (&a, &b) } else { (&b, &a) };

    // Reload with a route change only: the pool (and its ejection) is kept.
    gw.write_config(&format!(
        "{}\n{}{outlier}{}",
        server(""),
        pool(&[&a, &b], ""),
        route("timeout = \"5s\"")
    ));
    assert_eq!(gw.reload().await, "ok");
    bad.store(false, Ordering::SeqCst);
    let before = out.hits();
    for _ in 0..10 {
        let r = client.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(out.hits(), before, "still ejected after the reload");
    assert!(ejected(&gw, out).await);
    assert!(kept.hits() >= 10);
    let _ = &mut gw;
}

async fn ejected(gw: &Gateway, o: &Origin) -> bool {
    let series = format!(
        "sallyport_upstream_endpoint_ejected{{endpoint=\"{}\",upstream=\"pool\"}}",
        o.addr
    );
    gw.metric_value(&series).await == 1.0
}

/// Every endpoint answers 503 and `retry_on = ["503"]` with three attempts: the budget holds
/// the upstream to requests x (1 + ratio) + the per-second floor, not 3x.
#[tokio::test]
async fn retry_budget_bounds_the_amplification() {
    let failing = Arc::new(AtomicBool::new(true));
    let a = switchable("a", Arc::clone(&failing), 503).await;
    let b = switchable("b", Arc::clone(&failing), 503).await;
    let config = format!(
        "{}\n{}[upstreams.pool.retry]\nattempts = 3\nretry_on = [\"503\"]\nbackoff = {{ base = \"1ms\", max = \"1ms\" }}\nbudget = {{ ratio = 0.2, min_per_second = 1 }}\n{}",
        server(""),
        pool(&[&a, &b], ""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let requests = 300;
    let client = client();
    let statuses = futures_util::future::join_all((0..4).map(|w| {
        let client = client.clone();
        let url = gw.url("/x");
        async move {
            let mut s = Vec::new();
            for _ in (w..requests).step_by(4) {
                s.push(client.get(&url).send().await.unwrap().status().as_u16());
            }
            s
        }
    }))
    .await;
    assert!(statuses.iter().flatten().all(|s| *s == 503));
    let upstream = a.hits() + b.hits();
    let bound = requests as f64 * 1.2 + 10.0;
    let factor = upstream as f64 / requests as f64;
    eprintln!(
        "budget: {requests} requests -> {upstream} upstream requests (x{factor:.2}; bound {bound}, without a budget {})",
        requests * 3
    );
    assert!(upstream as f64 <= bound, "{upstream} > {bound}");
    assert!(upstream > requests, "some retries were made");
    let exhausted = gw
        .metric_value("sallyport_upstream_retry_budget_exhausted_total{upstream=\"pool\"}")
        .await;
    let retried = gw
        .metric_value("sallyport_upstream_retries_total{reason=\"503\",upstream=\"pool\"}")
        .await;
    assert!(exhausted > 0.0);
    assert_eq!(retried as usize, upstream - requests);
}

/// A hanging first endpoint: the try times out at `per_try_timeout` (300 ms) and the retry
/// on the other endpoint answers well within the route's 500 ms; the retry says which try it
/// is. When every endpoint hangs, the answer is a 504 at the deadline and no try starts
/// after it.
#[tokio::test]
async fn route_deadline_bounds_every_try() {
    let first = Arc::new(AtomicUsize::new(0));
    let script = |first: Arc<AtomicUsize>| {
        move |_: &OriginRequest| {
            if first.fetch_add(1, Ordering::SeqCst) == 0 {
                OriginResponse::new(200, "late").delay(Duration::from_secs(5))
            } else {
                OriginResponse::new(200, "ok")
            }
        }
    };
    let a = Origin::start(script(Arc::clone(&first))).await;
    let b = Origin::start(script(Arc::clone(&first))).await;
    let retry = "[upstreams.pool.retry]\nattempts = 3\nretry_on = [\"timeout\"]\nper_try_timeout = \"300ms\"\nbackoff = { base = \"10ms\", max = \"10ms\" }\n";
    let config = format!(
        "{}\n{}{retry}{}",
        server(""),
        pool(&[&a, &b], ""),
        route("timeout = \"500ms\"")
    );
    let gw = Gateway::start(&config).await;
    let started = Instant::now();
    let r = client().get(gw.url("/x")).send().await.unwrap();
    let took = started.elapsed();
    eprintln!("deadline: hanging first try, answered in {took:?}");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(650),
        "{took:?}"
    );
    let seen: Vec<OriginRequest> = a.requests().into_iter().chain(b.requests()).collect();
    assert_eq!(seen.len(), 2);
    let retried = seen
        .iter()
        .find(|r| r.header("x-sallyport-attempt").is_some())
        .unwrap();
    assert_eq!(retried.header("x-sallyport-attempt"), Some("2"));
    let log = gw.access_log_lines(1).await;
    assert_eq!(log[0]["attempts"], 2, "{log:?}");

    // Every endpoint hangs: 300 ms + a try cut to the ~190 ms left, then 504; no third try.
    let hang = |_: &OriginRequest| OriginResponse::new(200, "late").delay(Duration::from_secs(5));
    let (c, d) = (Origin::start(hang).await, Origin::start(hang).await);
    let config = format!(
        "{}\n{}{retry}{}",
        server(""),
        pool(&[&c, &d], ""),
        route("timeout = \"500ms\"")
    );
    let gw = Gateway::start(&config).await;
    let started = Instant::now();
    let r = client().get(gw.url("/x")).send().await.unwrap();
    let took = started.elapsed();
    eprintln!("deadline: every endpoint hanging, 504 after {took:?}");
    assert_eq!(r.status(), 504);
    assert_eq!(json(r).await["error"]["code"], "upstream_timeout");
    assert!(
        took >= Duration::from_millis(480) && took < Duration::from_millis(800),
        "{took:?}"
    );
    // Give a late third try the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.hits() + d.hits(), 2, "no try after the deadline");
}

/// RFC 9110 section 9.2.2: a POST that timed out may have been applied, so it is not
/// repeated, unless `idempotent_only = false` and it carries an `Idempotency-Key`; a GET is.
#[tokio::test]
async fn post_is_not_retried_after_a_read_timeout() {
    // First tries hang past the per-try timeout; a retry (it says so) answers at once.
    let first_tries_hang = |r: &OriginRequest| {
        if r.header("x-sallyport-attempt").is_some() {
            OriginResponse::new(201, "done")
        } else {
            OriginResponse::new(201, "late").delay(Duration::from_secs(2))
        }
    };
    let a = Origin::start(first_tries_hang).await;
    let b = Origin::start(first_tries_hang).await;
    let config = |idempotent_only: bool| {
        format!(
            "{}\n{}[upstreams.pool.retry]\nattempts = 2\nretry_on = [\"timeout\"]\nper_try_timeout = \"200ms\"\nidempotent_only = {idempotent_only}\n{}",
            server(""),
            pool(&[&a, &b], ""),
            route("")
        )
    };
    let gw = Gateway::start(&config(true)).await;
    let c = client();
    let r = c.post(gw.url("/orders")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 504, "the POST is not repeated");
    assert_eq!(a.hits() + b.hits(), 1);
    let r = c
        .post(gw.url("/orders"))
        .header("idempotency-key", "k1")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504, "idempotent_only ignores the key");
    assert_eq!(a.hits() + b.hits(), 2);
    let r = c.get(gw.url("/orders")).send().await.unwrap();
    assert_eq!(r.status(), 201, "a GET is repeated");
    assert_eq!(a.hits() + b.hits(), 4);
    drop(gw);

    let gw = Gateway::start(&config(false)).await;
    let r = c
        .post(gw.url("/orders"))
        .header("idempotency-key", "k2")
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "a keyed POST is repeated when allowed");
    let all: Vec<OriginRequest> = a.requests().into_iter().chain(b.requests()).collect();
    let keyed: Vec<&OriginRequest> = all
        .iter()
        .filter(|r| r.header("idempotency-key") == Some("k2"))
        .collect();
    assert_eq!(keyed.len(), 2);
    assert!(
        keyed.iter().all(|r| r.body == b"{\"n\":1}"),
        "the body is replayed"
    );
    let r = c.post(gw.url("/orders")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 504, "without a key it is still not repeated");
}

/// A retried body is replayed in full and counted once against `server.max_body`: a 60 KB
/// POST with an `Idempotency-Key` under a 100 KB limit survives a 503 and a retry.
#[tokio::test]
async fn a_replayed_body_counts_once_against_max_body() {
    let first = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&first);
    let origin = Origin::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            OriginResponse::new(503, "busy")
        } else {
            OriginResponse::new(201, "created")
        }
    })
    .await;
    let config = format!(
        "{}
{}[upstreams.pool.retry]
retry_on = [\"503\"]
idempotent_only = false
{}",
        server("max_body = \"100KB\""),
        pool(&[&origin], ""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let body = vec![b'x'; 60_000];
    let r = client()
        .post(gw.url("/orders"))
        .header("idempotency-key", "k-60k")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let seen = origin.requests();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|r| r.body == body),
        "the whole body both times"
    );
    assert_eq!(seen[1].header("x-sallyport-attempt"), Some("2"));
}

/// `max_in_flight = 2` with a slow upstream: of six concurrent requests two are proxied and
/// four get 503 `upstream_overloaded` at once, without reaching the pool.
#[tokio::test]
async fn max_in_flight_sheds_the_excess_at_once() {
    let slow =
        Origin::start(|_| OriginResponse::new(200, "ok").delay(Duration::from_millis(600))).await;
    let config = format!(
        "{}\n{}[upstreams.pool.limits]\nmax_in_flight = 2\n{}",
        server(""),
        pool(&[&slow], ""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    let first: Vec<_> = (0..2)
        .map(|_| tokio::spawn(c.get(gw.url("/x")).send()))
        .collect();
    eventually(Duration::from_secs(5), "two requests in flight", || async {
        (slow.hits() == 2).then_some(())
    })
    .await;
    assert_eq!(
        gw.metric_value("sallyport_upstream_in_flight{upstream=\"pool\"}")
            .await,
        2.0
    );
    let started = Instant::now();
    let shed = futures_util::future::join_all((0..4).map(|_| c.get(gw.url("/x")).send())).await;
    let took = started.elapsed();
    for r in shed {
        let r = r.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(json(r).await["error"]["code"], "upstream_overloaded");
    }
    eprintln!("max_in_flight: 4 excess requests shed in {took:?}");
    assert!(took < Duration::from_millis(400), "{took:?}");
    for f in first {
        assert_eq!(f.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(slow.hits(), 2);
    assert_eq!(
        gw.metric_value(
            "sallyport_upstream_requests_total{outcome=\"overloaded\",upstream=\"pool\"}"
        )
        .await,
        4.0
    );
}

/// Runs `workers` client loops for `secs`, returning how many answers came from each name.
async fn share(
    gw: &Gateway,
    workers: usize,
    secs: f64,
) -> std::collections::HashMap<String, usize> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let c = client();
    let counts = futures_util::future::join_all((0..workers).map(|_| {
        let c = c.clone();
        let url = gw.url("/x");
        async move {
            let mut seen = Vec::new();
            while Instant::now() < until {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                seen.push(r.text().await.unwrap());
            }
            seen
        }
    }))
    .await;
    let mut m = std::collections::HashMap::new();
    for name in counts.into_iter().flatten() {
        *m.entry(name).or_default() += 1;
    }
    m
}

/// `ewma`: one of two endpoints becomes 50 ms slower; within a few seconds it gets a small
/// share of the traffic.
#[tokio::test]
async fn ewma_moves_traffic_away_from_a_slow_endpoint() {
    let slow = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&slow);
    let a = Origin::start(|_| OriginResponse::new(200, "a")).await;
    let b = Origin::start(move |_| {
        let r = OriginResponse::new(200, "b");
        if flag.load(Ordering::SeqCst) {
            r.delay(Duration::from_millis(50))
        } else {
            r
        }
    })
    .await;
    let config = format!(
        "{}\n{}{}",
        server(""),
        pool(&[&a, &b], "balance = \"ewma\""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let before = share(&gw, 4, 1.0).await;
    slow.store(true, Ordering::SeqCst);
    let settle = share(&gw, 4, 1.0).await;
    let after = share(&gw, 4, 2.0).await;
    let of = |m: &std::collections::HashMap<String, usize>| {
        let b = *m.get("b").unwrap_or(&0) as f64;
        b / m.values().sum::<usize>() as f64
    };
    eprintln!(
        "ewma: slow endpoint's share before {:.1}%, first second after {:.1}%, next two seconds {:.1}% ({after:?})",
        of(&before) * 100.0,
        of(&settle) * 100.0,
        of(&after) * 100.0
    );
    assert!(of(&before) > 0.2, "both serve while equal: {before:?}");
    assert!(of(&after) < 0.05, "{after:?}");
}

/// `least_request`: an endpoint that stalls (2 s per answer) collects in-flight requests and
/// stops being chosen while the other one keeps answering.
#[tokio::test]
async fn least_request_avoids_a_stalled_endpoint() {
    let a = Origin::start(|_| OriginResponse::new(200, "a")).await;
    let b = Origin::start(|_| OriginResponse::new(200, "b").delay(Duration::from_secs(2))).await;
    let config = format!(
        "{}\n{}{}",
        server(""),
        pool(&[&a, &b], "balance = \"least_request\""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let started = Instant::now();
    let seen = share(&gw, 8, 1.5).await;
    let total: usize = seen.values().sum();
    let stalled = b.hits();
    eprintln!(
        "least_request: {stalled} of {} requests went to the stalled endpoint in {:?}",
        a.hits() + stalled,
        started.elapsed()
    );
    assert!(total > 200, "{seen:?}");
    assert!(
        (stalled as f64) < 0.05 * (a.hits() + stalled) as f64,
        "stalled share {stalled}/{}",
        a.hits() + stalled
    );
}

/// Aggregate calls use the pool's retry policy: a call that gets a 503 from one endpoint is
/// tried on the other (with `x-sallyport-attempt`), and an endpoint ejected by proxied
/// traffic is not called.
#[tokio::test]
async fn aggregate_calls_share_retry_policy_and_ejections() {
    let bad = Arc::new(AtomicBool::new(true));
    let good = Origin::start(|_| {
        OriginResponse::new(200, "{\"ok\":true}").header("content-type", "application/json")
    })
    .await;
    let flaky = {
        let bad = Arc::clone(&bad);
        Origin::start(move |_| {
            if bad.load(Ordering::SeqCst) {
                OriginResponse::new(503, "{}")
            } else {
                OriginResponse::new(200, "{\"ok\":true}").header("content-type", "application/json")
            }
        })
        .await
    };
    let config = format!(
        "{}\n{}[upstreams.pool.retry]\nretry_on = [\"503\"]\nbackoff = {{ base = \"1ms\", max = \"1ms\" }}\n\
         [upstreams.pool.outlier]\nconsecutive_failures = 2\nbase_ejection = \"30s\"\n\
         [plugins.agg]\ntype = \"aggregate\"\ncalls = [{{ name = \"one\", upstream = \"pool\", path = \"/one\", required = true }}]\n\
         [[routes]]\nname = \"agg\"\npath = \"/screen\"\nplugins = [\"agg\"]\n{}",
        server(""),
        pool(&[&flaky, &good], ""),
        route("")
    );
    let gw = Gateway::start(&config).await;
    let c = client();
    for _ in 0..4 {
        let r = c.get(gw.url("/screen")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(json(r).await["one"]["ok"], true);
    }
    let retried: Vec<OriginRequest> = good
        .requests()
        .into_iter()
        .filter(|r| r.header("x-sallyport-attempt") == Some("2"))
        .collect();
    assert!(!retried.is_empty(), "a call retried after a 503 says so");
    // Two 503s in a row ejected the flaky endpoint (for 30 s): calls no longer reach it.
    assert!(ejected(&gw, &flaky).await);
    let before = flaky.hits();
    for _ in 0..6 {
        assert_eq!(c.get(gw.url("/screen")).send().await.unwrap().status(), 200);
        assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(flaky.hits(), before);
}
