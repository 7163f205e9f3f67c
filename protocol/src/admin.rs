//! Bodies of the admin API (`/admin/*`, `/api/*` on the admin listener).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::drain::DrainStatus;
use crate::Position;

/// `GET /admin/status`: what one gateway process holds right now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The gateway's id (the pod name in Kubernetes).
    pub server_id: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Topic subscriptions across all connections.
    pub subscriptions: u64,
    /// Topic logs held by this process's broker.
    pub topics: u64,
    /// Whether the gateway is draining (not ready for new connections).
    pub draining: bool,
    /// Seconds since the process started.
    pub uptime_seconds: u64,
    /// The current or last drain, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
    /// Admission control on the public listener (absent from gateways
    /// older than it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<AdmissionStatus>,
}

/// Admission control in `GET /admin/status`: the bounds on new connections
/// and how far a storm of them is over them now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionStatus {
    /// Connections between their TCP accept and the answer to their first request.
    pub handshakes_in_flight: u64,
    /// `websocket.max_handshakes_in_flight` (0: unbounded).
    pub max_handshakes_in_flight: u64,
    /// `websocket.handshake_rate`: connections accepted per second (0: unbounded).
    pub handshake_rate: u64,
    /// `websocket.handshake_burst`.
    pub handshake_burst: u64,
    /// Connections shed since the process started.
    pub shed_total: u64,
    /// The window a connection shed now is told to come back in (ms).
    pub retry_window_ms: u64,
}

/// `POST /api/publish` request.
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The topic to publish on.
    pub topic: String,
    /// Any JSON value; delivered to subscribers byte for byte.
    pub data: Box<RawValue>,
}

/// `POST /api/publish` response: where the message landed in the topic log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    /// The topic published on.
    pub topic: String,
    /// The position the broker assigned.
    pub position: Position,
}

/// The body of every admin API error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable error kind.
    pub error: String,
    /// A human-readable explanation.
    pub message: String,
}

/// `POST /api/tickets` request: the application backend asks for a
/// single-use ticket for a user it has authenticated, to be passed as
/// `?ticket=` on the WebSocket URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    /// The subject (user id) the ticket is bound to.
    pub sub: String,
    /// Topic patterns the session may subscribe to; absent: the gateway's
    /// `auth.default_subscribe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    /// Topic patterns the session may publish on; absent: the gateway's
    /// `topics.client_publish`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Unix time (seconds) at which the session opened with the ticket
    /// expires and is closed with 4001; absent: now + `auth.tickets.session_ttl_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

/// `POST /api/tickets` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketResponse {
    /// The ticket: opaque, single use.
    pub ticket: String,
    /// Milliseconds within which it must be redeemed.
    pub expires_in_ms: u64,
}

/// `POST /admin/revoke` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// The subject whose sessions end.
    pub sub: String,
}

/// `POST /admin/revoke` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The subject revoked.
    pub sub: String,
    /// Connections of that subject closed with 4503 on this gateway.
    pub closed: u64,
}
