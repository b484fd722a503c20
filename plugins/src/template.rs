//! Templates: literal text and substitutions from the request, `{claim.NAME}`, `{path.NAME}`,
//! `{query.NAME}`, `{header.NAME}`, `{route}`, `{request_id}`, `{client_ip}`.
//!
//! Two uses, two renderings:
//! - paths of aggregate calls ([`Template::parse`], [`Template::render`]): values are
//!   percent-encoded (everything but unreserved characters), so a claim or a path segment can
//!   never add a path segment, a query parameter or a fragment to the call;
//! - header values of the `headers` plugin ([`Template::parse_value`],
//!   [`Template::render_value`]): values are taken as they are, and the result must be a valid
//!   header value (no CR, LF or NUL can ever pass).

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::RequestCtx;

/// Everything but `A-Z a-z 0-9 - . _ ~` is encoded.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Claim(String),
    Path(String),
    Query(String),
    Header(http::HeaderName),
    Route,
    RequestId,
    ClientIp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Value(Source),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl crate::conf::ConfigStr for Template {
    fn parse_config(s: &str) -> Result<Self, String> {
        Template::parse(s)
    }
}

impl Template {
    /// A path template: starts with `/`.
    pub fn parse(s: &str) -> Result<Template, String> {
        if !s.starts_with('/') {
            return Err(format!("{s:?} must start with /"));
        }
        Self::parse_parts(s)
    }

    /// A header value template: its literal text must be valid in a header value.
    pub fn parse_value(s: &str) -> Result<Template, String> {
        if s.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
            return Err(format!("{s:?} has a control character"));
        }
        Self::parse_parts(s)
    }

    fn parse_parts(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed {{ in {s:?}"))?;
            let inner = &rest[open + 1..close];
            let bare = match inner {
                "route" => Some(Source::Route),
                "request_id" => Some(Source::RequestId),
                "client_ip" => Some(Source::ClientIp),
                _ => None,
            };
            if let Some(source) = bare {
                parts.push(Part::Value(source));
                rest = &rest[close + 1..];
                continue;
            }
            let (ns, name) = inner
                .split_once('.')
                .ok_or_else(|| format!("{{{inner}}}: write {{claim.NAME}}, {{path.NAME}}, {{query.NAME}}, {{header.NAME}}, {{route}}, {{request_id}} or {{client_ip}}"))?;
            if name.is_empty() {
                return Err(format!("{{{inner}}} has no name"));
            }
            let source = match ns {
                "claim" => Source::Claim(name.to_string()),
                "path" => Source::Path(name.to_string()),
                "query" => Source::Query(name.to_string()),
                "header" => Source::Header(
                    http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("{{{inner}}}: {name:?} is not a header name"))?,
                ),
                other => {
                    return Err(format!(
                        "{{{inner}}}: unknown namespace {other:?}; use claim, path, query or header"
                    ))
                }
            };
            parts.push(Part::Value(source));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched }} in {s:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The path names (`{path.NAME}`) the template uses.
    pub fn path_params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Value(Source::Path(n)) => Some(n.as_str()),
            _ => None,
        })
    }

    /// The claims (`{claim.NAME}`) the template uses.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Value(Source::Claim(n)) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Fills a header value template for a request: values as they are; `Err` names the first
    /// missing value, or says the result is not a valid header value.
    pub fn render_value(
        &self,
        req: &pingora::http::RequestHeader,
        ctx: &RequestCtx,
    ) -> Result<http::HeaderValue, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Value(source) => {
                    out.push_str(&lookup(source, req, ctx).ok_or_else(|| describe(source))?)
                }
            }
        }
        http::HeaderValue::from_str(&out)
            .map_err(|_| "the value has a character a header cannot carry".to_string())
    }

    /// Fills the template for a request; `Err` names the first missing value.
    pub fn render(
        &self,
        req: &pingora::http::RequestHeader,
        ctx: &RequestCtx,
    ) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Value(source) => {
                    // Empty and dot-only values are refused like missing ones: "" would
                    // change the path's shape, "." and ".." would climb it at the upstream.
                    let value = lookup(source, req, ctx)
                        .filter(|v| !v.is_empty() && !v.bytes().all(|b| b == b'.'))
                        .ok_or_else(|| describe(source))?;
                    out.extend(utf8_percent_encode(&value, VALUE));
                }
            }
        }
        Ok(out)
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::Claim(n) => format!("{{claim.{n}}}"),
        Source::Path(n) => format!("{{path.{n}}}"),
        Source::Query(n) => format!("{{query.{n}}}"),
        Source::Header(n) => format!("{{header.{n}}}"),
        Source::Route => "{route}".to_string(),
        Source::RequestId => "{request_id}".to_string(),
        Source::ClientIp => "{client_ip}".to_string(),
    }
}

fn lookup(source: &Source, req: &pingora::http::RequestHeader, ctx: &RequestCtx) -> Option<String> {
    match source {
        Source::Claim(n) => ctx.principal.as_ref()?.claim_str(n),
        Source::Path(n) => ctx.path_param(n).map(str::to_string),
        Source::Query(n) => req.uri.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            (k == n.as_str()).then(|| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        }),
        Source::Header(h) => req.headers.get(h)?.to_str().ok().map(str::to_string),
        Source::Route => Some(ctx.route.to_string()),
        Source::RequestId => Some(ctx.request_id.clone()),
        Source::ClientIp => ctx.client_ip.map(|ip| ip.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Principal;
    use std::sync::Arc;

    #[test]
    fn header_values_render_raw_and_refuse_line_breaks() {
        let t = Template::parse_value("{claim.tenant}/{route}/{request_id}/{client_ip}").unwrap();
        let mut ctx = RequestCtx::new("rid".into(), Arc::from("orders"));
        ctx.client_ip = Some("10.0.0.1".parse().unwrap());
        let mut claims = serde_json::Map::new();
        claims.insert("tenant".into(), "a b".into());
        ctx.principal = Some(Principal {
            subject: None,
            claims: Arc::new(claims),
            verified_by: "jwt",
        });
        let req = pingora::http::RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(
            t.render_value(&req, &ctx).unwrap(),
            "a b/orders/rid/10.0.0.1"
        );
        let mut claims = serde_json::Map::new();
        claims.insert("tenant".into(), "x\r\nset-cookie: a=b".into());
        ctx.principal.as_mut().unwrap().claims = Arc::new(claims);
        assert!(t.render_value(&req, &ctx).is_err());
        assert!(Template::parse_value("a\r\nb").is_err());
        assert_eq!(
            Template::parse_value("{claim.tenant}")
                .unwrap()
                .claims()
                .collect::<Vec<_>>(),
            ["tenant"]
        );
    }

    #[test]
    fn renders_and_encodes() {
        let t = Template::parse(
            "/users/{claim.sub}/orders?limit={query.n}&lang={header.accept-language}&x={path.id}",
        )
        .unwrap();
        let mut ctx = RequestCtx::new("r".into(), Arc::from("route"));
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), "../admin?x=1#f".into());
        ctx.principal = Some(Principal {
            subject: None,
            claims: Arc::new(claims),
            verified_by: "jwt",
        });
        ctx.path_params.push((Arc::from("id"), "a/b".into()));
        let mut req =
            pingora::http::RequestHeader::build("GET", b"/x?n=5%26evil%3D1&m=2", None).unwrap();
        req.insert_header("accept-language", "en US").unwrap();
        assert_eq!(
            t.render(&req, &ctx).unwrap(),
            "/users/..%2Fadmin%3Fx%3D1%23f/orders?limit=5%26evil%3D1&lang=en%20US&x=a%2Fb"
        );
        let t = Template::parse("/users/{claim.tenant}").unwrap();
        assert_eq!(t.render(&req, &ctx), Err("{claim.tenant}".to_string()));
        for bad in ["/x?u=..", "/x?u=.", "/x?u=", "/x?u=%2E%2E"] {
            let req = pingora::http::RequestHeader::build("GET", bad.as_bytes(), None).unwrap();
            let t = Template::parse("/users/{query.u}").unwrap();
            assert_eq!(t.render(&req, &ctx), Err("{query.u}".to_string()), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in [
            "users/{claim.sub}",
            "/a/{claim.sub",
            "/a/{sub}",
            "/a/{cookie.x}",
            "/a/{claim.}",
            "/a/}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
