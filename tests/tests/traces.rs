//! Traces: the gateway and the operator export spans over OTLP/HTTP to an
//! in-test receiver when OTEL_EXPORTER_OTLP_ENDPOINT is set; the receiver
//! decodes them and the tests check names, parentage and attributes —
//! including a publish that continues the caller's `traceparent` and the
//! fan-out inside it.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchyard_tests::kube::Emulator;
use switchyard_tests::otlp::OtlpReceiver;
use switchyard_tests::{http_request_with, operator_bin, GatewayProcess};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(socket: &mut Socket) -> Option<String> {
    loop {
        match tokio::time::timeout(WAIT, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Some(text.to_string()),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

fn expect_frame(text: Option<String>, contains: &str) {
    let text = text.expect("a frame");
    assert!(text.contains(contains), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_spans_handshake_publish_fanout_and_drain() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let endpoint = receiver.endpoint();
    let gw = GatewayProcess::start_with(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .expect("gateway");
    let (mut socket, _) = tokio_tungstenite::connect_async(gw.ws_url())
        .await
        .expect("connect");
    socket
        .send(Message::text(r#"{"op":"subscribe","topic":"orders"}"#))
        .await
        .expect("subscribe");
    expect_frame(next_text(&mut socket).await, "welcome");
    expect_frame(next_text(&mut socket).await, "subscribed");

    // The caller's trace: the publish span continues it, the fan-out is inside.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let admin = gw.admin;
    let (status, body) = tokio::task::spawn_blocking(move || {
        http_request_with(
            admin,
            "POST",
            "/api/publish",
            &[("traceparent", traceparent.as_str())],
            Some(r#"{"topic":"orders","data":{"id":7}}"#),
        )
    })
    .await
    .expect("join")
    .expect("publish");
    assert_eq!(status, 200, "{body}");
    expect_frame(next_text(&mut socket).await, r#""id":7"#);

    let (status, body) = gw
        .admin_request(
            "POST",
            "/admin/drain",
            Some(r#"{"window_ms":100,"max_rate":100,"deadline_ms":2000,"mode":"close"}"#),
        )
        .expect("drain");
    assert_eq!(status, 202, "{body}");
    // Read to the close (4000 at its slot) and past it: reading on sends
    // the close reply, which completes the close handshake.
    let close = tokio::time::timeout(WAIT, async {
        let mut code = None;
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(frame) = message {
                code = frame.map(|f| u16::from(f.code));
            }
        }
        code
    })
    .await
    .expect("closed in time");
    assert_eq!(close, Some(4000));

    let handshake = receiver
        .wait_for("handshake", WAIT, |s| s.name == "handshake")
        .await;
    assert_eq!(handshake.service, "switchyard-gateway");
    assert_eq!(handshake.attributes["http.status"], "101");
    assert_eq!(
        handshake.parent_span_id, "",
        "a handshake starts its own trace"
    );

    let publish = receiver
        .wait_for("publish", WAIT, |s| s.name == "publish")
        .await;
    assert_eq!(publish.trace_id, trace_id, "the caller's trace continues");
    assert_eq!(publish.parent_span_id, caller_span);
    assert_eq!(publish.attributes["topic"], "orders");
    assert_eq!(publish.attributes["offset"], "1");

    let fanout = receiver
        .wait_for("fanout", WAIT, |s| s.name == "fanout")
        .await;
    assert_eq!(fanout.trace_id, trace_id);
    assert_eq!(
        fanout.parent_span_id, publish.span_id,
        "fan-out inside the publish"
    );
    assert_eq!(fanout.attributes["subscribers"], "1");

    let drain = receiver
        .wait_for("drain", WAIT, |s| s.name == "drain")
        .await;
    assert_eq!(drain.attributes["total"], "1");
    assert_eq!(drain.attributes["closed_at_slot"], "1");
    assert_eq!(drain.attributes["cancelled"], "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_spans_each_reconcile() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let emu = Emulator::start().await.expect("emulator");
    emu.install("prod", "apiVersion: switchyard.dev/v1alpha1\nkind: ConnectionService\nmetadata: {name: chat}\n\
         spec:\n  image: gw:1\n  replicas: 1\n  config: |\n    worker_threads: 1\n    auth: {anonymous: true}\n")
        .expect("install");
    let kubeconfig = emu.kubeconfig("prod").expect("kubeconfig");
    let mut operator = Command::new(operator_bin())
        .args(["--metrics-addr", "127.0.0.1:0", "--no-leader-election"])
        .env("KUBECONFIG", kubeconfig)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("operator");
    let reconcile = receiver
        .wait_for("reconcile of a Stable resource", WAIT, |s| {
            s.name == "reconcile" && s.attributes.get("phase").map(String::as_str) == Some("Stable")
        })
        .await;
    let _ = operator.kill();
    let _ = operator.wait();
    assert_eq!(reconcile.service, "switchyard-operator");
    assert_eq!(reconcile.attributes["name"], "chat");
    assert_eq!(reconcile.attributes["namespace"], "prod");
    assert_eq!(reconcile.attributes["generation"], "1");
}
