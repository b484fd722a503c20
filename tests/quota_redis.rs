//! Fleet-wide quotas: two gateways sharing a real `redis-server`, Redis going away and
//! coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

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
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (a, b) = (
            status(&c, &allow, "fresh").await,
            status(&c, &deny, "fresh").await,
        );
        if a.1 && b.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateways did not reconnect to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
