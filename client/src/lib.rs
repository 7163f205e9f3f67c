//! A Rust client for the Switchyard gateway: connect, subscribe (optionally
//! resuming from a position), receive, publish.
//!
//! Two layers:
//! - [`Connection`]: one WebSocket. It answers the gateway's heartbeats,
//!   remembers the last position seen on every topic and reports a close with
//!   its code and its class.
//! - [`Client`]: a session over connections — reconnects with full-jitter
//!   backoff, honours close codes and `retry_ms`, migrates make-before-break,
//!   drops duplicates, holds publishes while disconnected. The decisions
//!   themselves are plain functions in [`policy`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchyard_client::ClientError> {
//! use switchyard_client::{Connection, Event};
//! let mut conn = Connection::connect("ws://127.0.0.1:8080/ws").await?;
//! conn.subscribe("news", None).await?;
//! while let Event::Frame(frame) = conn.next_event().await? {
//!     println!("{frame:?}");
//! }
//! # Ok(()) }
//! ```

pub mod policy;
pub mod session;

pub use session::{
    Client, ClientEvent, ClientOptions, ClientStats, CredentialSource, PublishError,
};

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use switchyard_protocol::close::{CloseReason, ABNORMAL_CLOSURE, NO_STATUS_RECEIVED};
use switchyard_protocol::{ClientFrame, CloseClass, CloseCode, Position, ServerFrame};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// What went wrong talking to a gateway.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The WebSocket layer failed (connect, I/O, framing).
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The gateway sent something that is not a Switchyard frame.
    #[error("unexpected frame from the gateway: {0}")]
    Protocol(String),
    /// No credential could be presented (the source failed, or the value
    /// cannot go in a header or a URL).
    #[error("credential: {0}")]
    Credential(String),
    /// The connection closed before the expected frame arrived (a gateway
    /// refusing after the upgrade closes before `welcome`).
    #[error("connection closed with {code} ({class:?})")]
    Closed {
        /// The close code (1006 when the socket ended without a close frame).
        code: u16,
        /// What the close code tells the client to do.
        class: CloseClass,
        /// The close reason's `retry_ms` hint, if any.
        retry_ms: Option<u64>,
    },
}

/// A close as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The code; 1006 when the socket ended without a close frame, 1005 when
    /// the close frame carried no code.
    pub code: u16,
    /// The parsed reason (e.g. `retry_ms`).
    pub reason: CloseReason,
}

impl Closed {
    /// What the code tells the client to do.
    pub fn class(&self) -> CloseClass {
        CloseCode::from_u16(self.code).class()
    }
}

/// What [`Connection::next_event`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A frame from the gateway (heartbeats are answered and not reported).
    Frame(ServerFrame),
    /// The connection has closed.
    Closed(Closed),
}

/// The `welcome` frame's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Correlation id of this connection (also in the gateway's logs).
    pub connection_id: String,
    /// The gateway's id.
    pub server_id: String,
    /// The gateway's heartbeat interval.
    pub heartbeat_ms: u64,
}

/// A credential presented in the WebSocket handshake.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A JWT, sent as `Authorization: Bearer`.
    Bearer(String),
    /// A single-use ticket from the application backend, sent as `?ticket=`.
    /// Fetch a new one for every connection.
    Ticket(String),
}

impl std::fmt::Debug for Credential {
    // Never print the secret itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Bearer(_) => f.write_str("Bearer(REDACTED)"),
            Credential::Ticket(_) => f.write_str("Ticket(REDACTED)"),
        }
    }
}

/// The handshake request for `url` carrying `credential`.
fn handshake_request(
    url: &str,
    credential: Option<&Credential>,
) -> Result<tungstenite::handshake::client::Request, ClientError> {
    use tungstenite::client::IntoClientRequest;
    let url = match credential {
        Some(Credential::Ticket(ticket)) => {
            let url_safe = !ticket.is_empty()
                && ticket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b));
            if !url_safe {
                return Err(ClientError::Credential(
                    "a ticket must be URL-safe characters".into(),
                ));
            }
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}ticket={ticket}")
        }
        _ => url.to_owned(),
    };
    let mut request = url.into_client_request()?;
    if let Some(Credential::Bearer(token)) = credential {
        let value = tungstenite::http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientError::Credential("a token must be header-safe text".into()))?;
        request
            .headers_mut()
            .insert(tungstenite::http::header::AUTHORIZATION, value);
    }
    Ok(request)
}

/// One WebSocket connection to a gateway.
pub struct Connection {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    welcome: Welcome,
    positions: HashMap<String, Position>,
    closed: Option<Closed>,
    /// When the gateway was last heard from: two heartbeats of silence
    /// after it and the connection is dead (a half-open TCP connection).
    heard: tokio::time::Instant,
}

impl Connection {
    /// Connects to `url` (e.g. `ws://127.0.0.1:8080/ws`) and waits for `welcome`.
    pub async fn connect(url: &str) -> Result<Connection, ClientError> {
        Self::connect_with(url, None).await
    }

    /// Connects presenting `credential`, and waits for `welcome`. A refused
    /// credential shows as [`ClientError::Closed`] with 4501 (or 4001 for an
    /// expired token, 4503 for a revoked session).
    pub async fn connect_with(
        url: &str,
        credential: Option<&Credential>,
    ) -> Result<Connection, ClientError> {
        let request = handshake_request(url, credential)?;
        let (mut socket, _response) = tokio_tungstenite::connect_async(request).await?;
        let welcome = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => match ServerFrame::parse(&text) {
                    Ok(ServerFrame::Welcome {
                        connection_id,
                        server_id,
                        heartbeat_ms,
                    }) => {
                        break Welcome {
                            connection_id,
                            server_id,
                            heartbeat_ms,
                        }
                    }
                    // Not for a client before `welcome`, or of a later
                    // protocol version: not ours to act on.
                    _ => continue,
                },
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), CloseReason::parse(&f.reason)))
                        .unwrap_or((NO_STATUS_RECEIVED, CloseReason::default()));
                    return Err(ClientError::Closed {
                        code,
                        class: CloseCode::from_u16(code).class(),
                        retry_ms: reason.retry_ms,
                    });
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.into()),
                None => {
                    return Err(ClientError::Closed {
                        code: ABNORMAL_CLOSURE,
                        class: CloseClass::Reconnect,
                        retry_ms: None,
                    })
                }
            }
        };
        Ok(Connection {
            socket,
            welcome,
            positions: HashMap::new(),
            closed: None,
            heard: tokio::time::Instant::now(),
        })
    }

    /// The gateway's `welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The last position seen on `topic` (from a message, or from `subscribed`).
    pub fn position(&self, topic: &str) -> Option<Position> {
        self.positions.get(topic).copied()
    }

    /// Sends any client frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.socket.send(Message::text(frame.to_json())).await?;
        Ok(())
    }

    /// Sends a text frame as is, without checking that it is a valid client frame.
    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.socket.send(Message::text(text)).await?;
        Ok(())
    }

    /// Subscribes to `topic`, resuming after `since` when given.
    pub async fn subscribe(
        &mut self,
        topic: &str,
        since: Option<Position>,
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Subscribe {
            topic: topic.to_owned(),
            since,
        })
        .await
    }

    /// Resubscribes to `topic` from the last position this connection saw on it.
    pub async fn resume(&mut self, topic: &str) -> Result<(), ClientError> {
        let since = self.position(topic);
        self.subscribe(topic, since).await
    }

    /// Unsubscribes from `topic`.
    pub async fn unsubscribe(&mut self, topic: &str) -> Result<(), ClientError> {
        self.send(&ClientFrame::Unsubscribe {
            topic: topic.to_owned(),
        })
        .await
    }

    /// Publishes `data` (JSON text) on `topic`; the gateway answers `published` or `error`.
    pub async fn publish(&mut self, topic: &str, data: &str) -> Result<(), ClientError> {
        let data = RawValue::from_string(data.to_owned())
            .map_err(|e| ClientError::Protocol(format!("data is not JSON: {e}")))?;
        self.send(&ClientFrame::Publish {
            topic: topic.to_owned(),
            data,
        })
        .await
    }

    /// Sends a close frame with `code`; read on until [`Event::Closed`].
    pub async fn close(&mut self, code: u16) -> Result<(), ClientError> {
        self.socket
            .close(Some(tungstenite::protocol::CloseFrame {
                code: code.into(),
                reason: "".into(),
            }))
            .await?;
        Ok(())
    }

    /// Closes with `code` and reads on, in a task of its own, until the
    /// gateway's close frame or `timeout`: the TCP connection ends after the
    /// close handshake (RFC 6455 §7.1.1), not with data unread. Dropped with
    /// frames still arriving, the socket would end with a reset, which can
    /// reach the gateway before the close frame does, and a client's own
    /// 1000 would look like a vanished peer (a drain counts it "other").
    pub fn retire(mut self, code: u16, timeout: std::time::Duration) {
        tokio::spawn(async move {
            if self.close(code).await.is_err() {
                return;
            }
            let _ = tokio::time::timeout(timeout, async {
                while let Some(Ok(_)) = self.socket.next().await {}
            })
            .await;
        });
    }

    /// The next event. Heartbeats are answered with `ping` and not reported;
    /// frames the client does not know (a later protocol version, a binary
    /// frame) are skipped; after [`Event::Closed`] every call returns the
    /// same close. A connection silent for two of the gateway's heartbeat
    /// intervals closes as 1006 (measured from the last frame heard, so a
    /// caller that drops this future in a `select!` does not restart it).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(closed) = &self.closed {
            return Ok(Event::Closed(closed.clone()));
        }
        loop {
            let silence =
                std::time::Duration::from_millis(self.welcome.heartbeat_ms.saturating_mul(2));
            let next = self.socket.next();
            let received = if silence.is_zero() {
                next.await
            } else {
                match tokio::time::timeout_at(self.heard + silence, next).await {
                    Ok(received) => received,
                    Err(_) => return Ok(self.mark_closed(ABNORMAL_CLOSURE, "")),
                }
            };
            self.heard = tokio::time::Instant::now();
            let message = match received {
                Some(Ok(message)) => message,
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                    return Ok(self.mark_closed(ABNORMAL_CLOSURE, ""))
                }
                Some(Err(tungstenite::Error::Io(_)))
                | Some(Err(tungstenite::Error::Protocol(_))) => {
                    return Ok(self.mark_closed(ABNORMAL_CLOSURE, ""))
                }
                Some(Err(err)) => return Err(err.into()),
            };
            match message {
                Message::Text(text) => {
                    let Ok(frame) = ServerFrame::parse(&text) else {
                        // A later protocol version's frame (an unknown op or
                        // error code): forward-compatible, skipped.
                        continue;
                    };
                    match &frame {
                        ServerFrame::Heartbeat => {
                            self.send(&ClientFrame::Ping).await?;
                            continue;
                        }
                        ServerFrame::Message {
                            topic,
                            epoch,
                            offset,
                            ..
                        } => {
                            self.positions
                                .insert(topic.clone(), Position::new(*epoch, *offset));
                        }
                        ServerFrame::Subscribed {
                            topic,
                            position,
                            recovered,
                        } => {
                            // When recovered, replayed messages follow and move the
                            // position on; otherwise the stream restarts at the head.
                            let keep = *recovered
                                && self.positions.get(topic).is_some_and(|p| {
                                    p.epoch == position.epoch && p.offset < position.offset
                                });
                            if !keep {
                                self.positions.insert(topic.clone(), *position);
                            }
                        }
                        _ => {}
                    }
                    return Ok(Event::Frame(frame));
                }
                Message::Close(frame) => {
                    // Send tungstenite's queued close reply now, so the gateway
                    // sees the handshake complete without waiting for another read.
                    let _ = self.socket.flush().await;
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((NO_STATUS_RECEIVED, String::new()));
                    return Ok(self.mark_closed(code, &reason));
                }
                Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                    continue
                }
            }
        }
    }

    fn mark_closed(&mut self, code: u16, reason: &str) -> Event {
        let closed = Closed {
            code,
            reason: CloseReason::parse(reason),
        };
        self.closed = Some(closed.clone());
        Event::Closed(closed)
    }
}
