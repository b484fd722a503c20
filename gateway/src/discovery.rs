//! DNS service discovery: endpoints written as host names are resolved by the pools, again
//! every `resolve_interval`.
//!
//! Without `server.dns_resolvers` names are resolved the way every other program on the
//! host resolves them: the system's resolver (`getaddrinfo` on a blocking thread, so
//! `/etc/hosts`, `nsswitch.conf` and `/etc/resolv.conf` apply as they do for curl). With
//! it, `hickory-resolver` asks those name servers directly (an async resolver made for this:
//! A and AAAA together, timeouts, several servers); its answers are cached at most
//! [`MAX_CACHE`], so `resolve_interval`, not a record's TTL, decides how soon a change is
//! seen (a Kubernetes headless Service answers with a 30 s TTL; a 5 s interval means 5 s).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

/// The longest an answer of configured name servers is reused.
const MAX_CACHE: Duration = Duration::from_secs(1);

/// The deadline of one resolution (every name server and attempt).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway's resolver.
pub enum Dns {
    /// `getaddrinfo`.
    System,
    /// `server.dns_resolvers`.
    Servers(Box<Servers>),
}

/// A resolver of configured name servers, built on first use (it needs the runtime).
pub struct Servers {
    config: ResolverConfig,
    opts: ResolverOpts,
    resolver: std::sync::OnceLock<TokioResolver>,
}

impl Dns {
    /// With `servers`, or the system's resolver when empty.
    pub fn new(servers: &[SocketAddr]) -> Dns {
        if servers.is_empty() {
            return Dns::System;
        }
        let mut config = ResolverConfig::new();
        for s in servers {
            config.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
        }
        let mut opts = ResolverOpts::default();
        // The configured name servers answer for every name.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.positive_max_ttl = Some(MAX_CACHE);
        opts.negative_max_ttl = Some(MAX_CACHE);
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        Dns::Servers(Box::new(Servers {
            config,
            opts,
            resolver: std::sync::OnceLock::new(),
        }))
    }

    /// Every address of `host`, sorted; an error when it has none.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let mut addrs: Vec<IpAddr> = match self {
            Dns::System => {
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0)))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())?
                    .map(|a| a.ip())
                    .collect()
            }
            Dns::Servers(s) => {
                let resolver = s.resolver.get_or_init(|| {
                    TokioResolver::builder_with_config(
                        s.config.clone(),
                        TokioConnectionProvider::default(),
                    )
                    .with_options(s.opts.clone())
                    .build()
                });
                tokio::time::timeout(RESOLVE_TIMEOUT, resolver.lookup_ip(host))
                    .await
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())?
                    .iter()
                    .collect()
            }
        };
        addrs.sort_unstable();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("no A or AAAA records".into());
        }
        Ok(addrs)
    }
}
