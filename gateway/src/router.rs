//! Route matching: host (exact, then the longest `*.suffix`, then routes without a host),
//! then an exact `path` or the longest `path_prefix` on segment boundaries, then method.
//!
//! Each host group keeps two hash maps (exact paths, prefixes), so a lookup costs one hash
//! probe per path segment, whatever the number of routes. The maps hash with foldhash (random
//! seed per map): they are built from the config and only read per request, so a client's
//! path or host can probe them but never grow a chain, and foldhash costs a fraction of the
//! standard library's SipHash on these short keys.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;
use sallyport_plugins::conf::ConfigStr;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A route's host pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`: stores `.example.com`; matches `a.example.com`, not `example.com`.
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let lower = s.trim().to_ascii_lowercase();
        let (wild, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid = !rest.is_empty()
            && rest.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(format!(
                "{s:?} is not a host name or a wildcard like \"*.example.com\""
            ));
        }
        Ok(if wild {
            HostPattern::Suffix(format!(".{rest}"))
        } else {
            HostPattern::Exact(rest.to_string())
        })
    }
}

impl ConfigStr for HostPattern {
    fn parse_config(s: &str) -> Result<Self, String> {
        HostPattern::parse(s)
    }
}

/// A path written in the config (`path`, `path_prefix`, `rewrite_prefix`), normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePath(pub String);

impl ConfigStr for RoutePath {
    fn parse_config(s: &str) -> Result<Self, String> {
        config_path(s).map(RoutePath)
    }
}

/// Checks and normalises a path written in the config (`path`, `path_prefix`,
/// `rewrite_prefix`).
fn config_path(raw: &str) -> Result<String, String> {
    if raw.contains(['?', '#']) {
        return Err(format!("{raw:?} must be a path without query or fragment"));
    }
    crate::path::normalize(raw, crate::path::EscapedSlashes::Decode)
        .map(|p| p.into_owned())
        .map_err(|e| format!("{raw:?}: {}", e.message()))
}

/// What a route matches on, as the router needs it.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub hosts: Vec<HostPattern>,
    pub exact: bool,
    /// Normalised; prefixes without a trailing slash (except `/`).
    pub path: String,
    /// Empty: any method. `GET` implies `HEAD`.
    pub methods: Vec<Method>,
}

/// Captured `{name}` segments: `(name, percent-decoded value)`.
pub type Params = Vec<(Arc<str>, String)>;

/// The result of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Index of the matched route, and its captured path parameters.
    Found(usize, Params),
    /// A route matches host and path but not the method; the `Allow` header value.
    MethodNotAllowed(String),
    NotFound,
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(Arc<str>),
}

/// An exact path with `{name}` segments, e.g. `/api/web/users/{id}/summary`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    segments: Vec<Segment>,
    trailing_slash: bool,
}

impl Template {
    fn parse(path: &str) -> Template {
        let trailing_slash = path.len() > 1 && path.ends_with('/');
        let segments = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(Arc::from(name)),
                    None => Segment::Literal(s.to_string()),
                },
            )
            .collect();
        Template {
            segments,
            trailing_slash,
        }
    }

    fn capture(&self, path: &str) -> Option<Params> {
        if self.trailing_slash != (path.len() > 1 && path.ends_with('/')) {
            return None;
        }
        let mut parts = path.trim_matches('/').split('/').filter(|s| !s.is_empty());
        let mut params = Vec::new();
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) => {
                    if l != part {
                        return None;
                    }
                }
                Segment::Param(name) => params.push((
                    Arc::clone(name),
                    percent_encoding::percent_decode_str(part)
                        .decode_utf8_lossy()
                        .into_owned(),
                )),
            }
        }
        parts.next().is_none().then_some(params)
    }
}

/// Checks the `{name}` segments of a config path: whole segments, identifier names, unique.
pub fn check_template(path: &str) -> Result<(), String> {
    let mut names: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        if !seg.contains(['{', '}']) {
            continue;
        }
        let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) else {
            return Err(format!(
                "{seg:?}: a {{name}} parameter must be a whole path segment"
            ));
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "{seg:?}: parameter names are letters, digits and _"
            ));
        }
        if names.contains(&name) {
            return Err(format!("parameter {{{name}}} appears twice"));
        }
        names.push(name);
    }
    Ok(())
}

/// The names of a config path's `{name}` segments (`/users/{id}` captures `id`).
pub fn template_params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

/// Whether a config path has `{name}` segments.
pub fn is_template(path: &str) -> bool {
    path.contains('{')
}

#[derive(Default)]
struct PathTable {
    exact: HashMap<String, Vec<usize>>,
    templates: Vec<(Template, Vec<usize>)>,
    prefix: HashMap<String, Vec<usize>>,
}

impl PathTable {
    /// Routes sharing the most specific path that matches, in config order, with captured
    /// parameters: exact paths, then templates, then the longest prefix.
    fn find(&self, path: &str) -> Option<(&[usize], Params)> {
        if let Some(r) = self.exact.get(path) {
            return Some((r, Vec::new()));
        }
        for (t, r) in &self.templates {
            if let Some(params) = t.capture(path) {
                return Some((r, params));
            }
        }
        if self.prefix.is_empty() {
            return None;
        }
        let mut candidate = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        loop {
            if let Some(r) = self.prefix.get(candidate) {
                return Some((r, Vec::new()));
            }
            if candidate == "/" {
                return None;
            }
            candidate = match candidate.rfind('/') {
                Some(0) => "/",
                Some(i) => &candidate[..i],
                None => return None,
            };
        }
    }
}

/// The compiled routing table.
#[derive(Default)]
pub struct Router {
    exact_hosts: HashMap<String, PathTable>,
    /// Longest suffix first.
    suffix_hosts: Vec<(String, PathTable)>,
    any_host: PathTable,
    methods: Vec<Vec<Method>>,
}

impl Router {
    pub fn new(routes: &[RouteMatch]) -> Router {
        let mut router = Router::default();
        for (i, r) in routes.iter().enumerate() {
            let path = if r.exact || r.path == "/" {
                r.path.clone()
            } else {
                r.path.trim_end_matches('/').to_string()
            };
            if r.hosts.is_empty() {
                insert(&mut router.any_host, r.exact, &path, i);
            }
            for h in &r.hosts {
                let table = match h {
                    HostPattern::Exact(host) => router.exact_hosts.entry(host.clone()).or_default(),
                    HostPattern::Suffix(suffix) => {
                        let idx = match router.suffix_hosts.iter().position(|(s, _)| s == suffix) {
                            Some(p) => p,
                            None => {
                                router
                                    .suffix_hosts
                                    .push((suffix.clone(), PathTable::default()));
                                router.suffix_hosts.len() - 1
                            }
                        };
                        &mut router.suffix_hosts[idx].1
                    }
                };
                insert(table, r.exact, &path, i);
            }
            router.methods.push(r.methods.clone());
        }
        router
            .suffix_hosts
            .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        router
    }

    /// Finds the route for a request. `host` is the lowercased host without port.
    pub fn lookup(&self, host: &str, path: &str, method: &Method) -> Lookup {
        let exact = self.exact_hosts.get(host);
        let suffixes = self
            .suffix_hosts
            .iter()
            .filter(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
            .map(|(_, t)| t);
        for table in exact.into_iter().chain(suffixes).chain([&self.any_host]) {
            if let Some((candidates, params)) = table.find(path) {
                return self.pick_method(candidates, params, method);
            }
        }
        Lookup::NotFound
    }

    fn pick_method(&self, candidates: &[usize], params: Params, method: &Method) -> Lookup {
        for &i in candidates {
            let allowed = &self.methods[i];
            if allowed.is_empty()
                || allowed.contains(method)
                || (method == Method::HEAD && allowed.contains(&Method::GET))
            {
                return Lookup::Found(i, params);
            }
        }
        let mut allow: Vec<&str> = Vec::new();
        for &i in candidates {
            for m in &self.methods[i] {
                if !allow.contains(&m.as_str()) {
                    allow.push(m.as_str());
                }
                if m == Method::GET && !allow.contains(&"HEAD") {
                    allow.push("HEAD");
                }
            }
        }
        Lookup::MethodNotAllowed(allow.join(", "))
    }
}

fn insert(table: &mut PathTable, exact: bool, path: &str, route: usize) {
    if exact && is_template(path) {
        let t = Template::parse(path);
        match table.templates.iter_mut().find(|(x, _)| *x == t) {
            Some((_, routes)) => routes.push(route),
            None => table.templates.push((t, vec![route])),
        }
        return;
    }
    let map = if exact {
        &mut table.exact
    } else {
        &mut table.prefix
    };
    map.entry(path.to_string()).or_default().push(route);
}

/// The lowercased host of a request, without port or trailing dot.
pub fn request_host(raw: &str) -> Cow<'_, str> {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port.
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.trim_end_matches('.');
    // Clients send lowercase names: those are routed without a copy.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Replaces the matched `prefix` of `path` with `to`: with prefix `/api/orders` and
/// `to = "/orders"`, `/api/orders/7` becomes `/orders/7`.
pub fn rewrite(path: &str, prefix: &str, to: &str) -> String {
    let rest = if prefix == "/" {
        path
    } else {
        path.strip_prefix(prefix).unwrap_or(path)
    };
    let mut out = String::with_capacity(to.len() + rest.len());
    out.push_str(to.trim_end_matches('/'));
    out.push_str(rest);
    if out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(hosts: &[&str], exact: bool, path: &str, methods: &[&str]) -> RouteMatch {
        RouteMatch {
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            exact,
            path: path.into(),
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = Router::new(&[
            route(&[], false, "/api", &[]),
            route(&[], false, "/api/orders", &["GET", "POST"]),
            route(&[], true, "/api/orders/special", &[]),
            route(&[], false, "/static/", &[]),
        ]);
        let get = Method::GET;
        assert_eq!(r.lookup("h", "/api/orders", &get), Lookup::Found(1, vec![]));
        assert_eq!(
            r.lookup("h", "/api/orders/", &get),
            Lookup::Found(1, vec![])
        );
        assert_eq!(
            r.lookup("h", "/api/orders/7", &get),
            Lookup::Found(1, vec![])
        );
        assert_eq!(
            r.lookup("h", "/api/ordersx", &get),
            Lookup::Found(0, vec![])
        );
        assert_eq!(
            r.lookup("h", "/api/orders/special", &get),
            Lookup::Found(2, vec![])
        );
        assert_eq!(
            r.lookup("h", "/api/orders/special/x", &get),
            Lookup::Found(1, vec![])
        );
        assert_eq!(r.lookup("h", "/apix", &get), Lookup::NotFound);
        assert_eq!(
            r.lookup("h", "/static/a.css", &get),
            Lookup::Found(3, vec![])
        );
        assert_eq!(r.lookup("h", "/static", &get), Lookup::Found(3, vec![]));
        assert_eq!(r.lookup("h", "/", &get), Lookup::NotFound);
        assert_eq!(
            r.lookup("h", "/api/orders/7", &Method::DELETE),
            Lookup::MethodNotAllowed("GET, HEAD, POST".into())
        );
        assert_eq!(
            r.lookup("h", "/api/orders/7", &Method::HEAD),
            Lookup::Found(1, vec![])
        );
    }

    #[test]
    fn methods_split_routes_on_the_same_path() {
        let r = Router::new(&[
            route(&[], false, "/x", &["GET"]),
            route(&[], false, "/x", &["POST"]),
        ]);
        assert_eq!(r.lookup("h", "/x", &Method::POST), Lookup::Found(1, vec![]));
        assert_eq!(
            r.lookup("h", "/x", &Method::PUT),
            Lookup::MethodNotAllowed("GET, HEAD, POST".into())
        );
    }

    #[test]
    fn hosts_exact_then_longest_wildcard_then_any() {
        let r = Router::new(&[
            route(&[], false, "/", &[]),
            route(&["*.example.com"], false, "/", &[]),
            route(&["*.eu.example.com"], false, "/", &[]),
            route(&["api.example.com"], false, "/v1", &[]),
        ]);
        let g = Method::GET;
        assert_eq!(
            r.lookup("api.example.com", "/v1/x", &g),
            Lookup::Found(3, vec![])
        );
        // exact host has no matching path: falls back to the wildcard
        assert_eq!(
            r.lookup("api.example.com", "/v2", &g),
            Lookup::Found(1, vec![])
        );
        assert_eq!(
            r.lookup("a.eu.example.com", "/", &g),
            Lookup::Found(2, vec![])
        );
        assert_eq!(r.lookup("example.com", "/", &g), Lookup::Found(0, vec![]));
        assert_eq!(r.lookup("other.test", "/", &g), Lookup::Found(0, vec![]));
    }

    #[test]
    fn templates_capture_segments() {
        let r = Router::new(&[
            route(&[], true, "/api/web/users/{id}/summary", &[]),
            route(&[], true, "/api/web/users/me/summary", &[]),
            route(&[], false, "/api", &[]),
        ]);
        let g = Method::GET;
        assert_eq!(
            r.lookup("h", "/api/web/users/a%20b/summary", &g),
            Lookup::Found(0, vec![(Arc::from("id"), "a b".to_string())])
        );
        assert_eq!(
            r.lookup("h", "/api/web/users/me/summary", &g),
            Lookup::Found(1, vec![])
        );
        assert_eq!(
            r.lookup("h", "/api/web/users/7/summary/x", &g),
            Lookup::Found(2, vec![])
        );
        assert_eq!(
            r.lookup("h", "/api/web/users/7/summary/", &g),
            Lookup::Found(2, vec![])
        );
        assert!(check_template("/a/{id}/{id}").is_err());
        assert!(check_template("/a/x{id}").is_err());
        assert!(check_template("/a/{}").is_err());
        assert!(check_template("/a/{id}/b/{x_2}").is_ok());
    }

    #[test]
    fn host_parsing() {
        assert_eq!(request_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(request_host("example.com."), "example.com");
        assert_eq!(request_host("[::1]:8080"), "[::1]");
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("a b").is_err());
        assert!(HostPattern::parse("*.ok.test").is_ok());
    }

    #[test]
    fn rewrites() {
        assert_eq!(
            rewrite("/api/orders/7", "/api/orders", "/orders"),
            "/orders/7"
        );
        assert_eq!(rewrite("/api/orders", "/api/orders", "/orders"), "/orders");
        assert_eq!(
            rewrite("/api/orders/", "/api/orders", "/orders"),
            "/orders/"
        );
        assert_eq!(rewrite("/api/x", "/api", "/"), "/x");
        assert_eq!(rewrite("/api", "/api", "/"), "/");
        assert_eq!(rewrite("/x/y", "/", "/v2"), "/v2/x/y");
        assert_eq!(rewrite("/", "/", "/v2"), "/v2/");
    }
}
