//! Writing to the socket: the batch taken from the outbox and written with
//! one flush (counting what was sent and its fan-out latency), the close
//! frame, and the close deadline's timer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::{Sink, SinkExt};
use switchyard_protocol::CloseCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::metrics::Metrics;
use crate::outbox::Outgoing;

/// When a closing connection is given up on. No timer exists until the
/// connection starts to close; then one boxed `Sleep`. Held inline, a timer
/// (112 bytes) would widen every idle connection's task at each select that
/// waits on it.
#[derive(Default)]
pub(super) struct CloseDeadline(Option<Pin<Box<tokio::time::Sleep>>>);

impl CloseDeadline {
    /// Starts the deadline `after` from now, unless it is already running.
    pub(super) fn start(&mut self, after: Duration) {
        if self.0.is_none() {
            self.0 = Some(Box::pin(tokio::time::sleep(after)));
        }
    }

    pub(super) fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Resolves when the deadline has passed; never while it is not set.
    pub(super) async fn elapsed(&mut self) {
        match &mut self.0 {
            Some(sleep) => sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

/// Frames taken from the outbox and not yet written, and whether the close
/// frame has gone out. Kept across the loop so a write given up on does not
/// lose track of what was sent.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) batch: VecDeque<Outgoing>,
    /// Publish times of the live frames handed to the socket, not yet flushed.
    published: Vec<Instant>,
    /// Data frames and bytes handed to the socket, not yet counted.
    frames: u64,
    bytes: u64,
    pub(super) close_sent: bool,
}

impl Pending {
    /// Writes the batch with one flush, then counts what was sent and
    /// records the fan-out latency of its live frames.
    ///
    /// Safe to abandon at any await and call again: a frame leaves the batch
    /// only once the socket has taken it (`start_send` after `poll_ready`),
    /// never while waiting for room, so nothing is lost when the fast path
    /// gives up on a full socket and the bounded path carries on.
    pub(super) async fn write<S>(
        &mut self,
        socket: &mut WebSocketStream<S>,
        metrics: &Metrics,
    ) -> Result<(), WsError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        while !self.batch.is_empty() {
            std::future::poll_fn(|cx| Pin::new(&mut *socket).poll_ready(cx)).await?;
            let Some(frame) = self.batch.pop_front() else {
                break;
            };
            let message = match frame {
                Outgoing::Live { text, published_at } => {
                    self.published.push(published_at);
                    Message::Text(text)
                }
                Outgoing::Text(text) => Message::Text(text),
                Outgoing::Binary(data) => Message::Binary(data),
                Outgoing::Ping => Message::Ping(Default::default()),
            };
            if !matches!(message, Message::Ping(_)) {
                self.frames += 1;
                self.bytes += message.len() as u64;
            }
            Pin::new(&mut *socket).start_send(message)?;
        }
        std::future::poll_fn(|cx| Pin::new(&mut *socket).poll_flush(cx)).await?;
        // Keep a small queue allocation for the next batch, not a burst's worth.
        if self.batch.capacity() > 64 {
            self.batch = VecDeque::new();
        }
        let written = Instant::now();
        // Replies and heartbeats carry no fan-out latency: no histogram work.
        if !self.published.is_empty() {
            metrics.observe_fanout_latencies(
                self.published
                    .drain(..)
                    .map(|at| written.saturating_duration_since(at).as_secs_f64()),
            );
        }
        metrics
            .messages_sent
            .inc_by(std::mem::take(&mut self.frames));
        metrics.bytes_sent.inc_by(std::mem::take(&mut self.bytes));
        Ok(())
    }
}

/// Sends a close frame; a failure only means the peer is already gone.
pub(super) async fn send_close<S>(socket: &mut WebSocketStream<S>, code: CloseCode, reason: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let frame = CloseFrame {
        code: WireCloseCode::from(code.as_u16()),
        reason: Utf8Bytes::from(reason),
    };
    if let Err(err) = socket.send(Message::Close(Some(frame))).await {
        tracing::debug!(%err, "close frame not sent");
    }
}
