use serde::Deserialize;

use super::HeaderPattern;
use crate::conf::Parsed;

/// `[plugins.NAME]` with `type = "strip_headers"`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StripHeadersConfig {
    /// Removed from the client's request before any later plugin or the upstream sees it.
    #[serde(default)]
    pub request: Vec<Parsed<HeaderPattern>>,
    /// Removed from every response before the client sees it.
    #[serde(default)]
    pub response: Vec<Parsed<HeaderPattern>>,
}
