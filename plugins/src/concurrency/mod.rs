//! `concurrency`: a bulkhead. At most `limit` requests are in flight through one instance
//! (attach it to one route, or to every route of a slow upstream to share the bulkhead), so a
//! slow upstream cannot take every worker and connection of the gateway. Over the limit a
//! request may wait in a short queue (`queue`, `queue_timeout`), else it gets 503 with
//! `Retry-After`.
//!
//! Phases: `request_filter` (take a slot or answer 503), `logging` (give the slot back; it
//! always runs, also after errors). Per-request state: the slot.
//!
//! ```toml
//! [plugins.orders-bulkhead]
//! type = "concurrency"
//! limit = 64
//! queue = 16
//! queue_timeout = "100ms"
//! ```
//! Metrics: rejections in `sallyport_plugin_rejections_total` (reason `concurrency_limit`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::header::RETRY_AFTER;
use pingora::proxy::Session;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conf::HumanDuration;
use crate::{
    ApiError, BuildError, DynPlugin, Erased, Flow, Hooks, Plugin, Reply, RequestCtx, Result,
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
}

impl Concurrency {
    pub fn build(
        c: &ConcurrencyConfig,
    ) -> std::result::Result<Arc<dyn DynPlugin>, Vec<BuildError>> {
        let errors = validate(c);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Erased::into_dyn(
            Concurrency {
                slots: Arc::new(Semaphore::new(c.limit)),
                limit: c.limit,
                queue: c.queue,
                waiting: AtomicUsize::new(0),
                queue_timeout: c.queue_timeout.get(),
            },
            Hooks {
                request_filter: true,
                logging: true,
                ..Hooks::default()
            },
        ))
    }

    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
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
    type State = Option<OwnedSemaphorePermit>;

    async fn request_filter(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
        state: &mut Option<OwnedSemaphorePermit>,
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
        state: &mut Option<OwnedSemaphorePermit>,
    ) {
        // Give the slot back as soon as the response is done.
        state.take();
    }
}
