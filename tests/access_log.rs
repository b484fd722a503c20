//! The access log off the request path: lines queue for a writer thread; a full queue drops
//! lines (counted), never requests; a file is reopened on SIGUSR1 for logrotate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use support::*;

fn config(up: &MockServer, access_log: &str, extra: &str) -> String {
    format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        server(extra).replace("access_log = \"stdout\"", &format!("access_log = \"{access_log}\"")),
        up.addr()
    )
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// logrotate moves the file away and sends SIGUSR1: the next lines go to a new file at the
/// configured path, none is lost or written twice.
#[tokio::test]
async fn a_rotated_file_is_reopened_on_sigusr1() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(&up, "{{dir}}/access.log", "")).await;
    let path = gw.dir.path().join("access.log");
    let c = client();
    assert_eq!(c.get(gw.url("/before")).send().await.unwrap().status(), 200);
    eventually(Duration::from_secs(10), "the first line", || async {
        (lines(&path).len() == 1).then_some(())
    })
    .await;
    let rotated = gw.dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    gw.signal("USR1");
    // The signal is taken before the next line is written (it is asynchronous: retry until
    // a line lands in the new file; earlier ones may still reach the rotated one).
    eventually(
        Duration::from_secs(10),
        "a line in the new file",
        || async {
            c.get(gw.url("/after")).send().await.unwrap();
            (!lines(&path).is_empty()).then_some(())
        },
    )
    .await;
    let old = lines(&rotated);
    assert_eq!(old[0]["path"], "/before");
    assert!(lines(&path).iter().all(|l| l["path"] == "/after"));
    assert!(gw.stderr().lines().all(|l| !l.contains("cannot reopen")));
}

/// With room for one waiting line, a burst of 300 requests is served in full; every line is
/// either written or counted as dropped.
#[tokio::test]
async fn a_full_queue_drops_lines_not_requests() {
    let up = mock("app").await;
    let gw = Gateway::start(&config(&up, "stdout", "access_log_queue = 1")).await;
    let c = client();
    let statuses = futures_util::future::join_all((0..300).map(|i| {
        let (c, url) = (c.clone(), gw.url(&format!("/burst/{i}")));
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    eventually(
        Duration::from_secs(10),
        "written + dropped = requests",
        || async {
            let written = gw
                .access_log()
                .iter()
                .filter(|l| l["path"].as_str().is_some_and(|p| p.starts_with("/burst/")))
                .count();
            let dropped = gw.metric_value("sallyport_access_log_dropped_total").await as usize;
            (written + dropped == 300).then_some(())
        },
    )
    .await;
}
