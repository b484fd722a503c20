//! `bare-pingora`: the smallest `ProxyHttp` there is (one fixed upstream, nothing else), with
//! Pingora's default settings: the floor any Pingora-based proxy stands on, measured beside
//! Sallyport by `bench/run`.
//!
//! `bare-pingora --listen 127.0.0.1:8081 --upstream 127.0.0.1:3001 [--threads 1]`

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    upstream: String,
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let cli = Cli::parse();
    let conf = ServerConf {
        threads: cli.threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare {
            upstream: cli.upstream,
        },
    );
    proxy.add_tcp(&cli.listen);
    server.add_service(proxy);
    server.run_forever();
}
