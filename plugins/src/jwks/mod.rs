//! `jwks`: answers with the gateway's JWKS (RFC 7517), the public keys of every running
//! `identity_token` plugin in `sign` mode, on a public route, so services outside the admin
//! network can fetch them. The same document is at the admin listener's
//! `GET /.well-known/jwks.json`.
//!
//! ```toml
//! [plugins.jwks]
//! type = "jwks"
//!
//! [[routes]]
//! name = "jwks"
//! path = "/.well-known/jwks.json"
//! methods = ["GET"]
//! plugins = ["jwks"]
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde::Deserialize;

use crate::keys::KeyRegistry;
use crate::{BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Reply, RequestCtx, Result};

/// `[plugins.NAME]` with `type = "jwks"`: no settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {}

/// The built `jwks` plugin.
pub struct Jwks {
    registry: Arc<KeyRegistry>,
}

#[async_trait]
impl Plugin for Jwks {
    type State = ();

    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        _state: &mut (),
    ) -> Result<Flow> {
        let body = self.registry.jwks().to_string();
        let mut header = ResponseHeader::build(200, Some(3))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/jwk-set+json")?;
        // Keys rotate by adding one first: a few minutes of caching is safe.
        header.insert_header(http::header::CACHE_CONTROL, "public, max-age=300")?;
        Ok(Flow::Respond(Reply::Full {
            header: Box::new(header),
            body: bytes::Bytes::from(body),
        }))
    }
}

impl crate::PluginType for JwksConfig {
    const KIND: &'static str = "jwks";
    const RESPONDS: bool = true;

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Ok(Erased::into_dyn(Jwks {
            registry: Arc::clone(&env.public_keys),
        }))
    }
}
