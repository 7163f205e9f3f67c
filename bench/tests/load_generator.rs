//! The load generator's own figures must be right before anyone quotes them:
//! run it against an in-process gateway and check its accounting.

use std::process::Command;

use switchyard_server::config::Config;
use switchyard_server::server::{serve, Gateway, Listeners, Stop};

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
    let config = Config::load(
        None,
        Vec::new(),
        &[
            "listen=127.0.0.1:0".into(),
            "admin_listen=127.0.0.1:0".into(),
        ],
    )
    .expect("config");
    let listeners = Listeners::bind(&config).expect("bind");
    let public = listeners.public.local_addr().expect("addr");
    let admin = listeners.admin.local_addr().expect("addr");
    let gateway = Gateway::new(config).expect("gateway");
    let (stop, shutdown) = tokio::sync::watch::channel(Stop::Running);
    let server = tokio::spawn(serve(gateway.clone(), listeners, shutdown));

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

    stop.send(Stop::Now).expect("stop");
    server.await.expect("join").expect("serve");
}
