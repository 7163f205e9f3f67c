//! Handshake security and session lifetime, end to end against the real
//! gateway binary: origins, tokens, tickets, expiry, revocation, limits, the
//! admin token and TLS. Every rule is checked both ways (allowed and refused)
//! and against the counter it must move.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use switchyard_protocol::{ErrorCode, ServerFrame};
use switchyard_tests::{
    base64url, http_request, http_request_with, wait_status, CannedHttps, CannedResponse,
    GatewayProcess, RedisServer, TestCertificates, STEP,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// 32 bytes: the shortest HS256 secret the gateway accepts.
const SECRET: &str = "test-secret-0123456789abcdef0123";
const ADMIN_TOKEN: &str = "admin-token-0123456789";

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn user_token(sub: &str) -> String {
    token(json!({"sub": sub, "exp": now() + 3600, "iat": now() - 5}))
}

/// How a handshake ended.
#[derive(Debug)]
enum Outcome<S> {
    /// Refused with this HTTP status before the upgrade.
    Http(u16),
    /// Upgraded and welcomed.
    Welcome(Box<WebSocketStream<S>>),
    /// Upgraded, then closed at once: (code, reason).
    Closed(u16, String),
}

impl<S> Outcome<S> {
    fn welcome(self) -> WebSocketStream<S> {
        match self {
            Outcome::Welcome(ws) => *ws,
            Outcome::Http(status) => panic!("expected a welcome, got HTTP {status}"),
            Outcome::Closed(code, reason) => {
                panic!("expected a welcome, got close {code} {reason}")
            }
        }
    }

    fn closed(self) -> (u16, String) {
        match self {
            Outcome::Closed(code, reason) => (code, reason),
            Outcome::Http(status) => panic!("expected a close, got HTTP {status}"),
            Outcome::Welcome(_) => panic!("expected a close, got a welcome"),
        }
    }

    fn http(self) -> u16 {
        match self {
            Outcome::Http(status) => status,
            Outcome::Welcome(_) => panic!("expected an HTTP refusal, got a welcome"),
            Outcome::Closed(code, reason) => {
                panic!("expected an HTTP refusal, got close {code} {reason}")
            }
        }
    }
}

/// Reads the first frame of an upgraded socket: a welcome or a close.
async fn first_frame<S>(mut ws: WebSocketStream<S>) -> Outcome<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(STEP, ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => {
            match serde_json::from_str::<ServerFrame>(&text).expect("server frame") {
                ServerFrame::Welcome { .. } => Outcome::Welcome(Box::new(ws)),
                other => panic!("expected welcome first, got {other:?}"),
            }
        }
        Ok(Some(Ok(Message::Close(frame)))) => {
            let frame = frame.expect("a close frame with a code");
            Outcome::Closed(u16::from(frame.code), frame.reason.to_string())
        }
        other => panic!("expected welcome or close, got {other:?}"),
    }
}

/// Opens `/ws` with extra headers and an optional query.
async fn open(
    gw: &GatewayProcess,
    query: &str,
    headers: &[(&str, &str)],
) -> Outcome<MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = format!("ws://{}/ws{query}", gw.public)
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                .expect("name"),
            HeaderValue::from_str(value).expect("value"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => first_frame(ws).await,
        Err(WsError::Http(response)) => Outcome::Http(response.status().as_u16()),
        Err(err) => panic!("handshake failed: {err}"),
    }
}

async fn bearer(
    gw: &GatewayProcess,
    token: &str,
) -> Outcome<MaybeTlsStream<tokio::net::TcpStream>> {
    open(gw, "", &[("authorization", &format!("Bearer {token}"))]).await
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
}

/// The next frame, or the close code as `Err`.
async fn recv(ws: &mut Ws) -> Result<ServerFrame, u16> {
    loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(text))) => {
                let frame: ServerFrame = serde_json::from_str(&text).expect("frame");
                if frame != ServerFrame::Heartbeat {
                    return Ok(frame);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)))
            }
            Some(Ok(_)) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    }
}

fn error_code(frame: Result<ServerFrame, u16>) -> ErrorCode {
    match frame {
        Ok(ServerFrame::Error { code, .. }) => code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

fn rejected(gw: &GatewayProcess, reason: &str) -> f64 {
    gw.metric(&format!(
        "switchyard_handshakes_rejected_total{{reason=\"{reason}\"}}"
    ))
    .expect("metrics")
}

fn jwt_gateway(extra: &[&str]) -> GatewayProcess {
    let secret = format!("auth.jwt.secret={SECRET}");
    let mut settings = vec![secret.as_str(), "auth.anonymous=false"];
    settings.extend_from_slice(extra);
    GatewayProcess::start(&settings).expect("start")
}

#[tokio::test]
async fn an_evil_origin_is_refused_even_with_a_valid_cookie() {
    let gw = jwt_gateway(&[
        r#"origin.allowed=["https://app.example.com","https://*.example.org"]"#,
        "origin.allow_missing=false",
    ]);
    let cookie = format!("theme=dark; switchyard_session={}", user_token("alice"));
    let with = |origin: &'static str| vec![("origin", origin), ("cookie", cookie.as_str())];
    assert_eq!(
        open(&gw, "", &with("https://evil.example.net"))
            .await
            .http(),
        403
    );
    assert_eq!(
        open(&gw, "", &with("https://app.example.com.evil.net"))
            .await
            .http(),
        403
    );
    open(&gw, "", &with("https://app.example.com"))
        .await
        .welcome();
    open(&gw, "", &with("https://chat.example.org"))
        .await
        .welcome();
    assert_eq!(
        open(&gw, "", &[("cookie", cookie.as_str())]).await.http(),
        403,
        "no Origin"
    );
    // An allowed origin without credentials gets through the origin check and no further.
    let (code, reason) = open(&gw, "", &[("origin", "https://app.example.com")])
        .await
        .closed();
    assert_eq!(
        (code, reason.contains("authentication required")),
        (4501, true)
    );
    assert_eq!(rejected(&gw, "origin_not_allowed"), 2.0);
    assert_eq!(rejected(&gw, "origin_missing"), 1.0);
    assert_eq!(rejected(&gw, "missing_credentials"), 1.0);
}

#[tokio::test]
async fn tokens_open_sessions_limited_to_their_topics() {
    let gw = jwt_gateway(&[]);
    let claims = json!({"sub": "alice", "exp": now() + 3600, "subscribe": ["chat.*"], "publish": ["chat.*"]});
    let mut ws = bearer(&gw, &token(claims)).await.welcome();
    send(&mut ws, json!({"op": "subscribe", "topic": "chat.room1"})).await;
    assert!(matches!(
        recv(&mut ws).await,
        Ok(ServerFrame::Subscribed { .. })
    ));
    send(
        &mut ws,
        json!({"op": "publish", "topic": "chat.room1", "data": 1}),
    )
    .await;
    // Our own message arrives on the subscription, and the publish is acknowledged.
    let mut got = [recv(&mut ws).await, recv(&mut ws).await];
    got.sort_by_key(|f| matches!(f, Ok(ServerFrame::Published { .. })));
    assert!(matches!(got[0], Ok(ServerFrame::Message { .. })), "{got:?}");
    assert!(
        matches!(got[1], Ok(ServerFrame::Published { .. })),
        "{got:?}"
    );
    send(&mut ws, json!({"op": "subscribe", "topic": "news"})).await;
    assert_eq!(
        error_code(recv(&mut ws).await),
        ErrorCode::SubscribeNotAllowed
    );
    send(
        &mut ws,
        json!({"op": "publish", "topic": "news", "data": 1}),
    )
    .await;
    assert_eq!(
        error_code(recv(&mut ws).await),
        ErrorCode::PublishNotAllowed
    );
    // The third refusal closes with 4502: retrying will not help.
    send(&mut ws, json!({"op": "subscribe", "topic": "admin"})).await;
    assert_eq!(
        error_code(recv(&mut ws).await),
        ErrorCode::SubscribeNotAllowed
    );
    assert_eq!(recv(&mut ws).await, Err(4502));
    let denied = |action: &str| {
        gw.metric(&format!(
            "switchyard_authorization_denied_total{{action=\"{action}\"}}"
        ))
        .expect("metrics")
    };
    assert_eq!((denied("subscribe"), denied("publish")), (2.0, 1.0));

    // A token without topic claims gets the defaults: subscribe anywhere, publish nowhere.
    let mut plain = bearer(&gw, &user_token("bob")).await.welcome();
    send(&mut plain, json!({"op": "subscribe", "topic": "news"})).await;
    assert!(matches!(
        recv(&mut plain).await,
        Ok(ServerFrame::Subscribed { .. })
    ));
    send(
        &mut plain,
        json!({"op": "publish", "topic": "news", "data": 1}),
    )
    .await;
    assert_eq!(
        error_code(recv(&mut plain).await),
        ErrorCode::PublishNotAllowed
    );

    // Failures a browser can see: accepted, then closed with a reason.
    let wrong_key = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "mallory", "exp": now() + 60}),
        &EncodingKey::from_secret(b"another-secret-0123456789abcdef0"),
    )
    .expect("sign");
    let table = [
        (wrong_key, 4501, "bad signature"),
        (
            token(json!({"sub": "a", "exp": now() - 10})),
            4001,
            "token expired",
        ),
        (
            token(json!({"sub": "a", "exp": now() + 60, "nbf": now() + 600})),
            4501,
            "nbf",
        ),
        ("garbage".to_owned(), 4501, "malformed"),
    ];
    for (token, code, reason) in table {
        let (got_code, got_reason) = bearer(&gw, &token).await.closed();
        assert_eq!(got_code, code, "{reason}");
        assert!(
            got_reason.contains(reason),
            "{got_reason:?} should say {reason}"
        );
    }
    assert_eq!(rejected(&gw, "bad_token"), 3.0);
    assert_eq!(rejected(&gw, "token_expired"), 1.0);
}

#[tokio::test]
async fn reject_with_http_answers_401_before_the_upgrade() {
    let gw = jwt_gateway(&["auth.reject_with_http=true"]);
    assert_eq!(open(&gw, "", &[]).await.http(), 401);
    assert_eq!(bearer(&gw, "garbage").await.http(), 401);
    bearer(&gw, &user_token("alice")).await.welcome();
    assert_eq!(rejected(&gw, "missing_credentials"), 1.0);
    assert_eq!(rejected(&gw, "bad_token"), 1.0);
}

#[tokio::test]
async fn a_session_is_closed_with_4001_when_its_token_expires() {
    let gw = jwt_gateway(&[]);
    let exp = now() + 2;
    let mut ws = bearer(&gw, &token(json!({"sub": "alice", "exp": exp})))
        .await
        .welcome();
    let mut other = bearer(&gw, &user_token("bob")).await.welcome();
    assert_eq!(recv(&mut ws).await, Err(4001));
    let closed_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        closed_at_ms >= exp * 1000,
        "closed {closed_at_ms} before the expiry {exp}"
    );
    assert_eq!(
        gw.metric("switchyard_sessions_ended_total{reason=\"expired\"}")
            .expect("metrics"),
        1.0
    );
    // The other session is untouched.
    send(&mut other, json!({"op": "ping"})).await;
    assert_eq!(recv(&mut other).await, Ok(ServerFrame::Pong));
}

fn mint(gw: &GatewayProcess, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let (status, text) =
        http_request_with(gw.admin, "POST", "/api/tickets", headers, Some(body)).expect("request");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn ticket(gw: &GatewayProcess, body: &str) -> String {
    let (status, answer) = mint(gw, body, &[]);
    assert_eq!(status, 201, "{answer}");
    answer["ticket"].as_str().expect("ticket").to_owned()
}

#[tokio::test]
async fn tickets_are_single_use_short_lived_and_never_logged() {
    let gw =
        GatewayProcess::start(&["auth.anonymous=false", "auth.tickets.ttl_ms=400"]).expect("start");
    let first = ticket(&gw, r#"{"sub": "alice", "subscribe": ["chat.*"]}"#);
    let mut ws = open(&gw, &format!("?ticket={first}"), &[]).await.welcome();
    send(&mut ws, json!({"op": "subscribe", "topic": "news"})).await;
    assert_eq!(
        error_code(recv(&mut ws).await),
        ErrorCode::SubscribeNotAllowed
    );
    send(&mut ws, json!({"op": "subscribe", "topic": "chat.1"})).await;
    assert!(matches!(
        recv(&mut ws).await,
        Ok(ServerFrame::Subscribed { .. })
    ));

    let (code, reason) = open(&gw, &format!("?ticket={first}"), &[]).await.closed();
    assert_eq!(
        (code, reason.contains("invalid or used ticket")),
        (4501, true),
        "replay"
    );
    assert_eq!(
        open(&gw, "?ticket=not-a-ticket", &[]).await.closed().0,
        4501
    );
    let late = ticket(&gw, r#"{"sub": "alice"}"#);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        open(&gw, &format!("?ticket={late}"), &[]).await.closed().0,
        4501,
        "expired"
    );
    assert_eq!(rejected(&gw, "bad_ticket"), 3.0);
    assert_eq!(
        gw.metric("switchyard_tickets_issued_total")
            .expect("metrics"),
        2.0
    );

    for body in [
        r#"{"sub": ""}"#,
        r#"{"sub": "a", "subscribe": ["bad topic"]}"#,
        r#"{"sub": "a", "exp": 1}"#,
        r#"{"sub": "a", "role": "admin"}"#,
        "not json",
    ] {
        assert_eq!(mint(&gw, body, &[]).0, 400, "{body}");
    }
    let logs = gw.logs().join("\n");
    for secret in [&first, &late] {
        assert!(!logs.contains(secret.as_str()), "a ticket reached the logs");
    }
    assert!(
        logs.contains("/ws?ticket=REDACTED"),
        "refusals log the redacted target"
    );
}

#[tokio::test]
async fn with_redis_a_ticket_minted_on_one_pod_is_redeemed_once_on_any() {
    let redis = RedisServer::start().expect("redis");
    let url = format!("redis.url={}", redis.url());
    let settings = ["broker=redis", url.as_str(), "auth.anonymous=false"];
    let (a, b) = (
        GatewayProcess::start(&settings).expect("a"),
        GatewayProcess::start(&settings).expect("b"),
    );
    for gw in [&a, &b] {
        assert!(switchyard_tests::wait_status(
            gw.public, "/readyz", 200, STEP
        ));
    }
    let shared = ticket(&a, r#"{"sub": "alice"}"#);
    open(&b, &format!("?ticket={shared}"), &[]).await.welcome();
    assert_eq!(
        open(&a, &format!("?ticket={shared}"), &[]).await.closed().0,
        4501,
        "replay on the minting pod"
    );
    let keys = redis
        .cli(&["--scan", "--pattern", "switchyard:ticket:*"])
        .expect("scan");
    assert_eq!(keys.trim(), "", "a redeemed ticket leaves nothing in Redis");
}

#[tokio::test]
async fn revoke_closes_only_that_subjects_connections() {
    let gw = jwt_gateway(&[]);
    let alice_token = user_token("alice");
    let mut alice1 = bearer(&gw, &alice_token).await.welcome();
    let mut alice2 = bearer(&gw, &alice_token).await.welcome();
    let mut bob = bearer(&gw, &user_token("bob")).await.welcome();
    send(&mut bob, json!({"op": "subscribe", "topic": "news"})).await;
    assert!(matches!(
        recv(&mut bob).await,
        Ok(ServerFrame::Subscribed { .. })
    ));

    let (status, body) = http_request_with(
        gw.admin,
        "POST",
        "/admin/revoke",
        &[],
        Some(r#"{"sub":"alice"}"#),
    )
    .expect("revoke");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer, json!({"sub": "alice", "closed": 2}));
    assert_eq!(recv(&mut alice1).await, Err(4503));
    assert_eq!(recv(&mut alice2).await, Err(4503));
    gw.publish("news", r#""still here""#).expect("publish");
    assert!(
        matches!(recv(&mut bob).await, Ok(ServerFrame::Message { .. })),
        "bob is untouched"
    );

    // The revoked token stays refused; a token issued after the revocation works.
    assert_eq!(bearer(&gw, &alice_token).await.closed().0, 4503);
    let fresh = token(json!({"sub": "alice", "exp": now() + 3600, "iat": now() + 1}));
    bearer(&gw, &fresh).await.welcome();
    assert_eq!(
        gw.metric("switchyard_sessions_ended_total{reason=\"revoked\"}")
            .expect("m"),
        2.0
    );
    assert_eq!(rejected(&gw, "revoked"), 1.0);
}

#[tokio::test]
async fn the_admin_listener_requires_its_token() {
    let token_setting = format!("admin.token={ADMIN_TOKEN}");
    let gw = GatewayProcess::start(&[token_setting.as_str()]).expect("start");
    let status = |headers: &[(&str, &str)]| {
        http_request_with(gw.admin, "GET", "/admin/status", headers, None)
            .expect("request")
            .0
    };
    let right = format!("Bearer {ADMIN_TOKEN}");
    assert_eq!(status(&[]), 401);
    assert_eq!(
        status(&[("authorization", "Bearer admin-token-0123456788")]),
        401
    );
    assert_eq!(status(&[("authorization", &right)]), 200);
    assert_eq!(
        mint(&gw, r#"{"sub":"a"}"#, &[]).0,
        401,
        "tickets need the token too"
    );
    assert_eq!(
        mint(&gw, r#"{"sub":"a"}"#, &[("authorization", &right)]).0,
        201
    );
    assert_eq!(
        gw.metric("switchyard_admin_unauthorized_total")
            .expect("metrics"),
        3.0
    );
    // The token never reaches the logs, nor --print-config.
    assert!(!gw.logs().join("\n").contains(ADMIN_TOKEN));
    let printed = std::process::Command::new(switchyard_tests::gateway_bin())
        .args(["--set", &token_setting, "--print-config"])
        .output()
        .expect("run");
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("token: REDACTED") && !printed.contains(ADMIN_TOKEN),
        "{printed}"
    );
}

#[test]
fn nothing_beyond_loopback_is_left_open_by_default() {
    let table: [(&[&str], &str); 3] = [
        (&["--admin-listen", "0.0.0.0:0"], "admin.token_file"),
        (&["--listen", "0.0.0.0:0"], "auth.anonymous"),
        (&["--set", "auth.jwt.secret=short"], "auth.jwt.secret"),
    ];
    for (args, field) in table {
        let output = std::process::Command::new(switchyard_tests::gateway_bin())
            .args(args)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field), "{stderr:?} should name {field}");
    }
}

#[tokio::test]
async fn connection_handshake_and_publish_limits() {
    // Connections: the third is accepted and closed 4003 with a retry hint.
    let gw = GatewayProcess::start(&["connection.max_connections=2"]).expect("start");
    let _a = open(&gw, "", &[]).await.welcome();
    let _b = open(&gw, "", &[]).await.welcome();
    let (code, reason) = open(&gw, "", &[]).await.closed();
    assert_eq!(code, 4003);
    let reason: Value = serde_json::from_str(&reason).expect("reason JSON");
    assert!(
        reason["retry_ms"]
            .as_u64()
            .is_some_and(|ms| (1_000..5_000).contains(&ms)),
        "{reason}"
    );
    assert_eq!(rejected(&gw, "at_capacity"), 1.0);

    // Handshakes per IP: a burst of 2, then 429.
    let gw = GatewayProcess::start(&[
        "websocket.handshake_rate_per_ip=1",
        "websocket.handshake_burst_per_ip=2",
    ])
    .expect("start");
    let _a = open(&gw, "", &[]).await.welcome();
    let _b = open(&gw, "", &[]).await.welcome();
    assert_eq!(open(&gw, "", &[]).await.http(), 429);
    assert_eq!(rejected(&gw, "rate_limited"), 1.0);

    // Publishes per connection: the burst passes, then errors, then 4002.
    let gw = GatewayProcess::start(&[
        r#"topics.client_publish=["*"]"#,
        "connection.publish_rate=1",
        "connection.publish_burst=5",
    ])
    .expect("start");
    let mut ws = open(&gw, "", &[]).await.welcome();
    for i in 0..20 {
        send(
            &mut ws,
            json!({"op": "publish", "topic": "flood", "data": i}),
        )
        .await;
    }
    let (mut published, mut limited) = (0, 0);
    let code = loop {
        match recv(&mut ws).await {
            Ok(ServerFrame::Published { .. }) => published += 1,
            Ok(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            }) => limited += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(code) => break code,
        }
    };
    assert_eq!((published, limited, code), (5, 3, 4002));
    assert_eq!(
        gw.metric("switchyard_publishes_rate_limited_total")
            .expect("m"),
        3.0
    );
    // Counted as what it was, not as a full queue.
    assert_eq!(
        gw.wait_metric(
            "switchyard_slow_consumers_total{reason=\"publish_rate\"}",
            1.0,
            std::time::Duration::from_secs(5)
        )
        .expect("m"),
        1.0
    );
    assert_eq!(
        gw.metric("switchyard_slow_consumers_total{reason=\"queue_full\"}")
            .expect("m"),
        0.0
    );
}

fn tls_connector(ca: &std::path::Path) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 exchange over TLS (the request must say `Connection: close`).
async fn https(connector: &tokio_rustls::TlsConnector, addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tls_stream(connector, addr).await;
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    // A server closing without close_notify is fine here: the answer is complete.
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn tls_stream(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn wss_and_https_with_a_test_certificate() {
    let dir = std::env::temp_dir().join(format!("sy-gw-tls-{}", std::process::id()));
    let certs = TestCertificates::create(&dir).expect("certificates");
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let settings = [
        format!("tls.cert_file={cert}"),
        format!("tls.key_file={key}"),
        format!("admin.tls.cert_file={cert}"),
        format!("admin.tls.key_file={key}"),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let gw = GatewayProcess::start(&settings).expect("start");
    let connector = tls_connector(&certs.ca);

    let stream = tls_stream(&connector, gw.public).await;
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{}/ws", gw.public), stream)
        .await
        .expect("wss handshake");
    let mut ws = first_frame(ws).await.welcome();
    ws.send(Message::text(r#"{"op":"subscribe","topic":"secure"}"#))
        .await
        .expect("send");
    gw.publish("secure", "42")
        .expect_err("plain HTTP to the TLS admin listener fails");

    // The admin API over https.
    let body = r#"{"topic":"secure","data":42}"#;
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        gw.admin,
        body.len()
    );
    let answer = https(&connector, gw.admin, &request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    loop {
        match ws.next().await.expect("frame").expect("ok") {
            Message::Text(text) if text.contains("\"message\"") => {
                assert!(text.contains("\"data\":42"), "{text}");
                break;
            }
            _ => {}
        }
    }
    // A plain-text client on the TLS port gets nowhere, and is counted.
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.public))
            .await
            .is_err()
    );
    let metrics = https(
        &connector,
        gw.public,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let failed = switchyard_tests::metric_value(
        metrics.split_once("\r\n\r\n").map_or("", |(_, body)| body),
        "switchyard_handshakes_rejected_total{reason=\"tls_failed\"}",
    );
    assert_eq!(failed, 2.0, "the plain publish and the plain ws");
    let _ = std::fs::remove_dir_all(dir);
}

/// The Rust client fetches a fresh ticket before every connection: when its
/// session expires (4001) it reconnects with a new one and resumes, and a
/// publisher running throughout loses nothing.
#[tokio::test]
async fn a_client_session_refreshes_its_ticket_after_4001_and_loses_nothing() {
    use switchyard_client::{Client, ClientEvent, ClientOptions, Credential, CredentialSource};
    use switchyard_protocol::CloseClass;
    let gw = Arc::new(GatewayProcess::start(&["auth.anonymous=false"]).expect("start"));
    let fetches = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let source = {
        let (gw, fetches) = (gw.clone(), fetches.clone());
        CredentialSource::new(move || {
            let (gw, fetches) = (gw.clone(), fetches.clone());
            Box::pin(async move {
                fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Each session lasts about 1.5 s (exp is whole seconds).
                let body = format!(r#"{{"sub": "alice", "exp": {}}}"#, now() + 2);
                tokio::task::spawn_blocking(move || Ok(Credential::Ticket(ticket(&gw, &body))))
                    .await
                    .map_err(|e| e.to_string())?
            })
        })
    };
    let mut options = ClientOptions::new(gw.ws_url());
    options.credentials = Some(source);
    let mut client = Client::start(options);
    client.subscribe("news");
    loop {
        if let Some(ClientEvent::Resumed { .. }) = client.next_event().await {
            break;
        }
    }
    let publisher = {
        let gw = gw.clone();
        tokio::task::spawn_blocking(move || {
            for i in 1..=50 {
                gw.publish("news", &i.to_string()).expect("publish");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (mut received, mut reauthenticated) = (Vec::new(), 0);
    while received.len() < 50 {
        match tokio::time::timeout(STEP, client.next_event())
            .await
            .expect("events")
        {
            Some(ClientEvent::Message { data, .. }) => received.push(data.as_u64().expect("n")),
            Some(ClientEvent::Disconnected { code, class, .. }) => {
                assert_eq!((code, class), (4001, CloseClass::Reauthenticate));
                reauthenticated += 1;
            }
            Some(ClientEvent::Stopped { .. }) | None => panic!("the session stopped"),
            Some(_) => {}
        }
    }
    publisher.await.expect("publisher");
    assert_eq!(
        received,
        (1..=50).collect::<Vec<u64>>(),
        "every message once, in order"
    );
    assert!(
        reauthenticated >= 2,
        "5 s of 2 s sessions: {reauthenticated} expiries"
    );
    // One fresh ticket per connection. The session may be between a 4001
    // and its next connection as the 50th message arrives: its Disconnected
    // event is queued before the fetch, the fetch follows it. Settle both
    // counts (bounded) before comparing.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let fetched = fetches.load(std::sync::atomic::Ordering::Relaxed);
        if fetched == reauthenticated + 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{fetched} tickets fetched for {reauthenticated} expiries: one per connection expected"
        );
        if fetched < reauthenticated + 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        match tokio::time::timeout_at(deadline, client.next_event()).await {
            Ok(Some(ClientEvent::Disconnected { code, class, .. })) => {
                assert_eq!((code, class), (4001, CloseClass::Reauthenticate));
                reauthenticated += 1;
            }
            Ok(Some(ClientEvent::Stopped { .. }) | None) => panic!("the session stopped"),
            Ok(Some(_)) | Err(_) => {}
        }
    }
}

/// ES256 with a PEM public key: a token signed by the matching private key
/// opens a session, one signed by another key does not.
#[tokio::test]
async fn es256_tokens_verify_against_a_public_key_file() {
    let dir = std::env::temp_dir().join(format!("sy-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    for name in ["good", "other"] {
        let key = format!("{name}.key");
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ]);
        openssl(&[
            "pkey",
            "-in",
            &key,
            "-pubout",
            "-out",
            &format!("{name}.pub"),
        ]);
    }
    let sign = |name: &str| {
        let pem = std::fs::read(dir.join(format!("{name}.key"))).expect("key");
        jsonwebtoken::encode(
            &Header::new(jsonwebtoken::Algorithm::ES256),
            &json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_ec_pem(&pem).expect("ec key"),
        )
        .expect("sign")
    };
    let public_key = format!(
        "auth.jwt.public_key_file={}",
        dir.join("good.pub").display()
    );
    let gw = GatewayProcess::start(&[
        "auth.jwt.algorithm=ES256",
        &public_key,
        "auth.anonymous=false",
    ])
    .expect("start");
    bearer(&gw, &sign("good")).await.welcome();
    let (code, reason) = bearer(&gw, &sign("other")).await.closed();
    assert_eq!(
        (code, reason.contains("bad signature")),
        (4501, true),
        "{reason}"
    );
    // An HS256 token must not pass, whatever it is signed with.
    assert_eq!(bearer(&gw, &user_token("alice")).await.closed().0, 4501);
    let _ = std::fs::remove_dir_all(dir);
}

/// `auth.max_connections_per_subject`: one subject cannot take the gateway.
/// The N+1th connection of one `sub` is refused with 4003 (a retry hint),
/// counted as `subject_limit`; another subject, and the same one once a
/// connection of its ended, are admitted.
#[tokio::test]
async fn one_subject_holds_at_most_its_share_of_connections() {
    let gw = jwt_gateway(&["auth.max_connections_per_subject=2"]);
    let alice = user_token("alice");
    let first = bearer(&gw, &alice).await.welcome();
    let _second = bearer(&gw, &alice).await.welcome();
    let (code, reason) = bearer(&gw, &alice).await.closed();
    assert_eq!(code, 4003);
    let reason: Value = serde_json::from_str(&reason).expect("reason JSON");
    assert!(reason["retry_ms"].as_u64().is_some(), "{reason}");
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("2 connections per subject")),
        "{reason}"
    );
    assert_eq!(rejected(&gw, "subject_limit"), 1.0);
    let _bob = bearer(&gw, &user_token("bob")).await.welcome();
    drop(first);
    // Once the gateway has seen one of alice's connections end, she has a
    // place again.
    gw.wait_metric("switchyard_connections", 2.0, Duration::from_secs(10))
        .expect("metrics");
    let _again = bearer(&gw, &alice).await.welcome();
    assert_eq!(
        rejected(&gw, "subject_limit"),
        1.0,
        "no extra refusal counted"
    );
}

/// One request to the admin listener, written by hand so every header is
/// the test's: (status, body).
fn raw_admin(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let raw = raw_exchange(
        addr,
        &format!(
            "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (
        status,
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// The admin listener in its default setup (loopback, no token) does not
/// answer web pages: a cross-site "simple" POST (`text/plain`, no
/// preflight), anything with `Origin` or fetch metadata, and a DNS-rebinding
/// page's own name in `Host` are refused and counted, before any route; an
/// API client's request (an address in `Host`, a JSON body) passes.
#[test]
fn the_admin_listener_refuses_web_pages_whatever_the_token_setting() {
    let gw = GatewayProcess::start(&[]).expect("start");
    let addr = gw.admin;
    let publish = r#"{"topic":"t","data":1}"#;
    let host = format!("Host: {addr}");
    let table: [(String, u16, &str); 7] = [
        // what curl -d, or a page's form or fetch without preflight, sends
        (
            format!("POST /api/publish HTTP/1.1\r\n{host}\r\nContent-Type: text/plain"),
            415,
            "content_type",
        ),
        (
            format!("POST /api/publish HTTP/1.1\r\n{host}\r\nContent-Type: application/x-www-form-urlencoded"),
            415,
            "content_type",
        ),
        (format!("POST /api/publish HTTP/1.1\r\n{host}"), 415, "content_type"),
        (
            format!("POST /api/publish HTTP/1.1\r\n{host}\r\nContent-Type: application/json\r\nOrigin: https://evil.example"),
            403,
            "origin",
        ),
        (
            format!("POST /admin/drain HTTP/1.1\r\n{host}\r\nContent-Type: application/json\r\nOrigin: null"),
            403,
            "origin",
        ),
        (
            format!("GET /admin/status HTTP/1.1\r\n{host}\r\nSec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: cors"),
            403,
            "fetch_metadata",
        ),
        (
            format!("GET /admin/status HTTP/1.1\r\nHost: rebind.evil.example:{}", addr.port()),
            403,
            "host",
        ),
    ];
    for (head, status, reason) in &table {
        let (got, body) = raw_admin(addr, head, publish);
        assert_eq!(got, *status, "{head}: {body}");
        assert!(body.contains(reason), "{head}: {body}");
    }
    for (reason, count) in [
        ("content_type", 3.0),
        ("origin", 2.0),
        ("fetch_metadata", 1.0),
        ("host", 1.0),
    ] {
        let series = format!("switchyard_admin_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(gw.metric(&series).expect("metric"), count, "{reason}");
    }
    // Nothing was published by any of them; an API client's request passes.
    let (status, body) = raw_admin(
        addr,
        &format!("POST /api/publish HTTP/1.1\r\n{host}\r\nContent-Type: application/json"),
        publish,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#""offset":1"#),
        "the first publish that got through: {body}"
    );
    let (status, _) = raw_admin(
        addr,
        &format!(
            "GET /admin/status HTTP/1.1\r\nHost: localhost:{}",
            addr.port()
        ),
        "",
    );
    assert_eq!(status, 200);

    // With a token too: a page that somehow holds it is still a page.
    let gw = GatewayProcess::start(&[&format!("admin.token={ADMIN_TOKEN}")]).expect("start");
    let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
    let host = format!("Host: {}", gw.admin);
    let json = "Content-Type: application/json";
    let (status, body) = raw_admin(
        gw.admin,
        &format!("POST /api/publish HTTP/1.1\r\n{host}\r\n{auth}\r\n{json}\r\nOrigin: https://evil.example"),
        publish,
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = raw_admin(
        gw.admin,
        &format!("POST /api/publish HTTP/1.1\r\n{host}\r\n{auth}\r\n{json}"),
        publish,
    );
    assert_eq!(status, 200, "{body}");
}

// ------------------------------------------------ the identity provider's keys

/// An RS256 key the identity provider signs with, and its public JWK.
struct ProviderKey {
    kid: String,
    pem: Vec<u8>,
    jwk: Value,
}

impl ProviderKey {
    /// A fresh 2048-bit RSA key in `dir`, by `openssl`.
    fn new(dir: &std::path::Path, kid: &str) -> ProviderKey {
        let file = dir.join(format!("{kid}.key"));
        let run = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("openssl");
            assert!(output.status.success(), "openssl {args:?}");
            String::from_utf8(output.stdout).expect("utf-8")
        };
        let path = file.to_str().expect("path");
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            path,
        ]);
        let modulus = run(&["rsa", "-in", path, "-noout", "-modulus"]);
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        ProviderKey {
            kid: kid.to_owned(),
            pem: std::fs::read(&file).expect("key"),
            jwk: json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                        "n": base64url(&n), "e": "AQAB"}),
        }
    }

    /// A token for `sub` signed with this key, naming `kid` in its header.
    fn sign_as(&self, sub: &str, kid: &str) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            &json!({"sub": sub, "exp": now() + 600}),
            &EncodingKey::from_rsa_pem(&self.pem).expect("rsa key"),
        )
        .expect("sign")
    }

    fn sign(&self, sub: &str) -> String {
        self.sign_as(sub, &self.kid)
    }
}

/// The provider's answer: these keys, cacheable for an hour.
fn key_set(keys: &[&ProviderKey]) -> CannedResponse {
    let keys: Vec<&Value> = keys.iter().map(|k| &k.jwk).collect();
    CannedResponse {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("cache-control".into(), "public, max-age=3600".into()),
        ],
        body: json!({ "keys": keys }).to_string().into_bytes(),
    }
}

/// A provider (HTTPS with a private CA) and three keys, of which it
/// publishes the ones the test says.
struct Provider {
    dir: std::path::PathBuf,
    certs: TestCertificates,
    keys: [ProviderKey; 3],
}

impl Provider {
    fn new(name: &str) -> Provider {
        let dir = std::env::temp_dir().join(format!("sy-{name}-{}", std::process::id()));
        let certs = TestCertificates::create(&dir).expect("certificates");
        let keys = ["a", "b", "c"].map(|kid| ProviderKey::new(&dir, kid));
        Provider { dir, certs, keys }
    }

    fn serve(&self, response: CannedResponse) -> CannedHttps {
        CannedHttps::start(&self.certs.cert, &self.certs.key, response).expect("https")
    }

    fn gateway(&self, https: &CannedHttps, min_refresh_ms: u64) -> GatewayProcess {
        let url = format!(
            "auth.jwt.jwks_url=https://{}/.well-known/jwks.json",
            https.addr
        );
        let ca = format!("auth.jwt.jwks_ca_file={}", self.certs.ca.display());
        let min = format!("auth.jwt.jwks_min_refresh_ms={min_refresh_ms}");
        GatewayProcess::start(&[
            "auth.jwt.algorithm=RS256",
            &url,
            &ca,
            &min,
            "auth.anonymous=false",
        ])
        .expect("start")
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn readiness(gw: &GatewayProcess) -> (u16, String) {
    http_request(gw.public, "GET", "/readyz", None).expect("readyz")
}

/// Waits until the gateway has the provider's keys (readiness 200).
fn wait_keys(gw: &GatewayProcess) {
    if !wait_status(gw.public, "/readyz", 200, Duration::from_secs(10)) {
        panic!("not ready: {:?}\n{}", readiness(gw), gw.logs().join("\n"));
    }
}

async fn refused_unknown_key(gw: &GatewayProcess, token: &str) {
    let (code, reason) = bearer(gw, token).await.closed();
    assert_eq!(
        (code, reason.contains("unknown key id")),
        (4501, true),
        "{reason}"
    );
}

/// `auth.jwt.jwks_url`: the gateway takes the provider's keys over HTTPS
/// (private CA), follows a rotation without a restart, and keeps the last
/// good set through every way the provider can fail — an error status,
/// a body that is not JSON, a set with no usable key, an oversized body, no
/// answer at all — saying so in readiness and the metrics, until the
/// provider is back.
#[tokio::test]
async fn the_gateway_follows_the_providers_key_rotation_and_outages() {
    let provider = Provider::new("jwks-rotation");
    let [a, b, c] = &provider.keys;
    let mut https = provider.serve(key_set(&[a]));
    let gw = provider.gateway(&https, 300);
    wait_keys(&gw);
    assert_eq!(readiness(&gw), (200, "ready".into()));
    assert_eq!(https.requests(), 1, "one fetch at startup (max-age 3600)");
    bearer(&gw, &a.sign("alice")).await.welcome();
    // Past the rate limit (300 ms) an unknown kid fetches the set once.
    tokio::time::sleep(Duration::from_millis(350)).await;
    refused_unknown_key(&gw, &b.sign("bob")).await;
    assert_eq!(https.requests(), 2, "the unknown kid fetched the set once");

    // The provider rotates: b in, a out. No restart.
    https.set_response(key_set(&[b]));
    tokio::time::sleep(Duration::from_millis(350)).await;
    bearer(&gw, &b.sign("bob")).await.welcome();
    refused_unknown_key(&gw, &a.sign("alice")).await;
    assert_eq!(gw.metric("switchyard_jwks_keys").expect("metric"), 1.0);

    // Every way the provider can fail keeps the set in hand.
    let bad: [(&str, CannedResponse); 4] = [
        (
            "HTTP 500",
            CannedResponse {
                status: 500,
                headers: vec![],
                body: b"oops".to_vec(),
            },
        ),
        (
            "not JSON",
            CannedResponse {
                body: b"<html>login</html>".to_vec(),
                ..key_set(&[c])
            },
        ),
        (
            "no usable key",
            CannedResponse {
                body: br#"{"keys":[{"kty":"RSA","kid":"c","n":"","e":""},{"kty":"XX"}]}"#.to_vec(),
                ..key_set(&[c])
            },
        ),
        (
            "oversized",
            CannedResponse {
                body: vec![b' '; 300 * 1024],
                ..key_set(&[c])
            },
        ),
    ];
    for (n, (name, response)) in bad.into_iter().enumerate() {
        https.set_response(response);
        tokio::time::sleep(Duration::from_millis(350)).await;
        refused_unknown_key(&gw, &c.sign("carol")).await;
        bearer(&gw, &b.sign("bob")).await.welcome();
        let (status, body) = readiness(&gw);
        assert_eq!(status, 200, "{name}: {body}");
        assert!(
            body.contains(&format!("serving the last good key set; {} fetches", n + 1)),
            "{name}: {body}"
        );
    }
    https.down();
    tokio::time::sleep(Duration::from_millis(350)).await;
    refused_unknown_key(&gw, &c.sign("carol")).await;
    bearer(&gw, &b.sign("bob")).await.welcome();
    let (status, body) = readiness(&gw);
    assert!(status == 200 && body.contains("connect"), "{status} {body}");
    assert_eq!(
        gw.metric("switchyard_jwks_refreshes_total{result=\"error\"}")
            .expect("metric"),
        5.0
    );
    assert_eq!(
        gw.metric("switchyard_jwks_refreshes_total{result=\"ok\"}")
            .expect("metric"),
        3.0
    );

    // Back, with c added: c's first token brings it in.
    https.set_response(key_set(&[b, c]));
    https.up().expect("up");
    tokio::time::sleep(Duration::from_millis(350)).await;
    bearer(&gw, &c.sign("carol")).await.welcome();
    assert_eq!(readiness(&gw), (200, "ready".into()));
    assert_eq!(gw.metric("switchyard_jwks_keys").expect("metric"), 2.0);
}

/// Tokens with random `kid`s cannot make the gateway hammer the provider:
/// at most one fetch per `jwks_min_refresh_ms`, however many arrive, and
/// a good token is admitted in the middle of the flood.
#[tokio::test]
async fn a_flood_of_unknown_kids_does_not_hammer_the_provider() {
    let provider = Provider::new("jwks-flood");
    let [a, _, c] = &provider.keys;
    let https = provider.serve(key_set(&[a]));
    let gw = provider.gateway(&https, 2000);
    wait_keys(&gw);
    assert_eq!(https.requests(), 1);
    let started = std::time::Instant::now();
    for n in 0..200 {
        let kid = format!("random-{n}-{}", rand::random::<u32>());
        refused_unknown_key(&gw, &c.sign_as("mallory", &kid)).await;
        if n == 100 {
            bearer(&gw, &a.sign("alice")).await.welcome();
        }
    }
    let allowed = 1 + 1 + started.elapsed().as_millis() as usize / 2000;
    assert!(
        https.requests() <= allowed,
        "{} fetches for 200 unknown kids in {:?} (at most {allowed})",
        https.requests(),
        started.elapsed()
    );
    assert_eq!(rejected(&gw, "bad_token"), 200.0);
}

/// Before the first good set the gateway can verify no token: it is not
/// ready, and a handshake with a token is told to come back (1013, counted
/// as `auth_unavailable`) rather than refused as invalid. Once the provider
/// answers, the retries bring the set in, and its `max-age` sets the pace
/// of the refreshes that follow.
#[tokio::test]
async fn without_the_providers_keys_the_gateway_is_not_ready_and_asks_to_retry() {
    let provider = Provider::new("jwks-down");
    let [a, ..] = &provider.keys;
    let mut https = provider.serve(key_set(&[a]));
    https.down();
    let gw = provider.gateway(&https, 300);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = readiness(&gw);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("jwks: no key set from https://"), "{body}");
    assert_eq!(bearer(&gw, &a.sign("alice")).await.closed().0, 1013);
    assert_eq!(rejected(&gw, "auth_unavailable"), 1.0);
    // The provider now says its set is good for one second: the gateway
    // comes back for it on that schedule, with no token asking.
    https.set_response(CannedResponse {
        headers: vec![("cache-control".into(), "max-age=1".into())],
        ..key_set(&[a])
    });
    https.up().expect("up");
    wait_keys(&gw);
    bearer(&gw, &a.sign("alice")).await.welcome();
    let before = https.requests();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let refreshes = https.requests() - before;
    // About 3 (the default schedule would make none); margin for a loaded machine.
    assert!(
        (2..=5).contains(&refreshes),
        "{refreshes} fetches in 3.5 s at max-age=1"
    );
}

/// The whole answer to one request written by hand (the connection is
/// closed by the gateway after it).
fn raw_exchange(addr: SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(STEP)).expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn upgrade_head(addr: SocketAddr) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Admission control: beyond `websocket.handshake_burst` (the rate of 1/s
/// adds no token during the test's second) every connection is shed — a
/// WebSocket with 4003 and a `retry_ms` whose window grows with the sheds,
/// a page with 503 — while the probes and the scrape are still answered,
/// the connections already open are undisturbed, and every shed is counted
/// and shown in `/admin/status`. With `auth.reject_with_http` the upgrade
/// is refused with 503 and `Retry-After` instead.
#[tokio::test]
async fn a_storm_of_handshakes_is_shed_and_told_when_to_come_back() {
    let gw = GatewayProcess::start(&["websocket.handshake_rate=1", "websocket.handshake_burst=3"])
        .expect("start");
    let mut held = open(&gw, "", &[]).await.welcome();
    send(&mut held, json!({"op": "subscribe", "topic": "calm"})).await;
    assert!(matches!(
        recv(&mut held).await,
        Ok(ServerFrame::Subscribed { .. })
    ));
    let _others = (
        open(&gw, "", &[]).await.welcome(),
        open(&gw, "", &[]).await.welcome(),
    );
    let storm = futures_util::future::join_all((0..10).map(|_| open(&gw, "", &[]))).await;
    let mut waits = Vec::new();
    for outcome in storm {
        let (code, reason) = outcome.closed();
        assert_eq!(code, 4003, "{reason}");
        let reason: Value = serde_json::from_str(&reason).expect("reason JSON");
        assert_eq!(reason["reason"], "overloaded");
        let retry_ms = reason["retry_ms"].as_u64().expect("retry_ms");
        // Ten sheds at 1/s: windows of 1 s up to 10 s, after at least 100 ms.
        assert!((100..=10_100).contains(&retry_ms), "{retry_ms}");
        waits.push(retry_ms);
    }
    waits.sort_unstable();
    waits.dedup();
    assert!(waits.len() >= 2, "spread: {waits:?}");
    assert!(
        waits.last().is_some_and(|&ms| ms > 1_100),
        "the window grew: {waits:?}"
    );
    // Probes and scrapes are never shed; a page is.
    for path in ["/readyz", "/healthz", "/metrics"] {
        let (status, _) = http_request(gw.public, "GET", path, None).expect(path);
        assert_eq!(status, 200, "{path}");
    }
    let page = raw_exchange(
        gw.public,
        &format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", gw.public),
    );
    assert!(page.starts_with("HTTP/1.1 503"), "{page}");
    assert!(
        page.to_ascii_lowercase().contains("\r\nretry-after: "),
        "{page}"
    );
    assert_eq!(rejected(&gw, "overloaded"), 11.0);
    let (_, status) = http_request(gw.admin, "GET", "/admin/status", None).expect("status");
    let status: Value = serde_json::from_str(&status).expect("status JSON");
    let admission = &status["admission"];
    assert_eq!(admission["shed_total"], 11, "{status}");
    assert_eq!(admission["handshake_rate"], 1);
    assert_eq!(admission["handshake_burst"], 3);
    assert_eq!(admission["handshakes_in_flight"], 0);
    assert!(
        admission["retry_window_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 1_000),
        "{status}"
    );
    // The connection held through the storm still gets what is published.
    gw.publish("calm", "1").expect("publish");
    assert!(matches!(
        recv(&mut held).await,
        Ok(ServerFrame::Message { .. })
    ));

    // Refusing with HTTP: 503 and a whole number of seconds to wait.
    let gw = GatewayProcess::start(&[
        "websocket.handshake_rate=1",
        "websocket.handshake_burst=1",
        "auth.reject_with_http=true",
    ])
    .expect("start");
    open(&gw, "", &[]).await.welcome();
    let answer = raw_exchange(gw.public, &upgrade_head(gw.public));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let retry_after = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        retry_after.is_some_and(|s| (1..=2).contains(&s)),
        "{answer}"
    );
    assert!(answer.ends_with("overloaded"), "{answer}");
}

/// With TLS the shed happens before the TLS handshake: the connection is
/// closed without a byte of TLS, and counted apart.
#[tokio::test]
async fn with_tls_a_shed_connection_is_closed_before_any_tls_work() {
    let dir = std::env::temp_dir().join(format!("sy-gw-shed-tls-{}", std::process::id()));
    let certs = TestCertificates::create(&dir).expect("certificates");
    let cert = format!("tls.cert_file={}", certs.cert.display());
    let key = format!("tls.key_file={}", certs.key.display());
    let gw = GatewayProcess::start(&[
        &cert,
        &key,
        "websocket.handshake_rate=1",
        "websocket.handshake_burst=1",
    ])
    .expect("start");
    let connector = tls_connector(&certs.ca);
    let stream = tls_stream(&connector, gw.public).await;
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{}/ws", gw.public), stream)
        .await
        .expect("wss handshake");
    let _held = first_frame(ws).await.welcome();
    let tcp = tokio::net::TcpStream::connect(gw.public)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(gw.public.ip().into());
    let err = connector
        .connect(name, tcp)
        .await
        .expect_err("no TLS for a shed connection");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    // The scrape is on the same TLS port: once the bucket has a token again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        gw.public
    );
    let metrics = https(&connector, gw.public, &request).await;
    let value = |reason: &str| {
        switchyard_tests::metric_value(
            &metrics,
            &format!("switchyard_handshakes_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(value("overloaded_tls"), 1.0, "{metrics}");
    assert_eq!(value("tls_failed"), 0.0, "no TLS handshake was begun");
}

/// The bound on handshakes judged at once: while Redis is stopped, two
/// ticket redemptions wait on it; a third handshake is shed with 4003 at
/// once rather than queue behind them, and counted. When Redis answers
/// again the two complete.
#[tokio::test]
async fn handshakes_waiting_on_credentials_are_bounded() {
    let redis = RedisServer::start().expect("redis");
    let url = format!("redis.url={}", redis.url());
    let gw = GatewayProcess::start(&[
        "broker=redis",
        &url,
        "auth.anonymous=false",
        "websocket.max_handshakes_in_flight=2",
        "redis.command_timeout_ms=5000",
    ])
    .expect("start");
    assert!(wait_status(gw.public, "/readyz", 200, STEP));
    let (first, second, third) = (
        ticket(&gw, r#"{"sub": "alice"}"#),
        ticket(&gw, r#"{"sub": "bob"}"#),
        ticket(&gw, r#"{"sub": "carol"}"#),
    );
    redis.pause().expect("SIGSTOP redis");
    let gw = Arc::new(gw);
    let waiting: Vec<_> = [first, second]
        .into_iter()
        .map(|t| {
            let gw = gw.clone();
            tokio::spawn(async move { open(&gw, &format!("?ticket={t}"), &[]).await.welcome() })
        })
        .collect();
    // Both are in flight once the status says so.
    let deadline = std::time::Instant::now() + STEP;
    loop {
        let (_, status) = http_request(gw.admin, "GET", "/admin/status", None).expect("status");
        let status: Value = serde_json::from_str(&status).expect("status JSON");
        if status["admission"]["handshakes_in_flight"] == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, reason) = open(&gw, &format!("?ticket={third}"), &[]).await.closed();
    assert_eq!(code, 4003, "{reason}");
    assert!(reason.contains("overloaded"), "{reason}");
    assert_eq!(rejected(&gw, "overloaded"), 1.0);
    redis.resume().expect("SIGCONT redis");
    for task in waiting {
        task.await.expect("welcomed once Redis answered");
    }
}
