//! `ip_filter`: allow and deny lists of client networks for the routes that list it.
//!
//! The client address is the one quotas and the access log use (`RequestCtx::client_ip`: the
//! peer, or the first untrusted hop of `X-Forwarded-For` behind `server.trusted_proxies`).
//! IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`) are matched as the IPv4 address they carry.
//! A denied request gets 403 (`ip_denied`, or `ip_not_allowed` when an allow list exists and
//! the address is not on it); `deny` wins over `allow`. To refuse connections before TLS and
//! before any request is read, see `server.deny_connections`.
//!
//! ```toml
//! [plugins.office-only]
//! type = "ip_filter"
//! allow = ["10.0.0.0/8", "2001:db8::/32"]
//! deny = ["10.9.0.0/16"]
//! ```

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::IpNet;
use pingora::proxy::Session;
use serde::Deserialize;

use crate::conf::{parse_errors, Parsed};
use crate::{
    ApiError, BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Reply, RequestCtx,
    Result,
};

/// `[plugins.NAME]` with `type = "ip_filter"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpFilterConfig {
    /// When not empty, only these networks pass.
    #[serde(default)]
    pub allow: Vec<Parsed<IpNet>>,
    /// These networks never pass (even when also allowed).
    #[serde(default)]
    pub deny: Vec<Parsed<IpNet>>,
}

pub fn validate(c: &IpFilterConfig) -> Vec<BuildError> {
    let mut errors = parse_errors("allow", &c.allow);
    errors.extend(parse_errors("deny", &c.deny));
    if c.allow.is_empty() && c.deny.is_empty() {
        errors.push(BuildError::new("allow", "list networks in allow, deny or both"));
    }
    errors
}

/// The built `ip_filter` plugin.
pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// Why an address may not pass, if it may not.
pub fn verdict(allow: &[IpNet], deny: &[IpNet], ip: Option<IpAddr>) -> Option<&'static str> {
    let Some(ip) = ip.map(|ip| ip.to_canonical()) else {
        // No address to check (not a TCP client): only a deny-only filter lets it pass.
        return (!allow.is_empty()).then_some("ip_not_allowed");
    };
    if deny.iter().any(|n| n.contains(&ip)) {
        return Some("ip_denied");
    }
    if !allow.is_empty() && !allow.iter().any(|n| n.contains(&ip)) {
        return Some("ip_not_allowed");
    }
    None
}

#[async_trait]
impl Plugin for IpFilter {
    type State = ();

    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        match verdict(&self.allow, &self.deny, ctx.client_ip) {
            None => Ok(Flow::Continue),
            Some(reason) => {
                let mut err = ApiError::new(403, "forbidden", "requests from this address are not allowed here");
                err.reason = reason;
                Ok(Flow::Respond(Reply::Error(err)))
            }
        }
    }
}

impl crate::PluginType for IpFilterConfig {
    const KIND: &'static str = "ip_filter";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn build(&self, _env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = validate(self);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Erased::into_dyn(IpFilter {
            allow: crate::conf::values("allow", &self.allow)?,
            deny: crate::conf::values("deny", &self.deny)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn deny_wins_and_mapped_addresses_match_their_ipv4() {
        let allow = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        let deny = nets(&["10.9.0.0/16"]);
        let v = |ip: &str| verdict(&allow, &deny, Some(ip.parse().unwrap()));
        assert_eq!(v("10.1.2.3"), None);
        assert_eq!(v("10.9.2.3"), Some("ip_denied"));
        assert_eq!(v("::ffff:10.1.2.3"), None);
        assert_eq!(v("::ffff:10.9.0.1"), Some("ip_denied"));
        assert_eq!(v("2001:db8::1"), None);
        assert_eq!(v("192.0.2.1"), Some("ip_not_allowed"));
        assert_eq!(verdict(&allow, &deny, None), Some("ip_not_allowed"));
        assert_eq!(verdict(&[], &deny, None), None);
        assert_eq!(verdict(&[], &deny, Some("192.0.2.1".parse().unwrap())), None);
    }
}
