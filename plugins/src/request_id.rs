//! Request ids: keep a client's when it is sane, generate one otherwise.

use rand::Rng;

/// Longest client-supplied request id that is kept.
pub const MAX_LEN: usize = 128;

/// True when a client's `x-request-id` is safe to keep, log and echo: 1 to 128 characters of
/// `A-Z a-z 0-9 - _ . : + / =` (no spaces, quotes or control characters).
pub fn is_sane(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_LEN
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b))
}

/// A fresh request id: 32 lowercase hex digits (128 random bits).
pub fn generate() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    let mut out = String::with_capacity(32);
    crate::context::push_hex(&mut out, &bytes);
    out
}

/// The request id for a request: the client's when sane, otherwise a fresh one.
pub fn from_header(value: Option<&[u8]>) -> String {
    match value {
        Some(v) if is_sane(v) => String::from_utf8_lossy(v).into_owned(),
        _ => generate(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        assert_eq!(from_header(Some(b"abc-123")), "abc-123");
        for bad in [
            &b""[..],
            b"has space",
            b"quote\"",
            b"nl\n",
            &[b'a'; 129][..],
        ] {
            let id = from_header(Some(bad));
            assert_eq!(id.len(), 32, "{bad:?}");
            assert!(is_sane(id.as_bytes()));
        }
        assert_ne!(generate(), generate());
    }
}
