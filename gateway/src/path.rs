//! Request path normalisation, done before routing so that a path can only match a route it
//! looks like: `/api/public/../admin` is `/admin`, `/api//orders` is `/api/orders`,
//! `/%61pi` is `/api`, and `/a/../../x` (escaping the root) is rejected.
//!
//! Steps: percent-decode unreserved characters (`A-Z a-z 0-9 - . _ ~`) and, per
//! `server.escaped_slashes`, `%2F`; upper-case the hex of every other escape; escape raw bytes
//! outside ASCII; collapse repeated slashes; resolve `.` and `..` segments. A trailing slash
//! is kept.

use std::borrow::Cow;

/// `server.escaped_slashes`: what `%2F` in a request path means.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Treat as `/`, then normalise.
    #[default]
    Decode,
    /// Answer 400.
    Reject,
    /// Leave encoded, part of its segment.
    Keep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (`/...`).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%00` or a control character.
    ControlCharacter,
    /// `%2F` while `escaped_slashes = "reject"`.
    EncodedSlash,
    /// `..` above the root.
    EscapesRoot,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the request path must start with /",
            PathError::BadEscape => "the request path has a malformed percent-escape",
            PathError::ControlCharacter => "the request path contains a control character",
            PathError::EncodedSlash => "the request path contains an encoded slash (%2F)",
            PathError::EscapesRoot => "the request path climbs above the root with ..",
        }
    }
}

/// Normalises a request path (without its query).
pub fn normalize(path: &str, slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(bytes, slashes)?;
    Ok(Cow::Owned(resolve(&decoded)?))
}

/// Fast check for the common case: no escapes, no empty or dot segments.
fn is_normal(bytes: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'%' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // "/." followed by end, "/" or "." is a dot segment.
                match bytes.get(i + 1) {
                    None | Some(b'/') | Some(b'.') => return false,
                    _ => {}
                }
            }
            0..=0x1f | 0x7f | 0x80.. => return false,
            _ => {}
        }
        prev = b;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode(bytes: &[u8], slashes: EscapedSlashes) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x20 || b == 0x7f {
            return Err(PathError::ControlCharacter);
        }
        if b >= 0x80 {
            // A raw byte outside ASCII is the same path as its escape (RFC 3986 2.1):
            // written as one, so `/café` and `/caf%C3%A9` are one path.
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
            i += 1;
            continue;
        }
        if b != b'%' {
            out.push(b as char);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = h << 4 | l;
        i += 3;
        match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(c as char)
            }
            b'/' => match slashes {
                EscapedSlashes::Decode => out.push('/'),
                EscapedSlashes::Reject => return Err(PathError::EncodedSlash),
                EscapedSlashes::Keep => out.push_str("%2F"),
            },
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ => {
                out.push('%');
                out.push(HEX[(c >> 4) as usize] as char);
                out.push(HEX[(c & 0xf) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// Collapses empty segments and resolves dot segments of a decoded path starting with `/`.
fn resolve(path: &str) -> Result<String, PathError> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path.split('/').skip(1) {
        match seg {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
                trailing_slash = true;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, EscapedSlashes::Decode).map(|c| c.into_owned())
    }

    #[test]
    fn cases() {
        let ok = [
            ("/", "/"),
            ("/api/orders", "/api/orders"),
            ("/api/orders/", "/api/orders/"),
            ("/api//orders", "/api/orders"),
            ("//api///orders//", "/api/orders/"),
            ("/api/./orders", "/api/orders"),
            ("/api/public/../admin", "/api/admin"),
            ("/api/public/../../admin", "/admin"),
            ("/api/public/%2e%2e/admin", "/api/admin"),
            ("/api/public/%2E%2E%2Fadmin", "/api/admin"),
            ("/api/public/..%2fadmin", "/api/admin"),
            ("/%61pi/orders", "/api/orders"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a/..b/c", "/a/..b/c"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            // Raw bytes outside ASCII are escaped (found by fuzz/path_normalize: each byte
            // used to become a Latin-1 character, and normalising twice changed the path).
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/a/%a0//.\u{3dc}//d", "/a/%A0/.%CF%9C/d"),
            ("/a%20b", "/a%20b"),
        ];
        for (input, want) in ok {
            assert_eq!(n(input).as_deref(), Ok(want), "{input}");
        }
        let bad = [
            ("/a/../../x", PathError::EscapesRoot),
            ("/..", PathError::EscapesRoot),
            ("/%2e%2e/x", PathError::EscapesRoot),
            ("/%2e%2e%2f%2e%2e", PathError::EscapesRoot),
            ("/a%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/a%00b", PathError::ControlCharacter),
            ("api", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
        ];
        for (input, want) in bad {
            assert_eq!(n(input), Err(want), "{input}");
        }
    }

    #[test]
    fn slash_policies() {
        assert_eq!(
            normalize("/a%2Fb", EscapedSlashes::Reject),
            Err(PathError::EncodedSlash)
        );
        assert_eq!(
            normalize("/a/..%2Fb", EscapedSlashes::Keep).as_deref(),
            Ok("/a/..%2Fb")
        );
    }

    #[test]
    fn borrowed_when_already_normal() {
        assert!(matches!(
            normalize("/api/orders/7", EscapedSlashes::Decode),
            Ok(Cow::Borrowed(_))
        ));
    }

    proptest! {
        #[test]
        fn output_is_normal_and_idempotent(p in "/[a-z./%2eEfF]{0,30}") {
            if let Ok(once) = n(&p) {
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                prop_assert!(!once.split('/').any(|s| s == "." || s == ".."));
                prop_assert_eq!(n(&once), Ok(once.clone()));
            }
        }

        #[test]
        fn never_panics(p in "\\PC{0,40}") {
            let _ = normalize(&p, EscapedSlashes::Decode);
        }
    }
}
