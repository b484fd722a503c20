//! `traceparent` parsing per W3C Trace Context.

/// The fields of a valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedTraceparent {
    pub version: u8,
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    /// Flags as forwarded in a version-00 header: only the bits version 00 defines
    /// (sampled, random) are kept.
    pub flags: u8,
}

/// Parses a `traceparent` value; `None` when it is invalid:
/// - version `ff`, or any field not lowercase hex of the right length;
/// - version `00` with anything after the flags;
/// - a later version whose header continues after the flags without a `-`;
/// - an all-zero trace-id or parent-id.
pub fn parse_traceparent(value: &[u8]) -> Option<ParsedTraceparent> {
    if value.len() < 55 {
        return None;
    }
    let version = hex_byte(&value[0..2])?;
    if version == 0xff || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    if version == 0 && value.len() != 55 {
        return None;
    }
    if version > 0 && value.len() > 55 && value[55] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, b) in parent_id.iter_mut().enumerate() {
        *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&value[53..55])?;
    if trace_id == [0u8; 16] || parent_id == [0u8; 8] {
        return None;
    }
    Some(ParsedTraceparent {
        version,
        trace_id,
        parent_id,
        flags: flags & 0x03,
    })
}

/// Most list members a `tracestate` may carry (W3C Trace Context, "tracestate Limits").
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Validates the `tracestate` field lines of a request as one list (RFC 9110 5.3: several
/// lines are one comma-separated list) per W3C Trace Context 3.3.1: `None` when any member
/// is invalid, since the spec drops an invalid `tracestate` as a whole:
/// - a key is a simple key (`lcalpha` then up to 255 of `lcalpha DIGIT _ - * /`) or a
///   multi-tenant key `tenant@system` (tenant: `lcalpha`/`DIGIT` then up to 240 more; system:
///   `lcalpha` then up to 13 more);
/// - a value is 1 to 256 printable ASCII characters without `,` or `=`, not ending in a space;
/// - at most 32 members, and no key twice.
///
/// Empty members (`a=1,,b=2`) are allowed and dropped. Members keep their order and bytes;
/// the result joins them with `,`. `Some("")` never happens: no members is `None`.
pub fn valid_tracestate<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Option<String> {
    let mut members: Vec<&str> = Vec::new();
    for line in lines {
        let line = std::str::from_utf8(line).ok()?;
        for member in line.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            let (key, value) = member.split_once('=')?;
            if !valid_tracestate_key(key) || !valid_tracestate_value(value) {
                return None;
            }
            if members.len() == MAX_TRACESTATE_MEMBERS {
                return None;
            }
            if members
                .iter()
                .any(|m| m.split_once('=').map(|(k, _)| k) == Some(key))
            {
                return None;
            }
            members.push(member);
        }
    }
    (!members.is_empty()).then(|| members.join(","))
}

fn key_char(c: u8) -> bool {
    matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

fn valid_tracestate_key(key: &str) -> bool {
    let k = key.as_bytes();
    match key.split_once('@') {
        None => {
            (1..=256).contains(&k.len())
                && k[0].is_ascii_lowercase()
                && k.iter().all(|&c| key_char(c))
        }
        Some((tenant, system)) => {
            let (t, s) = (tenant.as_bytes(), system.as_bytes());
            (1..=241).contains(&t.len())
                && (t[0].is_ascii_lowercase() || t[0].is_ascii_digit())
                && t.iter().all(|&c| key_char(c))
                && (1..=14).contains(&s.len())
                && s[0].is_ascii_lowercase()
                && s.iter().all(|&c| key_char(c))
        }
    }
}

fn valid_tracestate_value(value: &str) -> bool {
    let v = value.as_bytes();
    (1..=256).contains(&v.len())
        && v.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && v[v.len() - 1] != b' '
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nibble(two[0])? << 4 | nibble(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PID: &str = "00f067aa0ba902b7";

    fn tp(v: &str, t: &str, p: &str, f: &str) -> String {
        format!("{v}-{t}-{p}-{f}")
    }

    #[test]
    fn accepts_valid() {
        let p = parse_traceparent(tp("00", TID, PID, "01").as_bytes()).unwrap();
        assert_eq!(p.version, 0);
        assert_eq!(p.flags, 1);
        assert_eq!(p.parent_id[7], 0xb7);
        assert_eq!(
            parse_traceparent(tp("00", TID, PID, "00").as_bytes())
                .unwrap()
                .flags,
            0
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let cases = [
            tp("ff", TID, PID, "01"),
            tp("00", &TID.to_uppercase(), PID, "01"),
            tp("00", "00000000000000000000000000000000", PID, "01"),
            tp("00", TID, "0000000000000000", "01"),
            tp("00", TID, PID, "0g"),
            tp("0", TID, PID, "01"),
            tp("00", &TID[1..], PID, "01"),
            format!("{}-extra", tp("00", TID, PID, "01")),
            tp("00", TID, PID, "01").replace('-', "_"),
            String::new(),
        ];
        for c in cases {
            assert!(parse_traceparent(c.as_bytes()).is_none(), "{c}");
        }
    }

    #[test]
    fn future_versions_parse_known_fields() {
        let p = parse_traceparent(format!("{}-what-ever", tp("cc", TID, PID, "ff")).as_bytes())
            .unwrap();
        assert_eq!(p.version, 0xcc);
        assert_eq!(p.flags, 0x03, "unknown flags are dropped");
        assert!(parse_traceparent(format!("{}x", tp("cc", TID, PID, "01")).as_bytes()).is_none());
        assert!(parse_traceparent(tp("cc", TID, PID, "01").as_bytes()).is_some());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_traceparent(&bytes);
        }

        #[test]
        fn roundtrips(t in any::<[u8; 16]>(), p in any::<[u8; 8]>(), f in 0u8..4) {
            prop_assume!(t != [0; 16] && p != [0; 8]);
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let s = format!("00-{}-{}-{:02x}", hex(&t), hex(&p), f);
            let parsed = parse_traceparent(s.as_bytes()).unwrap();
            prop_assert_eq!(parsed.trace_id, t);
            prop_assert_eq!(parsed.parent_id, p);
            prop_assert_eq!(parsed.flags, f);
        }
    }

    #[test]
    fn tracestate_rules_of_w3c_trace_context_3_3_1() {
        let ok = |lines: &[&str]| valid_tracestate(lines.iter().map(|l| l.as_bytes()));
        // Valid ones are kept in order, byte for byte per member; lines are one list.
        assert_eq!(ok(&["foo=1,bar=2"]).as_deref(), Some("foo=1,bar=2"));
        assert_eq!(ok(&["foo=1", "bar=2"]).as_deref(), Some("foo=1,bar=2"));
        assert_eq!(ok(&["foo=1 , bar=2\t"]).as_deref(), Some("foo=1,bar=2"));
        assert_eq!(ok(&["foo=a b"]).as_deref(), Some("foo=a b"));
        assert_eq!(
            ok(&["t1@sys=x", "3tenant@v-2=y"]).as_deref(),
            Some("t1@sys=x,3tenant@v-2=y")
        );
        assert_eq!(ok(&["k*_-/9=v!~"]).as_deref(), Some("k*_-/9=v!~"));
        // Empty members are allowed and dropped.
        assert_eq!(ok(&["foo=1,,bar=2,"]).as_deref(), Some("foo=1,bar=2"));
        assert_eq!(ok(&[",", " "]), None, "no members at all");
        let key256 = format!("a{}", "b".repeat(255));
        assert!(ok(&[&format!("{key256}=v")]).is_some());
        let value256 = "v".repeat(256);
        assert!(ok(&[&format!("k={value256}")]).is_some());
        let thirty_two: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert!(ok(&[&thirty_two.join(",")]).is_some());
        // Invalid ones are dropped whole.
        for bad in [
            vec!["Foo=1"].as_slice(), // uppercase key
            &["1foo=1"],              // simple key must start with a letter
            &["fo o=1"],              // space inside key
            &["foo"],                 // no '='
            &["foo="],                // empty value
            &["foo=a,b=c=d"],         // '=' in a value
            &["foo=a\tb"],            // tab inside a value
            &["foo=1", "foo=2"],      // duplicate key across lines
            &["foo=1,bar=2,foo=3"],   // duplicate key
            &["@sys=1"],              // empty tenant
            &["t@=1"],                // empty system
            &["t@Sys=1"],             // uppercase system
            &["t@1sys=1"],            // system must start with a letter
            &["t@abcdefghijklmno=1"], // system over 14 chars
            &["a@b@c=1"],             // two '@'
            &["foo=caf\u{e9}"],       // non-ASCII value
            &["foo=\u{7f}"],          // control character
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        assert_eq!(
            ok(&[&format!("a{}=v", "b".repeat(256))]),
            None,
            "key over 256"
        );
        assert_eq!(
            ok(&[&format!("k={}", "v".repeat(257))]),
            None,
            "value over 256"
        );
        let tenant242 = format!("{}@s=v", "t".repeat(242));
        assert_eq!(ok(&[&tenant242]), None, "tenant over 241");
        let thirty_three: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(ok(&[&thirty_three.join(",")]), None, "over 32 members");
        assert_eq!(
            valid_tracestate([b"foo=\xff".as_slice()]),
            None,
            "not UTF-8"
        );
    }
}
