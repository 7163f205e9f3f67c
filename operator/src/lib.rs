//! Switchyard's operator: the `ConnectionService` custom resource and
//! blue-green rollouts gated on the gateways' own connection counts.
//!
//! - [`crd`]: the resource's types; [`resources`]: the objects it owns, as data.
//! - [`rollout`]: the state machine, a pure function from observation to plan.
//! - [`reconcile`]: the thin I/O layer that observes, applies plans and
//!   writes status; [`gateway`]: the gateways' admin API.
//! - [`leader`], [`metrics`], [`serve`], [`telemetry`]: running it.
//! - [`plugin`]: the `kubectl switchyard` plugin; [`render`]: the objects a
//!   resource would get, without a cluster.

pub mod cli;
pub mod crd;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod plugin;
pub mod reconcile;
pub mod render;
pub mod resources;
pub mod rollout;
pub mod serve;
pub mod telemetry;
