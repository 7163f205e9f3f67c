//! A crowd of real `switchyard_client::Client` sessions recording what each
//! saw, and a publisher running alongside: the scenes of the migration and
//! crash tests, where "every message exactly once, in order" is checked per
//! client over the whole run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_client::{Client, ClientEvent, ClientOptions};

/// What one client saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Offsets delivered per topic, in delivery order.
    pub offsets: BTreeMap<String, Vec<u64>>,
    /// Close codes of the connections it lost.
    pub disconnects: Vec<u16>,
    /// Migrations completed.
    pub migrations: usize,
    /// The gateway of every connection, in order.
    pub servers: Vec<String>,
    /// `Resumed` events with `recovered: false` after the first subscribe.
    pub resyncs: usize,
    /// When each connection after the first came up, since the crowd started.
    pub reconnected_at: Vec<Duration>,
}

/// Client sessions, each subscribed to every topic of the crowd.
pub struct Crowd {
    /// One record per client.
    pub seen: Vec<Arc<Mutex<Seen>>>,
    topics: Vec<String>,
    started: Instant,
    subscribed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Crowd {
    /// Starts `count` sessions on `url`, each subscribed to `topics`, with
    /// options `configure` adjusts (backoff, timeouts).
    pub fn start(
        url: &str,
        count: usize,
        topics: &[&str],
        configure: impl Fn(&mut ClientOptions),
    ) -> Crowd {
        let started = Instant::now();
        let subscribed = Arc::new(AtomicUsize::new(0));
        let mut seen = Vec::with_capacity(count);
        let mut tasks = Vec::with_capacity(count);
        for _ in 0..count {
            let mut options = ClientOptions::new(url);
            configure(&mut options);
            let mut client = Client::start(options);
            for topic in topics {
                client.subscribe(topic);
            }
            let record = Arc::new(Mutex::new(Seen::default()));
            let (record_in, subscribed_in) = (record.clone(), subscribed.clone());
            let topic_count = topics.len();
            tasks.push(tokio::spawn(async move {
                let mut first_subscribes = 0;
                while let Some(event) = client.next_event().await {
                    let mut seen = record_in.lock().expect("seen");
                    match event {
                        ClientEvent::Message {
                            topic, position, ..
                        } => seen.offsets.entry(topic).or_default().push(position.offset),
                        ClientEvent::Resumed { .. } if first_subscribes < topic_count => {
                            first_subscribes += 1;
                            subscribed_in.fetch_add(1, Ordering::Relaxed);
                        }
                        ClientEvent::Resumed { recovered, .. } => {
                            seen.resyncs += usize::from(!recovered);
                        }
                        ClientEvent::Disconnected { code, .. } => seen.disconnects.push(code),
                        ClientEvent::Migrated { .. } => seen.migrations += 1,
                        ClientEvent::Connected { server_id, .. } => {
                            if !seen.servers.is_empty() {
                                seen.reconnected_at.push(started.elapsed());
                            }
                            seen.servers.push(server_id);
                        }
                        ClientEvent::Stopped { .. } => break,
                        _ => {}
                    }
                }
            }));
            seen.push(record);
        }
        Crowd {
            seen,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            started,
            subscribed,
            tasks,
        }
    }

    /// When the crowd started: the origin of [`Seen::reconnected_at`].
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits (at most `timeout`) until every client has subscribed to every
    /// topic once.
    pub async fn wait_subscribed(&self, timeout: Duration) {
        let want = self.seen.len() * self.topics.len();
        let deadline = Instant::now() + timeout;
        while self.subscribed.load(Ordering::Relaxed) < want {
            assert!(
                Instant::now() < deadline,
                "{} of {want} subscriptions",
                self.subscribed.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (at most `timeout`) until every client has every topic up to
    /// `last`, then checks each saw exactly 1..=last, in order.
    pub async fn assert_complete(&self, last: &BTreeMap<String, u64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.seen.iter().all(|s| {
                let s = s.lock().expect("seen");
                last.iter()
                    .all(|(t, n)| s.offsets.get(t).and_then(|o| o.last()) == Some(n))
            });
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (i, seen) in self.seen.iter().enumerate() {
            let seen = seen.lock().expect("seen");
            for (topic, n) in last {
                let got = seen.offsets.get(topic).cloned().unwrap_or_default();
                let expected: Vec<u64> = (1..=*n).collect();
                assert!(
                    got == expected,
                    "client {i} topic {topic}: {} messages, first gap/duplicate near {:?}",
                    got.len(),
                    got.windows(2).find(|w| w[1] != w[0] + 1)
                );
            }
        }
    }

    /// Ends every session's recording task.
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Publishes round robin over topics through a gateway's admin API until
/// finished; knows the last offset per topic.
pub struct Publisher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<String, u64>>,
}

impl Publisher {
    /// Publishes `{"n": …}` to `topics` in turn through `admin`, one every `every`.
    pub fn start(admin: SocketAddr, topics: &[&str], every: Duration) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let task = tokio::task::spawn_blocking(move || {
            let mut last = BTreeMap::new();
            let mut n = 0usize;
            while !flag.load(Ordering::Relaxed) {
                let topic = &topics[n % topics.len()];
                let body = format!(r#"{{"topic":"{topic}","data":{{"n":{n}}}}}"#);
                let (status, text) =
                    crate::http::http_request(admin, "POST", "/api/publish", Some(&body))
                        .expect("publish");
                assert_eq!(status, 200, "{text}");
                let response: serde_json::Value = serde_json::from_str(&text).expect("json");
                let offset = response["position"]["offset"].as_u64().expect("offset");
                last.insert(topic.clone(), offset);
                n += 1;
                std::thread::sleep(every);
            }
            last
        });
        Publisher { stop, task }
    }

    /// Stops publishing; the last offset per topic.
    pub async fn finish(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("publisher")
    }
}
