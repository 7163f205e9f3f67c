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
use tokio::sync::Semaphore;

use crate::wire::{self, Socket};
use crate::{is_heartbeat, leading_number, open};

/// What one connection observed.
#[derive(Default, Clone)]
struct Outcome {
    moved: bool,
    by_close: bool,
    gap_ms: Option<u64>,
    tally: Tally,
    green_connected_unix_ms: Option<u64>,
    /// When the gateway's `migrate` (or 4000 close) arrived.
    told_unix_ms: Option<u64>,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn number_after(text: &[u8], key: &str) -> Option<u64> {
    let start = memchr::memmem::find(text, key.as_bytes())? + key.len();
    leading_number(&text[start..])
}

/// The messages of one topic a connection (or its successors) has seen.
#[derive(Default, Clone, Copy)]
pub(crate) struct Tally {
    /// The highest offset delivered.
    pub(crate) highest: u64,
    /// Messages delivered once.
    pub(crate) received: u64,
    /// Messages at or below `highest`, dropped.
    pub(crate) duplicates: u64,
}

impl Tally {
    /// Counts a `message` frame (`text`) and notes its epoch in `epoch`.
    pub(crate) fn message(&mut self, text: &[u8], epoch: &mut u64) {
        if let (Some(e), Some(offset)) = (
            number_after(text, r#""epoch":"#),
            number_after(text, r#""offset":"#),
        ) {
            *epoch = e;
            if offset > self.highest {
                // Offsets arrive in order on a connection; across the overlap of
                // two connections, anything not above the highest is a duplicate.
                self.received += 1;
                self.highest = offset;
            } else {
                self.duplicates += 1;
            }
        }
    }
}

/// Reads one frame's worth of state into `outcome`; returns the op seen.
fn on_text(text: &[u8], outcome: &mut Outcome, epoch: &mut u64) -> &'static str {
    if text.starts_with(br#"{"op":"message""#) {
        outcome.tally.message(text, epoch);
        "message"
    } else if text.starts_with(br#"{"op":"subscribed""#) {
        "subscribed"
    } else if text.starts_with(br#"{"op":"migrate""#) {
        "migrate"
    } else if is_heartbeat(text) {
        "heartbeat"
    } else if text.starts_with(br#"{"op":"error""#)
        && memchr::memmem::find(text, br#""unavailable""#).is_some()
    {
        "unavailable"
    } else {
        "other"
    }
}

/// What one frame asks of its connection, owned so that the socket the
/// frame was borrowed from is free for the answer.
enum Event {
    /// A text frame: the op `on_text` saw.
    Op(&'static str),
    /// A ping, to be answered with a pong carrying its payload.
    Ping(Vec<u8>),
    /// The server's close: its code (echoed back) and the `retry_ms` of its
    /// reason (0 when absent).
    Close { code: [u8; 2], retry_ms: u64 },
    /// Anything else (binary, pong).
    Other,
}

impl Event {
    fn of(frame: &wire::Frame<'_>, outcome: &mut Outcome, epoch: &mut u64) -> Event {
        match frame.opcode {
            wire::TEXT => Event::Op(on_text(frame.payload, outcome, epoch)),
            wire::PING => Event::Ping(frame.payload.to_vec()),
            wire::CLOSE => {
                let (code, reason) = match frame.payload {
                    [high, low, reason @ ..] => ([*high, *low], reason),
                    _ => (1000u16.to_be_bytes(), &[][..]),
                };
                let retry_ms = number_after(reason, r#""retry_ms":"#).unwrap_or(0);
                Event::Close { code, retry_ms }
            }
            _ => Event::Other,
        }
    }
}

pub(crate) async fn subscribe(
    socket: &mut Socket,
    topic: &str,
    epoch: u64,
    offset: u64,
) -> Result<()> {
    let frame = if epoch == 0 {
        format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#)
    } else {
        format!(
            r#"{{"op":"subscribe","topic":"{topic}","since":{{"epoch":{epoch},"offset":{offset}}}}}"#
        )
    };
    socket.send(wire::TEXT, frame.as_bytes()).await
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
    subscribe(&mut new, topic, *epoch, outcome.tally.highest).await?;
    loop {
        tokio::select! {
            frame = new.next() => match frame {
                Ok(Some(frame)) if frame.opcode == wire::TEXT => {
                    match on_text(frame.payload, outcome, epoch) {
                        "subscribed" => return Ok(new),
                        "unavailable" => {
                            // The gateway's backplane is reconnecting: ask again.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            subscribe(&mut new, topic, *epoch, outcome.tally.highest).await?;
                        }
                        _ => {}
                    }
                }
                Ok(Some(frame)) if frame.opcode != wire::CLOSE => {}
                _ => anyhow::bail!("green closed during resume"),
            },
            frame = async { old.as_mut().expect("guarded").next().await }, if old.is_some() => match frame {
                Ok(Some(frame)) if frame.opcode == wire::TEXT => {
                    on_text(frame.payload, outcome, epoch);
                }
                Ok(Some(frame)) if frame.opcode != wire::CLOSE => {}
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
    while outcome.tally.highest < expect && Instant::now() < deadline {
        let next = tokio::time::timeout_at(deadline.into(), socket.next()).await;
        let event = match next {
            Ok(Ok(Some(frame))) => Event::of(&frame, &mut outcome, &mut epoch),
            _ => break,
        };
        match event {
            Event::Op("subscribed") if !counted => {
                counted = true;
                subscribed.fetch_add(1, Ordering::Relaxed);
            }
            Event::Op("migrate") if !outcome.moved => {
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
                        let _ = socket.send(wire::CLOSE, &1000u16.to_be_bytes()).await;
                        socket = new;
                    }
                    Err(_) => break,
                }
            }
            Event::Op("heartbeat") => {
                let _ = socket.send(wire::TEXT, br#"{"op":"ping"}"#).await;
            }
            Event::Op("unavailable") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = subscribe(&mut socket, &topic, epoch, outcome.tally.highest).await;
            }
            Event::Ping(payload) => {
                let _ = socket.send(wire::PONG, &payload).await;
            }
            Event::Close { code, retry_ms } if !outcome.moved => {
                let started = Instant::now();
                outcome.told_unix_ms = Some(unix_ms());
                // Complete the close handshake, as a client library does.
                let _ = socket.send(wire::CLOSE, &code).await;
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
            Event::Close { .. } => break,
            Event::Op(_) | Event::Other => {}
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

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Opens `count` connections to `target` from `sources` in turn, 256
/// handshakes at a time, and hands each (with its source) to `spawn`; a
/// connection that fails is reported and skipped.
pub(crate) async fn open_each<T>(
    target: SocketAddr,
    sources: &[IpAddr],
    count: usize,
    mut spawn: impl FnMut(Socket, IpAddr) -> tokio::task::JoinHandle<T>,
) -> Result<Vec<tokio::task::JoinHandle<T>>> {
    let permits = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let source = sources[i % sources.len()];
        match open(target, source, "/ws").await {
            Ok(socket) => tasks.push(spawn(socket, source)),
            Err(err) => eprintln!("connect failed: {err:#}"),
        }
        drop(permit);
    }
    Ok(tasks)
}

/// Runs the workload and prints one JSON summary line.
pub async fn run(options: MigrateOptions) -> Result<()> {
    let started = Instant::now();
    let deadline = started + options.timeout;
    let subscribed = Arc::new(AtomicU64::new(0));
    let topic: Arc<str> = Arc::from(options.topic.as_str());
    let tasks = open_each(
        options.blue,
        &options.sources,
        options.connections,
        |socket, source| {
            tokio::spawn(follow(
                socket,
                options.green,
                source,
                topic.clone(),
                options.expect,
                deadline,
                subscribed.clone(),
            ))
        },
    )
    .await?;
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
        .filter(|o| o.tally.received == options.expect)
        .count();
    let lost: u64 = outcomes
        .iter()
        .map(|o| options.expect.saturating_sub(o.tally.received))
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
            "duplicates_dropped": outcomes.iter().map(|o| o.tally.duplicates).sum::<u64>(),
            "gap_ms": { "p50": percentile(&gaps, 0.5), "p99": percentile(&gaps, 0.99), "max": percentile(&gaps, 1.0) },
            "elapsed_secs": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
