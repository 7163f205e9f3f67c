//! The load generator's own figures must be right before anyone quotes them:
//! run it against an in-process gateway and check its accounting.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use switchyard_server::config::Config;
use switchyard_server::server::{serve, Gateway, Listeners, Stop};

/// A gateway served in this process on free ports, with `settings` on top
/// of the defaults.
struct InProcess {
    public: SocketAddr,
    admin: SocketAddr,
    gateway: Arc<Gateway>,
    stop: tokio::sync::watch::Sender<Stop>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn start(settings: &[String]) -> InProcess {
        let mut all = vec![
            "listen=127.0.0.1:0".to_owned(),
            "admin_listen=127.0.0.1:0".to_owned(),
        ];
        all.extend_from_slice(settings);
        let config = Config::load(None, Vec::new(), &all).expect("config");
        let listeners = Listeners::bind(&config).expect("bind");
        let public = listeners.public.local_addr().expect("addr");
        let admin = listeners.admin.local_addr().expect("addr");
        let gateway = Gateway::new(config).expect("gateway");
        let (stop, shutdown) = tokio::sync::watch::channel(Stop::Running);
        let server = tokio::spawn(serve(gateway.clone(), listeners, shutdown));
        InProcess {
            public,
            admin,
            gateway,
            stop,
            server,
        }
    }

    async fn stop(self) {
        self.stop.send(Stop::Now).expect("stop");
        self.server.await.expect("join").expect("serve");
    }
}

/// Starts `switchyard-load` with `args` and `--ready-file`, and returns it
/// once the file exists (its connections are open), or `None` after `within`.
async fn start_load_until_ready(
    args: Vec<String>,
    ready: &std::path::Path,
    stdout: std::process::Stdio,
    within: std::time::Duration,
) -> Option<std::process::Child> {
    let _ = std::fs::remove_file(ready);
    let mut load = Command::new(env!("CARGO_BIN_EXE_switchyard-load"))
        .args(args)
        .arg(format!("--ready-file={}", ready.display()))
        .stdout(stdout)
        .spawn()
        .expect("run switchyard-load");
    let deadline = std::time::Instant::now() + within;
    while !ready.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if !ready.exists() {
        let _ = load.kill();
        let _ = load.wait();
        return None;
    }
    Some(load)
}

fn run_load(args: &[String]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard-load"))
        .args(args)
        .output()
        .expect("run switchyard-load");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("json summary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_idle_report_exact_counts() {
    let served = InProcess::start(&[]);
    let (public, admin, gateway) = (served.public, served.admin, served.gateway.clone());

    let fanout = tokio::task::spawn_blocking(move || {
        run_load(&[
            "fanout".into(),
            format!("--target={public}"),
            format!("--admin={admin}"),
            "--subscribers=50".into(),
            "--rate=20".into(),
            "--duration-secs=1".into(),
            "--sources=127.0.0.2,127.0.0.3".into(),
        ])
    })
    .await
    .expect("fanout");
    assert_eq!(fanout["subscribers_ready"], 50);
    assert_eq!(fanout["published"], 20);
    assert_eq!(fanout["expected_deliveries"], 1000);
    assert_eq!(fanout["delivered"], 1000);
    let p50 = fanout["latency_ms"]["p50"].as_f64().expect("p50");
    let p99 = fanout["latency_ms"]["p99"].as_f64().expect("p99");
    assert!(p50 > 0.0 && p50 <= p99, "{fanout}");
    assert_eq!(gateway.metrics.messages_published.get(), 20);

    let idle = tokio::task::spawn_blocking(move || {
        run_load(&[
            "idle".into(),
            format!("--target={public}"),
            "--connections=300".into(),
            "--hold-secs=0".into(),
        ])
    })
    .await
    .expect("idle");
    assert_eq!(idle["opened"], 300);
    assert_eq!(idle["failed"], 0);
    assert_eq!(gateway.metrics.connections_opened.get(), 350);

    served.stop().await;
}

/// A free loopback port (bound, then released for the peer to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A reference peer process, killed when dropped.
struct Peer(std::process::Child);

impl Peer {
    /// Starts `command` and waits until its admin port accepts connections.
    fn start(mut command: Command, admin: u16) -> Peer {
        let child = command
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn peer");
        let peer = Peer(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok() {
                return peer;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("peer did not listen on {admin}");
    }

    /// Starts one of the Rust peers (`--listen`, `--admin`) on free ports
    /// with `extra` arguments: the peer, its WebSocket port and its admin port.
    fn launch(binary: &str, extra: &[String]) -> (Peer, u16, u16) {
        let (port, admin) = (free_port(), free_port());
        let mut command = Command::new(binary);
        command
            .args([
                format!("--listen=127.0.0.1:{port}"),
                format!("--admin=127.0.0.1:{admin}"),
            ])
            .args(extra);
        (Peer::start(command, admin), port, admin)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `idle` handshakes against `target`, with or without TLS: (opened, failed).
fn handshakes(target: &str, ca: Option<&std::path::Path>) -> (u64, u64) {
    let mut args = Vec::new();
    if let Some(ca) = ca {
        args.push(format!("--tls-ca={}", ca.display()));
    }
    args.extend([
        "idle".into(),
        format!("--target={target}"),
        "--connections=100".into(),
        "--hold-secs=0".into(),
    ]);
    let summary = run_load(&args);
    (
        summary["opened"].as_u64().expect("opened"),
        summary["failed"].as_u64().expect("failed"),
    )
}

/// A raw fan-out over TLS through a peer: every subscriber gets every message.
fn tls_fanout_delivers_everything(target: &str, admin: u16, ca: &std::path::Path) {
    let summary = run_load(&[
        format!("--tls-ca={}", ca.display()),
        "fanout".into(),
        format!("--target={target}"),
        format!("--admin=127.0.0.1:{admin}"),
        "--subscribers=20".into(),
        "--rate=10".into(),
        "--duration-secs=1".into(),
        "--protocol=raw".into(),
    ]);
    assert_eq!(summary["expected_deliveries"], 200, "{summary}");
    assert_eq!(summary["delivered"], 200, "{summary}");
}

/// The TLS handshake workload (bench/compare.sh) against the gateway and
/// both reference peers: each accepts wss:// from a client trusting the CA,
/// and a plain client gets nowhere on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_against_the_gateway_and_the_peers() {
    let dir = std::env::temp_dir().join(format!("switchyard-bench-tls-{}", std::process::id()));
    let certs = switchyard_tests::TestCertificates::create(&dir).expect("certificates");
    let ca = certs.ca.clone();

    let served = InProcess::start(&[
        format!("tls.cert_file={}", certs.cert.display()),
        format!("tls.key_file={}", certs.key.display()),
    ]);
    let (public, gateway) = (served.public.to_string(), served.gateway.clone());
    let (target, ca_for_gateway) = (public.clone(), ca.clone());
    let (tls, plain) = tokio::task::spawn_blocking(move || {
        (
            handshakes(&target, Some(&ca_for_gateway)),
            handshakes(&target, None),
        )
    })
    .await
    .expect("handshakes");
    assert_eq!(tls, (100, 0), "wss:// to the gateway");
    assert_eq!(plain, (0, 100), "ws:// to a TLS port");
    assert_eq!(gateway.metrics.connections_opened.get(), 100);
    served.stop().await;

    let peers = tokio::task::spawn_blocking(move || {
        let (tungstenite, port, admin) = Peer::launch(
            env!("CARGO_BIN_EXE_tungstenite-peer"),
            &[
                "--batch".into(),
                format!("--tls-cert={}", certs.cert.display()),
                format!("--tls-key={}", certs.key.display()),
            ],
        );
        let target = format!("127.0.0.1:{port}");
        assert_eq!(handshakes(&target, Some(&ca)), (100, 0), "tungstenite peer");
        tls_fanout_delivers_everything(&target, admin, &ca);
        drop(tungstenite);

        let peer_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/node-ws");
        assert!(
            peer_dir.join("node_modules/ws").is_dir(),
            "the Node peer needs `npm ci --prefix bench/peers/node-ws` (./scripts/test runs it)"
        );
        let (port, admin) = (free_port(), free_port());
        let mut command = Command::new("node");
        command
            .arg(peer_dir.join("server.mjs"))
            .args([port.to_string(), admin.to_string()])
            .arg(&certs.cert)
            .arg(&certs.key);
        let node = Peer::start(command, admin);
        let target = format!("127.0.0.1:{port}");
        assert_eq!(handshakes(&target, Some(&ca)), (100, 0), "node ws peer");
        tls_fanout_delivers_everything(&target, admin, &ca);
        drop(node);
    });
    peers.await.expect("peers");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The idle workload's connections answer the gateway's keepalive (a
/// protocol ping and a `heartbeat` frame each interval), so none of them is
/// reaped as silent while held: a client that stopped answering would be
/// reaped after two intervals (1 s here); the check comes after 2.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_answer_keepalives() {
    let served = InProcess::start(&["connection.keepalive_interval_ms=500".into()]);
    let (public, gateway) = (served.public, served.gateway.clone());

    let ready = std::env::temp_dir().join(format!("switchyard-idle-ready-{}", std::process::id()));
    let mut load = start_load_until_ready(
        vec![
            "idle".into(),
            format!("--target={public}"),
            "--connections=20".into(),
            "--hold-secs=4".into(),
        ],
        &ready,
        std::process::Stdio::null(),
        std::time::Duration::from_secs(20),
    )
    .await
    .expect("the load generator never got its connections open");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        gateway.metrics.connections.get(),
        20,
        "none reaped while held"
    );
    let status = tokio::task::spawn_blocking(move || load.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success());
    let _ = std::fs::remove_file(&ready);
    served.stop().await;
}

/// The migrate workload follows a drain of blue to green in both modes —
/// `migrate` (make-before-break) and a 4000 close with `retry_ms` — and its
/// accounting is exact: every connection moved, by the way the mode says,
/// and every one of the published offsets seen once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_follows_both_drain_modes_and_counts_exactly() {
    const CONNECTIONS: u64 = 40;
    const MESSAGES: u64 = 30;
    for (mode, by_close) in [("make_before_break", 0), ("close", CONNECTIONS)] {
        let fleet = switchyard_tests::BlueGreen::start(&[])
            .await
            .expect("fleet");
        let ready = std::env::temp_dir().join(format!(
            "switchyard-migrate-ready-{}-{mode}",
            std::process::id()
        ));
        let load = start_load_until_ready(
            vec![
                "migrate".into(),
                format!("--blue={}", fleet.blue.public),
                format!("--green={}", fleet.green.public),
                format!("--connections={CONNECTIONS}"),
                format!("--expect={MESSAGES}"),
                "--timeout-secs=60".into(),
            ],
            &ready,
            std::process::Stdio::piped(),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|| panic!("{mode}: never subscribed"));
        let (fleet, load) = tokio::task::spawn_blocking(move || {
            // Half the messages before the drain, half during and after it.
            for n in 1..=MESSAGES {
                if n == MESSAGES / 2 + 1 {
                    let body = format!(
                        r#"{{"window_ms":500,"max_rate":1000,"deadline_ms":20000,"mode":"{mode}","retry_jitter_ms":200}}"#
                    );
                    let (code, text) = fleet
                        .blue
                        .admin_request("POST", "/admin/drain", Some(&body))
                        .expect("drain");
                    assert_eq!(code, 202, "{text}");
                }
                fleet.green.publish("migrate", &format!(r#"{{"n":{n}}}"#)).expect("publish");
                std::thread::sleep(std::time::Duration::from_millis(40));
            }
            (fleet, load.wait_with_output().expect("wait"))
        })
        .await
        .expect("join");
        assert!(load.status.success(), "{mode}");
        let stdout = String::from_utf8_lossy(&load.stdout);
        let summary: serde_json::Value =
            serde_json::from_str(stdout.lines().last().expect("summary")).expect("json");
        assert_eq!(summary["connections"], CONNECTIONS, "{mode}: {summary}");
        assert_eq!(summary["moved"], CONNECTIONS, "{mode}: {summary}");
        assert_eq!(summary["moved_by_close"], by_close, "{mode}: {summary}");
        assert_eq!(summary["complete"], CONNECTIONS, "{mode}: {summary}");
        assert_eq!(summary["lost"], 0, "{mode}: {summary}");
        assert_eq!(
            fleet.blue.metric("switchyard_connections").expect("m"),
            0.0,
            "{mode}: blue emptied"
        );
        let _ = std::fs::remove_file(&ready);
    }
}

/// The floor peer (bench/floor.sh) delivers every message to every
/// subscriber: frames of 900 KB (the 64-bit length), then small ones to a
/// second set of subscribers after the first set has gone (their sockets
/// fail and are dropped; the others are not held up).
#[test]
fn the_floor_peer_delivers_everything_and_outlives_its_subscribers() {
    let (_floor, port, admin) =
        Peer::launch(env!("CARGO_BIN_EXE_floor-peer"), &["--threads=2".into()]);
    let fanout = |subscribers: u64, payload: usize| {
        run_load(&[
            "fanout".into(),
            format!("--target=127.0.0.1:{port}"),
            format!("--admin=127.0.0.1:{admin}"),
            format!("--subscribers={subscribers}"),
            "--rate=10".into(),
            "--duration-secs=1".into(),
            format!("--payload={payload}"),
            "--protocol=raw".into(),
        ])
    };
    let large = fanout(10, 900_000);
    assert_eq!(large["expected_deliveries"], 100, "{large}");
    assert_eq!(large["delivered"], 100, "{large}");
    let small = fanout(100, 64);
    assert_eq!(small["expected_deliveries"], 1000, "{small}");
    assert_eq!(small["delivered"], 1000, "{small}");
}

/// A floor subscriber that reads slowly, through a 4 KiB receive buffer,
/// gets its frames written in many parts and still reads each one whole
/// and in order.
#[tokio::test]
async fn the_floor_peer_writes_a_slow_subscriber_its_frames_in_parts() {
    use futures_util::StreamExt;
    use std::io::{Read, Write};

    let (_floor, port, admin) = Peer::launch(env!("CARGO_BIN_EXE_floor-peer"), &[]);
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let (mut client, _) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/"), stream)
            .await
            .expect("handshake");

    let messages: Vec<String> = (0..6)
        .map(|i| format!("{i}-{}", "x".repeat(900_000)))
        .collect();
    let mut publisher = std::net::TcpStream::connect(("127.0.0.1", admin)).expect("admin");
    for message in &messages {
        let body = serde_json::json!({"topic": "t", "data": message}).to_string();
        write!(
            publisher,
            "POST /api/publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("publish");
        let mut reply = [0u8; 256];
        let n = publisher.read(&mut reply).expect("reply");
        assert!(reply[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &reply[..n]);
    }
    // Not reading for a while: the sender finds the socket full and goes on
    // from where the last write ended.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for message in &messages {
        let next = tokio::time::timeout(std::time::Duration::from_secs(20), client.next());
        let frame = next
            .await
            .expect("a frame in time")
            .expect("a frame")
            .expect("whole");
        assert_eq!(frame.to_text().expect("text"), format!("\"{message}\""));
    }
}
