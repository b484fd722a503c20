//! gRPC at the edge: errors the gateway makes on a `grpc = true` route are gRPC errors, and
//! `grpc-timeout` bounds the exchange with the upstream.
//!
//! A gRPC client reads the outcome of a call from `grpc-status`, never from the HTTP status
//! (gRPC over HTTP/2, "Responses"): a JSON 401 would surface as a protocol error
//! (`UNKNOWN`/`INTERNAL`, "invalid content-type"). So the gateway answers a "Trailers-Only"
//! response instead: HTTP 200, `content-type: application/grpc`, `grpc-status` and
//! `grpc-message` in the header block, no body. The code follows the HTTP-to-gRPC mapping,
//! made finer where the gateway knows more than an HTTP status says (a quota is
//! `RESOURCE_EXHAUSTED`, a timeout `DEADLINE_EXCEEDED`).

use std::time::Duration;

use http::HeaderValue;
use pingora::http::ResponseHeader;
use sallyport_plugins::ApiError;

pub const CONTENT_TYPE_GRPC: &str = "application/grpc";
pub const GRPC_STATUS: &str = "grpc-status";

/// The gRPC status code for an error status the gateway answers with.
pub fn status_for(http: u16) -> u8 {
    match http {
        400 => 3,              // INVALID_ARGUMENT
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 | 405 | 415 => 12, // UNIMPLEMENTED
        408 | 504 => 4,        // DEADLINE_EXCEEDED
        413 | 429 => 8,        // RESOURCE_EXHAUSTED
        502 | 503 => 14,       // UNAVAILABLE
        500 => 13,             // INTERNAL
        _ => 2,                // UNKNOWN
    }
}

/// Whether a request's `content-type` is gRPC (`application/grpc`, `application/grpc+proto`,
/// `application/grpc-web...`).
pub fn is_grpc(content_type: Option<&HeaderValue>) -> bool {
    starts_with(content_type, CONTENT_TYPE_GRPC.as_bytes())
}

/// Whether it is gRPC-web (binary or text).
pub fn is_grpc_web(content_type: Option<&HeaderValue>) -> bool {
    starts_with(content_type, b"application/grpc-web")
}

/// Whether it is gRPC-web's base64 text format, which Pingora's bridge does not decode.
pub fn is_grpc_web_text(content_type: Option<&HeaderValue>) -> bool {
    starts_with(content_type, b"application/grpc-web-text")
}

fn starts_with(content_type: Option<&HeaderValue>, prefix: &[u8]) -> bool {
    content_type.is_some_and(|v| {
        v.as_bytes().len() >= prefix.len()
            && v.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix)
    })
}

/// The Trailers-Only response for an error; the error's own headers (`WWW-Authenticate`,
/// `Retry-After`) are kept. `web`: a gRPC-web client the bridge does not serve (no route),
/// answered in its own content type (its Trailers-Only form is the same header block).
pub fn error_header(err: &ApiError, web: bool) -> pingora::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(200, Some(4 + err.headers.len()))?;
    let content_type = if web {
        "application/grpc-web+proto"
    } else {
        CONTENT_TYPE_GRPC
    };
    header.insert_header(http::header::CONTENT_TYPE, content_type)?;
    header.insert_header(GRPC_STATUS, status_for(err.status).to_string())?;
    header.insert_header(
        "grpc-message",
        percent_encode(&format!("{}: {}", err.code, err.message)),
    )?;
    for (name, value) in &err.headers {
        header.append_header(name.clone(), value.as_str())?;
    }
    Ok(header)
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%` itself.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `grpc-timeout`: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`); `None` when
/// malformed (then it does not apply).
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_follow_the_grpc_grammar() {
        let t = |s: &str| parse_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        assert_eq!(t("123456789m"), None, "at most 8 digits");
        assert_eq!(t("10"), None, "a unit is required");
        assert_eq!(t("m"), None);
        assert_eq!(t("-1S"), None);
        assert_eq!(t("5s"), None, "units are case-sensitive");
    }

    #[test]
    fn errors_become_trailers_only_responses() {
        let err = ApiError::new(429, "quota_exceeded", "100% used: wait")
            .with_header(http::header::RETRY_AFTER, "3");
        let h = error_header(&err, false).unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.headers["content-type"], "application/grpc");
        assert_eq!(h.headers["grpc-status"], "8");
        assert_eq!(
            h.headers["grpc-message"],
            "quota_exceeded: 100%25 used: wait"
        );
        assert_eq!(h.headers["retry-after"], "3");
        assert_eq!(status_for(401), 16);
        assert_eq!(status_for(502), 14);
        assert_eq!(status_for(504), 4);
        assert_eq!(status_for(418), 2);
        let web = error_header(&err, true).unwrap();
        assert_eq!(web.headers["content-type"], "application/grpc-web+proto");
    }

    #[test]
    fn content_types() {
        let v = |s: &str| Some(HeaderValue::from_str(s).unwrap());
        assert!(is_grpc(v("application/grpc").as_ref()));
        assert!(is_grpc(v("application/GRPC+proto").as_ref()));
        assert!(is_grpc_web(v("application/grpc-web+proto").as_ref()));
        assert!(!is_grpc_web(v("application/grpc").as_ref()));
        assert!(is_grpc_web_text(
            v("application/grpc-web-text+proto").as_ref()
        ));
        assert!(!is_grpc_web_text(v("application/grpc-web+proto").as_ref()));
        assert!(!is_grpc(v("application/json").as_ref()));
        assert!(!is_grpc(None));
    }
}
