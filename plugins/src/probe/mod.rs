//! `probe` (test builds only, feature `testing`): records every hook the gateway calls on it
//! for a request, in order, and reports them to the client in `x-probe-hooks`, so integration
//! tests can prove through real sockets when each hook runs and with what.
//!
//! ```toml
//! [plugins.probe]
//! type = "probe"
//! ```
//! Never compiled into a release build: the gateway's dev-dependency turns the feature on.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use serde::Deserialize;

use crate::{
    Attempt, BuildEnv, BuildError, DynPlugin, Erased, Flow, Plugin, PluginType, RequestCtx,
    Result, UpstreamFailure,
};

/// The response header that lists the hooks seen.
pub const HEADER: &str = "x-probe-hooks";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {}

impl PluginType for ProbeConfig {
    const KIND: &'static str = "probe";

    fn build(&self, _env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Ok(Erased::into_dyn(Probe))
    }
}

pub struct Probe;

fn attempt_str(a: &Attempt) -> String {
    format!("{}#{}@{}", a.upstream, a.number, a.endpoint)
}

#[async_trait]
impl Plugin for Probe {
    /// The hooks seen so far, in order.
    type State = Vec<String>;

    async fn request_filter(
        &self,
        _s: &mut Session,
        _c: &mut RequestCtx,
        seen: &mut Vec<String>,
    ) -> Result<Flow> {
        seen.push("request_filter".into());
        Ok(Flow::Continue)
    }

    async fn upstream_request_filter(
        &self,
        _s: &mut Session,
        _r: &mut RequestHeader,
        _c: &mut RequestCtx,
        seen: &mut Vec<String>,
    ) -> Result<()> {
        seen.push("upstream_request_filter".into());
        Ok(())
    }

    async fn upstream_response(
        &self,
        _s: &mut Session,
        response: &mut ResponseHeader,
        attempt: &Attempt,
        _c: &mut RequestCtx,
        seen: &mut Vec<String>,
    ) -> Result<()> {
        seen.push(format!(
            "upstream_response({},{})",
            response.status.as_u16(),
            attempt_str(attempt)
        ));
        Ok(())
    }

    fn upstream_failure(
        &self,
        attempt: &Attempt,
        failure: UpstreamFailure,
        retrying: bool,
        _c: &mut RequestCtx,
        seen: &mut Vec<String>,
    ) {
        seen.push(format!(
            "upstream_failure({},{},{})",
            failure.as_str(),
            attempt_str(attempt),
            if retrying { "retrying" } else { "final" }
        ));
    }

    async fn response_filter(
        &self,
        _s: &mut Session,
        response: &mut ResponseHeader,
        _c: &mut RequestCtx,
        seen: &mut Vec<String>,
    ) -> Result<()> {
        seen.push("response_filter".into());
        response.insert_header(HEADER, seen.join(" "))
    }
}
