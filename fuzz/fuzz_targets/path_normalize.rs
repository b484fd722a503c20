//! Request path normalisation (`sallyport::path::normalize`), the step every request takes
//! before routing. Invariants, per mode of `server.escaped_slashes`:
//! - a result starts with `/`, has no empty, `.` or `..` segment, no control character;
//! - it is a fixed point: normalising it again gives it back unchanged;
//! - `reject` never lets `%2F` through; `decode` never leaves one;
//! - an input that is already normal comes back as it is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sallyport::path::{normalize, EscapedSlashes};

fuzz_target!(|input: (u8, &str)| {
    let (mode, path) = input;
    let mode = match mode % 3 {
        0 => EscapedSlashes::Decode,
        1 => EscapedSlashes::Reject,
        _ => EscapedSlashes::Keep,
    };
    let Ok(out) = normalize(path, mode) else {
        return;
    };
    assert!(out.starts_with('/'), "{path:?} -> {out:?}");
    let body = out.trim_start_matches('/');
    let body = body.strip_suffix('/').unwrap_or(body);
    if !body.is_empty() {
        for segment in body.split('/') {
            assert!(
                !segment.is_empty() && segment != "." && segment != "..",
                "{path:?} -> {out:?}: segment {segment:?}"
            );
        }
    }
    assert!(
        !out.bytes().any(|b| b < 0x20 || b == 0x7f),
        "{path:?} -> {out:?}"
    );
    let upper = out.to_ascii_uppercase();
    match mode {
        EscapedSlashes::Reject | EscapedSlashes::Decode => {
            assert!(!upper.contains("%2F"), "{mode:?}: {path:?} -> {out:?}")
        }
        EscapedSlashes::Keep => {}
    }
    let again = normalize(&out, mode).expect("a normal path normalises");
    assert_eq!(again, out, "not idempotent for {path:?} ({mode:?})");
});
