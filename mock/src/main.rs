//! `sallyport-mock`: the mock upstream as a process, for the demo and benchmarks.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sallyport_mock::{MockConfig, MockServer};

/// A fast mock upstream (users, orders, recs, echo, /fast, /healthz).
#[derive(Parser, Debug)]
#[command(name = "sallyport-mock", version)]
struct Cli {
    /// Address to serve, `ip:port` or `name=ip:port`; repeat for several servers.
    #[arg(long, required = true)]
    listen: Vec<String>,
    /// Service name for listeners without `name=`.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Delay added to every answer but /healthz, e.g. `5ms`.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Status of every answer but /healthz.
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// Share of requests answered 500, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Keep received requests in memory (tests only; off by default).
    #[arg(long)]
    record: bool,
    /// Also run the mock OpenID provider here (`ip:port`; client `web`, secret `web-secret`),
    /// for the demo's browser login.
    #[arg(long)]
    oidc: Option<SocketAddr>,
    /// Also serve the gRPC service `mock.Echo` over h2c here (`ip:port`).
    #[arg(long)]
    grpc: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let mut servers = Vec::new();
        for spec in &cli.listen {
            let (name, addr) = match spec.split_once('=') {
                Some((n, a)) => (n.to_string(), a),
                None => (cli.name.clone(), spec.as_str()),
            };
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("--listen {spec}: not an ip:port address"))?;
            let cfg = MockConfig {
                name: name.clone(),
                latency: cli.latency,
                status: cli.status,
                fail_rate: cli.fail_rate,
                record: cli.record,
            };
            let server = MockServer::start_on(addr, cfg)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            println!("sallyport-mock {name} listening on {}", server.addr());
            servers.push(server);
        }
        let _provider = match cli.oidc {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--oidc: cannot listen on {addr}"))?;
                let p = sallyport_mock::oidc::OidcProvider::from_listener(
                    listener,
                    sallyport_mock::oidc::OidcConfig::default(),
                )?;
                println!("sallyport-mock OpenID provider at {}", p.issuer());
                Some(p)
            }
            None => None,
        };
        if let Some(addr) = cli.grpc {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--grpc: cannot listen on {addr}"))?;
            sallyport_mock::grpc::serve(listener);
            println!("sallyport-mock gRPC mock.Echo on {addr}");
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        drop(servers);
        Ok(())
    })
}
