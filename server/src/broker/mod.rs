//! Topic brokers: where messages get their positions, where history lives and
//! how messages reach this process's subscribers.
//!
//! The contract every broker keeps:
//! - `publish` assigns the next offset of the topic's current epoch and hands
//!   the message, encoded once, to every local subscriber's outbox in offset order.
//! - `subscribe` pushes a `subscribed` frame and then the replay (if `since`
//!   allows one) into the subscriber's outbox and registers it for live
//!   messages, atomically with respect to publishes on that topic: no gap and
//!   no duplicate between replay and live.
//!
//! [`memory::MemoryBroker`] is the embedded default (one process);
//! [`backplane::RedisBroker`] shares topic logs across gateways through Redis.

pub mod backplane;
pub mod log;
pub mod memory;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use switchyard_protocol::{ErrorCode, Position};
use thiserror::Error;

use crate::outbox::Outbox;

/// Why a broker refused a request.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BrokerError {
    /// Creating the topic would exceed the topic limit.
    #[error("the gateway holds its maximum of {0} topics")]
    TooManyTopics(usize),
    /// The broker's backing store cannot be reached; the request was not
    /// carried out (a retry is safe).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A publish was sent to the backing store and its answer did not come
    /// back: it may or may not have been applied (a retry may publish the
    /// message twice, at two offsets).
    #[error("publish outcome unknown: {0}")]
    OutcomeUnknown(String),
}

impl BrokerError {
    /// Every [`BrokerError::reason`].
    pub const REASONS: [&'static str; 3] = ["unavailable", "outcome_unknown", "too_many_topics"];

    /// A short name (the `reason` label of `switchyard_publishes_failed_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            BrokerError::TooManyTopics(_) => "too_many_topics",
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::OutcomeUnknown(_) => "outcome_unknown",
        }
    }

    /// The error code reported to a WebSocket client.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::TooManyTopics(_) => ErrorCode::TooManyTopics,
            BrokerError::Unavailable(_) | BrokerError::OutcomeUnknown(_) => ErrorCode::Unavailable,
        }
    }
}

/// The result of a subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscribed {
    /// The head of the log when the subscription began.
    pub position: Position,
    /// Whether the stream continues from `since` without a gap.
    pub recovered: bool,
    /// Messages replayed from history.
    pub replayed: usize,
}

/// A subscriber as the broker sees it: an id and the outbox its frames go
/// to (the hub's connection handle is one; the broker needs nothing else
/// of a connection).
pub trait Subscriber: Send + Sync + 'static {
    /// Unique within this process.
    fn id(&self) -> u64;
    /// Where its frames go.
    fn outbox(&self) -> &Outbox;
}

/// A topic broker; see the module documentation for the contract.
pub trait Broker: Send + Sync + 'static {
    /// Appends `data` to `topic` and fans it out; returns its position.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<Position, BrokerError>>;

    /// Subscribes `subscriber` to `topic`, resuming after `since` when possible.
    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        since: Option<Position>,
        subscriber: Arc<dyn Subscriber>,
    ) -> BoxFuture<'a, Result<Subscribed, BrokerError>>;

    /// Stops delivering `topic` to the connection `conn_id`.
    fn unsubscribe(&self, topic: &str, conn_id: u64);

    /// Topic logs currently held (for a shared backplane: topics this
    /// process has local subscribers on).
    fn topic_count(&self) -> usize;

    /// Whether the broker can serve requests; the error says why not.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}
