//! Staggered migration end to end: blue and green gateway processes on one
//! private Redis, a switchable proxy standing in for the Service, thousands of
//! real `switchyard_client::Client` sessions, a publisher running throughout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_client::{Client, ClientEvent, ClientOptions};
use switchyard_protocol::drain::{max_in_window, paced_rate, DrainMode, DrainRequest};
use switchyard_tests::{wait_status, BlueGreen, GatewayProcess};

const TOPICS: [&str; 3] = ["m.alpha", "m.beta", "m.gamma"];
const LONG: Duration = Duration::from_secs(60);

async fn fleet(blue_settings: &[&str]) -> BlueGreen {
    BlueGreen::start(blue_settings)
        .await
        .expect("blue/green fleet")
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    offsets: BTreeMap<String, Vec<u64>>,
    disconnects: Vec<u16>,
    migrations: usize,
    servers: Vec<String>,
}

struct Crowd {
    seen: Vec<Arc<Mutex<Seen>>>,
    subscribed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts `count` client sessions on `url`, each subscribed to every topic.
fn crowd(url: &str, count: usize) -> Crowd {
    let subscribed = Arc::new(AtomicUsize::new(0));
    let mut seen = Vec::with_capacity(count);
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let mut options = ClientOptions::new(url);
        options.backoff.base = Duration::from_millis(50);
        options.backoff.cap = Duration::from_secs(2);
        let mut client = Client::start(options);
        for topic in TOPICS {
            client.subscribe(topic);
        }
        let record = Arc::new(Mutex::new(Seen::default()));
        let (record_in, subscribed_in) = (record.clone(), subscribed.clone());
        tasks.push(tokio::spawn(async move {
            let mut first_subscribes = 0;
            while let Some(event) = client.next_event().await {
                let mut seen = record_in.lock().expect("seen");
                match event {
                    ClientEvent::Message {
                        topic, position, ..
                    } => seen.offsets.entry(topic).or_default().push(position.offset),
                    ClientEvent::Resumed { .. } if first_subscribes < TOPICS.len() => {
                        first_subscribes += 1;
                        subscribed_in.fetch_add(1, Ordering::Relaxed);
                    }
                    ClientEvent::Disconnected { code, .. } => seen.disconnects.push(code),
                    ClientEvent::Migrated { .. } => seen.migrations += 1,
                    ClientEvent::Connected { server_id, .. } => seen.servers.push(server_id),
                    ClientEvent::Stopped { .. } => break,
                    _ => {}
                }
            }
        }));
        seen.push(record);
    }
    Crowd {
        seen,
        subscribed,
        tasks,
    }
}

impl Crowd {
    async fn wait_subscribed(&self) {
        let want = self.seen.len() * TOPICS.len();
        let deadline = Instant::now() + LONG;
        while self.subscribed.load(Ordering::Relaxed) < want {
            assert!(Instant::now() < deadline, "clients did not all subscribe");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every client has every topic up to `last`, then checks
    /// each saw exactly 1..=last, in order.
    async fn assert_complete(&self, last: &BTreeMap<String, u64>) {
        let deadline = Instant::now() + LONG;
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

    fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Publishes round robin over the topics every `every` until stopped;
/// returns the last offset per topic.
struct Publisher {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<String, u64>>,
}

fn publisher(admin: std::net::SocketAddr, every: Duration) -> Publisher {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut last = BTreeMap::new();
        let mut n = 0usize;
        while !flag.load(Ordering::Relaxed) {
            let topic = TOPICS[n % TOPICS.len()];
            let body = format!(r#"{{"topic":"{topic}","data":{{"n":{n}}}}}"#);
            let (status, text) =
                switchyard_tests::http_request(admin, "POST", "/api/publish", Some(&body))
                    .expect("publish");
            assert_eq!(status, 200, "{text}");
            let response: serde_json::Value = serde_json::from_str(&text).expect("json");
            let offset = response["position"]["offset"].as_u64().expect("offset");
            last.insert(topic.to_owned(), offset);
            n += 1;
            std::thread::sleep(every);
        }
        last
    });
    Publisher { stop, task }
}

impl Publisher {
    async fn finish(self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("publisher")
    }
}

/// Counts per whole second since the first event, for failure messages.
fn per_second(times_ms: &[u64]) -> Vec<usize> {
    let Some(&first) = times_ms.iter().min() else {
        return Vec::new();
    };
    let mut counts = Vec::new();
    for t in times_ms {
        let second = ((t - first) / 1000) as usize;
        if counts.len() <= second {
            counts.resize(second + 1, 0);
        }
        counts[second] += 1;
    }
    counts
}

/// `POST /admin/drain` on `gw`: (status, body).
fn post_drain(gw: &GatewayProcess, request: &DrainRequest) -> (u16, String) {
    let body = serde_json::to_string(request).expect("json");
    gw.admin_request("POST", "/admin/drain", Some(&body))
        .expect("drain request")
}

fn status(gw: &GatewayProcess) -> serde_json::Value {
    let (code, body) = gw
        .admin_request("GET", "/admin/status", None)
        .expect("status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("json")
}

/// Waits for a draining gateway to empty, sampling its drain status every
/// 20 ms; returns how long it took and the samples as (`elapsed_ms` in the
/// gateway's own clock, `signals_sent`).
async fn wait_drained(gw: &GatewayProcess, timeout: Duration) -> (Duration, Vec<(u64, u64)>) {
    let started = Instant::now();
    let mut samples = Vec::new();
    loop {
        let status = status(gw);
        let drain = &status["drain"];
        if let (Some(at), Some(sent)) =
            (drain["elapsed_ms"].as_u64(), drain["signals_sent"].as_u64())
        {
            samples.push((at, sent));
        }
        if status["connections"].as_u64() == Some(0) {
            return (started.elapsed(), samples);
        }
        assert!(
            started.elapsed() < timeout,
            "{} connections left",
            status["connections"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The highest rate over any two samples at least a second apart.
fn peak_rate(samples: &[(u64, u64)]) -> f64 {
    let mut peak = 0.0_f64;
    let mut j = 0;
    for i in 0..samples.len() {
        while j + 1 < i && samples[i].0 - samples[j + 1].0 >= 1000 {
            j += 1;
        }
        let span = samples[i].0.saturating_sub(samples[j].0);
        if span >= 1000 {
            peak = peak.max((samples[i].1 - samples[j].1) as f64 * 1000.0 / span as f64);
        }
    }
    peak
}

async fn wait_connections(gw: &GatewayProcess, want: u64, timeout: Duration) -> Duration {
    let started = Instant::now();
    while status(gw)["connections"].as_u64() != Some(want) {
        assert!(
            started.elapsed() < timeout,
            "{} connections left",
            status(gw)["connections"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_before_break_migrates_2000_clients_without_loss_or_storm() {
    const CLIENTS: usize = 2000;
    const RATE: u64 = 400;
    let mut fleet = fleet(&["drain.migrate_grace_ms=8000"]).await;
    let crowd = crowd(&fleet.proxy.ws_url(), CLIENTS);
    crowd.wait_subscribed().await;
    assert_eq!(status(&fleet.blue)["connections"], CLIENTS as u64);
    let publishing = publisher(fleet.green.admin, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(500)).await;

    fleet.proxy.switch(vec![fleet.green.public]);
    let request = DrainRequest {
        window_ms: 10_000,
        max_rate: RATE,
        deadline_ms: 30_000,
        mode: DrainMode::MakeBeforeBreak,
        retry_jitter_ms: 2_000,
        migrate_grace_ms: None,
    };
    let (code, body) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        switchyard_tests::http_request(fleet.blue.public, "GET", "/readyz", None)
            .expect("readyz")
            .0,
        503,
        "not ready from the moment the drain starts"
    );
    let (code, _) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 409, "one drain at a time");

    let (took, samples) = wait_drained(&fleet.blue, Duration::from_secs(30)).await;
    assert!(
        took < Duration::from_secs(30),
        "blue emptied before the deadline ({took:?})"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last).await;

    let drain = &status(&fleet.blue)["drain"];
    assert_eq!(drain["total"], CLIENTS as u64);
    assert_eq!(drain["migrated_by_client"], CLIENTS as u64, "{drain}");
    assert_eq!(drain["closed_at_slot"], 0);
    assert_eq!(drain["forced_at_deadline"], 0);
    assert_eq!(drain["signals_sent"], CLIENTS as u64, "{drain}");
    for (i, seen) in crowd.seen.iter().enumerate() {
        let seen = seen.lock().expect("seen");
        assert!(
            seen.disconnects.is_empty(),
            "client {i} was without a connection: {:?}",
            seen.disconnects
        );
        assert_eq!(seen.migrations, 1, "client {i}");
    }
    // The gateway sends at its pace (N/W = 200/s here, under the 400/s
    // cap), as its own counters and clock show.
    let pace = paced_rate(CLIENTS, request.window_ms, RATE) as f64;
    let sent_peak = peak_rate(&samples);
    assert!(
        sent_peak <= pace * 1.1,
        "signals sent at up to {sent_peak:.0}/s, pace {pace}/s ({} samples)",
        samples.len()
    );
    // The clients close blue once resumed on green. They share the cores
    // with the gateways and the proxy, and a client starved for a moment
    // closes a little late, together with the next ones; what must never
    // happen is a storm (2,000 at once without the pace).
    let closes = fleet.proxy.closes(fleet.blue.public);
    assert_eq!(closes.len(), CLIENTS);
    let peak = max_in_window(&closes, 1000);
    assert!(
        peak as f64 <= RATE as f64 * 1.5,
        "{peak} closes in one second, cap {RATE}; per second: {:?}",
        per_second(&closes)
    );
    assert_eq!(status(&fleet.green)["connections"], CLIENTS as u64);
    assert_eq!(
        fleet
            .blue
            .metric("switchyard_migrations_total{how=\"client\"}")
            .expect("m"),
        CLIENTS as f64
    );
    let signals = |signal: &str| {
        let series = format!("switchyard_drain_signals_total{{signal=\"{signal}\"}}");
        fleet.blue.metric(&series).expect("m")
    };
    assert_eq!(signals("migrate"), CLIENTS as f64, "one migrate per client");
    assert_eq!(signals("close"), 0.0, "every client left by itself");

    fleet.blue.terminate();
    let exit = fleet
        .blue
        .wait_exit(Duration::from_secs(10))
        .expect("blue exits");
    assert!(exit.success(), "{exit:?}");
    crowd.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_mode_spreads_reconnects_instead_of_a_storm() {
    const CLIENTS: usize = 600;
    const RATE: u64 = 300;
    let fleet = fleet(&[]).await;
    let crowd = crowd(&fleet.proxy.ws_url(), CLIENTS);
    crowd.wait_subscribed().await;
    let publishing = publisher(fleet.green.admin, Duration::from_millis(40));
    fleet.proxy.switch(vec![fleet.green.public]);
    let request = DrainRequest {
        window_ms: 1_000,
        max_rate: RATE,
        deadline_ms: 20_000,
        mode: DrainMode::Close,
        retry_jitter_ms: 2_000,
        migrate_grace_ms: None,
    };
    let (code, body) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 202, "{body}");
    wait_connections(&fleet.blue, 0, Duration::from_secs(20)).await;
    wait_connections(&fleet.green, CLIENTS as u64, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last).await;

    let drain = &status(&fleet.blue)["drain"];
    assert_eq!(drain["closed_at_slot"], CLIENTS as u64, "{drain}");
    assert_eq!(
        fleet
            .blue
            .metric("switchyard_drain_signals_total{signal=\"close\"}")
            .expect("m"),
        CLIENTS as f64
    );
    for (i, seen) in crowd.seen.iter().enumerate() {
        assert_eq!(
            seen.lock().expect("seen").disconnects,
            vec![4000],
            "client {i}"
        );
    }
    // The cap spreads the closes (600 at 300/s: 2 s, not 1 s), the retry
    // jitter spreads the reconnects further.
    let closes = fleet.proxy.closes(fleet.blue.public);
    let close_peak = max_in_window(&closes, 1000);
    assert!(
        close_peak as f64 <= RATE as f64 * 1.1,
        "{close_peak} closes in a second"
    );
    let reconnects = fleet.proxy.opens(fleet.green.public);
    assert_eq!(reconnects.len(), CLIENTS);
    let reconnect_peak = max_in_window(&reconnects, 1000);
    assert!(
        reconnect_peak as f64 <= RATE as f64 * 1.1,
        "{reconnect_peak} reconnects in one second: a storm"
    );
    crowd.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_the_configured_defaults_and_exits_zero() {
    const CLIENTS: usize = 300;
    let mut fleet = fleet(&[
        "drain.window_ms=2000",
        "drain.max_rate=300",
        "drain.mode=make_before_break",
        "drain.grace_period_ms=15000",
    ])
    .await;
    let crowd = crowd(&fleet.proxy.ws_url(), CLIENTS);
    crowd.wait_subscribed().await;
    let publishing = publisher(fleet.green.admin, Duration::from_millis(40));
    fleet.proxy.switch(vec![fleet.green.public]);
    fleet.blue.terminate();
    let exit = fleet
        .blue
        .wait_exit(Duration::from_secs(20))
        .expect("blue exits by itself");
    assert!(exit.success(), "{exit:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last).await;
    for (i, seen) in crowd.seen.iter().enumerate() {
        let seen = seen.lock().expect("seen");
        assert!(
            seen.disconnects.is_empty(),
            "client {i}: {:?}",
            seen.disconnects
        );
        assert_eq!(seen.migrations, 1, "client {i}");
    }
    assert_eq!(status(&fleet.green)["connections"], CLIENTS as u64);
    crowd.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_drain_keeps_the_rest_on_blue() {
    const CLIENTS: usize = 400;
    let fleet = fleet(&[]).await;
    let crowd = crowd(&fleet.proxy.ws_url(), CLIENTS);
    crowd.wait_subscribed().await;
    fleet.proxy.switch(vec![fleet.green.public]);
    let request = DrainRequest {
        window_ms: 8_000,
        max_rate: 50,
        deadline_ms: 60_000,
        mode: DrainMode::MakeBeforeBreak,
        retry_jitter_ms: 1_000,
        migrate_grace_ms: None,
    };
    let (code, _) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 202);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (code, body) = fleet
        .blue
        .admin_request("DELETE", "/admin/drain", None)
        .expect("cancel");
    assert_eq!(code, 200, "{body}");
    let cancelled: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(cancelled["cancelled"], true);
    assert!(
        wait_status(fleet.blue.public, "/readyz", 200, LONG),
        "readiness is restored"
    );
    // Let the clients told to migrate before the cancel finish moving.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stayed = status(&fleet.blue)["connections"]
        .as_u64()
        .expect("connections");
    assert!(
        stayed > 0 && stayed < CLIENTS as u64,
        "{stayed} stayed on blue"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        status(&fleet.blue)["connections"].as_u64(),
        Some(stayed),
        "nobody else moves"
    );
    assert_eq!(
        status(&fleet.green)["connections"].as_u64(),
        Some(CLIENTS as u64 - stayed)
    );
    assert_eq!(
        fleet
            .blue
            .admin_request("DELETE", "/admin/drain", None)
            .expect("cancel")
            .0,
        409,
        "nothing left to cancel"
    );
    // Publishing still reaches both colors.
    let position = fleet
        .green
        .publish("m.alpha", "\"after cancel\"")
        .expect("publish");
    crowd
        .assert_complete(&BTreeMap::from([("m.alpha".to_owned(), position.offset)]))
        .await;
    crowd.stop();
}
