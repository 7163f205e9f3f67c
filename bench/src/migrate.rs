//! `switchyard-load migrate`: connections that follow a drain from blue to
//! green, make-before-break, the way the client libraries do — measured.
//!
//! Each connection subscribes to one topic on blue. On `migrate` it opens a
//! connection to green (the Service has switched), resumes from the last
//! offset it saw, and closes the blue one with 1000 once resumed; on a 4000
//! close it reconnects to green after `retry_ms`. Per connection it records
//! the gap (migrate or close → resumed on green), and at the end whether it
//! saw every offset 1..=expect exactly once after dropping duplicates.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::open;

type Socket = WebSocketStream<crate::Stream>;

/// What one connection observed.
#[derive(Default, Clone)]
struct Outcome {
    moved: bool,
    by_close: bool,
    gap_ms: Option<u64>,
    highest: u64,
    received: u64,
    duplicates: u64,
    green_connected_unix_ms: Option<u64>,
    /// When the gateway's `migrate` (or 4000 close) arrived.
    told_unix_ms: Option<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Reads one frame's worth of state into `outcome`; returns the op seen.
fn on_text(text: &str, outcome: &mut Outcome, epoch: &mut u64) -> &'static str {
    if text.starts_with(r#"{"op":"message""#) {
        if let (Some(e), Some(offset)) = (
            number_after(text, r#""epoch":"#),
            number_after(text, r#""offset":"#),
        ) {
            *epoch = e;
            if offset > outcome.highest {
                // Offsets arrive in order on a connection; across the overlap of
                // two connections, anything not above the highest is a duplicate.
                outcome.received += 1;
                outcome.highest = offset;
            } else {
                outcome.duplicates += 1;
            }
        }
        "message"
    } else if text.starts_with(r#"{"op":"subscribed""#) {
        "subscribed"
    } else if text.starts_with(r#"{"op":"migrate""#) {
        "migrate"
    } else if text.starts_with(r#"{"op":"heartbeat""#) {
        "heartbeat"
    } else if text.starts_with(r#"{"op":"error""#) && text.contains(r#""unavailable""#) {
        "unavailable"
    } else {
        "other"
    }
}

async fn subscribe(socket: &mut Socket, topic: &str, epoch: u64, offset: u64) -> Result<()> {
    let frame = if epoch == 0 {
        format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#)
    } else {
        format!(
            r#"{{"op":"subscribe","topic":"{topic}","since":{{"epoch":{epoch},"offset":{offset}}}}}"#
        )
    };
    socket.send(Message::text(frame)).await?;
    Ok(())
}

/// Opens green, resumes, and returns the socket once `subscribed` arrived;
/// meanwhile keeps reading `old` (if any) so nothing is missed.
async fn resume_on_green(
    green: SocketAddr,
    source: IpAddr,
    topic: &str,
    outcome: &mut Outcome,
    epoch: &mut u64,
    mut old: Option<&mut Socket>,
) -> Result<Socket> {
    let mut new = open(green, source, "/ws").await?;
    outcome.green_connected_unix_ms = Some(unix_ms());
    subscribe(&mut new, topic, *epoch, outcome.highest).await?;
    loop {
        tokio::select! {
            frame = new.next() => match frame {
                Some(Ok(Message::Text(text))) => match on_text(&text, outcome, epoch) {
                    "subscribed" => return Ok(new),
                    "unavailable" => {
                        // The gateway's backplane is reconnecting: ask again.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        subscribe(&mut new, topic, *epoch, outcome.highest).await?;
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                _ => anyhow::bail!("green closed during resume"),
            },
            frame = async { old.as_mut().expect("guarded").next().await }, if old.is_some() => match frame {
                Some(Ok(Message::Text(text))) => { on_text(&text, outcome, epoch); }
                Some(Ok(_)) => {}
                _ => old = None,
            },
        }
    }
}

async fn follow(
    mut socket: Socket,
    green: SocketAddr,
    source: IpAddr,
    topic: Arc<str>,
    expect: u64,
    deadline: Instant,
    subscribed: Arc<AtomicU64>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut epoch = 0;
    if subscribe(&mut socket, &topic, 0, 0).await.is_err() {
        return outcome;
    }
    let mut counted = false;
    while outcome.highest < expect && Instant::now() < deadline {
        let next = tokio::time::timeout_at(deadline.into(), socket.next()).await;
        let frame = match next {
            Ok(Some(Ok(frame))) => frame,
            _ => break,
        };
        match frame {
            Message::Text(text) => match on_text(&text, &mut outcome, &mut epoch) {
                "subscribed" if !counted => {
                    counted = true;
                    subscribed.fetch_add(1, Ordering::Relaxed);
                }
                "migrate" if !outcome.moved => {
                    let started = Instant::now();
                    outcome.told_unix_ms = Some(unix_ms());
                    match resume_on_green(
                        green,
                        source,
                        &topic,
                        &mut outcome,
                        &mut epoch,
                        Some(&mut socket),
                    )
                    .await
                    {
                        Ok(new) => {
                            outcome.gap_ms = Some(started.elapsed().as_millis() as u64);
                            outcome.moved = true;
                            let _ = socket
                                .send(Message::Close(Some(CloseFrame {
                                    code: 1000.into(),
                                    reason: "".into(),
                                })))
                                .await;
                            socket = new;
                        }
                        Err(_) => break,
                    }
                }
                "heartbeat" => {
                    let _ = socket.send(Message::text(r#"{"op":"ping"}"#)).await;
                }
                "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = subscribe(&mut socket, &topic, epoch, outcome.highest).await;
                }
                _ => {}
            },
            Message::Close(frame) if !outcome.moved => {
                let started = Instant::now();
                outcome.told_unix_ms = Some(unix_ms());
                let retry_ms = frame
                    .as_ref()
                    .and_then(|f| number_after(&f.reason, r#""retry_ms":"#))
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                match resume_on_green(green, source, &topic, &mut outcome, &mut epoch, None).await {
                    Ok(new) => {
                        outcome.gap_ms = Some(started.elapsed().as_millis() as u64);
                        outcome.moved = true;
                        outcome.by_close = true;
                        socket = new;
                    }
                    Err(_) => break,
                }
            }
            _ => {}
        }
    }
    outcome
}

/// Options of the `migrate` workload.
pub struct MigrateOptions {
    pub blue: SocketAddr,
    pub green: SocketAddr,
    pub connections: usize,
    pub sources: Vec<IpAddr>,
    pub topic: String,
    pub expect: u64,
    pub timeout: Duration,
    pub ready_file: Option<std::path::PathBuf>,
    pub reconnects_file: Option<std::path::PathBuf>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs the workload and prints one JSON summary line.
pub async fn run(options: MigrateOptions) -> Result<()> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    let subscribed = Arc::new(AtomicU64::new(0));
    let topic: Arc<str> = Arc::from(options.topic.as_str());
    let permits = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(options.connections);
    for i in 0..options.connections {
        let permit = permits.clone().acquire_owned().await?;
        let source = options.sources[i % options.sources.len()];
        let socket = match open(options.blue, source, "/ws").await {
            Ok(socket) => socket,
            Err(err) => {
                eprintln!("connect failed: {err:#}");
                continue;
            }
        };
        drop(permit);
        tasks.push(tokio::spawn(follow(
            socket,
            options.green,
            source,
            topic.clone(),
            options.expect,
            deadline,
            subscribed.clone(),
        )));
    }
    while subscribed.load(Ordering::Relaxed) < tasks.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(path) = &options.ready_file {
        std::fs::write(path, subscribed.load(Ordering::Relaxed).to_string())?;
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_default());
    }
    let mut gaps: Vec<u64> = outcomes.iter().filter_map(|o| o.gap_ms).collect();
    gaps.sort_unstable();
    let complete = outcomes
        .iter()
        .filter(|o| o.received == options.expect)
        .count();
    let lost: u64 = outcomes
        .iter()
        .map(|o| options.expect.saturating_sub(o.received))
        .sum();
    if let Some(path) = &options.reconnects_file {
        let times: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.green_connected_unix_ms)
            .map(|t| t.to_string())
            .collect();
        std::fs::write(path, times.join("\n"))?;
        let told: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.told_unix_ms)
            .map(|t| t.to_string())
            .collect();
        std::fs::write(path.with_extension("told"), told.join("\n"))?;
    }
    println!(
        "{}",
        serde_json::json!({
            "workload": "migrate",
            "connections": outcomes.len(),
            "moved": outcomes.iter().filter(|o| o.moved).count(),
            "moved_by_close": outcomes.iter().filter(|o| o.by_close).count(),
            "complete": complete,
            "messages_expected_per_connection": options.expect,
            "lost": lost,
            "duplicates_dropped": outcomes.iter().map(|o| o.duplicates).sum::<u64>(),
            "gap_ms": { "p50": percentile(&gaps, 0.5), "p99": percentile(&gaps, 0.99), "max": percentile(&gaps, 1.0) },
            "elapsed_secs": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
