//! The resume promise under overlapping Redis faults, checked over recorded
//! histories in the spirit of Jepsen.
//!
//! Three gateway processes share one real `redis-server`. Clients subscribe
//! to a few of six topics, resume from their own cursors and hop between
//! gateways; publishers publish through every gateway's admin API; a
//! nemesis overlaps faults at random: pub/sub connections killed, Redis
//! restarted with and without losing recent writes, Redis paused, a topic's
//! keys deleted (as eviction would), a gateway stopped (SIGSTOP) for a
//! moment. Then the faults stop, one last message per topic is published,
//! and every client must get it.
//!
//! Every client records what it asked and what it got; [`check`] verifies,
//! per client and topic, that the stream is exactly the published sequence
//! in order — each message the one after the cursor, an epoch changed or a
//! gap skipped only where `subscribed {recovered: false}` announced it —
//! that every position carries one payload (the acknowledged one), that a
//! publish refused as `unavailable` never appears, and that the last
//! messages arrive.
//!
//! Seeded: the seed chooses the fault schedule, the hops and the publishes,
//! and is printed with every failure (`FAULTS_SEED=N` replays the
//! schedule; the timing of real processes varies). The test command runs
//! it for `FAULTS_SECONDS` (default 15 s); longer runs:
//! `bench/backplane-faults.sh`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard_client::{Connection, Event};
use switchyard_protocol::{ErrorCode, Position, ServerFrame};
use switchyard_tests::{http_request, wait_status, GatewayProcess, RedisServer};

const TOPICS: [&str; 6] = ["t0", "t1", "t2", "t3", "t4", "t5"];
const PREFIX: &str = "faults";
const GATEWAYS: usize = 3;
const CLIENTS: usize = 6;
const PUBLISHERS: usize = 2;

// ---------------------------------------------------------------- histories

/// What one client recorded on one topic, in order.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    /// It asked to subscribe from `since` and was answered.
    Subscribed {
        since: Option<Position>,
        position: Position,
        recovered: bool,
    },
    /// A message, with the publish id it carried.
    Message { position: Position, id: u64 },
}

/// How a publish ended, as the publisher saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// 200: applied at this position.
    Acked(Position),
    /// 503 `unavailable`: not applied.
    Refused,
    /// A timeout, `outcome_unknown`, a lost connection: either.
    Unknown,
}

#[derive(Debug, Clone)]
struct Publish {
    topic: &'static str,
    id: u64,
    outcome: Outcome,
}

/// Everything one run recorded.
#[derive(Debug, Default)]
struct History {
    /// (client, topic) -> steps.
    streams: BTreeMap<(usize, &'static str), Vec<Step>>,
    publishes: Vec<Publish>,
    /// The ids of the last publish on each topic (acknowledged, after the faults).
    finals: HashMap<&'static str, u64>,
}

/// Every violation of the promise in `history`, as readable lines.
fn check(history: &History) -> Vec<String> {
    let mut violations = Vec::new();
    let outcome: HashMap<u64, &Publish> = history.publishes.iter().map(|p| (p.id, p)).collect();
    let mut acked: HashMap<(&str, Position), u64> = HashMap::new();
    for publish in &history.publishes {
        if let Outcome::Acked(position) = publish.outcome {
            if let Some(other) = acked.insert((publish.topic, position), publish.id) {
                violations.push(format!(
                    "{} {position}: acknowledged to two publishes ({other}, {})",
                    publish.topic, publish.id
                ));
            }
        }
    }
    // One payload per position, across clients; one position per payload.
    let mut at: HashMap<(&str, Position), u64> = HashMap::new();
    let mut where_: HashMap<u64, (&str, Position)> = HashMap::new();
    for ((client, topic), steps) in &history.streams {
        let who = format!("client {client} {topic}");
        let mut cursor: Option<Position> = None;
        let mut got_final = false;
        for step in steps {
            match *step {
                Step::Subscribed {
                    since,
                    position,
                    recovered,
                } => {
                    if since != cursor {
                        violations.push(format!(
                            "{who}: resumed from {since:?}, its cursor was {cursor:?}"
                        ));
                    }
                    cursor = match (recovered, since) {
                        (false, _) | (true, None) => Some(position),
                        (true, Some(since)) if since.epoch != position.epoch => {
                            violations.push(format!(
                                "{who}: recovered from {since} into another epoch {position}"
                            ));
                            Some(position)
                        }
                        (true, Some(since)) if since.offset > position.offset => {
                            violations.push(format!(
                                "{who}: recovered from {since}, past the head {position}"
                            ));
                            Some(position)
                        }
                        (true, Some(since)) => Some(since),
                    };
                }
                Step::Message { position, id } => {
                    let expected = cursor.map(|c| Position::new(c.epoch, c.offset + 1));
                    if expected != Some(position) {
                        violations.push(format!(
                            "{who}: got {position} (publish {id}), expected {expected:?}: {}",
                            if expected.is_some_and(
                                |e| e.epoch == position.epoch && e.offset > position.offset
                            ) {
                                "a duplicate or out of order"
                            } else {
                                "a silent gap or epoch change"
                            }
                        ));
                    }
                    cursor = Some(position);
                    got_final |= history.finals.get(topic) == Some(&id);
                    match outcome.get(&id).map(|p| p.outcome) {
                        None => violations.push(format!("{who}: {position} carries unknown id {id}")),
                        Some(Outcome::Refused) => violations.push(format!(
                            "{who}: {position} is publish {id}, which was refused as unavailable"
                        )),
                        Some(Outcome::Acked(acked_at)) if acked_at != position => {
                            violations.push(format!(
                                "{who}: publish {id} delivered at {position}, acknowledged at {acked_at}"
                            ))
                        }
                        _ => {}
                    }
                    if let Some(&other) = acked.get(&(*topic, position)) {
                        if other != id {
                            violations.push(format!(
                                "{who}: {position} carries publish {id}, acknowledged to {other}"
                            ));
                        }
                    }
                    if let Some(&other) = at.get(&(*topic, position)) {
                        if other != id {
                            violations.push(format!(
                                "{who}: {position} carries {id}, another client got {other} there"
                            ));
                        }
                    }
                    at.insert((*topic, position), id);
                    if let Some(&(other_topic, other)) = where_.get(&id) {
                        if (other_topic, other) != (*topic, position) {
                            violations.push(format!(
                                "{who}: publish {id} at {position}, also at {other_topic} {other}"
                            ));
                        }
                    }
                    where_.insert(id, (*topic, position));
                }
            }
        }
        if !got_final {
            violations.push(format!(
                "{who}: never got the last message (cursor {cursor:?})"
            ));
        }
    }
    violations
}

// ------------------------------------------------------------------- actors

/// Shared switches of one run.
struct Run {
    seed: u64,
    /// The nemesis and the publishers stop.
    calm: AtomicBool,
    /// Clients stop hopping and wait for the last messages.
    settle: AtomicBool,
    /// Everything stops.
    done: AtomicBool,
    history: Mutex<History>,
    next_id: std::sync::atomic::AtomicU64,
}

fn gateway_settings(redis: &RedisServer) -> Vec<String> {
    vec![
        "broker=redis".into(),
        format!("redis.url={}", redis.url()),
        format!("redis.key_prefix={PREFIX}"),
        "redis.command_timeout_ms=500".into(),
        "redis.connect_timeout_ms=500".into(),
        "redis.reconnect_max_delay_ms=300".into(),
        // Short enough that a long outage trims history: `recovered: false`.
        "topics.history_size=300".into(),
    ]
}

/// One publish through a gateway's admin API, recorded.
fn publish(run: &Run, admin: std::net::SocketAddr, topic: &'static str) -> Outcome {
    let id = run.next_id.fetch_add(1, Ordering::Relaxed);
    let body = format!(r#"{{"topic":"{topic}","data":{{"id":{id}}}}}"#);
    let outcome = match http_request(admin, "POST", "/api/publish", Some(&body)) {
        Ok((200, text)) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| serde_json::from_value::<Position>(v["position"].clone()).ok())
            .map_or(Outcome::Unknown, Outcome::Acked),
        Ok((503, text)) if text.contains(r#""error":"unavailable""#) => Outcome::Refused,
        _ => Outcome::Unknown,
    };
    run.history
        .lock()
        .expect("history")
        .publishes
        .push(Publish { topic, id, outcome });
    outcome
}

fn publisher(run: Arc<Run>, admins: Vec<std::net::SocketAddr>, index: u64) {
    let mut rng = StdRng::seed_from_u64(run.seed ^ (0x9e37 + index));
    while !run.calm.load(Ordering::Relaxed) {
        let admin = admins[rng.random_range(0..admins.len())];
        let topic = TOPICS[rng.random_range(0..TOPICS.len())];
        publish(&run, admin, topic);
        std::thread::sleep(Duration::from_millis(rng.random_range(2..15)));
    }
}

/// A client: connects to a random gateway, subscribes its topics from its
/// cursors, reads for a while, hops. Its cursor follows the stream as a
/// resuming application's would; the checker recomputes it independently.
async fn client(run: Arc<Run>, urls: Vec<String>, index: usize) {
    let mut rng = StdRng::seed_from_u64(run.seed ^ (0x51ed + index as u64));
    let topics: Vec<&'static str> = (0..3)
        .map(|k| TOPICS[(index + 2 * k) % TOPICS.len()])
        .collect();
    let mut cursors: HashMap<&'static str, Option<Position>> =
        topics.iter().map(|t| (*t, None)).collect();
    let mut asked: HashMap<&'static str, Option<Position>> = HashMap::new();
    let record = |topic: &'static str, step: Step| {
        run.history
            .lock()
            .expect("history")
            .streams
            .entry((index, topic))
            .or_default()
            .push(step);
    };
    while !run.done.load(Ordering::Relaxed) {
        let url = &urls[rng.random_range(0..urls.len())];
        let connected =
            tokio::time::timeout(Duration::from_secs(2), Connection::connect(url)).await;
        let Ok(Ok(mut conn)) = connected else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut ok = true;
        for topic in &topics {
            asked.insert(topic, cursors[topic]);
            ok &= conn.subscribe(topic, cursors[topic]).await.is_ok();
        }
        let stay = Duration::from_millis(rng.random_range(300..3000));
        let hop_at = tokio::time::Instant::now() + stay;
        let mut retry: Vec<&'static str> = Vec::new();
        while ok && !run.done.load(Ordering::Relaxed) {
            let settling = run.settle.load(Ordering::Relaxed);
            let until = if settling {
                tokio::time::Instant::now() + Duration::from_millis(200)
            } else {
                hop_at
            };
            let event = match tokio::time::timeout_at(until, conn.next_event()).await {
                Err(_) if settling => {
                    // Resubscribe what was refused while Redis was down.
                    for topic in retry.drain(..) {
                        asked.insert(topic, cursors[topic]);
                        ok &= conn.subscribe(topic, cursors[topic]).await.is_ok();
                    }
                    continue;
                }
                Err(_) => break, // hop
                Ok(Ok(event)) => event,
                Ok(Err(_)) => break,
            };
            match event {
                Event::Closed(_) => break,
                Event::Frame(ServerFrame::Subscribed {
                    topic,
                    position,
                    recovered,
                }) => {
                    let Some(topic) = topics.iter().copied().find(|t| *t == topic) else {
                        continue;
                    };
                    let since = asked[topic];
                    record(
                        topic,
                        Step::Subscribed {
                            since,
                            position,
                            recovered,
                        },
                    );
                    let cursor = cursors.get_mut(topic).expect("cursor");
                    if !recovered || cursor.is_none() {
                        *cursor = Some(position);
                    }
                    // A `recovered: false` notice on a live stream moves `asked`
                    // too: the next notice is relative to where this one left it.
                    asked.insert(topic, *cursor);
                }
                Event::Frame(ServerFrame::Message {
                    topic,
                    epoch,
                    offset,
                    data,
                }) => {
                    let Some(topic) = topics.iter().copied().find(|t| *t == topic) else {
                        continue;
                    };
                    let position = Position::new(epoch, offset);
                    let id = data["id"].as_u64().unwrap_or(u64::MAX);
                    record(topic, Step::Message { position, id });
                    *cursors.get_mut(topic).expect("cursor") = Some(position);
                    asked.insert(topic, Some(position));
                }
                Event::Frame(ServerFrame::Error {
                    code: ErrorCode::Unavailable,
                    topic: Some(topic),
                    ..
                }) => {
                    if let Some(topic) = topics.iter().copied().find(|t| *t == topic) {
                        retry.push(topic);
                    }
                }
                Event::Frame(_) => {}
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.close(1000)).await;
        if !retry.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `redis-cli` on `port`; errors are part of the weather here.
fn cli(port: u16, args: &[&str]) {
    let _ = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// What the nemesis did, by kind.
type Faults = Arc<Mutex<BTreeMap<&'static str, u32>>>;

fn nemesis(run: Arc<Run>, redis: Arc<Mutex<RedisServer>>, pids: Vec<u32>, faults: Faults) {
    let mut rng = StdRng::seed_from_u64(run.seed ^ 0xbad);
    let port = redis.lock().expect("redis").port;
    let mut running = Vec::new();
    while !run.calm.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..900)));
        let kind = rng.random_range(0..7);
        let topic = TOPICS[rng.random_range(0..TOPICS.len())];
        let pid = pids[rng.random_range(0..pids.len())];
        let hold = Duration::from_millis(rng.random_range(200..1200));
        let redis = redis.clone();
        let name = match kind {
            0 => "kill pub/sub connections",
            1 => "checkpoint (SAVE)",
            2 => "restart, losing writes since the checkpoint",
            3 => "restart, keeping every write",
            4 => "pause Redis",
            5 => "delete a topic's keys",
            _ => "stop a gateway",
        };
        *faults.lock().expect("faults").entry(name).or_default() += 1;
        // Each fault runs on its own, so they overlap.
        running.push(std::thread::spawn(move || match kind {
            0 => cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]),
            1 => cli(port, &["SAVE"]),
            2 | 3 => {
                let mut redis = redis.lock().expect("redis");
                if kind == 3 {
                    cli(port, &["SAVE"]);
                }
                redis.kill9();
                std::thread::sleep(hold / 2);
                let _ = redis.restart();
            }
            4 => cli(
                port,
                &["CLIENT", "PAUSE", &hold.as_millis().to_string(), "ALL"],
            ),
            5 => cli(
                port,
                &[
                    "DEL",
                    &format!("{PREFIX}:{{{topic}}}:meta"),
                    &format!("{PREFIX}:{{{topic}}}:log"),
                ],
            ),
            _ => {
                let _ = switchyard_tests::send_signal(pid, libc::SIGSTOP);
                std::thread::sleep(hold);
                let _ = switchyard_tests::send_signal(pid, libc::SIGCONT);
            }
        }));
    }
    for fault in running {
        let _ = fault.join();
    }
    cli(port, &["CLIENT", "UNPAUSE"]);
}

fn seconds() -> u64 {
    std::env::var("FAULTS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resume_promise_holds_under_overlapping_redis_faults() {
    let seed = std::env::var("FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let seconds = seconds();
    eprintln!(
        "backplane faults: seed {seed}, {seconds} s (FAULTS_SEED={seed} replays the schedule)"
    );
    let redis = RedisServer::start().expect("redis");
    let settings = gateway_settings(&redis);
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let pods: Vec<GatewayProcess> = (0..GATEWAYS)
        .map(|_| GatewayProcess::start(&settings).expect("gateway"))
        .collect();
    for pod in &pods {
        assert!(wait_status(
            pod.public,
            "/readyz",
            200,
            Duration::from_secs(10)
        ));
    }
    let redis = Arc::new(Mutex::new(redis));
    let run = Arc::new(Run {
        seed,
        calm: AtomicBool::new(false),
        settle: AtomicBool::new(false),
        done: AtomicBool::new(false),
        history: Mutex::new(History::default()),
        next_id: std::sync::atomic::AtomicU64::new(1),
    });
    let urls: Vec<String> = pods.iter().map(GatewayProcess::ws_url).collect();
    let admins: Vec<_> = pods.iter().map(|p| p.admin).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(run.clone(), urls.clone(), i)))
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS as u64)
        .map(|i| {
            let (run, admins) = (run.clone(), admins.clone());
            std::thread::spawn(move || publisher(run, admins, i))
        })
        .collect();
    let faults: Faults = Arc::default();
    let chaos = {
        let (run, redis, faults) = (run.clone(), redis.clone(), faults.clone());
        let pids = pods.iter().map(GatewayProcess::pid).collect();
        std::thread::spawn(move || nemesis(run, redis, pids, faults))
    };

    tokio::time::sleep(Duration::from_secs(seconds)).await;
    run.calm.store(true, Ordering::Relaxed);
    let run2 = run.clone();
    tokio::task::spawn_blocking(move || {
        chaos.join().expect("nemesis");
        for publisher in publishers {
            publisher.join().expect("publisher");
        }
        drop(run2);
    })
    .await
    .expect("join");
    // Healed: every gateway ready again, then clients stop hopping and one
    // last acknowledged message per topic must reach everyone.
    for pod in &pods {
        assert!(
            wait_status(pod.public, "/readyz", 200, Duration::from_secs(15)),
            "seed {seed}: a gateway never became ready after the faults"
        );
    }
    run.settle.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (n, topic) in TOPICS.iter().enumerate() {
        let admin = admins[n % admins.len()];
        let publishing = run.clone();
        let id = tokio::task::spawn_blocking(move || loop {
            let before = publishing.next_id.load(Ordering::Relaxed);
            if let Outcome::Acked(_) = publish(&publishing, admin, topic) {
                return before;
            }
            std::thread::sleep(Duration::from_millis(200));
        })
        .await
        .expect("final publish");
        run.history
            .lock()
            .expect("history")
            .finals
            .insert(topic, id);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let all_arrived = || {
        let history = run.history.lock().expect("history");
        history.streams.len() == CLIENTS * 3
            && history.streams.iter().all(|((_, topic), steps)| {
                let last = history.finals[topic];
                steps
                    .iter()
                    .any(|s| matches!(s, Step::Message { id, .. } if *id == last))
            })
    };
    while !all_arrived() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    run.done.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }

    let history = run.history.lock().expect("history");
    let violations = check(&history);
    let count =
        |f: fn(&Outcome) -> bool| history.publishes.iter().filter(|p| f(&p.outcome)).count();
    let messages: usize = history
        .streams
        .values()
        .map(|s| {
            s.iter()
                .filter(|s| matches!(s, Step::Message { .. }))
                .count()
        })
        .sum();
    let notices: usize = history
        .streams
        .values()
        .map(|s| {
            s.iter()
                .filter(|s| {
                    matches!(
                        s,
                        Step::Subscribed {
                            recovered: false,
                            ..
                        }
                    )
                })
                .count()
        })
        .sum();
    eprintln!(
        "backplane faults: seed {seed}: faults {:?}; publishes {} acknowledged, {} refused, {} unknown; {messages} messages delivered, {notices} recovered:false",
        faults.lock().expect("faults"),
        count(|o| matches!(o, Outcome::Acked(_))),
        count(|o| matches!(o, Outcome::Refused)),
        count(|o| matches!(o, Outcome::Unknown)),
    );
    assert_eq!(
        history.streams.len(),
        CLIENTS * 3,
        "seed {seed}: every client subscribed every topic"
    );
    // The whole history of a failed run, for reading beside the violations.
    let dump = std::env::temp_dir().join(format!("switchyard-faults-{seed}.txt"));
    if !violations.is_empty() {
        let mut text = String::new();
        for ((client, topic), steps) in &history.streams {
            text.push_str(&format!("client {client} {topic}\n"));
            for step in steps {
                text.push_str(&format!("  {step:?}\n"));
            }
        }
        for publish in &history.publishes {
            text.push_str(&format!("{publish:?}\n"));
        }
        let _ = std::fs::write(&dump, text);
    }
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations (FAULTS_SEED={seed} replays the schedule; the history is in {}):\n{}",
        violations.len(),
        dump.display(),
        violations
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ------------------------------------------------- the checker can fail

fn history(steps: Vec<Step>, publishes: &[(u64, Outcome)]) -> History {
    let mut history = History::default();
    history.streams.insert((0, "t0"), steps);
    history.publishes = publishes
        .iter()
        .map(|&(id, outcome)| Publish {
            topic: "t0",
            id,
            outcome,
        })
        .collect();
    history
        .finals
        .insert("t0", publishes.last().map_or(0, |p| p.0));
    history
}

fn sub(since: Option<(u64, u64)>, at: (u64, u64), recovered: bool) -> Step {
    Step::Subscribed {
        since: since.map(|(e, o)| Position::new(e, o)),
        position: Position::new(at.0, at.1),
        recovered,
    }
}

fn msg(epoch: u64, offset: u64, id: u64) -> Step {
    Step::Message {
        position: Position::new(epoch, offset),
        id,
    }
}

fn acked(epoch: u64, offset: u64) -> Outcome {
    Outcome::Acked(Position::new(epoch, offset))
}

/// A named history, what it publishes, and what the checker must say.
type Case = (&'static str, Vec<Step>, Vec<(u64, Outcome)>, &'static str);

#[test]
fn the_checker_accepts_a_clean_history_and_finds_each_kind_of_break() {
    let publishes = [(1, acked(7, 1)), (2, acked(7, 2)), (3, acked(9, 1))];
    let clean = vec![
        sub(None, (7, 0), true),
        msg(7, 1, 1),
        sub(Some((7, 1)), (7, 2), true),
        msg(7, 2, 2),
        sub(Some((7, 2)), (9, 0), false),
        msg(9, 1, 3),
    ];
    assert_eq!(check(&history(clean, &publishes)), Vec::<String>::new());
    let table: Vec<Case> = vec![
        (
            "a gap",
            vec![sub(None, (7, 0), true), msg(7, 2, 2), msg(9, 1, 3)],
            publishes.to_vec(),
            "silent gap",
        ),
        (
            "a duplicate",
            vec![
                sub(None, (7, 0), true),
                msg(7, 1, 1),
                msg(7, 1, 1),
                msg(7, 2, 2),
            ],
            publishes[..2].to_vec(),
            "duplicate",
        ),
        (
            "an epoch changed without notice",
            vec![sub(None, (7, 0), true), msg(7, 1, 1), msg(9, 1, 3)],
            publishes.to_vec(),
            "silent gap or epoch change",
        ),
        (
            "a rolled-back position reused",
            vec![sub(None, (7, 0), true), msg(7, 1, 1), msg(7, 2, 4)],
            vec![(1, acked(7, 1)), (2, acked(7, 2)), (4, acked(7, 2))],
            "acknowledged to two publishes",
        ),
        (
            "a refused publish delivered",
            vec![sub(None, (7, 0), true), msg(7, 1, 1), msg(7, 2, 5)],
            vec![(1, acked(7, 1)), (5, Outcome::Refused), (6, acked(7, 3))],
            "refused as unavailable",
        ),
        (
            "the last message missing",
            vec![sub(None, (7, 0), true), msg(7, 1, 1)],
            publishes[..2].to_vec(),
            "never got the last message",
        ),
        (
            "recovered across epochs",
            vec![
                sub(None, (7, 0), true),
                msg(7, 1, 1),
                sub(Some((7, 1)), (9, 0), true),
                msg(9, 1, 3),
            ],
            publishes.to_vec(),
            "into another epoch",
        ),
        (
            "resumed from the wrong place",
            vec![
                sub(None, (7, 0), true),
                msg(7, 1, 1),
                sub(Some((7, 0)), (7, 1), true),
                msg(7, 1, 1),
            ],
            publishes[..1].to_vec(),
            "its cursor was",
        ),
    ];
    for (name, steps, publishes, expected) in table {
        let found = check(&history(steps, &publishes));
        assert!(
            found.iter().any(|v| v.contains(expected)),
            "{name}: expected {expected:?} in {found:?}"
        );
    }
}
