//! The browser client in headless Chromium (Debian's package, driven by npm
//! playwright-core): the demo page subscribes through the Service proxy, its
//! gateway drains, the page migrates to the other gateway and resumes with
//! nothing lost; and the same with the old gateway killed in the middle of
//! the migration; and the page coming back after its gateway crashes. The
//! screenshot lands in artifacts/browser-migration.png.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard_protocol::drain::{DrainMode, DrainRequest};
use switchyard_tests::BlueGreen;

/// Publishes 6..=10 on green, 100 ms apart, while the page moves; its state
/// once it has all ten, each once and in order.
async fn publish_while_moving(fleet: &BlueGreen, page: &mut Page) -> serde_json::Value {
    for n in 6..=10 {
        fleet
            .green
            .publish("b.demo", &format!(r#"{{"n":{n}}}"#))
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = page.wait_for(10);
    assert_eq!(
        after["received"]["b.demo"],
        offsets(10),
        "every message once, in order"
    );
    after
}

/// `POST /admin/drain` to blue; 202 expected.
fn start_drain(fleet: &BlueGreen, drain: &DrainRequest) {
    let (code, body) = fleet
        .blue
        .admin_request(
            "POST",
            "/admin/drain",
            Some(&serde_json::to_string(drain).expect("json")),
        )
        .expect("drain");
    assert_eq!(code, 202, "{body}");
}

/// A fleet and the demo page on blue, holding messages 1..=5 of `b.demo`
/// (published on green: the backplane carries them).
async fn page_on_blue_with_five(screenshot: &std::path::Path) -> (BlueGreen, Page) {
    let fleet = BlueGreen::start(&[]).await.expect("fleet");
    let mut page = Page::open(&fleet, screenshot);
    assert_eq!(page.answer()["servers"], serde_json::json!(["blue"]));
    for n in 1..=5 {
        fleet
            .green
            .publish("b.demo", &format!(r#"{{"n":{n}}}"#))
            .expect("publish");
    }
    assert_eq!(page.wait_for(5)["received"]["b.demo"], offsets(5));
    (fleet, page)
}

fn offsets(n: u64) -> serde_json::Value {
    serde_json::json!((1..=n).collect::<Vec<_>>())
}

/// The demo page in Chromium (tests/browser/migrate.mjs), subscribed to
/// `b.demo` through the fleet's Service: commands in, one JSON answer each.
struct Page {
    node: std::process::Child,
    commands: std::process::ChildStdin,
    answers: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Page {
    fn open(fleet: &BlueGreen, screenshot: &std::path::Path) -> Page {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        assert!(
            root.join("tests/browser/node_modules/playwright-core").exists(),
            "playwright-core is missing: run the README's test command (scripts/test), which installs it"
        );
        // The page comes through the Service too, so its Origin is the address the
        // socket goes to (the gateway's default same-host origin rule admits it).
        let page = format!(
            "http://{proxy}/?url=ws://{proxy}/ws&topic=b.demo&autoconnect=1",
            proxy = fleet.proxy.addr
        );
        let mut node = Command::new("node")
            .arg(root.join("tests/browser/migrate.mjs"))
            .arg(&page)
            .arg(screenshot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let commands = node.stdin.take().expect("stdin");
        let answers = BufReader::new(node.stdout.take().expect("stdout")).lines();
        Page {
            node,
            commands,
            answers,
        }
    }

    /// The page's next answer (its state).
    fn answer(&mut self) -> serde_json::Value {
        let line = self.answers.next().expect("an answer").expect("line");
        let value: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert!(value.get("error").is_none(), "browser: {value}");
        value
    }

    /// The page's state once it has received `n` messages on `b.demo`.
    fn wait_for(&mut self, n: u64) -> serde_json::Value {
        writeln!(self.commands, r#"{{"wait":{{"topic":"b.demo","n":{n}}}}}"#).expect("command");
        self.answer()
    }

    fn quit(mut self) {
        writeln!(self.commands, r#"{{"quit":true}}"#).expect("command");
        drop(self.commands);
        assert!(self.node.wait().expect("node").success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_migrates_between_gateways_without_loss() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let artifacts = root.join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let screenshot = artifacts.join("browser-migration.png");
    let _ = std::fs::remove_file(&screenshot);

    let (fleet, mut page) = page_on_blue_with_five(&screenshot).await;

    fleet.proxy.switch(vec![fleet.green.public]);
    let drain = DrainRequest {
        window_ms: 500,
        max_rate: 100,
        deadline_ms: 10_000,
        mode: DrainMode::MakeBeforeBreak,
        retry_jitter_ms: 500,
        migrate_grace_ms: None,
    };
    start_drain(&fleet, &drain);
    // Publish while the page moves.
    let after = publish_while_moving(&fleet, &mut page).await;
    assert_eq!(after["servers"], serde_json::json!(["blue", "green"]));
    assert_eq!(after["migrations"], 1);
    assert_eq!(
        after["disconnects"],
        serde_json::json!([]),
        "never without a connection"
    );
    assert_eq!(
        after["shown"]["server"], "green",
        "the page shows where it is"
    );
    assert_eq!(after["shown"]["state"], "open");
    let drained: serde_json::Value = serde_json::from_str(
        &fleet
            .blue
            .admin_request("GET", "/admin/status", None)
            .expect("status")
            .1,
    )
    .expect("json");
    assert_eq!(drained["connections"], 0);
    assert_eq!(drained["drain"]["migrated_by_client"], 1);

    page.quit();
    let png = std::fs::read(&screenshot).expect("screenshot saved");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
}

/// Issue 24: the old gateway dies (SIGKILL) in the middle of a migration,
/// while the page's new connection is still opening (the Service routes it
/// to an address that accepts and never answers, as a proxy on its way to
/// the new pods may). The page neither goes dead nor loses anything: the
/// old connection's end sends it through its reconnect path to the new
/// gateway, the hung connection is given up, and it resumes every message
/// once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_survives_its_old_gateway_dying_mid_migration() {
    let screenshot =
        std::env::temp_dir().join(format!("sy-mid-migration-{}.png", std::process::id()));
    let (fleet, mut page) = page_on_blue_with_five(&screenshot).await;

    // Where the page's new connection goes first: accepted, never answered.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("black hole");
    let hole_addr = hole.local_addr().expect("addr");
    let held = std::thread::spawn(move || {
        let mut kept = Vec::new();
        hole.set_nonblocking(true).expect("nonblocking");
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if let Ok((stream, _)) = hole.accept() {
                kept.push(stream);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        kept.len()
    });
    fleet.proxy.switch(vec![hole_addr]);
    let drain = DrainRequest {
        window_ms: 100,
        max_rate: 100,
        deadline_ms: 30_000,
        mode: DrainMode::MakeBeforeBreak,
        retry_jitter_ms: 500,
        migrate_grace_ms: Some(20_000),
    };
    start_drain(&fleet, &drain);
    // The migrate went out and the page is dialling the black hole.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // SIGKILL: no close frame, no drain; then the Service reaches green.
    switchyard_tests::send_signal(fleet.blue.pid(), libc::SIGKILL).expect("SIGKILL");
    fleet.proxy.switch(vec![fleet.green.public]);
    let after = publish_while_moving(&fleet, &mut page).await;
    assert_eq!(
        after["servers"].as_array().and_then(|s| s.last()),
        Some(&serde_json::json!("green"))
    );
    assert_eq!(after["shown"]["state"], "open");
    page.quit();
    assert!(
        held.join().expect("black hole") >= 1,
        "the page dialled the hole first"
    );
    let _ = std::fs::remove_file(&screenshot);
}

/// Issue 22: the page's gateway dies (SIGKILL: no close frame, no hint) and
/// the Service reaches the other gateway half a second later. The page sees
/// 1006, waits a random time within its 2 s abnormal window (not the
/// backoff's 100 ms, which would bring every page of a crashed pod back at
/// once), reconnects to green and resumes from the Redis backplane: every
/// message once and in order, those published while it was away included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_comes_back_after_its_gateway_crashes() {
    let screenshot = std::env::temp_dir().join(format!("sy-crash-{}.png", std::process::id()));
    let (fleet, mut page) = page_on_blue_with_five(&screenshot).await;
    switchyard_tests::send_signal(fleet.blue.pid(), libc::SIGKILL).expect("SIGKILL");
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.proxy.switch(vec![fleet.green.public]);
    let after = publish_while_moving(&fleet, &mut page).await;
    assert_eq!(after["disconnects"][0], 1006, "{after}");
    let first_wait = after["retries"][0].as_u64().expect("a retry wait");
    assert!(first_wait <= 2_000, "within the abnormal window: {after}");
    assert_eq!(
        after["servers"].as_array().and_then(|s| s.last()),
        Some(&serde_json::json!("green"))
    );
    assert_eq!(after["migrations"], 0, "a crash is no migration");
    assert_eq!(after["shown"]["state"], "open");
    page.quit();
    let _ = std::fs::remove_file(&screenshot);
}
