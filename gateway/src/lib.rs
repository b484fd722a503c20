//! Sallyport: an API gateway on Pingora.
//!
//! [`config`] reads the TOML file, [`snapshot`] compiles it into routes, pools and plugin
//! chains, [`proxy`] hosts the chain in Pingora's `ProxyHttp` phases, [`admin`] serves
//! `/metrics`, `/healthz` and `/readyz`, and [`run`] wires the Pingora server together.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod admin;
pub mod calls;
pub mod certs;
pub mod client_ip;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod grpc;
pub mod handover;
pub mod listeners;
pub mod log_window;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod resilience;
pub mod router;
pub mod snapshot;
pub mod source;
pub mod telemetry;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::access_log::AccessLog;
use crate::config::{Config, ConfigErrors};
use crate::metrics::Metrics;
use crate::snapshot::{Services, Snapshot};

/// State shared by the proxy, the admin app and the background tasks of one gateway.
pub struct Shared {
    pub config_path: PathBuf,
    pub snapshot: ArcSwap<Snapshot>,
    /// The files, hash and effective form of the running config (`GET /config`).
    pub source: ArcSwap<source::ConfigSource>,
    /// The certificate resolver of each TLS listener (`server.tls[i]`): a reload swaps its
    /// certificates.
    /// Each resolver with the `listen` it serves: a reload matches by address, not position.
    pub sni: Vec<(String, Arc<certs::SniResolver>)>,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub services: Services,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    /// Loads, validates and compiles the config file.
    pub fn load(config_path: &Path) -> anyhow::Result<Arc<Shared>> {
        let (config, source) = source::load(config_path)?;
        let target = config
            .server
            .access_log
            .value()
            .map_err(|m| anyhow::anyhow!("server.access_log: {m}"))?;
        let access_log = AccessLog::open(target, config.server.access_log_queue).map_err(|e| {
            anyhow::anyhow!(
                "server.access_log: cannot open {}: {e}",
                config.server.access_log.text()
            )
        })?;
        // SIGUSR1 (logrotate's `postrotate`) reopens the access-log file; it is caught
        // whatever the target, as its default action would end the process.
        let reopen = access_log
            .reopen_flag()
            .unwrap_or_else(|| Arc::new(std::sync::atomic::AtomicBool::new(false)));
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, reopen)
            .map_err(|e| anyhow::anyhow!("installing the SIGUSR1 handler: {e}"))?;
        let metrics = Metrics::new()?;
        let services = Services {
            connector: Arc::new(pingora::connectors::http::Connector::new(None)),
            plugin_metrics: Arc::clone(&metrics.plugins),
            plugin_registry: metrics.plugin_registry.clone(),
            public_keys: Arc::default(),
            telemetry_spans: metrics.telemetry_spans.clone(),
            resilience: metrics.resilience.clone(),
            dns: Arc::new(discovery::Dns::new(&dns_resolvers(&config))),
            client_cert_headers: config
                .server
                .tls
                .iter()
                .filter_map(|t| t.client_cert_header().cloned())
                .collect(),
            request_metrics: snapshot::RequestMetrics {
                requests: metrics.requests.clone(),
                duration: metrics.request_duration.clone(),
            },
        };
        let mut sni = Vec::new();
        for (i, tls) in config.server.tls.iter().enumerate() {
            let table = certs::CertTable::load(&format!("server.tls[{i}]"), tls)
                .map_err(config::ConfigErrors)?;
            sni.push((
                tls.listen.text().to_string(),
                certs::SniResolver::new(table),
            ));
        }
        let snapshot = Snapshot::compile(config, None, &services)?;
        metrics.config_loaded(&source.hash);
        Ok(Arc::new(Shared {
            config_path: config_path.to_path_buf(),
            snapshot: ArcSwap::from_pointee(snapshot),
            source: ArcSwap::from_pointee(source),
            sni,
            metrics,
            access_log,
            services,
            reload_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// Re-reads the config file and swaps in the new snapshot: compiled on a blocking thread
    /// (it is synchronous work), its freshly built plugins started, then swapped in, and the
    /// plugins it replaced stopped. A bad file keeps the running snapshot; the outcome is
    /// logged and counted in `sallyport_config_reloads_total`.
    pub async fn reload(self: &Arc<Self>) -> Result<(), ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let me = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || {
            source::load(&me.config_path).and_then(|(config, source)| {
                let current = me.snapshot.load();
                warn_static_changes(&current.config, &config);
                Snapshot::compile(config, Some(&current), &me.services).map(|s| (s, source))
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(ConfigErrors::from(config::ConfigError::new(
                "",
                format!("compiling the config failed: {e}"),
            )))
        });
        match result {
            Ok((snapshot, source)) => {
                // New certificates for new connections, by listener address.
                for (listen, resolver) in &self.sni {
                    let found = snapshot
                        .config
                        .server
                        .tls
                        .iter()
                        .enumerate()
                        .find(|(_, t)| t.listen.text() == listen.as_str());
                    let Some((i, tls)) = found else {
                        log::warn!(
                            "the TLS listener {listen} is gone from the config: it keeps its certificates until a restart"
                        );
                        continue;
                    };
                    match certs::CertTable::load(&format!("server.tls[{i}]"), tls) {
                        Ok(table) => resolver.replace(table),
                        Err(e) => log::error!(
                            "server.tls[{i}]: keeping the old certificates: {}",
                            config::ConfigErrors(e)
                        ),
                    }
                }
                snapshot.resolve_new_names(&self.services.dns).await;
                snapshot.start_plugins().await;
                let next = Arc::new(snapshot);
                let replaced = self.snapshot.swap(Arc::clone(&next));
                self.metrics.config_loaded(&source.hash);
                self.source.store(Arc::new(source));
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                // A reload also reopens the access-log file (logrotate's `postrotate` may
                // send SIGHUP as well as SIGUSR1).
                self.access_log.reopen();
                log::info!("config reloaded from {}", self.config_path.display());
                replaced.stop_plugins_not_in(Some(&next)).await;
                Ok(())
            }
            Err(errors) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                log::error!(
                    "config reload from {} failed; keeping the running config:\n{errors}",
                    self.config_path.display()
                );
                Err(errors)
            }
        }
    }
}

/// `server.dns_resolvers` as addresses (validated already).
fn dns_resolvers(config: &Config) -> Vec<std::net::SocketAddr> {
    config
        .server
        .dns_resolvers
        .iter()
        .filter_map(|r| r.value().ok().copied())
        .collect()
}

/// Settings that only take effect on restart or upgrade: say so instead of silently ignoring.
fn warn_static_changes(old: &Config, new: &Config) {
    let (o, n) = (&old.server, &new.server);
    let changed: Vec<&str> = [
        ("listen", o.listen != n.listen),
        (
            "tls (listeners, http2, client_auth, client_ca, forward_client_cert)",
            o.tls.len() != n.tls.len()
                || o.tls.iter().zip(&n.tls).any(|(a, b)| {
                    (
                        &a.listen,
                        a.http2,
                        a.client_auth,
                        &a.client_ca,
                        &a.forward_client_cert,
                    ) != (
                        &b.listen,
                        b.http2,
                        b.client_auth,
                        &b.client_ca,
                        &b.forward_client_cert,
                    )
                }),
        ),
        ("admin_listen", o.admin_listen != n.admin_listen),
        ("threads", o.threads != n.threads),
        ("max_connections", o.max_connections != n.max_connections),
        ("header_timeout", o.header_timeout != n.header_timeout),
        ("body_timeout", o.body_timeout != n.body_timeout),
        ("body_min_rate", o.body_min_rate != n.body_min_rate),
        ("idle_timeout", o.idle_timeout != n.idle_timeout),
        ("work_stealing", o.work_stealing != n.work_stealing),
        ("grace_period", o.grace_period != n.grace_period),
        ("access_log", o.access_log != n.access_log),
        ("access_log_queue", o.access_log_queue != n.access_log_queue),
        ("run_dir", o.run_dir != n.run_dir),
        ("upgrade_sock", o.upgrade_sock != n.upgrade_sock),
        ("pid_file", o.pid_file != n.pid_file),
        ("watch", o.watch != n.watch),
        ("h2c", o.h2c != n.h2c),
        (
            "h2_max_concurrent_streams",
            o.h2_max_concurrent_streams != n.h2_max_concurrent_streams,
        ),
        ("dns_resolvers", o.dns_resolvers != n.dns_resolvers),
    ]
    .into_iter()
    .filter_map(|(k, c)| c.then_some(k))
    .collect();
    if !changed.is_empty() {
        log::warn!(
            "server.{{{}}} changed: these take effect after a restart or upgrade (-u)",
            changed.join(", ")
        );
    }
}

/// Drives active health checks and name resolutions of the pools in the current snapshot,
/// and returns ejected endpoints to rotation when their time is up (so the gauge and the log
/// line are timely).
struct HealthChecker {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let snapshot = self.shared.snapshot.load_full();
            let now = Instant::now();
            for pool in snapshot.pools.values() {
                if let Some(pass) = pool.due_health_check(now) {
                    tokio::spawn(pass);
                }
                if let Some(pass) = pool.due_resolution(now, &self.shared.services.dns) {
                    tokio::spawn(pass);
                }
                pool.return_ejected(now);
            }
        }
    }
}

/// Starts the plugins of the config loaded at start-up (`/readyz` waits for it), and stops the
/// running config's plugins at shutdown.
struct PluginLifecycle {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for PluginLifecycle {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.shared.snapshot.load_full().start_plugins().await;
        let _ = shutdown.changed().await;
        self.shared
            .snapshot
            .load_full()
            .stop_plugins_not_in(None)
            .await;
    }
}

/// `server.watch`: reloads when the config's files change. The folders of the main file and
/// of every include pattern are watched (a Kubernetes ConfigMap swaps a `..data` symlink in
/// the folder, which a watch on the file itself would miss); events are debounced, and a
/// reload happens only when the files' bytes changed since the last attempt, so one edit is
/// one reload (a bad edit is one failed reload, the old config keeps running).
struct WatchConfig {
    shared: Arc<Shared>,
}

/// Quiet time after the last file event before the files are read.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(300);
/// The longest a change waits for its folder to go quiet.
const WATCH_MAX_WAIT: Duration = Duration::from_secs(2);

#[async_trait]
impl BackgroundService for WatchConfig {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = match notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        }) {
            Ok(w) => w,
            Err(e) => {
                log::error!("server.watch: cannot watch files ({e}); reload with SIGHUP");
                return;
            }
        };
        let path = self.shared.config_path.clone();
        let mut watched: Vec<PathBuf> = Vec::new();
        let mut last = source::fingerprint(
            &path,
            &source::tls_files(&self.shared.snapshot.load().config),
        );
        loop {
            let config = self.shared.snapshot.load_full();
            for dir in source::watched_dirs(&path, &config.config) {
                if !watched.contains(&dir) {
                    match watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
                        Ok(()) => watched.push(dir),
                        Err(e) => log::warn!("server.watch: cannot watch {}: {e}", dir.display()),
                    }
                }
            }
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = shutdown.changed() => return,
            }
            // Debounce: wait until the events stop, at most WATCH_MAX_WAIT (a folder written
            // to all the time must not hold a change back for ever).
            let waited_until = tokio::time::Instant::now() + WATCH_MAX_WAIT;
            loop {
                if tokio::time::Instant::now() >= waited_until {
                    break;
                }
                tokio::select! {
                    got = tokio::time::timeout(WATCH_DEBOUNCE, rx.recv()) => match got {
                        Ok(Some(_)) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    },
                    _ = shutdown.changed() => return,
                }
            }
            let now = source::fingerprint(&path, &source::tls_files(&config.config));
            if now != last {
                last = now;
                log::info!(
                    "server.watch: {}, an included file or a certificate file changed",
                    path.display()
                );
                let _ = self.shared.reload().await;
            }
        }
    }
}

/// Reloads the config on SIGHUP.
struct ReloadOnHangup {
    shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP, reload disabled: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = self.shared.reload().await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Command-line switches that reach Pingora, and the signals seen since start-up.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Take the listening sockets over from a running gateway (`-u`).
    pub upgrade: bool,
    /// Run in the background (`-d`).
    pub daemon: bool,
    /// Signals that arrived before the gateway listened for them (see
    /// [`handover::EarlySignals::install`]); `None` when the caller did not install them.
    pub early_signals: Option<handover::EarlySignals>,
}

/// Builds the Pingora server for a loaded gateway and runs it until shutdown.
pub fn run(shared: Arc<Shared>, options: RunOptions) -> anyhow::Result<()> {
    let server_conf = shared.snapshot.load().config.server.clone();
    let files = config::RunFiles::of(&server_conf, &shared.config_path);
    let pid_file = PathBuf::from(&files.pid_file);
    if !options.upgrade {
        if let Some(pid) = handover::live_instance(&pid_file) {
            anyhow::bail!(
                "another sallyport (pid {pid}) is running with {}: stop it, take its sockets over \
                 with -u, or give this instance its own server.run_dir",
                pid_file.display()
            );
        }
    }
    // Only where the files live: with both overridden, run_dir stays unused.
    if let Some(dir) = Path::new(&files.upgrade_sock).parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("upgrade socket directory {}: {e}", dir.display()))?;
    }

    let conf = ServerConf {
        threads: server_conf.threads,
        work_stealing: server_conf.work_stealing,
        // Pingora waits the whole grace period for in-flight requests, then gives its
        // runtimes a last second: in-flight work gets `grace_period` (rounded up to seconds).
        grace_period_seconds: Some(server_conf.grace_period.get().as_millis().div_ceil(1000) as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: files.upgrade_sock.clone(),
        pid_file: files.pid_file.clone(),
        daemon: options.daemon,
        // Pingora's I/O timeouts of a second or more (an upstream's read and write timeouts,
        // armed whenever a read waits) through the runtime's timer wheel instead of Pingora's
        // shared timer tree (default: above 15 minutes only); see bench/README, fifth run.
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: options.upgrade,
        daemon: options.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    // Pingora writes the pid file of a daemon itself, after forking.
    if !options.daemon {
        handover::write_pid(&pid_file)
            .map_err(|e| anyhow::anyhow!("pid file {}: {e}", pid_file.display()))?;
    }

    let mut app = pingora::proxy::http_proxy(
        &server.configuration,
        proxy::Gateway::new(Arc::clone(&shared)),
    );
    // HTTP/2 connections (h2 by ALPN, h2c) are closed after `idle_timeout` without a stream,
    // as idle HTTP/1.1 keep-alive connections are.
    let mut server_options = pingora::apps::HttpServerOptions::default();
    server_options.h2c = server_conf.h2c;
    server_options.h2_idle_timeout = Some(server_conf.idle_timeout.get());
    app.server_options = Some(server_options);
    // Pingora's bounded defaults (a 64 KiB decoded header list), with the stream limit set.
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(server_conf.h2_max_concurrent_streams);
    app.h2_options = Some(h2);
    let limits = conn::Limits {
        max_connections: server_conf.max_connections,
        header_timeout: server_conf.header_timeout.get(),
        body_timeout: server_conf.body_timeout.get(),
        body_min_rate: server_conf.body_min_rate.get(),
        idle_timeout: server_conf.idle_timeout.get(),
        drain_grace: handover::FIRST_REQUEST_GRACE,
    };
    let mut proxy = Service::new(
        "sallyport proxy".to_string(),
        conn::Guard::new(app, limits, shared.metrics.connections.clone()),
    );
    // Pingora's default is a 64 KiB read buffer per client connection, which an allocator
    // that zeroes eagerly keeps resident for every idle keep-alive client.
    let buffers = L4BufferSettings::default().read(server_conf.read_buffer.get() as usize);
    // Held until the process exits (`run_forever` never returns): the ports of port-0
    // listeners.
    let mut reserved = listeners::Reserved::default();
    let mut bind = |key: String, a: &config::Parsed<std::net::SocketAddr>| {
        let addr = a.value().map_err(|m| anyhow::anyhow!("{key}: {m}"))?;
        let bind = reserved.bind(&key, *addr, options.upgrade)?;
        let config = ListenerConfig::tcp(bind.addr.to_string());
        anyhow::Ok(match bind.options {
            Some(o) => config.tcp_socket_options(o),
            None => config,
        })
    };
    for (i, addr) in server_conf.listen.iter().enumerate() {
        proxy.add_listener(bind(format!("server.listen[{i}]"), addr)?.l4_buffer(buffers));
    }
    for (i, tls) in server_conf.tls.iter().enumerate() {
        let key = format!("server.tls[{i}].listen");
        let mut settings = match tls.client_cert_header() {
            Some(header) => TlsSettings::with_callbacks(Box::new(certs::ForwardClientCert {
                header: header.clone(),
            })),
            None => TlsSettings::intermediate(&tls.cert, &tls.key),
        }
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        if let Some((_, resolver)) = shared.sni.get(i) {
            settings.set_cert_resolver(Arc::clone(resolver) as _);
        }
        if let Some(verifier) = certs::client_verifier(&format!("server.tls[{i}]"), tls)
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            settings.set_client_cert_verifier(verifier);
        }
        if tls.http2 {
            settings.enable_h2();
        }
        proxy.add_listener(bind(key, &tls.listen)?.tls(settings).l4_buffer(buffers));
    }
    proxy.set_connection_filter(Arc::new(conn::DenyConnections {
        shared: Arc::clone(&shared),
    }));
    server.add_service(proxy);

    let admin_listen = server_conf
        .admin_listen
        .value()
        .map_err(|m| anyhow::anyhow!("server.admin_listen: {m}"))?;
    if let config::AdminListen::At(addr) = admin_listen {
        let mut admin = Service::new(
            "sallyport admin".to_string(),
            admin::Admin::new(Arc::clone(&shared)),
        );
        let bind = reserved.bind("server.admin_listen", *addr, options.upgrade)?;
        match bind.options {
            Some(o) => admin.add_tcp_with_settings(&bind.addr.to_string(), o),
            None => admin.add_tcp(&bind.addr.to_string()),
        }
        admin.threads = Some(1);
        server.add_service(admin);
    }

    let mut health = background_service(
        "sallyport health checks",
        HealthChecker {
            shared: Arc::clone(&shared),
        },
    );
    health.threads = Some(1);
    server.add_service(health);
    let mut lifecycle = background_service(
        "sallyport plugin lifecycle",
        PluginLifecycle {
            shared: Arc::clone(&shared),
        },
    );
    lifecycle.threads = Some(1);
    server.add_service(lifecycle);
    if server_conf.watch {
        let mut watch = background_service(
            "sallyport config watch",
            WatchConfig {
                shared: Arc::clone(&shared),
            },
        );
        watch.threads = Some(1);
        server.add_service(watch);
    }
    let mut reload = background_service("sallyport reload", ReloadOnHangup { shared });
    reload.threads = Some(1);
    server.add_service(reload);

    server.run(RunArgs {
        shutdown_signal: Box::new(handover::Signals {
            upgrade_sock: files.upgrade_sock,
            early: options.early_signals.unwrap_or_default(),
        }),
    });
    handover::remove_pid(&pid_file);
    Ok(())
}
