//! `authorize`: requires scopes and claim values of the verified principal (put it after an
//! authentication plugin).
//!
//! Phases: `request_filter`. Per-request state: none. Scopes are read from a space-separated
//! `scope` claim or an array (or space-separated string) `scp` / `scopes` claim; every listed
//! scope is required. `claims` requires exact values (or membership, for array claims).
//! No principal: 401. Missing scope or claim: 403 naming what is missing (never the token).
//!
//! ```toml
//! [plugins.orders-read]
//! type = "authorize"
//! scopes = ["orders:read"]
//! claims = { tenant = "acme" }
//! ```
//! Metrics: rejections in `sallyport_plugin_rejections_total` (reasons `unauthenticated`,
//! `insufficient_scope`, `claim_mismatch`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::header::WWW_AUTHENTICATE;
use pingora::proxy::Session;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    ApiError, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Principal, Reply, RequestCtx,
    Result,
};

/// `[plugins.NAME]` with `type = "authorize"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeConfig {
    /// Scopes the principal must all have.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Claims that must have these values.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
}

pub fn validate(c: &AuthorizeConfig) -> Vec<BuildError> {
    let mut errors = Vec::new();
    if c.scopes.is_empty() && c.claims.is_empty() {
        errors.push(BuildError::new(
            "scopes",
            "require at least one scope or claim",
        ));
    }
    for (i, s) in c.scopes.iter().enumerate() {
        if s.is_empty() || s.contains(char::is_whitespace) {
            errors.push(BuildError::new(
                format!("scopes[{i}]"),
                format!("{s:?} is not a scope"),
            ));
        }
    }
    errors
}

/// The claims a scope may be granted in: `scope` (RFC 8693 4.2, space-separated), `scp` and
/// `scopes` (either form).
const SCOPE_CLAIMS: [&str; 3] = ["scope", "scp", "scopes"];

/// The scopes a principal holds, claim by claim, without collecting them.
pub fn held_scopes(p: &Principal) -> impl Iterator<Item = &str> {
    SCOPE_CLAIMS
        .iter()
        .filter_map(|name| p.claims.get(*name))
        .flat_map(|v| {
            let (words, items) = match v {
                Value::String(s) => (Some(s.split_whitespace()), None),
                Value::Array(items) => (None, Some(items.iter().filter_map(Value::as_str))),
                _ => (None, None),
            };
            words.into_iter().flatten().chain(items.into_iter().flatten())
        })
}

/// The scopes a principal holds.
pub fn scopes_of(p: &Principal) -> Vec<&str> {
    held_scopes(p).collect()
}

/// Whether a principal holds `scope`: the check every request makes.
pub fn holds_scope(p: &Principal, scope: &str) -> bool {
    held_scopes(p).any(|held| held == scope)
}

fn claim_matches(v: Option<&Value>, want: &str) -> bool {
    match v {
        Some(Value::String(s)) => s == want,
        Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(want)),
        Some(Value::Number(n)) => n.to_string() == want,
        Some(Value::Bool(b)) => b.to_string() == want,
        _ => false,
    }
}

pub struct Authorize {
    scopes: Vec<String>,
    claims: BTreeMap<String, String>,
}

impl Authorize {
    pub fn build(c: &AuthorizeConfig) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Erased::into_dyn(Authorize {
            scopes: c.scopes.clone(),
            claims: c.claims.clone(),
        }))
    }
}

#[async_trait]
impl Plugin for Authorize {
    type State = ();

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        let Some(p) = &ctx.principal else {
            return Ok(Flow::Respond(Reply::Error(
                ApiError::new(401, "unauthorized", "authentication is required")
                    .with_reason("unauthenticated")
                    .with_header(WWW_AUTHENTICATE, "Bearer"),
            )));
        };
        if !self.scopes.iter().all(|s| holds_scope(p, s)) {
            let missing: Vec<&str> = self
                .scopes
                .iter()
                .map(String::as_str)
                .filter(|s| !holds_scope(p, s))
                .collect();
            return Ok(Flow::Respond(Reply::Error(
                ApiError::new(
                    403,
                    "insufficient_scope",
                    format!("missing scope(s): {}", missing.join(" ")),
                )
                .with_reason("insufficient_scope")
                .with_header(
                    WWW_AUTHENTICATE,
                    format!(
                        "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                        self.scopes.join(" ")
                    ),
                ),
            )));
        }
        let wrong: Vec<&str> = self
            .claims
            .iter()
            .filter(|(k, v)| !claim_matches(p.claims.get(*k), v))
            .map(|(k, _)| k.as_str())
            .collect();
        if !wrong.is_empty() {
            return Ok(Flow::Respond(Reply::Error(
                ApiError::new(
                    403,
                    "forbidden",
                    format!("claim(s) without the required value: {}", wrong.join(", ")),
                )
                .with_reason("claim_mismatch"),
            )));
        }
        Ok(Flow::Continue)
    }
}

impl crate::PluginType for AuthorizeConfig {
    const KIND: &'static str = "authorize";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn build(
        &self,
        _env: &crate::BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Authorize::build(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn scopes_from_every_claim_shape() {
        let mut claims = serde_json::Map::new();
        claims.insert("scope".into(), "a b".into());
        claims.insert("scp".into(), serde_json::json!(["c"]));
        claims.insert("scopes".into(), "d".into());
        let p = Principal {
            subject: None,
            claims: Arc::new(claims),
            verified_by: "jwt",
        };
        assert_eq!(scopes_of(&p), ["a", "b", "c", "d"]);
        for held in ["a", "b", "c", "d"] {
            assert!(holds_scope(&p, held), "{held}");
        }
        for not_held in ["e", "a b", "", "ab"] {
            assert!(!holds_scope(&p, not_held), "{not_held:?}");
        }
        assert!(claim_matches(
            Some(&serde_json::json!(["x", "acme"])),
            "acme"
        ));
        assert!(!claim_matches(None, "acme"));
    }
}
