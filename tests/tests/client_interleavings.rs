//! Generated interleavings for both clients: a seeded schedule of what a
//! gateway fleet does to a session — publishes, `migrate`, closes with any
//! code and hint on either side of a migration, crashes (no close frame),
//! half-open connections (silence: the gateways send heartbeats, and a
//! frozen one stops), refusals before `welcome` (a terminal one too), lost
//! history (a new epoch), frames of a later protocol version — played by
//! the scripted gateway over real sockets
//! against the Rust client and the browser client (under Node with `ws`).
//! The application's event stream and the gateway's view are checked:
//!
//! 1. every message delivered exactly once, in order, per topic, except
//!    across an announced resync (`resumed` with `recovered: false`);
//! 2. never more than two connections at once;
//! 3. a terminal close ends the session (`stopped`, no reconnect); anything
//!    else leaves it alive: once the schedule ends, the last message of
//!    every topic arrives (never zero connections without a retry coming);
//! 4. every connection presents a fresh credential (a ticket), so one
//!    refused with 4001/4501 is followed by a new one.
//!
//! (That the backoff grows after repeated failures is played in
//! client_session.rs and tests/browser/session.test.mjs.)
//!
//! `CLIENT_SEED` replays one schedule, `CLIENT_RUNS` (default 3 per client)
//! and `CLIENT_STEPS` (default 40) size the run; `bench/client-interleavings.sh`
//! runs many more. A violation panics with the seed and the schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use switchyard_client::{Client, ClientEvent, ClientOptions, Credential, CredentialSource};
use switchyard_tests::{ConnEvent, ConnHandle, FakeGateway};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const TOPICS: [&str; 2] = ["t1", "t2"];
/// The gateways' heartbeat: a connection silent for two is dead.
const HEARTBEAT_MS: u64 = 1000;

fn is_terminal(code: u16) -> bool {
    switchyard_protocol::CloseCode::from_u16(code).class()
        == switchyard_protocol::CloseClass::Terminal
}
/// How long the last message of every topic may take to arrive once the
/// schedule has ended (a backoff may be at its 5 s cap).
const SETTLE: Duration = Duration::from_secs(15);

/// An application event, from either client.
#[derive(Debug, Clone, PartialEq)]
enum AppEvent {
    Connected,
    Disconnected(u16),
    Migrated,
    Resumed {
        topic: String,
        recovered: bool,
    },
    Message {
        topic: String,
        epoch: u64,
        offset: u64,
    },
    Stopped(u16),
}

/// One step of a schedule.
#[derive(Debug, Clone)]
enum Step {
    Publish(usize),
    Migrate,
    /// Close the session's current connection (0) or the newest one (1).
    Close {
        newest: bool,
        code: u16,
        hint: Option<u64>,
    },
    Crash {
        newest: bool,
    },
    RefuseNext {
        code: u16,
        hint: Option<u64>,
    },
    /// The newest connection goes silent (half-open): the client must find
    /// out from the missing heartbeats.
    Freeze,
    NewEpoch(usize),
    LaterProtocol,
    Wait(u64),
}

fn schedule(seed: u64, steps: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..steps)
        .map(|_| match rng.random_range(0..100) {
            0..=34 => Step::Publish(rng.random_range(0..TOPICS.len())),
            35..=46 => Step::Migrate,
            47..=58 => {
                let codes = [1001, 1011, 1012, 4000, 4002, 4003, 4001, 4501, 3000];
                let code = codes[rng.random_range(0..codes.len())];
                let hint = rng.random_bool(0.5).then(|| rng.random_range(0..400));
                Step::Close {
                    newest: rng.random_bool(0.5),
                    code,
                    hint,
                }
            }
            59..=64 => Step::Crash {
                newest: rng.random_bool(0.5),
            },
            65..=72 => {
                let codes = [4003, 1013, 4501, 4000];
                let code = codes[rng.random_range(0..codes.len())];
                let hint = rng.random_bool(0.5).then(|| rng.random_range(0..300));
                Step::RefuseNext { code, hint }
            }
            73..=75 => Step::NewEpoch(rng.random_range(0..TOPICS.len())),
            76 => Step::Freeze,
            77..=80 => Step::LaterProtocol,
            // A rare terminal close (or refusal) ends the run early: the
            // session must stop.
            81 => Step::Close {
                newest: rng.random_bool(0.5),
                code: 4503,
                hint: None,
            },
            82 => Step::RefuseNext {
                code: 4503,
                hint: None,
            },
            _ => Step::Wait(rng.random_range(10..250)),
        })
        .collect()
}

/// The gateway fleet's state: one log per topic, the connections open.
struct Fleet {
    gateway: FakeGateway,
    events: mpsc::UnboundedReceiver<(usize, ConnEvent)>,
    events_tx: mpsc::UnboundedSender<(usize, ConnEvent)>,
    /// (epoch, head offset) per topic.
    logs: Vec<(u64, u64)>,
    conns: BTreeMap<usize, Conn>,
    next_id: usize,
    refuse: Option<(u16, Option<u64>)>,
    most_open: usize,
    /// The handshake URI of every connection, in order (`?ticket=`).
    tickets: Vec<String>,
    /// More than two open at an accept: (when, which). A violation only if
    /// they are all still open half a second later — a close the client
    /// has sent may not have reached the gateway yet.
    suspects: Vec<(tokio::time::Instant, Vec<usize>)>,
    terminal: Option<u16>,
    rng: StdRng,
}

struct Conn {
    handle: ConnHandle,
    /// Told to close (or dropped): no longer picked for a step.
    closing: bool,
    /// Topics the client subscribed on it, with nothing older to send.
    live: BTreeSet<usize>,
}

impl Fleet {
    fn reason(hint: Option<u64>) -> String {
        hint.map(|ms| format!(r#"{{"retry_ms":{ms}}}"#))
            .unwrap_or_default()
    }

    /// Takes new connections and the clients' frames until `until`.
    async fn serve_until(&mut self, until: tokio::time::Instant) {
        let mut heartbeat = tokio::time::interval(Duration::from_millis(HEARTBEAT_MS / 3));
        loop {
            tokio::select! {
                accepted = self.gateway.next(Duration::from_secs(3600)) => {
                    let Ok(conn) = accepted else { continue };
                    let id = self.next_id;
                    self.next_id += 1;
                    self.tickets.push(conn.uri.clone());
                    let handle = conn.serve(id, self.events_tx.clone());
                    let refused = self.refuse.take();
                    if let Some((code, hint)) = refused {
                        handle.close(code, &Self::reason(hint));
                        if is_terminal(code) {
                            self.terminal = Some(code);
                        }
                    } else {
                        handle.send(json!({"op": "welcome", "connection_id": format!("c{id}"),
                                           "server_id": format!("g{id}"), "heartbeat_ms": HEARTBEAT_MS}));
                    }
                    self.conns.insert(id, Conn { handle, live: BTreeSet::new(), closing: refused.is_some() });
                    // The client's sockets: the ones the gateway has not
                    // closed (a closed one's close handshake may lag).
                    let open: Vec<usize> = self.conns.iter().filter(|(_, c)| !c.closing).map(|(id, _)| *id).collect();
                    if open.len() > 2 {
                        self.suspects.push((tokio::time::Instant::now(), open));
                    }
                }
                Some((id, event)) = self.events.recv() => {
                    self.on_client(id, event);
                    self.confirm_suspects();
                }
                _ = heartbeat.tick() => {
                    for conn in self.conns.values().filter(|c| !c.closing) {
                        conn.handle.send(json!({"op": "heartbeat"}));
                    }
                    self.confirm_suspects();
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }

    fn on_client(&mut self, id: usize, event: ConnEvent) {
        let frame = match event {
            ConnEvent::Closed(_) => {
                self.conns.remove(&id);
                return;
            }
            ConnEvent::Frame(frame) => frame,
        };
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Some(topic) = TOPICS.iter().position(|t| frame["topic"] == *t) else {
            return;
        };
        match frame["op"].as_str() {
            Some("subscribe") => {
                let (epoch, head) = self.logs[topic];
                let since = &frame["since"];
                let recovered = since.is_null()
                    || (since["epoch"].as_u64() == Some(epoch)
                        && since["offset"].as_u64().is_some_and(|o| o <= head));
                conn.handle
                    .send(json!({"op": "subscribed", "topic": TOPICS[topic],
                    "position": {"epoch": epoch, "offset": head}, "recovered": recovered}));
                if recovered && !since.is_null() {
                    let from = since["offset"].as_u64().unwrap_or(0);
                    for offset in from + 1..=head {
                        conn.handle.send(message(topic, epoch, offset));
                    }
                }
                conn.live.insert(topic);
            }
            Some("unsubscribe") => {
                conn.live.remove(&topic);
            }
            _ => {}
        }
    }

    /// Suspects whose connections are all still open after 500 ms are real.
    fn confirm_suspects(&mut self) {
        let now = tokio::time::Instant::now();
        let conns = &self.conns;
        let mut most = self.most_open;
        self.suspects.retain(|(at, ids)| {
            let still = ids
                .iter()
                .filter(|id| conns.get(id).is_some_and(|c| !c.closing))
                .count();
            if now.duration_since(*at) < Duration::from_millis(500) {
                return still > 2;
            }
            most = most.max(still);
            false
        });
        self.most_open = most;
    }

    /// The connection a step acts on: the oldest open one, or the newest.
    fn pick(&self, newest: bool) -> Option<usize> {
        let mut open = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(id, _)| *id);
        if newest {
            open.next_back()
        } else {
            open.next()
        }
    }

    fn publish(&mut self, topic: usize) {
        self.logs[topic].1 += 1;
        let (epoch, offset) = self.logs[topic];
        for conn in self.conns.values() {
            if conn.live.contains(&topic) {
                conn.handle.send(message(topic, epoch, offset));
            }
        }
    }

    fn play(&mut self, step: &Step) {
        match step {
            Step::Publish(topic) => self.publish(*topic),
            Step::Migrate => {
                if let Some(id) = self.pick(true) {
                    self.conns[&id]
                        .handle
                        .send(json!({"op": "migrate", "grace_ms": 2000}));
                }
            }
            Step::Close { newest, code, hint } => {
                let terminal = is_terminal(*code);
                // A terminal close goes to the newest connection: the old
                // side of a finished migration may already be the client's
                // to close, and a close it ignores there is right.
                if let Some(id) = self.pick(*newest || terminal) {
                    let conn = self.conns.get_mut(&id).expect("picked");
                    conn.handle.close(*code, &Self::reason(*hint));
                    conn.closing = true;
                    if terminal {
                        self.terminal = Some(*code);
                    }
                }
            }
            Step::Crash { newest } => {
                if let Some(id) = self.pick(*newest) {
                    let conn = self.conns.get_mut(&id).expect("picked");
                    conn.handle.drop_tcp();
                    conn.closing = true;
                }
            }
            Step::RefuseNext { code, hint } => self.refuse = Some((*code, *hint)),
            Step::Freeze => {
                if let Some(id) = self.pick(true) {
                    let conn = self.conns.get_mut(&id).expect("picked");
                    conn.handle.freeze();
                    conn.closing = true;
                }
            }
            Step::NewEpoch(topic) => {
                // History lost: the log starts over in a later epoch, and
                // the gateways restart (1012) so every client resubscribes.
                self.logs[*topic] = (self.logs[*topic].0 + 1, 0);
                for conn in self.conns.values_mut() {
                    conn.handle.close(1012, "");
                    conn.closing = true;
                }
            }
            Step::LaterProtocol => {
                if let Some(id) = self.pick(true) {
                    let handle = &self.conns[&id].handle;
                    match self.rng.random_range(0..4) {
                        0 => handle.send_raw("null"),
                        1 => handle.send(json!({"op": "from-the-future", "x": [1, 2]})),
                        2 => {
                            handle.send(json!({"op": "error", "code": "new_kind", "message": "m"}))
                        }
                        _ => handle.send_binary(b"\x01\x02"),
                    }
                }
            }
            Step::Wait(_) => {}
        }
    }
}

fn message(topic: usize, epoch: u64, offset: u64) -> Value {
    json!({"op": "message", "topic": TOPICS[topic], "epoch": epoch, "offset": offset, "data": {"n": offset}})
}

/// A client under test: its events as they come.
enum Subject {
    Rust(Client),
    Browser {
        /// Killed when dropped.
        _node: Box<tokio::process::Child>,
        lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    },
}

impl Subject {
    async fn start(kind: &str, url: &str) -> Subject {
        if kind == "rust" {
            let mut options = ClientOptions::new(url);
            options.backoff = switchyard_client::policy::Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
                abnormal_window: Duration::from_secs(2),
            };
            options.connect_timeout = Duration::from_secs(5);
            let tickets = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            options.credentials = Some(CredentialSource::new(move || {
                let n = tickets.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                Box::pin(async move { Ok(Credential::Ticket(format!("ticket{n}"))) })
            }));
            let client = Client::start(options);
            for topic in TOPICS {
                client.subscribe(topic);
            }
            return Subject::Rust(client);
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = tokio::process::Command::new("node")
            .arg(root.join("tests/browser/harness.mjs"))
            .arg(url)
            .arg(TOPICS.join(","))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (the test command installs it)");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Subject::Browser {
            _node: Box::new(child),
            lines,
        }
    }

    async fn next(&mut self) -> Option<AppEvent> {
        match self {
            Subject::Rust(client) => loop {
                let event = match client.next_event().await? {
                    ClientEvent::Connected { .. } => AppEvent::Connected,
                    ClientEvent::Disconnected { code, .. } => AppEvent::Disconnected(code),
                    ClientEvent::Migrated { .. } => AppEvent::Migrated,
                    ClientEvent::Resumed { topic, recovered } => {
                        AppEvent::Resumed { topic, recovered }
                    }
                    ClientEvent::Message {
                        topic, position, ..
                    } => AppEvent::Message {
                        topic,
                        epoch: position.epoch,
                        offset: position.offset,
                    },
                    ClientEvent::Stopped { code } => AppEvent::Stopped(code),
                    _ => continue,
                };
                return Some(event);
            },
            Subject::Browser { lines, .. } => loop {
                let line = lines.next_line().await.ok()??;
                let value: Value = serde_json::from_str(&line).ok()?;
                let text = |k: &str| value[k].as_str().unwrap_or_default().to_string();
                let event = match value["type"].as_str()? {
                    "connected" => AppEvent::Connected,
                    "disconnected" => AppEvent::Disconnected(value["code"].as_u64()? as u16),
                    "migrated" => AppEvent::Migrated,
                    "resumed" => AppEvent::Resumed {
                        topic: text("topic"),
                        recovered: value["recovered"] == true,
                    },
                    "message" => AppEvent::Message {
                        topic: text("topic"),
                        epoch: value["epoch"].as_u64()?,
                        offset: value["offset"].as_u64()?,
                    },
                    "stopped" => AppEvent::Stopped(value["code"].as_u64()? as u16),
                    _ => continue,
                };
                return Some(event);
            },
        }
    }
}

/// Invariant 1 on one topic's events: each message the next offset of
/// the one before, except right after an announced resync (`resumed` with
/// `recovered: false`), after which the stream may start anywhere.
fn check_topic(topic: &str, events: &[AppEvent]) -> Result<(), String> {
    let mut last: Option<(u64, u64)> = None;
    let mut resync = false;
    for event in events {
        match event {
            AppEvent::Resumed {
                topic: t,
                recovered: false,
            } if t == topic => resync = true,
            AppEvent::Message {
                topic: t,
                epoch,
                offset,
            } if t == topic => {
                let here = (*epoch, *offset);
                if let (Some(previous), false) = (last, resync) {
                    if here <= previous {
                        return Err(format!(
                            "{topic}: {here:?} after {previous:?}: twice or out of order"
                        ));
                    }
                    if here != (previous.0, previous.1 + 1) {
                        return Err(format!(
                            "{topic}: {here:?} after {previous:?} without a resync: a gap"
                        ));
                    }
                }
                resync = false;
                last = Some(here);
            }
            _ => {}
        }
    }
    Ok(())
}

async fn run(kind: &str, seed: u64, steps: usize) -> Result<String, String> {
    let gateway = FakeGateway::start().await.map_err(|e| e.to_string())?;
    let url = gateway.url();
    let (events_tx, events) = mpsc::unbounded_channel();
    let mut fleet = Fleet {
        gateway,
        events,
        events_tx,
        logs: vec![(7, 0); TOPICS.len()],
        conns: BTreeMap::new(),
        next_id: 0,
        refuse: None,
        most_open: 0,
        tickets: Vec::new(),
        suspects: Vec::new(),
        terminal: None,
        rng: StdRng::seed_from_u64(seed ^ 0x5eed),
    };
    let mut subject = Subject::start(kind, &url).await;
    let (app_tx, mut app_rx) = mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        while let Some(event) = subject.next().await {
            let stopped = matches!(event, AppEvent::Stopped(_));
            if app_tx.send(event).is_err() || stopped {
                break;
            }
        }
        // Kept until the run ends (aborted then), so the session stays up.
        std::future::pending::<()>().await;
        drop(subject);
    });
    let plan = schedule(seed, steps);
    // Connected and subscribed before the schedule starts.
    fleet
        .serve_until(tokio::time::Instant::now() + Duration::from_millis(400))
        .await;
    for step in &plan {
        fleet.play(step);
        if fleet.terminal.is_some() {
            break;
        }
        let pause = match step {
            Step::Wait(ms) => *ms,
            _ => 15,
        };
        fleet
            .serve_until(tokio::time::Instant::now() + Duration::from_millis(pause))
            .await;
        if fleet.terminal.is_some() {
            break; // a refusal with a terminal code
        }
    }
    // A refusal planned but never used is no part of the ending.
    fleet.refuse = None;
    let mut seen: Vec<AppEvent> = Vec::new();
    let describe =
        |seen: &[AppEvent]| format!("seed {seed} ({kind}); schedule {plan:?}\nevents {seen:?}");
    if let Some(code) = fleet.terminal {
        // Invariant 3: stopped, and no reconnect.
        // (A connection the client was opening when the close came may
        // still be accepted; it must be closed by the client, not kept.)
        fleet
            .serve_until(tokio::time::Instant::now() + Duration::from_millis(1500))
            .await;
        while let Ok(event) = app_rx.try_recv() {
            seen.push(event);
        }
        if !seen.contains(&AppEvent::Stopped(code)) {
            return Err(format!(
                "a terminal {code} did not stop the session\n{}",
                describe(&seen)
            ));
        }
        let kept: Vec<usize> = fleet
            .conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(id, _)| *id)
            .collect();
        if !kept.is_empty() {
            return Err(format!(
                "connections {kept:?} still open 1.5 s after a terminal {code}\n{}",
                describe(&seen)
            ));
        }
    } else {
        // Invariant 3: alive. A message published now arrives, on every
        // topic (published again every 500 ms until one does: one published
        // while the client was between connections lies before its resync
        // point, and is rightly never delivered).
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let missing: Vec<usize> = (0..TOPICS.len())
                .filter(|topic| {
                    let (epoch, head) = fleet.logs[*topic];
                    head == 0
                        || !seen.iter().any(|e| {
                            matches!(e, AppEvent::Message { topic: t, epoch: ep, offset }
                            if t == TOPICS[*topic] && *ep == epoch && *offset == head)
                        })
                })
                .collect();
            if missing.is_empty() {
                break;
            }
            if seen.iter().any(|e| matches!(e, AppEvent::Stopped(_))) {
                return Err(format!(
                    "stopped without a terminal close\n{}",
                    describe(&seen)
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the last messages never arrived (a dead session?)\n{}",
                    describe(&seen)
                ));
            }
            for topic in missing {
                fleet.publish(topic);
            }
            let next = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
            fleet.serve_until(next).await;
            while let Ok(event) = app_rx.try_recv() {
                seen.push(event);
            }
        }
    }
    // Invariant 1.
    for topic in TOPICS {
        check_topic(topic, &seen).map_err(|e| format!("{e}\n{}", describe(&seen)))?;
    }
    // Invariant 4: a fresh credential on every connection (so after 4001
    // or 4501 the next one presents a new one).
    let fresh: BTreeSet<&String> = fleet.tickets.iter().collect();
    if fresh.len() != fleet.tickets.len()
        || fleet.tickets.iter().any(|uri| !uri.contains("ticket="))
    {
        return Err(format!(
            "a credential presented twice, or none: {:?}\n{}",
            fleet.tickets,
            describe(&seen)
        ));
    }
    // Invariant 2.
    if fleet.most_open > 2 {
        return Err(format!(
            "{} connections at once\n{}",
            fleet.most_open,
            describe(&seen)
        ));
    }
    // Dropping the client ends it (the Node process is killed with it).
    collector.abort();
    let messages = seen
        .iter()
        .filter(|e| matches!(e, AppEvent::Message { .. }))
        .count();
    Ok(format!(
        "{} connections, {messages} messages delivered",
        fleet.next_id
    ))
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn explore(kind: &str) {
    let steps = setting("CLIENT_STEPS", 40) as usize;
    let seeds: Vec<u64> = match std::env::var("CLIENT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let base: u64 = rand::random::<u32>().into();
            (0..setting("CLIENT_RUNS", 3)).map(|i| base + i).collect()
        }
    };
    for seed in seeds {
        match run(kind, seed, steps).await {
            Ok(summary) => eprintln!("{kind} client, seed {seed}, {steps} steps: {summary}"),
            Err(violation) => panic!(
                "{kind} client: {violation}\nreplay: CLIENT_SEED={seed} CLIENT_STEPS={steps}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_interleavings_keep_the_rust_clients_promise() {
    explore("rust").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_interleavings_keep_the_browser_clients_promise() {
    explore("browser").await;
}
