//! The Redis backplane: topic logs shared by every gateway on one Redis.
//!
//! Where things live:
//! - `PREFIX:{topic}:meta` (hash `epoch`, `offset`) and `PREFIX:{topic}:log`
//!   (a stream of `o` offset, `f` encoded frame), both expiring
//!   `redis.topic_ttl_ms` after the last publish;
//! - channel `PREFIX:topic` carries `"<epoch> <offset>\n<frame>"` for every publish.
//!
//! Only Redis assigns offsets: `publish.lua` creates the log (with the
//! caller's candidate epoch) if it is missing, increments the offset, appends
//! the frame, trims the history by count and age and publishes — one atomic
//! script. The frame is built once there, and every pod forwards its bytes.
//!
//! Each pod holds one pub/sub connection with one subscription per topic
//! that has local subscribers. A new local subscriber is registered as
//! *pending* (arrivals are buffered for it), the channel subscription is
//! confirmed, then `snapshot.lua` returns the head and the entries after
//! `since` atomically; the subscriber gets `subscribed`, the replay, and the
//! buffered arrivals after the head — then goes live. Whatever races the
//! subscribe lands either in the snapshot or in the buffer, and
//! [`is_after`] drops the overlap.
//!
//! When the pub/sub connection drops, the pod reconnects with backoff,
//! resubscribes every topic and fills the gap from the stream starting at
//! the last position it delivered; arrivals wait in a per-topic buffer
//! meanwhile. A gap the stream can no longer fill (trimmed, or Redis lost
//! the log) is told to subscribers as `subscribed {recovered: false}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use prometheus::{Histogram, IntCounter, IntGauge};
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream};
use redis::{Script, Value};
use serde_json::value::RawValue;
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::position::EPOCH_TIE_BITS;
use switchyard_protocol::{CloseCode, Position, ServerFrame};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::log::{resume_from_snapshot, Resume, Retention};
use super::{Broker, BrokerError, Subscribed, Subscriber};
use crate::config::RedisSettings;
use crate::outbox::{Outgoing, Slow};
use crate::security::tickets::{TicketError, TicketStore};
use crate::task::AbortOnDrop;
use switchyard_protocol::position::is_after;

/// The metrics the backplane reports.
#[derive(Clone)]
pub struct BackplaneMetrics {
    /// `switchyard_backplane_up`.
    pub up: IntGauge,
    /// `switchyard_backplane_publish_seconds`.
    pub publish_seconds: Histogram,
    /// `switchyard_backplane_reconnects_total`.
    pub reconnects: IntCounter,
    /// `switchyard_backplane_recovered_messages_total`.
    pub recovered_messages: IntCounter,
    /// `switchyard_backplane_foreign_messages_total`.
    pub foreign_messages: IntCounter,
    /// `switchyard_backplane_stale_messages_total`.
    pub stale_messages: IntCounter,
}

/// Everything the Redis broker needs to start.
pub struct RedisOptions {
    /// Connection and key settings.
    pub settings: RedisSettings,
    /// History bounds per topic.
    pub retention: Retention,
    /// Most topics this pod subscribes to at once.
    pub max_topics: usize,
    /// Most messages buffered for one pending subscriber or one recovering
    /// topic (the outbox bound, so a buffer is never bigger than a queue).
    pub max_pending: usize,
    /// Metrics.
    pub metrics: BackplaneMetrics,
}

type Pending = Vec<(Position, Utf8Bytes)>;

/// A local subscriber; `pending` is `Some` until its replay is done.
struct LocalSub {
    handle: Arc<dyn Subscriber>,
    pending: Option<Pending>,
    /// The head its replay went up to: a message at or before it, still in
    /// flight on pub/sub when the snapshot was taken, is not sent again.
    replayed_to: Option<Position>,
}

/// What this pod knows of a topic with local subscribers.
#[derive(Default)]
struct LocalTopic {
    subscribers: HashMap<u64, LocalSub>,
    /// The last position delivered here. Only deliveries move it: it filters
    /// duplicates, so moving it ahead of a message still in flight on pub/sub
    /// would drop that message for every subscriber here.
    last: Option<Position>,
    /// The head when the first local subscriber joined: where a recovery
    /// starts if nothing has been delivered here yet. Filters nothing.
    floor: Option<Position>,
    /// The pub/sub generation on which this topic's SUBSCRIBE was confirmed
    /// (0: not yet). While it matches the current generation the channel is
    /// live, so a new local subscriber needs no round trip to Redis.
    channel_generation: u64,
    /// `Some` while the topic recovers (after a reconnect, or to learn a new
    /// epoch from Redis); arrivals wait in it.
    recovering: Option<Pending>,
    /// The recovery that owns `recovering` (an id from
    /// [`Inner::next_recovery`]). Only it may apply a snapshot: two
    /// recoveries of one topic can run at once (a new epoch seen just as
    /// the link reconnects), and the one that finishes second would apply
    /// a snapshot taken from an older position — moving the topic back and
    /// replaying what its subscribers already have
    /// (`a_second_recovery_of_a_topic_applies_nothing`).
    recovery: u64,
    /// Epochs left behind when Redis answered with an *older* epoch than
    /// this pod had seen (a clock that stepped back; see
    /// [`Inner::apply_recovery`]): their frames still in flight are stale
    /// although their numbers are larger.
    retired: Vec<u64>,
}

/// What [`LocalTopic::deliver`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Delivered, buffered, or dropped as a duplicate.
    Done,
    /// Of an epoch the topic has moved past: dropped and counted.
    Stale,
    /// Of an epoch this pod has not seen: the topic now recovers (the message
    /// waits in its buffer) and Redis decides what the subscribers are told.
    NewEpoch,
}

/// How many retired epochs a topic remembers.
const MAX_RETIRED: usize = 4;

impl LocalTopic {
    /// The newest position this pod knows the topic at.
    fn known(&self) -> Option<Position> {
        self.last.or(self.floor)
    }

    /// Whether recovery `id` owns this topic's recovery, which has not been
    /// applied yet: only then may it snapshot and apply.
    fn recovering_for(&self, id: u64) -> bool {
        self.recovery == id && self.recovering.is_some()
    }

    /// Starts a recovery owned by `id` unless one runs; false if one was
    /// running.
    fn start_recovering(&mut self, id: u64) -> bool {
        if self.recovering.is_some() {
            return false;
        }
        self.recovering = Some(Vec::new());
        self.recovery = id;
        true
    }

    /// Hands one message to every local subscriber (or to the buffers).
    ///
    /// Epoch succession is explicit: a message of a later epoch than the
    /// topic's is never passed on by itself (the topic's keys were lost and
    /// made again, and what came before may be lost with them); the topic
    /// recovers, and the snapshot says whether subscribers get a replay of
    /// the new epoch or `recovered: false`. A message of an earlier epoch
    /// is stale and never passes. Unit tests: `a_new_epoch_is_learned_from_redis`,
    /// `stale_epochs_never_pass_after_a_new_one`.
    fn deliver(&mut self, position: Position, frame: &Utf8Bytes, max_pending: usize) -> Delivery {
        if let Some(buffer) = &mut self.recovering {
            if buffer.len() < max_pending {
                buffer.push((position, frame.clone()));
            } else {
                // Too much arrived while recovering: let the subscribers
                // resume on their own from their positions.
                buffer.clear();
                for sub in self.subscribers.values() {
                    sub.handle.outbox().close_slow(Slow::RecoveryOverflow);
                }
            }
            return Delivery::Done;
        }
        if self.retired.contains(&position.epoch) {
            return Delivery::Stale;
        }
        if let Some(known) = self.known() {
            if position.epoch < known.epoch {
                return Delivery::Stale;
            }
            if position.epoch > known.epoch {
                self.recovering = Some(vec![(position, frame.clone())]);
                return Delivery::NewEpoch;
            }
        }
        if !is_after(self.last, position) {
            return Delivery::Done;
        }
        self.last = Some(position);
        // A trace of its own: the publisher's trace context does not travel
        // through Redis (see docs/observability.md).
        let _fanout = tracing::info_span!(
            "fanout",
            offset = position.offset,
            subscribers = self.subscribers.len()
        )
        .entered();
        let now = Instant::now();
        for sub in self.subscribers.values_mut() {
            match &mut sub.pending {
                Some(buffer) if buffer.len() < max_pending => {
                    buffer.push((position, frame.clone()))
                }
                Some(_) => sub.handle.outbox().close_slow(Slow::SubscribeBacklog),
                None if !is_after(sub.replayed_to, position) => {}
                None => {
                    // A full outbox closes its connection (4002); others are unaffected.
                    let _ = sub.handle.outbox().push(Outgoing::Live {
                        text: frame.clone(),
                        published_at: now,
                    });
                }
            }
        }
        Delivery::Done
    }

    fn close_all(&self, code: CloseCode, reason: &str) {
        let reason = CloseReason::text(reason).to_json();
        for sub in self.subscribers.values() {
            sub.handle.outbox().close(code, reason.clone());
        }
    }
}

/// Requests to the task that owns the pub/sub connection. One task issues
/// every SUBSCRIBE/UNSUBSCRIBE, in order, so they cannot overtake each other.
enum Control {
    /// Make sure the channel is subscribed; answers the connection generation.
    Subscribe {
        topic: String,
        done: oneshot::Sender<Result<u64, BrokerError>>,
    },
    /// Unsubscribe the channel if no local subscriber is left.
    Unsubscribe(String),
}

/// The topic's snapshot, as `snapshot.lua` returns it.
struct Snapshot {
    head: Position,
    /// (offset, frame), newest first.
    entries: Vec<(u64, Utf8Bytes)>,
}

struct Inner {
    options: RedisOptions,
    client: redis::Client,
    pool: Mutex<Vec<ConnectionManager>>,
    next_connection: AtomicUsize,
    topics: Mutex<HashMap<String, LocalTopic>>,
    control: mpsc::UnboundedSender<Control>,
    /// Incarnation of the pub/sub connection; a subscribe that spans a
    /// reconnect is refused rather than risk a gap.
    generation: AtomicU64,
    /// Ids of recoveries ([`LocalTopic::recovery`]).
    recoveries: AtomicU64,
    up: AtomicBool,
    publish: Script,
    snapshot: Script,
}

/// The Redis broker; see the module documentation.
pub struct RedisBroker {
    inner: Arc<Inner>,
}

/// A Redis client for the URL; with `rediss://` and a CA file, trusting that CA.
fn client(settings: &RedisSettings) -> Result<redis::Client, BrokerError> {
    match &settings.tls_ca_file {
        Some(path) if settings.url.starts_with("rediss://") => {
            let root_cert = std::fs::read(path)
                .map_err(|e| unavailable(format!("reading redis.tls_ca_file {path}: {e}")))?;
            redis::Client::build_with_tls(
                settings.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
            .map_err(unavailable)
        }
        _ => redis::Client::open(settings.url.as_str()).map_err(unavailable),
    }
}

/// The first wait after a failed Redis operation (connect, subscribe,
/// recovery snapshot); each further failure doubles it, up to a cap.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// Consecutive unanswered health pings after which the pub/sub link is dead.
const MISSED_PINGS_LIMIT: u32 = 3;

fn unavailable(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(err.to_string())
}

/// The tie-breaker for an epoch the scripts may have to begin (see
/// [`switchyard_protocol::position::epoch_at`]).
fn epoch_tie() -> u64 {
    rand::rng().random_range(0..1 << EPOCH_TIE_BITS)
}

impl RedisBroker {
    /// Starts the broker: returns at once and connects in the background, so
    /// a gateway starts (not ready) even while Redis is down.
    pub fn start(options: RedisOptions) -> Result<Arc<RedisBroker>, BrokerError> {
        let client = client(&options.settings)?;
        let (control, requests) = mpsc::unbounded_channel();
        options.metrics.up.set(0);
        let inner = Arc::new(Inner::new(options, client, control));
        tokio::spawn(supervise(Arc::downgrade(&inner), requests));
        Ok(Arc::new(RedisBroker { inner }))
    }
}

impl Inner {
    /// The broker's state, not yet connected (the supervisor connects it).
    fn new(
        options: RedisOptions,
        client: redis::Client,
        control: mpsc::UnboundedSender<Control>,
    ) -> Inner {
        Inner {
            options,
            client,
            pool: Mutex::new(Vec::new()),
            next_connection: AtomicUsize::new(0),
            topics: Mutex::new(HashMap::new()),
            control,
            generation: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            up: AtomicBool::new(false),
            publish: Script::new(concat!(
                include_str!("epoch.lua"),
                include_str!("publish.lua")
            )),
            snapshot: Script::new(concat!(
                include_str!("epoch.lua"),
                include_str!("snapshot.lua")
            )),
        }
    }

    /// A fresh recovery id (never 0, the id of no recovery).
    fn next_recovery(&self) -> u64 {
        self.recoveries.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<String, LocalTopic>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest epoch this pod has seen for `topic` (0: none): a new
    /// epoch Redis begins is always later, whatever its clock says. (Not a
    /// client's `since`: a forged one could push epochs past 2^53.)
    fn epoch_floor(&self, topic: &str) -> u64 {
        let known = self.topics().get(topic).and_then(LocalTopic::known);
        known.map_or(0, |p| p.epoch)
    }

    fn settings(&self) -> &RedisSettings {
        &self.options.settings
    }

    fn meta_key(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:meta", self.settings().key_prefix)
    }

    fn log_key(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:log", self.settings().key_prefix)
    }

    /// Where a ticket's grant lives (with a TTL) until redeemed.
    fn ticket_key(&self, ticket: &str) -> String {
        format!("{}:ticket:{ticket}", self.settings().key_prefix)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}:{topic}", self.settings().key_prefix)
    }

    fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.settings().key_prefix.as_str())?
            .strip_prefix(':')
    }

    /// A command connection, round robin over the pool. Command connections
    /// reconnect on their own and do not depend on the pub/sub link: a
    /// publish made while this pod's pub/sub reconnects lands in the stream,
    /// and the recovery delivers it.
    fn connection(&self) -> Result<ConnectionManager, BrokerError> {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.is_empty() {
            return Err(BrokerError::Unavailable("Redis backplane is down".into()));
        }
        let index = self.next_connection.fetch_add(1, Ordering::Relaxed) % pool.len();
        Ok(pool[index].clone())
    }

    async fn publish(&self, topic: &str, data: &RawValue) -> Result<Position, BrokerError> {
        let mut connection = self.connection()?;
        let retention = self.options.retention;
        let started = Instant::now();
        let topic_json = serde_json::to_string(topic).map_err(unavailable)?;
        let result: Result<(String, String), _> = self
            .publish
            .key(self.meta_key(topic))
            .key(self.log_key(topic))
            .arg(epoch_tie())
            .arg(topic_json)
            .arg(data.get())
            .arg(retention.max_entries)
            .arg(retention.max_age.as_millis() as u64)
            .arg(self.settings().topic_ttl_ms)
            .arg(self.channel(topic))
            .arg(self.epoch_floor(topic))
            .invoke_async(&mut connection)
            .await;
        self.options
            .metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        let (epoch, offset) = result.map_err(publish_error)?;
        match (epoch.parse(), offset.parse()) {
            (Ok(epoch), Ok(offset)) => Ok(Position::new(epoch, offset)),
            _ => Err(unavailable(format!(
                "bad publish reply {epoch:?} {offset:?}"
            ))),
        }
    }

    async fn snapshot(
        &self,
        topic: &str,
        since: Option<Position>,
    ) -> Result<Snapshot, BrokerError> {
        let mut connection = self.connection()?;
        let retention = self.options.retention;
        let (since_epoch, since_offset) =
            since.map_or((String::new(), 0), |p| (p.epoch.to_string(), p.offset));
        let reply: Value = self
            .snapshot
            .key(self.meta_key(topic))
            .key(self.log_key(topic))
            .arg(epoch_tie())
            .arg(since_epoch)
            .arg(since_offset)
            .arg(retention.max_entries)
            .arg(retention.max_age.as_millis() as u64)
            .arg(self.settings().topic_ttl_ms)
            .arg(self.epoch_floor(topic))
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        parse_snapshot(reply).ok_or_else(|| unavailable("malformed snapshot reply"))
    }

    /// Asks the pub/sub task to make sure `topic`'s channel is subscribed.
    async fn ensure_channel(&self, topic: &str) -> Result<u64, BrokerError> {
        let (done, answer) = oneshot::channel();
        self.control
            .send(Control::Subscribe {
                topic: topic.to_owned(),
                done,
            })
            .map_err(unavailable)?;
        answer.await.map_err(unavailable)?
    }

    /// Removes a local subscriber; the channel goes when the last one does.
    fn remove_subscriber(&self, topic: &str, conn_id: u64) {
        let mut topics = self.topics();
        let Some(local) = topics.get_mut(topic) else {
            return;
        };
        local.subscribers.remove(&conn_id);
        if local.subscribers.is_empty() {
            topics.remove(topic);
            let _ = self.control.send(Control::Unsubscribe(topic.to_owned()));
        }
    }

    async fn subscribe(
        self: &Arc<Self>,
        topic: &str,
        since: Option<Position>,
        handle: Arc<dyn Subscriber>,
    ) -> Result<Subscribed, BrokerError> {
        let id = handle.id();
        let confirmed = {
            let mut topics = self.topics();
            if !topics.contains_key(topic) && topics.len() >= self.options.max_topics {
                return Err(BrokerError::TooManyTopics(self.options.max_topics));
            }
            let local = topics.entry(topic.to_owned()).or_default();
            local.subscribers.insert(
                id,
                LocalSub {
                    handle: handle.clone(),
                    pending: Some(Vec::new()),
                    replayed_to: None,
                },
            );
            let current = self.generation.load(Ordering::Relaxed);
            (local.channel_generation == current && current != 0).then_some(current)
        };
        let result = self
            .complete_subscribe(topic, since, handle.as_ref(), confirmed)
            .await;
        if result.is_err() {
            self.remove_subscriber(topic, id);
        }
        result
    }

    /// Steps 2–4 of a subscribe: channel, snapshot, switch to live.
    async fn complete_subscribe(
        self: &Arc<Self>,
        topic: &str,
        since: Option<Position>,
        handle: &dyn Subscriber,
        confirmed: Option<u64>,
    ) -> Result<Subscribed, BrokerError> {
        let generation = match confirmed {
            Some(generation) => generation,
            None => self.ensure_channel(topic).await?,
        };
        let snapshot = self.snapshot(topic, since).await?;
        let mut topics = self.topics();
        if self.generation.load(Ordering::Relaxed) != generation {
            return Err(BrokerError::Unavailable(
                "the backplane reconnected during the subscribe; retry".into(),
            ));
        }
        let local = topics
            .get_mut(topic)
            .ok_or_else(|| unavailable("subscription vanished"))?;
        // The subscriber's snapshot and the topic agree on the epoch, or
        // the later one wins: a topic that moved past the snapshot's epoch
        // meanwhile (its subscribers were told) cannot hand this one the new
        // epoch's messages since the move, so the subscribe is retried; a
        // snapshot of a later epoch than the topic's is news for the others,
        // whom a recovery tells.
        let known = local.known().filter(|_| local.recovering.is_none());
        match known {
            Some(known) if known.epoch > snapshot.head.epoch => {
                return Err(BrokerError::Unavailable(
                    "the topic began a new epoch during the subscribe; retry".into(),
                ));
            }
            Some(known)
                if known.epoch < snapshot.head.epoch
                    && local.start_recovering(self.next_recovery()) =>
            {
                let (inner, topic, id) = (self.clone(), topic.to_owned(), local.recovery);
                tokio::spawn(async move { inner.recover(&topic, generation, id).await });
            }
            _ => {}
        }
        let pending = match local.subscribers.get_mut(&handle.id()) {
            Some(sub) => {
                sub.replayed_to = Some(snapshot.head);
                sub.pending.take().unwrap_or_default()
            }
            None => Vec::new(),
        };
        let fetched: Vec<u64> = snapshot.entries.iter().map(|(offset, _)| *offset).collect();
        let resume = resume_from_snapshot(since, snapshot.head, &fetched);
        let outbox = handle.outbox();
        // A restarted epoch is announced at its start, then replayed whole.
        let start = match resume {
            Resume::Restarted => Position::new(snapshot.head.epoch, 0),
            _ => snapshot.head,
        };
        let confirmation = ServerFrame::Subscribed {
            topic: topic.to_owned(),
            position: start,
            recovered: resume.recovered(),
        };
        let _ = outbox.push(Outgoing::Text(Utf8Bytes::from(confirmation.to_json())));
        let mut replayed = 0;
        if let Resume::ReplayAfter(_) | Resume::Restarted = resume {
            for (_, frame) in snapshot.entries.iter().rev() {
                let _ = outbox.push(Outgoing::Text(frame.clone()));
                replayed += 1;
            }
        }
        let now = Instant::now();
        for (position, frame) in pending {
            if is_after(Some(snapshot.head), position) {
                let _ = outbox.push(Outgoing::Live {
                    text: frame,
                    published_at: now,
                });
            }
        }
        if local.floor.is_none() {
            local.floor = Some(snapshot.head);
        }
        local.channel_generation = generation;
        Ok(Subscribed {
            position: snapshot.head,
            recovered: resume.recovered(),
            replayed,
        })
    }

    /// Fills the gap of one recovering topic (after a reconnect, or when a
    /// new epoch showed up), then lets it go live: again, if what it had
    /// buffered meanwhile shows yet another epoch.
    async fn recover(&self, topic: &str, generation: u64, id: u64) {
        let mut delay = FIRST_RETRY;
        loop {
            let since = match self.topics().get(topic) {
                Some(local) if local.recovering_for(id) => local.known(),
                _ => return, // gone, or another recovery owns it now
            };
            let snapshot = loop {
                if self.generation.load(Ordering::Relaxed) != generation {
                    return; // a newer connection runs its own recovery
                }
                match self.snapshot(topic, since).await {
                    Ok(snapshot) => break snapshot,
                    Err(err) => {
                        tracing::warn!(%topic, %err, "backplane recovery snapshot failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            };
            if !self.apply_recovery(topic, generation, id, since, snapshot) {
                return;
            }
        }
    }

    /// Applies a recovery's snapshot to its topic — unless the pub/sub link
    /// reconnected meanwhile: the newer link's recovery owns the topic's
    /// buffer now, and this one's snapshot may predate what that buffer
    /// holds, so taking it would deliver around a gap and move the topic's
    /// position past it. True when the topic must recover again: its
    /// buffer held a message of an epoch later than the snapshot's.
    fn apply_recovery(
        &self,
        topic: &str,
        generation: u64,
        id: u64,
        since: Option<Position>,
        snapshot: Snapshot,
    ) -> bool {
        let max_pending = self.options.max_pending;
        let mut topics = self.topics();
        if self.generation.load(Ordering::Relaxed) != generation {
            return false;
        }
        let Some(local) = topics.get_mut(topic) else {
            return false;
        };
        if !local.recovering_for(id) {
            // Another recovery owns the topic, or one has already applied.
            return false;
        }
        let buffered = local.recovering.take().unwrap_or_default();
        if let Some(since) = since.filter(|since| since.epoch > snapshot.head.epoch) {
            // Redis went back to an earlier epoch than this pod had seen: a
            // clock that stepped back when the topic's keys were lost and
            // made again by a pod that knew nothing of them. Ordered filters
            // (here and in clients) would take the earlier epoch for stale,
            // so every subscriber here reconnects and resumes from a fresh
            // snapshot, which tells it the truth; the later epoch is retired.
            tracing::error!(%topic, %since, head = %snapshot.head, "backplane epoch went back; subscribers resume");
            local.close_all(
                CloseCode::TryAgainLater,
                "backplane epoch went back; resume",
            );
            if local.retired.len() >= MAX_RETIRED {
                local.retired.remove(0);
            }
            local.retired.push(since.epoch);
            local.last = None;
            local.floor = Some(snapshot.head);
            return false;
        }
        let fetched: Vec<u64> = snapshot.entries.iter().map(|(offset, _)| *offset).collect();
        match resume_from_snapshot(since, snapshot.head, &fetched) {
            resume @ (Resume::Lost | Resume::Restarted) => {
                tracing::warn!(%topic, ?since, head = %snapshot.head, ?resume, "backplane gap cannot be filled");
                // A restarted epoch (Redis lost history) is announced at its
                // start and replayed whole, so nothing published since the
                // loss is skipped; otherwise the stream resumes at the head.
                let start = match resume {
                    Resume::Restarted => Position::new(snapshot.head.epoch, 0),
                    _ => snapshot.head,
                };
                let notice = Utf8Bytes::from(
                    ServerFrame::Subscribed {
                        topic: topic.to_owned(),
                        position: start,
                        recovered: false,
                    }
                    .to_json(),
                );
                // Told to whoever had the stream before the loss: a live
                // subscriber now; one still subscribing finds the notice among
                // its pending arrivals, after its own snapshot's replay (it
                // would otherwise go from its older head straight to what
                // follows `start`, silently). One that subscribed after the
                // loss (its snapshot at or past `start`) lost nothing.
                for sub in local.subscribers.values_mut() {
                    if !is_after(sub.replayed_to, start) {
                        continue;
                    }
                    match &mut sub.pending {
                        Some(buffer) => buffer.push((start, notice.clone())),
                        None => {
                            let _ = sub.handle.outbox().push(Outgoing::Text(notice.clone()));
                        }
                    }
                }
                local.last = Some(start);
                if resume == Resume::Restarted {
                    for (offset, frame) in snapshot.entries.iter().rev() {
                        let position = Position::new(snapshot.head.epoch, *offset);
                        local.deliver(position, frame, max_pending);
                    }
                }
            }
            Resume::UpToDate => {}
            Resume::ReplayAfter(_) => {
                for (offset, frame) in snapshot.entries.iter().rev() {
                    let position = Position::new(snapshot.head.epoch, *offset);
                    if is_after(local.last, position) {
                        self.options.metrics.recovered_messages.inc();
                    }
                    local.deliver(position, frame, max_pending);
                }
            }
        }
        if local.last.is_none() {
            // Nothing delivered yet: the snapshot is the newest known position.
            local.floor = Some(snapshot.head);
        }
        let mut again = false;
        for (position, frame) in buffered {
            match local.deliver(position, &frame, max_pending) {
                Delivery::Done => {}
                Delivery::Stale => self.options.metrics.stale_messages.inc(),
                // The rest of the buffer follows it into the new recovery's.
                Delivery::NewEpoch => again = true,
            }
        }
        tracing::info!(%topic, head = %snapshot.head, "backplane topic recovered");
        again
    }

    /// Delivers one pub/sub message to the local subscribers of its topic.
    fn dispatch(self: &Arc<Self>, channel: &str, payload: &[u8]) {
        let Some(topic) = self.topic_of(channel) else {
            return;
        };
        let Some((position, frame)) = parse_payload(payload) else {
            tracing::warn!(%channel, "ignoring a malformed backplane message");
            return;
        };
        // Channels are `prefix:topic`, and both may contain ':': prefix
        // `app` with topic `v2:x` and prefix `app:v2` with topic `x` share a
        // channel. The frame names its topic; another deployment's is dropped
        // before any subscriber sees it.
        if !frame_is_for(frame.as_bytes(), topic) {
            self.options.metrics.foreign_messages.inc();
            return;
        }
        let mut topics = self.topics();
        let Some(local) = topics.get_mut(topic) else {
            return;
        };
        match local.deliver(position, &frame, self.options.max_pending) {
            Delivery::Done => {}
            Delivery::Stale => self.options.metrics.stale_messages.inc(),
            Delivery::NewEpoch => {
                // Claimed under the topics lock, with the generation of
                // that moment: a reconnect after it claims the topic anew.
                local.recovery = self.next_recovery();
                let (inner, topic, id) = (self.clone(), topic.to_owned(), local.recovery);
                let generation = self.generation.load(Ordering::Relaxed);
                drop(topics);
                tokio::spawn(async move { inner.recover(&topic, generation, id).await });
            }
        }
    }
}

/// What a failed publish means for a retry. Nothing was applied when Redis
/// answered with an error, or when the request never left (a write refused
/// on a connection already gone: a broken pipe, refused, not connected).
/// Anything else — a timeout, a connection lost while the answer was due —
/// leaves the outcome unknown, and says so rather than invite a blind retry.
fn publish_error(err: redis::RedisError) -> BrokerError {
    // redis-rs keeps the io::Error's kind private; its message names it.
    let message = err.to_string().to_ascii_lowercase();
    let not_sent = err.is_io_error()
        && ["broken pipe", "connection refused", "not connected"]
            .iter()
            .any(|kind| message.contains(kind));
    match err.kind() {
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension => unavailable(err),
        _ if not_sent => unavailable(err),
        _ => BrokerError::OutcomeUnknown(err.to_string()),
    }
}

/// Whether a frame built by `publish.lua` was published to `topic`: it
/// begins `{"op":"message","topic":"<topic>",`. Topic names need no JSON
/// escaping (`protocol::topic`'s character set), so the name appears as is.
fn frame_is_for(frame: &[u8], topic: &str) -> bool {
    const HEAD: &[u8] = br#"{"op":"message","topic":""#;
    frame
        .strip_prefix(HEAD)
        .and_then(|rest| rest.strip_prefix(topic.as_bytes()))
        .is_some_and(|rest| rest.starts_with(br#"","#))
}

/// Parses `"<epoch> <offset>\n<frame>"`.
fn parse_payload(payload: &[u8]) -> Option<(Position, Utf8Bytes)> {
    let newline = payload.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&payload[..newline]).ok()?;
    let (epoch, offset) = header.split_once(' ')?;
    let position = Position::new(epoch.parse().ok()?, offset.parse().ok()?);
    let frame = Utf8Bytes::try_from(Bytes::copy_from_slice(&payload[newline + 1..])).ok()?;
    Some((position, frame))
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parses `{epoch, head, entries}` from `snapshot.lua`.
fn parse_snapshot(reply: Value) -> Option<Snapshot> {
    let Value::Array(parts) = reply else {
        return None;
    };
    let [epoch, head, entries] = <[Value; 3]>::try_from(parts).ok()?;
    let head = Position::new(
        as_text(&epoch)?.parse().ok()?,
        as_text(&head)?.parse().ok()?,
    );
    let Value::Array(entries) = entries else {
        return None;
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for entry in entries {
        // [id, [field, value, ...]]
        let Value::Array(mut pair) = entry else {
            return None;
        };
        let Value::Array(fields) = pair.pop()? else {
            return None;
        };
        let (mut offset, mut frame) = (None, None);
        for field in fields.chunks(2) {
            match (as_text(&field[0])?.as_str(), field.get(1)) {
                ("o", Some(value)) => offset = as_text(value)?.parse().ok(),
                ("f", Some(Value::BulkString(bytes))) => {
                    frame = Utf8Bytes::try_from(Bytes::from(bytes.clone())).ok()
                }
                _ => {}
            }
        }
        parsed.push((offset?, frame?));
    }
    Some(Snapshot {
        head,
        entries: parsed,
    })
}

async fn connect_pool(inner: &Inner) -> Result<(), BrokerError> {
    if !inner
        .pool
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
    {
        return Ok(());
    }
    let settings = inner.settings();
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .set_response_timeout(Some(Duration::from_millis(settings.command_timeout_ms)))
        .set_max_delay(Duration::from_millis(settings.reconnect_max_delay_ms))
        .set_number_of_retries(1);
    let mut pool = Vec::with_capacity(settings.pool_size);
    for _ in 0..settings.pool_size {
        let manager = inner
            .client
            .get_connection_manager_with_config(config.clone())
            .await
            .map_err(unavailable)?;
        pool.push(manager);
    }
    *inner.pool.lock().unwrap_or_else(|e| e.into_inner()) = pool;
    Ok(())
}

async fn connect_pubsub(inner: &Inner) -> Result<(PubSubSink, PubSubStream), BrokerError> {
    let timeout = Duration::from_millis(inner.settings().connect_timeout_ms);
    let pubsub = tokio::time::timeout(timeout, inner.client.get_async_pubsub())
        .await
        .map_err(|_| unavailable("connect timed out"))?
        .map_err(unavailable)?;
    Ok(pubsub.split())
}

/// Owns the pub/sub connection: connects with backoff, resubscribes and
/// recovers topics after a loss, and serves [`Control`] requests in order.
async fn supervise(weak: std::sync::Weak<Inner>, mut requests: mpsc::UnboundedReceiver<Control>) {
    let mut delay = FIRST_RETRY;
    let mut connected_before = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let max_delay = Duration::from_millis(inner.settings().reconnect_max_delay_ms);
        let connected = async {
            connect_pool(&inner).await?;
            let (mut sink, stream) = connect_pubsub(&inner).await?;
            // Connected is not answering: a Redis that accepts connections
            // but runs no command (paused, overloaded, half partitioned)
            // is not up, or readiness would flap back to 200 at once.
            let timeout = Duration::from_millis(inner.settings().command_timeout_ms);
            match tokio::time::timeout(timeout, sink.ping::<Value>()).await {
                Ok(Ok(_)) => Ok((sink, stream)),
                Ok(Err(err)) => Err(unavailable(err)),
                Err(_) => Err(unavailable(
                    "no answer to PING within redis.command_timeout_ms",
                )),
            }
        }
        .await;
        let (mut sink, stream) = match connected {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!(%err, retry_in_ms = delay.as_millis() as u64, "Redis backplane unreachable");
                drop(inner);
                refuse_until(&mut requests, delay).await;
                delay = (delay * 2).min(max_delay);
                continue;
            }
        };
        let generation = inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // Every topic with local subscribers recovers from where it stopped.
        let names: Vec<(String, u64)> = {
            let mut topics = inner.topics();
            topics
                .iter_mut()
                .map(|(name, local)| {
                    local.recovering = Some(Vec::new());
                    local.recovery = inner.next_recovery();
                    (name.clone(), local.recovery)
                })
                .collect()
        };
        let channels: Vec<String> = names.iter().map(|(t, _)| inner.channel(t)).collect();
        if !channels.is_empty() {
            let command_timeout = Duration::from_millis(inner.settings().command_timeout_ms);
            let resubscribed =
                match tokio::time::timeout(command_timeout, sink.subscribe(&channels)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("no answer within redis.command_timeout_ms".to_owned()),
                };
            if let Err(err) = resubscribed {
                // Backs off like a failed connect: a Redis that accepts
                // connections but refuses (or never answers) the subscribe
                // is not hammered.
                tracing::warn!(%err, retry_in_ms = delay.as_millis() as u64, "resubscribing failed");
                drop(inner);
                refuse_until(&mut requests, delay).await;
                delay = (delay * 2).min(max_delay);
                continue;
            }
        }
        delay = FIRST_RETRY;
        inner.up.store(true, Ordering::Relaxed);
        inner.options.metrics.up.set(1);
        if connected_before {
            inner.options.metrics.reconnects.inc();
        }
        connected_before = true;
        tracing::info!(
            topics = names.len(),
            generation,
            "Redis backplane connected"
        );
        for (name, id) in names {
            let inner = inner.clone();
            tokio::spawn(async move { inner.recover(&name, generation, id).await });
        }
        let (lost_tx, mut lost) = oneshot::channel::<()>();
        // Ended with the link, whatever ends it: a reader left running on a
        // link given up for silence would dispatch twice and fill the next
        // connection's recovery buffers.
        let reader = AbortOnDrop(tokio::spawn(read_messages(
            Arc::downgrade(&inner),
            stream,
            lost_tx,
        )));
        let ping_every = Duration::from_millis(inner.settings().command_timeout_ms.max(1000));
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        let mut missed_pings = 0;
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    None => return,
                    Some(request) => {
                        if !serve(&inner, &mut sink, request, generation).await {
                            tracing::warn!("Redis pub/sub command unanswered");
                            break;
                        }
                    }
                },
                _ = ping.tick() => {
                    // Detects a silent partition, which never ends the stream. In
                    // subscribed mode Redis answers PING with ["pong", ""], so
                    // any reply will do.
                    // A busy gateway (a migration storm on one worker thread)
                    // can answer one ping late; three in a row is a dead link.
                    let answer = tokio::time::timeout(ping_every, sink.ping::<Value>()).await;
                    if matches!(answer, Ok(Ok(_))) {
                        missed_pings = 0;
                    } else {
                        missed_pings += 1;
                        tracing::warn!(missed_pings, "Redis pub/sub ping unanswered");
                        if missed_pings >= MISSED_PINGS_LIMIT {
                            tracing::warn!("Redis pub/sub connection stopped answering");
                            break;
                        }
                    }
                }
                _ = &mut lost => break,
            }
        }
        drop(reader);
        inner.up.store(false, Ordering::Relaxed);
        inner.options.metrics.up.set(0);
        tracing::warn!("Redis backplane connection lost; reconnecting");
    }
}

/// Serves one control request on a live connection, each command bounded
/// by `redis.command_timeout_ms`: a silent partition during a (un)subscribe
/// would otherwise hold the supervisor (no health pings, readiness still
/// 200) until TCP gave up. False when the link is to be given up.
async fn serve(inner: &Inner, sink: &mut PubSubSink, request: Control, generation: u64) -> bool {
    let timeout = Duration::from_millis(inner.settings().command_timeout_ms);
    match request {
        Control::Subscribe { topic, done } => {
            let answered =
                tokio::time::timeout(timeout, sink.subscribe(inner.channel(&topic))).await;
            let alive = answered.is_ok();
            let result = match answered {
                Ok(result) => result.map(|()| generation).map_err(unavailable),
                Err(_) => Err(unavailable("subscribe timed out")),
            };
            let _ = done.send(result);
            alive
        }
        Control::Unsubscribe(topic) => {
            let unused = inner
                .topics()
                .get(&topic)
                .is_none_or(|local| local.subscribers.is_empty());
            if !unused {
                return true;
            }
            match tokio::time::timeout(timeout, sink.unsubscribe(inner.channel(&topic))).await {
                Ok(Ok(())) => true,
                Ok(Err(err)) => {
                    tracing::debug!(%topic, %err, "unsubscribe failed");
                    true
                }
                Err(_) => false,
            }
        }
    }
}

/// While disconnected: refuse subscribes at once instead of queueing them.
async fn refuse_until(requests: &mut mpsc::UnboundedReceiver<Control>, delay: Duration) {
    let deadline = tokio::time::sleep(delay);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            request = requests.recv() => match request {
                Some(Control::Subscribe { done, .. }) => {
                    let _ = done.send(Err(BrokerError::Unavailable("Redis backplane is down".into())));
                }
                Some(Control::Unsubscribe(_)) => {}
                None => return,
            },
        }
    }
}

async fn read_messages(
    weak: std::sync::Weak<Inner>,
    mut stream: PubSubStream,
    lost: oneshot::Sender<()>,
) {
    while let Some(message) = stream.next().await {
        let Some(inner) = weak.upgrade() else { return };
        inner.dispatch(message.get_channel_name(), message.get_payload_bytes());
    }
    let _ = lost.send(());
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        self.inner.publish(topic, data).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        since: Option<Position>,
        subscriber: Arc<dyn Subscriber>,
    ) -> BoxFuture<'a, Result<Subscribed, BrokerError>> {
        self.inner.subscribe(topic, since, subscriber).boxed()
    }

    fn unsubscribe(&self, topic: &str, conn_id: u64) {
        self.inner.remove_subscriber(topic, conn_id);
    }

    fn topic_count(&self) -> usize {
        self.inner.topics().len()
    }

    fn health(&self) -> Result<(), String> {
        if self.inner.up.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("Redis backplane down".into())
        }
    }
}

impl TicketStore for RedisBroker {
    fn store_ticket<'a>(
        &'a self,
        ticket: &'a str,
        grant_json: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), TicketError>> {
        async move {
            let mut connection = self.inner.connection().map_err(ticket_unavailable)?;
            let key = self.inner.ticket_key(ticket);
            let ttl_ms = ttl.as_millis().max(1) as u64;
            let stored: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(grant_json)
                .arg("PX")
                .arg(ttl_ms)
                .arg("NX")
                .query_async(&mut connection)
                .await
                .map_err(|e| TicketError::Unavailable(e.to_string()))?;
            // NX refuses only a collision of 256 random bits: treat it as a failure, not a success.
            stored
                .map(|_| ())
                .ok_or_else(|| TicketError::Unavailable("ticket collision".into()))
        }
        .boxed()
    }

    fn take_ticket<'a>(
        &'a self,
        ticket: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, TicketError>> {
        async move {
            let mut connection = self.inner.connection().map_err(ticket_unavailable)?;
            // GETDEL: a ticket is redeemed once even when two pods race for it.
            redis::cmd("GETDEL")
                .arg(self.inner.ticket_key(ticket))
                .query_async(&mut connection)
                .await
                .map_err(|e| TicketError::Unavailable(e.to_string()))
        }
        .boxed()
    }
}

fn ticket_unavailable(err: BrokerError) -> TicketError {
    TicketError::Unavailable(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ConnHandle, Hub, Route};
    use crate::outbox::OutboxLimits;

    /// An `Inner` that never connects (no supervisor runs).
    fn offline_inner() -> Inner {
        let (control, _requests) = mpsc::unbounded_channel();
        let metric = |name: &str| IntCounter::new(name, "test").expect("counter");
        let options = RedisOptions {
            settings: RedisSettings::default(),
            retention: Retention {
                max_entries: 100,
                max_age: Duration::from_secs(60),
            },
            max_topics: 100,
            max_pending: 100,
            metrics: BackplaneMetrics {
                up: IntGauge::new("up", "test").expect("gauge"),
                publish_seconds: Histogram::with_opts(prometheus::HistogramOpts::new(
                    "publish", "test",
                ))
                .expect("histogram"),
                reconnects: metric("reconnects"),
                recovered_messages: metric("recovered"),
                foreign_messages: metric("foreign"),
                stale_messages: metric("stale"),
            },
        };
        let client = redis::Client::open("redis://127.0.0.1:1").expect("client");
        Inner::new(options, client, control)
    }

    fn test_hub() -> Hub {
        Hub::new(
            "t".into(),
            OutboxLimits {
                max_messages: 100,
                max_bytes: 1 << 20,
            },
        )
    }

    fn texts(handle: &ConnHandle) -> Vec<String> {
        let mut batch = std::collections::VecDeque::new();
        let _ = handle.outbox.next_batch(&mut batch).now_or_never();
        batch
            .into_iter()
            .map(|frame| match frame {
                Outgoing::Live { text, .. } | Outgoing::Text(text) => text.to_string(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// A gap a recovery cannot fill is told to every subscriber that had the
    /// stream before it — a live one at once, one still subscribing through
    /// its pending arrivals (after its own replay) — and not to one that
    /// subscribed after the loss.
    #[tokio::test]
    async fn a_lost_gap_is_told_to_those_who_missed_it_even_mid_subscribe() {
        let inner = offline_inner();
        let hub = test_hub();
        let (live, joining, late) = (
            hub.register(Route::Topics),
            hub.register(Route::Topics),
            hub.register(Route::Topics),
        );
        let epoch = 9;
        let mut topic = LocalTopic {
            last: Some(Position::new(epoch, 5)),
            recovering: Some(Vec::new()),
            ..LocalTopic::default()
        };
        for (handle, pending, replayed_to) in [
            (&live, None, 5),
            (&joining, Some(Vec::new()), 3),
            (&late, None, 9),
        ] {
            topic.subscribers.insert(
                handle.id,
                LocalSub {
                    handle: handle.clone(),
                    pending,
                    replayed_to: Some(Position::new(epoch, replayed_to)),
                },
            );
        }
        inner.topics().insert("t".into(), topic);
        // 6..=9 were missed and only 8..=9 are still in the log: lost.
        let snapshot = Snapshot {
            head: Position::new(epoch, 9),
            entries: vec![(9, Utf8Bytes::from("m9")), (8, Utf8Bytes::from("m8"))],
        };
        inner.apply_recovery("t", 0, 0, Some(Position::new(epoch, 5)), snapshot);
        let notice = |texts: Vec<String>| {
            texts
                .iter()
                .map(|t| serde_json::from_str::<serde_json::Value>(t).expect("json"))
                .collect::<Vec<_>>()
        };
        let told = notice(texts(&live));
        assert_eq!(told.len(), 1);
        assert_eq!(told[0]["op"], "subscribed");
        assert_eq!(told[0]["recovered"], false);
        assert_eq!(told[0]["position"]["offset"], 9);
        assert!(
            texts(&late).is_empty(),
            "subscribed after the loss: nothing to tell"
        );
        let topics = inner.topics();
        let pending = topics["t"].subscribers[&joining.id]
            .pending
            .clone()
            .expect("still subscribing");
        assert_eq!(pending.len(), 1, "the notice waits among its arrivals");
        assert_eq!(pending[0].0, Position::new(epoch, 9));
        assert!(pending[0].1.as_str().contains(r#""recovered":false"#));
    }

    /// A recovery begun on one pub/sub link whose snapshot arrives after the
    /// link reconnected again: the newer link's recovery owns the buffer.
    /// The late one leaves the topic alone — no delivery around the gap, no
    /// position moved past it.
    #[tokio::test]
    async fn a_recovery_overtaken_by_a_reconnect_leaves_the_topic_alone() {
        let inner = offline_inner();
        let hub = test_hub();
        let epoch = 9;
        let sub = live_topic(&inner, &hub, Position::new(epoch, 5));
        // What arrived on the newer link while it recovers: offset 12.
        inner.topics().get_mut("t").expect("topic").recovering =
            Some(vec![(Position::new(epoch, 12), Utf8Bytes::from("m12"))]);
        // The older recovery (link 1) fetched 6..=8; link 2 is current.
        inner.generation.store(2, Ordering::Relaxed);
        let stale = Snapshot {
            head: Position::new(epoch, 8),
            entries: (6..=8)
                .rev()
                .map(|o| (o, Utf8Bytes::from(format!("m{o}"))))
                .collect(),
        };
        inner.apply_recovery("t", 1, 0, Some(Position::new(epoch, 5)), stale);
        assert!(
            texts(&sub).is_empty(),
            "nothing delivered by the stale recovery"
        );
        let topics = inner.topics();
        let local = topics.get("t").expect("topic");
        assert_eq!(
            local.last,
            Some(Position::new(epoch, 5)),
            "position unmoved"
        );
        assert_eq!(
            local.recovering.as_ref().map(Vec::len),
            Some(1),
            "the newer recovery's buffer is left to it"
        );
        drop(topics);
        // The current recovery (link 2) applies and delivers 6..=12 in order.
        let current = Snapshot {
            head: Position::new(epoch, 11),
            entries: (6..=11)
                .rev()
                .map(|o| (o, Utf8Bytes::from(format!("m{o}"))))
                .collect(),
        };
        inner.apply_recovery("t", 2, 0, Some(Position::new(epoch, 5)), current);
        let expected: Vec<String> = (6..=12).map(|o| format!("m{o}")).collect();
        assert_eq!(texts(&sub), expected);
    }

    /// A topic with one live subscriber at `last`, registered in `inner`.
    fn live_topic(inner: &Inner, hub: &Hub, last: Position) -> Arc<ConnHandle> {
        let sub = hub.register(Route::Topics);
        let mut topic = LocalTopic {
            last: Some(last),
            ..LocalTopic::default()
        };
        topic.subscribers.insert(
            sub.id,
            LocalSub {
                handle: sub.clone(),
                pending: None,
                replayed_to: Some(last),
            },
        );
        inner.topics().insert("t".into(), topic);
        sub
    }

    /// A live topic at 9:5 with one subscriber, to which 11:1 (`b1`) has
    /// just arrived: the topic recovers to learn epoch 11.
    fn at_a_new_epoch(inner: &Inner, hub: &Hub) -> Arc<ConnHandle> {
        let sub = live_topic(inner, hub, Position::new(9, 5));
        assert_eq!(
            deliver(inner, Position::new(11, 1), "b1"),
            Delivery::NewEpoch
        );
        sub
    }

    fn deliver(inner: &Inner, position: Position, frame: &str) -> Delivery {
        let mut topics = inner.topics();
        let local = topics.get_mut("t").expect("topic");
        local.deliver(position, &Utf8Bytes::from(frame.to_owned()), 100)
    }

    /// Break 5 of issue 23: the topic's keys were lost and made again
    /// (epoch 9 -> 11). The new epoch is not passed on by itself: Redis is
    /// asked, subscribers are told and get the new epoch whole, and frames
    /// of the old epoch still in flight, and duplicates of the new one,
    /// never pass afterwards (before: both passed, as any other epoch
    /// counted as "after").
    #[tokio::test]
    async fn stale_epochs_never_pass_after_a_new_one() {
        let inner = offline_inner();
        let hub = test_hub();
        let sub = at_a_new_epoch(&inner, &hub);
        assert!(texts(&sub).is_empty(), "not passed on by itself");
        // In flight on pub/sub while Redis is asked: an old-epoch frame.
        assert_eq!(deliver(&inner, Position::new(9, 6), "a6"), Delivery::Done);
        let snapshot = Snapshot {
            head: Position::new(11, 2),
            entries: vec![(2, Utf8Bytes::from("b2")), (1, Utf8Bytes::from("b1"))],
        };
        let again = inner.apply_recovery("t", 0, 0, Some(Position::new(9, 5)), snapshot);
        assert!(!again);
        let got = texts(&sub);
        assert_eq!(got.len(), 3, "{got:?}");
        let notice: serde_json::Value = serde_json::from_str(&got[0]).expect("json");
        assert_eq!(notice["op"], "subscribed");
        assert_eq!(notice["recovered"], false);
        assert_eq!(notice["position"]["epoch"], 11);
        assert_eq!(notice["position"]["offset"], 0);
        assert_eq!(got[1..], ["b1", "b2"], "the new epoch whole, in order");
        assert_eq!(inner.options.metrics.stale_messages.get(), 1, "a6 dropped");
        for (position, frame, expected) in [
            (Position::new(9, 7), "a7", Delivery::Stale),
            (Position::new(11, 2), "b2", Delivery::Done),
            (Position::new(11, 3), "b3", Delivery::Done),
            (Position::new(9, 8), "a8", Delivery::Stale),
            (Position::new(11, 3), "b3", Delivery::Done),
        ] {
            assert_eq!(deliver(&inner, position, frame), expected, "{position}");
        }
        assert_eq!(texts(&sub), ["b3"], "only the new one, once");
    }

    /// A later epoch found in the recovery's buffer (the keys were lost
    /// again while Redis was being asked) makes the topic recover again,
    /// with the rest of the buffer waiting behind it.
    #[tokio::test]
    async fn a_later_epoch_in_the_buffer_recovers_again() {
        let inner = offline_inner();
        let hub = test_hub();
        let sub = at_a_new_epoch(&inner, &hub);
        assert_eq!(deliver(&inner, Position::new(13, 1), "c1"), Delivery::Done);
        assert_eq!(deliver(&inner, Position::new(13, 2), "c2"), Delivery::Done);
        let snapshot = Snapshot {
            head: Position::new(11, 1),
            entries: vec![(1, Utf8Bytes::from("b1"))],
        };
        assert!(inner.apply_recovery("t", 0, 0, Some(Position::new(9, 5)), snapshot));
        assert_eq!(texts(&sub).len(), 2, "told of epoch 11, given b1");
        let topics = inner.topics();
        let buffer = topics["t"].recovering.clone().expect("recovering again");
        let positions: Vec<Position> = buffer.iter().map(|(p, _)| *p).collect();
        assert_eq!(positions, [Position::new(13, 1), Position::new(13, 2)]);
    }

    /// Found by the fault checker: a new epoch seen on pub/sub just as the
    /// link reconnected started two recoveries of one topic. The first
    /// applied (the subscriber got epoch 11 from its start); the second,
    /// whose snapshot was taken from the old epoch, applied again — moving
    /// the topic back to 11:0 and replaying 11:2..=4 to a subscriber that
    /// had them (a duplicate without a notice). A recovery applies only
    /// while it owns the topic's recovery, and only once.
    #[tokio::test]
    async fn a_second_recovery_of_a_topic_applies_nothing() {
        let inner = offline_inner();
        let hub = test_hub();
        let sub = live_topic(&inner, &hub, Position::new(9, 5));
        let restarted = || Snapshot {
            head: Position::new(11, 4),
            entries: (1..=4)
                .rev()
                .map(|o| (o, Utf8Bytes::from(format!("b{o}"))))
                .collect(),
        };
        let (first, second) = (inner.next_recovery(), inner.next_recovery());
        {
            let mut topics = inner.topics();
            let local = topics.get_mut("t").expect("topic");
            assert!(local.start_recovering(first));
            // The reconnect claims the topic for its own recovery.
            local.recovery = second;
        }
        // The superseded one applies nothing.
        assert!(!inner.apply_recovery("t", 0, first, Some(Position::new(9, 5)), restarted()));
        assert!(texts(&sub).is_empty());
        // The owner applies: told of epoch 11, given it whole.
        assert!(!inner.apply_recovery("t", 0, second, Some(Position::new(9, 5)), restarted()));
        let got = texts(&sub);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[1..], ["b1", "b2", "b3", "b4"]);
        // Applying again (a late retry of the owner) changes nothing.
        assert!(!inner.apply_recovery("t", 0, second, Some(Position::new(9, 5)), restarted()));
        assert!(texts(&sub).is_empty(), "no replay of what it has");
        assert_eq!(inner.topics()["t"].last, Some(Position::new(11, 4)));
    }

    /// Redis answering with an earlier epoch than this pod saw can only be a
    /// clock that stepped back: ordered filters would drop the truth as
    /// stale, so subscribers resume from fresh snapshots instead (1013),
    /// and the later epoch's frames still in flight are dropped.
    #[tokio::test]
    async fn an_epoch_that_goes_back_makes_subscribers_resume() {
        let inner = offline_inner();
        let hub = test_hub();
        let sub = live_topic(&inner, &hub, Position::new(11, 5));
        inner.topics().get_mut("t").expect("topic").recovering = Some(Vec::new());
        let snapshot = Snapshot {
            head: Position::new(9, 3),
            entries: Vec::new(),
        };
        assert!(!inner.apply_recovery("t", 0, 0, Some(Position::new(11, 5)), snapshot));
        assert!(matches!(
            sub.outbox.end_request(),
            Some(crate::outbox::EndRequest::Close {
                code: CloseCode::TryAgainLater,
                ..
            })
        ));
        assert_eq!(deliver(&inner, Position::new(11, 6), "a6"), Delivery::Stale);
        assert_eq!(deliver(&inner, Position::new(9, 4), "b4"), Delivery::Done);
    }

    /// Both overflows close with 4002 and say which they were
    /// (`switchyard_slow_consumers_total{reason}`): a recovery that
    /// buffered more than it holds closes every subscriber of the topic; a
    /// subscribe's replay backlog closes only that subscriber.
    #[tokio::test]
    async fn overflows_close_4002_and_record_why() {
        use crate::outbox::{EndRequest, Slow};
        let is_slow = |handle: &ConnHandle| {
            matches!(
                handle.outbox.end_request(),
                Some(EndRequest::Close {
                    code: CloseCode::SlowConsumer,
                    ..
                })
            )
        };
        let inner = offline_inner();
        let hub = test_hub();
        let sub = live_topic(&inner, &hub, Position::new(9, 5));
        inner.topics().get_mut("t").expect("topic").recovering = Some(Vec::new());
        for offset in 6..106 {
            deliver(&inner, Position::new(9, offset), "x");
        }
        assert!(!is_slow(&sub), "100 frames fit the recovery buffer");
        deliver(&inner, Position::new(9, 106), "x");
        assert!(is_slow(&sub));
        assert_eq!(sub.outbox.slow(), Some(Slow::RecoveryOverflow));

        let inner = offline_inner();
        // Room for every frame in the live subscriber's own queue.
        let hub = Hub::new(
            "t".into(),
            OutboxLimits {
                max_messages: 1000,
                max_bytes: 1 << 20,
            },
        );
        let live = live_topic(&inner, &hub, Position::new(9, 5));
        let joining = hub.register(Route::Topics);
        inner
            .topics()
            .get_mut("t")
            .expect("topic")
            .subscribers
            .insert(
                joining.id,
                LocalSub {
                    handle: joining.clone(),
                    pending: Some(Vec::new()),
                    replayed_to: None,
                },
            );
        for offset in 6..107 {
            deliver(&inner, Position::new(9, offset), "x");
        }
        assert_eq!(joining.outbox.slow(), Some(Slow::SubscribeBacklog));
        assert!(is_slow(&joining));
        assert!(!is_slow(&live), "the live subscriber goes on");
        assert_eq!(live.outbox.slow(), None);
    }

    #[test]
    fn a_publish_that_never_left_is_unavailable_one_unanswered_is_unknown() {
        let io = |kind| publish_error(redis::RedisError::from(std::io::Error::from(kind)));
        for kind in [
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::NotConnected,
        ] {
            assert!(matches!(io(kind), BrokerError::Unavailable(_)), "{kind:?}");
        }
        for kind in [
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            assert!(
                matches!(io(kind), BrokerError::OutcomeUnknown(_)),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_frame_is_for_the_topic_it_names_and_no_other() {
        let frame = br#"{"op":"message","topic":"v2:x","epoch":7,"offset":1,"data":{}}"#;
        assert!(frame_is_for(frame, "v2:x"));
        for other in ["x", "v2", "v2:x:y", "v2:", ""] {
            assert!(!frame_is_for(frame, other), "{other}");
        }
        assert!(
            !frame_is_for(br#"{"op":"message","topic":"v2:x"#, "v2:x"),
            "cut short"
        );
        assert!(!frame_is_for(b"garbage", "v2:x"));
    }

    /// A subscriber joining with a snapshot head ahead of what this pod has
    /// delivered: the messages still in flight reach the subscriber that was
    /// already here, and are not sent twice to the newcomer.
    #[tokio::test]
    async fn in_flight_messages_reach_old_subscribers_once_and_new_ones_never_twice() {
        let hub = test_hub();
        let (old, new) = (hub.register(Route::Topics), hub.register(Route::Topics));
        let epoch = 9;
        let mut topic = LocalTopic {
            last: Some(Position::new(epoch, 5)),
            ..LocalTopic::default()
        };
        for (handle, replayed_to) in [(&old, 5), (&new, 8)] {
            topic.subscribers.insert(
                handle.id,
                LocalSub {
                    handle: handle.clone(),
                    pending: None,
                    replayed_to: Some(Position::new(epoch, replayed_to)),
                },
            );
        }
        for offset in 6..=9 {
            let frame = Utf8Bytes::from(format!("m{offset}"));
            topic.deliver(Position::new(epoch, offset), &frame, 100);
        }
        // A duplicate from a recovery overlap is dropped for everyone.
        topic.deliver(Position::new(epoch, 9), &Utf8Bytes::from("m9"), 100);
        assert_eq!(texts(&old), vec!["m6", "m7", "m8", "m9"]);
        assert_eq!(texts(&new), vec!["m9"]);
        assert_eq!(topic.last, Some(Position::new(epoch, 9)));
    }

    #[test]
    fn payloads_parse() {
        let (position, frame) = parse_payload(b"77 5\n{\"op\":\"message\"}").expect("parse");
        assert_eq!(position, Position::new(77, 5));
        assert_eq!(frame.as_str(), "{\"op\":\"message\"}");
        for bad in [&b"no newline"[..], b"77\n{}", b"x 5\n{}", b"1 2\n\xff"] {
            assert!(parse_payload(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn snapshots_parse() {
        let entry = |offset: &str, frame: &str| {
            Value::Array(vec![
                Value::BulkString(b"1700000000000-0".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"o".to_vec()),
                    Value::BulkString(offset.as_bytes().to_vec()),
                    Value::BulkString(b"f".to_vec()),
                    Value::BulkString(frame.as_bytes().to_vec()),
                ]),
            ])
        };
        let reply = Value::Array(vec![
            Value::BulkString(b"99".to_vec()),
            Value::Int(7),
            Value::Array(vec![entry("7", "seven"), entry("6", "six")]),
        ]);
        let snapshot = parse_snapshot(reply).expect("snapshot");
        assert_eq!(snapshot.head, Position::new(99, 7));
        let offsets: Vec<u64> = snapshot.entries.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, vec![7, 6]);
        assert_eq!(snapshot.entries[1].1.as_str(), "six");
        assert!(parse_snapshot(Value::Int(1)).is_none());
    }
}
