//! Client connections below Pingora's HTTP/1 parser: a cap on open connections, and
//! deadlines that idle and slow clients cannot stretch.
//!
//! Pingora bounds each *read* of a client (60 s) but not a whole request head or body, so a
//! client sending one byte now and then holds a connection, its buffers and (while its body
//! trickles) an upstream connection for as long as it likes. Every accepted stream is wrapped
//! in a [`Guarded`] adapter whose reads fail once the phase the connection is in overruns:
//!
//! | phase | deadline | on expiry |
//! |---|---|---|
//! | waiting for the first request head | accept + `header_timeout` | `408`, close |
//! | reading a head (first byte seen) | first byte + `header_timeout` | `408`, close |
//! | reading a body | head + `body_timeout` + received / `body_min_rate` | `408` (JSON, logged), close |
//! | idle between keep-alive requests | last response + `idle_timeout` | close silently |
//! | waiting for or sending the response | none (the upstream's timeouts apply) | — |
//!
//! A deadline bounds the time the gateway *waits* for the client: it is looked at when a
//! read would wait (and a timer is armed for it then). Bytes already received are taken, so
//! a client is not blamed for time the gateway itself spent elsewhere (an upstream slow to
//! take a body); a trickling client still meets it at every drained socket.
//!
//! The gateway's request hooks move a connection between phases through [`ConnState`], which
//! they reach through the session's stream ([`ConnState::of`]): Pingora hands the HTTP/1
//! session the very stream [`Guard`] wrapped. (HTTP/2 streams have no stream of their own and
//! see no state: the head and body phases are then HTTP/2's concern.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The answer to a request head that did not arrive in time (RFC 9110 15.5.9).
const REQUEST_TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
content-length: 90\r\nconnection: close\r\n\r\n\
{\"error\":{\"status\":408,\"code\":\"request_timeout\",\"message\":\"the request head was too slow\"}}";

/// `server.max_connections` and the client deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// Bytes per second that extend the body deadline; 0: the deadline is fixed.
    pub body_min_rate: u64,
    pub idle_timeout: Duration,
    /// After the listeners close (shutdown, upgrade), how long Pingora's cleanup waits: it
    /// drops every connection whose request head was not read yet, so one accepted at the
    /// last moment gets this long to deliver it and be served.
    pub drain_grace: Duration,
}

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// No byte of the next head yet; `fresh` for the first request of the connection.
    AwaitHead { since: Instant, fresh: bool },
    /// Part of a head has arrived.
    Head { since: Instant },
    /// The head is parsed and a body is being received.
    Body { since: Instant, received: u64 },
    /// The request is complete or its response started: no client deadline.
    Response,
}

/// Which deadline a connection overran, for metrics and the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrun {
    Header,
    Body,
    Idle,
}

impl Overrun {
    pub fn as_str(self) -> &'static str {
        match self {
            Overrun::Header => "header",
            Overrun::Body => "body",
            Overrun::Idle => "idle",
        }
    }
}

/// The phase of one connection, shared by its stream adapter and its requests.
#[derive(Debug)]
pub struct ConnState {
    phase: Mutex<Phase>,
    overrun: Mutex<Option<Overrun>>,
}

impl ConnState {
    fn new(now: Instant) -> Self {
        ConnState {
            phase: Mutex::new(Phase::AwaitHead {
                since: now,
                fresh: true,
            }),
            overrun: Mutex::new(None),
        }
    }

    /// The state of the HTTP/1 connection whose stream this is, if it is guarded. (Found
    /// through the stream rather than a task-local: a task-local scope costs a thread-local
    /// swap on every poll of the connection's task.)
    pub fn of(stream: Option<&Stream>) -> Option<Arc<ConnState>> {
        stream?
            .as_any()
            .downcast_ref::<Guarded>()
            .map(|g| Arc::clone(&g.state))
    }

    /// The head was parsed: a body follows (`has_body`) or the request is complete.
    pub fn head_done(&self, has_body: bool) {
        *self.phase.lock() = if has_body {
            Phase::Body {
                since: Instant::now(),
                received: 0,
            }
        } else {
            Phase::Response
        };
    }

    /// The whole body arrived.
    pub fn body_done(&self) {
        let mut phase = self.phase.lock();
        if matches!(*phase, Phase::Body { .. }) {
            *phase = Phase::Response;
        }
    }

    /// The response was sent: the connection waits for its next request.
    pub fn request_done(&self) {
        *self.phase.lock() = Phase::AwaitHead {
            since: Instant::now(),
            fresh: false,
        };
    }

    /// The deadline this connection overran, if any.
    pub fn overrun(&self) -> Option<Overrun> {
        *self.overrun.lock()
    }
}

/// Connection metrics.
#[derive(Clone)]
pub struct ConnMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
    /// Closed at accept by `server.deny_connections`.
    pub denied: IntCounter,
    pub timeouts: IntCounterVec,
}

/// Wraps the proxy app: admits connections up to `max_connections`, guards each one, and
/// delays the app's cleanup by `drain_grace` after the listeners closed.
pub struct Guard<A> {
    inner: Arc<A>,
    limits: Limits,
    open: Arc<AtomicUsize>,
    metrics: ConnMetrics,
}

impl<A> Guard<A> {
    pub fn new(inner: A, limits: Limits, metrics: ConnMetrics) -> Self {
        Guard {
            inner: Arc::new(inner),
            limits,
            open: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A stream Pingora hands back for reuse is already guarded.
        if stream.as_any().is::<Guarded>() {
            return self.inner.process_new(stream, shutdown).await;
        }
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limits.max_connections).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            // Closing right away costs a file descriptor for microseconds; the client sees a
            // reset and retries elsewhere or later.
            self.metrics.refused.inc();
            return None;
        }
        self.metrics.open.inc();
        let guarded = Guarded {
            inner: stream,
            state: Arc::new(ConnState::new(Instant::now())),
            limits: self.limits,
            timer: None,
            _slot: Slot {
                open: Arc::clone(&self.open),
                gauge: self.metrics.open.clone(),
            },
            timeouts: self.metrics.timeouts.clone(),
            wrote_408: false,
        };
        self.inner.process_new(Box::new(guarded), shutdown).await
    }

    async fn cleanup(&self) {
        tokio::time::sleep(self.limits.drain_grace).await;
        self.inner.cleanup().await;
    }
}

/// One admitted connection's place under `max_connections`, given back on drop.
#[derive(Debug)]
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// A client stream whose reads obey the deadline of the connection's phase.
pub struct Guarded {
    inner: Stream,
    state: Arc<ConnState>,
    limits: Limits,
    /// The connection's one timer, allocated at the first pending read and re-armed (not
    /// reallocated) when the deadline moves: `(deadline it is armed for, timer)`.
    timer: Option<(Instant, Pin<Box<Sleep>>)>,
    _slot: Slot,
    timeouts: IntCounterVec,
    wrote_408: bool,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("state", &self.state)
            .finish()
    }
}

impl Guarded {
    /// The deadline of the current phase and what overrunning it means.
    fn deadline(&self) -> Option<(Instant, Overrun)> {
        let l = &self.limits;
        match *self.state.phase.lock() {
            Phase::AwaitHead { since, fresh: true } => {
                Some((since + l.header_timeout, Overrun::Header))
            }
            Phase::AwaitHead {
                since,
                fresh: false,
            } => Some((since + l.idle_timeout, Overrun::Idle)),
            Phase::Head { since } => Some((since + l.header_timeout, Overrun::Header)),
            Phase::Body { since, received } => {
                let allowance = match l.body_min_rate {
                    0 => Duration::ZERO,
                    rate => Duration::from_secs_f64(received as f64 / rate as f64),
                };
                Some((since + l.body_timeout + allowance, Overrun::Body))
            }
            Phase::Response => None,
        }
    }

    /// Records bytes read in the current phase.
    fn saw_bytes(&self, n: usize) {
        let mut phase = self.state.phase.lock();
        match &mut *phase {
            Phase::AwaitHead { .. } => {
                *phase = Phase::Head {
                    since: Instant::now(),
                }
            }
            Phase::Body { received, .. } => *received += n as u64,
            Phase::Head { .. } | Phase::Response => {}
        }
    }

    /// The deadline passed: answer what is owed and fail (or end) the read.
    fn overran(&mut self, cx: &mut Context<'_>, what: Overrun) -> Poll<std::io::Result<()>> {
        *self.state.overrun.lock() = Some(what);
        self.timeouts.with_label_values(&[what.as_str()]).inc();
        match what {
            // Nothing was asked: closing an idle keep-alive connection needs no answer
            // (RFC 9112 9.5); an end of stream is what Pingora expects then.
            Overrun::Idle => Poll::Ready(Ok(())),
            // No request reached the gateway yet, so no hook can answer: the adapter does.
            Overrun::Header => {
                if !self.wrote_408 {
                    self.wrote_408 = true;
                    // A 200-byte answer fits an empty socket buffer; if it does not, the
                    // client is not reading either and gets a closed connection.
                    let _ = Pin::new(&mut self.inner).poll_write(cx, REQUEST_TIMEOUT_408);
                    let _ = Pin::new(&mut self.inner).poll_flush(cx);
                }
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "request head not received within server.header_timeout",
                )))
            }
            // The request is known: the gateway answers 408 in fail_to_proxy.
            Overrun::Body => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request body not received within server.body_timeout",
            ))),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        // Bytes that are there are taken whatever the clock says; the deadline is looked at
        // (and the timer armed) only when the read would wait. A client that trickles bytes
        // still meets it: every drained socket is a read that would wait.
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.saw_bytes(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((deadline, what)) = this.deadline() else {
                    return Poll::Pending;
                };
                if Instant::now() >= deadline {
                    return this.overran(cx, what);
                }
                let timer = match &mut this.timer {
                    Some((at, sleep)) => {
                        if *at != deadline {
                            sleep.as_mut().reset(deadline);
                            *at = deadline;
                        }
                        sleep
                    }
                    slot => {
                        &mut slot
                            .insert((deadline, Box::pin(tokio::time::sleep_until(deadline))))
                            .1
                    }
                };
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => this.overran(cx, what),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // A response is under way: the client owes nothing until it ends.
        {
            let mut phase = self.state.phase.lock();
            if !matches!(*phase, Phase::Response | Phase::Body { .. }) {
                *phase = Phase::Response;
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// The rest forwards to the wrapped stream.

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest)
    }
}

#[async_trait]
/// Pingora peeks for the HTTP/2 preface (`server.h2c`) before any read: the phase's
/// deadline bounds that wait too, so a silent client cannot hold its slot there.
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let Some((at, what)) = self.deadline() else {
            return self.inner.try_peek(buf).await;
        };
        match tokio::time::timeout_at(at, self.inner.try_peek(buf)).await {
            Ok(peeked) => peeked,
            Err(_) => {
                *self.state.overrun.lock() = Some(what);
                self.timeouts.with_label_values(&[what.as_str()]).inc();
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "nothing received within the client deadline",
                ))
            }
        }
    }
}

/// `server.deny_connections`: Pingora's connection filter, asked for every accepted TCP
/// connection before TLS or HTTP. Reads the running snapshot, so a reload changes the list.
pub struct DenyConnections {
    pub shared: Arc<crate::Shared>,
}

impl std::fmt::Debug for DenyConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DenyConnections")
    }
}

#[async_trait::async_trait]
impl pingora::listeners::ConnectionFilter for DenyConnections {
    async fn should_accept(&self, addr: Option<&std::net::SocketAddr>) -> bool {
        let Some(ip) = addr.map(|a| a.ip().to_canonical()) else {
            return true;
        };
        let snapshot = self.shared.snapshot.load();
        if snapshot.deny_connections.iter().any(|n| n.contains(&ip)) {
            self.shared.metrics.connections.denied.inc();
            return false;
        }
        true
    }
}
