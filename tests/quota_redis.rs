//! Fleet-wide quotas: two gateways sharing a real `redis-server`, Redis going away and
//! coming back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;
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

/// A gateway whose quota `fleet` (per `x-client`, `limit` an hour) uses the Redis the
/// `store` lines name (`redis_url`, `redis_cluster` or `redis_sentinel`).
async fn gateway_on(up: &MockServer, store: &str, on_error: &str, limit: u64) -> Gateway {
    let config = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n\
         [plugins.fleet]\ntype = \"quota\"\nkey = \"header:x-client\"\nlimit = {limit}\nwindow = \"1h\"\n\
         store = \"redis\"\n{store}\nredis_timeout = \"200ms\"\non_store_error = \"{on_error}\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/\"\nupstream = \"app\"\nplugins = [\"fleet\"]\n",
        server(""),
        up.addr()
    );
    Gateway::start(&config).await
}

/// A 3-master Redis Cluster on loopback (no replicas), created with `redis-cli --cluster`.
async fn redis_cluster(dir: &std::path::Path) -> Vec<RedisServer> {
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let dir = dir.to_path_buf();
        nodes.push(
            RedisServer::start_with(move |port| {
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    dir.join(format!("nodes-{port}.conf")).display().to_string(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                    "--dir".into(),
                    dir.display().to_string(),
                ]
            })
            .await,
        );
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for n in &nodes {
        eventually(Duration::from_secs(20), "the cluster is up", || async {
            n.cli(&["cluster", "info"])
                .contains("cluster_state:ok")
                .then_some(())
        })
        .await;
    }
    nodes
}

#[tokio::test]
async fn three_gateways_share_one_quota_on_a_redis_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = redis_cluster(dir.path()).await;
    let up = mock("app").await;
    // Seeded with one node: the gateway learns the others from it.
    let store = format!("redis_cluster = [\"{}\"]", nodes[1].url());
    let gateways = [
        gateway_on(&up, &store, "deny", 1000).await,
        gateway_on(&up, &store, "deny", 1000).await,
        gateway_on(&up, &store, "deny", 1000).await,
    ];
    let c = client();
    // 3,000 requests of one client, 30 at a time, spread over the three gateways.
    let counts = futures_util::future::join_all((0..30).map(|task| {
        let (c, gateways) = (c.clone(), &gateways);
        async move {
            let mut n = std::collections::BTreeMap::<u16, usize>::new();
            for i in 0..100 {
                let gw = &gateways[(task + i) % 3];
                *n.entry(status(&c, gw, "shared").await.0).or_default() += 1;
            }
            n
        }
    }))
    .await;
    let mut total = std::collections::BTreeMap::<u16, usize>::new();
    for n in counts {
        for (s, k) in n {
            *total.entry(s).or_default() += k;
        }
    }
    let allowed = total.get(&200).copied().unwrap_or(0);
    assert!(
        (980..=1020).contains(&allowed),
        "allowed {allowed} of a shared limit of 1000: {total:?}"
    );
    assert_eq!(
        total.get(&429).copied().unwrap_or(0) + allowed,
        3000,
        "no store errors (503): {total:?}"
    );
    // Other clients hash to other slots (other masters) and are counted on their own.
    let mut slots = std::collections::BTreeSet::new();
    for i in 0..12 {
        let key = format!("client-{i}");
        assert_eq!(status(&c, &gateways[i % 3], &key).await, (200, true));
        let slot = nodes[0].cli(&["cluster", "keyslot", &format!("{{{key}}}")]);
        slots.insert(slot);
    }
    assert!(slots.len() > 1, "keys spread over slots: {slots:?}");
    let masters_used = nodes
        .iter()
        .filter(|n| n.cli(&["dbsize"]).parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(masters_used >= 2, "counters on {masters_used} of 3 masters");

    // A key with braces (from a header) cannot end the hash tag early: it is counted like
    // any other, and the store stays up for everyone.
    for gw in &gateways {
        assert_eq!(status(&c, gw, "}x{").await, (200, true));
    }
    assert_eq!(status(&c, &gateways[0], "client-0").await, (200, true));
}

/// A master, its replica and one Sentinel watching them as `sallyport` (quorum 1, down after
/// 1 s), ready to fail over: the Sentinel knows the replica and the replica is in sync.
async fn sentinel_setup(dir: &std::path::Path) -> (RedisServer, RedisServer, RedisServer) {
    let master = RedisServer::start().await;
    let master_port = master.port;
    // The replica writes the master's snapshot to its folder: keep it in the test's.
    let replica_dir = dir.display().to_string();
    let replica = RedisServer::start_with(move |_| {
        vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master_port.to_string(),
            "--dir".into(),
            replica_dir.clone(),
        ]
    })
    .await;
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "sentinel monitor sallyport 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds sallyport 1000\n\
             sentinel failover-timeout sallyport 10000\n"
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    let sentinel = RedisServer::start_with(move |_| vec![conf.clone(), "--sentinel".into()]).await;
    eventually(
        Duration::from_secs(30),
        "the replica is in sync and the Sentinel knows it",
        || async {
            let synced = replica
                .cli(&["info", "replication"])
                .contains("master_link_status:up");
            let known = sentinel
                .cli(&["sentinel", "replicas", "sallyport"])
                .contains(&replica.port.to_string());
            (synced && known).then_some(())
        },
    )
    .await;
    (master, replica, sentinel)
}

#[tokio::test]
async fn sentinel_failover_is_survived_without_5xx_and_enforcement_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut master, replica, sentinel) = sentinel_setup(dir.path()).await;
    let up = mock("app").await;
    let store = format!(
        "redis_sentinel = {{ master = \"sallyport\", nodes = [\"{}\"] }}",
        sentinel.url()
    );
    let gw = gateway_on(&up, &store, "allow", 3).await;
    let c = client();
    assert_eq!(status(&c, &gw, "before").await, (200, true));

    // Under load (a fresh client per request, so every answer is a 200: counted with
    // RateLimit headers, or allowed uncounted while the store is away), the master dies.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (c, url, stop) = (c.clone(), gw.url("/x"), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let r = c
                    .get(&url)
                    .header("x-client", format!("load-{i}"))
                    .send()
                    .await
                    .unwrap();
                seen.push((
                    Instant::now(),
                    r.status().as_u16(),
                    r.headers().contains_key("ratelimit"),
                ));
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    master.stop();
    // The Sentinel promotes the replica.
    eventually(
        Duration::from_secs(30),
        "the replica is promoted",
        || async {
            replica
                .cli(&["info", "replication"])
                .contains("role:master")
                .then_some(())
        },
    )
    .await;
    // Counting resumes on the new master without a restart.
    eventually(
        Duration::from_secs(30),
        "decisions resume on the new master",
        || async { (status(&c, &gw, "probe").await == (200, true)).then_some(()) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = load.await.unwrap();
    let failures: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failures.is_empty(), "non-200 during failover: {failures:?}");
    let uncounted_after = seen
        .iter()
        .filter(|(t, _, counted)| *t > killed && !counted)
        .count();
    // The gap: from the kill to the first counted answer after the outage was noticed.
    let noticed = seen
        .iter()
        .find(|(t, _, counted)| *t > killed && !counted)
        .map(|(t, _, _)| *t);
    let resumed = seen
        .iter()
        .find(|(t, _, counted)| noticed.is_some_and(|n| *t > n) && *counted)
        .map(|(t, _, _)| t.duration_since(killed));
    eprintln!(
        "sentinel failover: {} requests during the test, {uncounted_after} allowed uncounted \
         after the kill, counting resumed {resumed:?} after it (the load loop may stop first)",
        seen.len()
    );
    assert!(uncounted_after > 0, "the outage was noticed");

    // Enforced again: 3 an hour.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(status(&c, &gw, "after").await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}
