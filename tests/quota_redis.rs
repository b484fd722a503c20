//! Fleet-wide quotas: two gateways sharing a real `redis-server`, Redis going away and
//! coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{Duration, Instant};

use support::*;

async fn gateway(up: &MockServer, redis: &str, on_error: &str, limit: u64) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.fleet]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = {limit}\nwindow = \"1h\"\n\
         store = \"redis\"\nredis_url = \"{redis}\"\nredis_timeout = \"200ms\"\non_store_error = \"{on_error}\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"app\"\nplugins = [\"fleet\"]\n",
        server(""),
        up.addr()
    );
    Gateway::start(&config).await
}

async fn status(c: &reqwest::Client, gw: &Gateway, client_id: &str) -> (u16, bool) {
    let r = c
        .get(gw.url("/x"))
        .header("x-client", client_id)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.headers().contains_key("ratelimit"))
}

#[tokio::test]
async fn two_gateways_share_one_quota() {
    let up = mock("app").await;
    let redis = RedisServer::start().await;
    let (a, b) = (
        gateway(&up, &redis.url(), "allow", 40).await,
        gateway(&up, &redis.url(), "allow", 40).await,
    );
    let c = client();
    let mut allowed = 0;
    for i in 0..100 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if status(&c, gw, "shared").await.0 == 200 {
            allowed += 1;
        }
    }
    assert!(
        (38..=42).contains(&allowed),
        "allowed {allowed} of a shared limit of 40"
    );
    // Another key is untouched.
    assert_eq!(status(&c, &b, "other").await.0, 200);
}

#[tokio::test]
async fn redis_down_follows_on_store_error_and_recovers() {
    let up = mock("app").await;
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let allow = gateway(&up, &redis.url(), "allow", 3).await;
    let deny = gateway(&up, &redis.url(), "deny", 3).await;
    let c = client();
    assert_eq!(status(&c, &allow, "k").await, (200, true));

    redis.stop();
    for _ in 0..3 {
        let (s, counted) = status(&c, &allow, "k").await;
        assert_eq!(
            (s, counted),
            (200, false),
            "allowed uncounted while Redis is down"
        );
    }
    let r = c
        .get(deny.url("/x"))
        .header("x-client", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(json(r).await["error"]["code"], "quota_unavailable");
    assert!(
        allow
            .metric_value("sallyport_quota_store_errors_total{plugin=\"fleet\"}")
            .await
            >= 3.0
    );
    assert!(
        allow
            .metric_value("sallyport_quota_decisions_total{decision=\"store_error_allowed\",plugin=\"fleet\",route=\"api\"}")
            .await
            >= 3.0
    );

    // Redis comes back (empty): both gateways reconnect by themselves and share again.
    let _redis = RedisServer::start_on(port).await;
    eventually(
        Duration::from_secs(15),
        "gateways reconnect to Redis",
        || async {
            let (a, b) = (
                status(&c, &allow, "fresh").await,
                status(&c, &deny, "fresh").await,
            );
            (a.1 && b.1).then_some(())
        },
    )
    .await;
    // "fresh" has used 2 of its 3 (one per gateway) once both reconnected; the loop may have
    // counted a few more on one side, so count what is left across both.
    let mut allowed_after = 0;
    for i in 0..6 {
        let gw = if i % 2 == 0 { &allow } else { &deny };
        if status(&c, gw, "fresh").await.0 == 200 {
            allowed_after += 1;
        }
    }
    assert!(
        allowed_after <= 1,
        "shared enforcement resumed ({allowed_after} more allowed)"
    );
}

#[tokio::test]
async fn slow_redis_is_a_store_error_not_a_stall() {
    let up = mock("app").await;
    let redis = RedisServer::start().await;
    let allow = gateway(&up, &redis.url(), "allow", 100).await;
    let deny = gateway(&up, &redis.url(), "deny", 100).await;
    let c = client();
    // Both connected and counting.
    assert_eq!(status(&c, &allow, "k").await, (200, true));
    assert_eq!(status(&c, &deny, "k").await, (200, true));

    // Redis stops answering scripts (until CLIENT UNPAUSE); the gateways give up after
    // redis_timeout (200 ms) and apply their policy.
    assert_eq!(
        redis.command(&["CLIENT", "PAUSE", "30000", "WRITE"]).await,
        "+OK\r\n"
    );
    let started = Instant::now();
    assert_eq!(status(&c, &allow, "k").await, (200, false));
    let r = c
        .get(deny.url("/x"))
        .header("x-client", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "answered while Redis was paused ({:?})",
        started.elapsed()
    );
    // After a failure Redis is left alone for a moment: a run of requests does not pay the
    // timeout each (20 x 200 ms would be 4 s).
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(status(&c, &allow, "k").await, (200, false));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "20 requests took {:?}",
        started.elapsed()
    );
    assert!(
        deny.metric_value("sallyport_quota_decisions_total{decision=\"store_error_denied\",plugin=\"fleet\",route=\"api\"}")
            .await
            >= 1.0
    );

    // When Redis answers again, counting resumes on the same connection.
    assert_eq!(redis.command(&["CLIENT", "UNPAUSE"]).await, "+OK\r\n");
    for gw in [&deny, &allow] {
        eventually(
            Duration::from_secs(15),
            "counting resumes after the pause",
            || async { (status(&c, gw, "k").await == (200, true)).then_some(()) },
        )
        .await;
    }
    // One warning for the outage and one note for the recovery, not one line per request.
    let log = deny.stderr();
    assert_eq!(
        log.matches("applying on_store_error until Redis answers")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("Redis answers again").count(), 1, "{log}");
}

#[tokio::test]
async fn local_fallback_while_redis_is_away_then_shared_under_the_key_prefix() {
    let up = mock("app").await;
    // Redis is not running yet when the gateways start: they serve anyway.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let config = |limit: u64| {
        format!(
            "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
             [plugins.fleet]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = {limit}\nwindow = \"1h\"\n\
             store = \"redis\"\nredis_url = \"{url}\"\nredis_timeout = \"200ms\"\non_store_error = \"local\"\nkey_prefix = \"acme:rl\"\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"app\"\nplugins = [\"fleet\"]\n",
            server(""),
            up.addr()
        )
    };
    let a = Gateway::start(&config(3)).await;
    let b = Gateway::start(&config(3)).await;
    let c = client();
    // Counted in each gateway's memory: 3 each, with headers, then 429.
    for gw in [&a, &b] {
        for _ in 0..3 {
            assert_eq!(status(&c, gw, "k").await, (200, true));
        }
        assert_eq!(status(&c, gw, "k").await.0, 429);
    }
    assert!(
        a.metric_value("sallyport_quota_decisions_total{decision=\"store_error_local\",plugin=\"fleet\",route=\"api\"}")
            .await
            >= 4.0
    );

    // Redis appears: both gateways connect by themselves and count there, under key_prefix.
    let redis = RedisServer::start_on(port).await;
    let probe = std::cell::Cell::new(0);
    eventually(
        Duration::from_secs(15),
        "gateways connect to Redis",
        || async {
            if !redis.keys("acme:rl:fleet:*").await.is_empty() {
                return Some(());
            }
            probe.set(probe.get() + 1);
            status(&c, &a, &format!("probe-{}", probe.get())).await;
            status(&c, &b, &format!("probe-{}", probe.get())).await;
            None
        },
    )
    .await;
    // Let both settle: a request whose key shows up in Redis proves that gateway counts there.
    for (i, gw) in [&a, &b].into_iter().enumerate() {
        let n = std::cell::Cell::new(0);
        eventually(
            Duration::from_secs(15),
            "each gateway counts in Redis",
            || async {
                n.set(n.get() + 1);
                let key = format!("settle-{i}-{}", n.get());
                status(&c, gw, &key).await;
                (!redis
                    .keys(&format!("acme:rl:fleet:{{*{key}}}:*"))
                    .await
                    .is_empty())
                .then_some(())
            },
        )
        .await;
    }
    // Shared again: 3 in total across both gateways.
    let mut allowed = 0;
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if status(&c, gw, "shared").await.0 == 200 {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "one quota across both gateways");
    let keys = redis.keys("*shared*").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("acme:rl:fleet:{"), "{keys:?}");
}
