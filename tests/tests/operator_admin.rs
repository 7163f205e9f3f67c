//! The operator's gateway admin client against a real gateway process:
//! status, drain, cancel, a wrong token, an unreachable pod and a hung one.

use std::time::Duration;

use switchyard_operator::gateway::{AdminEndpoint, AdminError, GatewayAdmin, HttpGatewayAdmin};
use switchyard_protocol::drain::{DrainMode, DrainRequest};
use switchyard_tests::GatewayProcess;

const TOKEN: &str = "operator-admin-token-0123456789";

fn endpoint(gw: &GatewayProcess, token: &str) -> AdminEndpoint {
    AdminEndpoint {
        ip: gw.admin.ip().to_string(),
        port: gw.admin.port(),
        token: token.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_drain_and_cancel_against_a_real_gateway() {
    let token_setting = format!("admin.token={TOKEN}");
    let gw = GatewayProcess::start(&[&token_setting]).expect("gateway");
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (socket, _) = tokio_tungstenite::connect_async(gw.ws_url())
            .await
            .expect("connect");
        sockets.push(socket);
    }
    let admin = HttpGatewayAdmin::new(Duration::from_secs(2));
    let good = endpoint(&gw, TOKEN);

    let status = admin.status(&good).await.expect("status");
    assert_eq!((status.connections, status.draining), (3, false));

    match admin.status(&endpoint(&gw, "wrong")).await {
        Err(AdminError::Status { status, .. }) => assert_eq!(status.as_u16(), 401),
        other => panic!("expected 401, got {other:?}"),
    }

    // A slow drain (1 close/s over a minute) so it is still running when asked.
    let request = DrainRequest {
        window_ms: 60_000,
        max_rate: 1,
        deadline_ms: 60_000,
        mode: DrainMode::Close,
        retry_jitter_ms: 0,
        migrate_grace_ms: None,
    };
    admin.start_drain(&good, &request).await.expect("drain");
    let status = admin.status(&good).await.expect("status");
    assert!(status.draining, "draining after POST /admin/drain");
    assert!(status.drain.is_some_and(|d| d.active && d.total == 3));
    // A second drain request (a restarted operator) is not an error.
    admin
        .start_drain(&good, &request)
        .await
        .expect("drain again");

    admin.cancel_drain(&good).await.expect("cancel");
    let status = admin.status(&good).await.expect("status");
    assert!(!status.draining, "ready again after DELETE /admin/drain");
    assert!(status.drain.is_some_and(|d| d.cancelled));
    // Cancelling when nothing runs (an abort repeated) is not an error either.
    admin.cancel_drain(&good).await.expect("cancel again");

    let bad_request = DrainRequest {
        max_rate: 0,
        ..request
    };
    match admin.start_drain(&good, &bad_request).await {
        Err(AdminError::Status { status, body, .. }) => {
            assert_eq!(status.as_u16(), 400);
            assert!(body.contains("max_rate"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_and_hung_gateways_fail_fast() {
    let admin = HttpGatewayAdmin::new(Duration::from_millis(300));
    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let nobody = AdminEndpoint {
        ip: "127.0.0.1".into(),
        port,
        token: TOKEN.into(),
    };
    assert!(matches!(
        admin.status(&nobody).await,
        Err(AdminError::Transport { .. })
    ));
    // Accepts, never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hung_port = hung.local_addr().expect("addr").port();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hung.accept().await {
            held.push(stream);
        }
    });
    let started = std::time::Instant::now();
    let result = admin
        .status(&AdminEndpoint {
            port: hung_port,
            ..nobody
        })
        .await;
    assert!(matches!(result, Err(AdminError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
