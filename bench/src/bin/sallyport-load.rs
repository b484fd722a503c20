//! `sallyport-load`: the open-loop half of the load benchmark (wrk does the closed loop).
//!
//! `sallyport-load rate --url U --rate R --duration D [--connections C] [--header K:V]`
//! sends requests on a fixed schedule (R per second, spread over C keep-alive connections)
//! and measures each latency from the moment the request *should* have been sent, so a stall
//! shows up as the latency it causes (no coordinated omission). Prints one JSON line.
//!
//! `sallyport-load hold --url U --connections N` opens N keep-alive connections, sends one
//! request on each, prints `holding N` and keeps them open until stdin closes or a signal
//! arrives: how the harness measures memory per connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(name = "sallyport-load")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fixed-rate latency measurement.
    Rate {
        #[arg(long)]
        url: String,
        /// Requests per second.
        #[arg(long)]
        rate: u64,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 32)]
        connections: u64,
        /// Extra request header `Name: value` (repeatable).
        #[arg(long)]
        header: Vec<String>,
    },
    /// Hold many idle keep-alive connections.
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
}

/// `http://host:port/path` into the address and the request bytes.
fn request(url: &str, headers: &[String]) -> anyhow::Result<(SocketAddr, Vec<u8>)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority.parse().context("the URL needs an ip:port")?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    Ok((addr, req.into_bytes()))
}

/// Reads one response (Content-Length or chunked) from a keep-alive connection.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..head_end]).context("response head")?;
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("status line")?;
            let lower = head.to_ascii_lowercase();
            let body_start = head_end + 4;
            if let Some(len) = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                while buf.len() < body_start + len {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        bail!("connection closed mid-body");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Ok(status);
            }
            if lower.contains("transfer-encoding: chunked") {
                while !buf[body_start..].windows(5).any(|w| w == b"0\r\n\r\n") {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        bail!("connection closed mid-body");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return Ok(status);
            }
            return Ok(status);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct ConnResult {
    histogram: Histogram<u64>,
    ok: u64,
    errors: u64,
}

async fn run_connection(
    addr: SocketAddr,
    req: Vec<u8>,
    start: Instant,
    first: Duration,
    interval: Duration,
    end: Instant,
) -> anyhow::Result<ConnResult> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0, 0);
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut intended = start + first;
    while intended < end {
        tokio::time::sleep_until(intended.into()).await;
        let result = async {
            stream.write_all(&req).await?;
            read_response(&mut stream, &mut buf).await
        }
        .await;
        match result {
            Ok(status) if status < 500 => ok += 1,
            Ok(_) => errors += 1,
            Err(_) => {
                errors += 1;
                stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
            }
        }
        let latency = Instant::now().saturating_duration_since(intended);
        histogram.saturating_record(latency.as_micros() as u64);
        intended += interval;
    }
    Ok(ConnResult {
        histogram,
        ok,
        errors,
    })
}

async fn rate(
    url: &str,
    rate: u64,
    duration: Duration,
    connections: u64,
    headers: &[String],
) -> anyhow::Result<()> {
    let (addr, req) = request(url, headers)?;
    let connections = connections.clamp(1, rate.max(1));
    // Each connection sends every `connections / rate` seconds, offset so the sends are spread.
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + duration;
    let mut tasks = Vec::new();
    for i in 0..connections {
        let first = interval.mul_f64(i as f64 / connections as f64);
        tasks.push(tokio::spawn(run_connection(
            addr,
            req.clone(),
            start,
            first,
            interval,
            end,
        )));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let r = t.await??;
        total.add(&r.histogram)?;
        ok += r.ok;
        errors += r.errors;
    }
    let q = |p: f64| total.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "target_rate": rate,
            "achieved_rate": (ok + errors) as f64 / duration.as_secs_f64(),
            "ok": ok, "errors": errors,
            "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": total.max() as f64 / 1000.0,
        })
    );
    Ok(())
}

async fn hold(url: &str, connections: usize) -> anyhow::Result<()> {
    let (addr, req) = request(url, &[])?;
    let mut streams = Vec::with_capacity(connections);
    let mut buf = Vec::new();
    for _ in 0..connections {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&req).await?;
        read_response(&mut s, &mut buf).await?;
        streams.push(s);
    }
    println!("holding {connections}");
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    tokio::select! {
        _ = async { while stdin.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {} } => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(streams);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Rate {
                url,
                rate: r,
                duration,
                connections,
                header,
            } => rate(&url, r, duration, connections, &header).await,
            Cmd::Hold { url, connections } => hold(&url, connections).await,
        }
    })
}
