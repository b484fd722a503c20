//! Path templates of aggregate calls: literal text and `{namespace.NAME}` substitutions whose
//! values are percent-encoded (everything but unreserved characters), so a claim or a path
//! segment can never add a path segment, a query parameter or a fragment to the call.

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
    pub fn parse(s: &str) -> Result<Template, String> {
        if !s.starts_with('/') {
            return Err(format!("{s:?} must start with /"));
        }
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
            let (ns, name) = inner
                .split_once('.')
                .ok_or_else(|| format!("{{{inner}}}: write {{claim.NAME}}, {{path.NAME}}, {{query.NAME}} or {{header.NAME}}"))?;
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Principal;
    use std::sync::Arc;

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
