//! Request attributes used as keys: consistent hashing (`hash_key`) and quotas (`key`).

use http::HeaderName;
use pingora::http::RequestHeader;

use crate::RequestCtx;

/// One request attribute: `ip`, `header:NAME`, `claim:NAME`, `api_key` or `route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKey {
    /// The client address (X-Forwarded-For believed only from `server.trusted_proxies`).
    Ip,
    Header(HeaderName),
    /// A claim of the verified principal.
    Claim(String),
    /// The consumer name of a verified API key.
    ApiKey,
    /// The matched route's name.
    Route,
}

impl crate::conf::ConfigStr for RequestKey {
    fn parse_config(s: &str) -> Result<Self, String> {
        RequestKey::parse(s)
    }
}

impl RequestKey {
    pub fn parse(s: &str) -> Result<RequestKey, String> {
        let s = s.trim();
        match s {
            "ip" => return Ok(RequestKey::Ip),
            "api_key" => return Ok(RequestKey::ApiKey),
            "route" => return Ok(RequestKey::Route),
            _ => {}
        }
        if let Some(h) = s.strip_prefix("header:") {
            return HeaderName::from_bytes(h.trim().to_ascii_lowercase().as_bytes())
                .map(RequestKey::Header)
                .map_err(|_| format!("{h:?} is not a header name"));
        }
        if let Some(c) = s.strip_prefix("claim:") {
            if !c.trim().is_empty() {
                return Ok(RequestKey::Claim(c.trim().to_string()));
            }
        }
        Err(format!(
            "{s:?} is not a request key; use \"ip\", \"header:NAME\", \"claim:NAME\", \"api_key\" or \"route\""
        ))
    }

    /// The attribute's value for a request; `None` when the request does not have it.
    pub fn value(&self, req: &RequestHeader, ctx: &RequestCtx) -> Option<String> {
        match self {
            RequestKey::Ip => ctx.client_ip.map(|ip| ip.to_string()),
            RequestKey::Header(h) => req
                .headers
                .get(h)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .filter(|v| !v.is_empty()),
            RequestKey::Claim(c) => ctx.principal.as_ref().and_then(|p| p.claim_str(c)),
            RequestKey::ApiKey => ctx
                .principal
                .as_ref()
                .filter(|p| p.verified_by == "key_auth")
                .and_then(|p| p.subject.clone()),
            RequestKey::Route => Some(ctx.route.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Principal;
    use std::sync::Arc;

    #[test]
    fn parses_and_reads_values() {
        let mut ctx = RequestCtx::new("id".into(), Arc::from("orders"));
        ctx.client_ip = Some("10.1.2.3".parse().unwrap());
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), "alice".into());
        ctx.principal = Some(Principal {
            subject: Some("alice".into()),
            claims: Arc::new(claims),
            verified_by: "jwt",
        });
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("x-tenant", "acme").unwrap();
        let v = |k: &str| RequestKey::parse(k).unwrap().value(&req, &ctx);
        assert_eq!(v("ip").as_deref(), Some("10.1.2.3"));
        assert_eq!(v("header:X-Tenant").as_deref(), Some("acme"));
        assert_eq!(v("header:x-missing"), None);
        assert_eq!(v("claim:sub").as_deref(), Some("alice"));
        assert_eq!(v("claim:nope"), None);
        assert_eq!(
            v("api_key"),
            None,
            "a jwt subject is not an API key consumer"
        );
        assert_eq!(v("route").as_deref(), Some("orders"));
        assert!(RequestKey::parse("cookie:x").is_err());
        assert!(RequestKey::parse("claim:").is_err());
    }
}
