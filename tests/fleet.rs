//! Config rollout for a fleet: `include` merges files (a duplicate name is an error naming
//! both files), `server.watch` reloads once per change (an edit, a replaced included file, a
//! Kubernetes ConfigMap-style `..data` symlink swap; a bad edit keeps the old config), and the
//! admin `GET /config` and `sallyport_config_info{hash}` say which config a node runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::path::Path;
use std::time::Duration;

use support::*;

fn upstream_and_route(name: &str, addr: std::net::SocketAddr, path: &str) -> String {
    format!(
        "[upstreams.{name}]\nendpoints = [\"{addr}\"]\n\n[[routes]]\nname = \"{name}\"\npath_prefix = \"{path}\"\nupstream = \"{name}\"\n"
    )
}

#[tokio::test]
async fn includes_merge_and_report_duplicates_with_both_files() {
    let (a, b) = (mock("a").await, mock("b").await);
    let conf_d = tempfile::tempdir().unwrap();
    std::fs::write(
        conf_d.path().join("a.toml"),
        upstream_and_route("a", a.addr(), "/a"),
    )
    .unwrap();
    std::fs::write(
        conf_d.path().join("b.toml"),
        upstream_and_route("b", b.addr(), "/b"),
    )
    .unwrap();
    let main = format!(
        "include = [\"{}/*.toml\"]\n{}",
        conf_d.path().display(),
        server("")
    );
    let gw = Gateway::start(&main).await;
    for (path, name) in [("/a/x", "a"), ("/b/x", "b")] {
        let r = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-mock-name"], name);
    }
    let config = json(
        reqwest::get(format!("http://{}/config", gw.admin))
            .await
            .unwrap(),
    )
    .await;
    let files: Vec<&str> = config["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files[1].ends_with("a.toml") && files[2].ends_with("b.toml"));
    assert!(config["config"]["upstreams"]["b"].is_object());

    // The same upstream in two files: --check names both.
    std::fs::write(
        conf_d.path().join("c.toml"),
        upstream_and_route("a", b.addr(), "/c"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let main_path = dir.path().join("main.toml");
    std::fs::write(&main_path, gw.fill(&main)).unwrap();
    let (code, _, err) = check_file(&main_path);
    assert_eq!(code, 1);
    assert!(
        err.contains("upstreams.a") && err.contains("a.toml") && err.contains("c.toml"),
        "{err}"
    );
    // A mistake inside an included file says which file.
    std::fs::write(
        conf_d.path().join("c.toml"),
        "[upstreams.c]\nendpoints = [\"nonsense\"]\n",
    )
    .unwrap();
    let (code, _, err) = check_file(&main_path);
    assert_eq!(code, 1);
    assert!(
        err.contains("upstreams.c.endpoints[0]") && err.contains("c.toml"),
        "{err}"
    );
    // Included files hold only upstreams, plugins and routes.
    std::fs::write(conf_d.path().join("c.toml"), "[server]\nthreads = 4\n").unwrap();
    let (code, _, err) = check_file(&main_path);
    assert_eq!(code, 1);
    assert!(err.contains("c.toml: server"), "{err}");
}

/// Waits until `sallyport_config_reloads_total{result}` reaches `n`, then checks it stays there
/// through a quiet second (one change, one reload); `None` when it never got there.
async fn reloads_settle_at(gw: &Gateway, result: &str, n: f64) -> Option<()> {
    let series = format!("sallyport_config_reloads_total{{result=\"{result}\"}}");
    let reached = tokio::time::timeout(
        Duration::from_secs(10),
        eventually(Duration::from_secs(11), "the watcher reloads", || async {
            (gw.metric_value(&series).await >= n).then_some(())
        }),
    )
    .await;
    reached.ok()?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        gw.metric_value(&series).await,
        n,
        "exactly one reload per change"
    );
    Some(())
}

/// Writes a file the way editors and `kubectl` do: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn watch_reloads_once_per_change_including_a_configmap_symlink_swap() {
    let (a, b) = (mock("a").await, mock("b").await);
    // A ConfigMap-style folder: routes.toml -> ..data/routes.toml, ..data -> ..v1.
    let cm = tempfile::tempdir().unwrap();
    let v1 = cm.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(
        v1.join("routes.toml"),
        upstream_and_route("cm", a.addr(), "/cm"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", cm.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/routes.toml", cm.path().join("routes.toml")).unwrap();
    let main = |extra_route: &str| {
        format!(
            "include = [\"{}/*.toml\"]\n{}\n{}",
            cm.path().display(),
            server("watch = true"),
            extra_route
        )
    };
    let gw = Gateway::start(&main("")).await;
    let hash0 = json(
        reqwest::get(format!("http://{}/config", gw.admin))
            .await
            .unwrap(),
    )
    .await["hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        gw.metric_value(&format!("sallyport_config_info{{hash=\"{hash0}\"}}"))
            .await,
        1.0
    );
    let get = |path: &'static str| {
        let url = gw.url(path);
        async move { client().get(url).send().await.unwrap() }
    };
    assert_eq!(get("/cm/x").await.headers()["x-mock-name"], "a");

    // 1. The main file is edited.
    gw.write_config(&main(&upstream_and_route("b", b.addr(), "/b")));
    reloads_settle_at(&gw, "ok", 1.0)
        .await
        .unwrap_or_else(|| panic!("{}", gw.stderr()));
    assert_eq!(get("/b/x").await.status(), 200);

    // 2. The ConfigMap is updated: a new ..v2 and an atomic swap of ..data.
    let v2 = cm.path().join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(
        v2.join("routes.toml"),
        upstream_and_route("cm", b.addr(), "/cm"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", cm.path().join("..data_tmp")).unwrap();
    std::fs::rename(cm.path().join("..data_tmp"), cm.path().join("..data")).unwrap();
    reloads_settle_at(&gw, "ok", 2.0)
        .await
        .unwrap_or_else(|| panic!("{}", gw.stderr()));
    assert_eq!(get("/cm/x").await.headers()["x-mock-name"], "b");

    // 3. A bad edit: one failed reload, the running config stays.
    replace(&gw.config_path, "this is not toml [");
    reloads_settle_at(&gw, "error", 1.0)
        .await
        .unwrap_or_else(|| panic!("{}", gw.stderr()));
    assert_eq!(
        get("/b/x").await.status(),
        200,
        "the old config keeps serving"
    );
    assert_eq!(
        gw.metric_value("sallyport_config_reloads_total{result=\"ok\"}")
            .await,
        2.0
    );

    // The hash moved with the config; /config redacts secrets.
    replace(
        &gw.config_path,
        &gw.fill(&format!(
            "{}\n[plugins.auth]\ntype = \"jwt\"\nalgorithms = [\"HS256\"]\nsecret = \"a-very-secret-value-of-forty-bytes-0123456\"\n",
            main("")
        )),
    );
    reloads_settle_at(&gw, "ok", 3.0)
        .await
        .unwrap_or_else(|| panic!("{}", gw.stderr()));
    let config = json(
        reqwest::get(format!("http://{}/config", gw.admin))
            .await
            .unwrap(),
    )
    .await;
    assert_ne!(config["hash"], hash0.as_str());
    assert_eq!(config["config"]["plugins"]["auth"]["secret"], "[redacted]");
    assert!(!config
        .to_string()
        .contains("a-very-secret-value-of-forty-bytes-0123456"));
    let hash = config["hash"].as_str().unwrap();
    assert_eq!(
        gw.metric_value(&format!("sallyport_config_info{{hash=\"{hash}\"}}"))
            .await,
        1.0
    );
    assert_eq!(
        gw.metric_value(&format!("sallyport_config_info{{hash=\"{hash0}\"}}"))
            .await,
        0.0,
        "only the running config's hash is exported"
    );
}
