//! The WebSocket protocol: JSON text frames, each an object whose `op` field
//! names it. See docs/protocol.md for the prose version.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::Position;

/// A frame a client sends.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    /// Start receiving a topic; with `since`, first replay what came after it.
    Subscribe {
        /// The topic.
        topic: String,
        /// The last position the client saw, to resume from.
        since: Option<Position>,
    },
    /// Stop receiving a topic.
    Unsubscribe {
        /// The topic.
        topic: String,
    },
    /// Publish a message (only on topics the gateway allows clients to publish on).
    Publish {
        /// The topic.
        topic: String,
        /// Any JSON value, kept byte for byte.
        data: Box<RawValue>,
    },
    /// An application-level ping; the gateway answers `pong`.
    Ping,
}

/// Why a client frame could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Not a JSON object of the expected shape.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The `op` is not one we know.
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    /// A field the op needs is absent.
    #[error("op {op:?} needs field {field:?}")]
    MissingField {
        /// The op.
        op: &'static str,
        /// The missing field.
        field: &'static str,
    },
}

impl FrameError {
    /// The error code reported to the client for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Malformed(_) => ErrorCode::BadFrame,
            FrameError::UnknownOp(_) => ErrorCode::UnknownOp,
            FrameError::MissingField { .. } => ErrorCode::BadFrame,
        }
    }
}

/// Every field any client op may carry; parsed first, then checked per op.
/// Unknown fields are ignored so newer clients can talk to older gateways.
#[derive(Deserialize)]
struct WireClientFrame<'a> {
    #[serde(borrow)]
    op: std::borrow::Cow<'a, str>,
    topic: Option<String>,
    since: Option<Position>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Most bytes of client input an error quotes back. serde_json's messages
/// quote the offending value, escaped (up to six bytes per byte): unclipped,
/// a 64 KiB frame could earn a 400 KiB error frame (found by the fuzzer).
pub const MAX_QUOTED_BYTES: usize = 128;

fn clip(mut text: String) -> String {
    if text.len() > MAX_QUOTED_BYTES {
        let mut end = MAX_QUOTED_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

impl ClientFrame {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let wire: WireClientFrame<'_> =
            serde_json::from_str(text).map_err(|e| FrameError::Malformed(clip(e.to_string())))?;
        let topic = |op: &'static str, topic: Option<String>| {
            topic.ok_or(FrameError::MissingField { op, field: "topic" })
        };
        match wire.op.as_ref() {
            "subscribe" => Ok(ClientFrame::Subscribe {
                topic: topic("subscribe", wire.topic)?,
                since: wire.since,
            }),
            "unsubscribe" => Ok(ClientFrame::Unsubscribe {
                topic: topic("unsubscribe", wire.topic)?,
            }),
            "publish" => Ok(ClientFrame::Publish {
                topic: topic("publish", wire.topic)?,
                data: wire
                    .data
                    .ok_or(FrameError::MissingField {
                        op: "publish",
                        field: "data",
                    })?
                    .to_owned(),
            }),
            "ping" => Ok(ClientFrame::Ping),
            other => Err(FrameError::UnknownOp(clip(other.to_owned()))),
        }
    }

    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            op: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            topic: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            since: Option<Position>,
            #[serde(skip_serializing_if = "Option::is_none")]
            data: Option<&'a RawValue>,
        }
        let out = match self {
            ClientFrame::Subscribe { topic, since } => Out {
                op: "subscribe",
                topic: Some(topic),
                since: *since,
                data: None,
            },
            ClientFrame::Unsubscribe { topic } => Out {
                op: "unsubscribe",
                topic: Some(topic),
                since: None,
                data: None,
            },
            ClientFrame::Publish { topic, data } => Out {
                op: "publish",
                topic: Some(topic),
                since: None,
                data: Some(data),
            },
            ClientFrame::Ping => Out {
                op: "ping",
                topic: None,
                since: None,
                data: None,
            },
        };
        serde_json::to_string(&out).unwrap_or_default()
    }
}

/// Machine-readable kinds of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or lacks a field.
    BadFrame,
    /// The `op` is unknown.
    UnknownOp,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// The topic name is invalid.
    InvalidTopic,
    /// Clients may not publish on this topic.
    PublishNotAllowed,
    /// The session's token does not allow subscribing to this topic.
    SubscribeNotAllowed,
    /// Too many publishes per second on this connection; slow down.
    RateLimited,
    /// The connection already holds the maximum number of subscriptions.
    TooManySubscriptions,
    /// The gateway holds the maximum number of topics.
    TooManyTopics,
    /// Unsubscribe from a topic that was not subscribed.
    NotSubscribed,
    /// The broker could not serve the request right now; retry later.
    Unavailable,
}

/// A frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Welcome {
        /// Correlation id of this connection; it appears in the gateway's logs.
        connection_id: String,
        /// The gateway's id (pod name).
        server_id: String,
        /// Interval of the gateway's `heartbeat` frames. A connection silent
        /// for twice this long is considered dead and closed.
        heartbeat_ms: u64,
    },
    /// A message on a subscribed topic.
    Message {
        /// The topic.
        topic: String,
        /// The log incarnation.
        epoch: u64,
        /// The message's offset in the log.
        offset: u64,
        /// The published JSON value.
        data: serde_json::Value,
    },
    /// A subscription is active. Replayed messages (if `since` was given)
    /// follow it, then live ones.
    Subscribed {
        /// The topic.
        topic: String,
        /// The head of the log when the subscription began: replayed messages
        /// end here, live messages come after it.
        position: Position,
        /// Whether the stream continues without a gap from the requested
        /// `since` (always true for a subscribe without `since`). False
        /// means history was lost or trimmed: resynchronise your state.
        recovered: bool,
    },
    /// A subscription has ended.
    Unsubscribed {
        /// The topic.
        topic: String,
    },
    /// A client publish was accepted at this position.
    Published {
        /// The topic.
        topic: String,
        /// The assigned position.
        position: Position,
    },
    /// A request failed; the connection stays open unless violations repeat.
    Error {
        /// The kind of error.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
        /// The topic the failed request named, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
    },
    /// The answer to a client `ping`.
    Pong,
    /// Sent every `heartbeat_ms` so clients behind proxies that eat control
    /// frames still see traffic. A client should answer with `ping`.
    Heartbeat,
    /// This gateway is draining: open a new connection (the Service routes it
    /// elsewhere), resubscribe every topic from its last position, then close
    /// this one with 1000. After `grace_ms` the gateway closes it with 4000.
    Migrate {
        /// Time left before the gateway closes this connection itself.
        grace_ms: u64,
    },
}

impl ServerFrame {
    /// Encodes the frame as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a frame received from a gateway.
    pub fn parse(text: &str) -> Result<ServerFrame, FrameError> {
        serde_json::from_str(text).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

/// Encodes a `message` frame with its data copied verbatim. The gateway calls
/// this once per published message and shares the bytes across subscribers.
pub fn encode_message(topic: &str, position: Position, data: &RawValue) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        op: &'static str,
        topic: &'a str,
        epoch: u64,
        offset: u64,
        data: &'a RawValue,
    }
    serde_json::to_string(&Out {
        op: "message",
        topic,
        epoch: position.epoch,
        offset: position.offset,
        data,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_frames_parse() {
        match ClientFrame::parse(r#"{"op":"subscribe","topic":"a","since":{"epoch":7,"offset":3}}"#)
        {
            Ok(ClientFrame::Subscribe { topic, since }) => {
                assert_eq!(topic, "a");
                assert_eq!(since, Some(Position::new(7, 3)));
            }
            other => panic!("unexpected {other:?}"),
        }
        match ClientFrame::parse(
            r#"{"op":"publish","topic":"a","data":{"x": [1, 2.50]},"extra":1}"#,
        ) {
            Ok(ClientFrame::Publish { data, .. }) => assert_eq!(data.get(), r#"{"x": [1, 2.50]}"#),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            ClientFrame::parse(r#"{"op":"ping"}"#),
            Ok(ClientFrame::Ping)
        ));
    }

    #[test]
    fn client_frame_errors() {
        let table = [
            ("not json", ErrorCode::BadFrame),
            ("[1,2]", ErrorCode::BadFrame),
            (r#"{"topic":"a"}"#, ErrorCode::BadFrame),
            (r#"{"op":"dance"}"#, ErrorCode::UnknownOp),
            (r#"{"op":"subscribe"}"#, ErrorCode::BadFrame),
            (r#"{"op":"publish","topic":"a"}"#, ErrorCode::BadFrame),
            (r#"{"op":"subscribe","topic":5}"#, ErrorCode::BadFrame),
            (
                r#"{"op":"subscribe","topic":"a","since":{"epoch":-1,"offset":0}}"#,
                ErrorCode::BadFrame,
            ),
        ];
        for (text, code) in table {
            let err = ClientFrame::parse(text).expect_err(text);
            assert_eq!(err.code(), code, "{text}: {err}");
        }
    }

    #[test]
    fn client_frames_round_trip() {
        let data = RawValue::from_string("[1,\"two\"]".into()).expect("raw");
        let frames = [
            ClientFrame::Subscribe {
                topic: "t".into(),
                since: Some(Position::new(1, 2)),
            },
            ClientFrame::Subscribe {
                topic: "t".into(),
                since: None,
            },
            ClientFrame::Unsubscribe { topic: "t".into() },
            ClientFrame::Publish {
                topic: "t".into(),
                data,
            },
            ClientFrame::Ping,
        ];
        for frame in frames {
            let json = frame.to_json();
            let back = ClientFrame::parse(&json).expect(&json);
            assert_eq!(back.to_json(), json);
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::Welcome {
                connection_id: "sy-1".into(),
                server_id: "sy".into(),
                heartbeat_ms: 25_000,
            },
            ServerFrame::Subscribed {
                topic: "t".into(),
                position: Position::new(9, 4),
                recovered: false,
            },
            ServerFrame::Error {
                code: ErrorCode::UnknownOp,
                message: "nope".into(),
                topic: None,
            },
            ServerFrame::Pong,
            ServerFrame::Heartbeat,
            ServerFrame::Migrate { grace_ms: 5000 },
        ];
        for frame in frames {
            let json = frame.to_json();
            assert_eq!(ServerFrame::parse(&json).expect(&json), frame);
        }
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"op":"pong"}"#);
    }

    #[test]
    fn encoded_message_is_a_message_frame() {
        let data = RawValue::from_string(r#"{"n":1}"#.into()).expect("raw");
        let text = encode_message("room", Position::new(3, 8), &data);
        assert_eq!(
            text,
            r#"{"op":"message","topic":"room","epoch":3,"offset":8,"data":{"n":1}}"#
        );
        assert_eq!(
            ServerFrame::parse(&text).expect("parse"),
            ServerFrame::Message {
                topic: "room".into(),
                epoch: 3,
                offset: 8,
                data: json!({"n": 1}),
            }
        );
    }
}
