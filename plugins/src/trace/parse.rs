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
}
