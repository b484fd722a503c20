//! The `cache` plugin's RFC 9111 rules on whatever headers an origin and a client send:
//! storability and freshness, request directives, `Vary`, and the 304 header refresh.
//! Invariants:
//! - nothing panics, whatever the header values (invalid dates, huge or negative numbers,
//!   repeated fields);
//! - a storable response is never `no-store`, unqualified `private`, `Vary: *`, 206, 304 or
//!   1xx, and its freshness lifetime is at most `max_ttl`;
//! - with `shared_when_authenticated`, a credentialed request's response is storable only when
//!   it is explicitly shareable;
//! - a 304 refresh keeps the stored status and the stored body's `Content-Length`.
#![no_main]

use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pingora::cache::cache_control::CacheControl;
use pingora::http::ResponseHeader;
use sallyport_plugins::cache::policy::{
    explicitly_shareable, on_hit, refresh_header, storable, vary_names, RequestDirectives, Rules,
};

const NAMES: [&str; 10] = [
    "cache-control",
    "expires",
    "date",
    "age",
    "last-modified",
    "etag",
    "vary",
    "set-cookie",
    "pragma",
    "content-length",
];

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    response: Vec<(u8, Vec<u8>)>,
    request: Vec<(u8, Vec<u8>)>,
    not_modified: Vec<(u8, Vec<u8>)>,
    credentialed: bool,
    heuristic: bool,
    shared_when_authenticated: bool,
    default_ttl: u32,
    max_ttl: u32,
    swr: u32,
    sie: u32,
    request_delay: u16,
}

fn header(status: u16, fields: &[(u8, Vec<u8>)]) -> Option<ResponseHeader> {
    let mut h = ResponseHeader::build(status, None).ok()?;
    for (n, v) in fields {
        let name = NAMES[*n as usize % NAMES.len()];
        let Ok(value) = http::HeaderValue::from_bytes(v) else {
            continue;
        };
        let _ = h.append_header(name, value);
    }
    Some(h)
}

fuzz_target!(|input: Input| {
    let status = 100 + input.status % 500;
    let Some(resp) = header(status, &input.response) else {
        return;
    };
    let mut request = http::HeaderMap::new();
    for (n, v) in &input.request {
        if let Ok(value) = http::HeaderValue::from_bytes(v) {
            request.append(NAMES[*n as usize % NAMES.len()], value);
        }
    }
    let directives = RequestDirectives::parse(&request);
    let max_ttl = Duration::from_secs(u64::from(input.max_ttl.max(1)));
    let rules = Rules {
        heuristic: input.heuristic,
        default_ttl: Duration::from_secs(u64::from(input.default_ttl)).min(max_ttl),
        max_ttl,
        stale_while_revalidate: Duration::from_secs(u64::from(input.swr)),
        stale_if_error: Duration::from_secs(u64::from(input.sie)),
        shared_when_authenticated: input.shared_when_authenticated,
    };
    let now = SystemTime::now();
    let sent = now - Duration::from_millis(u64::from(input.request_delay));
    let names = vary_names(&resp.headers);
    assert!(names.iter().all(|n| n != "*" && !n.is_empty()));

    if let Ok(stored) = storable(&resp, &directives, input.credentialed, &rules, sent, now) {
        assert!(!directives.no_store);
        let code = resp.status.as_u16();
        assert!(code >= 200 && code != 206 && code != 304, "{code}");
        let cc = CacheControl::from_resp_headers(&resp);
        if let Some(cc) = &cc {
            assert!(!cc.no_store() && !cc.private());
        }
        if input.credentialed && input.shared_when_authenticated {
            assert!(explicitly_shareable(cc.as_ref()));
        }
        if let Ok(lifetime) = stored.fresh_until.duration_since(stored.epoch) {
            assert!(lifetime <= max_ttl, "{lifetime:?} > {max_ttl:?}");
        }
        let kept_length = stored.header.headers.get("content-length").cloned();
        let meta = stored.into_meta(now);
        let _ = on_hit(&meta, &directives, now);
        if let Some(nm) = header(304, &input.not_modified) {
            let refreshed = refresh_header(meta.response_header(), &nm);
            assert_eq!(refreshed.status, resp.status);
            let lengths: Vec<_> = refreshed.headers.get_all("content-length").iter().collect();
            match &kept_length {
                Some(len) => assert_eq!(lengths.first(), Some(&len)),
                None => assert!(lengths.is_empty()),
            }
        }
    }
});
