//! The Redis store: one atomic Lua script per decision, on Redis's own clock (so gateways
//! with skewed clocks still share windows), through the shared [`RedisConnector`] (a node, a
//! cluster or a Sentinel-watched master; deadlines, a pause after a failure, failover).

use std::time::Duration;

use super::window::{describe, Decision, Policy};
use crate::redis_conn::{RedisConnector, RedisTarget};

/// Counts a request in the current window when the sliding estimate allows it. Keys:
/// `KEYS[1]` is the key's base (with a `{hash tag}` so a cluster keeps both windows on one
/// slot); ARGV: window ms, ceiling. Returns `{allowed, curr, prev, elapsed_ms}`.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local ceiling = tonumber(ARGV[2])
local id = math.floor(now / window)
local elapsed = now - id * window
local ck = KEYS[1] .. ':' .. id
local curr = tonumber(redis.call('GET', ck) or '0')
local prev = tonumber(redis.call('GET', KEYS[1] .. ':' .. (id - 1)) or '0')
local allowed = 0
-- Thousandths of a request, floored: the same integer arithmetic as window.rs.
local weighted = math.floor(prev * (window - elapsed) * 1000 / window)
if weighted + curr * 1000 + 1000 <= ceiling * 1000 then
  curr = redis.call('INCR', ck)
  if curr == 1 then redis.call('PEXPIRE', ck, window * 2 + 1000) end
  allowed = 1
end
return {allowed, curr, prev, elapsed}
";

pub struct RedisStore {
    redis: RedisConnector,
    prefix: String,
    script: redis::Script,
}

impl RedisStore {
    /// Checks the target; connects lazily on the first request.
    pub fn new(target: &RedisTarget, timeout: Duration, prefix: &str) -> Result<RedisStore, String> {
        Ok(RedisStore {
            redis: RedisConnector::new(
                target,
                timeout,
                crate::redis_conn::FAILURE_PAUSE,
                format!("quota store {prefix}"),
            )?,
            prefix: prefix.to_string(),
            script: redis::Script::new(SCRIPT),
        })
    }

    /// One decision for `key`; an error means the caller applies `on_store_error`.
    pub async fn hit(&self, policy: &Policy, key: &str) -> Result<Decision, String> {
        // The key's own hash tag: one decision touches one slot of a cluster. Braces in the
        // key (from a header or a claim) are escaped, or `}x` would end the tag early and
        // spread one decision over several slots.
        let base = format!("{}:{{{}}}", self.prefix, escape_braces(key));
        let mut invocation = self.script.key(base);
        invocation.arg(policy.window_ms.max(1)).arg(policy.ceiling);
        let (allowed, curr, prev, elapsed) = self
            .redis
            .script::<(u64, u64, u64, u64)>(&invocation)
            .await?;
        Ok(describe(policy, allowed == 1, prev, curr, elapsed))
    }
}

/// `{`, `}` and `%` percent-encoded: the key stays readable and one-to-one.
fn escape_braces(key: &str) -> std::borrow::Cow<'_, str> {
    if !key.contains(['{', '}', '%']) {
        return std::borrow::Cow::Borrowed(key);
    }
    let mut out = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn braces_in_keys_cannot_end_the_hash_tag() {
        assert_eq!(super::escape_braces("alice"), "alice");
        assert_eq!(super::escape_braces("}x{"), "%7Dx%7B");
        assert_eq!(super::escape_braces("%7D"), "%257D", "one-to-one");
    }
}
