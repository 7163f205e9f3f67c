//! The Rust client's session (client/src/session.rs) against a scripted
//! gateway over real sockets: each break issue 24 found in the Rust client
//! is a sequence here — close codes before `welcome`, a gateway that
//! accepts and drops, silence, a terminal close during a migration, a
//! resync on the new side of one, frames of a later protocol version, and
//! the old connection left unread while the new one is dialled.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use switchyard_client::policy::Backoff;
use switchyard_client::{Client, ClientEvent, ClientOptions, Credential, CredentialSource};
use switchyard_protocol::{CloseClass, Position};
use switchyard_tests::{FakeConn, FakeGateway};

const WAIT: Duration = Duration::from_secs(5);

fn options(gateway: &FakeGateway) -> ClientOptions {
    let mut options = ClientOptions::new(gateway.url());
    options.backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(5),
        abnormal_window: Duration::from_secs(2),
    };
    options
}

async fn next(client: &mut Client) -> ClientEvent {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("an event within 5 s")
        .expect("the session is running")
}

/// The next event that `wanted` picks, skipping others.
async fn until<T>(client: &mut Client, wanted: impl Fn(&ClientEvent) -> Option<T>) -> T {
    loop {
        let event = next(client).await;
        if let Some(found) = wanted(&event) {
            return found;
        }
    }
}

fn disconnected(event: &ClientEvent) -> Option<(u16, CloseClass, Duration)> {
    match event {
        ClientEvent::Disconnected {
            code,
            class,
            retry_in,
        } => Some((*code, *class, *retry_in)),
        _ => None,
    }
}

/// Welcomes `conn` as `server` and confirms `topics` at epoch 7.
async fn welcome(conn: &mut FakeConn, server: &str, topics: &[&str]) {
    conn.welcome(server, 25_000).await.expect("welcome");
    for topic in topics {
        conn.expect("subscribe", Some(topic))
            .await
            .expect("subscribe");
        conn.subscribed(topic, 7, 0, true)
            .await
            .expect("subscribed");
    }
}

#[tokio::test]
async fn break_5_close_codes_before_welcome_are_acted_on() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let fetched = Arc::new(AtomicUsize::new(0));
    let counter = fetched.clone();
    let mut options = options(&gateway);
    options.credentials = Some(CredentialSource::new(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Ok(Credential::Ticket(format!("ticket{n}"))) })
    }));
    let mut client = Client::start(options);

    // Overloaded: come back in 700 ms.
    let mut first = gateway.next(WAIT).await.expect("connection");
    assert!(first.uri.ends_with("ticket=ticket1"), "{}", first.uri);
    first
        .close(4003, r#"{"retry_ms": 700}"#)
        .await
        .expect("close");
    let (code, class, retry) = until(&mut client, disconnected).await;
    assert_eq!(
        (code, class, retry),
        (4003, CloseClass::Reconnect, Duration::from_millis(700))
    );
    // Credentials refused: a fresh one for the next connection.
    let mut second = gateway.next(WAIT).await.expect("connection");
    assert!(second.uri.ends_with("ticket=ticket2"), "{}", second.uri);
    second.close(4501, "").await.expect("close");
    let (code, class, _) = until(&mut client, disconnected).await;
    assert_eq!((code, class), (4501, CloseClass::Reauthenticate));
    let mut third = gateway.next(WAIT).await.expect("connection");
    assert!(third.uri.ends_with("ticket=ticket3"), "{}", third.uri);
    // Revoked: the session ends, nothing reconnects.
    third.close(4503, "").await.expect("close");
    let stopped = until(&mut client, |e| match e {
        ClientEvent::Stopped { code } => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(stopped, 4503);
    assert!(!gateway.connects_within(Duration::from_millis(1500)).await);
    assert_eq!(fetched.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn break_6_the_backoff_grows_while_the_gateway_accepts_and_drops() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut options = options(&gateway);
    options.healthy = Duration::from_millis(400);
    let backoff = options.backoff;
    let mut client = Client::start(options);
    client.subscribe("t1");
    let mut waits = Vec::new();
    for round in 0..8 {
        let mut conn = gateway
            .next(Duration::from_secs(10))
            .await
            .expect("connection");
        welcome(&mut conn, &format!("g{round}"), &["t1"]).await;
        conn.close(1011, "").await.expect("close");
        let (code, _, retry) = until(&mut client, disconnected).await;
        assert_eq!(code, 1011);
        waits.push(retry);
    }
    for (attempt, wait) in waits.iter().enumerate() {
        assert!(
            *wait <= backoff.ceiling(attempt as u32),
            "attempt {attempt}: {waits:?}"
        );
    }
    // Full jitter: with the ceiling doubling, eight waits all under the
    // first ceiling happen about once in 10^9 runs; a backoff that starts
    // over at every welcome never leaves it.
    assert!(
        waits.iter().any(|w| *w > Duration::from_millis(100)),
        "the backoff never grew: {waits:?}"
    );
    // A connection that stayed up starts it over.
    let mut healthy = gateway
        .next(Duration::from_secs(10))
        .await
        .expect("connection");
    welcome(&mut healthy, "ok", &["t1"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    healthy.close(1011, "").await.expect("close");
    let (_, _, retry) = until(&mut client, disconnected).await;
    assert!(retry <= Duration::from_millis(100), "{retry:?}");
}

#[tokio::test]
async fn break_7_a_silent_connection_is_taken_as_dead() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut client = Client::start(options(&gateway));
    let mut conn = gateway.next(WAIT).await.expect("connection");
    conn.welcome("a", 300).await.expect("welcome");
    // Half-open: the gateway says nothing more (and reads nothing).
    let (code, class, _) = until(&mut client, disconnected).await;
    assert_eq!((code, class), (1006, CloseClass::Reconnect));
    assert!(gateway.connects_within(WAIT).await, "and it reconnects");
    drop(conn);
}

#[tokio::test]
async fn break_4_a_terminal_close_of_the_old_side_during_a_migration_stops() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut client = Client::start(options(&gateway));
    client.subscribe("t1");
    let mut old = gateway.next(WAIT).await.expect("connection");
    welcome(&mut old, "a", &["t1"]).await;
    old.send(json!({"op": "migrate", "grace_ms": 5000}))
        .await
        .expect("migrate");
    let mut new = gateway.next(WAIT).await.expect("the new connection");
    new.welcome("b", 25_000).await.expect("welcome");
    new.expect("subscribe", Some("t1"))
        .await
        .expect("subscribe");
    // Revoked while the new side has not confirmed yet.
    old.close(4503, r#"{"reason": "revoked"}"#)
        .await
        .expect("close");
    let stopped = until(&mut client, |e| match e {
        ClientEvent::Stopped { code } => Some(*code),
        ClientEvent::Migrated { .. } => Some(0),
        _ => None,
    })
    .await;
    assert_eq!(stopped, 4503, "the session ended, not migrated");
    assert!(
        new.closed_by_client().await.is_ok(),
        "the new side is closed"
    );
    assert!(!gateway.connects_within(Duration::from_millis(1500)).await);
}

#[tokio::test]
async fn break_8_a_resync_on_the_new_side_ends_the_old_sides_stream_of_that_topic() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut client = Client::start(options(&gateway));
    client.subscribe("t1");
    client.subscribe("t2");
    let mut old = gateway.next(WAIT).await.expect("connection");
    welcome(&mut old, "a", &["t1", "t2"]).await;
    for offset in 1..=5 {
        old.message("t1", 7, offset).await.expect("message");
    }
    old.send(json!({"op": "migrate", "grace_ms": 5000}))
        .await
        .expect("migrate");
    let mut new = gateway.next(WAIT).await.expect("the new connection");
    new.welcome("b", 25_000).await.expect("welcome");
    new.expect("subscribe", Some("t2"))
        .await
        .expect("subscribes");
    // t1's history was trimmed on the new side: it restarts at (7, 3).
    new.subscribed("t1", 7, 3, false).await.expect("resync");
    let mut seen = Vec::new();
    let label = |event: &ClientEvent| match event {
        ClientEvent::Message {
            topic, position, ..
        } if topic == "t1" => Some(format!("{}:{}", position.epoch, position.offset)),
        ClientEvent::Resumed { topic, recovered } if topic == "t1" => {
            Some(format!("resumed {recovered}"))
        }
        ClientEvent::Migrated { .. } => Some("migrated".into()),
        _ => None,
    };
    while seen.last().map(String::as_str) != Some("resumed false") {
        if let Some(text) = label(&next(&mut client).await) {
            seen.push(text);
        }
    }
    // The old side goes on with t1 after the resync point was announced.
    old.message("t1", 7, 6).await.expect("late old message");
    new.message("t1", 7, 4).await.expect("message");
    new.subscribed("t2", 7, 0, true).await.expect("subscribed");
    while !seen.contains(&"7:4".to_string()) || !seen.contains(&"migrated".to_string()) {
        if let Some(text) = label(&next(&mut client).await) {
            seen.push(text);
        }
    }
    let after_resync: Vec<&str> = seen
        .iter()
        .map(String::as_str)
        .skip_while(|s| *s != "resumed false")
        .filter(|s| *s != "migrated")
        .collect();
    assert_eq!(after_resync, ["resumed false", "7:4"], "{seen:?}");
}

#[tokio::test]
async fn break_9_frames_of_a_later_protocol_are_ignored_and_publish_after_stop_fails() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut client = Client::start(options(&gateway));
    client.subscribe("t1");
    let mut conn = gateway.next(WAIT).await.expect("connection");
    welcome(&mut conn, "a", &["t1"]).await;
    conn.send_raw("null").await.expect("null");
    conn.send(json!({"op": "from-the-future", "x": 1}))
        .await
        .expect("unknown op");
    conn.send(json!({"op": "error", "code": "new_kind", "message": "m"}))
        .await
        .expect("unknown error code");
    conn.send_binary(b"\x00\x01").await.expect("binary");
    conn.message("t1", 7, 1).await.expect("message");
    let first = until(&mut client, |e| match e {
        ClientEvent::Message { position, .. } => Some(Ok(*position)),
        ClientEvent::Disconnected { code, .. } => Some(Err(*code)),
        _ => None,
    })
    .await;
    assert_eq!(
        first,
        Ok(Position::new(7, 1)),
        "no reconnect on frames it does not know"
    );
    client.close();
    until(&mut client, |e| match e {
        ClientEvent::Stopped { .. } => Some(()),
        _ => None,
    })
    .await;
    let data = serde_json::value::RawValue::from_string("1".into()).expect("json");
    assert!(
        client.publish("t1", data).is_err(),
        "publish after stopped fails"
    );
}

#[tokio::test]
async fn break_9_the_old_connection_is_read_while_the_new_one_is_dialled() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut client = Client::start(options(&gateway));
    client.subscribe("t1");
    let mut old = gateway.next(WAIT).await.expect("connection");
    welcome(&mut old, "a", &["t1"]).await;
    gateway.hold_upgrades(true);
    old.send(json!({"op": "migrate", "grace_ms": 5000}))
        .await
        .expect("migrate");
    for offset in 1..=3 {
        old.message("t1", 7, offset).await.expect("message");
    }
    for offset in 1..=3 {
        let position = until(&mut client, |e| match e {
            ClientEvent::Message { position, .. } => Some(*position),
            _ => None,
        })
        .await;
        assert_eq!(
            position,
            Position::new(7, offset),
            "delivered while dialling"
        );
    }
    gateway.hold_upgrades(false);
    let mut new = gateway.next(WAIT).await.expect("the new connection");
    welcome(&mut new, "b", &["t1"]).await;
    until(&mut client, |e| match e {
        ClientEvent::Migrated { .. } => Some(()),
        _ => None,
    })
    .await;
}

/// A gateway that dies (its TCP connection ends with no close frame: 1006)
/// after the connection stayed up: the first wait spans the 2 s abnormal
/// window rather than the backoff's 100 ms, so a crashed pod's clients
/// spread their return; a second crash before the connection is healthy
/// gets the backoff (attempt 1: at most 200 ms), not the window again.
#[tokio::test]
async fn after_a_crash_the_first_retry_spans_the_abnormal_window() {
    let mut gateway = FakeGateway::start().await.expect("gateway");
    let mut options = options(&gateway);
    options.healthy = Duration::from_millis(100);
    let mut client = Client::start(options);
    client.subscribe("t1");
    let mut first_waits = Vec::new();
    for round in 0..6 {
        let mut conn = gateway.next(WAIT).await.expect("connection");
        welcome(&mut conn, &format!("g{round}"), &["t1"]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        conn.drop_tcp();
        let (code, _, retry) = until(&mut client, disconnected).await;
        assert_eq!(code, 1006);
        assert!(retry <= Duration::from_secs(2), "{retry:?}");
        first_waits.push(retry);
    }
    // Uniform over 2 s: six waits all within the backoff's first 100 ms
    // happen once in 6.4·10^7 runs.
    assert!(
        first_waits.iter().any(|w| *w > Duration::from_millis(100)),
        "{first_waits:?}"
    );
    // Crashed again before it was healthy: the backoff's attempt 1.
    let mut conn = gateway.next(WAIT).await.expect("connection");
    welcome(&mut conn, "quick", &["t1"]).await;
    conn.drop_tcp();
    let (code, _, retry) = until(&mut client, disconnected).await;
    assert_eq!(code, 1006);
    assert!(retry <= Duration::from_millis(200), "{retry:?}");
}
