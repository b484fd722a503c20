//! Test harness: the real `sallyport` binary on ephemeral loopback ports, real upstreams
//! (`sallyport_mock`), a real HTTP client, and a raw client for byte-exact requests.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use sallyport_mock::{MockConfig, MockServer, Recorded};

/// Polls `check` every 10 ms until it yields `Some(value)`, and returns the value; panics
/// naming `what` when `within` passes first. The one way these tests wait for something that
/// has no signal to await (a metric moving, a process leaving a socket).
///
/// A check that needs `&mut` state (a `Child` to `try_wait`) does that part synchronously and
/// returns `std::future::ready(..)`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_alive(within, what, || Ok(()), check).await
}

/// Like [`eventually`], and fails at once with the reason `alive` gives when the process under
/// test is gone (instead of waiting out the deadline).
pub async fn eventually_alive<T, F, Fut>(
    within: Duration,
    what: &str,
    mut alive: impl FnMut() -> Result<(), String>,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Err(why) = alive() {
            panic!("{what}: {why}");
        }
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The address the gateway logged for the listener at config key `key`
/// (`listening server.listen[0] 127.0.0.1:41234`).
pub fn logged_listener(stderr: &str, key: &str) -> Option<SocketAddr> {
    let marker = format!("listening {key} ");
    stderr.lines().rev().find_map(|l| {
        l.split_once(&marker)
            .and_then(|(_, a)| a.trim().parse().ok())
    })
}

/// The path of the gateway binary under test.
pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sallyport")
}

/// A loopback port nothing listens on now (bound, then released): for endpoints that must
/// refuse connections, and external servers that cannot bind port 0 themselves (Redis).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A `[server]` table with the harness's listen placeholders and the given extra lines.
pub fn server(extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"{{{{listen}}}}\"]\nadmin_listen = \"{{{{admin}}}}\"\nthreads = 2\ngrace_period = \"1s\"\nupgrade_sock = \"{{{{dir}}}}/upgrade.sock\"\npid_file = \"{{{{dir}}}}/sallyport.pid\"\naccess_log = \"stdout\"\n{extra}\n"
    )
}

/// A running gateway process, killed on drop.
pub struct Gateway {
    child: Option<Child>,
    /// The proxy listener (`server.listen[0]`) and the admin listener, as the gateway logged
    /// them; port 0 until then (and for a process that refused to start).
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Whether `{{listen}}`/`{{admin}}` are written as the ports in use (needed by `-u`,
    /// which takes listeners over by address) rather than as port 0.
    fixed_ports: bool,
}

impl Gateway {
    /// Writes the config (placeholders `{{listen}}`, `{{admin}}`, `{{dir}}` filled in), starts
    /// the gateway and waits until `/readyz` answers 200.
    pub async fn start(config: &str) -> Gateway {
        let mut gw = Gateway::spawn(config).await;
        gw.wait_ready().await;
        gw
    }

    /// Starts the gateway on port 0 for both listeners and returns once it logged the ports
    /// it got (or exited: then `addr` and `admin` keep port 0). Does not wait for readiness.
    pub async fn spawn(config: &str) -> Gateway {
        Self::spawn_with_env(config, &[]).await
    }

    /// [`Gateway::start`] with extra environment variables for the process.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        let mut gw = Gateway::spawn_with_env(config, env).await;
        gw.wait_ready().await;
        gw
    }

    /// [`Gateway::spawn`] with extra environment variables for the process.
    pub async fn spawn_with_env(config: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut gw = Gateway {
            child: None,
            addr: unbound,
            admin: unbound,
            config_path: dir.path().join("sallyport.toml"),
            dir,
            fixed_ports: false,
        };
        gw.write_config(config);
        let child = Command::new(gateway_bin())
            .arg("-c")
            .arg(&gw.config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(
                std::fs::File::create(gw.dir.path().join("stdout")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(gw.dir.path().join("stderr")).unwrap(),
            ))
            .spawn()
            .expect("start sallyport");
        gw.child = Some(child);
        let stderr_path = gw.dir.path().join("stderr");
        let child = gw.child.as_mut().unwrap();
        let logged = eventually(
            Duration::from_secs(30),
            "the gateway logs its listeners or exits",
            || {
                let exited = child.try_wait().unwrap().is_some();
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let both = logged_listener(&stderr, "server.listen[0]")
                    .zip(logged_listener(&stderr, "server.admin_listen"));
                std::future::ready(match both {
                    Some(addrs) => Some(Some(addrs)),
                    None if exited => Some(None),
                    None => None,
                })
            },
        )
        .await;
        if let Some((addr, admin)) = logged {
            gw.addr = addr;
            gw.admin = admin;
        }
        gw
    }

    /// Starts a second process with `-u` on the same config (same ports, same upgrade
    /// socket), logging into its own directory. It takes the listeners over once this one
    /// gets SIGQUIT.
    pub fn spawn_upgrade(&mut self) -> Gateway {
        // `-u` refuses port 0: it takes the listeners over by the addresses in the config.
        // The file on disk may have been changed by the test: rewrite only the two addresses.
        self.fixed_ports = true;
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(
            &self.config_path,
            text.replace(
                "listen = [\"127.0.0.1:0\"]",
                &format!("listen = [\"{}\"]", self.addr),
            )
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"{}\"", self.admin),
            ),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(gateway_bin())
            .arg("-u")
            .arg("-c")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("stdout")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr")).unwrap(),
            ))
            .spawn()
            .expect("start sallyport -u");
        Gateway {
            child: Some(child),
            addr: self.addr,
            admin: self.admin,
            config_path: self.config_path.clone(),
            dir,
            fixed_ports: true,
        }
    }

    pub fn fill(&self, config: &str) -> String {
        let (listen, admin) = if self.fixed_ports {
            (self.addr.to_string(), self.admin.to_string())
        } else {
            ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
        };
        config
            .replace("{{listen}}", &listen)
            .replace("{{admin}}", &admin)
            .replace("{{dir}}", &self.dir.path().display().to_string())
    }

    /// Replaces the config file (placeholders filled in); call `reload` to apply it.
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, self.fill(config)).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Sends SIGHUP and waits until `sallyport_config_reloads_total` moved.
    pub async fn reload(&self) -> &'static str {
        let before = (
            self.metric_value("sallyport_config_reloads_total{result=\"ok\"}")
                .await,
            self.metric_value("sallyport_config_reloads_total{result=\"error\"}")
                .await,
        );
        self.signal("HUP");
        eventually(Duration::from_secs(10), "the reload is counted", || async {
            let ok = self
                .metric_value("sallyport_config_reloads_total{result=\"ok\"}")
                .await;
            let err = self
                .metric_value("sallyport_config_reloads_total{result=\"error\"}")
                .await;
            if ok > before.0 {
                Some("ok")
            } else if err > before.1 {
                Some("error")
            } else {
                None
            }
        })
        .await
    }

    /// Whether the process has exited (and its status).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Waits for the process to exit within `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        eventually(limit, "the gateway exits", || {
            std::future::ready(child.try_wait().unwrap())
        })
        .await
    }

    /// Waits until `/readyz` answers 200 and the proxy listener accepts; panics with the
    /// gateway's stderr if it exits first.
    pub async fn wait_ready(&mut self) {
        let (admin, addr) = (self.admin, self.addr);
        let stderr_path = self.dir.path().join("stderr");
        let child = self.child.as_mut().unwrap();
        let client = reqwest::Client::new();
        eventually_alive(
            Duration::from_secs(30),
            "the gateway is ready",
            || match child.try_wait().unwrap() {
                None => Ok(()),
                Some(status) => Err(format!(
                    "gateway exited with {status} before ready; stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                )),
            },
            || {
                let client = client.clone();
                async move {
                    let r = client
                        .get(format!("http://{admin}/readyz"))
                        .send()
                        .await
                        .ok()?;
                    // The proxy listener starts with the admin one; make sure it accepts too.
                    (r.status() == 200 && tokio::net::TcpStream::connect(addr).await.is_ok())
                        .then_some(())
                }
            },
        )
        .await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Access-log lines written so far.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the access log has at least `n` lines (returns what it has after 5 s).
    pub async fn access_log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            eventually(Duration::from_secs(6), "access-log lines", || async {
                let lines = self.access_log();
                (lines.len() >= n).then_some(lines)
            }),
        )
        .await;
        waited.unwrap_or_else(|_| self.access_log())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one exact series line (`name{labels}`), 0 when absent. Labels must be
    /// written in the order Prometheus prints them (sorted by name).
    pub async fn metric_value(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `sallyport --check -c FILE` on the given config text: (exit code, stdout, stderr).
pub fn check(config: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("check.toml");
    std::fs::write(&path, config).unwrap();
    check_file(&path)
}

pub fn check_file(path: &Path) -> (i32, String, String) {
    // From the repository root, like the quick start: shipped configs use relative paths.
    let out = Command::new(gateway_bin())
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .arg("--check")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client with no connection reuse surprises: a fresh pool per test.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The JSON body of a response.
pub async fn json(resp: reqwest::Response) -> serde_json::Value {
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A response read by [`raw`].
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `GET {target}` byte-exactly (no client-side normalisation) and reads the response.
pub async fn raw_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes()).await
}

/// Sends raw bytes and reads one response until the connection closes.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> RawResponse {
    let text_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..text_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[text_end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..line_end])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

/// Starts a mock upstream with a name.
pub async fn mock(name: &str) -> MockServer {
    MockServer::start(MockConfig {
        name: name.to_string(),
        ..MockConfig::default()
    })
    .await
    .unwrap()
}

/// A real `redis-server` on a free loopback port, without persistence; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    /// Redis cannot bind port 0 and report it: pick a free port, and pick again if another
    /// program took it before redis-server bound it (redis-server then exits).
    pub async fn start() -> RedisServer {
        RedisServer::start_with(|_| Vec::new()).await
    }

    /// Starts redis-server with more arguments, made for the port it gets (a cluster node's
    /// config file, `--replicaof`, a Sentinel's config file).
    pub async fn start_with(args: impl Fn(u16) -> Vec<String>) -> RedisServer {
        for _ in 0..3 {
            let port = free_port();
            if let Some(server) = RedisServer::try_start_on(port, &args(port)).await {
                return server;
            }
        }
        panic!("redis-server did not start on three free ports");
    }

    pub async fn start_on(port: u16) -> RedisServer {
        RedisServer::try_start_on(port, &[])
            .await
            .unwrap_or_else(|| panic!("redis-server exited: port {port} in use?"))
    }

    /// Starts redis-server on `port`; `None` when it exits instead of answering PING. A
    /// first argument that is a file is the config file (it must come first).
    async fn try_start_on(port: u16, extra: &[String]) -> Option<RedisServer> {
        let (file, rest) = match extra.first() {
            Some(f) if !f.starts_with("--") => (vec![f.clone()], &extra[1..]),
            _ => (Vec::new(), extra),
        };
        let mut child = Command::new("redis-server")
            .args(file)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(rest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (./dev deps installs it)");
        let ready = eventually(
            Duration::from_secs(10),
            "redis-server answers PING or exits",
            || {
                let exited = child.try_wait().unwrap().is_some();
                async move {
                    if exited {
                        return Some(false);
                    }
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .ok()?;
                    s.write_all(b"PING\r\n").await.ok()?;
                    let mut buf = [0u8; 16];
                    let n = s.read(&mut buf).await.ok()?;
                    buf[..n].starts_with(b"+PONG").then_some(true)
                }
            },
        )
        .await;
        if !ready {
            let _ = child.wait();
            return None;
        }
        Some(RedisServer {
            child: Some(child),
            port,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli -p PORT ARGS...`: its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed (./dev deps installs it)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Kills the server and waits until the port refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A JWKS endpoint: serves its current document on any GET, counts requests, and can be
/// switched to failing (503) to play an IdP that is down.
pub struct JwksServer {
    pub addr: std::net::SocketAddr,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(body: String) -> JwksServer {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = std::sync::Arc::new(std::sync::Mutex::new(body));
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (h, b, u) = (hits.clone(), body.clone(), up.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (h, b, u) = (h.clone(), b.clone(), u.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut read = 0;
                    while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf[read..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read += n,
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let resp = if u.load(Ordering::SeqCst) {
                        let body = b.lock().unwrap().clone();
                        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                    } else {
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                    };
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        JwksServer {
            addr,
            hits,
            body,
            up,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_body(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RedisServer {
    /// Sends one command over a fresh connection and returns the raw RESP reply (e.g.
    /// `+OK\r\n`, `:3\r\n`, `*1\r\n$5\r\nhello\r\n`): enough for tests to steer and inspect
    /// the server without a client library.
    pub async fn command(&self, args: &[&str]) -> String {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf[read..]))
                .await
                .expect("redis reply")
                .unwrap();
            read += n;
            if n == 0 || resp_complete(&buf[..read]) {
                break;
            }
        }
        String::from_utf8_lossy(&buf[..read]).into_owned()
    }

    /// The keys matching `pattern` (`KEYS`), sorted.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let reply = self.command(&["KEYS", pattern]).await;
        let mut keys: Vec<String> = reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty() && !l.starts_with('$'))
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }
}

/// Whether `buf` holds one whole RESP reply (simple string, error, integer, bulk string, or an
/// array of those).
fn resp_complete(buf: &[u8]) -> bool {
    fn one(buf: &[u8]) -> Option<usize> {
        let end = buf.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&buf[1..end]).ok()?;
        match buf.first()? {
            b'+' | b'-' | b':' => Some(end + 2),
            b'$' => {
                let len: i64 = line.parse().ok()?;
                if len < 0 {
                    return Some(end + 2);
                }
                let total = end + 2 + usize::try_from(len).ok()? + 2;
                (buf.len() >= total).then_some(total)
            }
            b'*' => {
                let n: i64 = line.parse().ok()?;
                let mut at = end + 2;
                for _ in 0..n.max(0) {
                    at += one(&buf[at..])?;
                }
                Some(at)
            }
            _ => None,
        }
    }
    one(buf) == Some(buf.len())
}

/// A request as a scripted [`Origin`] received it.
#[derive(Debug, Clone)]
pub struct OriginRequest {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl OriginRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a scripted [`Origin`] answers.
#[derive(Debug, Clone)]
pub struct OriginResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Send the body chunked, in two parts, without `Content-Length`.
    pub chunked: bool,
}

impl OriginResponse {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        OriginResponse {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            chunked: false,
        }
    }

    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

type OriginScript = dyn Fn(&OriginRequest) -> OriginResponse + Send + Sync;

/// An upstream whose every answer the test scripts, recording what it received. Stops
/// (listener and connections) when dropped or [`Origin::stop`]ped.
pub struct Origin {
    pub addr: SocketAddr,
    requests: Arc<std::sync::Mutex<Vec<OriginRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(
        script: impl Fn(&OriginRequest) -> OriginResponse + Send + Sync + 'static,
    ) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let script: Arc<OriginScript> = Arc::new(script);
        let recorded = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let script = Arc::clone(&script);
                let recorded = Arc::clone(&recorded);
                conns.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let script = Arc::clone(&script);
                            let recorded = Arc::clone(&recorded);
                            async move {
                                use http_body_util::BodyExt;
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default();
                                let got = OriginRequest {
                                    method: parts.method.to_string(),
                                    uri: parts.uri.to_string(),
                                    headers: parts.headers,
                                    body,
                                };
                                let answer = script(&got);
                                recorded.lock().unwrap().push(got);
                                if !answer.delay.is_zero() {
                                    tokio::time::sleep(answer.delay).await;
                                }
                                let body = if answer.chunked {
                                    let (a, b) = answer.body.split_at(answer.body.len() / 2);
                                    let frames = [a.to_vec(), b.to_vec()].map(|part| {
                                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                            bytes::Bytes::from(part),
                                        ))
                                    });
                                    http_body_util::StreamBody::new(futures_util::stream::iter(
                                        frames,
                                    ))
                                    .boxed()
                                } else {
                                    http_body_util::Full::new(bytes::Bytes::from(answer.body))
                                        .boxed()
                                };
                                let mut resp = http::Response::new(body);
                                *resp.status_mut() =
                                    http::StatusCode::from_u16(answer.status).unwrap();
                                for (k, v) in answer.headers {
                                    resp.headers_mut().append(
                                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                        http::HeaderValue::from_str(&v).unwrap(),
                                    );
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin {
            addr,
            requests,
            task,
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests it received.
    pub fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// Stops listening and closes every connection.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HS256 JWT over `claims` (with `exp` ten minutes ahead unless given).
pub fn hs256(secret: &str, mut claims: serde_json::Value) -> String {
    if claims.get("exp").is_none() {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        claims["exp"] = exp.into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A name server on a UDP loopback port, answering A queries from a table the test changes
/// (`set`); a name not in it is NXDOMAIN; `fail(true)` answers SERVFAIL to everything.
/// Answers carry a 1 s TTL.
pub struct DnsServer {
    pub addr: SocketAddr,
    names: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<std::net::Ipv4Addr>>>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    pub queries: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let names: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<_>>>> =
            Arc::default();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = {
            let (names, failing, queries) = (
                Arc::clone(&names),
                Arc::clone(&failing),
                Arc::clone(&queries),
            );
            tokio::spawn(async move {
                let mut buf = [0u8; 1500];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    queries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut answer = Message::new();
                    answer
                        .set_id(query.id())
                        .set_message_type(MessageType::Response)
                        .set_op_code(query.op_code())
                        .set_recursion_desired(query.recursion_desired())
                        .set_recursion_available(true)
                        .set_authoritative(true);
                    for q in query.queries() {
                        answer.add_query(q.clone());
                        let name = q.name().to_ascii().trim_end_matches('.').to_lowercase();
                        if failing.load(std::sync::atomic::Ordering::Relaxed) {
                            answer.set_response_code(ResponseCode::ServFail);
                            continue;
                        }
                        match names.lock().unwrap().get(&name) {
                            None => {
                                answer.set_response_code(ResponseCode::NXDomain);
                            }
                            Some(ips) if q.query_type() == RecordType::A => {
                                for ip in ips {
                                    answer.add_answer(Record::from_rdata(
                                        q.name().clone(),
                                        1,
                                        RData::A(A(*ip)),
                                    ));
                                }
                            }
                            // Known, but no records of that type (AAAA): NOERROR, empty.
                            Some(_) => {}
                        }
                    }
                    if let Ok(bytes) = answer.to_vec() {
                        let _ = socket.send_to(&bytes, from).await;
                    }
                }
            })
        };
        DnsServer {
            addr,
            names,
            failing,
            queries,
            task,
        }
    }

    /// What `name` resolves to from now on (empty: NXDOMAIN).
    pub fn set(&self, name: &str, ips: &[&str]) {
        let mut names = self.names.lock().unwrap();
        if ips.is_empty() {
            names.remove(name);
        } else {
            names.insert(
                name.to_string(),
                ips.iter().map(|i| i.parse().unwrap()).collect(),
            );
        }
    }

    pub fn fail(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
