//! Route lookup (`sallyport::router::Router`) over a generated route table, against a plain
//! model of the documented rules: host (exact, then the longest `*.suffix`, then routes
//! without a host; the first level with a path match decides), then an exact path over the
//! longest prefix on a segment boundary, then the method among the routes of that path (first
//! in config order; `GET` allows `HEAD`; none: 405). Paths and hosts go through the same
//! parsers the config uses, and the request path through `normalize`, as in the gateway.
#![no_main]

use arbitrary::Arbitrary;
use http::Method;
use libfuzzer_sys::fuzz_target;
use sallyport::config::ConfigStr;
use sallyport::path::{normalize, EscapedSlashes};
use sallyport::router::{HostPattern, Lookup, RouteMatch, RoutePath, Router};

const SEGMENTS: [&str; 5] = ["a", "b", "ab", "", "."];
const HOSTS: [&str; 5] = ["x.test", "*.test", "y.x.test", "*.x.test", "X.Test"];
const METHODS: [Method; 4] = [Method::GET, Method::POST, Method::HEAD, Method::DELETE];

#[derive(Arbitrary, Debug)]
struct Route {
    segments: Vec<u8>,
    trailing_slash: bool,
    exact: bool,
    hosts: Vec<u8>,
    methods: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    routes: Vec<Route>,
    host: u8,
    path: Vec<u8>,
    trailing_slash: bool,
    method: u8,
}

fn path_of(segments: &[u8], trailing: bool) -> String {
    let mut p: String = segments
        .iter()
        .take(4)
        .map(|s| format!("/{}", SEGMENTS[*s as usize % SEGMENTS.len()]))
        .collect();
    if p.is_empty() || trailing {
        p.push('/');
    }
    p
}

/// Whether a route's path matches the request path, and how specifically (`None`: no).
fn specificity(r: &RouteMatch, path: &str) -> Option<(bool, usize)> {
    if r.exact {
        return (r.path == path).then_some((true, usize::MAX));
    }
    let prefix = if r.path == "/" {
        "/"
    } else {
        r.path.trim_end_matches('/')
    };
    let matches = prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'));
    matches.then_some((false, prefix.len()))
}

fn model(routes: &[RouteMatch], host: &str, path: &str, method: &Method) -> Lookup {
    // The host levels that have a route matching the path, most specific first.
    let mut levels: Vec<usize> = routes
        .iter()
        .filter(|r| specificity(r, path).is_some())
        .flat_map(|r| {
            if r.hosts.is_empty() {
                vec![0]
            } else {
                r.hosts
                    .iter()
                    .filter_map(|h| match h {
                        HostPattern::Exact(e) => (e == host).then_some(usize::MAX),
                        HostPattern::Suffix(s) => {
                            (host.len() > s.len() && host.ends_with(s.as_str())).then_some(s.len())
                        }
                    })
                    .collect()
            }
        })
        .collect();
    levels.sort_unstable();
    let Some(&level) = levels.last() else {
        return Lookup::NotFound;
    };
    let at_level = |r: &RouteMatch| {
        if level == 0 {
            r.hosts.is_empty()
        } else {
            r.hosts.iter().any(|h| match h {
                HostPattern::Exact(e) => level == usize::MAX && e == host,
                HostPattern::Suffix(s) => s.len() == level && host.ends_with(s.as_str()),
            })
        }
    };
    let best = routes
        .iter()
        .filter(|r| at_level(r))
        .filter_map(|r| specificity(r, path))
        .max();
    let candidates: Vec<usize> = (0..routes.len())
        .filter(|&i| at_level(&routes[i]) && specificity(&routes[i], path) == best)
        .collect();
    for &i in &candidates {
        let m = &routes[i].methods;
        if m.is_empty()
            || m.contains(method)
            || (method == Method::HEAD && m.contains(&Method::GET))
        {
            return Lookup::Found(i, Vec::new());
        }
    }
    let mut allow: Vec<&str> = Vec::new();
    for &i in &candidates {
        for m in &routes[i].methods {
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

fuzz_target!(|input: Input| {
    let mut routes = Vec::new();
    for r in input.routes.iter().take(12) {
        let Ok(path) = RoutePath::parse_config(&path_of(&r.segments, r.trailing_slash)) else {
            continue;
        };
        let mut hosts: Vec<HostPattern> = Vec::new();
        for h in r.hosts.iter().take(2) {
            if let Ok(p) = HostPattern::parse_config(HOSTS[*h as usize % HOSTS.len()]) {
                if !hosts.contains(&p) {
                    hosts.push(p);
                }
            }
        }
        let mut methods: Vec<Method> = Vec::new();
        for m in r.methods.iter().take(3) {
            let m = METHODS[*m as usize % METHODS.len()].clone();
            if !methods.contains(&m) {
                methods.push(m);
            }
        }
        routes.push(RouteMatch {
            hosts,
            exact: r.exact,
            path: path.0,
            methods,
        });
    }
    let router = Router::new(&routes);
    let host = HOSTS[input.host as usize % HOSTS.len()].to_ascii_lowercase();
    let raw = path_of(&input.path, input.trailing_slash);
    let Ok(path) = normalize(&raw, EscapedSlashes::Decode) else {
        return;
    };
    let method = METHODS[input.method as usize % METHODS.len()].clone();
    let got = router.lookup(&host, &path, &method);
    let want = model(&routes, &host, &path, &method);
    assert_eq!(got, want, "{host} {path} {method} over {routes:#?}");
});
