//! The Redis store: one atomic Lua script per decision, on Redis's own clock (so gateways
//! with skewed clocks still share windows), over one multiplexed connection that reconnects
//! by itself. Every call has a deadline; failures are reported, never waited out, and after one
//! Redis is left alone for a short pause (see `FAILURE_PAUSE`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::window::{describe, Decision, Policy};

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

/// After a failure, decisions skip Redis for this long (answered at once by
/// `on_store_error`), so an outage or a slow Redis costs one `redis_timeout` per pause rather
/// than one per request, and a struggling Redis is not hammered; the first request after the
/// pause tries again, so recovery is noticed within it.
const FAILURE_PAUSE: Duration = Duration::from_millis(250);

pub struct RedisStore {
    client: redis::Client,
    timeout: Duration,
    prefix: String,
    script: redis::Script,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Until when decisions skip Redis after a failure.
    paused_until: Mutex<Option<Instant>>,
    /// Whether the last attempt succeeded: failures and recoveries are logged once each, not
    /// once per request.
    healthy: AtomicBool,
}

impl RedisStore {
    /// Checks the URL; connects lazily on the first request (a build may run outside any
    /// runtime, and Redis may be down at start).
    pub fn new(url: &str, timeout: Duration, prefix: &str) -> Result<RedisStore, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid redis_url: {e}"))?;
        Ok(RedisStore {
            client,
            timeout,
            prefix: prefix.to_string(),
            script: redis::Script::new(SCRIPT),
            conn: tokio::sync::Mutex::new(None),
            paused_until: Mutex::new(None),
            healthy: AtomicBool::new(true),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // Requests that queued behind a failed attempt give up at once, rather than each
        // trying (and timing out) in turn.
        if self.paused() {
            return Err("redis unavailable (pausing after a failure)".into());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(100)))
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let conn = tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| "redis connect timed out".to_string())?
        .map_err(|e| format!("redis connect failed: {e}"))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// One decision for `key`; an error means the caller applies `on_store_error`.
    pub async fn hit(&self, policy: &Policy, key: &str) -> Result<Decision, String> {
        if self.paused() {
            return Err("redis unavailable (pausing after a failure)".into());
        }
        match self.try_hit(policy, key).await {
            Ok(d) => {
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    log::info!("quota store {}: Redis answers again", self.prefix);
                }
                Ok(d)
            }
            Err(reason) => {
                *self.paused_until.lock() = Some(Instant::now() + FAILURE_PAUSE);
                if self.healthy.swap(false, Ordering::AcqRel) {
                    log::warn!(
                        "quota store {}: {reason}; applying on_store_error until Redis answers",
                        self.prefix
                    );
                }
                Err(reason)
            }
        }
    }

    fn paused(&self) -> bool {
        self.paused_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }

    async fn try_hit(&self, policy: &Policy, key: &str) -> Result<Decision, String> {
        let mut conn = self.connection().await?;
        let base = format!("{}:{{{}}}", self.prefix, key);
        let mut invocation = self.script.key(base);
        invocation.arg(policy.window_ms.max(1)).arg(policy.ceiling);
        let call = invocation.invoke_async::<(u64, u64, u64, u64)>(&mut conn);
        let (allowed, curr, prev, elapsed) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| "redis did not answer in time".to_string())?
            .map_err(|e| format!("redis error: {e}"))?;
        Ok(describe(policy, allowed == 1, prev, curr, elapsed))
    }
}
