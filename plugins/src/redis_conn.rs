//! The one way to Redis for every Redis-backed store (quota counters, browser sessions, and
//! whatever comes later): a single node (`redis_url`), a Redis Cluster (`redis_cluster`,
//! seed nodes) or the master a set of Sentinels names (`redis_sentinel`).
//!
//! ```toml
//! store = "redis"
//! redis_url = "redis://10.0.0.5:6379"
//! # redis_cluster = ["redis://10.0.0.5:7000", "redis://10.0.0.6:7000"]
//! # redis_sentinel = { master = "sallyport", nodes = ["redis://10.0.0.7:26379"] }
//! ```
//!
//! Every call has a deadline. After a failure of Redis itself (no connection, a timeout, a
//! dropped connection, a read-only former master, a cluster that is down) a store can leave
//! Redis alone for a short pause (the quota store: [`FAILURE_PAUSE`]): calls in it fail at
//! once (the caller applies its `on_store_error`), so an outage costs one timeout per pause
//! rather than one per request, and the first call after the pause tries again, so recovery
//! is noticed within it. An error answer to one command (a script error) fails that call
//! only: no request can switch the store off for others. Failures and recoveries are logged
//! once each.
//!
//! Failover: a single node's connection reconnects by itself; a cluster connection follows
//! `MOVED`/`ASK` and refreshes its slot map when a replica is promoted; a Sentinel
//! connection is dropped on any error, and the next call asks the Sentinels for the master
//! again, so decisions resume on the promoted replica without a restart.
//!
//! Keys of one operation must share a slot in a cluster: stores hash-tag them (`{...}`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use serde::Deserialize;

use crate::BuildError;

/// How long calls skip Redis after a failure.
pub const FAILURE_PAUSE: Duration = Duration::from_millis(250);

/// `redis_sentinel = { master = "...", nodes = [...] }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The master's name in the Sentinels' configuration (`sentinel monitor NAME ...`).
    pub master: String,
    /// The Sentinels: `redis://host:26379` (with `user:password@` when they need it).
    pub nodes: Vec<String>,
    /// Credentials and database of the master itself (the Sentinels' own are in `nodes`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub db: i64,
}

/// Where a store's Redis is.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisTarget {
    Node(String),
    Cluster(Vec<String>),
    Sentinel(SentinelConfig),
}

impl RedisTarget {
    /// The target the three keys name; errors name the key. `Ok(None)` when none is set
    /// (the caller decides whether one was required).
    pub fn from_keys(
        url: Option<&str>,
        cluster: Option<&[String]>,
        sentinel: Option<&SentinelConfig>,
    ) -> Result<Option<RedisTarget>, Vec<BuildError>> {
        let set: Vec<&str> = [
            url.map(|_| "redis_url"),
            cluster.map(|_| "redis_cluster"),
            sentinel.map(|_| "redis_sentinel"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() > 1 {
            return Err(vec![BuildError::new(
                set[1],
                format!("set only one of {}", set.join(", ")),
            )]);
        }
        let mut errors = Vec::new();
        let target = if let Some(url) = url {
            check_url("redis_url", url, &mut errors);
            Some(RedisTarget::Node(url.to_string()))
        } else if let Some(nodes) = cluster {
            if nodes.is_empty() {
                errors.push(BuildError::new("redis_cluster", "name at least one node"));
            }
            for (i, n) in nodes.iter().enumerate() {
                check_url(&format!("redis_cluster[{i}]"), n, &mut errors);
            }
            Some(RedisTarget::Cluster(nodes.to_vec()))
        } else if let Some(s) = sentinel {
            if s.master.trim().is_empty() {
                errors.push(BuildError::new(
                    "redis_sentinel.master",
                    "name the master the Sentinels monitor",
                ));
            }
            if s.nodes.is_empty() {
                errors.push(BuildError::new(
                    "redis_sentinel.nodes",
                    "name at least one Sentinel",
                ));
            }
            for (i, n) in s.nodes.iter().enumerate() {
                check_url(&format!("redis_sentinel.nodes[{i}]"), n, &mut errors);
            }
            Some(RedisTarget::Sentinel(s.clone()))
        } else {
            None
        };
        if errors.is_empty() {
            Ok(target)
        } else {
            Err(errors)
        }
    }
}

/// A `redis://` URL the client accepts (TLS is not built in).
fn check_url(path: &str, url: &str, errors: &mut Vec<BuildError>) {
    if url.starts_with("rediss://") || url.starts_with("valkeys://") {
        errors.push(BuildError::new(
            path,
            "TLS to Redis is not built in; use redis:// (e.g. through a local TLS tunnel)",
        ));
    } else if let Err(e) = redis::Client::open(url) {
        errors.push(BuildError::new(path, format!("invalid: {e}")));
    }
}

/// An error that says Redis (or this connection to it) is unavailable, rather than that one
/// command failed.
fn redis_is_down(e: &redis::RedisError) -> bool {
    use redis::ErrorKind;
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::ReadOnly
                | ErrorKind::ClusterDown
                | ErrorKind::MasterDown
                | ErrorKind::TryAgain
        )
}

/// How connections are made.
enum Dialer {
    Node(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    /// Asking the Sentinels needs `&mut`; calls connect one at a time anyway.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// A live connection, cheap to clone (each is multiplexed).
#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(redis::aio::MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// A store's connection to its Redis: connects lazily (a build may run outside any runtime,
/// and Redis may be down at start), shares one multiplexed connection between calls.
pub struct RedisConnector {
    dialer: Dialer,
    timeout: Duration,
    /// Names the store in log lines (`quota store sallyport:quota:api`).
    label: String,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// Until when calls skip Redis after a failure.
    paused_until: Mutex<Option<Instant>>,
    /// Whether the last call succeeded (failures and recoveries are logged once each).
    healthy: AtomicBool,
    /// How long calls skip Redis after it failed (zero: never skip).
    pause: Duration,
}

impl RedisConnector {
    /// `timeout` bounds each call (and a connect, at least 100 ms); `pause`: how long calls
    /// skip Redis after it failed.
    pub fn new(
        target: &RedisTarget,
        timeout: Duration,
        pause: Duration,
        label: String,
    ) -> Result<RedisConnector, String> {
        let connect = timeout.max(Duration::from_millis(100));
        let dialer = match target {
            RedisTarget::Node(url) => Dialer::Node(
                redis::Client::open(url.as_str()).map_err(|e| format!("invalid redis_url: {e}"))?,
            ),
            RedisTarget::Cluster(nodes) => Dialer::Cluster(
                redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                    .connection_timeout(connect)
                    .response_timeout(timeout)
                    // Redirections (MOVED/ASK) and a slot-map refresh during failover;
                    // the call's deadline bounds them all.
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(|e| format!("invalid redis_cluster: {e}"))?,
            ),
            RedisTarget::Sentinel(s) => {
                let info = SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(redis::RedisConnectionInfo {
                        db: s.db,
                        username: s.username.clone(),
                        password: s.password.clone(),
                        ..Default::default()
                    }),
                };
                Dialer::Sentinel(tokio::sync::Mutex::new(
                    SentinelClient::build(
                        s.nodes.iter().map(String::as_str).collect(),
                        s.master.clone(),
                        Some(info),
                        SentinelServerType::Master,
                    )
                    .map_err(|e| format!("invalid redis_sentinel: {e}"))?,
                ))
            }
        };
        Ok(RedisConnector {
            dialer,
            timeout,
            label,
            conn: tokio::sync::Mutex::new(None),
            paused_until: Mutex::new(None),
            healthy: AtomicBool::new(true),
            pause,
        })
    }

    /// Runs a pipeline; an error means the caller applies its store-error policy.
    pub async fn query<T: redis::FromRedisValue>(&self, p: &redis::Pipeline) -> Result<T, String> {
        let mut conn = self.connection().await?;
        let result = tokio::time::timeout(self.timeout, p.query_async::<T>(&mut conn)).await;
        self.settle(result)
    }

    /// Runs a script (`EVALSHA`, loading it once per node).
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        s: &redis::ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let mut conn = self.connection().await?;
        let result = tokio::time::timeout(self.timeout, s.invoke_async::<T>(&mut conn)).await;
        self.settle(result)
    }

    fn paused(&self) -> bool {
        self.paused_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Records the outcome of a call: a failure pauses the store (and drops a Sentinel
    /// connection, so the next call asks for the master again).
    fn settle<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, String> {
        let failure = match result {
            Ok(Ok(v)) => {
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    log::info!("{}: Redis answers again", self.label);
                }
                return Ok(v);
            }
            Ok(Err(e)) if !redis_is_down(&e) => {
                // Redis answered this command with an error: this call fails, Redis is fine.
                return Err(format!("redis error: {e}"));
            }
            Ok(Err(e)) => format!("redis error: {e}"),
            Err(_) => "redis did not answer in time".to_string(),
        };
        self.failed(&failure);
        Err(failure)
    }

    fn failed(&self, reason: &str) {
        if !self.pause.is_zero() {
            *self.paused_until.lock() = Some(Instant::now() + self.pause);
        }
        if matches!(self.dialer, Dialer::Sentinel(_)) {
            // Not awaited: the next call after the pause takes the lock anyway.
            if let Ok(mut slot) = self.conn.try_lock() {
                *slot = None;
            }
        }
        if self.healthy.swap(false, Ordering::AcqRel) {
            log::warn!(
                "{}: {reason}; applying on_store_error until Redis answers",
                self.label
            );
        }
    }

    async fn connection(&self) -> Result<Conn, String> {
        if self.paused() {
            return Err("redis unavailable (pausing after a failure)".into());
        }
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // Calls that queued behind a failed attempt give up at once, rather than each trying
        // (and timing out) in turn.
        if self.paused() {
            return Err("redis unavailable (pausing after a failure)".into());
        }
        let deadline = self.timeout.max(Duration::from_millis(200));
        let made = tokio::time::timeout(deadline, self.dial()).await;
        let conn = match made {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let reason = format!("redis connect failed: {e}");
                drop(slot);
                self.failed(&reason);
                return Err(reason);
            }
            Err(_) => {
                let reason = "redis connect timed out".to_string();
                drop(slot);
                self.failed(&reason);
                return Err(reason);
            }
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn dial(&self) -> redis::RedisResult<Conn> {
        let connect = self.timeout.max(Duration::from_millis(100));
        match &self.dialer {
            Dialer::Node(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(500);
                ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map(Conn::Node)
            }
            Dialer::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            Dialer::Sentinel(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(self.timeout);
                client
                    .lock()
                    .await
                    .get_async_connection_with_config(&config)
                    .await
                    .map(Conn::Sentinel)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(r: Result<Option<RedisTarget>, Vec<BuildError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.path)
            .collect()
    }

    #[test]
    fn one_target_at_a_time_with_each_url_checked() {
        let cluster = vec!["redis://127.0.0.1:7000".to_string()];
        assert_eq!(
            RedisTarget::from_keys(Some("redis://127.0.0.1:6379"), Some(&cluster), None)
                .err()
                .map(|e| e[0].message.clone()),
            Some("set only one of redis_url, redis_cluster".to_string())
        );
        assert_eq!(
            RedisTarget::from_keys(None, Some(&cluster), None)
                .ok()
                .flatten(),
            Some(RedisTarget::Cluster(cluster.clone()))
        );
        let bad = vec!["redis://127.0.0.1:7000".into(), "rediss://x:1".into()];
        assert_eq!(
            paths(RedisTarget::from_keys(None, Some(&bad), None)),
            ["redis_cluster[1]"]
        );
        let sentinel = SentinelConfig {
            master: String::new(),
            nodes: vec![],
            username: None,
            password: None,
            db: 0,
        };
        assert_eq!(
            paths(RedisTarget::from_keys(None, None, Some(&sentinel))),
            ["redis_sentinel.master", "redis_sentinel.nodes"]
        );
        assert_eq!(RedisTarget::from_keys(None, None, None).ok(), Some(None));
    }
}
