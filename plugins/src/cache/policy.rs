//! RFC 9111 rules of a shared cache, as pure functions of headers and a clock: what may be
//! stored and for how long (sections 3, 4.2), how old a stored response is (4.2.3), and what the
//! request's own `Cache-Control` asks of a stored one (5.2.1). Directives are parsed with
//! Pingora's `CacheControl`.

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderMap, AGE, AUTHORIZATION, CACHE_CONTROL, COOKIE, DATE, ETAG, EXPIRES, LAST_MODIFIED,
    PRAGMA, SET_COOKIE, VARY,
};
use http::StatusCode;
use pingora::cache::cache_control::{CacheControl, DirectiveKey, InterpretCacheControl};
use pingora::cache::{CacheMeta, ForcedFreshness};
use pingora::http::ResponseHeader;

/// Statuses a cache may store without explicit freshness (RFC 9110 15.1).
pub const HEURISTICALLY_CACHEABLE: [u16; 12] =
    [200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501];

/// The operator's defaults (the plugin's config).
#[derive(Debug, Clone)]
pub struct Rules {
    pub heuristic: bool,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub shared_when_authenticated: bool,
}

/// What a request's `Cache-Control` (or `Pragma: no-cache`) asks (RFC 9111 5.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    pub no_store: bool,
    pub no_cache: bool,
    pub max_age: Option<u64>,
    /// `Some(None)`: `max-stale` without a value (any staleness).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
}

fn delta(cc: &CacheControl, name: &str) -> Option<Option<u64>> {
    let value = cc.directives.get(&DirectiveKey::from_lowercase(name))?;
    Some(value.as_ref().map(|v| {
        // An invalid delta-seconds is read as 0: the strictest meaning.
        v.parse_as_delta_seconds().map_or(0, u64::from)
    }))
}

impl RequestDirectives {
    pub fn parse(headers: &HeaderMap) -> Self {
        let Some(cc) = CacheControl::from_headers_named(CACHE_CONTROL.as_str(), headers) else {
            // RFC 9111 5.4: `Pragma: no-cache` counts only without `Cache-Control`.
            let pragma_no_cache = headers.get_all(PRAGMA).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.split(',').any(|d| d.trim().eq_ignore_ascii_case("no-cache")))
            });
            return RequestDirectives {
                no_cache: pragma_no_cache,
                ..Default::default()
            };
        };
        RequestDirectives {
            no_store: cc.no_store(),
            no_cache: cc.has_key("no-cache"),
            max_age: delta(&cc, "max-age").map(|v| v.unwrap_or(0)),
            max_stale: delta(&cc, "max-stale"),
            min_fresh: delta(&cc, "min-fresh").map(|v| v.unwrap_or(0)),
            only_if_cached: cc.only_if_cached(),
        }
    }
}

/// Whether a request carries credentials (RFC 9111 3.5 names `Authorization`; cookies and a
/// principal verified by a plugin count too).
pub fn credentialed(headers: &HeaderMap, verified: bool) -> bool {
    verified || headers.contains_key(AUTHORIZATION) || headers.contains_key(COOKIE)
}

/// Whether a response says a shared cache may give it to anyone, even when the request carried
/// credentials (RFC 9111 3.5: `public`, `s-maxage` or `must-revalidate`).
pub fn explicitly_shareable(cc: Option<&CacheControl>) -> bool {
    cc.is_some_and(|cc| cc.public() || cc.has_key("s-maxage") || cc.must_revalidate())
}

/// Whether a stored response forbids being served stale (RFC 9111 4.2.4, 5.2.2).
fn forbids_stale(cc: Option<&CacheControl>) -> bool {
    cc.is_some_and(|cc| {
        cc.must_revalidate()
            || cc.proxy_revalidate()
            || cc.has_key("s-maxage")
            || cc.has_key("no-cache")
    })
}

/// A response that may be stored: its freshness and the header to keep.
#[derive(Debug)]
pub struct Storable {
    /// Start of the response's age (now minus its corrected initial age).
    pub epoch: SystemTime,
    pub fresh_until: SystemTime,
    pub stale_while_revalidate: u32,
    pub stale_if_error: u32,
    pub header: ResponseHeader,
}

impl Storable {
    pub fn into_meta(self, now: SystemTime) -> CacheMeta {
        let mut meta = CacheMeta::new(
            self.fresh_until,
            now,
            self.stale_while_revalidate,
            self.stale_if_error,
            self.header,
        );
        meta.set_epoch_override(self.epoch);
        meta
    }
}

fn http_date(headers: &HeaderMap, name: &http::HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(first.to_str().ok()?).ok()
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The freshness lifetime (RFC 9111 4.2.1, 4.2.2), or why the response cannot be stored.
fn lifetime(
    resp: &ResponseHeader,
    cc: Option<&CacheControl>,
    rules: &Rules,
    now: SystemTime,
) -> Result<Duration, &'static str> {
    let headers = &resp.headers;
    if let Some(cc) = cc {
        if cc.has_key("no-cache") {
            return Ok(Duration::ZERO);
        }
        for name in ["s-maxage", "max-age"] {
            if let Some(v) = delta(cc, name) {
                return Ok(Duration::from_secs(v.unwrap_or(0)));
            }
        }
    }
    if headers.contains_key(EXPIRES) {
        // Several or an invalid `Expires` mean "already expired" (RFC 9111 5.3).
        let Some(expires) = http_date(headers, &EXPIRES) else {
            return Ok(Duration::ZERO);
        };
        let date = http_date(headers, &DATE).unwrap_or(now);
        return Ok(expires.duration_since(date).unwrap_or(Duration::ZERO));
    }
    let public = cc.is_some_and(|cc| cc.public());
    if !(HEURISTICALLY_CACHEABLE.contains(&resp.status.as_u16()) || public) {
        return Err("no-freshness");
    }
    if rules.heuristic {
        if let Some(modified) = http_date(headers, &LAST_MODIFIED) {
            let date = http_date(headers, &DATE).unwrap_or(now);
            if let Ok(since) = date.duration_since(modified) {
                return Ok(since / 10);
            }
        }
    }
    if rules.default_ttl.is_zero() {
        return Err("no-freshness");
    }
    Ok(rules.default_ttl)
}

/// The corrected initial age of a response received `now` for a request sent at `request_time`
/// (RFC 9111 4.2.3).
pub fn initial_age(headers: &HeaderMap, request_time: SystemTime, now: SystemTime) -> Duration {
    let age_value = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let apparent_age = http_date(headers, &DATE)
        .and_then(|date| now.duration_since(date).ok())
        .unwrap_or(Duration::ZERO);
    let response_delay = now.duration_since(request_time).unwrap_or(Duration::ZERO);
    apparent_age.max(age_value.saturating_add(response_delay))
}

/// Whether (and how long) a response may be stored by a shared cache: RFC 9111 3 and 4.2, plus
/// the gateway's rules for credentials and `Set-Cookie`. `Err` is the reason it may not, as a
/// `Cache-Status` detail.
pub fn storable(
    resp: &ResponseHeader,
    request: &RequestDirectives,
    credentialed: bool,
    rules: &Rules,
    request_time: SystemTime,
    now: SystemTime,
) -> Result<Storable, &'static str> {
    let status = resp.status;
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT {
        return Err("status");
    }
    if status == StatusCode::NOT_MODIFIED {
        return Err("not-modified");
    }
    if request.no_store {
        return Err("request-no-store");
    }
    let cc = CacheControl::from_resp_headers(resp);
    if let Some(cc) = &cc {
        if cc.no_store() {
            return Err("no-store");
        }
        if cc.private() {
            return Err("private");
        }
    }
    let vary_star = resp.headers.get_all(VARY).iter().any(|v| {
        v.to_str()
            .map_or(true, |s| s.split(',').any(|n| n.trim() == "*"))
    });
    if vary_star {
        return Err("vary-star");
    }
    let shareable = explicitly_shareable(cc.as_ref());
    if credentialed && !shareable && rules.shared_when_authenticated {
        return Err("authenticated");
    }
    if resp.headers.contains_key(SET_COOKIE) && !cc.as_ref().is_some_and(|cc| cc.public()) {
        return Err("set-cookie");
    }
    let lifetime = lifetime(resp, cc.as_ref(), rules, now)?.min(rules.max_ttl);
    let has_validator = resp.headers.contains_key(ETAG) || resp.headers.contains_key(LAST_MODIFIED);
    if lifetime.is_zero() && !has_validator {
        return Err("stale-without-validator");
    }
    let age = initial_age(&resp.headers, request_time, now);
    let epoch = now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
    let fresh_until = if lifetime.is_zero() {
        // Stale from the start: every use revalidates.
        epoch.checked_sub(Duration::from_secs(1)).unwrap_or(epoch)
    } else {
        epoch + lifetime
    };
    let (swr, sie) = if forbids_stale(cc.as_ref()) {
        (0, 0)
    } else {
        let own = |name| cc.as_ref().and_then(|cc| delta(cc, name)).map(|v| v.unwrap_or(0));
        (
            own("stale-while-revalidate")
                .map_or(secs(rules.stale_while_revalidate), |v| secs(Duration::from_secs(v))),
            own("stale-if-error")
                .map_or(secs(rules.stale_if_error), |v| secs(Duration::from_secs(v))),
        )
    };
    let mut header = resp.clone();
    if let Some(cc) = &cc {
        // `private="x"` and `no-cache="x"` name fields a shared cache must not keep.
        cc.strip_private_headers(&mut header);
    }
    // One client's cookie is never replayed to the others: the client of the miss gets it
    // from the upstream's own response, a hit never does.
    header.remove_header(&SET_COOKIE);
    Ok(Storable {
        epoch,
        fresh_until,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        header,
    })
}

/// What the request's directives make of a stored response found by a lookup (RFC 9111
/// 5.2.1): `None` keeps the stored freshness.
pub fn on_hit(
    meta: &CacheMeta,
    request: &RequestDirectives,
    now: SystemTime,
) -> Option<ForcedFreshness> {
    let fresh = meta.is_fresh(now);
    if request.no_cache {
        return Some(ForcedFreshness::ForceExpired);
    }
    let age = meta.age().as_secs();
    // `max-age=0` is how clients ask for validation, also of a response stored this second.
    if request.max_age.is_some_and(|max| max == 0 || age > max) {
        return Some(ForcedFreshness::ForceExpired);
    }
    if fresh {
        let left = meta
            .fresh_until()
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if request.min_fresh.is_some_and(|min| left < min) {
            return Some(ForcedFreshness::ForceExpired);
        }
        return None;
    }
    let stale_for = now
        .duration_since(meta.fresh_until())
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let accepted = match request.max_stale {
        Some(None) => true,
        Some(Some(max)) => stale_for <= max,
        None => false,
    };
    let cc = CacheControl::from_resp_headers(meta.response_header());
    if accepted && !forbids_stale(cc.as_ref()) {
        return Some(ForcedFreshness::ForceFresh);
    }
    None
}

/// The stored header updated with the fields of a 304 that validated it (RFC 9111 4.3.4):
/// each field the 304 carries replaces the stored ones, except the ones that describe the
/// stored body or the connection.
pub fn refresh_header(stored: &ResponseHeader, not_modified: &ResponseHeader) -> ResponseHeader {
    const KEEP: [&str; 7] = [
        "set-cookie",
        "content-length",
        "content-encoding",
        "content-range",
        "transfer-encoding",
        "connection",
        "keep-alive",
    ];
    let mut out = stored.clone();
    let mut replaced: Vec<&http::HeaderName> = Vec::new();
    for (name, value) in &not_modified.headers {
        if KEEP.contains(&name.as_str()) {
            continue;
        }
        // insert replaces every stored instance; later instances of the same 304 field append.
        // (Neither fails for a name and value already in a header map.)
        if replaced.contains(&name) {
            let _ = out.append_header(name.clone(), value.clone());
        } else {
            replaced.push(name);
            let _ = out.insert_header(name.clone(), value.clone());
        }
    }
    out
}

/// The header names a stored response varies on (RFC 9111 4.1), lowercased, sorted and
/// without duplicates (`*` is never stored).
pub fn vary_names(headers: &HeaderMap) -> Vec<String> {
    let mut names: Vec<String> = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "*")
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether a stored response is shared by everyone or partitioned by the caller's identity:
/// a credentialed request's response that does not say it may be shared is kept per principal.
pub fn partitioned(stored: &ResponseHeader, credentialed: bool, rules: &Rules) -> bool {
    credentialed
        && !rules.shared_when_authenticated
        && !explicitly_shareable(CacheControl::from_resp_headers(stored).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn rules() -> Rules {
        Rules {
            heuristic: true,
            default_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(86400),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            shared_when_authenticated: false,
        }
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn lifetime_of(r: &ResponseHeader) -> Result<u64, &'static str> {
        let now = SystemTime::now();
        let s = storable(r, &RequestDirectives::default(), false, &rules(), now, now)?;
        Ok(s.fresh_until.duration_since(s.epoch).map_or(0, |d| d.as_secs()))
    }

    fn req(cc: &str) -> RequestDirectives {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_str(cc).unwrap());
        RequestDirectives::parse(&h)
    }

    /// RFC 9111 4.2.1: s-maxage over max-age over Expires − Date.
    #[test]
    fn rfc9111_4_2_1_freshness_sources_in_order() {
        let r = resp(200, &[("cache-control", "max-age=60, s-maxage=120")]);
        assert_eq!(lifetime_of(&r), Ok(120));
        let r = resp(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("expires", "Thu, 01 Jan 2099 00:00:00 GMT"),
            ],
        );
        assert_eq!(lifetime_of(&r), Ok(60));
        let r = resp(
            200,
            &[
                ("date", "Mon, 30 Nov 2026 10:00:00 GMT"),
                ("expires", "Mon, 30 Nov 2026 10:05:00 GMT"),
                ("etag", "\"a\""),
            ],
        );
        assert_eq!(lifetime_of(&r), Ok(300));
        // RFC 9111 5.3: an invalid Expires means already expired.
        let r = resp(200, &[("expires", "0"), ("etag", "\"a\"")]);
        assert_eq!(lifetime_of(&r), Ok(0));
    }

    /// RFC 9111 4.2.2: 10% of the time since Last-Modified, only for heuristically cacheable
    /// statuses; capped by max_ttl.
    #[test]
    fn rfc9111_4_2_2_heuristic_freshness() {
        let r = resp(
            200,
            &[
                ("date", "Mon, 30 Nov 2026 10:00:00 GMT"),
                ("last-modified", "Mon, 30 Nov 2026 09:00:00 GMT"),
            ],
        );
        assert_eq!(lifetime_of(&r), Ok(360));
        let r = resp(
            302,
            &[
                ("date", "Mon, 30 Nov 2026 10:00:00 GMT"),
                ("last-modified", "Mon, 30 Nov 2026 09:00:00 GMT"),
            ],
        );
        assert_eq!(lifetime_of(&r), Err("no-freshness"));
        assert_eq!(lifetime_of(&resp(200, &[])), Err("no-freshness"));
        let r = resp(200, &[("cache-control", "max-age=999999999")]);
        assert_eq!(lifetime_of(&r), Ok(86400));
        // An explicit lifetime makes any final status storable.
        assert_eq!(lifetime_of(&resp(500, &[("cache-control", "max-age=5")])), Ok(5));
    }

    /// RFC 9111 3 and 5.2.2: no-store, private, Vary: *, Set-Cookie without public.
    #[test]
    fn rfc9111_3_responses_that_are_never_stored() {
        for (cc, why) in [("no-store, max-age=60", "no-store"), ("private, max-age=60", "private")] {
            assert_eq!(lifetime_of(&resp(200, &[("cache-control", cc)])), Err(why));
        }
        let r = resp(200, &[("cache-control", "max-age=60"), ("vary", "accept, *")]);
        assert_eq!(lifetime_of(&r), Err("vary-star"));
        let r = resp(200, &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]);
        assert_eq!(lifetime_of(&r), Err("set-cookie"));
        let r = resp(200, &[("cache-control", "public, max-age=60"), ("set-cookie", "a=b")]);
        assert_eq!(lifetime_of(&r), Ok(60));
        // no-cache stores, stale from the start, but only with a validator to revalidate.
        assert_eq!(
            lifetime_of(&resp(200, &[("cache-control", "no-cache")])),
            Err("stale-without-validator")
        );
        let r = resp(200, &[("cache-control", "no-cache=\"x-a\", max-age=60"), ("etag", "\"1\"")]);
        assert_eq!(lifetime_of(&r), Ok(0));
    }

    /// RFC 9111 3.5: a credentialed request's response is shared only when it says so; with
    /// shared_when_authenticated = true anything else is not stored.
    #[test]
    fn rfc9111_3_5_credentials() {
        let now = SystemTime::now();
        let mut strict = rules();
        strict.shared_when_authenticated = true;
        let private_ok = resp(200, &[("cache-control", "max-age=60")]);
        let d = RequestDirectives::default();
        assert!(storable(&private_ok, &d, true, &strict, now, now).is_err());
        assert!(storable(&private_ok, &d, true, &rules(), now, now).is_ok());
        assert!(partitioned(&private_ok, true, &rules()));
        assert!(!partitioned(&private_ok, false, &rules()));
        for cc in ["public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"] {
            let shared = resp(200, &[("cache-control", cc)]);
            assert!(storable(&shared, &d, true, &strict, now, now).is_ok(), "{cc}");
            assert!(!partitioned(&shared, true, &rules()), "{cc}");
        }
    }

    /// RFC 9111 4.2.3: corrected initial age from Age, Date and the response delay.
    #[test]
    fn rfc9111_4_2_3_initial_age() {
        let now = SystemTime::now();
        let mut h = HeaderMap::new();
        h.insert(AGE, HeaderValue::from_static("100"));
        let sent = now - Duration::from_secs(2);
        assert_eq!(initial_age(&h, sent, now), Duration::from_secs(102));
        let date = httpdate::fmt_http_date(now - Duration::from_secs(500));
        h.insert(DATE, HeaderValue::from_str(&date).unwrap());
        assert_eq!(initial_age(&h, now, now).as_secs(), 500);
        // A response already older than its lifetime is stored stale.
        let r = resp(200, &[("cache-control", "max-age=60"), ("age", "61"), ("etag", "\"e\"")]);
        let s = storable(&r, &RequestDirectives::default(), false, &rules(), now, now).unwrap();
        assert!(s.fresh_until < now);
    }

    #[test]
    fn rfc9111_5_2_1_request_directives() {
        assert_eq!(
            req("max-age=0, max-stale, min-fresh=5, only-if-cached, no-store"),
            RequestDirectives {
                no_store: true,
                no_cache: false,
                max_age: Some(0),
                max_stale: Some(None),
                min_fresh: Some(5),
                only_if_cached: true,
            }
        );
        assert_eq!(req("max-stale=30").max_stale, Some(Some(30)));
        assert!(req("no-cache").no_cache);
        let mut h = HeaderMap::new();
        h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        assert!(RequestDirectives::parse(&h).no_cache);
    }

    #[test]
    fn rfc9111_5_2_1_request_directives_on_a_stored_response() {
        let now = SystemTime::now();
        let fresh = storable(
            &resp(200, &[("cache-control", "max-age=60"), ("age", "10")]),
            &RequestDirectives::default(),
            false,
            &rules(),
            now,
            now,
        )
        .unwrap()
        .into_meta(now);
        assert!(on_hit(&fresh, &RequestDirectives::default(), now).is_none());
        assert!(on_hit(&fresh, &req("no-cache"), now).is_some());
        assert!(on_hit(&fresh, &req("max-age=5"), now).is_some());
        assert!(on_hit(&fresh, &req("max-age=30"), now).is_none());
        assert!(on_hit(&fresh, &req("min-fresh=55"), now).is_some());
        let stale = |cc: &str| {
            storable(
                &resp(200, &[("cache-control", cc), ("age", "70"), ("etag", "\"e\"")]),
                &RequestDirectives::default(),
                false,
                &rules(),
                now,
                now,
            )
            .unwrap()
            .into_meta(now)
        };
        assert!(matches!(
            on_hit(&stale("max-age=60"), &req("max-stale=20"), now),
            Some(ForcedFreshness::ForceFresh)
        ));
        assert!(on_hit(&stale("max-age=60"), &req("max-stale=5"), now).is_none());
        assert!(on_hit(&stale("max-age=60, must-revalidate"), &req("max-stale"), now).is_none());
    }

    /// RFC 9111 4.3.4: a 304's fields replace the stored ones; the body's own stay.
    #[test]
    fn rfc9111_4_3_4_a_304_refreshes_the_stored_header() {
        let stored = resp(
            200,
            &[("x-version", "1"), ("content-length", "6"), ("etag", "\"a\""), ("link", "a")],
        );
        let nm = resp(
            304,
            &[("x-version", "2"), ("content-length", "0"), ("link", "b"), ("link", "c")],
        );
        let out = refresh_header(&stored, &nm);
        assert_eq!(out.status, 200);
        assert_eq!(out.headers["x-version"], "2");
        assert_eq!(out.headers["content-length"], "6");
        assert_eq!(out.headers["etag"], "\"a\"");
        let links: Vec<_> = out.headers.get_all("link").iter().collect();
        assert_eq!(links, ["b", "c"]);
    }

    #[test]
    fn vary_names_are_normalised() {
        let r = resp(200, &[("vary", "Accept-Language, accept"), ("vary", "ACCEPT")]);
        assert_eq!(vary_names(&r.headers), vec!["accept", "accept-language"]);
    }
}
