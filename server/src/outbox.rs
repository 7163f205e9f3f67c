//! The per-connection outgoing queue.
//!
//! Every frame for a connection goes through its `Outbox`; only the
//! connection's task takes frames out and touches the socket. The queue
//! is bounded by frame count and bytes. A push that does not fit marks the
//! connection a slow consumer: the queue is dropped at once (memory is freed
//! now, not when the socket drains) and the connection is asked to close with
//! 4002. A publisher therefore never blocks and never grows memory for a
//! client that cannot keep up.
//!
//! The queue is a `Mutex<VecDeque>` rather than a channel: an empty
//! `VecDeque` allocates nothing, so an idle connection costs only this struct,
//! and the connection swaps the whole queue out in one lock to write it as a batch.
//!
//! The connection is woken through an `AtomicWaker`, not a `Notify`: a fan-out
//! pushes to every subscriber from one thread while the connections run on
//! the others, and a `Notify` takes a second lock (its waiter list) on both
//! sides of every wake. The waker is registered before the queue is checked,
//! so a push between the check and the connection going to sleep still wakes
//! it; and only a push into an empty queue wakes at all (a non-empty queue has
//! a wake on the way already).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Mutex, MutexGuard};
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use switchyard_protocol::CloseCode;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A frame waiting to be written.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A live `message` frame, shared with every other subscriber. `published_at`
    /// feeds the fan-out latency histogram when the frame is written.
    Live {
        /// The encoded frame.
        text: Utf8Bytes,
        /// When the broker accepted the publish.
        published_at: Instant,
    },
    /// Any other text frame (replayed messages, replies, heartbeats).
    Text(Utf8Bytes),
    /// A binary frame (only the echo route sends these).
    Binary(Bytes),
    /// A protocol-level ping.
    Ping,
}

impl Outgoing {
    /// Bytes this frame holds, for the queue's byte bound.
    pub fn len(&self) -> usize {
        match self {
            Outgoing::Live { text, .. } | Outgoing::Text(text) => text.len(),
            Outgoing::Binary(bytes) => bytes.len(),
            Outgoing::Ping => 0,
        }
    }
}

/// How a connection has been asked to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndRequest {
    /// Send what is queued, then a close frame with this code and reason.
    Close {
        /// The close code.
        code: CloseCode,
        /// The close reason (compact JSON, at most 123 bytes).
        reason: String,
    },
    /// Drop the connection now without a close handshake (a dead peer).
    Abort,
}

/// Why the server closes a connection with 4002: the `reason` label of
/// `switchyard_slow_consumers_total`, so a dashboard tells a client that
/// cannot keep up from one that publishes too fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slow {
    /// Its outgoing queue was full.
    QueueFull,
    /// More arrived for a topic than its subscribe's replay buffers.
    SubscribeBacklog,
    /// More arrived while the backplane recovered than it buffers.
    RecoveryOverflow,
    /// It published over its rate `max_violations` times in a row.
    PublishRate,
}

impl Slow {
    /// Every reason (pre-initialised label values).
    pub const ALL: [Slow; 4] = [
        Slow::QueueFull,
        Slow::SubscribeBacklog,
        Slow::RecoveryOverflow,
        Slow::PublishRate,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Slow::QueueFull => "queue_full",
            Slow::SubscribeBacklog => "subscribe_backlog",
            Slow::RecoveryOverflow => "recovery_overflow",
            Slow::PublishRate => "publish_rate",
        }
    }

    /// The close frame's reason text.
    fn text(self) -> &'static str {
        match self {
            Slow::QueueFull => "slow consumer: queue full",
            Slow::SubscribeBacklog => "subscribe backlog overflowed",
            Slow::RecoveryOverflow => "backplane recovery overflowed",
            Slow::PublishRate => "publish rate exceeded",
        }
    }
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue was full: the connection is now closing with 4002.
    Full,
    /// The connection is already ending; the frame was dropped.
    Ending,
}

/// Bounds of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    /// Most frames queued.
    pub max_messages: usize,
    /// Most bytes queued; a single frame always fits into an empty queue.
    pub max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    end: Option<EndRequest>,
    /// Why the end is a 4002, when it is one.
    slow: Option<Slow>,
}

impl State {
    /// Ends with 4002 for `why`.
    fn end_slow(&mut self, why: Slow) {
        self.end = Some(EndRequest::Close {
            code: CloseCode::SlowConsumer,
            reason: switchyard_protocol::close::CloseReason::text(why.text()).to_json(),
        });
        self.slow = Some(why);
    }
}

/// A bounded queue of outgoing frames with its end signal.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    limits: OutboxLimits,
    /// Wakes the connection's write side: frames or an end request are waiting.
    writer_wake: AtomicWaker,
    /// Wakes a write that waits for room: an end request is waiting.
    end_wake: AtomicWaker,
}

impl Outbox {
    /// An empty outbox; allocates no queue storage until the first push.
    pub fn new(limits: OutboxLimits) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            limits,
            writer_wake: AtomicWaker::new(),
            end_wake: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single call), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the connection to write. Never blocks.
    pub fn push(&self, frame: Outgoing) -> Result<(), PushError> {
        let mut state = self.lock();
        if state.end.is_some() {
            return Err(PushError::Ending);
        }
        let len = frame.len();
        let fits = state.queue.is_empty()
            || (state.queue.len() < self.limits.max_messages
                && state.bytes + len <= self.limits.max_bytes);
        if !fits {
            state.queue = VecDeque::new();
            state.bytes = 0;
            state.end_slow(Slow::QueueFull);
            drop(state);
            self.wake_both();
            return Err(PushError::Full);
        }
        let was_empty = state.queue.is_empty();
        state.bytes += len;
        state.queue.push_back(frame);
        drop(state);
        if was_empty {
            self.writer_wake.wake();
        }
        Ok(())
    }

    /// Asks the connection to close with `code` after what is queued. The
    /// first end request wins; later ones are ignored.
    pub fn close(&self, code: CloseCode, reason: String) {
        self.request_end(|state| state.end = Some(EndRequest::Close { code, reason }));
    }

    /// Asks for a 4002 close after what is queued, for `why` (unless the
    /// connection is already ending).
    pub fn close_slow(&self, why: Slow) {
        self.request_end(|state| state.end_slow(why));
    }

    /// Applies `end` unless an end was already requested (the first wins).
    fn request_end(&self, end: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        if state.end.is_none() {
            end(&mut state);
            drop(state);
            self.wake_both();
        }
    }

    /// Why the connection was closed with 4002, if it was.
    pub fn slow(&self) -> Option<Slow> {
        self.lock().slow
    }

    /// Asks the connection to end now, discarding what is queued. Overrides a
    /// pending close: a peer that did not answer is not waited for again.
    pub fn abort(&self) {
        let mut state = self.lock();
        state.queue = VecDeque::new();
        state.bytes = 0;
        state.end = Some(EndRequest::Abort);
        drop(state);
        self.wake_both();
    }

    fn wake_both(&self) {
        self.writer_wake.wake();
        self.end_wake.wake();
    }

    /// The end request, if one was made.
    pub fn end_request(&self) -> Option<EndRequest> {
        self.lock().end.clone()
    }

    /// Frames currently queued.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// For the connection: waits until frames or an end request are present, then
    /// moves every queued frame into `batch` (which must be empty) and returns
    /// the end request, if any. The connection sends the batch, then the close.
    pub async fn next_batch(&self, batch: &mut VecDeque<Outgoing>) -> Option<EndRequest> {
        poll_fn(|cx| {
            // Registered first: a push after the check below wakes this task.
            self.writer_wake.register(cx.waker());
            let mut state = self.lock();
            if !state.queue.is_empty() {
                std::mem::swap(&mut state.queue, batch);
                state.bytes = 0;
                return Poll::Ready(state.end.clone());
            }
            match &state.end {
                Some(end) => Poll::Ready(Some(end.clone())),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// For a write that waits for room: resolves when the connection is asked to end.
    pub async fn ended(&self) -> EndRequest {
        poll_fn(|cx| {
            self.end_wake.register(cx.waker());
            match self.end_request() {
                Some(end) => Poll::Ready(end),
                None => Poll::Pending,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Outgoing {
        Outgoing::Text(Utf8Bytes::from(s))
    }

    fn outbox(max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox::new(OutboxLimits {
            max_messages,
            max_bytes,
        })
    }

    #[tokio::test]
    async fn full_queue_becomes_a_slow_consumer_close() {
        let outbox = outbox(2, 1000);
        assert_eq!(outbox.push(text("a")), Ok(()));
        assert_eq!(outbox.push(text("b")), Ok(()));
        assert_eq!(outbox.push(text("c")), Err(PushError::Full));
        assert_eq!(outbox.queued(), 0, "queue memory is released at once");
        assert_eq!(outbox.push(text("d")), Err(PushError::Ending));
        let mut batch = VecDeque::new();
        match outbox.next_batch(&mut batch).await {
            Some(EndRequest::Close { code, .. }) => assert_eq!(code, CloseCode::SlowConsumer),
            other => panic!("unexpected {other:?}"),
        }
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn byte_bound_applies_but_one_frame_always_fits() {
        let outbox = outbox(100, 4);
        assert_eq!(outbox.push(text("0123456789")), Ok(()), "first frame fits");
        assert_eq!(outbox.push(text("x")), Err(PushError::Full));

        let outbox = self::outbox(100, 4);
        assert_eq!(outbox.push(text("ab")), Ok(()));
        assert_eq!(outbox.push(text("cd")), Ok(()));
        assert_eq!(outbox.push(text("e")), Err(PushError::Full));
    }

    #[tokio::test]
    async fn writer_gets_queue_then_close() {
        let outbox = outbox(10, 1000);
        outbox.push(text("a")).expect("push");
        outbox.push(Outgoing::Ping).expect("push");
        outbox.close(CloseCode::GoingAway, String::new());
        outbox.close(CloseCode::Migrate, String::new());
        let mut batch = VecDeque::new();
        let end = outbox.next_batch(&mut batch).await;
        assert_eq!(batch.len(), 2);
        assert_eq!(
            end,
            Some(EndRequest::Close {
                code: CloseCode::GoingAway,
                reason: String::new()
            }),
            "the first end request wins"
        );
        assert_eq!(outbox.ended().await, end.expect("end"));
    }

    #[tokio::test]
    async fn abort_overrides_close_and_drops_queue() {
        let outbox = outbox(10, 1000);
        outbox.push(text("a")).expect("push");
        outbox.close(CloseCode::GoingAway, String::new());
        outbox.abort();
        assert_eq!(outbox.queued(), 0);
        assert_eq!(outbox.ended().await, EndRequest::Abort);
    }

    #[tokio::test]
    async fn writer_wakes_on_push() {
        let outbox = std::sync::Arc::new(outbox(10, 1000));
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut batch = VecDeque::new();
                outbox.next_batch(&mut batch).await;
                batch.len()
            })
        };
        tokio::task::yield_now().await;
        outbox.push(text("late")).expect("push");
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), writer).await;
        assert_eq!(woken.expect("the writer was not woken").expect("join"), 1);
    }

    /// A lost wake would hang the test: fail it instead.
    async fn next_batch_len(
        batches: &mut tokio::sync::mpsc::UnboundedReceiver<usize>,
    ) -> Option<usize> {
        tokio::time::timeout(std::time::Duration::from_secs(10), batches.recv())
            .await
            .expect("the writer was not woken")
    }

    /// Only a push into an empty queue wakes the writer; the pushes after it
    /// ride on that wake, and a push after the writer took its batch wakes it
    /// again.
    #[tokio::test]
    async fn every_batch_wakes_the_writer_once_and_nothing_is_left_behind() {
        let outbox = std::sync::Arc::new(outbox(100, 100_000));
        let (batches_tx, mut batches) = tokio::sync::mpsc::unbounded_channel();
        let writer = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                loop {
                    let mut batch = VecDeque::new();
                    let end = outbox.next_batch(&mut batch).await;
                    let _ = batches_tx.send(batch.len());
                    if end.is_some() {
                        return;
                    }
                }
            })
        };
        tokio::task::yield_now().await;
        for round in 0..3 {
            for _ in 0..=round {
                outbox.push(text("x")).expect("push");
            }
            assert_eq!(
                next_batch_len(&mut batches).await,
                Some(round + 1),
                "round {round}"
            );
        }
        outbox.close(CloseCode::GoingAway, String::new());
        assert_eq!(next_batch_len(&mut batches).await, Some(0));
        writer.await.expect("join");
    }

    #[tokio::test]
    async fn a_write_waiting_for_room_hears_the_close() {
        let outbox = std::sync::Arc::new(outbox(10, 1000));
        let waiting = {
            let outbox = outbox.clone();
            tokio::spawn(async move { outbox.ended().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        outbox.close(CloseCode::Migrate, "r".into());
        assert_eq!(
            waiting.await.expect("join"),
            EndRequest::Close {
                code: CloseCode::Migrate,
                reason: "r".into()
            }
        );
    }
}
