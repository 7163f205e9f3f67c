//! One WebSocket connection: a reader task (this one) and a writer task.
//!
//! The reader parses client frames and acts on them; everything it wants to
//! send goes through the connection's [`Outbox`](crate::outbox::Outbox), like
//! everything the broker fans out. Only the writer touches the sink, so frames
//! are never interleaved, and it writes whatever is queued as one batch with a
//! single flush.
//!
//! How a connection ends decides what is counted:
//! - the client sends a close frame first → `initiator=client`, its code;
//! - the gateway asks to close (violation, slow consumer, shutdown…) →
//!   `initiator=server`, our code, whether or not the peer answers in time;
//! - the socket fails or goes silent (reaped) → `initiator=abrupt`, 1006.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::topic::validate_topic;
use switchyard_protocol::{ClientFrame, CloseCode, ErrorCode, Position, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::hub::{ConnHandle, Route};
use crate::metrics::Initiator;
use crate::outbox::{EndRequest, Outgoing};
use crate::security::ratelimit::TokenBucket;
use crate::security::Session;
use crate::server::Gateway;

/// The close code recorded for a connection that ended without a close frame.
const ABNORMAL_CLOSURE: u16 = 1006;

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ending {
    code: u16,
    initiator: Initiator,
}

impl Ending {
    fn abrupt() -> Self {
        Ending {
            code: ABNORMAL_CLOSURE,
            initiator: Initiator::Abrupt,
        }
    }
}

/// The reader's state for one connection.
struct Connection {
    gateway: Arc<Gateway>,
    handle: Arc<ConnHandle>,
    /// Who is connected and what they may do.
    session: Session,
    /// Topics this connection subscribes to (at most `max_subscriptions`, so a Vec).
    topics: Vec<String>,
    violations: u32,
    /// Subscribes and publishes on topics the session may not use; enough close 4502.
    denied: u32,
    /// Client publishes allowed per second.
    publish_bucket: TokenBucket,
    /// Rate-limited publishes since the last accepted one; enough close 4002.
    rate_limited: u32,
    /// This reader asked for a close: later data frames are ignored.
    closing: bool,
    /// The first way this connection started to end; later ones do not overwrite it.
    ending: Option<Ending>,
}

/// Serves one upgraded WebSocket, already admitted to the hub as `handle`,
/// until it ends.
pub async fn run<S>(
    gateway: Arc<Gateway>,
    socket: WebSocketStream<S>,
    handle: Arc<ConnHandle>,
    session: Session,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    gateway.metrics.connections_opened.inc();
    gateway.metrics.connections.inc();
    let route = handle.route;
    let subject = session.subject.as_deref().unwrap_or("");
    let span = tracing::info_span!("conn", id = %handle.label, %peer, sub = subject);
    async move {
        tracing::debug!(?route, method = session.method.as_str(), "connected");
        if let Some(at_ms) = session.expires_at_ms {
            gateway.expiries.insert(at_ms, handle.id);
        }
        let (sink, stream) = socket.split();
        let writer =
            tokio::spawn(write_loop(sink, handle.clone(), gateway.clone()).in_current_span());
        let settings = &gateway.config.connection;
        let publish_bucket = TokenBucket::new(
            settings.publish_rate,
            settings.publish_burst,
            Instant::now(),
        );
        let mut connection = Connection {
            gateway,
            handle,
            session,
            topics: Vec::new(),
            violations: 0,
            denied: 0,
            publish_bucket,
            rate_limited: 0,
            closing: false,
            ending: None,
        };
        if route == Route::Topics {
            connection.send(&ServerFrame::Welcome {
                connection_id: connection.handle.label.clone(),
                server_id: connection.gateway.server_id.clone(),
                heartbeat_ms: connection.gateway.config.connection.keepalive_interval_ms,
            });
        }
        let ending = connection.read_loop(stream).await;
        connection.finish(ending, writer).await;
    }
    .instrument(span)
    .await
}

impl Connection {
    fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.gateway.config.connection.close_timeout_ms)
    }

    /// Queues a reply frame.
    fn send(&self, frame: &ServerFrame) {
        // A full queue turns into a 4002 close inside push.
        let _ = self
            .handle
            .outbox
            .push(Outgoing::Text(Utf8Bytes::from(frame.to_json())));
    }

    fn send_error(&self, code: ErrorCode, message: String, topic: Option<String>) {
        self.send(&ServerFrame::Error {
            code,
            message,
            topic,
        });
    }

    /// Asks the writer to close with `code` after what is queued. Frames the
    /// client sends after that are not acted on: a client closed for flooding
    /// must not keep subscribing or publishing while the close completes.
    fn close(&mut self, code: CloseCode, reason: &str) {
        self.closing = true;
        self.handle
            .outbox
            .close(code, CloseReason::text(reason).to_json());
    }

    /// Reads frames until the connection is over and says how it ended.
    async fn read_loop<S>(&mut self, mut stream: SplitStream<WebSocketStream<S>>) -> Ending
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handle = self.handle.clone();
        let mut end_requested = std::pin::pin!(handle.outbox.ended());
        let mut close_deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                end = &mut end_requested, if close_deadline.is_none() => match end {
                    EndRequest::Abort => return self.ending.unwrap_or_else(Ending::abrupt),
                    EndRequest::Close { code, .. } => {
                        self.closing = true;
                        self.ending.get_or_insert(Ending { code: code.as_u16(), initiator: Initiator::Server });
                        close_deadline = Some(tokio::time::Instant::now() + self.close_timeout());
                    }
                },
                _ = sleep_until_opt(close_deadline) => {
                    tracing::debug!("peer did not finish the close handshake in time");
                    return self.ending.unwrap_or_else(Ending::abrupt);
                }
                next = stream.next() => match next {
                    None => return self.ending.unwrap_or_else(Ending::abrupt),
                    Some(Ok(message)) => {
                        self.gateway.hub.touch(&self.handle);
                        if !self.closing || matches!(message, Message::Close(_)) {
                            self.on_message(message).await;
                        }
                    }
                    // The stream is unusable after an error: stop reading. If a
                    // close frame was requested, `finish` waits for the writer.
                    Some(Err(err)) => return self.on_read_error(err),
                },
            }
        }
    }

    /// Classifies a read error: the peer is gone (abrupt), or it sent
    /// something malformed and gets a close frame with the matching code.
    fn on_read_error(&mut self, err: WsError) -> Ending {
        let (code, kind) = match &err {
            WsError::Capacity(_) => (CloseCode::MessageTooBig, "too_big"),
            WsError::Utf8(_) => (CloseCode::InvalidPayload, "invalid_utf8"),
            // EOF without a close frame: the peer went away, nothing was malformed.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                return self.ending.unwrap_or_else(Ending::abrupt)
            }
            WsError::Protocol(_) => (CloseCode::ProtocolError, "framing"),
            WsError::ConnectionClosed | WsError::AlreadyClosed => {
                return self.ending.unwrap_or_else(Ending::abrupt)
            }
            _ => {
                tracing::debug!(%err, "read failed");
                return self.ending.unwrap_or_else(Ending::abrupt);
            }
        };
        if let Some(ending) = self.ending {
            return ending;
        }
        tracing::info!(%err, code = code.as_u16(), "closing on bad input");
        self.gateway
            .metrics
            .protocol_violations
            .with_label_values(&[kind])
            .inc();
        let ending = Ending {
            code: code.as_u16(),
            initiator: Initiator::Server,
        };
        self.ending = Some(ending);
        self.close(code, &err.to_string());
        ending
    }

    async fn on_message(&mut self, message: Message) {
        let metrics = &self.gateway.metrics;
        match message {
            Message::Text(text) => {
                metrics.messages_received.inc();
                metrics.bytes_received.inc_by(text.len() as u64);
                match self.handle.route {
                    Route::Echo => {
                        let _ = self.handle.outbox.push(Outgoing::Text(text));
                    }
                    Route::Topics => self.on_text(&text).await,
                }
            }
            Message::Binary(bytes) => {
                metrics.messages_received.inc();
                metrics.bytes_received.inc_by(bytes.len() as u64);
                match self.handle.route {
                    Route::Echo => {
                        let _ = self.handle.outbox.push(Outgoing::Binary(bytes));
                    }
                    Route::Topics => self.violation(
                        "binary",
                        ErrorCode::BinaryNotSupported,
                        "binary frames are not part of the protocol; send JSON text".into(),
                        None,
                    ),
                }
            }
            Message::Close(frame) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                tracing::debug!(code, "client closed");
                self.ending.get_or_insert(Ending {
                    code,
                    initiator: Initiator::Client,
                });
            }
            // tungstenite answers pings itself; any frame counts as liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }

    async fn on_text(&mut self, text: &str) {
        match ClientFrame::parse(text) {
            Err(err) => {
                let kind = match err.code() {
                    ErrorCode::UnknownOp => "unknown_op",
                    _ => "bad_frame",
                };
                self.violation(kind, err.code(), err.to_string(), None);
            }
            Ok(ClientFrame::Subscribe { topic, since }) => self.subscribe(topic, since).await,
            Ok(ClientFrame::Unsubscribe { topic }) => self.unsubscribe(topic),
            Ok(ClientFrame::Publish { topic, data }) => self.publish(topic, &data).await,
            Ok(ClientFrame::Ping) => self.send(&ServerFrame::Pong),
        }
    }

    /// Reports a protocol violation; enough of them close the connection with 4500.
    fn violation(&mut self, kind: &str, code: ErrorCode, message: String, topic: Option<String>) {
        self.gateway
            .metrics
            .protocol_violations
            .with_label_values(&[kind])
            .inc();
        tracing::debug!(kind, %message, "protocol violation");
        self.send_error(code, message, topic);
        self.violations += 1;
        if self.violations >= self.gateway.config.connection.max_violations {
            self.close(CloseCode::ProtocolViolation, "too many protocol violations");
        }
    }

    /// Refuses a topic the session may not use: an error frame, and after
    /// `max_violations` refusals a 4502 close (the client keeps asking for
    /// what its token does not allow; retrying will not help).
    fn deny(&mut self, action: &'static str, code: ErrorCode, topic: String) {
        self.gateway
            .metrics
            .authorization_denied
            .with_label_values(&[action])
            .inc();
        tracing::debug!(action, %topic, "topic not allowed for this session");
        self.send_error(
            code,
            format!("this session may not {action} on this topic"),
            Some(topic),
        );
        self.denied += 1;
        if self.denied >= self.gateway.config.connection.max_violations {
            self.close(CloseCode::NotAllowed, "topic not allowed");
        }
    }

    /// Takes a publish token; an empty bucket gets a `rate_limited` error,
    /// and `max_violations` of them in a row close the connection with 4002.
    fn publish_allowed(&mut self, topic: &str) -> bool {
        if self.publish_bucket.try_take(Instant::now()) {
            self.rate_limited = 0;
            return true;
        }
        self.gateway.metrics.publishes_rate_limited.inc();
        self.rate_limited += 1;
        let rate = self.gateway.config.connection.publish_rate;
        self.send_error(
            ErrorCode::RateLimited,
            format!("at most {rate} publishes per second"),
            Some(topic.to_owned()),
        );
        if self.rate_limited >= self.gateway.config.connection.max_violations {
            self.close(CloseCode::SlowConsumer, "publish rate exceeded");
        }
        false
    }

    fn check_topic(&mut self, topic: &str) -> bool {
        match validate_topic(topic, self.gateway.config.topics.max_topic_length) {
            Ok(()) => true,
            Err(err) => {
                self.violation(
                    "invalid_topic",
                    ErrorCode::InvalidTopic,
                    err.to_string(),
                    Some(topic.chars().take(64).collect()),
                );
                false
            }
        }
    }

    async fn subscribe(&mut self, topic: String, since: Option<Position>) {
        if !self.check_topic(&topic) {
            return;
        }
        if !self.session.may_subscribe(&topic) {
            return self.deny("subscribe", ErrorCode::SubscribeNotAllowed, topic);
        }
        let already = self.topics.contains(&topic);
        if already {
            // A second subscribe restarts the subscription from its `since`.
            self.gateway.broker.unsubscribe(&topic, self.handle.id);
        } else if self.topics.len() >= self.gateway.config.connection.max_subscriptions {
            let max = self.gateway.config.connection.max_subscriptions;
            // A client that keeps subscribing past its limit is misbehaving:
            // it counts towards the 4500 close like any other violation.
            return self.violation(
                "too_many_subscriptions",
                ErrorCode::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
                Some(topic),
            );
        }
        match self
            .gateway
            .broker
            .subscribe(&topic, since, self.handle.clone())
            .await
        {
            Ok(outcome) => {
                if since.is_some() {
                    let label = if outcome.recovered { "true" } else { "false" };
                    self.gateway
                        .metrics
                        .resume
                        .with_label_values(&[label])
                        .inc();
                }
                tracing::debug!(%topic, position = %outcome.position, recovered = outcome.recovered, replayed = outcome.replayed, "subscribed");
                if !already {
                    self.topics.push(topic);
                    self.gateway.metrics.subscriptions.inc();
                }
            }
            Err(err) => {
                if already {
                    self.forget_topic(&topic);
                }
                self.send_error(err.code(), err.to_string(), Some(topic));
            }
        }
    }

    fn forget_topic(&mut self, topic: &str) {
        if let Some(index) = self.topics.iter().position(|t| t == topic) {
            self.topics.swap_remove(index);
            self.gateway.metrics.subscriptions.dec();
        }
    }

    fn unsubscribe(&mut self, topic: String) {
        if !self.topics.contains(&topic) {
            self.send_error(
                ErrorCode::NotSubscribed,
                "not subscribed to this topic".into(),
                Some(topic),
            );
            return;
        }
        self.gateway.broker.unsubscribe(&topic, self.handle.id);
        self.forget_topic(&topic);
        self.send(&ServerFrame::Unsubscribed { topic });
    }

    async fn publish(&mut self, topic: String, data: &serde_json::value::RawValue) {
        if !self.check_topic(&topic) {
            return;
        }
        if !self.session.may_publish(&topic) {
            return self.deny("publish", ErrorCode::PublishNotAllowed, topic);
        }
        if !self.publish_allowed(&topic) {
            return;
        }
        match self.gateway.publish(&topic, data).await {
            Ok(position) => self.send(&ServerFrame::Published { topic, position }),
            Err(err) => self.send_error(err.code(), err.to_string(), Some(topic)),
        }
    }

    /// Lets go of the connection: waits (bounded) for the writer to send a
    /// requested close frame, then releases subscriptions and counts the end.
    async fn finish(self, ending: Ending, writer: tokio::task::JoinHandle<()>) {
        let close_requested = matches!(
            self.handle.outbox.end_request(),
            Some(EndRequest::Close { .. })
        );
        let mut writer = writer;
        if close_requested {
            if tokio::time::timeout(self.close_timeout(), &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
        } else {
            // The peer is gone or closed first; tungstenite already answered its close.
            self.handle.outbox.abort();
            if tokio::time::timeout(Duration::from_millis(100), &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
        }
        let gateway = &self.gateway;
        if let Some(at_ms) = self.session.expires_at_ms {
            gateway.expiries.remove(at_ms, self.handle.id);
        }
        gateway.connection_ended(&self.handle);
        gateway.hub.remove(self.handle.id);
        for topic in &self.topics {
            gateway.broker.unsubscribe(topic, self.handle.id);
        }
        gateway.metrics.subscriptions.sub(self.topics.len() as i64);
        gateway
            .metrics
            .connection_closed(ending.code, ending.initiator);
        if ending.code == CloseCode::SlowConsumer.as_u16() && ending.initiator == Initiator::Server
        {
            gateway.metrics.slow_consumers.inc();
        }
        tracing::info!(
            code = ending.code,
            initiator = ending.initiator.as_str(),
            "connection ended"
        );
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// The writer task: drains the outbox in batches, one flush per batch, and
/// sends the close frame when one is requested.
async fn write_loop<S>(mut sink: Sink<S>, handle: Arc<ConnHandle>, gateway: Arc<Gateway>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut batch = VecDeque::new();
    let mut published: Vec<Instant> = Vec::new();
    loop {
        let end = handle.outbox.next_batch(&mut batch).await;
        if end == Some(EndRequest::Abort) {
            return;
        }
        if !batch.is_empty() {
            if let Err(err) = write_batch(&mut sink, &mut batch, &mut published, &gateway).await {
                tracing::debug!(%err, "write failed");
                handle.outbox.abort();
                return;
            }
            // Keep a small queue allocation for the next batch, not a burst's worth.
            if batch.capacity() > 64 {
                batch = VecDeque::new();
            }
        }
        if let Some(EndRequest::Close { code, reason }) = end {
            let frame = CloseFrame {
                code: WireCloseCode::from(code.as_u16()),
                reason: Utf8Bytes::from(reason),
            };
            if let Err(err) = sink.send(Message::Close(Some(frame))).await {
                tracing::debug!(%err, "close frame not sent");
            }
            return;
        }
    }
}

async fn write_batch<S>(
    sink: &mut Sink<S>,
    batch: &mut VecDeque<Outgoing>,
    published: &mut Vec<Instant>,
    gateway: &Gateway,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut frames, mut bytes) = (0u64, 0u64);
    for frame in batch.drain(..) {
        let message = match frame {
            Outgoing::Live { text, published_at } => {
                published.push(published_at);
                Message::Text(text)
            }
            Outgoing::Text(text) => Message::Text(text),
            Outgoing::Binary(data) => Message::Binary(data),
            Outgoing::Ping => {
                sink.feed(Message::Ping(Default::default())).await?;
                continue;
            }
        };
        frames += 1;
        bytes += message.len() as u64;
        sink.feed(message).await?;
    }
    sink.flush().await?;
    let written = Instant::now();
    for at in published.drain(..) {
        gateway
            .metrics
            .fanout_latency
            .observe(written.saturating_duration_since(at).as_secs_f64());
    }
    gateway.metrics.messages_sent.inc_by(frames);
    gateway.metrics.bytes_sent.inc_by(bytes);
    Ok(())
}
