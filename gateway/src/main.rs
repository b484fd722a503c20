//! `sallyport -c FILE` runs the gateway; `sallyport --check -c FILE` validates a config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: a request allocates and frees many small
/// buffers, and glibc malloc showed up as ~12% of CPU in profiles of the proxy path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sallyport: an API gateway on Pingora.
#[derive(Parser, Debug)]
#[command(name = "sallyport", version)]
struct Cli {
    /// The TOML config file.
    #[arg(short = 'c', long = "conf", default_value = "conf/sallyport.toml")]
    conf: PathBuf,
    /// Validate the config, print every error with its path, and exit (1 on errors).
    #[arg(long)]
    check: bool,
    /// Take over the listening sockets of a running gateway (zero-downtime upgrade).
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Run in the background.
    #[arg(short = 'd', long)]
    daemon: bool,
}

fn main() -> ExitCode {
    // Before anything else: a signal during start-up must not kill the process.
    let early_signals = match sallyport::handover::EarlySignals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sallyport: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    // Token signatures are checked with ring; chosen before anything touches jsonwebtoken.
    sallyport_plugins::jwt::crypto::install();

    if cli.check {
        return match sallyport::source::load(&cli.conf) {
            Ok(_) => {
                println!("{}: ok", cli.conf.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} error(s)", cli.conf.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                ExitCode::FAILURE
            }
        };
    }

    let shared = match sallyport::Shared::load(&cli.conf) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: refusing to start:", cli.conf.display());
            for line in e.to_string().lines() {
                eprintln!("  {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    let options = sallyport::RunOptions {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        early_signals: Some(early_signals),
    };
    match sallyport::run(shared, options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sallyport: {e:#}");
            ExitCode::FAILURE
        }
    }
}
