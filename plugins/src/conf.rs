//! Config value types written as humans write them: durations (`"300ms"`, `"5s"`, `"1m"`),
//! sizes (`"1MiB"`, `"512KiB"`, `"10MB"`, `"1024"`), and [`Parsed`] strings (header names,
//! methods, addresses, CIDRs, request keys) that become typed values while the file is read.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, Method};
use serde::{Deserialize, Deserializer};

use crate::BuildError;

/// A string of the config file read into a `T` once, while the file is deserialised.
///
/// serde stops a whole file at its first error, yet `--check` must report every bad value
/// with its path. So a string that does not parse is kept with its error instead of failing
/// the file: validation reports it at its path, and every later step takes the typed value
/// ([`Parsed::value`]) and never parses the text again.
#[derive(Clone)]
pub struct Parsed<T> {
    text: String,
    value: Result<T, String>,
}

/// A type that a config string is parsed into; the error says what was expected.
pub trait ConfigStr: Sized {
    fn parse_config(s: &str) -> Result<Self, String>;
}

impl<T: ConfigStr> Parsed<T> {
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let value = T::parse_config(&text);
        Parsed { text, value }
    }
}

impl<T> Parsed<T> {
    /// The string as written in the file.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The typed value, or why the string is not one.
    pub fn value(&self) -> Result<&T, &str> {
        self.value.as_ref().map_err(String::as_str)
    }

    pub fn get(&self) -> Option<&T> {
        self.value.as_ref().ok()
    }

    pub fn error(&self) -> Option<&str> {
        self.value.as_ref().err().map(String::as_str)
    }
}

/// Two values are the same config when they are written the same.
impl<T> PartialEq for Parsed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl<T> Eq for Parsed<T> {}

impl<T> fmt::Debug for Parsed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

impl<'de, T: ConfigStr> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Parsed::new)
    }
}

impl<T: ConfigStr> From<&str> for Parsed<T> {
    fn from(s: &str) -> Self {
        Parsed::new(s)
    }
}

/// The error of a value that did not parse, at `path`.
pub fn parse_error<T>(path: impl Into<String>, p: &Parsed<T>) -> Option<BuildError> {
    p.error().map(|m| BuildError::new(path, m))
}

/// The errors of a list's values that did not parse, at `key[i]`.
pub fn parse_errors<T>(key: &str, list: &[Parsed<T>]) -> Vec<BuildError> {
    list.iter()
        .enumerate()
        .filter_map(|(i, p)| parse_error(format!("{key}[{i}]"), p))
        .collect()
}

/// Every value of a list, or the errors of those that did not parse (never a shorter list).
pub fn values<T: Clone>(key: &str, list: &[Parsed<T>]) -> Result<Vec<T>, Vec<BuildError>> {
    let errors = parse_errors(key, list);
    if errors.is_empty() {
        Ok(list.iter().filter_map(|p| p.get().cloned()).collect())
    } else {
        Err(errors)
    }
}

/// The value, or its error at `path`.
pub fn value<T: Clone>(path: &str, p: &Parsed<T>) -> Result<T, Vec<BuildError>> {
    p.value()
        .cloned()
        .map_err(|m| vec![BuildError::new(path, m)])
}

/// A header name, case-insensitive (`X-Api-Key` and `x-api-key` are one name).
impl ConfigStr for HeaderName {
    fn parse_config(s: &str) -> Result<Self, String> {
        HeaderName::from_bytes(s.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{s:?} is not a header name"))
    }
}

/// An HTTP method, case-insensitive (`get` is `GET`).
impl ConfigStr for Method {
    fn parse_config(s: &str) -> Result<Self, String> {
        let upper = s.trim().to_ascii_uppercase();
        if upper.is_empty() {
            return Err("an HTTP method cannot be empty".into());
        }
        Method::from_bytes(upper.as_bytes()).map_err(|_| format!("{s:?} is not an HTTP method"))
    }
}

/// A JWT signing algorithm that verifies a signature (`none` is no such algorithm).
impl ConfigStr for jsonwebtoken::Algorithm {
    fn parse_config(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|_| {
            format!("{s:?} is not supported; use RS256/384/512, PS256/384/512, ES256/384, EdDSA or HS256/384/512 (never none)")
        })
    }
}

/// `"ip:port"`, e.g. `"127.0.0.1:8080"` or `"[::]:8080"`.
impl ConfigStr for SocketAddr {
    fn parse_config(s: &str) -> Result<Self, String> {
        s.trim().parse().map_err(|_| {
            format!("{s:?} is not an ip:port address, e.g. \"127.0.0.1:8080\" or \"[::]:8080\"")
        })
    }
}

/// A CIDR (`"10.0.0.0/8"`) or a bare address (a /32 or /128).
impl ConfigStr for ipnet::IpNet {
    fn parse_config(s: &str) -> Result<Self, String> {
        let t = s.trim();
        t.parse::<ipnet::IpNet>()
            .ok()
            .or_else(|| t.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
            .ok_or_else(|| format!("{s:?} is not a CIDR (\"10.0.0.0/8\") or an IP address"))
    }
}

/// A duration read from a string such as `"300ms"`, `"2s"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write e.g. \"300ms\", \"5s\", \"1m\""
                ))
            })
    }
}

/// A byte size read from a string such as `"1MiB"`, `"512KiB"`, `"10MB"`, `"4096"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}; write e.g. \"1MiB\", \"512KiB\", \"4096\"")
        })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}; use B, KB, MB, GB, KiB, MiB or GiB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("1MiB").unwrap().get(), 1 << 20);
        assert_eq!(ByteSize::parse("512KiB").unwrap().get(), 512 << 10);
        assert_eq!(ByteSize::parse("10MB").unwrap().get(), 10_000_000);
        assert_eq!(ByteSize::parse("4096").unwrap().get(), 4096);
        assert!(ByteSize::parse("1 parsec").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
    }

    #[test]
    fn parsed_values_keep_their_error_and_never_shorten_a_list() {
        #[derive(Deserialize)]
        struct T {
            names: Vec<Parsed<HeaderName>>,
            method: Parsed<Method>,
        }
        let t: T = toml::from_str("names = [\"X-Ok\", \"bad name\"]\nmethod = \"get\"").unwrap();
        assert_eq!(t.names[0].get().map(HeaderName::as_str), Some("x-ok"));
        assert_eq!(t.names[1].text(), "bad name");
        assert!(t.names[1]
            .error()
            .is_some_and(|m| m.contains("not a header name")));
        assert_eq!(t.method.get(), Some(&Method::GET));
        let errors = values("names", &t.names).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "names[1]");
        assert_eq!(values("names", &t.names[..1]).unwrap().len(), 1);
    }

    #[test]
    fn addresses_and_networks() {
        assert!(SocketAddr::parse_config("127.0.0.1:80").is_ok());
        assert!(SocketAddr::parse_config("localhost").is_err());
        let net = ipnet::IpNet::parse_config("10.1.2.3").unwrap();
        assert_eq!(net.prefix_len(), 32);
        assert!(ipnet::IpNet::parse_config("10.0.0.0/33").is_err());
        assert!(Method::parse_config(" ").is_err());
        assert!(jsonwebtoken::Algorithm::parse_config("none").is_err());
    }

    #[test]
    fn durations() {
        #[derive(Deserialize)]
        struct T {
            d: HumanDuration,
        }
        let t: T = toml::from_str("d = \"300ms\"").unwrap();
        assert_eq!(t.d.get(), Duration::from_millis(300));
        assert!(toml::from_str::<T>("d = \"soon\"").is_err());
    }
}
