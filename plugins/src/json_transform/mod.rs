//! `json_transform`: removes and renames fields of an upstream's JSON response body on its way
//! to the client ("remove internal fields, rename an external one").
//!
//! - Paths: dot-separated keys; `key[]` steps into every element of an array (`items[].cost`),
//!   and a leading `[]` into a top-level array. `remove` drops the field at each path;
//!   `rename` gives the last key of a path a new name (keeping its place).
//! - Only a JSON response (`application/json` or `+json`, not compressed) of at most `max_body`
//!   is transformed: it is held back until complete, transformed and sent without its
//!   `Content-Length` (chunked: the gateway cannot know the new length before the headers
//!   leave). A strong `ETag` becomes weak (the bytes changed, the meaning did not).
//! - Anything else passes through untouched: other content types, compressed bodies, larger
//!   bodies (a chunked body that grows past `max_body` is released as it came), and bodies
//!   that do not parse as JSON. Oversized and unparsable ones are logged once per route.
//!
//! ```toml
//! [plugins.public-view]
//! type = "json_transform"
//! remove = ["internal", "items[].cost", "debug"]
//! rename = { "fullName" = "name" }
//! max_body = "1MiB"
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::Method;
use parking_lot::Mutex;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::Value;

use crate::conf::ByteSize;
use crate::{
    BodyBuffer, BuildEnv, BuildError, DynPlugin, Erased, Hooks, Plugin, RequestCtx, Result,
};

/// `[plugins.NAME]` with `type = "json_transform"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JsonTransformConfig {
    #[serde(default)]
    pub remove: Vec<String>,
    /// Path → new name of its last key.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
}

fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Each,
}

/// Parses `a.b[].c` (and `[].c`).
pub fn parse_path(s: &str) -> std::result::Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for (i, part) in s.split('.').enumerate() {
        let (key, each) = match part.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (part, false),
        };
        if key.is_empty() && !(i == 0 && each) {
            return Err(format!("{s:?} has an empty key"));
        }
        if key.contains(['[', ']']) {
            return Err(format!("{s:?}: write arrays as key[]"));
        }
        if !key.is_empty() {
            steps.push(Step::Key(key.to_string()));
        }
        if each {
            steps.push(Step::Each);
        }
    }
    if !matches!(steps.last(), Some(Step::Key(_))) {
        return Err(format!("{s:?} must end with a key"));
    }
    Ok(steps)
}

/// Applies `f` to every object holding the path's last key.
fn visit(value: &mut Value, path: &[Step], f: &mut dyn FnMut(&mut serde_json::Map<String, Value>, &str)) {
    match path {
        [Step::Key(last)] => {
            if let Value::Object(map) = value {
                f(map, last);
            }
        }
        [Step::Key(k), rest @ ..] => {
            if let Some(child) = value.as_object_mut().and_then(|m| m.get_mut(k)) {
                visit(child, rest, f);
            }
        }
        [Step::Each, rest @ ..] => {
            if let Value::Array(items) = value {
                for item in items {
                    visit(item, rest, f);
                }
            }
        }
        [] => {}
    }
}

/// The transform: removals first, then renames.
#[derive(Debug, Clone, Default)]
pub struct Transform {
    remove: Vec<Vec<Step>>,
    rename: Vec<(Vec<Step>, String)>,
}

impl Transform {
    pub fn apply(&self, value: &mut Value) {
        for path in &self.remove {
            visit(value, path, &mut |map, key| {
                map.shift_remove(key);
            });
        }
        for (path, to) in &self.rename {
            visit(value, path, &mut |map, key| {
                if key == to || !map.contains_key(key) {
                    return;
                }
                // Keep the field's place: rebuild the map with the key renamed.
                let old = std::mem::take(map);
                for (k, v) in old {
                    if k == key {
                        map.insert(to.clone(), v);
                    } else if k != *to {
                        map.insert(k, v);
                    }
                }
            });
        }
    }
}

fn validate(c: &JsonTransformConfig) -> std::result::Result<Transform, Vec<BuildError>> {
    let mut errors = Vec::new();
    let mut t = Transform::default();
    for (i, p) in c.remove.iter().enumerate() {
        match parse_path(p) {
            Ok(steps) => t.remove.push(steps),
            Err(e) => errors.push(BuildError::new(format!("remove[{i}]"), e)),
        }
    }
    for (from, to) in &c.rename {
        let at = format!("rename.{from:?}");
        match parse_path(from) {
            Ok(steps) if !to.is_empty() && !to.contains(['.', '[', ']']) => {
                t.rename.push((steps, to.clone()))
            }
            Ok(_) => errors.push(BuildError::new(at, "the new name must be one key (no dots or [])")),
            Err(e) => errors.push(BuildError::new(at, e)),
        }
    }
    if c.remove.is_empty() && c.rename.is_empty() {
        errors.push(BuildError::new("remove", "give fields to remove or rename"));
    }
    if c.max_body.get() == 0 {
        errors.push(BuildError::new("max_body", "must be greater than 0"));
    }
    if errors.is_empty() {
        Ok(t)
    } else {
        Err(errors)
    }
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Per-request state: whether this response's body is being held back.
#[derive(Debug, Default)]
pub enum Body {
    #[default]
    Untouched,
    Held(BodyBuffer),
}

/// The built `json_transform` plugin.
pub struct JsonTransform {
    transform: Transform,
    max_body: usize,
    /// Routes already logged about a body passed through untransformed.
    logged: Mutex<HashSet<Arc<str>>>,
}

impl JsonTransform {
    fn log_once(&self, route: &Arc<str>, what: &str) {
        if self.logged.lock().insert(Arc::clone(route)) {
            log::warn!("json_transform: a response of route {route} passed through untransformed: {what} (logged once per route)");
        }
    }
}

#[async_trait]
impl Plugin for JsonTransform {
    type State = Body;

    fn hooks(&self) -> Hooks {
        Hooks {
            response_filter: true,
            response_body: true,
            ..Hooks::NONE
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
        state: &mut Body,
    ) -> Result<()> {
        let json = response
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json);
        let encoded = response
            .headers
            .get(CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        // A 206 is a piece of a body: never parsed, never changed.
        if !json || encoded || response.status.as_u16() == 206 {
            return Ok(());
        }
        let no_body = session.req_header().method == Method::HEAD
            || matches!(response.status.as_u16(), 204 | 304)
            || response.status.is_informational();
        let declared = response
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            self.log_once(&ctx.route, "larger than max_body");
            return Ok(());
        }
        response.remove_header(&CONTENT_LENGTH);
        // Pingora chose the framing before this hook: without a length, say chunked, or the
        // body would go close-delimited and end the connection (HTTP/2 drops the header).
        if !no_body {
            response.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
        }
        if let Some(etag) = response.headers.get(ETAG).cloned() {
            if !etag.as_bytes().starts_with(b"W/") {
                let mut weak = b"W/".to_vec();
                weak.extend_from_slice(etag.as_bytes());
                if let Ok(v) = http::HeaderValue::from_bytes(&weak) {
                    response.insert_header(ETAG, v)?;
                }
            }
        }
        // HEAD and 304 get the same validators and framing as the GET they describe.
        if !no_body {
            *state = Body::Held(BodyBuffer::new(self.max_body));
        }
        Ok(())
    }

    fn response_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
        state: &mut Body,
    ) -> Result<()> {
        let Body::Held(buffer) = state else {
            return Ok(());
        };
        match buffer.push_or_release(body, end_of_stream) {
            Ok(None) => {}
            Ok(Some(whole)) => {
                *state = Body::Untouched;
                match serde_json::from_slice::<Value>(&whole) {
                    Ok(mut value) => {
                        self.transform.apply(&mut value);
                        *body = Some(match serde_json::to_vec(&value) {
                            Ok(out) => Bytes::from(out),
                            Err(_) => whole,
                        });
                    }
                    Err(_) => {
                        self.log_once(&ctx.route, "the body is not valid JSON");
                        *body = Some(whole);
                    }
                }
            }
            Err(held) => {
                // Grew past max_body: release what was held, let the rest through.
                self.log_once(&ctx.route, "larger than max_body");
                *state = Body::Untouched;
                *body = Some(held);
            }
        }
        Ok(())
    }
}

impl JsonTransformConfig {
    /// The transform this config describes, if it is valid.
    pub fn transform(&self) -> Option<Transform> {
        validate(self).ok()
    }
}

impl crate::PluginType for JsonTransformConfig {
    const KIND: &'static str = "json_transform";

    fn validate(&self) -> Vec<BuildError> {
        validate(self).err().unwrap_or_default()
    }

    fn build(&self, _env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let transform = validate(self)?;
        Ok(Erased::into_dyn(JsonTransform {
            transform,
            max_body: usize::try_from(self.max_body.get()).unwrap_or(usize::MAX),
            logged: Mutex::new(HashSet::new()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn transform(remove: &[&str], rename: &[(&str, &str)]) -> Transform {
        let c = JsonTransformConfig {
            remove: remove.iter().map(|s| s.to_string()).collect(),
            rename: rename.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            max_body: ByteSize(1024),
        };
        validate(&c).unwrap()
    }

    #[test]
    fn removes_and_renames_through_nested_arrays_keeping_order() {
        let t = transform(
            &["internal", "items[].cost", "items[].parts[].secret", "[].x"],
            &[("fullName", "name"), ("items[].sku", "id")],
        );
        let mut v = json!({
            "fullName": "Ada", "internal": {"a": 1}, "z": 1,
            "items": [
                {"sku": "1", "cost": 3, "parts": [{"secret": 1, "ok": 2}]},
                {"sku": "2", "cost": 4},
                "not an object"
            ]
        });
        t.apply(&mut v);
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"name":"Ada","z":1,"items":[{"id":"1","parts":[{"ok":2}]},{"id":"2"},"not an object"]}"#
        );
        let mut top = json!([{"x": 1, "y": 2}]);
        t.apply(&mut top);
        assert_eq!(top, json!([{"y": 2}]));
    }

    #[test]
    fn paths_are_checked() {
        for bad in ["", "a..b", "a[0]", "items[]", "[]"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_path("[].a[].b").unwrap(),
            vec![Step::Each, Step::Key("a".into()), Step::Each, Step::Key("b".into())]
        );
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("application/problem+json"));
        assert!(!is_json("text/html"));
    }
}
