//! Aggregate call templates (`Template::parse` / `render`): `{claim.NAME}`, `{path.NAME}`,
//! `{query.NAME}` and `{header.NAME}` filled from a hostile request. Invariant: a substituted
//! value never adds a path segment, query parameter or fragment: the structure characters
//! (`/ ? # & =`) of a rendering are those of the same template rendered with harmless values,
//! and no value is `.`/`..` (which would climb the upstream's path).
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use sallyport_plugins::aggregate::Template;
use sallyport_plugins::{Principal, RequestCtx};

#[derive(Arbitrary, Debug)]
struct Input {
    template: String,
    value: String,
}

fn request_and_ctx(value: &str) -> Option<(RequestHeader, RequestCtx)> {
    let encoded: String = percent_encode(value);
    let uri = format!("/in?q={encoded}&id={encoded}&name={encoded}");
    let mut req = RequestHeader::build("GET", uri.as_bytes(), None).ok()?;
    for h in ["x-q", "x-id", "x-name"] {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            req.insert_header(h, v).ok()?;
        }
    }
    let mut ctx = RequestCtx::new("fuzz".into(), Arc::from("r"));
    for p in ["q", "id", "name"] {
        ctx.path_params.push((Arc::from(p), value.to_string()));
    }
    let mut claims = serde_json::Map::new();
    for c in ["q", "id", "name", "sub"] {
        claims.insert(c.into(), value.into());
    }
    ctx.principal = Some(Principal {
        subject: Some(value.to_string()),
        claims: Arc::new(claims),
        verified_by: "jwt",
    });
    Some((req, ctx))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn structure(s: &str) -> String {
    s.chars().filter(|c| "/?#&=".contains(*c)).collect()
}

fuzz_target!(|input: Input| {
    let Ok(template) = Template::parse(&input.template) else {
        return;
    };
    let (Some((req, ctx)), Some((safe_req, safe_ctx))) =
        (request_and_ctx(&input.value), request_and_ctx("v"))
    else {
        return;
    };
    let Ok(safe) = template.render(&safe_req, &safe_ctx) else {
        return;
    };
    if let Ok(out) = template.render(&req, &ctx) {
        assert_eq!(
            structure(&out),
            structure(&safe),
            "{:?} with {:?} rendered {out:?}",
            input.template,
            input.value
        );
        let parts = |s: &str| {
            s.split(['/', '?', '#', '&', '='])
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        for (got, harmless) in parts(&out).iter().zip(parts(&safe)) {
            if got == "." || got == ".." {
                assert_eq!(*got, harmless, "a value became a dot segment: {out:?}");
            }
        }
    }
});
