//! Staggered migration end to end: blue and green gateway processes on one
//! private Redis, a switchable proxy standing in for the Service, thousands of
//! real `switchyard_client::Client` sessions, a publisher running throughout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use switchyard_protocol::drain::{max_in_window, paced_rate, DrainMode, DrainRequest};
use switchyard_tests::{wait_status, BlueGreen, Crowd, GatewayProcess, Publisher};

const TOPICS: [&str; 3] = ["m.alpha", "m.beta", "m.gamma"];
const LONG: Duration = Duration::from_secs(60);

async fn fleet(blue_settings: &[&str]) -> BlueGreen {
    BlueGreen::start(blue_settings)
        .await
        .expect("blue/green fleet")
}

/// `count` sessions on `url` subscribed to every topic, quick to back off.
fn crowd(url: &str, count: usize) -> Crowd {
    Crowd::start(url, count, &TOPICS, |options| {
        options.backoff.base = Duration::from_millis(50);
        options.backoff.cap = Duration::from_secs(2);
    })
}

fn publisher(admin: std::net::SocketAddr, every: Duration) -> Publisher {
    Publisher::start(admin, &TOPICS, every)
}

/// A fleet with `clients` sessions subscribed through its proxy (routing to
/// blue) and a publisher on green every 40 ms.
async fn scene(blue_settings: &[&str], clients: usize) -> (BlueGreen, Crowd, Publisher) {
    let fleet = fleet(blue_settings).await;
    let crowd = crowd(&fleet.proxy.ws_url(), clients);
    crowd.wait_subscribed(LONG).await;
    let publishing = publisher(fleet.green.admin, Duration::from_millis(40));
    (fleet, crowd, publishing)
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
    crowd.wait_subscribed(LONG).await;
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
    // Issue 27: the running drain's size, cap and deadline are exported,
    // for the dashboards' percent done and time left.
    let metric = |name: &str| fleet.blue.metric(name).expect("metric");
    assert_eq!(metric("switchyard_drain_total"), CLIENTS as f64);
    assert_eq!(metric("switchyard_drain_max_rate"), RATE as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let deadline = metric("switchyard_drain_deadline_timestamp_seconds");
    assert!(
        (now + 27.0..=now + 31.0).contains(&deadline),
        "deadline {deadline} for a 30 s drain started by {now}"
    );

    let (took, samples) = wait_drained(&fleet.blue, Duration::from_secs(30)).await;
    assert!(
        took < Duration::from_secs(30),
        "blue emptied before the deadline ({took:?})"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last, LONG).await;

    let drain = &status(&fleet.blue)["drain"];
    assert_eq!(drain["total"], CLIENTS as u64);
    assert_eq!(drain["migrated_by_client"], CLIENTS as u64, "{drain}");
    for gone in [
        "switchyard_drain_total",
        "switchyard_drain_max_rate",
        "switchyard_drain_deadline_timestamp_seconds",
    ] {
        assert_eq!(metric(gone), 0.0, "{gone} once the drain ended");
    }
    assert_eq!(drain["closed_at_slot"], 0);
    assert_eq!(drain["forced_at_deadline"], 0);
    assert_eq!(drain["signals_sent"], CLIENTS as u64, "{drain}");
    assert_counts_add_up(drain);
    assert_eq!(
        fleet.blue.metric("switchyard_drain_remaining").expect("m"),
        0.0
    );
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
    let (fleet, crowd, publishing) = scene(&[], CLIENTS).await;
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
    crowd.assert_complete(&last, LONG).await;

    let drain = &status(&fleet.blue)["drain"];
    assert_eq!(drain["closed_at_slot"], CLIENTS as u64, "{drain}");
    assert_counts_add_up(drain);
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
    let (mut fleet, crowd, publishing) = scene(
        &[
            "drain.window_ms=2000",
            "drain.max_rate=300",
            "drain.mode=make_before_break",
            "drain.grace_period_ms=15000",
        ],
        CLIENTS,
    )
    .await;
    fleet.proxy.switch(vec![fleet.green.public]);
    fleet.blue.terminate();
    let exit = fleet
        .blue
        .wait_exit(Duration::from_secs(20))
        .expect("blue exits by itself");
    assert!(exit.success(), "{exit:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last, LONG).await;
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
    crowd.wait_subscribed(LONG).await;
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
    assert_eq!(cancelled["active"], false);
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
    // A cancelled drain counts the clients it told to migrate, and not the
    // ones it never touched that are still here.
    let drain = &status(&fleet.blue)["drain"];
    assert_eq!(
        drain["migrated_by_client"].as_u64(),
        Some(CLIENTS as u64 - stayed),
        "{drain}"
    );
    assert_eq!(drain["ended_otherwise"], 0, "{drain}");
    assert_eq!(
        fleet.blue.metric("switchyard_drain_remaining").expect("m"),
        0.0
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
        .assert_complete(
            &BTreeMap::from([("m.alpha".to_owned(), position.offset)]),
            LONG,
        )
        .await;
    crowd.stop();
}

/// Checks a drain's counts: every planned connection is counted once, by
/// how it left; a drain that ran to its end adds up to its total.
fn assert_counts_add_up(drain: &serde_json::Value) {
    let count = |key: &str| {
        drain[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {drain}"))
    };
    let counted = count("migrated_by_client")
        + count("closed_at_slot")
        + count("forced_at_deadline")
        + count("ended_otherwise");
    assert_eq!(counted, count("total"), "counts do not add up: {drain}");
}

/// The last log event of `gw` whose message is `message`, as JSON.
fn log_event(gw: &GatewayProcess, message: &str) -> Option<serde_json::Value> {
    gw.logs()
        .iter()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["message"] == message)
}

/// Waits (without blocking the runtime) for `gw` to exit; returns its exit
/// status and how long that took from `since`.
async fn exited(
    gw: &mut GatewayProcess,
    since: Instant,
    timeout: Duration,
) -> (std::process::ExitStatus, Duration) {
    loop {
        if let Some(exit) = gw.wait_exit(Duration::from_millis(10)) {
            return (exit, since.elapsed());
        }
        assert!(
            since.elapsed() < timeout,
            "still running {timeout:?} after the signal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How much later than its stop time a process may exit here: it shares
/// two cores with the clients, the other gateway, the proxy and the other
/// tests of this file. (Before the stop time existed, these gateways ran
/// on for 18 s to 30 s past it.)
const EXIT_SLACK: Duration = Duration::from_millis(3_000);

/// SIGTERM while the Service still routes to the stopping gateway: every
/// client it closes comes back to it. Each comes back to a 4000 with
/// `retry_ms` (never a second drain), the process exits by its stop time
/// (grace period + close timeout), the drain's counts add up and nobody
/// counts as migrated, and once the Service routes to green every client
/// resumes there with nothing lost.
async fn sigterm_with_clients_coming_back(mode: &str) {
    const CLIENTS: usize = 200;
    const GRACE: Duration = Duration::from_millis(3_000);
    const CLOSE_TIMEOUT: Duration = Duration::from_millis(1_000);
    let mode_setting = format!("drain.mode={mode}");
    let (mut fleet, crowd, publishing) = scene(
        &[
            "drain.window_ms=1000",
            "drain.max_rate=400",
            &mode_setting,
            "drain.grace_period_ms=3000",
            "drain.migrate_grace_ms=500",
            "drain.retry_jitter_ms=300",
            "connection.close_timeout_ms=1000",
        ],
        CLIENTS,
    )
    .await;

    let signalled = Instant::now();
    fleet.blue.terminate();
    let (exit, took) = exited(&mut fleet.blue, signalled, Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        took <= GRACE + CLOSE_TIMEOUT + EXIT_SLACK,
        "exited {took:?} after SIGTERM; stop time {:?}",
        GRACE + CLOSE_TIMEOUT
    );
    let starts = blue_drains_started(&fleet.blue);
    assert_eq!(starts, 1, "one drain per SIGTERM");
    let finished = log_event(&fleet.blue, "drain finished").expect("drain finished logged");
    assert_eq!(finished["total"], CLIENTS as u64, "{finished}");
    assert_counts_add_up(&finished);
    assert_eq!(
        finished["migrated_by_client"], 0,
        "a client that came back to the same gateway has not migrated: {finished}"
    );

    fleet.proxy.switch(vec![fleet.green.public]);
    wait_connections(&fleet.green, CLIENTS as u64, LONG).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last, LONG).await;
    crowd.stop();
}

/// How many drains `gw` logged as started.
fn blue_drains_started(gw: &GatewayProcess) -> usize {
    gw.logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "drain started")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_by_its_stop_time_when_closed_clients_come_back() {
    sigterm_with_clients_coming_back("close").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_by_its_stop_time_when_migrating_clients_come_back() {
    sigterm_with_clients_coming_back("make_before_break").await;
}

/// An admin drain while the Service still routes to the drained gateway for
/// a while: clients that come back (closed, or dialling their migration) are
/// turned away with 4000 and `retry_ms` (not held until the deadline), the
/// drain ends on its schedule with counts that add up, the signals keep the
/// cap, and the drained gateway stays drained (readiness 503, upgrades
/// turned away) until `DELETE /admin/drain`.
async fn admin_drain_with_clients_coming_back(mode: DrainMode) {
    const CLIENTS: usize = 300;
    const RATE: u64 = 200;
    let (fleet, crowd, publishing) = scene(&[], CLIENTS).await;
    let request = DrainRequest {
        window_ms: 1_000,
        max_rate: RATE,
        deadline_ms: 20_000,
        mode,
        retry_jitter_ms: 300,
        migrate_grace_ms: Some(500),
    };
    let (code, body) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 202, "{body}");
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut switched = false;
    let drain = loop {
        let drain = status(&fleet.blue)["drain"].clone();
        if let (Some(at), Some(sent)) =
            (drain["elapsed_ms"].as_u64(), drain["signals_sent"].as_u64())
        {
            samples.push((at, sent));
        }
        if drain["active"] == false {
            break drain;
        }
        // The endpoints catch up only after the closes began.
        if !switched && started.elapsed() >= Duration::from_millis(1_200) {
            fleet.proxy.switch(vec![fleet.green.public]);
            switched = true;
        }
        assert!(started.elapsed() < LONG, "drain still active: {drain}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // 300 at 200/s: a 1.5 s schedule (up to 3.5 s when every migrate is
    // followed by a close after its grace, under the same cap). Held late
    // arrivals would keep it running to the 20 s deadline.
    let elapsed = drain["elapsed_ms"].as_u64().expect("elapsed");
    assert!(elapsed < 8_000, "drain ended after {elapsed} ms: {drain}");
    assert_eq!(drain["total"], CLIENTS as u64, "{drain}");
    assert_eq!(drain["forced_at_deadline"], 0, "{drain}");
    assert_counts_add_up(&drain);
    let moved = |key: &str| drain[key].as_u64().expect("count");
    match mode {
        DrainMode::Close => assert_eq!(moved("closed_at_slot"), CLIENTS as u64, "{drain}"),
        // Migrations dialled before the switch came back to blue and were
        // turned away: those clients were closed after their grace, the
        // later ones migrated to green.
        DrainMode::MakeBeforeBreak => {
            assert!(moved("closed_at_slot") > 0, "{drain}");
            assert!(moved("migrated_by_client") > 0, "{drain}");
        }
    }
    let peak = peak_rate(&samples);
    assert!(
        peak <= RATE as f64 * 1.1,
        "signals at up to {peak:.0}/s, cap {RATE}"
    );
    let turned_away = fleet
        .blue
        .metric("switchyard_handshakes_rejected_total{reason=\"draining\"}")
        .expect("metric");
    assert!(
        turned_away > 0.0,
        "the clients came back to blue and were turned away"
    );
    assert_eq!(
        fleet.blue.metric("switchyard_drain_remaining").expect("m"),
        0.0
    );
    assert_eq!(
        fleet.blue.metric("switchyard_drain_active").expect("m"),
        0.0
    );
    assert_eq!(fleet.blue.metric("switchyard_draining").expect("m"), 1.0);
    let migrations = |how: &str| {
        let series = format!("switchyard_migrations_total{{how=\"{how}\"}}");
        fleet.blue.metric(&series).unwrap_or(0.0)
    };
    assert_eq!(migrations("slot"), moved("closed_at_slot") as f64);
    assert_eq!(migrations("client"), moved("migrated_by_client") as f64);
    assert_eq!(migrations("deadline") + migrations("other"), 0.0);

    // Drained, and it stays so: not ready, and a new client is told to go.
    let ready = || {
        switchyard_tests::http_request(fleet.blue.public, "GET", "/readyz", None)
            .expect("readyz")
            .0
    };
    assert_eq!(
        ready(),
        503,
        "a drained gateway does not invite traffic back"
    );
    let mut late = switchyard_tests::RawSocket::connect(fleet.blue.public, "/ws").expect("upgrade");
    assert_eq!(late.read_close_code().expect("read"), Some(4000));
    let (code, body) = fleet
        .blue
        .admin_request("DELETE", "/admin/drain", None)
        .expect("undrain");
    assert_eq!(code, 200, "{body}");
    assert!(
        wait_status(fleet.blue.public, "/readyz", 200, LONG),
        "ready again"
    );
    let (code, _) = fleet
        .blue
        .admin_request("DELETE", "/admin/drain", None)
        .expect("undrain");
    assert_eq!(code, 409, "nothing left to cancel");

    wait_connections(&fleet.green, CLIENTS as u64, LONG).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last, LONG).await;
    crowd.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_turns_closed_clients_away_when_they_come_back() {
    admin_drain_with_clients_coming_back(DrainMode::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_drain_turns_migrations_back_to_itself_away() {
    admin_drain_with_clients_coming_back(DrainMode::MakeBeforeBreak).await;
}

/// A WebSocket client that completes the upgrade, optionally subscribes,
/// and then never writes again: it answers no ping and no close. Records
/// when each frame arrives, until the gateway drops it.
async fn mute_peer(
    addr: std::net::SocketAddr,
    subscribe: Option<&str>,
    read: bool,
) -> tokio::task::JoinHandle<Vec<(Instant, u8, String)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("upgrade");
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("response head");
        buffer.push(byte[0]);
    }
    assert!(buffer.starts_with(b"HTTP/1.1 101"), "upgraded");
    if let Some(topic) = subscribe {
        let frame = format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#);
        let bytes =
            switchyard_tests::client_frame(switchyard_tests::opcode::TEXT, frame.as_bytes());
        stream.write_all(&bytes).await.expect("subscribe");
    }
    tokio::spawn(async move {
        let mut frames = Vec::new();
        if !read {
            // Hold the socket, unread, until the test lets go of it.
            let _held = stream;
            std::future::pending::<()>().await;
            return frames;
        }
        loop {
            let mut header = [0u8; 2];
            if stream.read_exact(&mut header).await.is_err() {
                return frames;
            }
            let len = match header[1] & 0x7f {
                126 => {
                    let mut ext = [0u8; 2];
                    if stream.read_exact(&mut ext).await.is_err() {
                        return frames;
                    }
                    u16::from_be_bytes(ext) as usize
                }
                127 => {
                    let mut ext = [0u8; 8];
                    if stream.read_exact(&mut ext).await.is_err() {
                        return frames;
                    }
                    u64::from_be_bytes(ext) as usize
                }
                short => short as usize,
            };
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return frames;
            }
            frames.push((
                Instant::now(),
                header[0] & 0x0f,
                String::from_utf8_lossy(&payload).into_owned(),
            ));
        }
    })
}

/// The closes after a migrate's grace take their place under the same cap
/// as the slots: with peers that ignore `migrate` (and never answer a
/// close), no second holds more than `max_rate` signals, measured where
/// they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_after_the_grace_keep_the_cap() {
    const PEERS: usize = 100;
    const RATE: u64 = 50;
    let gw = GatewayProcess::start(&[
        "connection.keepalive_interval_ms=60000",
        "connection.close_timeout_ms=500",
    ])
    .expect("gateway");
    let mut peers = Vec::new();
    for _ in 0..PEERS {
        peers.push(mute_peer(gw.public, None, true).await);
    }
    wait_connections(&gw, PEERS as u64, LONG).await;
    let request = DrainRequest {
        window_ms: 1_000,
        max_rate: RATE,
        deadline_ms: 30_000,
        mode: DrainMode::MakeBeforeBreak,
        retry_jitter_ms: 0,
        migrate_grace_ms: Some(1_000),
    };
    let (code, body) = post_drain(&gw, &request);
    assert_eq!(code, 202, "{body}");
    let mut signals = Vec::new();
    let first = Instant::now();
    for peer in peers {
        for (at, opcode, text) in peer.await.expect("peer") {
            let signal = opcode == 0x8 || text.contains(r#""op":"migrate""#);
            if signal {
                signals.push(at.duration_since(first).as_millis() as u64);
            }
        }
    }
    assert_eq!(signals.len(), 2 * PEERS, "a migrate and a close each");
    // Timed where they arrive, by a test process that shares the cores: a
    // read delayed by a busy moment stamps frames of two windows at once,
    // hence the 10% (before the fix: 2x the cap).
    let peak = max_in_window(&signals, 1000);
    assert!(
        peak as f64 <= RATE as f64 * 1.1,
        "{peak} signals in one second, cap {RATE}; per second: {:?}",
        per_second(&signals)
    );
    let drain = &status(&gw)["drain"];
    assert_eq!(drain["closed_at_slot"], PEERS as u64, "{drain}");
    assert_eq!(drain["migrated_by_client"], 0, "{drain}");
    assert_eq!(drain["signals_sent"], 2 * PEERS as u64, "{drain}");
    assert_counts_add_up(drain);
}

/// SIGTERM with peers that never answer a close and peers that stopped
/// reading under a flood: the process still exits by its stop time, and the
/// drain's counts add up (the slow consumers under `ended_otherwise`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_by_its_stop_time_with_mute_and_stuck_peers() {
    const MUTE: usize = 20;
    const STUCK: usize = 20;
    const STOP: Duration = Duration::from_millis(2_000 + 1_000);
    let mut gw = GatewayProcess::start(&[
        "connection.keepalive_interval_ms=60000",
        "connection.close_timeout_ms=1000",
        "drain.grace_period_ms=2000",
        "drain.window_ms=1000",
        "drain.mode=close",
    ])
    .expect("gateway");
    let mut peers = Vec::new();
    for _ in 0..MUTE {
        peers.push(mute_peer(gw.public, None, true).await);
    }
    for _ in 0..STUCK {
        peers.push(mute_peer(gw.public, Some("flood"), false).await);
    }
    wait_connections(&gw, (MUTE + STUCK) as u64, LONG).await;
    // Fill the stuck peers' socket buffers and queues.
    let payload = format!("\"{}\"", "x".repeat(60_000));
    for _ in 0..200 {
        gw.publish("flood", &payload).expect("publish");
    }
    let signalled = Instant::now();
    gw.terminate();
    let (exit, took) = exited(&mut gw, signalled, Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        took <= STOP + EXIT_SLACK,
        "exited {took:?} after SIGTERM; stop time {STOP:?}"
    );
    let finished = log_event(&gw, "drain finished").expect("drain finished logged");
    assert_eq!(finished["total"], (MUTE + STUCK) as u64, "{finished}");
    assert_counts_add_up(&finished);
    assert!(
        finished["ended_otherwise"].as_u64() >= Some(1),
        "the slow consumers are not counted as moved: {finished}"
    );
    for peer in peers {
        peer.abort();
    }
}

/// SIGTERM during an admin drain with a long schedule: the drain keeps
/// running but its deadline is brought forward to the grace period, the
/// process exits by its stop time, and neither `DELETE` nor a new `POST
/// /admin/drain` can postpone it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_caps_a_running_admin_drain_and_cannot_be_cancelled() {
    const CLIENTS: usize = 100;
    const GRACE: Duration = Duration::from_millis(2_000);
    const CLOSE_TIMEOUT: Duration = Duration::from_millis(1_000);
    let (mut fleet, crowd, publishing) = scene(
        &[
            "drain.grace_period_ms=2000",
            "connection.close_timeout_ms=1000",
        ],
        CLIENTS,
    )
    .await;
    fleet.proxy.switch(vec![fleet.green.public]);
    let request = DrainRequest {
        window_ms: 30_000,
        max_rate: 10,
        deadline_ms: 30_000,
        mode: DrainMode::MakeBeforeBreak,
        retry_jitter_ms: 500,
        migrate_grace_ms: None,
    };
    let (code, body) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 202, "{body}");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let signalled = Instant::now();
    fleet.blue.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, body) = fleet
        .blue
        .admin_request("DELETE", "/admin/drain", None)
        .expect("cancel");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("shutting_down"), "{body}");
    let (code, body) = post_drain(&fleet.blue, &request);
    assert_eq!(code, 409, "{body}");
    let drain = &status(&fleet.blue)["drain"];
    let deadline = drain["deadline_ms"].as_u64().expect("deadline");
    assert!(
        (1_000..=1_000 + 2_000 + 500).contains(&deadline),
        "deadline brought forward to the grace period: {drain}"
    );
    let (exit, took) = exited(&mut fleet.blue, signalled, Duration::from_secs(40)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        took <= GRACE + CLOSE_TIMEOUT + EXIT_SLACK,
        "exited {took:?} after SIGTERM"
    );
    assert_eq!(blue_drains_started(&fleet.blue), 1, "no second drain");
    let finished = log_event(&fleet.blue, "drain finished").expect("drain finished logged");
    assert_counts_add_up(&finished);
    assert!(
        finished["forced_at_deadline"].as_u64() > Some(0),
        "{finished}"
    );
    wait_connections(&fleet.green, CLIENTS as u64, LONG).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last, LONG).await;
    crowd.stop();
}
