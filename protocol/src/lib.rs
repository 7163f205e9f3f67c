//! Switchyard's wire protocol: what gateways, operators and clients say to
//! each other. No I/O lives here — only types, their JSON shapes and the pure
//! arithmetic that every side must agree on.
//!
//! - [`close`]: application close codes and what a client should do on each.
//! - [`drain`]: the drain schedule (pure arithmetic) and the drain API bodies.
//! - [`frame`]: the JSON text frames of the WebSocket protocol.
//! - [`fuzzing`]: the parser property the fuzz target checks.
//! - [`position`]: where a subscriber stands in a topic log.
//! - [`admin`]: request and response bodies of the admin API.
//! - [`topic`]: topic-name validation and publish allow-list patterns.

pub mod admin;
pub mod close;
pub mod drain;
pub mod frame;
pub mod fuzzing;
pub mod position;
pub mod topic;

pub use close::{CloseClass, CloseCode};
pub use frame::{ClientFrame, ErrorCode, ServerFrame};
pub use position::Position;
