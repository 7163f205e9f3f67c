//! One WebSocket connection, served by one task: its lifecycle here (the
//! select loop, reading, ending and counting the end), writing to the
//! socket in `io`, the topic protocol in `session`.
//!
//! The task owns the socket and runs one select loop over three things: the
//! client's frames, the connection's [`Outbox`](crate::outbox::Outbox) (where
//! replies and everything the broker fans out are queued), and the close
//! deadline. Frames are written only here, so they are never interleaved, and
//! whatever is queued goes out as one batch with a single flush.
//!
//! One task rather than a reader and a writer: an idle connection is then one
//! task allocation holding the socket, instead of two tasks plus the lock that
//! splitting a socket needs, which were most of an idle connection's cost
//! (bench/heap-profile.sh; figures in docs/benchmarks.md). A write that
//! blocks (the client stopped reading) still gives way to an end request and
//! to the close deadline.
//!
//! How a connection ends decides what is counted:
//! - the client sends a close frame first → `initiator=client`, its code;
//! - the gateway asks to close (violation, slow consumer, shutdown…) →
//!   `initiator=server`, our code, whether or not the peer answers in time;
//! - the socket fails or goes silent (reaped) → `initiator=abrupt`, 1006.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use switchyard_protocol::close::{CloseReason, ABNORMAL_CLOSURE, NO_STATUS_RECEIVED};
use switchyard_protocol::{CloseCode, ErrorCode, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::gateway::Gateway;
mod io;
mod session;

use io::{send_close, CloseDeadline, Pending};

use crate::hub::{ConnHandle, Route};
use crate::metrics::Initiator;
use crate::outbox::{EndRequest, Outgoing, Slow};
use crate::security::ratelimit::TokenBucket;
use crate::security::Session;

/// What became of a batch written to the socket.
enum Written {
    /// Every frame was handed to the socket and flushed.
    All,
    /// The socket failed, or the connection is to be dropped.
    Failed,
    /// A frame was larger than the write buffer can ever hold.
    TooLarge,
}

impl From<Result<(), WsError>> for Written {
    fn from(result: Result<(), WsError>) -> Self {
        match result {
            Ok(()) => Written::All,
            Err(WsError::WriteBufferFull(_)) => Written::TooLarge,
            Err(err) => {
                tracing::debug!(%err, "write failed");
                Written::Failed
            }
        }
    }
}

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

/// Whether a connection still has to greet its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Welcome {
    /// Queue the welcome frame first: the 101 went out through hyper.
    Queue,
    /// The welcome frame went out in the same write as the 101
    /// ([`write_welcome`]).
    Written,
}

/// The welcome frame a connection on `handle`'s route starts with, if any
/// (the echo route has none).
fn welcome_frame(gateway: &Gateway, handle: &ConnHandle) -> Option<ServerFrame> {
    (handle.route == Route::Topics).then(|| ServerFrame::Welcome {
        connection_id: handle.label.clone(),
        server_id: gateway.server_id.clone(),
        heartbeat_ms: gateway.config.connection.keepalive_interval_ms,
    })
}

/// Appends the welcome frame for `handle`, encoded as a server's text frame,
/// to `out`, and counts it as the writer counts the frames it sends (one
/// message, its payload's bytes); nothing when its route has none.
pub fn write_welcome(gateway: &Gateway, handle: &ConnHandle, out: &mut Vec<u8>) {
    let Some(frame) = welcome_frame(gateway, handle) else {
        return;
    };
    let json = frame.to_json();
    let payload_bytes = json.len() as u64;
    // Formatting into a Vec has no I/O to fail.
    if Frame::message(json, OpCode::Data(Data::Text), true)
        .format(out)
        .is_ok()
    {
        gateway.metrics.messages_sent.inc();
        gateway.metrics.bytes_sent.inc_by(payload_bytes);
    }
}

/// The future serving one upgraded WebSocket, already admitted to the hub as
/// `handle`, until it ends; the caller spawns it.
///
/// Everything the connection keeps is built here, before the future: an
/// async block stores what it captures for its whole life, so moving the
/// arguments into a `Connection` inside it would hold them twice.
pub fn run<S>(
    gateway: Arc<Gateway>,
    socket: WebSocketStream<S>,
    handle: Arc<ConnHandle>,
    session: Session,
    peer: SocketAddr,
    welcome: Welcome,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    gateway.metrics.connections_opened.inc();
    gateway.metrics.connections.inc();
    let route = handle.route;
    let subject = session.subject.as_deref().unwrap_or("");
    let span = tracing::info_span!("conn", id = %handle.label, %peer, sub = subject);
    span.in_scope(|| tracing::debug!(?route, method = session.method.as_str(), "connected"));
    if let Some(at_ms) = session.expires_at_ms {
        gateway.expiries.insert(at_ms, handle.id);
    }
    let settings = &gateway.config.connection;
    let publish_bucket = TokenBucket::new(
        settings.publish_rate,
        settings.publish_burst,
        Instant::now(),
    );
    let connection = Connection {
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
    if welcome == Welcome::Queue {
        if let Some(frame) = welcome_frame(&connection.gateway, &connection.handle) {
            connection.send(&frame);
        }
    }
    connection.live(socket).instrument(span)
}

impl Connection {
    /// Serves the socket until the connection ends, then lets go of it.
    ///
    /// Not an `async fn`: one stores its arguments and then the locals they
    /// are moved into, twice the socket and the state; an async block
    /// captures them once (pinned by `an_idle_connection_is_one_small_task`).
    #[allow(clippy::manual_async_fn)]
    fn live<S>(
        mut self,
        mut socket: WebSocketStream<S>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        async move {
            let mut pending = Pending::default();
            let ending = self.serve(&mut socket, &mut pending).await;
            // Boxed: the end runs once, and inline its future would widen
            // every idle connection's task by its size.
            Box::pin(self.finish(ending, &mut socket, &mut pending)).await;
        }
    }

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

    /// Asks for a close with `code` after what is queued. Frames the
    /// client sends after that are not acted on: a client closed for flooding
    /// must not keep subscribing or publishing while the close completes.
    fn close(&mut self, code: CloseCode, reason: &str) {
        self.closing = true;
        self.handle
            .outbox
            .close(code, CloseReason::text(reason).to_json());
    }

    /// [`Connection::close`] with 4002, recording why.
    fn close_slow(&mut self, why: Slow) {
        self.closing = true;
        self.handle.outbox.close_slow(why);
    }

    fn ending_or_abrupt(&self) -> Ending {
        self.ending.unwrap_or_else(Ending::abrupt)
    }

    /// Records a close the gateway asked for and starts its deadline: the
    /// peer gets `close_timeout` to take what is queued and answer the close.
    fn close_requested(&mut self, code: CloseCode, deadline: &mut CloseDeadline) {
        self.closing = true;
        self.ending.get_or_insert(Ending {
            code: code.as_u16(),
            initiator: Initiator::Server,
        });
        deadline.start(self.close_timeout());
    }

    /// Reads frames and writes what the outbox holds until the connection is
    /// over, and says how it ended.
    async fn serve<S>(&mut self, socket: &mut WebSocketStream<S>, pending: &mut Pending) -> Ending
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handle = self.handle.clone();
        let mut close_deadline = CloseDeadline::default();
        loop {
            tokio::select! {
                end = handle.outbox.next_batch(&mut pending.batch), if !pending.close_sent => {
                    if let Some(ending) = self.on_outgoing(socket, pending, end, &mut close_deadline).await {
                        return ending;
                    }
                }
                () = close_deadline.elapsed() => {
                    tracing::debug!("peer did not finish the close handshake in time");
                    return self.ending_or_abrupt();
                }
                next = socket.next() => match next {
                    None => return self.ending_or_abrupt(),
                    Some(Ok(message)) => {
                        self.gateway.hub.touch(&self.handle);
                        if !self.closing || matches!(message, Message::Close(_)) {
                            self.on_message(message).await;
                        }
                    }
                    // The stream is unusable after an error: stop reading. If a
                    // close frame was requested, `finish` sends it.
                    Some(Err(err)) => return self.on_read_error(err),
                },
            }
        }
    }

    /// Writes the batch the outbox handed over, then acts on its end request:
    /// the close frame after the batch, or nothing more on an abort. Returns
    /// how the connection ended once it is over.
    async fn on_outgoing<S>(
        &mut self,
        socket: &mut WebSocketStream<S>,
        pending: &mut Pending,
        end: Option<EndRequest>,
        close_deadline: &mut CloseDeadline,
    ) -> Option<Ending>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match &end {
            Some(EndRequest::Abort) => return Some(self.ending_or_abrupt()),
            Some(EndRequest::Close { code, .. }) => self.close_requested(*code, close_deadline),
            None => {}
        }
        // Most batches fit in the socket's send buffer: written in one poll,
        // with no timer or end watch. A write that has to wait goes through
        // the bounded path, boxed so its larger future is held only while a
        // write waits, not by every idle connection. Retrying is safe: frames
        // leave the batch one at a time.
        let gateway = self.gateway.clone();
        let written = match pending.write(socket, &gateway.metrics).now_or_never() {
            Some(result) => Written::from(result),
            None => Box::pin(self.write_bounded(socket, pending, close_deadline)).await,
        };
        let end = match written {
            Written::All => end,
            Written::Failed => {
                self.handle.outbox.abort();
                return Some(self.ending_or_abrupt());
            }
            // A frame larger than `websocket.max_write_buffer_bytes` can
            // never be taken: the peer is told so with a close code (what
            // was already written goes first), not a reset. Configuration
            // validation keeps this from happening to a message the gateway
            // accepted; this is the guard if it does.
            Written::TooLarge => {
                let code = CloseCode::InternalError;
                let reason = "a frame larger than the gateway's write buffer";
                pending.batch.clear();
                self.close(code, reason);
                self.close_requested(code, close_deadline);
                Some(EndRequest::Close {
                    code,
                    reason: CloseReason::text(reason).to_json(),
                })
            }
        };
        if let Some(EndRequest::Close { code, reason }) = end {
            pending.close_sent = true;
            let send = send_close(socket, code, reason);
            let sent = tokio::select! {
                () = send => true,
                () = close_deadline.elapsed() => false,
            };
            if !sent {
                return Some(self.ending_or_abrupt());
            }
        }
        None
    }

    /// Writes the pending batch. A write that blocks (the client stopped
    /// reading) gives way: to an abort at once, to a close request after the
    /// close deadline. False when the connection is to be dropped.
    async fn write_bounded<S>(
        &mut self,
        socket: &mut WebSocketStream<S>,
        pending: &mut Pending,
        close_deadline: &mut CloseDeadline,
    ) -> Written
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handle = self.handle.clone();
        let gateway = self.gateway.clone();
        let write = pending.write(socket, &gateway.metrics);
        tokio::pin!(write);
        loop {
            tokio::select! {
                written = &mut write => return Written::from(written),
                end = handle.outbox.ended(), if !close_deadline.is_set() => match end {
                    EndRequest::Abort => return Written::Failed,
                    EndRequest::Close { code, .. } => self.close_requested(code, close_deadline),
                },
                () = close_deadline.elapsed() => {
                    tracing::debug!("peer did not take its frames before the close deadline");
                    return Written::Failed;
                }
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
                    // Boxed: client frames are rare next to the time a
                    // connection sits idle, and the subscribe/publish futures
                    // inline would widen every connection's task.
                    Route::Topics => Box::pin(self.on_text(&text)).await,
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
                let code = frame.map_or(NO_STATUS_RECEIVED, |f| u16::from(f.code));
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

    /// Lets go of the connection: sends a requested close frame the loop did
    /// not get to (it stops reading on bad input), bounded by the close
    /// timeout, then releases subscriptions and counts the end.
    async fn finish<S>(self, ending: Ending, socket: &mut WebSocketStream<S>, pending: &mut Pending)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let close_requested = matches!(
            self.handle.outbox.end_request(),
            Some(EndRequest::Close { .. })
        );
        if close_requested && !pending.close_sent {
            let gateway = self.gateway.clone();
            let flush_and_close = async {
                let Some(EndRequest::Close { code, reason }) =
                    self.handle.outbox.next_batch(&mut pending.batch).await
                else {
                    return;
                };
                if pending.write(socket, &gateway.metrics).await.is_ok() {
                    send_close(socket, code, reason).await;
                }
            };
            let _ = tokio::time::timeout(self.close_timeout(), flush_and_close).await;
        } else if !close_requested {
            // The peer is gone or closed first (tungstenite already answered
            // its close): drop what is queued and refuse further frames.
            self.handle.outbox.abort();
        }
        let gateway = &self.gateway;
        if let Some(at_ms) = self.session.expires_at_ms {
            gateway.expiries.remove(at_ms, self.handle.id);
        }
        gateway.connection_ended(&self.handle, ending.initiator);
        gateway.hub.remove(self.handle.id);
        for topic in &self.topics {
            gateway.broker.unsubscribe(topic, self.handle.id);
        }
        gateway.metrics.subscriptions.sub(self.topics.len() as i64);
        gateway
            .metrics
            .connection_closed(ending.code, ending.initiator);
        // Every 4002 the server sends records why (Outbox::close_slow).
        let sent_4002 = ending.code == CloseCode::SlowConsumer.as_u16()
            && ending.initiator == Initiator::Server;
        if let Some(why) = self.handle.outbox.slow().filter(|_| sent_4002) {
            gateway
                .metrics
                .slow_consumers
                .with_label_values(&[why.as_str()])
                .inc();
        }
        tracing::info!(
            code = ending.code,
            initiator = ending.initiator.as_str(),
            "connection ended"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::security::{pattern_list, AuthMethod};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn anonymous() -> Session {
        let all = pattern_list(&["#".to_owned()]);
        Session {
            subject: None,
            method: AuthMethod::Anonymous,
            expires_at_ms: None,
            subscribe: all.clone(),
            publish: all,
        }
    }

    /// A gateway-side connection on one end of an in-memory pipe of
    /// `pipe_bytes`; the other end is returned raw.
    async fn connection(
        pipe_bytes: usize,
    ) -> (
        Arc<Gateway>,
        Arc<ConnHandle>,
        impl std::future::Future<Output = ()> + Send,
        DuplexStream,
    ) {
        connection_with(Config::default(), pipe_bytes).await
    }

    async fn connection_with(
        config: Config,
        pipe_bytes: usize,
    ) -> (
        Arc<Gateway>,
        Arc<ConnHandle>,
        impl std::future::Future<Output = ()> + Send,
        DuplexStream,
    ) {
        let gateway = Gateway::new(config).expect("gateway");
        let (server_io, client_io) = tokio::io::duplex(pipe_bytes);
        let socket =
            WebSocketStream::from_raw_socket(server_io, Role::Server, Some(gateway.ws_config))
                .await;
        let handle = gateway.hub.register(Route::Topics);
        let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let task = run(
            gateway.clone(),
            socket,
            handle.clone(),
            anonymous(),
            peer,
            Welcome::Queue,
        );
        (gateway, handle, task, client_io)
    }

    fn closes(gateway: &Gateway, code: &str, initiator: &str) -> u64 {
        gateway
            .metrics
            .connections_closed
            .with_label_values(&[code, initiator])
            .get()
    }

    #[tokio::test]
    async fn the_welcome_written_with_the_101_is_one_text_frame_a_client_reads() {
        let gateway = Gateway::new(Config::default()).expect("gateway");
        let handle = gateway.hub.register(Route::Topics);
        let mut out = b"already queued".to_vec();
        write_welcome(&gateway, &handle, &mut out);
        let (mut server_io, client_io) = tokio::io::duplex(4096);
        tokio::io::AsyncWriteExt::write_all(&mut server_io, &out[14..])
            .await
            .expect("write");
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let text = client.next().await.expect("frame").expect("welcome");
        let frame: serde_json::Value =
            serde_json::from_str(text.to_text().expect("text")).expect("json");
        assert_eq!(frame["op"], "welcome");
        assert_eq!(frame["connection_id"], handle.label.as_str());
        assert_eq!(frame["server_id"], gateway.server_id.as_str());
        let echo = gateway.hub.register(Route::Echo);
        // Counted as the writer counts: one message, its payload's bytes.
        assert_eq!(gateway.metrics.messages_sent.get(), 1);
        let payload = text.to_text().expect("text").len() as u64;
        assert_eq!(gateway.metrics.bytes_sent.get(), payload);
        let mut none = Vec::new();
        write_welcome(&gateway, &echo, &mut none);
        assert!(none.is_empty(), "echo has no welcome");
        assert_eq!(gateway.metrics.messages_sent.get(), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_is_one_small_task() {
        let (_gateway, _handle, task, _client) = connection(1024).await;
        // Everything an idle connection's task holds: the socket, the
        // connection state and the select loop, once per connection (the
        // figures are in docs/benchmarks.md, bench/core.sh measures them).
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 1152,
            "connection future grew to {size} bytes: if the code grew it, box \
             the new state that an idle connection does not use; if only the \
             compiler changed, raise the bound to the new size and say so in \
             the commit (this pin exists to catch the former)"
        );
    }

    #[tokio::test]
    async fn frames_then_the_close_reach_the_client() {
        let (gateway, handle, task, client_io) = connection(64 * 1024).await;
        let task = tokio::spawn(task);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let welcome = client.next().await.expect("frame").expect("welcome");
        assert!(welcome.to_text().expect("text").contains("\"welcome\""));
        handle
            .outbox
            .push(Outgoing::Text(Utf8Bytes::from_static("one")))
            .expect("push");
        handle.outbox.close(CloseCode::GoingAway, "bye".to_owned());
        assert_eq!(
            client.next().await.expect("frame").expect("text"),
            Message::text("one")
        );
        match client.next().await.expect("frame").expect("close") {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected a close frame, got {other:?}"),
        }
        // The client answers the close; the connection ends and is counted.
        while client.next().await.is_some() {}
        task.await.expect("connection task");
        assert_eq!(gateway.hub.len(), 0);
        assert_eq!(closes(&gateway, "1001", "server"), 1);
    }

    /// A frame the write buffer can never hold (a configuration the
    /// validation now refuses) ends the connection with 1011 and a reason,
    /// after what was written before it — not with a reset.
    #[tokio::test]
    async fn a_frame_larger_than_the_write_buffer_closes_with_a_code() {
        let mut config = Config::default();
        config.websocket.write_buffer_bytes = 1024;
        config.websocket.max_write_buffer_bytes = 4096;
        let (gateway, handle, task, client_io) = connection_with(config, 64 * 1024).await;
        for text in ["before".to_owned(), "y".repeat(8192), "after".to_owned()] {
            handle
                .outbox
                .push(Outgoing::Text(Utf8Bytes::from(text)))
                .expect("push");
        }
        let task = tokio::spawn(task);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let welcome = client.next().await.expect("frame").expect("welcome");
        assert!(welcome.to_text().expect("text").contains("\"welcome\""));
        assert_eq!(
            client.next().await.expect("frame").expect("text"),
            Message::text("before")
        );
        match client.next().await.expect("frame").expect("close") {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1011);
                assert!(frame.reason.contains("write buffer"), "{}", frame.reason);
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
        while client.next().await.is_some() {}
        task.await.expect("connection task");
        assert_eq!(closes(&gateway, "1011", "server"), 1);
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_socket_takes_arrives_whole_and_in_order() {
        // 2 KiB of pipe, 32 frames of 1 KiB queued at once: the first write
        // attempt fills the pipe part way through the batch and gives up;
        // the bounded path must carry on with the very next frame.
        let (gateway, handle, task, client_io) = connection(2048).await;
        let frames: Vec<String> = (0..32)
            .map(|i| format!("{i:04}{}", "x".repeat(1020)))
            .collect();
        for frame in &frames {
            handle
                .outbox
                .push(Outgoing::Text(Utf8Bytes::from(frame.clone())))
                .expect("push");
        }
        let task = tokio::spawn(task);
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let welcome = client.next().await.expect("frame").expect("welcome");
        assert!(welcome.to_text().expect("text").contains("\"welcome\""));
        for expected in &frames {
            let got = client.next().await.expect("frame").expect("text");
            let got = got.to_text().expect("text");
            assert!(
                got == expected,
                "frame {} arrived where {} was due",
                &got[..4],
                &expected[..4]
            );
        }
        handle.outbox.close(CloseCode::GoingAway, String::new());
        while client.next().await.is_some() {}
        task.await.expect("connection task");
        assert_eq!(
            gateway.metrics.messages_sent.get(),
            33,
            "welcome + 32, each counted once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_to_a_peer_that_stopped_reading_gives_way_to_the_close_deadline() {
        // 4 KiB of pipe and a peer that never reads: the writes block.
        let (gateway, handle, task, _client_io) = connection(4096).await;
        let task = tokio::spawn(task);
        let kib = Utf8Bytes::from("x".repeat(1024));
        for _ in 0..16 {
            handle
                .outbox
                .push(Outgoing::Text(kib.clone()))
                .expect("push");
        }
        tokio::task::yield_now().await;
        handle.outbox.close(CloseCode::GoingAway, String::new());
        // Paused time runs ahead once everything waits: only the close
        // deadline (2 s) can end the blocked write.
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the blocked connection was given up on")
            .expect("connection task");
        assert_eq!(gateway.hub.len(), 0);
        assert_eq!(closes(&gateway, "1001", "server"), 1);
    }
}
