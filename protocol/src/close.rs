//! Close codes. Browsers cannot read the HTTP status of a failed upgrade, so
//! the gateway accepts and then closes with an application code. The ranges
//! follow the convention real-time SDKs already act on: 4000–4499 means
//! "reconnect", 4500–4999 means "do not reconnect by yourself".

use serde::{Deserialize, Serialize};

/// 1005 (RFC 6455 §7.4.1): what a close frame without a status code is
/// reported as. Never sent on the wire.
pub const NO_STATUS_RECEIVED: u16 = 1005;

/// 1006 (RFC 6455 §7.4.1): what a connection that ended without a close
/// frame is reported as. Never sent on the wire.
pub const ABNORMAL_CLOSURE: u16 = 1006;

/// A WebSocket close code the gateway sends, with its meaning for clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1001: the endpoint is going away (server shutdown without drain).
    GoingAway,
    /// 1002: the peer broke the WebSocket framing protocol.
    ProtocolError,
    /// 1007: a text frame that is not valid UTF-8.
    InvalidPayload,
    /// 1008: generic policy violation.
    PolicyViolation,
    /// 1009: a message or frame larger than the configured maximum.
    MessageTooBig,
    /// 1011: the server hit an unexpected condition.
    InternalError,
    /// 1013: try again later.
    TryAgainLater,
    /// 4000: this server is draining; reconnect after `retry_ms` and resume.
    Migrate,
    /// 4001: the session expired; refresh the token, then reconnect.
    SessionExpired,
    /// 4002: too slow or rate limited; back off, reconnect, resume.
    SlowConsumer,
    /// 4003: the server is at capacity; back off, reconnect.
    AtCapacity,
    /// 4500: the client violated the Switchyard protocol; do not retry.
    ProtocolViolation,
    /// 4501: not authenticated or bad token; get credentials first.
    NotAuthenticated,
    /// 4502: origin or topic not allowed; do not retry.
    NotAllowed,
    /// 4503: session revoked (logout); do not retry.
    SessionRevoked,
    /// Any other code, kept verbatim (e.g. what a client sent us).
    Other(u16),
}

/// What a client should do after a close, derived from the code alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseClass {
    /// Reconnect (after backoff or the server's `retry_ms`) and resume.
    Reconnect,
    /// Refresh credentials, then reconnect.
    Reauthenticate,
    /// Do not reconnect without user or application action.
    Terminal,
}

impl CloseCode {
    /// The numeric code on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::MessageTooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TryAgainLater => 1013,
            CloseCode::Migrate => 4000,
            CloseCode::SessionExpired => 4001,
            CloseCode::SlowConsumer => 4002,
            CloseCode::AtCapacity => 4003,
            CloseCode::ProtocolViolation => 4500,
            CloseCode::NotAuthenticated => 4501,
            CloseCode::NotAllowed => 4502,
            CloseCode::SessionRevoked => 4503,
            CloseCode::Other(code) => code,
        }
    }

    /// The typed code for a number from the wire.
    pub fn from_u16(code: u16) -> Self {
        match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::GoingAway,
            1002 => CloseCode::ProtocolError,
            1007 => CloseCode::InvalidPayload,
            1008 => CloseCode::PolicyViolation,
            1009 => CloseCode::MessageTooBig,
            1011 => CloseCode::InternalError,
            1013 => CloseCode::TryAgainLater,
            4000 => CloseCode::Migrate,
            4001 => CloseCode::SessionExpired,
            4002 => CloseCode::SlowConsumer,
            4003 => CloseCode::AtCapacity,
            4500 => CloseCode::ProtocolViolation,
            4501 => CloseCode::NotAuthenticated,
            4502 => CloseCode::NotAllowed,
            4503 => CloseCode::SessionRevoked,
            other => CloseCode::Other(other),
        }
    }

    /// What a client should do after receiving this code.
    ///
    /// Standard codes: 1000 (the server ended the session on purpose) and the
    /// protocol-level errors 1002/1007/1008/1009 are terminal — retrying the
    /// same bytes would fail again. Everything else that signals a transient
    /// condition (1001, 1006, 1011, 1012, 1013, …) means reconnect.
    /// Application codes follow the 4000–4499 / 4500–4999 split, with 4001
    /// and 4501 asking for fresh credentials first.
    pub fn class(self) -> CloseClass {
        match self.as_u16() {
            4001 | 4501 => CloseClass::Reauthenticate,
            1000 | 1002 | 1003 | 1007 | 1008 | 1009 | 1010 => CloseClass::Terminal,
            4500..=4999 => CloseClass::Terminal,
            _ => CloseClass::Reconnect,
        }
    }

    /// A short, stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "going_away",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::InvalidPayload => "invalid_payload",
            CloseCode::PolicyViolation => "policy_violation",
            CloseCode::MessageTooBig => "message_too_big",
            CloseCode::InternalError => "internal_error",
            CloseCode::TryAgainLater => "try_again_later",
            CloseCode::Migrate => "migrate",
            CloseCode::SessionExpired => "session_expired",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::AtCapacity => "at_capacity",
            CloseCode::ProtocolViolation => "protocol_violation",
            CloseCode::NotAuthenticated => "not_authenticated",
            CloseCode::NotAllowed => "not_allowed",
            CloseCode::SessionRevoked => "session_revoked",
            CloseCode::Other(_) => "other",
        }
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode::from_u16(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.as_u16()
    }
}

/// The JSON carried in a close frame's reason (at most 123 bytes on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseReason {
    /// How long the client should wait before reconnecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ms: Option<u64>,
    /// A short human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The largest close reason a WebSocket control frame can carry.
pub const MAX_CLOSE_REASON_BYTES: usize = 123;

impl CloseReason {
    /// A reason with only a human-readable explanation.
    pub fn text(reason: impl Into<String>) -> Self {
        CloseReason {
            retry_ms: None,
            reason: Some(reason.into()),
        }
    }

    /// Compact JSON, truncating the explanation so the whole fits in 123 bytes.
    pub fn to_json(&self) -> String {
        let mut reason = self.clone();
        loop {
            let json = serde_json::to_string(&reason).unwrap_or_default();
            if json.len() <= MAX_CLOSE_REASON_BYTES {
                return json;
            }
            match reason.reason.as_mut() {
                Some(text) if !text.is_empty() => {
                    let mut cut = text
                        .len()
                        .saturating_sub(json.len() - MAX_CLOSE_REASON_BYTES);
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                }
                _ => reason.reason = None,
            }
        }
    }

    /// Parses a close reason; anything that is not our JSON yields the text as `reason`.
    pub fn parse(raw: &str) -> Self {
        serde_json::from_str(raw).unwrap_or_else(|_| CloseReason {
            retry_ms: None,
            reason: (!raw.is_empty()).then(|| raw.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_classify() {
        let table = [
            (1000, CloseClass::Terminal),
            (1001, CloseClass::Reconnect),
            (1006, CloseClass::Reconnect),
            (1009, CloseClass::Terminal),
            (1011, CloseClass::Reconnect),
            (1013, CloseClass::Reconnect),
            (4000, CloseClass::Reconnect),
            (4001, CloseClass::Reauthenticate),
            (4002, CloseClass::Reconnect),
            (4003, CloseClass::Reconnect),
            (4499, CloseClass::Reconnect),
            (4500, CloseClass::Terminal),
            (4501, CloseClass::Reauthenticate),
            (4502, CloseClass::Terminal),
            (4503, CloseClass::Terminal),
            (4999, CloseClass::Terminal),
        ];
        for (code, class) in table {
            let typed = CloseCode::from_u16(code);
            assert_eq!(typed.as_u16(), code, "round trip of {code}");
            assert_eq!(typed.class(), class, "class of {code}");
        }
        assert_eq!(CloseCode::from_u16(4002), CloseCode::SlowConsumer);
        assert_eq!(CloseCode::from_u16(4321), CloseCode::Other(4321));
    }

    #[test]
    fn close_reason_fits_in_a_control_frame() {
        let long = CloseReason {
            retry_ms: Some(1830),
            reason: Some("é".repeat(200)),
        };
        let json = long.to_json();
        assert!(json.len() <= MAX_CLOSE_REASON_BYTES, "{} bytes", json.len());
        let back = CloseReason::parse(&json);
        assert_eq!(back.retry_ms, Some(1830));
        assert!(back.reason.is_some_and(|r| r.starts_with('é')));
        assert_eq!(
            CloseReason {
                retry_ms: Some(5),
                reason: None
            }
            .to_json(),
            r#"{"retry_ms":5}"#
        );
    }

    #[test]
    fn foreign_close_reason_is_kept_as_text() {
        assert_eq!(CloseReason::parse("bye").reason.as_deref(), Some("bye"));
        assert_eq!(CloseReason::parse(""), CloseReason::default());
    }
}
