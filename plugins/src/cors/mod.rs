//! `cors`: Cross-Origin Resource Sharing (the Fetch standard's CORS protocol) at the edge.
//!
//! - A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered by
//!   the plugin in its `preflight` hook, before any other plugin of the route runs (preflights
//!   carry no credentials, so authentication and quotas must not see them) and whatever the
//!   route's `methods` say: the gateway routes a preflight by the method it asks about.
//!   Allowed: 204 with the `Access-Control-Allow-*` headers; an origin, method or header that
//!   is not allowed: 403 without CORS headers.
//! - Every other response of the route (proxied, cached, or an error of the gateway or a
//!   plugin) gets `Vary: Origin`, and for an allowed origin `Access-Control-Allow-Origin` (the
//!   origin itself, or `*` for `allow_origins = ["*"]` without credentials),
//!   `Access-Control-Allow-Credentials` and `Access-Control-Expose-Headers`. The gateway runs
//!   plugins with a preflight hook first in the chain, so a 401 of `jwt` gets them too.
//!
//! ```toml
//! [plugins.cors]
//! type = "cors"
//! allow_origins = ["https://app.example.com", "https://*.example.com"]
//! allow_methods = ["GET", "POST"]
//! allow_headers = ["authorization", "content-type"]
//! allow_credentials = true
//! max_age = "10m"
//! ```

pub mod config;

use std::sync::Arc;

use async_trait::async_trait;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderName, HeaderValue, Method};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

pub use config::{CorsConfig, OriginPattern};

use crate::{
    ApiError, BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Reply, RequestCtx,
    Result,
};

const REQUEST_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-request-private-network");
const ALLOW_PRIVATE_NETWORK: HeaderName =
    HeaderName::from_static("access-control-allow-private-network");

/// Whether a request is a CORS preflight.
pub fn is_preflight(req: &pingora::http::RequestHeader) -> bool {
    req.method == Method::OPTIONS
        && req.headers.contains_key(ORIGIN)
        && req.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The built `cors` plugin.
pub struct Cors {
    origins: Vec<OriginPattern>,
    methods: Vec<Method>,
    allow_methods: HeaderValue,
    headers: Vec<HeaderName>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    private_network: bool,
}

fn joined<T: AsRef<str>>(items: &[T]) -> Option<HeaderValue> {
    if items.is_empty() {
        return None;
    }
    let text: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
    HeaderValue::from_str(&text.join(", ")).ok()
}

impl Cors {
    pub fn build(
        c: &CorsConfig,
        _env: &BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = config::validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        let origins = crate::conf::values("allow_origins", &c.allow_origins)?;
        let methods = crate::conf::values("allow_methods", &c.allow_methods)?;
        let headers = crate::conf::values("allow_headers", &c.allow_headers)?;
        let expose = crate::conf::values("expose_headers", &c.expose_headers)?;
        let method_names: Vec<&str> = methods.iter().map(Method::as_str).collect();
        Ok(Erased::into_dyn(Cors {
            allow_methods: joined(&method_names)
                .ok_or_else(|| vec![BuildError::new("allow_methods", "list at least one method")])?,
            allow_headers: joined(&headers.iter().map(HeaderName::as_str).collect::<Vec<_>>()),
            expose_headers: joined(&expose.iter().map(HeaderName::as_str).collect::<Vec<_>>()),
            max_age: c
                .max_age
                .map(|d| HeaderValue::from(d.get().as_secs())),
            origins,
            methods,
            headers,
            credentials: c.allow_credentials,
            private_network: c.private_network,
        }))
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if it is allowed.
    fn allowed_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        let pattern = self.origins.iter().find(|p| p.matches(text))?;
        if *pattern == OriginPattern::Any && !self.credentials {
            Some(HeaderValue::from_static("*"))
        } else {
            Some(origin.clone())
        }
    }

    fn refuse(&self, reason: &'static str, message: &str) -> Flow {
        let mut err = ApiError::new(403, "cors_refused", message).with_header(VARY, "Origin");
        err.reason = reason;
        Flow::Respond(Reply::Error(err))
    }
}

/// Adds `name` to the response's `Vary` unless it is already there (or `*`).
fn add_vary(response: &mut ResponseHeader, name: &str) -> Result<()> {
    let present = response.headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case(name))
        })
    });
    if !present {
        response.append_header(VARY, name)?;
    }
    Ok(())
}

#[async_trait]
impl Plugin for Cors {
    type State = ();

    fn hooks(&self) -> Hooks {
        Hooks {
            preflight: true,
            response_filter: true,
            ..Hooks::NONE
        }
    }

    fn preflight(&self, session: &Session, _ctx: &mut RequestCtx, _state: &mut ()) -> Result<Flow> {
        let req = session.req_header();
        let Some(allow_origin) = req.headers.get(ORIGIN).and_then(|o| self.allowed_origin(o))
        else {
            return Ok(self.refuse("cors_origin", "this origin may not call this API"));
        };
        let method = req
            .headers
            .get(ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        if !method.is_some_and(|m| self.methods.contains(&m)) {
            return Ok(self.refuse("cors_method", "this method is not allowed from other origins"));
        }
        for value in req.headers.get_all(ACCESS_CONTROL_REQUEST_HEADERS) {
            let Ok(list) = value.to_str() else {
                return Ok(self.refuse("cors_headers", "unreadable Access-Control-Request-Headers"));
            };
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !self.headers.iter().any(|h| h.as_str().eq_ignore_ascii_case(name)) {
                    return Ok(self.refuse(
                        "cors_headers",
                        &format!("the header {name:?} is not allowed from other origins"),
                    ));
                }
            }
        }
        let mut resp = ResponseHeader::build(204, Some(8))?;
        resp.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin)?;
        if self.credentials {
            resp.insert_header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        }
        resp.insert_header(ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone())?;
        if let Some(h) = &self.allow_headers {
            resp.insert_header(ACCESS_CONTROL_ALLOW_HEADERS, h.clone())?;
        }
        if let Some(age) = &self.max_age {
            resp.insert_header(ACCESS_CONTROL_MAX_AGE, age.clone())?;
        }
        if self.private_network
            && req
                .headers
                .get(REQUEST_PRIVATE_NETWORK)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
        {
            resp.insert_header(ALLOW_PRIVATE_NETWORK, "true")?;
        }
        resp.insert_header(
            VARY,
            "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        )?;
        Ok(Flow::Respond(Reply::Full {
            header: Box::new(resp),
            body: bytes::Bytes::new(),
        }))
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<()> {
        // This plugin owns the route's CORS answer: an upstream's own headers never reach the
        // browser (they could allow an origin the config does not).
        for name in [
            ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            ACCESS_CONTROL_EXPOSE_HEADERS,
            ACCESS_CONTROL_ALLOW_METHODS,
            ACCESS_CONTROL_ALLOW_HEADERS,
            ACCESS_CONTROL_MAX_AGE,
        ] {
            response.remove_header(&name);
        }
        // The answer depends on Origin for every request, so every response says so (and a
        // cache between here and the browser keys by it).
        add_vary(response, "Origin")?;
        let Some(origin) = session
            .req_header()
            .headers
            .get(ORIGIN)
            .and_then(|o| self.allowed_origin(o))
        else {
            return Ok(());
        };
        response.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        if self.credentials {
            response.insert_header(ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")?;
        }
        if let Some(h) = &self.expose_headers {
            response.insert_header(ACCESS_CONTROL_EXPOSE_HEADERS, h.clone())?;
        }
        Ok(())
    }
}

impl crate::PluginType for CorsConfig {
    const KIND: &'static str = "cors";

    fn validate(&self) -> Vec<BuildError> {
        config::validate(self)
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Cors::build(self, env)
    }
}
