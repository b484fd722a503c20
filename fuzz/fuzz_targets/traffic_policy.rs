//! The traffic policy plugins' parsers on arbitrary input: CORS origin patterns and their
//! matching, `Cookie` lookup (`traffic_split`), JSON field paths and the transform
//! (`json_transform`). Invariants:
//! - nothing panics;
//! - an exact origin pattern matches the origin it was written as, in any letter case;
//! - a `*.suffix` pattern never matches the bare suffix domain or a host that does not end with
//!   `.suffix` (`evil-example.com` is not under `example.com`);
//! - a cookie found by name is one of the values the header carried for that name;
//! - after the transform, no removed top-level key is left, and a transformed document is
//!   still valid JSON.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use sallyport_plugins::conf::ConfigStr;
use sallyport_plugins::cors::OriginPattern;
use sallyport_plugins::json_transform::{parse_path, JsonTransformConfig, Step};
use sallyport_plugins::traffic_split::cookie;

#[derive(Arbitrary, Debug)]
struct Input {
    pattern: String,
    origin: String,
    cookie_header: Vec<u8>,
    cookie_name: String,
    paths: Vec<String>,
    doc: String,
}

fuzz_target!(|input: Input| {
    if let Ok(p) = OriginPattern::parse_config(&input.pattern) {
        let _ = p.matches(&input.origin);
        match &p {
            OriginPattern::Exact(o) => {
                assert!(p.matches(&input.pattern.to_ascii_uppercase()), "{o}");
            }
            OriginPattern::Subdomains { scheme, suffix, port } => {
                let bare = format!("{scheme}://{}{port}", &suffix[1..]);
                assert!(!p.matches(&bare), "{bare}");
                if p.matches(&input.origin) {
                    let host = input.origin.to_ascii_lowercase();
                    let host = host.strip_suffix(port.as_str()).unwrap_or(&host);
                    assert!(host.ends_with(suffix.as_str()), "{} vs {suffix}", input.origin);
                }
            }
            OriginPattern::Any => {}
        }
    }

    if let Ok(mut req) = RequestHeader::build("GET", b"/", None) {
        if let Ok(v) = http::HeaderValue::from_bytes(&input.cookie_header) {
            let _ = req.append_header("cookie", v);
            if let Some(found) = cookie(&req, &input.cookie_name) {
                let text = String::from_utf8_lossy(&input.cookie_header);
                assert!(text.contains(found), "{found:?} not in {text:?}");
            }
        }
    }

    let parsed: Vec<_> = input.paths.iter().map(|p| parse_path(p)).collect();
    if parsed.iter().all(Result::is_ok) && !input.paths.is_empty() {
        let config = JsonTransformConfig {
            remove: input.paths.clone(),
            rename: Default::default(),
            max_body: sallyport_plugins::conf::ByteSize(1 << 20),
        };
        let Some(transform) = config.transform() else {
            return;
        };
        if let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(&input.doc) {
            transform.apply(&mut doc);
            let out = serde_json::to_string(&doc).unwrap_or_default();
            assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
            for steps in parsed.into_iter().flatten() {
                if let [Step::Key(k)] = steps.as_slice() {
                    assert!(doc.get(k).is_none(), "{k} survived");
                }
            }
        }
    }
});
