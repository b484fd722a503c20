//! W3C Trace Context parsing (`traceparent`, `tracestate`), as the `trace` plugin reads the
//! client's headers. Invariants:
//! - a parsed `traceparent` written out again parses to the same fields, and for version
//!   `00` with only defined flags it is the input byte for byte;
//! - a `tracestate` is either kept whole or dropped (never partly): the kept list is valid
//!   again as it is, has at most 32 members, no key twice, and its members appear in the
//!   input in the same order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport_plugins::trace::{parse_traceparent, valid_tracestate, MAX_TRACESTATE_MEMBERS};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fuzz_target!(|input: (&[u8], Vec<&[u8]>)| {
    let (traceparent, tracestate_lines) = input;
    if let Some(p) = parse_traceparent(traceparent) {
        let written = format!(
            "{:02x}-{}-{}-{:02x}",
            p.version,
            hex(&p.trace_id),
            hex(&p.parent_id),
            p.flags
        );
        assert_eq!(parse_traceparent(written.as_bytes()), Some(p));
        if p.version == 0 && traceparent[53..55] == written.as_bytes()[53..55] {
            assert_eq!(written.as_bytes(), traceparent);
        }
        assert_ne!(p.trace_id, [0; 16]);
        assert_ne!(p.parent_id, [0; 8]);
    }
    if let Some(kept) = valid_tracestate(tracestate_lines.iter().copied()) {
        assert!(!kept.is_empty());
        assert_eq!(
            valid_tracestate([kept.as_bytes()]).as_deref(),
            Some(kept.as_str())
        );
        let members: Vec<&str> = kept.split(',').collect();
        assert!(members.len() <= MAX_TRACESTATE_MEMBERS);
        let mut keys: Vec<&str> = members
            .iter()
            .map(|m| m.split_once('=').map_or(*m, |(k, _)| k))
            .collect();
        keys.sort_unstable();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n, "a key twice in {kept:?}");
        let input = tracestate_lines
            .iter()
            .map(|l| String::from_utf8_lossy(l))
            .collect::<Vec<_>>()
            .join(",");
        let mut rest = input.as_str();
        for m in members {
            let at = rest
                .find(m)
                .unwrap_or_else(|| panic!("{m:?} not in {input:?}"));
            rest = &rest[at + m.len()..];
        }
    }
});
