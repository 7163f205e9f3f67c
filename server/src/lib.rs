//! The Switchyard gateway: holds WebSocket connections, fans out topic
//! messages, lets a reconnecting client resume with nothing lost, and reports
//! its connection counts.
//!
//! Layout, one module per concern (in layers that only point down:
//! `tests/layers.rs`). The binary's entry ([`cli`]), the listeners
//! ([`server`]) and the configuration ([`config`]) are the public API;
//! everything else is `pub(crate)`, so the compiler reports dead code.
//! - [`config`]: layered settings with field-named errors.
//! - [`outbox`]: the bounded per-connection queue (the only way to a connection's socket).
//! - [`hub`]: the registry of live connections, keepalive sweeps.
//! - [`broker`]: topic logs, resume, fan-out (in-memory default).
//! - [`connection`]: one connection's reader and writer.
//! - [`drain`]: the drain engine (staggered migration of connections).
//! - [`head`]: the first request head of a connection, read without hyper.
//! - [`upgrade`]: the WebSocket handshake.
//! - [`http`]: the HTTP routes of both listeners (warp).
//! - [`gateway`]: the shared state (config, metrics, hub, broker, security, drain slot).
//! - [`server`]: listeners, accept loops, shutdown.
//! - [`repoll`]: a future polled again at once when it wakes itself (hyper's connections).
//! - [`task`]: tasks aborted with the scope that spawned them.
//! - [`security`]: origin check, authentication, sessions, rate limits.
//! - [`tls`]: rustls for both listeners.
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: the binary's entry point.

pub(crate) mod broker;
pub mod cli;
pub mod config;
pub(crate) mod connection;
pub(crate) mod drain;
pub(crate) mod gateway;
pub(crate) mod head;
pub(crate) mod http;
pub(crate) mod hub;
pub(crate) mod metrics;
pub(crate) mod outbox;
pub(crate) mod repoll;
pub(crate) mod security;
pub mod server;
pub(crate) mod task;
pub(crate) mod tls;
pub(crate) mod upgrade;
