//! End-to-end tests of the gateway: each starts the real binary on ephemeral
//! loopback ports and talks to it over real sockets.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchyard_client::{Closed, Connection, Event};
use switchyard_protocol::{ErrorCode, Position, ServerFrame};
use switchyard_tests::{next_frame, opcode, GatewayProcess, RawSocket, STEP};
use tokio_tungstenite::tungstenite::Message;

async fn expect_closed(conn: &mut Connection) -> Closed {
    loop {
        match tokio::time::timeout(STEP, conn.next_event()).await {
            Ok(Ok(Event::Closed(closed))) => return closed,
            Ok(Ok(Event::Frame(_))) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

/// Subscribes and returns the `subscribed` frame's position and recovered flag.
async fn subscribe(
    conn: &mut Connection,
    topic: &str,
    since: Option<Position>,
) -> (Position, bool) {
    conn.subscribe(topic, since).await.expect("subscribe");
    match next_frame(conn).await {
        ServerFrame::Subscribed {
            topic: got,
            position,
            recovered,
        } if got == topic => (position, recovered),
        other => panic!("expected subscribed to {topic}, got {other:?}"),
    }
}

/// The next `message` frame's (offset, data).
async fn next_message(conn: &mut Connection) -> (String, u64, serde_json::Value) {
    loop {
        match next_frame(conn).await {
            ServerFrame::Message {
                topic,
                offset,
                data,
                ..
            } => return (topic, offset, data),
            ServerFrame::Subscribed { .. } | ServerFrame::Published { .. } => continue,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_subscriber_in_order() {
    let gw = GatewayProcess::start(&["topics.client_publish=[chat.*]"]).expect("start");
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
        let (position, recovered) = subscribe(&mut conn, "news", None).await;
        assert_eq!(position.offset, 0);
        assert!(recovered);
        subscribers.push(conn);
    }
    let mut other = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut other, "other", None).await;

    for n in 1..=20u64 {
        let position = gw
            .publish("news", &format!(r#"{{"n":{n}}}"#))
            .expect("publish");
        assert_eq!(position.offset, n);
    }
    for conn in &mut subscribers {
        for n in 1..=20u64 {
            let (topic, offset, data) = next_message(conn).await;
            assert_eq!((topic.as_str(), offset), ("news", n));
            assert_eq!(data, serde_json::json!({ "n": n }));
        }
    }
    gw.publish("other", "\"only for other\"").expect("publish");
    let (topic, offset, data) = next_message(&mut other).await;
    assert_eq!(
        (topic.as_str(), offset, data),
        ("other", 1, serde_json::json!("only for other"))
    );

    // Client publishes: allowed by pattern, refused elsewhere.
    let publisher = &mut subscribers[0];
    publisher
        .publish("chat.room", r#"{"hi":true}"#)
        .await
        .expect("publish");
    match next_frame(publisher).await {
        ServerFrame::Published { topic, position } => {
            assert_eq!((topic.as_str(), position.offset), ("chat.room", 1))
        }
        other => panic!("expected published, got {other:?}"),
    }
    publisher.publish("news", "1").await.expect("publish");
    match next_frame(publisher).await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::PublishNotAllowed),
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(
        gw.metric("switchyard_messages_published_total").expect("m"),
        22.0
    );
    assert_eq!(gw.metric("switchyard_subscriptions").expect("m"), 4.0);
    assert_eq!(gw.metric("switchyard_connections").expect("m"), 4.0);
    let (status, body) = gw
        .admin_request("GET", "/admin/status", None)
        .expect("status");
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(status["connections"], 4);
    assert_eq!(status["subscriptions"], 4);
    assert_eq!(status["topics"], 3);
    assert_eq!(status["draining"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_publishing_has_no_gap_and_no_duplicate() {
    const TOTAL: u64 = 1500;
    let gw = GatewayProcess::start(&[]).expect("start");
    let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut conn, "race", None).await;

    let admin = gw.admin;
    let publisher = blocking(move || {
        for n in 1..=TOTAL {
            let body = format!(r#"{{"topic":"race","data":{n}}}"#);
            let (status, text) =
                switchyard_tests::http_request(admin, "POST", "/api/publish", Some(&body))
                    .expect("publish");
            assert_eq!(status, 200, "{text}");
        }
    });

    let mut seen: Vec<u64> = Vec::new();
    let mut reconnects = 0;
    while seen.last() != Some(&TOTAL) {
        // Read a random number of messages, then drop the connection (abruptly
        // or cleanly) and come back with `since` = the last position seen.
        let batch = rand::random_range(1..120);
        for _ in 0..batch {
            let (_, offset, data) = next_message(&mut conn).await;
            assert_eq!(data, serde_json::json!(offset));
            seen.push(offset);
            if offset == TOTAL {
                break;
            }
        }
        if seen.last() == Some(&TOTAL) {
            break;
        }
        let since = conn.position("race");
        if rand::random::<bool>() {
            conn.close(1000).await.expect("close");
        }
        drop(conn);
        conn = Connection::connect(&gw.ws_url()).await.expect("reconnect");
        let (_, recovered) = subscribe(&mut conn, "race", since).await;
        assert!(
            recovered,
            "history holds everything, so every resume recovers"
        );
        reconnects += 1;
    }
    publisher.await.expect("publisher");
    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(
        seen, expected,
        "exactly 1..={TOTAL} in order after {reconnects} reconnects"
    );
    assert!(
        reconnects > 5,
        "the test must actually reconnect ({reconnects})"
    );
    assert_eq!(
        gw.metric("switchyard_resume_total{recovered=\"true\"}")
            .expect("m"),
        reconnects as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowed_history_answers_recovered_false() {
    let gw = GatewayProcess::start(&["topics.history_size=10"]).expect("start");
    let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut conn, "t", None).await;
    gw.publish("t", "1").expect("publish");
    let (_, offset, _) = next_message(&mut conn).await;
    assert_eq!(offset, 1);
    let since = conn.position("t").expect("position");
    drop(conn);

    for n in 2..=31 {
        gw.publish("t", &n.to_string()).expect("publish");
    }
    let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
    let (position, recovered) = subscribe(&mut conn, "t", Some(since)).await;
    assert!(!recovered, "offsets 2..21 were trimmed");
    assert_eq!(position, Position::new(since.epoch, 31));
    gw.publish("t", "32").expect("publish");
    let (_, offset, _) = next_message(&mut conn).await;
    assert_eq!(
        offset, 32,
        "no replay after a failed recovery: live from the head"
    );

    // A position from another epoch cannot be resumed either.
    let foreign = Position::new(since.epoch ^ 1, 5);
    let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
    let (_, recovered) = subscribe(&mut conn, "t", Some(foreign)).await;
    assert!(!recovered);
    // Within the retained window, resume works.
    let (_, recovered) = subscribe(&mut conn, "t", Some(Position::new(since.epoch, 25))).await;
    assert!(recovered);
    for expected in 26..=32 {
        assert_eq!(next_message(&mut conn).await.1, expected);
    }
    assert_eq!(
        gw.metric("switchyard_resume_total{recovered=\"false\"}")
            .expect("m"),
        2.0
    );
    assert_eq!(
        gw.metric("switchyard_resume_total{recovered=\"true\"}")
            .expect("m"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_4002_and_memory_stays_bounded() {
    const MESSAGES: usize = 2500;
    const SIZE: usize = 32 * 1024;
    let gw = GatewayProcess::start(&[
        "connection.outbox_max_messages=64",
        "connection.close_timeout_ms=60000",
        "topics.history_size=4",
    ])
    .expect("start");
    // The stuck consumer subscribes, then reads nothing until the burst is over.
    let mut stuck = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut stuck, "firehose", None).await;
    let mut fast = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut fast, "firehose", None).await;
    let fast_reader = tokio::spawn(async move {
        for expected in 1..=MESSAGES as u64 {
            let (_, offset, _) = next_message(&mut fast).await;
            assert_eq!(offset, expected);
        }
    });

    let rss_before = gw.rss_kib().expect("rss");
    let admin = gw.admin;
    let pid = gw.pid();
    let peak = blocking(move || {
        let payload = format!("\"{}\"", "x".repeat(SIZE));
        let mut peak = 0;
        for n in 0..MESSAGES {
            let body = format!(r#"{{"topic":"firehose","data":{payload}}}"#);
            let (status, text) =
                switchyard_tests::http_request(admin, "POST", "/api/publish", Some(&body))
                    .expect("publish");
            assert_eq!(status, 200, "{text}");
            if n % 100 == 0 {
                peak = peak.max(switchyard_tests::rss_kib(pid).expect("rss"));
            }
        }
        peak
    })
    .await
    .expect("publisher");
    fast_reader
        .await
        .expect("the fast consumer got every message");

    let published_kib = (MESSAGES * SIZE / 1024) as u64;
    let growth = peak.saturating_sub(rss_before);
    assert!(
        growth < published_kib / 3,
        "gateway RSS grew {growth} KiB while {published_kib} KiB went to a stuck consumer"
    );
    // The stuck consumer drains what the kernel buffered, then sees 4002.
    let closed = expect_closed(&mut stuck).await;
    assert_eq!(closed.code, 4002, "{closed:?}");
    assert_eq!(
        gw.wait_metric(
            "switchyard_slow_consumers_total{reason=\"queue_full\"}",
            1.0,
            STEP
        )
        .expect("m"),
        1.0
    );
    assert_eq!(
        gw.metric("switchyard_slow_consumers_total{reason=\"publish_rate\"}")
            .expect("m"),
        0.0
    );
    assert_eq!(
        gw.metric("switchyard_connections_closed_total{code=\"4002\",initiator=\"server\"}")
            .expect("m"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_reaped_live_one_is_not() {
    let gw = GatewayProcess::start(&["connection.keepalive_interval_ms=300"]).expect("start");
    // Completes the handshake, then never reads or writes: no pong, no ping.
    let _silent = RawSocket::connect(gw.public, "/ws").expect("raw");
    let mut live = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut live, "k", None).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        // Reading answers protocol pings and heartbeat frames.
        while let Ok(Event::Frame(frame)) = live.next_event().await {
            if matches!(frame, ServerFrame::Message { .. }) && tx.send(frame).is_err() {
                break;
            }
        }
    });
    let abrupt = "switchyard_connections_closed_total{code=\"1006\",initiator=\"abrupt\"}";
    assert_eq!(gw.wait_metric(abrupt, 1.0, STEP).expect("m"), 1.0);
    // Several more intervals: the live connection must survive them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gw.metric(abrupt).expect("m"), 1.0);
    assert_eq!(gw.metric("switchyard_connections").expect("m"), 1.0);
    gw.publish("k", "\"still here\"").expect("publish");
    match tokio::time::timeout(STEP, rx.recv()).await {
        Ok(Some(ServerFrame::Message { data, .. })) => {
            assert_eq!(data, serde_json::json!("still here"))
        }
        other => panic!("expected the message, got {other:?}"),
    }
    reader.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clean_closes_and_others_keep_working() {
    let gw = GatewayProcess::start(&[
        "websocket.max_message_bytes=1024",
        "websocket.max_frame_bytes=1024",
    ])
    .expect("start");
    let mut bystander = Connection::connect(&gw.ws_url()).await.expect("connect");
    subscribe(&mut bystander, "calm", None).await;

    // Oversized message → 1009.
    let mut big = Connection::connect(&gw.ws_url()).await.expect("connect");
    big.publish("calm", &format!("\"{}\"", "x".repeat(4096)))
        .await
        .expect("send");
    assert_eq!(expect_closed(&mut big).await.code, 1009);

    // Invalid UTF-8 in a text frame → 1007.
    let mut raw = RawSocket::connect(gw.public, "/ws").expect("raw");
    raw.send_frame(opcode::TEXT, &[b'{', 0xff, 0xfe, b'}'])
        .expect("send");
    assert_eq!(raw.read_close_code().expect("read"), Some(1007));

    // A frame with a reserved opcode → 1002.
    let mut raw = RawSocket::connect(gw.public, "/ws").expect("raw");
    raw.send_bytes(&[0x83, 0x80, 0, 0, 0, 0]).expect("send");
    assert_eq!(raw.read_close_code().expect("read"), Some(1002));

    // An unmasked client frame → 1002.
    let mut raw = RawSocket::connect(gw.public, "/ws").expect("raw");
    raw.send_bytes(&[0x81, 0x02, b'h', b'i']).expect("send");
    assert_eq!(raw.read_close_code().expect("read"), Some(1002));

    // Unknown ops and malformed JSON get error frames; the third violation closes 4500.
    let mut rude = Connection::connect(&gw.ws_url()).await.expect("connect");
    let probes: [(&str, ErrorCode); 3] = [
        (r#"{"op":"dance"}"#, ErrorCode::UnknownOp),
        ("{not json", ErrorCode::BadFrame),
        (
            r#"{"op":"subscribe","topic":"no spaces"}"#,
            ErrorCode::InvalidTopic,
        ),
    ];
    for (text, expected) in probes {
        send_text(&mut rude, text).await;
        match next_frame(&mut rude).await {
            ServerFrame::Error { code, .. } => assert_eq!(code, expected, "{text}"),
            other => panic!("expected an error for {text}, got {other:?}"),
        }
    }
    assert_eq!(expect_closed(&mut rude).await.code, 4500);

    // Binary frames are not part of the topic protocol.
    let mut binary = RawSocket::connect(gw.public, "/ws").expect("raw");
    for _ in 0..3 {
        binary.send_frame(opcode::BINARY, &[1, 2, 3]).expect("send");
    }
    assert_eq!(binary.read_close_code().expect("read"), Some(4500));

    // Nobody else noticed.
    gw.publish("calm", "\"fine\"").expect("publish");
    let (_, offset, data) = next_message(&mut bystander).await;
    assert_eq!((offset, data), (1, serde_json::json!("fine")));
    for (code, expected) in [("1009", 1.0), ("1007", 1.0), ("1002", 2.0), ("4500", 2.0)] {
        let series =
            format!("switchyard_connections_closed_total{{code=\"{code}\",initiator=\"server\"}}");
        assert_eq!(
            gw.wait_metric(&series, expected, STEP).expect("m"),
            expected,
            "{series}"
        );
    }
    assert_eq!(gw.metric("switchyard_connections").expect("m"), 1.0);
}

async fn send_text(conn: &mut Connection, text: &str) {
    conn.send_text(text).await.expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_every_connection_with_1001_and_exits_zero() {
    let mut gw = GatewayProcess::start(&[]).expect("start");
    let mut conns = Vec::new();
    for _ in 0..5 {
        let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
        subscribe(&mut conn, "bye", None).await;
        conns.push(conn);
    }
    gw.interrupt();
    for conn in &mut conns {
        assert_eq!(expect_closed(conn).await.code, 1001);
    }
    let status = gw.wait_exit(Duration::from_secs(15)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_route_echoes_through_the_same_machinery() {
    let gw = GatewayProcess::start(&[
        "echo=true",
        "websocket.max_message_bytes=2048",
        "websocket.max_frame_bytes=2048",
    ])
    .expect("start");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/echo", gw.public))
        .await
        .expect("connect");
    socket.send(Message::text("héllo")).await.expect("send");
    socket
        .send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send");
    let mut echoed = Vec::new();
    while echoed.len() < 2 {
        match socket.next().await {
            Some(Ok(Message::Text(t))) => echoed.push(Message::Text(t)),
            Some(Ok(Message::Binary(b))) => echoed.push(Message::Binary(b)),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        echoed,
        vec![
            Message::text("héllo"),
            Message::binary(vec![0u8, 1, 2, 255])
        ]
    );
    socket
        .send(Message::text("x".repeat(4096)))
        .await
        .expect("send");
    let code = loop {
        match socket.next().await {
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 1009, "the echo route enforces the same limits");

    let off = GatewayProcess::start(&[]).expect("start");
    let (status, _) =
        switchyard_tests::http_request(off.public, "GET", "/echo", None).expect("get");
    assert_eq!(status, 404, "echo is off by default");
}

/// Reads an HTTP response head byte by byte (so nothing after it is taken)
/// and returns it.
async fn read_response_head(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(STEP, tcp.read_u8())
            .await
            .expect("response in time")
            .expect("response byte");
        head.push(byte);
    }
    String::from_utf8(head).expect("ASCII head")
}

fn upgrade_head(gw: &GatewayProcess) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.public
    )
}

async fn next_text(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> serde_json::Value {
    match tokio::time::timeout(STEP, socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(&text).expect("json"),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The gateway answers the first request of a connection itself (the 101
/// and the welcome in one write) and hands anything else to hyper. Both
/// paths must upgrade, and frames a client sends right behind its upgrade
/// head, in the same segment, must be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_served_first_on_a_connection_and_after_other_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;
    let gw = GatewayProcess::start(&[]).expect("start");

    // The head and a ping frame in one write.
    let mut tcp = tokio::net::TcpStream::connect(gw.public)
        .await
        .expect("connect");
    let mut bytes = upgrade_head(&gw).into_bytes();
    bytes.extend(switchyard_tests::client_frame(
        opcode::TEXT,
        br#"{"op":"ping"}"#,
    ));
    tcp.write_all(&bytes).await.expect("write");
    let head = read_response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    let mut first = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    assert_eq!(next_text(&mut first).await["op"], "welcome");
    assert_eq!(next_text(&mut first).await["op"], "pong");

    // A keep-alive request first: the upgrade after it goes through hyper.
    let mut tcp = tokio::net::TcpStream::connect(gw.public)
        .await
        .expect("connect");
    let health = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", gw.public);
    tcp.write_all(health.as_bytes()).await.expect("write");
    let head = read_response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("content-length: 2\r\n"), "{head}");
    let mut body = [0u8; 2];
    tcp.read_exact(&mut body).await.expect("body");
    assert_eq!(&body, b"ok");
    tcp.write_all(upgrade_head(&gw).as_bytes())
        .await
        .expect("write");
    let head = read_response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut second = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let welcome = next_text(&mut second).await;
    assert_eq!(welcome["op"], "welcome");
    second
        .send(Message::text(r#"{"op":"ping"}"#))
        .await
        .expect("send");
    assert_eq!(next_text(&mut second).await["op"], "pong");

    assert_eq!(
        gw.metric("switchyard_connections_opened_total").expect("m"),
        2.0
    );
    // The writer counts a batch after its flush, so the client can read the
    // pong a moment before it is counted: wait for the count, then check
    // that nothing more arrives behind it (a welcome counted twice would).
    let sent = "switchyard_messages_sent_total";
    assert_eq!(
        gw.wait_metric(sent, 4.0, STEP).expect("m"),
        4.0,
        "two welcomes and two pongs, each counted once"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.metric(sent).expect("m"), 4.0, "and nothing after them");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_are_counted_by_initiator_and_logs_carry_the_connection_id() {
    let gw = GatewayProcess::start(&[]).expect("start");
    let mut clean = Connection::connect(&gw.ws_url()).await.expect("connect");
    let id = clean.welcome().connection_id.clone();
    clean.close(1000).await.expect("close");
    assert_eq!(expect_closed(&mut clean).await.code, 1000);

    let abrupt = RawSocket::connect(gw.public, "/ws").expect("raw");
    drop(abrupt);

    let client = "switchyard_connections_closed_total{code=\"1000\",initiator=\"client\"}";
    let gone = "switchyard_connections_closed_total{code=\"1006\",initiator=\"abrupt\"}";
    assert_eq!(gw.wait_metric(client, 1.0, STEP).expect("m"), 1.0);
    assert_eq!(gw.wait_metric(gone, 1.0, STEP).expect("m"), 1.0);
    assert_eq!(
        gw.metric("switchyard_connections_opened_total").expect("m"),
        2.0
    );
    assert_eq!(gw.metric("switchyard_connections").expect("m"), 0.0);

    let ended: Vec<String> = gw
        .logs()
        .into_iter()
        .filter(|line| line.contains("connection ended") && line.contains(&id))
        .collect();
    assert_eq!(ended.len(), 1, "one 'connection ended' line for {id}");
    let event: serde_json::Value = serde_json::from_str(&ended[0]).expect("json log");
    assert_eq!(event["initiator"], "client");
    assert_eq!(event["code"], 1000);
}

#[tokio::test]
async fn invalid_configuration_exits_2_naming_the_field() {
    type Row<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let table: [Row; 13] = [
        (
            &["--set", "connection.keepalive_interval_ms=soon"],
            &[],
            "connection.keepalive_interval_ms",
        ),
        (&[], &[("SWITCHYARD_LISTEN", "nowhere")], "listen"),
        (
            &["--set", "websocket.max_frame_bytes=0"],
            &[],
            "websocket.max_frame_bytes",
        ),
        // Settings only startup can check (files, keys, certificates): the
        // same exit code, the same naming.
        (
            &[
                "--set",
                "admin_listen=0.0.0.0:0",
                "--set",
                "admin.token_file=/nonexistent/admin-token",
            ],
            &[],
            "admin.token_file",
        ),
        (&["--set", "admin.token=short"], &[], "admin.token"),
        (
            &["--set", "auth.jwt.secret_file=/nonexistent/secret"],
            &[],
            "auth.jwt.secret_file",
        ),
        (
            &[
                "--set",
                "tls.cert_file=/nonexistent/cert.pem",
                "--set",
                "tls.key_file=/nonexistent/key.pem",
            ],
            &[],
            "tls",
        ),
        (
            &["--set", "origin.allowed=[\"not an origin\"]"],
            &[],
            "origin.allowed",
        ),
        // The identity provider's keys: HTTPS only, one key source, a CA
        // file that holds a certificate.
        (
            &[
                "--set",
                "auth.jwt.algorithm=RS256",
                "--set",
                "auth.jwt.jwks_url=http://127.0.0.1:9/keys",
            ],
            &[],
            "auth.jwt.jwks_url",
        ),
        (
            &[
                "--set",
                "auth.jwt.algorithm=RS256",
                "--set",
                "auth.jwt.jwks_url=https://user:pw@127.0.0.1:9/keys",
            ],
            &[],
            "auth.jwt.jwks_url",
        ),
        (
            &[
                "--set",
                "auth.jwt.algorithm=RS256",
                "--set",
                "auth.jwt.jwks_url=https://127.0.0.1:9/keys",
                "--set",
                "auth.jwt.jwks_file=/etc/hostname",
            ],
            &[],
            "auth.jwt",
        ),
        (
            &[
                "--set",
                "auth.jwt.algorithm=RS256",
                "--set",
                "auth.jwt.jwks_url=https://127.0.0.1:9/keys",
                "--set",
                "auth.jwt.jwks_ca_file=/etc/hostname",
            ],
            &[],
            "auth.jwt.jwks_ca_file",
        ),
        (
            &[
                "--set",
                "auth.jwt.algorithm=RS256",
                "--set",
                "auth.jwt.jwks_url=https://127.0.0.1:9/keys",
                "--set",
                "auth.jwt.jwks_min_refresh_ms=0",
            ],
            &[],
            "auth.jwt.jwks_refresh_ms",
        ),
    ];
    for (args, env, field) in table {
        let mut child = std::process::Command::new(switchyard_tests::gateway_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?} {env:?}: the gateway started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(field), "{stderr:?} should name {field}");
    }
}

#[test]
fn http_routes_answer_and_bad_upgrades_are_refused_and_counted() {
    let gw = GatewayProcess::start(&[]).expect("start");
    let get =
        |path: &str| switchyard_tests::http_request(gw.public, "GET", path, None).expect(path);
    let (status, page) = get("/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>Switchyard gateway</title>") && page.contains("/switchyard.js"));
    let (status, module) = get("/switchyard.js");
    assert_eq!(status, 200);
    assert!(module.contains("export class SwitchyardClient"));
    assert_eq!(get("/healthz"), (200, "ok".to_owned()));
    assert_eq!(get("/readyz"), (200, "ready".to_owned()));
    assert_eq!(get("/nope").0, 404);
    // A plain GET on /ws is not an upgrade: 426, counted, no connection.
    assert_eq!(get("/ws").0, 426);
    assert_eq!(
        gw.metric("switchyard_handshakes_rejected_total{reason=\"not_upgrade\"}")
            .expect("m"),
        1.0
    );
    assert_eq!(
        gw.metric("switchyard_connections_opened_total").expect("m"),
        0.0
    );
    // Admin API errors are JSON with a status that says what is wrong.
    let (status, body) = gw
        .admin_request("POST", "/api/publish", Some("{\"topic\":1}"))
        .expect("post");
    assert_eq!(status, 400);
    assert!(body.contains("\"error\":\"bad_request\""), "{body}");
    let huge = format!(r#"{{"topic":"t","data":"{}"}}"#, "x".repeat(200_000));
    assert_eq!(
        gw.admin_request("POST", "/api/publish", Some(&huge))
            .expect("post")
            .0,
        413
    );
    assert_eq!(
        gw.admin_request("GET", "/api/publish", None)
            .expect("get")
            .0,
        405
    );
}

/// Issue 27: a client closing with codes of its own choosing (here 60
/// codes across 3000–4999) cannot grow the gateway's series: they count as
/// `other_reconnect` / `other_terminal`, two series in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_close_codes_are_a_bounded_label() {
    let gw = GatewayProcess::start(&[]).expect("start");
    let codes: Vec<u16> = (0..60).map(|i| 3000 + i * 33).collect();
    for code in &codes {
        let mut conn = Connection::connect(&gw.ws_url()).await.expect("connect");
        conn.close(*code).await.expect("close");
        expect_closed(&mut conn).await;
    }
    let reconnect =
        "switchyard_connections_closed_total{code=\"other_reconnect\",initiator=\"client\"}";
    let terminal =
        "switchyard_connections_closed_total{code=\"other_terminal\",initiator=\"client\"}";
    let terminal_codes = codes.iter().filter(|c| **c >= 4500).count() as f64;
    assert_eq!(
        gw.wait_metric(terminal, terminal_codes, STEP).expect("m"),
        terminal_codes
    );
    assert_eq!(
        gw.wait_metric(reconnect, 60.0 - terminal_codes, STEP)
            .expect("m"),
        60.0 - terminal_codes
    );
    let (_, text) =
        switchyard_tests::http_request(gw.public, "GET", "/metrics", None).expect("metrics");
    let series = text
        .lines()
        .filter(|l| {
            l.starts_with("switchyard_connections_closed_total{")
                && l.contains("initiator=\"client\"")
        })
        .count();
    assert_eq!(series, 2, "{text}");
}
