//! The `cache` plugin through the real gateway, against an origin whose every answer the test
//! scripts: what the origin received (how often, with which validators) and what the client
//! got (body, `Age`, RFC 9211 `Cache-Status`). Test names cite the RFC section they check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support;

use support::*;

const SECRET: &str = "cache-test-secret-of-at-least-32-bytes";

/// A gateway with one route `/` to `origin` through `[plugins.edge-cache]` (with `cache` as
/// extra keys), after `before` (plugin names listed ahead of it); `plugins` are extra tables.
async fn gateway_with(origin: &Origin, cache: &str, before: &[&str], plugins: &str) -> Gateway {
    let mut chain: Vec<String> = before.iter().map(|p| format!("\"{p}\"")).collect();
    chain.push("\"edge-cache\"".into());
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.edge-cache]\ntype = \"cache\"\n{cache}\n{plugins}\n\
         [[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\nplugins = [{}]\n",
        server(""),
        origin.addr,
        chain.join(", ")
    );
    Gateway::start(&config).await
}

async fn gateway(origin: &Origin, cache: &str) -> Gateway {
    gateway_with(origin, cache, &[], "").await
}

/// An origin that answers every request with a numbered body and `headers`.
async fn counting(headers: &'static [(&'static str, &'static str)]) -> (Origin, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    let origin = Origin::start(move |_req| {
        let i = count.fetch_add(1, Ordering::SeqCst) + 1;
        let mut r = OriginResponse::new(200, format!("v{i}"));
        for (k, v) in headers {
            r = r.header(k, *v);
        }
        r
    })
    .await;
    (origin, n)
}

struct Got {
    status: u16,
    body: String,
    headers: reqwest::header::HeaderMap,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn cache_status(&self) -> &str {
        self.header("cache-status")
    }
}

async fn send(gw: &Gateway, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = client().request(method.parse().unwrap(), gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.unwrap();
    Got {
        status,
        body,
        headers,
    }
}

async fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    send(gw, "GET", path, headers).await
}

#[tokio::test]
async fn rfc9111_3_a_stored_response_is_reused_with_age_date_and_cache_status() {
    let (origin, _) = counting(&[("cache-control", "max-age=60")]).await;
    let gw = gateway(&origin, "").await;
    let first = get(&gw, "/items/1", &[]).await;
    assert_eq!((first.status, first.body.as_str()), (200, "v1"));
    assert!(
        first
            .cache_status()
            .starts_with("sallyport; fwd=uri-miss; fwd-status=200")
            && first.cache_status().ends_with("stored"),
        "{}",
        first.cache_status()
    );
    let second = get(&gw, "/items/1", &[]).await;
    assert_eq!(second.body, "v1");
    assert_eq!(origin.hits(), 1);
    assert!(
        second.cache_status().starts_with("sallyport; hit; ttl="),
        "{}",
        second.cache_status()
    );
    // RFC 9111 4.2.3 / 5.1: Age on a response from the cache; the origin's Date is kept.
    let age: u64 = second.header("age").parse().unwrap();
    assert!(age <= 2, "age {age}");
    assert_eq!(second.header("date"), first.header("date"));
    // Another target is another entry; the query is part of it.
    assert_eq!(get(&gw, "/items/1?x=1", &[]).await.body, "v2");
    // The access log line is written after the metrics are counted.
    let log = gw.access_log_lines(3).await;
    let mut results: Vec<&str> = log.iter().map(|l| l["cache"].as_str().unwrap()).collect();
    results.sort();
    assert_eq!(results, ["hit", "miss", "miss"]);
    assert_eq!(
        gw.metric_value("sallyport_cache_lookups_total{result=\"hit\",route=\"app\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric_value("sallyport_cache_lookups_total{result=\"miss\",route=\"app\"}")
            .await,
        2.0
    );
    assert!(
        gw.metric_value("sallyport_cache_bytes{plugin=\"edge-cache\"}")
            .await
            > 0.0
    );
}

#[tokio::test]
async fn rfc9111_3_what_a_shared_cache_never_stores() {
    let origin = Origin::start(|req| {
        let cc = match req.uri.as_str() {
            "/no-store" => "no-store, max-age=60",
            "/private" => "private, max-age=60",
            "/cookie" | "/cookie-public" => "max-age=60",
            "/vary-star" => "max-age=60",
            "/no-freshness" => "",
            _ => "max-age=60",
        };
        let mut r = OriginResponse::new(200, "x");
        if !cc.is_empty() {
            r = r.header("cache-control", cc);
        }
        match req.uri.as_str() {
            "/cookie" => r.header("set-cookie", "sid=1"),
            "/cookie-public" => r
                .header("set-cookie", "theme=dark")
                .header("cache-control", "public"),
            "/vary-star" => r.header("vary", "*"),
            _ => r,
        }
    })
    .await;
    let gw = gateway(&origin, "").await;
    for (path, detail) in [
        ("/no-store", "no-store"),
        ("/private", "private"),
        ("/cookie", "set-cookie"),
        ("/vary-star", "vary-star"),
        ("/no-freshness", "no-freshness"),
    ] {
        let first = get(&gw, path, &[]).await;
        assert!(
            first.cache_status().contains(&format!("detail={detail}")),
            "{path}: {}",
            first.cache_status()
        );
        let before = origin.hits();
        get(&gw, path, &[]).await;
        assert_eq!(
            origin.hits(),
            before + 1,
            "{path} was served from the cache"
        );
    }
    // RFC 9111 5.2.1.5: a request's no-store keeps its response out of the cache.
    get(&gw, "/req-no-store", &[("cache-control", "no-store")]).await;
    assert!(get(&gw, "/req-no-store", &[])
        .await
        .cache_status()
        .contains("uri-miss"));
    // Set-Cookie with an explicit `public` is stored, without the cookie: the client of the
    // miss got it, the others never do.
    let miss = get(&gw, "/cookie-public", &[]).await;
    assert_eq!(miss.header("set-cookie"), "theme=dark");
    let hit = get(&gw, "/cookie-public", &[]).await;
    assert!(hit.cache_status().contains("hit"));
    assert_eq!(hit.header("set-cookie"), "");
}

#[tokio::test]
async fn rfc9111_4_2_1_freshness_comes_from_s_maxage_max_age_and_expires() {
    let origin = Origin::start(|req| {
        let r = OriginResponse::new(200, "x").header("etag", "\"e\"");
        match req.uri.as_str() {
            "/s-maxage" => r.header("cache-control", "max-age=0, s-maxage=60"),
            "/expires" => r.header(
                "expires",
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60)),
            ),
            // RFC 9111 5.3: an invalid Expires means already expired.
            _ => r.header("expires", "0"),
        }
    })
    .await;
    let gw = gateway(&origin, "").await;
    for path in ["/s-maxage", "/expires", "/bad-expires"] {
        get(&gw, path, &[]).await;
    }
    assert!(get(&gw, "/s-maxage", &[])
        .await
        .cache_status()
        .contains("hit"));
    assert!(get(&gw, "/expires", &[])
        .await
        .cache_status()
        .contains("hit"));
    let stale = get(&gw, "/bad-expires", &[]).await;
    assert!(
        stale.cache_status().contains("fwd=stale"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(origin.hits(), 4);
}

#[tokio::test]
async fn rfc9111_4_2_3_an_age_from_upstream_is_honoured() {
    let origin = Origin::start(|req| {
        let r = OriginResponse::new(200, "x").header("etag", "\"e\"");
        match req.uri.as_str() {
            "/old" => r.header("cache-control", "max-age=100").header("age", "50"),
            _ => r.header("cache-control", "max-age=60").header("age", "61"),
        }
    })
    .await;
    let gw = gateway(&origin, "").await;
    get(&gw, "/old", &[]).await;
    let hit = get(&gw, "/old", &[]).await;
    assert!(hit.cache_status().contains("hit"));
    let age: u64 = hit.header("age").parse().unwrap();
    assert!((50..=52).contains(&age), "age {age}");
    // Older than its lifetime on arrival: stored stale, revalidated on the next use.
    get(&gw, "/expired", &[]).await;
    get(&gw, "/expired", &[]).await;
    let reqs = origin.requests();
    let last = reqs.last().unwrap();
    assert_eq!(last.uri, "/expired");
    assert_eq!(last.header("if-none-match"), Some("\"e\""));
}

#[tokio::test]
async fn rfc9111_4_1_vary_selects_a_variant_and_vary_star_is_never_reused() {
    let origin = Origin::start(|req| {
        let lang = req.header("accept-language").unwrap_or("none").to_string();
        OriginResponse::new(200, lang)
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Language")
    })
    .await;
    let gw = gateway(&origin, "").await;
    let en = [("accept-language", "en")];
    let fr = [("accept-language", "fr")];
    assert_eq!(get(&gw, "/v", &en).await.body, "en");
    let fr1 = get(&gw, "/v", &fr).await;
    assert_eq!(fr1.body, "fr");
    assert!(
        fr1.cache_status().contains("fwd=vary-miss"),
        "{}",
        fr1.cache_status()
    );
    assert_eq!(get(&gw, "/v", &en).await.body, "en");
    assert_eq!(get(&gw, "/v", &fr).await.body, "fr");
    assert_eq!(get(&gw, "/v", &[]).await.body, "none");
    assert_eq!(origin.hits(), 3);
}

/// RFC 9111 4.3: a stale entry is revalidated with its validators; a 304 refreshes the stored
/// header (4.3.4) and the stored body is sent.
#[tokio::test]
async fn rfc9111_4_3_revalidation_with_304_refreshes_the_stored_header() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    let origin = Origin::start(move |req| {
        let i = count.fetch_add(1, Ordering::SeqCst) + 1;
        if req.header("if-none-match") == Some("\"v1\"") {
            return OriginResponse::new(304, "")
                .header("etag", "\"v1\"")
                .header("cache-control", "no-cache")
                .header("x-version", i.to_string());
        }
        OriginResponse::new(200, "body-1")
            .header("etag", "\"v1\"")
            .header("cache-control", "no-cache")
            .header("x-version", i.to_string())
    })
    .await;
    let gw = gateway(&origin, "").await;
    assert_eq!(get(&gw, "/r", &[]).await.header("x-version"), "1");
    let again = get(&gw, "/r", &[]).await;
    assert_eq!((again.status, again.body.as_str()), (200, "body-1"));
    assert_eq!(again.header("x-version"), "2");
    assert!(
        again.cache_status().contains("fwd=stale; fwd-status=304"),
        "{}",
        again.cache_status()
    );
    assert_eq!(get(&gw, "/r", &[]).await.header("x-version"), "3");
    assert_eq!(origin.requests()[1].header("if-none-match"), Some("\"v1\""));
    gw.access_log_lines(3).await;
    assert_eq!(
        gw.metric_value("sallyport_cache_lookups_total{result=\"revalidated\",route=\"app\"}")
            .await,
        2.0
    );
}

/// RFC 9110 13.1.2 and 13.1.3: a client's conditional request is answered 304 from a fresh
/// entry, without asking the origin.
#[tokio::test]
async fn rfc9110_13_client_conditionals_are_answered_from_the_cache() {
    let (origin, _) = counting(&[
        ("cache-control", "max-age=60"),
        ("etag", "\"abc\""),
        ("last-modified", "Mon, 30 Nov 2026 10:00:00 GMT"),
    ])
    .await;
    let gw = gateway(&origin, "").await;
    get(&gw, "/c", &[]).await;
    let inm = get(&gw, "/c", &[("if-none-match", "\"abc\"")]).await;
    assert_eq!((inm.status, inm.body.as_str()), (304, ""));
    let ims = get(
        &gw,
        "/c",
        &[("if-modified-since", "Mon, 30 Nov 2026 11:00:00 GMT")],
    )
    .await;
    assert_eq!(ims.status, 304);
    let other = get(&gw, "/c", &[("if-none-match", "\"zzz\"")]).await;
    assert_eq!((other.status, other.body.as_str()), (200, "v1"));
    assert_eq!(origin.hits(), 1);
    // A conditional on a miss reaches the origin unconditional, so the 200 can be stored.
    get(&gw, "/d", &[("if-none-match", "\"abc\"")]).await;
    assert_eq!(origin.requests()[1].header("if-none-match"), None);
}

/// RFC 9111 5.2.1: the request's own directives.
#[tokio::test]
async fn rfc9111_5_2_1_request_directives_force_revalidation_or_answer_504() {
    let origin = Origin::start(|req| {
        if req.header("if-none-match") == Some("\"e\"") {
            return OriginResponse::new(304, "").header("etag", "\"e\"");
        }
        OriginResponse::new(200, "fresh")
            .header("cache-control", "max-age=60")
            .header("etag", "\"e\"")
    })
    .await;
    let gw = gateway(&origin, "").await;
    // 5.2.1.7 only-if-cached on a miss: 504, the origin is not asked.
    let missing = get(&gw, "/o", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(missing.status, 504);
    assert_eq!(
        missing.cache_status(),
        "sallyport; fwd=miss; detail=only-if-cached"
    );
    // Only a lookup can be answered from the cache: other methods are proxied as usual.
    let post = send(&gw, "POST", "/o", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(post.status, 200);
    assert_eq!(origin.hits(), 1);
    get(&gw, "/o", &[]).await;
    let cached = get(&gw, "/o", &[("cache-control", "only-if-cached")]).await;
    assert_eq!((cached.status, cached.body.as_str()), (200, "fresh"));
    // 5.2.1.4 no-cache (and max-age=0, Pragma: no-cache): validated with the origin first.
    for h in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        let before = origin.hits();
        let r = get(&gw, "/o", &[h]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "fresh"), "{h:?}");
        assert_eq!(origin.hits(), before + 1, "{h:?}");
        assert_eq!(
            origin.requests().last().unwrap().header("if-none-match"),
            Some("\"e\"")
        );
        assert!(
            r.cache_status().contains("fwd=request"),
            "{}",
            r.cache_status()
        );
    }
    // 5.2.1.3 min-fresh beyond what is left: revalidated too.
    let before = origin.hits();
    get(&gw, "/o", &[("cache-control", "min-fresh=3600")]).await;
    assert_eq!(origin.hits(), before + 1);
}

/// RFC 9111 4.4: a successful unsafe request invalidates the stored responses of its URI and
/// of a same-origin Location.
#[tokio::test]
async fn rfc9111_4_4_unsafe_methods_invalidate_the_uri() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    let origin = Origin::start(move |req| {
        let i = count.fetch_add(1, Ordering::SeqCst) + 1;
        match req.method.as_str() {
            "POST" => OriginResponse::new(201, "created").header("location", "/items/2"),
            "DELETE" => OriginResponse::new(404, "gone"),
            _ => OriginResponse::new(200, format!("v{i}")).header("cache-control", "max-age=60"),
        }
    })
    .await;
    let gw = gateway(&origin, "").await;
    get(&gw, "/items/1", &[]).await;
    get(&gw, "/items/2", &[]).await;
    assert!(get(&gw, "/items/1", &[])
        .await
        .cache_status()
        .contains("hit"));
    let post = send(&gw, "POST", "/items/1", &[]).await;
    assert_eq!(post.status, 201);
    assert!(
        post.cache_status().contains("fwd=bypass; detail=method"),
        "{}",
        post.cache_status()
    );
    assert!(get(&gw, "/items/1", &[])
        .await
        .cache_status()
        .contains("uri-miss"));
    assert!(get(&gw, "/items/2", &[])
        .await
        .cache_status()
        .contains("uri-miss"));
    // An error answer does not invalidate.
    send(&gw, "DELETE", "/items/1", &[]).await;
    assert!(get(&gw, "/items/1", &[])
        .await
        .cache_status()
        .contains("hit"));
}

/// RFC 5861 3: stale-while-revalidate serves the stale entry at once and refreshes it in the
/// background, once.
#[tokio::test]
async fn rfc5861_3_stale_while_revalidate_serves_stale_and_refreshes_once() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    let origin = Origin::start(move |_req| {
        let i = count.fetch_add(1, Ordering::SeqCst) + 1;
        if i == 1 {
            // Stale on arrival, inside its stale-while-revalidate window.
            OriginResponse::new(200, "old")
                .header("cache-control", "max-age=10, stale-while-revalidate=600")
                .header("age", "20")
        } else {
            OriginResponse::new(200, "new")
                .header("cache-control", "max-age=600")
                .delay(Duration::from_millis(200))
        }
    })
    .await;
    let gw = gateway(&origin, "").await;
    get(&gw, "/swr", &[]).await;
    let stale = get(&gw, "/swr", &[]).await;
    assert_eq!(stale.body, "old");
    assert!(
        stale.cache_status().contains("hit")
            && stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    let fresh = eventually(Duration::from_secs(5), "the background refresh", || async {
        let r = get(&gw, "/swr", &[]).await;
        (r.body == "new").then_some(r)
    })
    .await;
    assert!(fresh.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 2, "one refresh, however many stale answers");
}

/// RFC 5861 4: stale-if-error serves the stale entry when the origin answers 5xx or is gone;
/// must-revalidate forbids it (RFC 9111 5.2.2.2).
#[tokio::test]
async fn rfc5861_4_stale_if_error_when_the_upstream_fails_or_is_gone() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&n);
    let origin = Origin::start(move |req| {
        let i = count.fetch_add(1, Ordering::SeqCst) + 1;
        let cc = if req.uri == "/strict" {
            "max-age=10, stale-if-error=600, must-revalidate"
        } else {
            "max-age=10, stale-if-error=600"
        };
        if i <= 2 {
            OriginResponse::new(200, "kept")
                .header("cache-control", cc)
                .header("age", "20")
        } else {
            OriginResponse::new(503, "down")
        }
    })
    .await;
    let gw = gateway(&origin, "").await;
    get(&gw, "/sie", &[]).await;
    get(&gw, "/strict", &[]).await;
    let on_5xx = get(&gw, "/sie", &[]).await;
    assert_eq!((on_5xx.status, on_5xx.body.as_str()), (200, "kept"));
    assert!(
        on_5xx.cache_status().contains("stale-if-error"),
        "{}",
        on_5xx.cache_status()
    );
    assert_eq!(get(&gw, "/strict", &[]).await.status, 503);
    origin.stop();
    let gone = get(&gw, "/sie", &[]).await;
    assert_eq!((gone.status, gone.body.as_str()), (200, "kept"));
    assert!(get(&gw, "/strict", &[]).await.status >= 500);
    gw.access_log_lines(6).await;
    assert!(
        gw.metric_value("sallyport_cache_lookups_total{result=\"stale\",route=\"app\"}")
            .await
            >= 2.0
    );
}

/// RFC 9110 9.3.2: HEAD is answered from a stored GET response; a HEAD miss fetches (and
/// stores) the GET.
#[tokio::test]
async fn rfc9110_9_3_2_head_is_answered_from_a_get_entry() {
    let (origin, _) = counting(&[("cache-control", "max-age=60")]).await;
    let gw = gateway(&origin, "").await;
    let head = send(&gw, "HEAD", "/h", &[]).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(origin.requests()[0].method, "GET");
    let got = get(&gw, "/h", &[]).await;
    assert_eq!(got.body, "v1");
    assert!(got.cache_status().contains("hit"));
    let head = send(&gw, "HEAD", "/h", &[]).await;
    assert!(head.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 1);
}

#[tokio::test]
async fn responses_over_max_object_size_stream_whole_and_are_not_stored() {
    let origin = Origin::start(|_req| {
        OriginResponse::new(200, vec![b'z'; 4096]).header("cache-control", "max-age=60")
    })
    .await;
    let gw = gateway(&origin, "max_size = \"64KiB\"\nmax_object_size = \"1KiB\"").await;
    for _ in 0..2 {
        let r = get(&gw, "/big", &[]).await;
        assert_eq!(r.body.len(), 4096);
    }
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn entries_are_evicted_least_recently_used_at_the_budget() {
    let origin = Origin::start(|_req| {
        OriginResponse::new(200, vec![b'e'; 3000]).header("cache-control", "max-age=60")
    })
    .await;
    let gw = gateway(&origin, "max_size = \"8KiB\"\nmax_object_size = \"4KiB\"").await;
    get(&gw, "/1", &[]).await;
    get(&gw, "/2", &[]).await;
    assert!(get(&gw, "/1", &[]).await.cache_status().contains("hit"));
    get(&gw, "/3", &[]).await; // no room for three: /2 was used least recently
    assert!(get(&gw, "/1", &[]).await.cache_status().contains("hit"));
    assert!(get(&gw, "/2", &[])
        .await
        .cache_status()
        .contains("uri-miss"));
    assert!(
        gw.metric_value("sallyport_cache_evictions_total{plugin=\"edge-cache\"}")
            .await
            >= 1.0
    );
    let bytes = gw
        .metric_value("sallyport_cache_bytes{plugin=\"edge-cache\"}")
        .await;
    assert!(bytes > 0.0 && bytes <= 8192.0, "{bytes}");
}

/// Request coalescing: concurrent misses for one key wait behind the one that went upstream.
#[tokio::test]
async fn fifty_concurrent_misses_make_one_upstream_request() {
    let origin = Origin::start(|_req| {
        OriginResponse::new(200, "once")
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(500))
    })
    .await;
    let gw = gateway(&origin, "").await;
    let url = gw.url("/hot");
    let c = client();
    let all = futures_util::future::join_all((0..50).map(|_| {
        let c = c.clone();
        let url = url.clone();
        async move { c.get(url).send().await.unwrap().text().await.unwrap() }
    }))
    .await;
    assert!(all.iter().all(|b| b == "once"));
    assert_eq!(origin.hits(), 1);
}

fn token(sub: &str) -> String {
    hs256(SECRET, serde_json::json!({"sub": sub, "tenant": "acme"}))
}

/// Identity (RFC 9111 3.5): two users' responses never cross unless the origin says `public`.
#[tokio::test]
async fn rfc9111_3_5_two_users_never_share_an_entry_unless_it_is_public() {
    let origin = Origin::start(|req| {
        let user = req.header("x-user-id").unwrap_or("anonymous").to_string();
        let cc = if req.uri == "/public" {
            "public, max-age=60"
        } else {
            "max-age=60"
        };
        OriginResponse::new(200, format!("me={user}")).header("cache-control", cc)
    })
    .await;
    let jwt = format!(
        "[plugins.jwt]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"{SECRET}\"\n\
         forward_claims = {{ sub = \"x-user-id\" }}\n"
    );
    let gw = gateway_with(&origin, "", &["jwt"], &jwt).await;
    let alice = format!("Bearer {}", token("alice"));
    let bob = format!("Bearer {}", token("bob"));
    for _ in 0..3 {
        for (auth, want) in [(&alice, "me=alice"), (&bob, "me=bob")] {
            let r = get(&gw, "/api/me", &[("authorization", auth)]).await;
            assert_eq!(r.body, want);
        }
    }
    assert_eq!(origin.hits(), 2, "each user's entry is reused");
    // A fresh token of the same user hits the same entry (keyed by the verified subject).
    let alice_again = format!("Bearer {}", token("alice"));
    assert!(get(&gw, "/api/me", &[("authorization", &alice_again)])
        .await
        .cache_status()
        .contains("hit"));
    // `public` is shared by both.
    assert_eq!(
        get(&gw, "/public", &[("authorization", &alice)]).await.body,
        "me=alice"
    );
    let shared = get(&gw, "/public", &[("authorization", &bob)]).await;
    assert_eq!(shared.body, "me=alice");
    assert!(shared.cache_status().contains("hit"));
    assert_eq!(origin.hits(), 3);
}

/// Without a verifying plugin, credentials still partition: two Authorization headers (or
/// cookies) never share a private entry. With `shared_when_authenticated = true` nothing of a
/// credentialed request is stored unless the response says it may be shared.
#[tokio::test]
async fn rfc9111_3_5_unverified_credentials_partition_or_bypass() {
    let origin = Origin::start(|req| {
        let who = req
            .header("authorization")
            .or(req.header("cookie"))
            .unwrap_or("anonymous")
            .to_string();
        OriginResponse::new(200, who).header("cache-control", "max-age=60")
    })
    .await;
    let gw = gateway(&origin, "").await;
    for _ in 0..2 {
        assert_eq!(
            get(&gw, "/p", &[("authorization", "Basic YTpi")])
                .await
                .body,
            "Basic YTpi"
        );
        assert_eq!(get(&gw, "/p", &[("cookie", "sid=2")]).await.body, "sid=2");
        assert_eq!(get(&gw, "/p", &[]).await.body, "anonymous");
    }
    assert_eq!(origin.hits(), 3);

    let strict = gateway(&origin, "shared_when_authenticated = true").await;
    let before = origin.hits();
    for _ in 0..2 {
        let r = get(&strict, "/q", &[("authorization", "Basic YTpi")]).await;
        assert!(
            r.cache_status().contains("detail=authenticated"),
            "{}",
            r.cache_status()
        );
    }
    get(&strict, "/q", &[]).await; // anonymous: stored
    let r = get(&strict, "/q", &[("authorization", "Basic YTpi")]).await;
    assert_eq!(r.body, "Basic YTpi", "not given the anonymous entry");
    assert_eq!(origin.hits(), before + 4);
}

#[tokio::test]
async fn admin_purge_by_url_and_prefix_and_never_on_the_public_listener() {
    let origin = Origin::start(|req| match req.method.as_str() {
        "GET" => OriginResponse::new(200, "x").header("cache-control", "max-age=60"),
        _ => OriginResponse::new(405, "").header("allow", "GET"),
    })
    .await;
    let gw = gateway(&origin, "").await;
    for p in ["/api/items/1", "/api/items/2", "/api/other"] {
        get(&gw, p, &[]).await;
    }
    // PURGE on the public listener is an ordinary request (an unsafe method the origin
    // refuses, so nothing is invalidated either).
    let _ = send(&gw, "PURGE", "/api/items/1", &[]).await;
    assert!(get(&gw, "/api/items/1", &[])
        .await
        .cache_status()
        .contains("hit"));
    let admin = format!("http://{}/cache/purge", gw.admin);
    let purge = |body: &'static str| {
        let admin = admin.clone();
        async move {
            let r = client().post(admin).body(body).send().await.unwrap();
            (r.status().as_u16(), json(r).await)
        }
    };
    let (status, body) = purge(r#"{"url": "/api/items/1"}"#).await;
    assert_eq!((status, body["purged"].as_u64()), (200, Some(1)));
    assert!(get(&gw, "/api/items/1", &[])
        .await
        .cache_status()
        .contains("uri-miss"));
    let (_, body) = purge(r#"{"prefix": "/api/items/"}"#).await;
    assert_eq!(body["purged"].as_u64(), Some(2));
    assert!(get(&gw, "/api/other", &[])
        .await
        .cache_status()
        .contains("hit"));
    let (status, body) = purge(r#"{"path": "/x"}"#).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let r = client().get(&admin).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn a_cache_hit_still_counts_against_the_quota() {
    let (origin, _) = counting(&[("cache-control", "max-age=60")]).await;
    let quota = "[plugins.q]\ntype = \"quota\"\nlimit = 2\nwindow = \"1m\"\nkey = \"ip\"\n";
    let gw = gateway_with(&origin, "", &["q"], quota).await;
    assert_eq!(get(&gw, "/x", &[]).await.status, 200);
    assert_eq!(get(&gw, "/x", &[]).await.status, 200);
    assert_eq!(get(&gw, "/x", &[]).await.status, 429);
    assert_eq!(origin.hits(), 1);
}

#[test]
fn invalid_cache_settings_are_config_errors_with_their_path() {
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n\
         [plugins.c]\ntype = \"cache\"\nmax_size = \"1MiB\"\nmax_object_size = \"2MiB\"\nkey_headers = [\"bad header\"]\n",
    );
    assert_ne!(code, 0);
    assert!(err.contains("plugins.c.max_object_size"), "{err}");
    assert!(err.contains("plugins.c.key_headers[0]"), "{err}");
    let (code, _, err) = check(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[plugins.c]\ntype = \"cache\"\nmax_sise = 1\n",
    );
    assert_ne!(code, 0);
    assert!(err.contains("max_sise"), "{err}");
}

/// An aggregate answers in its own request_filter, before Pingora's cache: a cache plugin
/// listed ahead of it keeps the merged answer (per caller when the request has credentials).
#[tokio::test]
async fn aggregate_answers_are_cached_too_and_per_caller() {
    let (origin, _) = counting(&[("content-type", "application/json")]).await;
    let origin_json = Origin::start(|req| {
        OriginResponse::new(
            200,
            format!(
                "{{\"for\":\"{}\"}}",
                req.header("authorization").unwrap_or("anonymous")
            ),
        )
        .header("content-type", "application/json")
    })
    .await;
    drop(origin);
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.edge-cache]\ntype = \"cache\"\n\
         [plugins.dash]\ntype = \"aggregate\"\ncache_control = \"max-age=60\"\nforward_headers = [\"authorization\"]\ncalls = [{{ name = \"me\", upstream = \"app\", path = \"/me\" }}]\n\
         [[routes]]\nname = \"dash\"\npath = \"/dash\"\nmethods = [\"GET\"]\nplugins = [\"edge-cache\", \"dash\"]\n",
        server(""),
        origin_json.addr
    );
    let gw = Gateway::start(&config).await;
    let first = get(&gw, "/dash", &[]).await;
    assert_eq!(first.status, 200);
    assert!(
        first.cache_status().contains("fwd=uri-miss") && first.cache_status().contains("stored"),
        "{}",
        first.cache_status()
    );
    let second = get(&gw, "/dash", &[]).await;
    assert_eq!(second.body, first.body);
    assert!(
        second.cache_status().starts_with("sallyport; hit"),
        "{}",
        second.cache_status()
    );
    assert!(second.header("age").parse::<u64>().is_ok());
    assert_eq!(origin_json.hits(), 1);
    // Two callers never share an answer made for one of them.
    let alice = get(&gw, "/dash", &[("authorization", "Bearer alice")]).await;
    let bob = get(&gw, "/dash", &[("authorization", "Bearer bob")]).await;
    assert!(
        alice.body.contains("alice") && bob.body.contains("bob"),
        "{} {}",
        alice.body,
        bob.body
    );
    assert_eq!(
        get(&gw, "/dash", &[("authorization", "Bearer alice")])
            .await
            .body,
        alice.body
    );
    assert_eq!(origin_json.hits(), 3);
}
