//! The Switchyard gateway: holds WebSocket connections, fans out topic
//! messages, lets a reconnecting client resume with nothing lost, and reports
//! its connection counts.
//!
//! Layout, one module per concern:
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
//! - [`security`]: origin check, authentication, sessions, rate limits.
//! - [`tls`]: rustls for both listeners.
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: the binary's entry point.

pub mod broker;
pub mod cli;
pub mod config;
pub mod connection;
pub mod drain;
pub mod gateway;
pub mod head;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod repoll;
pub mod security;
pub mod server;
pub mod tls;
pub mod upgrade;
