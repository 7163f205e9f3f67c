//! Test support for Switchyard's end-to-end tests, one module per concern
//! (every item is re-exported at the crate root): processes under test,
//! HTTP, raw WebSocket framing, a scripted gateway for the clients, Redis, the Service proxy and blue/green
//! fleet, certificates, a canned HTTPS server, Prometheus text, the Helm chart's
//! render; the Kubernetes emulator (`kube`), a Prometheus configured as the
//! Prometheus Operator configures it (`prometheus`) and an OTLP receiver (`otlp`). docs/testing.md lists the helpers.

pub mod kube;
pub mod otlp;
pub mod prometheus;

mod certs;
mod chart;
mod crowd;
mod fakegw;
mod http;
mod https;
mod metrics;
mod process;
mod proxy;
mod redis;
mod ws;

pub use certs::*;
pub use chart::*;
pub use crowd::*;
pub use fakegw::*;
pub use http::*;
pub use https::*;
pub use metrics::*;
pub use process::*;
pub use proxy::*;
pub use redis::*;
pub use ws::*;
