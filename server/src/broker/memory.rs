//! The in-memory broker: one process, topic logs in a map.
//!
//! Each topic is a `Mutex<Topic>` holding its log and its subscribers.
//! Publish and subscribe take that one lock, which is what makes
//! "replay, then live" gap-free: a publish either lands before the subscribe
//! (and is replayed) or after it (and is delivered live), never both or neither.
//! The map itself is behind an `RwLock` taken for reading on every operation
//! and for writing only to create or evict topics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::{self, BoxFuture};
use futures_util::FutureExt;
use rand::Rng;
use serde_json::value::RawValue;
use switchyard_protocol::frame::encode_message;
use switchyard_protocol::position::epoch_at;
use switchyard_protocol::{Position, ServerFrame};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::log::{Resume, Retention, TopicLog};
use super::{Broker, BrokerError, Subscribed, Subscriber};
use crate::outbox::Outgoing;
use crate::security::tickets::{TicketBook, TicketError, TicketStore};

/// Settings of the in-memory broker.
#[derive(Debug, Clone, Copy)]
pub struct MemorySettings {
    /// History bounds per topic.
    pub retention: Retention,
    /// Most topics held.
    pub max_topics: usize,
    /// Most unredeemed tickets held.
    pub max_tickets: usize,
}

struct Topic {
    log: TopicLog<Utf8Bytes>,
    subscribers: HashMap<u64, Arc<dyn Subscriber>>,
}

/// The embedded single-process broker.
pub struct MemoryBroker {
    topics: RwLock<HashMap<String, Mutex<Topic>>>,
    settings: MemorySettings,
    tickets: Mutex<TicketBook<String>>,
}

fn lock(topic: &Mutex<Topic>) -> MutexGuard<'_, Topic> {
    // Every mutation of a topic is a complete step; a poisoned lock is still consistent.
    topic.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh epoch, after every epoch this process issued before (a topic
/// evicted and made again gets a later one) and by the clock otherwise, so a
/// restarted process neither continues a log it lost nor goes back in order.
fn new_epoch() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let tie = rand::rng().random::<u64>();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let epoch = epoch_at(unix_ms, tie, last);
        match LAST.compare_exchange_weak(last, epoch, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return epoch,
            Err(newer) => last = newer,
        }
    }
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new(settings: MemorySettings) -> Self {
        MemoryBroker {
            topics: RwLock::new(HashMap::new()),
            tickets: Mutex::new(TicketBook::new(settings.max_tickets)),
            settings,
        }
    }

    /// Runs `f` on the topic, creating it first if needed.
    fn with_topic<R>(&self, name: &str, f: impl FnOnce(&mut Topic) -> R) -> Result<R, BrokerError> {
        {
            let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
            if let Some(topic) = topics.get(name) {
                let mut guard = lock(topic);
                return Ok(f(&mut guard));
            }
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if !topics.contains_key(name) && topics.len() >= self.settings.max_topics {
            return Err(BrokerError::TooManyTopics(self.settings.max_topics));
        }
        let topic = topics.entry(name.to_owned()).or_insert_with(|| {
            Mutex::new(Topic {
                log: TopicLog::new(new_epoch(), self.settings.retention),
                subscribers: HashMap::new(),
            })
        });
        let mut guard = lock(topic);
        let result = f(&mut guard);
        drop(guard);
        Ok(result)
    }

    fn publish_now(&self, name: &str, data: &RawValue) -> Result<Position, BrokerError> {
        self.with_topic(name, |topic| {
            let now = Instant::now();
            // Encoded once; every subscriber and the history share these bytes.
            let frame = Utf8Bytes::from(encode_message(name, topic.log.next_position(), data));
            let position = topic.log.append(frame.clone(), now);
            let _fanout = tracing::info_span!(
                "fanout",
                topic = name,
                subscribers = topic.subscribers.len()
            )
            .entered();
            for subscriber in topic.subscribers.values() {
                // A full outbox closes its connection (4002); others are unaffected.
                let _ = subscriber.outbox().push(Outgoing::Live {
                    text: frame.clone(),
                    published_at: now,
                });
            }
            position
        })
    }

    fn subscribe_now(
        &self,
        name: &str,
        since: Option<Position>,
        subscriber: Arc<dyn Subscriber>,
    ) -> Result<Subscribed, BrokerError> {
        self.with_topic(name, |topic| {
            topic.log.trim(Instant::now());
            let resume = topic.log.resume(since);
            let position = topic.log.head();
            let confirmation = ServerFrame::Subscribed {
                topic: name.to_owned(),
                position,
                recovered: resume.recovered(),
            };
            let outbox = subscriber.outbox();
            let _ = outbox.push(Outgoing::Text(Utf8Bytes::from(confirmation.to_json())));
            let mut replayed = 0;
            if let Resume::ReplayAfter(after) = resume {
                for (_, frame) in topic.log.entries_after(after) {
                    if outbox.push(Outgoing::Text(frame.clone())).is_err() {
                        break;
                    }
                    replayed += 1;
                }
            }
            topic.subscribers.insert(subscriber.id(), subscriber);
            Subscribed {
                position,
                recovered: resume.recovered(),
                replayed,
            }
        })
    }

    /// Trims expired history and forgets topics with neither subscribers nor
    /// history, so abandoned topics do not hold memory. A later subscriber to
    /// an evicted topic gets a new epoch and, if it asks to resume, `recovered: false`.
    pub fn evict_idle(&self) -> usize {
        let now = Instant::now();
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let before = topics.len();
        topics.retain(|_, topic| {
            let mut topic = lock(topic);
            topic.log.trim(now);
            !(topic.subscribers.is_empty() && topic.log.is_empty())
        });
        before - topics.len()
    }

    /// Runs [`Self::evict_idle`] every `every` until the broker is dropped.
    pub fn spawn_janitor(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(broker) = weak.upgrade() else { break };
                let evicted = broker.evict_idle();
                if evicted > 0 {
                    tracing::debug!(evicted, "evicted idle topics");
                }
            }
        });
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        data: &'a RawValue,
    ) -> BoxFuture<'a, Result<Position, BrokerError>> {
        future::ready(self.publish_now(topic, data)).boxed()
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a str,
        since: Option<Position>,
        subscriber: Arc<dyn Subscriber>,
    ) -> BoxFuture<'a, Result<Subscribed, BrokerError>> {
        future::ready(self.subscribe_now(topic, since, subscriber)).boxed()
    }

    fn unsubscribe(&self, topic: &str, conn_id: u64) {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        if let Some(topic) = topics.get(topic) {
            lock(topic).subscribers.remove(&conn_id);
        }
    }

    fn topic_count(&self) -> usize {
        self.topics.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl TicketStore for MemoryBroker {
    fn store_ticket<'a>(
        &'a self,
        ticket: &'a str,
        grant_json: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), TicketError>> {
        let stored = self
            .tickets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ticket.to_owned(), grant_json, ttl, Instant::now())
            .map_err(|e| TicketError::Full(e.to_string()));
        future::ready(stored).boxed()
    }

    fn take_ticket<'a>(
        &'a self,
        ticket: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, TicketError>> {
        let grant = self
            .tickets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .redeem(ticket, Instant::now());
        future::ready(Ok(grant)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ConnHandle;
    use crate::hub::{Hub, Route};
    use crate::outbox::OutboxLimits;
    use std::collections::VecDeque;

    fn broker(max_entries: usize, max_topics: usize) -> MemoryBroker {
        MemoryBroker::new(MemorySettings {
            retention: Retention {
                max_entries,
                max_age: Duration::from_secs(60),
            },
            max_topics,
            max_tickets: 16,
        })
    }

    fn hub() -> Hub {
        Hub::new(
            "t".into(),
            OutboxLimits {
                max_messages: 1000,
                max_bytes: 1 << 20,
            },
        )
    }

    fn data(n: u64) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).expect("raw")
    }

    /// Drains the outbox and parses every frame.
    async fn frames(handle: &ConnHandle) -> Vec<ServerFrame> {
        let mut batch = VecDeque::new();
        if handle.outbox.queued() == 0 {
            return Vec::new();
        }
        handle.outbox.next_batch(&mut batch).await;
        batch
            .into_iter()
            .map(|frame| match frame {
                Outgoing::Live { text, .. } | Outgoing::Text(text) => {
                    ServerFrame::parse(&text).expect("frame")
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn offsets(frames: &[ServerFrame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Message { offset, .. } => Some(*offset),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn resume_replays_then_goes_live() {
        let broker = broker(100, 10);
        let hub = hub();
        let mut last = None;
        for n in 1..=5 {
            last = Some(broker.publish("a", &data(n)).await.expect("publish"));
        }
        let head = last.expect("head");
        let sub = hub.register(Route::Topics);
        let since = Position::new(head.epoch, 2);
        let outcome = broker
            .subscribe("a", Some(since), sub.clone())
            .await
            .expect("sub");
        assert_eq!(
            outcome,
            Subscribed {
                position: head,
                recovered: true,
                replayed: 3
            }
        );
        broker.publish("a", &data(6)).await.expect("publish");
        let got = frames(&sub).await;
        assert!(matches!(
            &got[0],
            ServerFrame::Subscribed {
                recovered: true,
                ..
            }
        ));
        assert_eq!(offsets(&got), vec![3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn overflowed_history_is_not_recovered() {
        let broker = broker(3, 10);
        let hub = hub();
        for n in 1..=10 {
            broker.publish("a", &data(n)).await.expect("publish");
        }
        let epoch = broker.publish("a", &data(11)).await.expect("publish").epoch;
        let sub = hub.register(Route::Topics);
        let outcome = broker
            .subscribe("a", Some(Position::new(epoch, 1)), sub.clone())
            .await
            .expect("sub");
        assert!(!outcome.recovered);
        assert_eq!(outcome.replayed, 0);
        let got = frames(&sub).await;
        assert_eq!(got.len(), 1);
        assert!(
            matches!(&got[0], ServerFrame::Subscribed { recovered: false, position, .. } if position.offset == 11)
        );
    }

    #[tokio::test]
    async fn topic_limit_and_eviction() {
        let broker = broker(0, 2);
        let hub = hub();
        broker.publish("a", &data(1)).await.expect("a");
        let sub = hub.register(Route::Topics);
        broker.subscribe("b", None, sub.clone()).await.expect("b");
        assert_eq!(
            broker.publish("c", &data(1)).await,
            Err(BrokerError::TooManyTopics(2))
        );
        // "a" keeps no history (max_entries 0) and has no subscriber: evicted.
        assert_eq!(broker.evict_idle(), 1);
        broker.unsubscribe("b", sub.id);
        assert_eq!(broker.evict_idle(), 1);
        assert_eq!(broker.topic_count(), 0);
        broker.publish("c", &data(1)).await.expect("room again");
    }

    #[tokio::test]
    async fn unsubscribed_connection_gets_nothing() {
        let broker = broker(10, 10);
        let hub = hub();
        let sub = hub.register(Route::Topics);
        broker.subscribe("a", None, sub.clone()).await.expect("sub");
        broker.publish("a", &data(1)).await.expect("pub");
        broker.unsubscribe("a", sub.id);
        broker.publish("a", &data(2)).await.expect("pub");
        assert_eq!(offsets(&frames(&sub).await), vec![1]);
    }
}
