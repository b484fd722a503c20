//! Integration tests: the real `sallyport` binary, real upstreams, real clients, all on
//! loopback. One test binary with a module per area, so `support` and the dependencies are
//! compiled and linked once instead of once per file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod access_log;
mod aggregate;
mod auth;
mod cache;
mod clients;
mod discovery;
mod fleet;
mod grpc;
mod h2_frames;
mod headers;
mod http2;
mod identity;
mod operations;
mod quota;
mod quota_redis;
mod resilience;
mod routing;
mod session;
mod telemetry;
mod tls;
mod traffic;
mod upstreams;
mod websocket;
