//! `[plugins.NAME]` with `type = "example_header"`.

use http::HeaderName;
use serde::Deserialize;

use crate::conf::Parsed;

/// Sets one header on every response (or on every request sent upstream).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExampleHeaderConfig {
    /// The header name, e.g. `"x-served-by"`: parsed as the file is read; a name that is
    /// not one is kept with its error, for `validate` to report.
    pub name: Parsed<HeaderName>,
    /// Its value: visible US-ASCII characters, spaces and tabs (RFC 9110 5.5).
    pub value: String,
    /// Where the header goes: `"response"` (to the client, the default) or `"upstream"` (on
    /// the request sent to the route's pool).
    #[serde(default)]
    pub on: Direction,
}

/// `on`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Response,
    Upstream,
}
