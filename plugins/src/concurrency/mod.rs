//! `concurrency`: a bulkhead. At most `limit` requests are in flight through one instance
//! (attach it to one route, or to every route of a slow upstream to share the bulkhead), so a
//! slow upstream cannot take every worker and connection of the gateway. Over the limit a
//! request may wait in a short queue (`queue`, `queue_timeout`), else it gets 503 with
//! `Retry-After`.
//!
//! Phases: `request_filter` (take a slot or answer 503), `logging` (give the slot back; it
//! always runs, also after errors; dropping the state gives it back too). Per-request state:
//! the slot. A reload that leaves the plugin's config unchanged keeps the same instance, so
//! requests in flight across a SIGHUP still count.
//!
//! ```toml
//! [plugins.orders-bulkhead]
//! type = "concurrency"
//! limit = 64
//! queue = 16
//! queue_timeout = "100ms"
//! ```
//! Metrics: `sallyport_concurrency_in_flight{plugin}` (slots in use), rejections in
//! `sallyport_plugin_rejections_total` (reason `concurrency_limit`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::header::RETRY_AFTER;
use pingora::proxy::Session;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conf::HumanDuration;
use prometheus::IntGauge;

use crate::{
    ApiError, BuildEnv, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Reply, RequestCtx,
    Result,
};

/// `[plugins.NAME]` with `type = "concurrency"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// Requests in flight at once through this instance.
    pub limit: usize,
    /// Requests that may wait for a slot when all are taken (0: none wait).
    #[serde(default)]
    pub queue: usize,
    /// How long a queued request waits for a slot before it gets 503.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: HumanDuration,
}

fn default_queue_timeout() -> HumanDuration {
    HumanDuration::from_millis(100)
}

pub fn validate(c: &ConcurrencyConfig) -> Vec<BuildError> {
    let mut errors = Vec::new();
    if c.limit == 0 {
        errors.push(BuildError::new("limit", "must be at least 1"));
    }
    if c.limit > Semaphore::MAX_PERMITS {
        errors.push(BuildError::new("limit", "is too large"));
    }
    if c.queue > 0 && c.queue_timeout.get().is_zero() {
        errors.push(BuildError::new(
            "queue_timeout",
            "must be greater than 0 with a queue",
        ));
    }
    errors
}

/// The built `concurrency` plugin.
pub struct Concurrency {
    slots: Arc<Semaphore>,
    limit: usize,
    queue: usize,
    waiting: AtomicUsize,
    queue_timeout: std::time::Duration,
    in_flight: IntGauge,
}

/// A slot held by one request; dropping it gives the slot back.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Concurrency {
    pub fn build(
        c: &ConcurrencyConfig,
        env: &BuildEnv,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Erased::into_dyn(Concurrency {
            slots: Arc::new(Semaphore::new(c.limit)),
            limit: c.limit,
            queue: c.queue,
            waiting: AtomicUsize::new(0),
            queue_timeout: c.queue_timeout.get(),
            in_flight: env
                .metrics
                .concurrency_in_flight
                .with_label_values(&[&*env.name]),
        }))
    }

    async fn acquire(&self) -> Option<Slot> {
        let permit = self.permit().await?;
        self.in_flight.inc();
        Some(Slot {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        })
    }

    async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(p);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let got =
            tokio::time::timeout(self.queue_timeout, Arc::clone(&self.slots).acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        got.ok().and_then(|r| r.ok())
    }
}

#[async_trait]
impl Plugin for Concurrency {
    type State = Option<Slot>;

    /// The hooks this plugin runs in; the gateway skips the others without a call.
    fn hooks(&self) -> Hooks {
        Hooks {
            request_filter: true,
            logging: true,
            ..Hooks::NONE
        }
    }

    async fn request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        state: &mut Option<Slot>,
    ) -> Result<Flow> {
        match self.acquire().await {
            Some(permit) => {
                *state = Some(permit);
                Ok(Flow::Continue)
            }
            None => Ok(Flow::Respond(Reply::Error(
                ApiError::new(
                    503,
                    "overloaded",
                    format!(
                        "more than {} requests in flight here; try again shortly",
                        self.limit
                    ),
                )
                .with_reason("concurrency_limit")
                .with_header(RETRY_AFTER, "1"),
            ))),
        }
    }

    async fn logging(
        &self,
        _session: &mut Session,
        _error: Option<&pingora::Error>,
        _ctx: &mut RequestCtx,
        state: &mut Option<Slot>,
    ) {
        // Give the slot back as soon as the response is done.
        state.take();
    }
}

impl crate::PluginType for ConcurrencyConfig {
    const KIND: &'static str = "concurrency";

    fn validate(&self) -> Vec<BuildError> {
        validate(self)
    }

    fn keeps_state_across_reloads(&self) -> bool {
        true
    }

    fn build(&self, env: &BuildEnv) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        Concurrency::build(self, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bulkhead(limit: usize, queue: usize, queue_timeout: Duration) -> Arc<Concurrency> {
        Arc::new(Concurrency {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            queue,
            waiting: AtomicUsize::new(0),
            queue_timeout,
            in_flight: IntGauge::new("in_flight", "test").unwrap(),
        })
    }

    #[tokio::test]
    async fn slots_are_taken_and_given_back() {
        let b = bulkhead(2, 0, Duration::from_secs(1));
        let first = b.acquire().await.unwrap();
        let second = b.acquire().await.unwrap();
        assert_eq!(b.in_flight.get(), 2);
        assert!(b.acquire().await.is_none(), "no queue: refused at once");
        drop(first);
        assert_eq!(b.in_flight.get(), 1);
        let third = b.acquire().await.unwrap();
        drop((second, third));
        assert_eq!(b.in_flight.get(), 0);
    }

    #[tokio::test]
    async fn a_queued_request_gets_the_next_free_slot() {
        let b = bulkhead(1, 1, Duration::from_secs(30));
        let held = b.acquire().await.unwrap();
        let waiter = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.acquire().await.is_some() }
        });
        while b.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(b.acquire().await.is_none(), "the queue of one is full");
        drop(held);
        assert!(waiter.await.unwrap(), "the queued request got the slot");
    }

    #[tokio::test]
    async fn a_queued_request_gives_up_after_queue_timeout() {
        let b = bulkhead(1, 4, Duration::from_millis(20));
        let _held = b.acquire().await.unwrap();
        assert!(b.acquire().await.is_none());
        assert_eq!(b.waiting.load(Ordering::Acquire), 0, "left the queue");
        assert_eq!(b.in_flight.get(), 1);
    }
}
