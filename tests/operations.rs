//! Operating the gateway: config checks, refusing bad configs, SIGHUP reload under traffic,
//! admin endpoints and metrics, access-log hygiene, graceful shutdown and upgrade.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn config(up: &MockServer, rewrite: &str) -> String {
    format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/api\"\nupstream = \"app\"\nrewrite_prefix = \"{rewrite}\"\n",
        server(""),
        up.addr()
    )
}

const BROKEN: &str = r#"
[server]
listen = ["127.0.0.1:1", "not-an-address"]
plugins = ["missing"]
[upstreams.a]
endpoints = []
[upstreams.a.health]
interval = "0s"
[[routes]]
name = "x"
upstream = "nope"
[[routes]]
name = "x"
path_prefix = "/y"
plugins = ["ghost"]
"#;

#[test]
fn check_prints_every_error_with_its_path() {
    let (code, _out, err) = check(BROKEN);
    assert_eq!(code, 1, "{err}");
    for path in [
        "server.listen[1]",
        "server.plugins[0]",
        "upstreams.a.endpoints",
        "upstreams.a.health.interval",
        "routes[0].upstream",
        "routes[1].name",
        "routes[1].plugins[0]",
        "routes[1].upstream",
    ] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }
    let (code, out, err) =
        check("[server]\nlisten = [\"127.0.0.1:8080\"]\n[plugins.p]\ntype = \"teleport\"\n");
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("plugins.p") && err.contains("teleport"),
        "{err}"
    );
    let (code, out, _) = check(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../conf/sallyport.toml"
        ))
        .unwrap(),
    );
    assert_eq!(code, 0, "the reference config is valid");
    assert!(out.contains("ok"));
}

#[test]
fn the_shipped_configs_are_valid() {
    for file in ["conf/sallyport.toml", "conf/demo.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(file);
        let (code, out, err) = check_file(&path);
        assert_eq!(code, 0, "{file}: {out}{err}");
    }
}

#[tokio::test]
async fn refuses_to_start_on_a_bad_config() {
    let mut gw = Gateway::spawn(&format!(
        "{}\n[[routes]]\nname = \"r\"\nupstream = \"nope\"\n",
        server("")
    ))
    .await;
    let status = gw.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1));
    let err = gw.stderr();
    assert!(
        err.contains("refusing to start") && err.contains("routes[0].upstream"),
        "{err}"
    );
}

#[tokio::test]
async fn sighup_reload_under_traffic_never_fails_a_request() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(&up, "/v1")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, url) = (Arc::clone(&stop), Arc::clone(&ok), gw.url("/api/x"));
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    let wait_uri = |want: &'static str| {
        let up = &up;
        eventually(Duration::from_secs(10), want, move || async move {
            up.requests()
                .last()
                .is_some_and(|r| r.uri.starts_with(want))
                .then_some(())
        })
    };
    wait_uri("/v1/").await;
    gw.write_config(&config(&up, "/v2"));
    assert_eq!(gw.reload().await, "ok");
    wait_uri("/v2/").await;
    // A broken file: the running config stays.
    gw.write_config(
        "[server]\nlisten = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nupstream = \"gone\"\n",
    );
    assert_eq!(gw.reload().await, "error");
    up.clear();
    let before = ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "20 more requests after the failed reload",
        || std::future::ready((ok.load(Ordering::Relaxed) >= before + 20).then_some(())),
    )
    .await;
    assert!(up.requests().iter().all(|r| r.uri.starts_with("/v2/")));
    gw.write_config(&config(&up, "/v3"));
    assert_eq!(gw.reload().await, "ok");
    wait_uri("/v3/").await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let failures = w.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during reloads: {failures:?}"
        );
    }
    assert!(ok.load(Ordering::Relaxed) > 40);
    assert!(
        gw.stderr().contains("routes[0].upstream"),
        "the rejected reload says why"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("sallyport_config_reloads_total{result=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sallyport_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_endpoints_and_metric_names() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(&up, "/")).await;
    let c = client();
    for path in ["/api/a", "/api/b", "/nope"] {
        c.get(gw.url(path)).send().await.unwrap();
    }
    c.request(
        reqwest::Method::from_bytes(b"WEIRD").unwrap(),
        gw.url("/api/x"),
    )
    .send()
    .await
    .unwrap();
    let admin = |p: &str| format!("http://{}{p}", gw.admin);
    assert_eq!(c.get(admin("/healthz")).send().await.unwrap().status(), 200);
    let ready = c.get(admin("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(json(ready).await["ready"], true);
    assert_eq!(c.get(admin("/other")).send().await.unwrap().status(), 404);
    let m = gw.metrics().await;
    for needle in [
        "sallyport_requests_total{method=\"GET\",route=\"app\",status=\"200\"} 2",
        "sallyport_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
        "sallyport_requests_total{method=\"OTHER\",route=\"app\",status=\"200\"} 1",
        "sallyport_request_duration_seconds_bucket{route=\"app\",le=\"+Inf\"} 3",
        "sallyport_upstream_requests_total{outcome=\"2xx\",upstream=\"app\"} 3",
        "sallyport_upstream_endpoint_healthy{endpoint=",
        "sallyport_config_reloads_total{result=\"ok\"} 0",
    ] {
        assert!(m.contains(needle), "missing {needle} in:\n{m}");
    }
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(m.as_bytes())?;
            child.wait_with_output()
        })
    {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn access_log_has_one_line_per_request_and_no_secrets() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(&up, "/")).await;
    let c = client();
    c.get(gw.url("/api/orders?api_key=s3cr3t-key&token=s3cr3t-token"))
        .header("authorization", "Bearer s3cr3t-bearer")
        .header("cookie", "session=s3cr3t-cookie")
        .header("x-api-key", "s3cr3t-header")
        .send()
        .await
        .unwrap();
    raw_get(
        gw.addr,
        "/api/%zz?token=s3cr3t-q",
        &[("authorization", "Basic s3cr3t-basic")],
    )
    .await;
    let lines = gw.access_log_lines(2).await;
    assert_eq!(lines.len(), 2);
    let out = gw.stdout() + &gw.stderr();
    assert!(!out.contains("s3cr3t"), "a secret reached the logs:\n{out}");
    // A line is written after its response is sent, so the two may land in either order.
    let first = lines
        .iter()
        .find(|l| l["status"] == 200)
        .expect("the proxied request's line");
    let bad = lines
        .iter()
        .find(|l| l["status"] == 400)
        .expect("the bad path's line");
    assert_eq!(first["route"], "app");
    assert_eq!(first["status"], 200);
    assert_eq!(first["path"], "/api/orders");
    assert_eq!(first["upstream"], "app");
    assert!(first["duration_ms"].as_f64().is_some());
    assert!(first["request_id"].as_str().is_some_and(|s| s.len() == 32));
    assert_eq!(bad["error"], "bad_path");
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish() {
    let up = mock("app").await;
    let mut gw = Gateway::start(&config(&up, "/")).await;
    let url = gw.url("/api/slow");
    let in_flight = tokio::spawn(async move {
        client()
            .get(url)
            .header("x-mock-delay", "400ms")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Wait until the request reached the upstream, then ask the gateway to stop.
    eventually(
        Duration::from_secs(5),
        "the request reached the upstream",
        || async { (!up.requests().is_empty()).then_some(()) },
    )
    .await;
    gw.signal("TERM");
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success() || status.code().is_none(), "{status}");
}

/// Clients opening a fresh connection for every request, until stopped: (ok, failures).
fn fresh_connection_traffic(
    url: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut ok = 0usize;
        while !stop.load(Ordering::Relaxed) {
            // A fresh connection each time: a refused or dropped connection shows up here.
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            match c.get(&url).send().await {
                Ok(r) if r.status() == 200 => ok += 1,
                Ok(r) => failures.push(format!("status {}", r.status())),
                Err(e) => failures.push(format!("{e:?}")),
            }
        }
        (ok, failures)
    })
}

/// Waits until a `-u` process listens on the upgrade socket (it then takes the listeners on
/// SIGQUIT), or panics with its stderr if it died.
async fn wait_for_taker(next: &mut Gateway, sock: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("the new process listens on {sock}"),
        || {
            if let Some(status) = next.try_wait() {
                panic!("the new process exited with {status}:\n{}", next.stderr());
            }
            std::future::ready(sallyport::handover::upgrade_taker_waiting(sock).then_some(()))
        },
    )
    .await;
}

/// Ten zero-downtime upgrades in a row under clients that open a fresh connection for every
/// request: not one request may fail (refused, reset, or closed without an answer).
#[tokio::test]
async fn upgrade_hands_over_listeners_without_refusing_connections() {
    let up = mock("app").await;
    let mut current = Gateway::start(&config(&up, "/")).await;
    let sock = current
        .dir
        .path()
        .join("upgrade.sock")
        .display()
        .to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = (0..2)
        .map(|_| fresh_connection_traffic(current.url("/api/x"), Arc::clone(&stop)))
        .collect();
    let mut retired = Vec::new();
    for _ in 0..10 {
        let mut next = current.spawn_upgrade();
        wait_for_taker(&mut next, &sock).await;
        current.signal("QUIT");
        // The new process stops listening on the upgrade socket once it has the listeners.
        eventually(
            Duration::from_secs(10),
            "the listeners are handed over",
            || async { (!sallyport::handover::upgrade_taker_waiting(&sock)).then_some(()) },
        )
        .await;
        retired.push(std::mem::replace(&mut current, next));
    }
    let served_by_new = client()
        .get(current.url("/api/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(served_by_new.status(), 200);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    for t in traffic {
        let (n, f) = t.await.unwrap();
        ok += n;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during 10 upgrades: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 100, "{ok}");
    for mut old in retired {
        let status = old.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "{status}: {}", old.stderr());
    }
}

/// `-u` with a bad config exits non-zero before touching the sockets, and a SIGQUIT with
/// nobody waiting for the listeners is refused: the running gateway keeps serving.
#[tokio::test]
async fn a_failed_upgrade_leaves_the_old_process_serving() {
    let up = mock("app").await;
    let mut old = Gateway::start(&config(&up, "/")).await;
    let good = std::fs::read_to_string(&old.config_path).unwrap();
    std::fs::write(
        &old.config_path,
        good.replace("upstream = \"app\"", "upstream = \"gone\""),
    )
    .unwrap();
    let mut new = old.spawn_upgrade();
    let status = new.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1), "{}", new.stderr());
    assert!(
        new.stderr().contains("routes[0].upstream"),
        "{}",
        new.stderr()
    );
    // The operator signals anyway.
    old.signal("QUIT");
    let c = client();
    for i in 0..20 {
        let r = c
            .get(old.url(&format!("/api/still/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(old.try_wait(), None, "the old process must keep running");
    assert!(old.stderr().contains("SIGQUIT ignored"), "{}", old.stderr());
}

/// Two instances with the same run directory would share the upgrade socket and pid file:
/// the second refuses to start, saying which process holds them.
#[tokio::test]
async fn a_second_instance_on_the_same_run_files_refuses_to_start() {
    let up = mock("app").await;
    let first = Gateway::start(&config(&up, "/")).await;
    let pid_file = first.dir.path().join("sallyport.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        first.pid().to_string()
    );
    let shared_files = format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        server("")
            .replace("{{dir}}/upgrade.sock", &first.dir.path().join("upgrade.sock").display().to_string())
            .replace("{{dir}}/sallyport.pid", &pid_file.display().to_string()),
        up.addr()
    );
    let mut second = Gateway::spawn(&shared_files).await;
    let status = second.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1));
    let err = second.stderr();
    assert!(
        err.contains("another sallyport") && err.contains(&first.pid().to_string()),
        "{err}"
    );
}

#[test]
fn run_files_default_to_a_directory_named_after_the_config_path() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    let text = "[server]\nlisten = [\"127.0.0.1:8080\"]\n";
    std::fs::write(&a, text).unwrap();
    std::fs::write(&b, text).unwrap();
    let server = sallyport::config::parse(text).unwrap().server;
    let (fa, fb) = (
        sallyport::config::RunFiles::of(&server, &a),
        sallyport::config::RunFiles::of(&server, &b),
    );
    assert_ne!(fa.upgrade_sock, fb.upgrade_sock, "two configs, two sockets");
    assert_ne!(fa.pid_file, fb.pid_file);
    // The same file named another way is the same instance (the old and new process of an
    // upgrade must agree).
    let again = sallyport::config::RunFiles::of(&server, &dir.path().join(".").join("a.toml"));
    assert_eq!(fa, again);
    let with_dir = sallyport::config::parse(&format!("{text}run_dir = \"/run/sp\"\n"))
        .unwrap()
        .server;
    let f = sallyport::config::RunFiles::of(&with_dir, &a);
    assert_eq!(f.upgrade_sock, "/run/sp/upgrade.sock");
    assert_eq!(f.pid_file, "/run/sp/sallyport.pid");
}

/// SIGHUP's default action is to terminate: one arriving while the process starts (here: while
/// it waits to read its config from a FIFO) must be survived, not kill it with exit 129.
#[tokio::test]
async fn sighup_during_start_up_does_not_kill_the_gateway() {
    let up = mock("app").await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("sallyport.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let text = config(&up, "/")
        .replace("{{listen}}", "127.0.0.1:0")
        .replace("{{admin}}", "127.0.0.1:0")
        .replace("{{dir}}", &dir.path().display().to_string());
    let stderr_path = dir.path().join("stderr");
    let mut child = std::process::Command::new(gateway_bin())
        .arg("-c")
        .arg(&fifo)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut alive = || match child.try_wait().unwrap() {
        None => Ok(()),
        Some(status) => Err(format!("the gateway died: {status}")),
    };
    // The process blocks opening the FIFO; wait until it catches SIGHUP (bit 0 of SigCgt).
    let status = format!("/proc/{pid}/status");
    eventually_alive(
        Duration::from_secs(10),
        "a SIGHUP handler before the config is read",
        &mut alive,
        || {
            let mask = std::fs::read_to_string(&status).ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            });
            std::future::ready(mask.filter(|m| m & 1 == 1).map(|_| ()))
        },
    )
    .await;
    let kill = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
    };
    assert!(kill(pid).success());
    std::fs::write(&fifo, text).unwrap();
    let listen = eventually_alive(
        Duration::from_secs(20),
        "the gateway logs its listener",
        &mut alive,
        || {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            std::future::ready(logged_listener(&stderr, "server.listen[0]"))
        },
    )
    .await;
    let url = format!("http://{listen}/api/x");
    let status = eventually_alive(
        Duration::from_secs(20),
        "the gateway serves",
        &mut alive,
        || async { client().get(&url).send().await.ok().map(|r| r.status()) },
    )
    .await;
    assert_eq!(status, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// Plugin lifecycle through a real process (the test-only `probe` plugin counts its calls):
/// `start` runs before the config serves (at start-up `/readyz` waits for it), a reload starts
/// the plugins it built before swapping them in and stops the ones it replaced.
#[tokio::test]
async fn plugins_start_before_serving_and_stop_when_replaced() {
    let up = mock("app").await;
    let with_probe = |label: &str| {
        format!(
            "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[plugins.probe]\ntype = \"probe\"\nlabel = \"{label}\"\n\
             [[routes]]\nname = \"app\"\nupstream = \"app\"\nplugins = [\"probe\"]\n",
            server(""),
            up.addr()
        )
    };
    let gw = Gateway::start(&with_probe("a")).await;
    let count = |event: &'static str| {
        let gw = &gw;
        async move {
            gw.metric_value(&format!(
                "sallyport_probe_lifecycle_total{{event=\"{event}\"}}"
            ))
            .await
        }
    };
    assert_eq!(
        count("start").await,
        1.0,
        "started before /readyz said ready"
    );
    assert_eq!(count("stop").await, 0.0);
    gw.write_config(&with_probe("b"));
    assert_eq!(gw.reload().await, "ok");
    // The reload is counted after the new plugin started; the old one stops right after.
    assert_eq!(count("start").await, 2.0);
    eventually(
        Duration::from_secs(5),
        "the replaced plugin stops",
        || async { (count("stop").await >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(
        client().get(gw.url("/x")).send().await.unwrap().status(),
        200
    );
    // A reload that fails builds nothing that runs: nothing starts or stops.
    gw.write_config("[server]\nlisten = []\n");
    assert_eq!(gw.reload().await, "error");
    assert_eq!((count("start").await, count("stop").await), (2.0, 1.0));
}
