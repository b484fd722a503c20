//! The session's cookies: sealed with the `cookie` crate's private jar (AES-256-GCM, the
//! cookie's name bound as associated data, so a value cannot be moved to another cookie),
//! under keys derived from the configured ones; the first key seals, every key opens.

use base64::Engine;
use cookie::{Cookie, CookieJar, Key, SameSite};
use http::HeaderMap;

/// Bytes of one configured key.
pub const KEY_BYTES: usize = 32;

pub struct CookieKeys {
    keys: Vec<Key>,
}

impl CookieKeys {
    /// Comma-separated base64 keys of [`KEY_BYTES`] bytes each.
    pub fn parse(text: &str) -> Result<CookieKeys, String> {
        let mut keys = Vec::new();
        for (i, part) in text.split(',').map(str::trim).enumerate() {
            if part.is_empty() {
                continue;
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(part)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part))
                .map_err(|_| format!("key {} is not base64", i + 1))?;
            if bytes.len() != KEY_BYTES {
                return Err(format!(
                    "key {} has {} bytes; each key must have {KEY_BYTES} (e.g. `openssl rand -base64 32`)",
                    i + 1,
                    bytes.len()
                ));
            }
            // HKDF from the 32 configured bytes to the jar's signing and encryption keys.
            keys.push(Key::derive_from(&bytes));
        }
        if keys.is_empty() {
            return Err("no key: set at least one base64 key of 32 bytes".into());
        }
        Ok(CookieKeys { keys })
    }

    /// The sealed value of cookie `name` holding `plain`.
    pub fn seal(&self, name: &str, plain: &str) -> Option<String> {
        let mut jar = CookieJar::new();
        jar.private_mut(self.keys.first()?)
            .add(Cookie::new(name.to_string(), plain.to_string()));
        jar.get(name).map(|c| c.value().to_string())
    }

    /// The plain value of a sealed cookie value, when one of the keys opens it.
    pub fn open(&self, name: &str, sealed: &str) -> Option<String> {
        self.keys.iter().find_map(|key| {
            let mut jar = CookieJar::new();
            jar.add_original(Cookie::new(name.to_string(), sealed.to_string()));
            jar.private(key).get(name).map(|c| c.value().to_string())
        })
    }
}

/// How the session's cookies are set.
#[derive(Debug, Clone)]
pub struct CookieStyle {
    pub secure: bool,
    pub same_site: SameSite,
}

impl CookieStyle {
    /// A `Set-Cookie` value: HttpOnly, Path=/, no Domain (what a `__Host-` name requires),
    /// `max_age` seconds (0 deletes it).
    pub fn set_cookie(
        &self,
        name: &str,
        value: &str,
        max_age: u64,
        same_site: Option<SameSite>,
    ) -> String {
        let mut c = Cookie::new(name.to_string(), value.to_string());
        c.set_http_only(true);
        c.set_secure(self.secure);
        c.set_path("/");
        c.set_same_site(same_site.unwrap_or(self.same_site));
        c.set_max_age(cookie::time::Duration::seconds(
            i64::try_from(max_age).unwrap_or(i64::MAX),
        ));
        c.to_string()
    }
}

/// Every `(name, value)` pair of a request's `Cookie` headers (RFC 6265 section 5.4 syntax),
/// in order, trimmed.
pub fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

/// The value of cookie `name` in a request's `Cookie` headers (the first one).
pub fn request_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    cookie_pairs(headers).find_map(|(k, v)| (k == name).then_some(v))
}

/// The value of cookie `name` when the request carries exactly one cookie of that name (a
/// second one may have been planted by a sibling domain: then neither counts).
pub fn unique_request_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = cookie_pairs(headers).filter_map(|(k, v)| (k == name).then_some(v));
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Removes the cookies in `names` from a request's `Cookie` header (the header goes when
/// nothing is left); does nothing to a request without cookies.
pub fn strip_cookies<S: AsRef<str>>(
    req: &mut pingora::http::RequestHeader,
    names: &[S],
) -> pingora::Result<()> {
    if !req.headers.contains_key(http::header::COOKIE) {
        return Ok(());
    }
    match without_cookies(&req.headers, names) {
        Some(rest) => {
            req.insert_header(http::header::COOKIE, rest)?;
        }
        None => {
            req.remove_header(&http::header::COOKIE);
        }
    }
    Ok(())
}

/// The `Cookie` header without the cookies in `names`; `None` when nothing is left.
pub fn without_cookies<S: AsRef<str>>(headers: &HeaderMap, names: &[S]) -> Option<String> {
    let kept: Vec<&str> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(k, _)| k).trim();
            !pair.is_empty() && !names.iter().any(|n| n.as_ref() == name)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; KEY_BYTES])
    }

    #[test]
    fn sealed_values_open_with_any_configured_key_and_only_under_their_name() {
        let old = CookieKeys::parse(&key(1)).unwrap();
        let sealed = old.seal("sid", "session-123").unwrap();
        assert!(!sealed.contains("session-123"));
        assert_eq!(old.open("sid", &sealed).as_deref(), Some("session-123"));
        assert_eq!(old.open("other", &sealed), None, "bound to its cookie name");
        // Rotation: a new first key seals, the old one still opens.
        let rotated = CookieKeys::parse(&format!("{}, {}", key(2), key(1))).unwrap();
        assert_eq!(rotated.open("sid", &sealed).as_deref(), Some("session-123"));
        let fresh = rotated.seal("sid", "s2").unwrap();
        assert_eq!(old.open("sid", &fresh), None);
        // Tampering fails cleanly.
        let mut bytes = sealed.into_bytes();
        bytes[5] ^= 1;
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(old.open("sid", &tampered), None);
        assert_eq!(old.open("sid", "not even base64!"), None);
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(CookieKeys::parse("").is_err());
        assert!(CookieKeys::parse("!!!").is_err());
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
        assert!(CookieKeys::parse(&short).err().unwrap().contains("16 bytes"));
    }

    #[test]
    fn request_cookies_are_found_and_removed_by_name() {
        let mut h = HeaderMap::new();
        h.append(http::header::COOKIE, "a=1; sid=xyz".parse().unwrap());
        h.append(http::header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(request_cookie(&h, "sid"), Some("xyz"));
        assert_eq!(request_cookie(&h, "b"), Some("2"));
        assert_eq!(request_cookie(&h, "c"), None);
        assert_eq!(unique_request_cookie(&h, "sid"), Some("xyz"));
        let mut twice = HeaderMap::new();
        twice.insert(http::header::COOKIE, "sid=a; sid=b".parse().unwrap());
        assert_eq!(unique_request_cookie(&twice, "sid"), None, "a planted twin voids both");
        assert_eq!(without_cookies(&h, &["sid"]).as_deref(), Some("a=1; b=2"));
        let mut only = HeaderMap::new();
        only.insert(http::header::COOKIE, "sid=xyz".parse().unwrap());
        assert_eq!(without_cookies(&only, &["sid"]), None);
    }
}
