use serde::Deserialize;

/// `[plugins.NAME]` with `type = "trace"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TraceConfig {
    /// Continue a valid incoming `traceparent` (keep its trace-id). `false` starts a new trace
    /// for every request, for edges that do not trust their clients' trace ids.
    #[serde(default = "default_true")]
    pub trust_incoming: bool,
    /// The sampled flag of traces the gateway starts itself.
    #[serde(default = "default_true")]
    pub sample_new: bool,
    /// Echo `x-request-id` and the gateway's `traceparent` on every response.
    #[serde(default = "default_true")]
    pub echo: bool,
}

fn default_true() -> bool {
    true
}
