//! The client address behind trusted proxies, and the forwarding headers sent upstream.
//!
//! Every field line of the configured header forms one list, in order (RFC 9110 5.3): a load
//! balancer that appends its own line must not let a client-supplied first line win. The
//! list is walked right to left from the connecting peer; each hop that is a trusted proxy
//! hands the walk to the hop on its left, and the first untrusted hop is the client. An entry
//! that is not an address ends the walk at the last address seen (whatever is further left
//! could have been written by anyone).

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::config::ClientIpHeader;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// Whether `ip` is in one of the trusted networks.
pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// The client address of a request from `peer` with these headers.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    source: ClientIpHeader,
) -> IpAddr {
    // A dual-stack listener sees IPv4 peers as `::ffff:a.b.c.d`: they are the IPv4 address,
    // for trusted_proxies and for everything that uses the client address.
    let peer = peer.to_canonical();
    if trusted.is_empty() || !is_trusted(trusted, peer) {
        return peer;
    }
    let (name, hop): (&HeaderName, fn(&str) -> Option<IpAddr>) = match source {
        ClientIpHeader::XForwardedFor => (&X_FORWARDED_FOR, |s| s.trim().parse().ok()),
        ClientIpHeader::Forwarded => (&FORWARDED, forwarded_for),
    };
    let mut client = peer;
    // Lines in reverse order, and each line's entries from the right: the whole list from
    // its right end.
    for value in headers.get_all(name).iter().rev() {
        let Ok(line) = value.to_str() else {
            return client;
        };
        for entry in line.rsplit(',') {
            if entry.trim().is_empty() {
                continue;
            }
            match hop(entry) {
                Some(ip) => {
                    client = ip;
                    if !is_trusted(trusted, ip) {
                        return ip;
                    }
                }
                None => return client,
            }
        }
    }
    client
}

/// The whole list of one header's field lines, joined as one line (`None` when absent or
/// not visible ASCII).
pub fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out = String::new();
    for value in headers.get_all(name) {
        let s = value.to_str().ok()?.trim();
        if s.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(s);
    }
    (!out.is_empty()).then_some(out)
}

/// The address in the `for=` parameter of one `Forwarded` element (RFC 7239 4, 6):
/// `for=192.0.2.60`, `for="192.0.2.60:4711"`, `for="[2001:db8::17]:4711"`. `unknown`,
/// obfuscated identifiers and a missing `for` are not addresses.
pub fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let host = match value.rsplit_once(':') {
        Some((h, _port)) if !h.contains(':') => h,
        _ => value,
    };
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// One `Forwarded` element for this hop: `for=` the peer (IPv6 quoted and bracketed, as RFC
/// 7239 6 requires), `proto`, and `host` when the request named one.
pub fn forwarded_element(peer: IpAddr, proto: &str, host: Option<&str>) -> String {
    let for_ = match peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    match host {
        Some(h) if !h.is_empty() && h.bytes().all(|c| c.is_ascii_graphic() && c != b'"') => {
            format!("for={for_};proto={proto};host=\"{h}\"")
        }
        _ => format!("for={for_};proto={proto}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &str, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                l.parse().unwrap(),
            );
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    const LB: &str = "127.0.0.1";

    #[test]
    fn x_forwarded_for_lines_are_one_list() {
        let trusted = nets(&["127.0.0.1/32"]);
        let ip = |lines: &[&str]| {
            client_ip(
                LB.parse().unwrap(),
                &headers("x-forwarded-for", lines),
                &trusted,
                ClientIpHeader::XForwardedFor,
            )
            .to_string()
        };
        // A client-supplied first line and the balancer's own line: the balancer's wins.
        assert_eq!(ip(&["1.2.3.4", "5.6.7.8"]), "5.6.7.8");
        assert_eq!(ip(&["1.2.3.4, 5.6.7.8"]), "5.6.7.8");
        assert_eq!(ip(&["1.2.3.4", "5.6.7.8, 127.0.0.1"]), "5.6.7.8");
        assert_eq!(ip(&["1.2.3.4", "127.0.0.1", "127.0.0.1"]), "1.2.3.4");
        // Garbage ends the walk at the last address seen.
        assert_eq!(ip(&["1.2.3.4", "junk", "127.0.0.1"]), "127.0.0.1");
        assert_eq!(ip(&[]), "127.0.0.1");
        // An untrusted peer is the client, whatever it says.
        let direct = client_ip(
            "9.9.9.9".parse().unwrap(),
            &headers("x-forwarded-for", &["1.2.3.4"]),
            &trusted,
            ClientIpHeader::XForwardedFor,
        );
        assert_eq!(direct.to_string(), "9.9.9.9");
    }

    #[test]
    fn forwarded_is_read_when_configured_and_never_both() {
        let trusted = nets(&["127.0.0.0/8"]);
        let mut h = headers(
            "forwarded",
            &[
                "for=1.2.3.4",
                "for=\"[2001:db8::17]:4711\";proto=https, for=127.0.0.2",
            ],
        );
        h.append(X_FORWARDED_FOR, "6.6.6.6".parse().unwrap());
        let peer: IpAddr = LB.parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted, ClientIpHeader::Forwarded).to_string(),
            "2001:db8::17"
        );
        assert_eq!(
            client_ip(peer, &h, &trusted, ClientIpHeader::XForwardedFor).to_string(),
            "6.6.6.6"
        );
        let only_xff = headers("x-forwarded-for", &["6.6.6.6"]);
        assert_eq!(
            client_ip(peer, &only_xff, &trusted, ClientIpHeader::Forwarded).to_string(),
            LB,
            "X-Forwarded-For is ignored when Forwarded is the configured source"
        );
    }

    #[test]
    fn forwarded_for_values() {
        let f = |s: &str| forwarded_for(s).map(|ip| ip.to_string());
        assert_eq!(
            f("for=192.0.2.60;proto=http;by=203.0.113.43").as_deref(),
            Some("192.0.2.60")
        );
        assert_eq!(f("For=\"192.0.2.60:4711\"").as_deref(), Some("192.0.2.60"));
        assert_eq!(
            f("proto=https; for=\"[2001:db8:cafe::17]:4711\"").as_deref(),
            Some("2001:db8:cafe::17")
        );
        assert_eq!(f("for=\"[2001:db8::1]\"").as_deref(), Some("2001:db8::1"));
        assert_eq!(f("for=unknown"), None);
        assert_eq!(f("for=_hidden"), None);
        assert_eq!(f("proto=http"), None);
        assert_eq!(f("for=2001:db8::1"), None, "IPv6 must be bracketed");
        assert_eq!(f("for=\"[2001:db8::1]x\""), None);
    }

    #[test]
    fn forwarded_elements_quote_ipv6() {
        assert_eq!(
            forwarded_element("10.0.0.1".parse().unwrap(), "http", Some("api.example.com")),
            "for=10.0.0.1;proto=http;host=\"api.example.com\""
        );
        assert_eq!(
            forwarded_element("::1".parse().unwrap(), "https", None),
            "for=\"[::1]\";proto=https"
        );
    }

    #[test]
    fn joined_keeps_every_line_in_order() {
        let h = headers("x-forwarded-for", &["1.2.3.4", " 5.6.7.8, 9.9.9.9 "]);
        assert_eq!(
            joined(&h, &X_FORWARDED_FOR).as_deref(),
            Some("1.2.3.4, 5.6.7.8, 9.9.9.9")
        );
        assert_eq!(joined(&HeaderMap::new(), &X_FORWARDED_FOR), None);
    }
}
