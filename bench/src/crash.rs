//! `switchyard-load crash`: connections whose gateway dies, reconnecting
//! the way the client libraries do — measured.
//!
//! Each connection subscribes to one topic. When its socket ends without a
//! close frame (the gateway was killed), it waits a uniformly random time
//! over `first_retry_ms` (the clients' abnormal-close window; 100 stands for
//! the clients before it, whose first wait was the backoff's), then backs
//! off 100 ms doubling to 10 s between failed attempts; a 4003 (or any
//! close) with `retry_ms` is waited out as told. It reconnects to the same
//! address (several gateways share it with SO_REUSEPORT, the kernel's
//! stand-in for a Service) and resumes from the last offset it saw.
//! Meanwhile the survivors' `/admin/status` is sampled every 100 ms for
//! their connection counts and sheds. One JSON summary line at the end.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::migrate::{number_after, open_each, percentile, subscribe, unix_ms, Tally};
use crate::{is_heartbeat, open, wire};

/// What one connection observed.
#[derive(Default, Clone)]
struct Outcome {
    /// When its connection ended without a close frame (unix ms).
    crashed_unix_ms: Option<u64>,
    /// When it had resumed on another gateway after that (unix ms).
    resumed_unix_ms: Option<u64>,
    /// Closes with 4003 (shed) seen while coming back.
    shed: u64,
    /// Attempts that failed before a handshake (refused, reset, TLS dropped).
    failed_attempts: u64,
    tally: Tally,
}

/// Options of the `crash` workload.
pub struct CrashOptions {
    pub target: SocketAddr,
    pub connections: usize,
    pub sources: Vec<IpAddr>,
    pub topic: String,
    pub expect: u64,
    pub first_retry_ms: u64,
    pub watch: Vec<SocketAddr>,
    pub timeout: Duration,
    pub ready_file: Option<std::path::PathBuf>,
}

/// The wait before reconnect attempt `attempt` after an abnormal close.
fn abnormal_wait(attempt: u32, first_retry_ms: u64) -> Duration {
    let ceiling = if attempt == 0 {
        first_retry_ms
    } else {
        (100u64 << attempt.min(7)).min(10_000)
    };
    Duration::from_millis((ceiling as f64 * rand::random::<f64>()) as u64)
}

/// One connection's life: subscribe, follow, come back after crashes.
async fn follow(
    options: Arc<CrashOptions>,
    source: IpAddr,
    mut socket: wire::Socket,
    subscribed: Arc<AtomicU64>,
    deadline: Instant,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut epoch = 0;
    let mut attempt: u32 = 0;
    let mut counted = false;
    loop {
        if subscribe(&mut socket, &options.topic, epoch, outcome.tally.highest)
            .await
            .is_err()
        {
            return outcome;
        }
        // Reads until the connection ends: Some(retry_ms) after a close
        // frame, None after an abnormal end.
        let ended: Option<u64> = loop {
            if outcome.tally.highest >= options.expect {
                return outcome;
            }
            let frame = match tokio::time::timeout_at(deadline.into(), socket.next()).await {
                Err(_) => return outcome,
                Ok(Ok(Some(frame))) => frame,
                Ok(_) => break None,
            };
            match frame.opcode {
                wire::TEXT => {
                    let text = frame.payload;
                    if text.starts_with(br#"{"op":"message""#) {
                        outcome.tally.message(text, &mut epoch);
                    } else if text.starts_with(br#"{"op":"subscribed""#) {
                        attempt = 0;
                        if !counted {
                            counted = true;
                            subscribed.fetch_add(1, Ordering::Relaxed);
                        } else if outcome.crashed_unix_ms.is_some()
                            && outcome.resumed_unix_ms.is_none()
                        {
                            outcome.resumed_unix_ms = Some(unix_ms());
                        }
                    } else if is_heartbeat(text) {
                        let _ = socket.send(wire::TEXT, br#"{"op":"ping"}"#).await;
                    }
                }
                wire::PING => {
                    let payload = frame.payload.to_vec();
                    let _ = socket.send(wire::PONG, &payload).await;
                }
                wire::CLOSE => {
                    let (code, reason) = match frame.payload {
                        [high, low, reason @ ..] => ([*high, *low], reason),
                        _ => (1005u16.to_be_bytes(), &[][..]),
                    };
                    let retry_ms = number_after(reason, r#""retry_ms":"#);
                    if u16::from_be_bytes(code) == 4003 {
                        outcome.shed += 1;
                    }
                    let _ = socket.send(wire::CLOSE, &code).await;
                    break Some(retry_ms.unwrap_or(100));
                }
                _ => {}
            }
        };
        let mut wait = match ended {
            Some(retry_ms) => Duration::from_millis(retry_ms),
            None => {
                if outcome.crashed_unix_ms.is_none() {
                    outcome.crashed_unix_ms = Some(unix_ms());
                }
                let wait = abnormal_wait(attempt, options.first_retry_ms);
                attempt += 1;
                wait
            }
        };
        socket = loop {
            tokio::time::sleep(wait).await;
            if Instant::now() > deadline {
                return outcome;
            }
            match open(options.target, source, "/ws").await {
                Ok(socket) => break socket,
                Err(_) => {
                    outcome.failed_attempts += 1;
                    wait = abnormal_wait(attempt, options.first_retry_ms);
                    attempt += 1;
                }
            }
        };
    }
}

/// `/admin/status` of `admin`: (connections, shed_total).
fn admin_status(admin: SocketAddr) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        stream,
        "GET /admin/status HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let connections = number_after(&answer, r#""connections":"#)?;
    let shed = number_after(&answer, r#""shed_total":"#).unwrap_or(0);
    Some((connections, shed))
}

/// Samples of one survivor: (seconds since the start, connections, shed).
type Samples = Vec<(f64, u64, u64)>;

/// The most connections a survivor gained within any second.
fn peak_per_second(samples: &Samples) -> u64 {
    let mut peak = 0;
    for (i, &(t0, c0, _)) in samples.iter().enumerate() {
        for &(t1, c1, _) in &samples[i + 1..] {
            if t1 - t0 > 1.0 {
                break;
            }
            peak = peak.max(c1.saturating_sub(c0));
        }
    }
    peak
}

/// Runs the workload and prints one JSON summary line.
pub async fn run(options: CrashOptions) -> Result<()> {
    let options = Arc::new(options);
    let started = Instant::now();
    let deadline = started + options.timeout;
    let subscribed = Arc::new(AtomicU64::new(0));
    let tasks = open_each(
        options.target,
        &options.sources,
        options.connections,
        |socket, source| {
            tokio::spawn(follow(
                options.clone(),
                source,
                socket,
                subscribed.clone(),
                deadline,
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
    let samples: Arc<Mutex<Vec<Samples>>> =
        Arc::new(Mutex::new(vec![Vec::new(); options.watch.len()]));
    let sampling = {
        let (samples, watch) = (samples.clone(), options.watch.clone());
        tokio::task::spawn_blocking(move || {
            while Instant::now() < deadline {
                for (i, admin) in watch.iter().enumerate() {
                    let at = started.elapsed().as_secs_f64();
                    if let Some((connections, shed)) = admin_status(*admin) {
                        let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
                        samples[i].push((at, connections, shed));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_default());
    }
    sampling.abort();
    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first_crash = outcomes.iter().filter_map(|o| o.crashed_unix_ms).min();
    let mut resume: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| Some(o.resumed_unix_ms? - o.crashed_unix_ms?))
        .collect();
    resume.sort_unstable();
    let mut back: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| Some(o.resumed_unix_ms? - first_crash?))
        .collect();
    back.sort_unstable();
    let crashed = outcomes
        .iter()
        .filter(|o| o.crashed_unix_ms.is_some())
        .count();
    let lost: u64 = outcomes
        .iter()
        .map(|o| options.expect.saturating_sub(o.tally.received))
        .sum();
    let survivors: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            let shed = match (s.first(), s.last()) {
                (Some(first), Some(last)) => last.2 - first.2,
                _ => 0,
            };
            serde_json::json!({ "peak_accepted_per_s": peak_per_second(s), "shed": shed })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "workload": "crash",
            "connections": outcomes.len(),
            "crashed": crashed,
            "resumed": resume.len(),
            "back_ms": { "p50": percentile(&back, 0.5), "p99": percentile(&back, 0.99), "max": percentile(&back, 1.0) },
            "time_to_resume_ms": { "p50": percentile(&resume, 0.5), "p99": percentile(&resume, 0.99) },
            "shed_seen": outcomes.iter().map(|o| o.shed).sum::<u64>(),
            "failed_attempts": outcomes.iter().map(|o| o.failed_attempts).sum::<u64>(),
            "survivors": survivors,
            "messages_expected_per_connection": options.expect,
            "lost": lost,
            "duplicates_dropped": outcomes.iter().map(|o| o.tally.duplicates).sum::<u64>(),
            "elapsed_secs": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
