//! Client-address resolution from `X-Forwarded-For` / `Forwarded` field lines and
//! `server.trusted_proxies` (`sallyport::client_ip::client_ip`), the address quotas, logs and
//! IP policy use. Invariants:
//! - a peer that is not trusted is the client, whatever the headers say;
//! - otherwise the client is the peer or an address written in the header lines, and it is
//!   the first untrusted hop walking the whole list from its right end (a model of the rule),
//!   or the leftmost hop when every hop is trusted, stopping at the first unreadable entry.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use sallyport::client_ip::{client_ip, forwarded_for, is_trusted, FORWARDED, X_FORWARDED_FOR};
use sallyport::config::ClientIpHeader;

#[derive(Arbitrary, Debug)]
struct Input {
    peer: [u8; 4],
    trusted: Vec<([u8; 4], u8)>,
    lines: Vec<String>,
    forwarded: bool,
}

fuzz_target!(|input: Input| {
    let peer = IpAddr::from(input.peer);
    let trusted: Vec<IpNet> = input
        .trusted
        .iter()
        .take(4)
        .filter_map(|(a, len)| IpNet::new(IpAddr::from(*a), len % 33).ok())
        .collect();
    let (source, name) = if input.forwarded {
        (ClientIpHeader::Forwarded, &FORWARDED)
    } else {
        (ClientIpHeader::XForwardedFor, &X_FORWARDED_FOR)
    };
    let mut headers = HeaderMap::new();
    for line in input.lines.iter().take(4) {
        if let Ok(v) = HeaderValue::from_str(line) {
            headers.append(name.clone(), v);
        }
    }
    let got = client_ip(peer, &headers, &trusted, source);
    if trusted.is_empty() || !is_trusted(&trusted, peer) {
        assert_eq!(got, peer);
        return;
    }
    // The model: walk every entry from the right.
    let hop = |s: &str| -> Option<IpAddr> {
        if input.forwarded {
            forwarded_for(s)
        } else {
            s.trim().parse().ok()
        }
    };
    let mut want = peer;
    'lines: for value in headers.get_all(name).iter().rev() {
        let Ok(line) = value.to_str() else {
            break;
        };
        for entry in line.rsplit(',') {
            if entry.trim().is_empty() {
                continue;
            }
            match hop(entry) {
                Some(ip) => {
                    want = ip;
                    if !is_trusted(&trusted, ip) {
                        break 'lines;
                    }
                }
                None => break 'lines,
            }
        }
    }
    assert_eq!(got, want, "{peer} {trusted:?} {headers:?}");
    if got != peer {
        let written = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|line| line.split(','))
            .any(|entry| hop(entry) == Some(got));
        assert!(written, "{got} is not an entry of {headers:?}");
    }
});
