//! `switchyard-load`: the load generator behind `bench/*.sh`.
//!
//! - `idle`: opens N WebSocket connections from several 127.0.0.x source
//!   addresses (past the 64k-ports-per-address limit), answers keepalives, and
//!   holds them until told to stop. Prints a JSON summary line.
//! - `fanout`: N subscribers on one topic, a publisher at a fixed rate through
//!   the admin API; every message carries its publish time, so each delivery
//!   yields a publish→receive latency. Prints delivered/s and p50/p99/p999.
//! - `rss`: the summed resident set size of some processes, in KiB.
//!
//! Each process raises its own RLIMIT_NOFILE to the hard limit; one process
//! can hold about 19,900 sockets here, so larger runs use several processes.

mod crash;
mod migrate;
mod stream;
mod wire;

use stream::Stream;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use switchyard_host::{raise_fd_limit, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(
    name = "switchyard-load",
    about = "Load generator for Switchyard and its peers"
)]
struct Args {
    /// A JWT sent as `Authorization: Bearer` on every WebSocket handshake
    /// (measures handshakes against a gateway that verifies tokens).
    #[arg(long, global = true, env = "SWITCHYARD_LOAD_BEARER")]
    bearer: Option<String>,
    /// Connect with TLS (wss://), trusting the CA certificate in this PEM file.
    #[arg(long, global = true)]
    tls_ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The `Authorization` header every handshake carries, when `--bearer` is given.
static AUTHORIZATION: std::sync::OnceLock<tokio_tungstenite::tungstenite::http::HeaderValue> =
    std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Command {
    /// Hold N idle connections.
    Idle {
        /// Gateway address (host:port).
        #[arg(long)]
        target: SocketAddr,
        /// Request path.
        #[arg(long, default_value = "/ws")]
        path: String,
        /// Connections to open.
        #[arg(long)]
        connections: usize,
        /// Source addresses, round robin (e.g. 127.0.0.2,127.0.0.3).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Seconds to hold the connections after all are open.
        #[arg(long, default_value_t = 10)]
        hold_secs: u64,
        /// File created once every connection is open (for orchestration).
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
    },
    /// Fan-out throughput and latency.
    Fanout {
        /// Gateway public address (host:port).
        #[arg(long)]
        target: SocketAddr,
        /// Gateway admin address (host:port) for POST /api/publish.
        #[arg(long)]
        admin: SocketAddr,
        /// Subscribers.
        #[arg(long)]
        subscribers: usize,
        /// Messages published per second.
        #[arg(long)]
        rate: u64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
        /// Payload padding bytes per message.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Topic.
        #[arg(long, default_value = "bench")]
        topic: String,
        /// Source addresses, round robin.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        /// Protocol: `switchyard` subscribes with an op; `raw` expects every
        /// connection to receive every publish without subscribing (peers).
        #[arg(long, default_value = "switchyard")]
        protocol: String,
    },
    /// Connections that follow a drain from blue to green (make-before-break
    /// on `migrate`, reconnect after `retry_ms` on 4000), with gap and loss accounting.
    Migrate {
        /// Blue (draining) gateway address.
        #[arg(long)]
        blue: SocketAddr,
        /// Green gateway address (where the Service points after the switch).
        #[arg(long)]
        green: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        connections: usize,
        /// Source addresses, round robin.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        /// Topic.
        #[arg(long, default_value = "migrate")]
        topic: String,
        /// Messages that will be published (each connection must see 1..=expect).
        #[arg(long)]
        expect: u64,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// File created once every connection has subscribed.
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
        /// File receiving the unix-ms time of each connection's arrival on green.
        #[arg(long)]
        reconnects_file: Option<std::path::PathBuf>,
    },
    /// Connections whose gateway is killed: they come back the way the
    /// clients do (a random first wait over `first_retry_ms`, then backoff;
    /// `retry_ms` honoured) to the same address, resume, and are measured.
    Crash {
        /// The address the gateways share (SO_REUSEPORT).
        #[arg(long)]
        target: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        connections: usize,
        /// Source addresses, round robin.
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
        sources: Vec<IpAddr>,
        /// Topic.
        #[arg(long, default_value = "crash")]
        topic: String,
        /// Messages that will be published (each connection must see 1..=expect).
        #[arg(long)]
        expect: u64,
        /// The first wait after an abnormal close is uniform over this (ms).
        #[arg(long, default_value_t = 2000)]
        first_retry_ms: u64,
        /// Admin addresses of the survivors, sampled every 100 ms.
        #[arg(long, value_delimiter = ',')]
        watch: Vec<SocketAddr>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// File created once every connection has subscribed.
        #[arg(long)]
        ready_file: Option<std::path::PathBuf>,
    },
    /// Publishes `count` messages at `rate` per second through the admin API.
    Publish {
        /// Admin address.
        #[arg(long)]
        admin: SocketAddr,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// Messages per second.
        #[arg(long)]
        rate: u64,
        /// Messages in all.
        #[arg(long)]
        count: u64,
    },
    /// Summed VmRSS of processes, in KiB.
    Rss {
        /// Process ids.
        pids: Vec<u32>,
    },
}

/// A connection to `target` from `source` (TLS when `--tls-ca` is given).
async fn connect(target: SocketAddr, source: IpAddr) -> Result<Stream> {
    let socket = TcpSocket::new_v4()?;
    // Choose the source port at connect time (by 4-tuple) rather than at bind
    // time: without this the kernel searches for a port free on every
    // destination, which gets slow with tens of thousands of sockets.
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a valid int option value.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Stream::wrap(stream).await
}

/// A WebSocket to `path` on `target` from `source`, through the load
/// generator's own client (`wire`).
async fn open(target: SocketAddr, source: IpAddr, path: &str) -> Result<wire::Socket> {
    let stream = connect(target, source).await?;
    wire::Socket::upgrade(stream, &target.to_string(), path, AUTHORIZATION.get()).await
}

/// Opens `count` connections with at most `concurrency` handshakes in flight
/// and hands each to `serve`. Returns (opened, failed, seconds taken).
async fn open_many<F, Fut>(
    target: SocketAddr,
    path: &str,
    sources: &[IpAddr],
    count: usize,
    concurrency: usize,
    serve: F,
) -> (u64, u64, f64)
where
    F: Fn(wire::Socket) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(concurrency));
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut handshakes = Vec::with_capacity(count);
    for i in 0..count {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let source = sources[i % sources.len()];
        let (path, opened, failed, serve) = (
            path.to_owned(),
            opened.clone(),
            failed.clone(),
            serve.clone(),
        );
        handshakes.push(tokio::spawn(async move {
            match open(target, source, &path).await {
                Ok(ws) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    tokio::spawn(serve(ws));
                }
                Err(err) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("connect failed: {err:#}");
                    }
                }
            }
        }));
    }
    for handshake in handshakes {
        let _ = handshake.await;
    }
    (
        opened.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}

/// This process's CPU time so far (user + system, every thread), in seconds.
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given, which is plain data.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// What the frames of one read ask the client to send back.
#[derive(Default)]
struct Replies {
    /// The payload of the latest ping, to be echoed in a pong.
    pong: Option<Vec<u8>>,
    /// A Switchyard heartbeat arrived: answer with a `ping` op.
    heartbeat: bool,
    /// The server closed: echo its close and stop.
    close: bool,
}

impl Replies {
    /// Notes a control frame or a heartbeat; other frames are the caller's.
    fn note(&mut self, frame: &wire::Frame<'_>) {
        match frame.opcode {
            wire::PING => self.pong = Some(frame.payload.to_vec()),
            wire::CLOSE => self.close = true,
            wire::TEXT => self.heartbeat |= is_heartbeat(frame.payload),
            _ => {}
        }
    }

    /// Sends the replies; `false` when the connection is over.
    async fn send(self, socket: &mut wire::Socket) -> bool {
        if self.close {
            let _ = socket.send(wire::CLOSE, &[]).await;
            return false;
        }
        if let Some(payload) = self.pong {
            if socket.send(wire::PONG, &payload).await.is_err() {
                return false;
            }
        }
        !self.heartbeat || socket.send(wire::TEXT, br#"{"op":"ping"}"#).await.is_ok()
    }
}

/// Whether a text payload is Switchyard's heartbeat.
fn is_heartbeat(text: &[u8]) -> bool {
    text.starts_with(br#"{"op":"heartbeat""#)
}

/// Reads and discards, answering pings and heartbeats.
async fn hold(mut socket: wire::Socket) {
    loop {
        let mut replies = Replies::default();
        loop {
            match socket.next_buffered() {
                Ok(Some(frame)) => replies.note(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !replies.send(&mut socket).await || !matches!(socket.fill().await, Ok(true)) {
            return;
        }
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The `"t":<micros>` field of a message frame, without a full JSON parse.
fn sent_micros(text: &[u8]) -> Option<u64> {
    // Built once: setting a searcher up per message showed in the load
    // generator's own profile at 1M deliveries/s (docs/benchmarks.md).
    static FIELD: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let field = FIELD.get_or_init(|| memchr::memmem::Finder::new(br#""t":"#));
    leading_number(&text[field.find(text)? + 4..])
}

/// The decimal number `bytes` starts with; `None` without digits or past
/// 19 of them (u64's range).
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let end = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    if end == 0 || end > 19 {
        return None;
    }
    Some(
        bytes[..end]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

/// A keep-alive HTTP/1.1 connection for publishing.
struct Publisher {
    stream: TcpStream,
    admin: SocketAddr,
    buf: Vec<u8>,
}

impl Publisher {
    async fn connect(admin: SocketAddr) -> Result<Publisher> {
        let stream = TcpStream::connect(admin).await?;
        stream.set_nodelay(true)?;
        Ok(Publisher {
            stream,
            admin,
            buf: vec![0; 4096],
        })
    }

    async fn publish(&mut self, body: &str) -> Result<()> {
        let request = format!(
            "POST /api/publish HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.admin,
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await?;
        // Responses are small JSON with Content-Length; read until the body is complete.
        let mut got = 0;
        loop {
            let n = self.stream.read(&mut self.buf[got..]).await?;
            if n == 0 {
                bail!("admin closed the connection");
            }
            got += n;
            let text = String::from_utf8_lossy(&self.buf[..got]);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    if !head.starts_with("HTTP/1.1 200") {
                        bail!("publish failed: {head} {body}");
                    }
                    return Ok(());
                }
            }
            if got == self.buf.len() {
                bail!("response too large");
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

/// What the fan-out subscribers share with the coordinator.
struct FanoutShared {
    delivered: AtomicU64,
    /// Unix micros of the latest delivery.
    last_delivery: AtomicU64,
    subscribed: AtomicU64,
    stop: tokio::sync::Notify,
    latency_tx: tokio::sync::mpsc::UnboundedSender<Vec<u32>>,
    /// The subscribe frame to send, or `None` for peers that broadcast to everyone.
    subscribe_frame: Option<String>,
}

/// One fan-out subscriber: records a latency sample per message until stopped.
///
/// Every frame of one read arrived together, so one clock read after the
/// read serves them all, and the shared counters (cache lines both threads
/// write) are touched once per read rather than once per message.
async fn subscriber(mut socket: wire::Socket, shared: Arc<FanoutShared>) {
    match &shared.subscribe_frame {
        Some(frame) => {
            if socket.send(wire::TEXT, frame.as_bytes()).await.is_err() {
                return;
            }
        }
        None => {
            shared.subscribed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut samples: Vec<u32> = Vec::new();
    let stopped = shared.stop.notified();
    tokio::pin!(stopped);
    loop {
        let now = unix_micros();
        let mut replies = Replies::default();
        let mut delivered = 0;
        loop {
            let frame = match socket.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            if frame.opcode != wire::TEXT {
                replies.note(&frame);
            } else if let Some(sent) = sent_micros(frame.payload) {
                samples.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
                delivered += 1;
            } else if frame.payload.starts_with(br#"{"op":"subscribed""#) {
                shared.subscribed.fetch_add(1, Ordering::Relaxed);
            } else {
                replies.note(&frame);
            }
        }
        if delivered > 0 {
            shared.last_delivery.fetch_max(now, Ordering::Relaxed);
            shared.delivered.fetch_add(delivered, Ordering::Relaxed);
        }
        if !replies.send(&mut socket).await {
            break;
        }
        tokio::select! {
            // Reads first: the stop signal is looked at only when no bytes wait.
            biased;
            read = socket.fill() => if !matches!(read, Ok(true)) { break },
            _ = &mut stopped => break,
        }
    }
    let _ = shared.latency_tx.send(samples);
}

#[allow(clippy::too_many_arguments)]
async fn fanout(
    target: SocketAddr,
    admin: SocketAddr,
    subscribers: usize,
    rate: u64,
    duration: Duration,
    payload: usize,
    topic: String,
    sources: Vec<IpAddr>,
    protocol: String,
) -> Result<()> {
    let (latency_tx, mut latency_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u32>>();
    let shared = Arc::new(FanoutShared {
        delivered: AtomicU64::new(0),
        last_delivery: AtomicU64::new(0),
        subscribed: AtomicU64::new(0),
        stop: tokio::sync::Notify::new(),
        latency_tx,
        subscribe_frame: (protocol == "switchyard")
            .then(|| format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#)),
    });
    let serve = {
        let shared = shared.clone();
        move |socket: wire::Socket| subscriber(socket, shared.clone())
    };
    let (opened, failed, connect_secs) =
        open_many(target, "/ws", &sources, subscribers, 256, serve).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.subscribed.load(Ordering::Relaxed) < opened && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = shared.subscribed.load(Ordering::Relaxed);

    let mut publisher = Publisher::connect(admin).await?;
    let pad = "x".repeat(payload);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let total = rate * duration.as_secs();
    let started = Instant::now();
    let mut publish_micros: Vec<u32> = Vec::with_capacity(total as usize);
    let mut next = tokio::time::Instant::now();
    for n in 0..total {
        tokio::time::sleep_until(next).await;
        next += interval;
        let body = format!(
            r#"{{"topic":"{topic}","data":{{"t":{},"n":{n},"pad":"{pad}"}}}}"#,
            unix_micros()
        );
        let asked = Instant::now();
        publisher.publish(&body).await?;
        // Micros per publish request: a server that answers its publisher
        // late gets fewer publishes per second than offered.
        publish_micros.push(asked.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    let publish_secs = started.elapsed().as_secs_f64();
    publish_micros.sort_unstable();
    let first_publish_micros = unix_micros() - (publish_secs * 1e6) as u64;
    // Let the tail arrive: wait until deliveries stop growing.
    let expected = total * ready;
    let mut last = u64::MAX;
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < drain_deadline {
        let now = shared.delivered.load(Ordering::Relaxed);
        if now >= expected || now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // From the first publish to the last delivery.
    let delivery_secs = shared
        .last_delivery
        .load(Ordering::Relaxed)
        .saturating_sub(first_publish_micros) as f64
        / 1e6;
    let got = shared.delivered.load(Ordering::Relaxed);
    shared.stop.notify_waiters();
    // The samples channel closes once every subscriber has let go of `shared`.
    drop(shared);
    let mut all: Vec<u32> = Vec::new();
    while let Some(samples) = latency_rx.recv().await {
        all.extend(samples);
    }
    all.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "workload": "fanout",
            "subscribers_opened": opened,
            "subscribers_failed": failed,
            "subscribers_ready": ready,
            "connect_secs": connect_secs,
            "published": total,
            "publish_secs": publish_secs,
            "offered_per_sec": (total * ready) as f64 / publish_secs,
            "publish_request_ms": {
                "p50": percentile(&publish_micros, 0.50),
                "p99": percentile(&publish_micros, 0.99),
                "max": percentile(&publish_micros, 1.0),
            },
            "expected_deliveries": expected,
            "delivered": got,
            "delivery_secs": delivery_secs,
            "delivered_per_sec": got as f64 / delivery_secs,
            "latency_ms": {
                "p50": percentile(&all, 0.50),
                "p99": percentile(&all, 0.99),
                "p999": percentile(&all, 0.999),
                "max": percentile(&all, 1.0),
            },
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    raise_fd_limit();
    let args = Args::parse();
    if let Some(ca) = &args.tls_ca {
        stream::use_tls(ca)?;
    }
    if let Some(token) = &args.bearer {
        let value =
            tokio_tungstenite::tungstenite::http::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("--bearer must be header-safe text")?;
        let _ = AUTHORIZATION.set(value);
    }
    match args.command {
        Command::Idle {
            target,
            path,
            connections,
            sources,
            concurrency,
            hold_secs,
            ready_file,
        } => {
            let cpu_before = own_cpu_secs();
            let (opened, failed, secs) =
                open_many(target, &path, &sources, connections, concurrency, hold).await;
            // The rate is bounded by the two processes sharing the cores:
            // what the load generator spent per handshake is the other half.
            let client_cpu = own_cpu_secs() - cpu_before;
            println!(
                "{}",
                serde_json::json!({
                    "workload": "idle",
                    "opened": opened,
                    "failed": failed,
                    "connect_secs": secs,
                    "handshakes_per_sec": opened as f64 / secs,
                    "client_cpu_us_per_handshake":
                        (client_cpu * 1e6 / opened.max(1) as f64 * 10.0).round() / 10.0,
                })
            );
            if let Some(path) = ready_file {
                std::fs::write(path, opened.to_string())?;
            }
            tokio::time::sleep(Duration::from_secs(hold_secs)).await;
        }
        Command::Fanout {
            target,
            admin,
            subscribers,
            rate,
            duration_secs,
            payload,
            topic,
            sources,
            protocol,
        } => {
            fanout(
                target,
                admin,
                subscribers,
                rate,
                Duration::from_secs(duration_secs),
                payload,
                topic,
                sources,
                protocol,
            )
            .await?
        }
        Command::Migrate {
            blue,
            green,
            connections,
            sources,
            topic,
            expect,
            timeout_secs,
            ready_file,
            reconnects_file,
        } => {
            migrate::run(migrate::MigrateOptions {
                blue,
                green,
                connections,
                sources,
                topic,
                expect,
                timeout: Duration::from_secs(timeout_secs),
                ready_file,
                reconnects_file,
            })
            .await?
        }
        Command::Crash {
            target,
            connections,
            sources,
            topic,
            expect,
            first_retry_ms,
            watch,
            timeout_secs,
            ready_file,
        } => {
            crash::run(crash::CrashOptions {
                target,
                connections,
                sources,
                topic,
                expect,
                first_retry_ms,
                watch,
                timeout: Duration::from_secs(timeout_secs),
                ready_file,
            })
            .await?
        }
        Command::Publish {
            admin,
            topic,
            rate,
            count,
        } => {
            let mut publisher = Publisher::connect(admin).await?;
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut next = tokio::time::Instant::now();
            let mut retries = 0u64;
            for n in 1..=count {
                tokio::time::sleep_until(next).await;
                next += interval;
                let body = format!(r#"{{"topic":"{topic}","data":{{"n":{n}}}}}"#);
                // A 503 (backplane busy or reconnecting) is retried, as a real
                // publisher would, on a fresh connection.
                while let Err(err) = publisher.publish(&body).await {
                    retries += 1;
                    if retries > 100 {
                        return Err(err);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    publisher = Publisher::connect(admin).await?;
                }
            }
            println!(
                "{}",
                serde_json::json!({"workload": "publish", "published": count, "retries": retries})
            );
        }
        Command::Rss { pids } => {
            let mut total = 0;
            for pid in pids {
                total += rss_kib(pid)?;
            }
            println!("{total}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_send_time() {
        let frame = r#"{"op":"message","topic":"b","epoch":1,"offset":2,"data":{"t":1732240000123456,"n":5,"pad":"x"}}"#;
        assert_eq!(sent_micros(frame.as_bytes()), Some(1_732_240_000_123_456));
        assert_eq!(sent_micros(br#"{"op":"pong"}"#), None);
        assert_eq!(sent_micros(br#"{"data":{"t":}}"#), None);
        assert_eq!(sent_micros(br#"{"data":{"t":7"#), Some(7));
    }

    #[test]
    fn percentiles() {
        let sorted: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 0.5), 0.501);
        assert_eq!(percentile(&sorted, 0.99), 0.990);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
