//! `[plugins.NAME]` with `type = "cors"`.

use http::{HeaderName, Method};
use serde::Deserialize;

use crate::conf::{parse_errors, ConfigStr, HumanDuration, Parsed};
use crate::BuildError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to read responses: `"https://app.example.com"`, `"https://*.example.com"`
    /// (one label or more in front of the suffix), or `"*"` (any origin, not with credentials).
    pub allow_origins: Vec<Parsed<OriginPattern>>,
    /// Methods a preflight allows.
    #[serde(default = "default_methods")]
    pub allow_methods: Vec<Parsed<Method>>,
    /// Request headers a preflight allows (beyond the CORS-safelisted ones).
    #[serde(default)]
    pub allow_headers: Vec<Parsed<HeaderName>>,
    /// Response headers a page's script may read.
    #[serde(default)]
    pub expose_headers: Vec<Parsed<HeaderName>>,
    /// Whether the browser may send cookies and credentials and let the page read the answer.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may reuse a preflight answer (`Access-Control-Max-Age`).
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    /// Answer `Access-Control-Request-Private-Network` (Private Network Access).
    #[serde(default)]
    pub private_network: bool,
}

fn default_methods() -> Vec<Parsed<Method>> {
    ["GET", "HEAD", "POST"].into_iter().map(Parsed::from).collect()
}

/// One entry of `allow_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginPattern {
    /// `"*"`.
    Any,
    /// An exact serialised origin, lowercased: `https://app.example.com`.
    Exact(String),
    /// `https://*.example.com`: the scheme, and the host suffix with its dot (`.example.com`),
    /// and the `:port` part (empty for the scheme's default).
    Subdomains {
        scheme: String,
        suffix: String,
        port: String,
    },
}

impl OriginPattern {
    /// Whether a request's `Origin` value is allowed by this pattern.
    pub fn matches(&self, origin: &str) -> bool {
        match self {
            OriginPattern::Any => true,
            OriginPattern::Exact(o) => o.eq_ignore_ascii_case(origin),
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                let origin = origin.to_ascii_lowercase();
                let Some(rest) = origin
                    .strip_prefix(scheme.as_str())
                    .and_then(|r| r.strip_prefix("://"))
                else {
                    return false;
                };
                let Some(host) = rest.strip_suffix(port.as_str()) else {
                    return false;
                };
                // At least one whole label before the suffix: `evil-example.com` does not end
                // with `.example.com`, and `.example.com` alone has no label.
                let Some(labels) = host.strip_suffix(suffix.as_str()) else {
                    return false;
                };
                !labels.is_empty()
                    && !host.contains(':')
                    && labels.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            }
        }
    }
}

impl ConfigStr for OriginPattern {
    fn parse_config(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(OriginPattern::Any);
        }
        if s == "null" {
            return Err("\"null\" is the origin of sandboxed and file pages: any page can send it; \
                        list real origins"
                .into());
        }
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?} is not an origin; write e.g. \"https://app.example.com\""))?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("{s:?}: the scheme must be http or https"));
        }
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(format!(
                "{s:?} is not an origin: scheme and host only, no path or trailing slash"
            ));
        }
        // `[::1]` and `[::1]:8443` keep their brackets; a port follows the last `:` outside.
        let split = match rest.rfind(']') {
            Some(end) => rest[end..].find(':').map(|i| end + i),
            None => rest.rfind(':'),
        };
        let (host, port) = match split {
            Some(i) => {
                let p = &rest[i + 1..];
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{s:?}: the port must be a number"));
                }
                (&rest[..i], format!(":{p}"))
            }
            None => (rest, String::new()),
        };
        if let Some(suffix) = host.strip_prefix("*.") {
            if suffix.is_empty() || suffix.contains('*') || !suffix.contains('.') {
                return Err(format!(
                    "{s:?}: a wildcard covers subdomains of a registrable domain, e.g. \"https://*.example.com\""
                ));
            }
            return Ok(OriginPattern::Subdomains {
                scheme: scheme.to_string(),
                suffix: format!(".{}", suffix.to_ascii_lowercase()),
                port,
            });
        }
        if host.contains('*') {
            return Err(format!(
                "{s:?}: `*` is allowed only as the whole first label (\"https://*.example.com\")"
            ));
        }
        Ok(OriginPattern::Exact(s.to_ascii_lowercase()))
    }
}

pub fn validate(c: &CorsConfig) -> Vec<BuildError> {
    let mut errors = parse_errors("allow_origins", &c.allow_origins);
    errors.extend(parse_errors("allow_methods", &c.allow_methods));
    errors.extend(parse_errors("allow_headers", &c.allow_headers));
    errors.extend(parse_errors("expose_headers", &c.expose_headers));
    if c.allow_methods.is_empty() {
        errors.push(BuildError::new("allow_methods", "list at least one method"));
    }
    for (key, list) in [
        ("allow_methods", c.allow_methods.iter().map(|m| m.text()).collect::<Vec<_>>()),
        ("allow_headers", c.allow_headers.iter().map(|h| h.text()).collect()),
        ("expose_headers", c.expose_headers.iter().map(|h| h.text()).collect()),
    ] {
        if let Some(i) = list.iter().position(|t| *t == "*") {
            errors.push(BuildError::new(
                format!("{key}[{i}]"),
                "\"*\" is not supported: list the names (a wildcard is ignored by browsers \
                 on credentialed requests and hides what a route accepts)",
            ));
        }
    }
    if c.allow_origins.is_empty() {
        errors.push(BuildError::new(
            "allow_origins",
            "list at least one origin (or \"*\")",
        ));
    }
    if c.allow_credentials {
        for (i, o) in c.allow_origins.iter().enumerate() {
            if o.get() == Some(&OriginPattern::Any) {
                errors.push(BuildError::new(
                    format!("allow_origins[{i}]"),
                    "\"*\" cannot be used with allow_credentials = true (browsers refuse it, and \
                     echoing any origin with credentials lets every site read users' data); list the origins",
                ));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> OriginPattern {
        OriginPattern::parse_config(s).unwrap()
    }

    #[test]
    fn origin_patterns() {
        let exact = p("https://App.example.com");
        assert!(exact.matches("https://app.example.com"));
        assert!(!exact.matches("http://app.example.com"));
        assert!(!exact.matches("https://app.example.com.evil.test"));
        let sub = p("https://*.example.com");
        assert!(sub.matches("https://a.example.com"));
        assert!(sub.matches("https://a.b.example.com"));
        assert!(!sub.matches("https://example.com"));
        assert!(!sub.matches("https://evil-example.com"));
        assert!(!sub.matches("https://.example.com"));
        assert!(!sub.matches("http://a.example.com"));
        assert!(!sub.matches("https://a.example.com:8443"));
        assert!(!sub.matches("https://a..example.com"));
        let sub_port = p("https://*.example.com:8443");
        assert!(sub_port.matches("https://a.example.com:8443"));
        assert!(!sub_port.matches("https://a.example.com"));
        assert!(p("*").matches("https://anything.test"));
        assert!(p("http://[::1]").matches("http://[::1]"));
        assert!(p("http://[::1]:8080").matches("http://[::1]:8080"));
        for bad in [
            "null",
            "app.example.com",
            "ftp://x.test",
            "https://x.test/",
            "https://*.com",
            "https://a.*.example.com",
            "https://x.test:abc",
        ] {
            assert!(OriginPattern::parse_config(bad).is_err(), "{bad}");
        }
    }
}
