//! The gateway as a whole: shared state, listeners, accept loops, keepalive
//! and shutdown. Shutdown is a `watch` signal that flows down: the accept
//! loops stop, every connection is asked to close with 1001, and the process
//! waits (bounded) for them to go.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::value::RawValue;
use switchyard_protocol::admin::StatusResponse;
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::{CloseCode, Position};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tower_service::Service;
use warp::Filter;

use crate::broker::backplane::{BackplaneMetrics, RedisBroker, RedisOptions};
use crate::broker::log::Retention;
use crate::broker::memory::{MemoryBroker, MemorySettings};
use crate::broker::{Broker, BrokerError};
use crate::config::{AdminSettings, BrokerKind, Config};
use crate::drain::Drain;
use crate::head::{self, Parsed, Replay};
use crate::hub::{Hub, Route};
use crate::metrics::{Initiator, Metrics};
use crate::outbox::OutboxLimits;
use crate::repoll::Repoll;
use crate::security::auth::{AdminAuth, Authenticator};
use crate::security::expiry::SessionExpiries;
use crate::security::origin::OriginPolicy;
use crate::security::ratelimit::IpRateLimiter;
use crate::security::unix_ms;
use switchyard_protocol::drain::DrainRequest;

/// Addresses the per-IP handshake limiter tracks at most: its memory stays
/// bounded (a bucket and a map entry each) under a flood from many
/// addresses, and a busy gateway's legitimate clients still fit.
const MAX_RATE_LIMITED_IPS: usize = 100_000;

/// Everything the listeners and connections share.
pub struct Gateway {
    /// The effective configuration.
    pub config: Config,
    /// This gateway's id.
    pub server_id: String,
    /// Metrics.
    pub metrics: Metrics,
    /// Live connections.
    pub hub: Hub,
    /// Topic broker.
    pub broker: Arc<dyn Broker>,
    /// tungstenite settings for every connection.
    pub ws_config: WebSocketConfig,
    started: Instant,
    shutting_down: AtomicBool,
    drain: std::sync::Mutex<Option<Arc<Drain>>>,
    /// Notified when a drain finishes (or is cancelled).
    pub drain_finished: tokio::sync::Notify,
    /// The Origin check of the public listener.
    pub origin: OriginPolicy,
    /// Authenticates handshakes; holds the revocations.
    pub auth: Authenticator,
    /// The admin listener's bearer token.
    pub admin_auth: AdminAuth,
    /// TLS on the public listener, when configured.
    pub public_tls: Option<TlsAcceptor>,
    /// TLS on the admin listener, when configured.
    pub admin_tls: Option<TlsAcceptor>,
    /// Handshakes per second per IP, when limited.
    pub handshake_limiter: Option<IpRateLimiter>,
    /// When each authenticated session expires.
    pub expiries: SessionExpiries,
}

impl Gateway {
    /// Builds the gateway state and its broker from a validated config. Must
    /// run inside a tokio runtime (brokers start background tasks).
    pub fn new(config: Config) -> anyhow::Result<Arc<Gateway>> {
        let server_id = config
            .server_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| format!("sy-{:06x}", rand::random::<u32>() & 0xff_ffff));
        let metrics = Metrics::new().context("registering metrics")?;
        let broker = make_broker(&config, &metrics)?;
        let ws = &config.websocket;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(ws.read_buffer_bytes)
            .write_buffer_size(ws.write_buffer_bytes)
            .max_write_buffer_size(ws.max_write_buffer_bytes)
            .max_message_size(Some(ws.max_message_bytes))
            .max_frame_size(Some(ws.max_frame_bytes));
        let limits = OutboxLimits {
            max_messages: config.connection.outbox_max_messages,
            max_bytes: config.connection.outbox_max_bytes,
        };
        let origin = OriginPolicy::new(
            &config.origin.allowed,
            config.origin.allow_same_host,
            config.origin.allow_missing,
        )
        .context("origin.allowed")?;
        let auth = Authenticator::new(&config).context("auth.jwt")?;
        let admin_auth = AdminAuth::new(admin_token(&config.admin)?);
        let handshake_limiter = (ws.handshake_rate_per_ip > 0).then(|| {
            IpRateLimiter::new(
                ws.handshake_rate_per_ip,
                ws.handshake_burst_per_ip,
                MAX_RATE_LIMITED_IPS,
            )
        });
        Ok(Arc::new(Gateway {
            origin,
            auth,
            admin_auth,
            handshake_limiter,
            public_tls: crate::tls::acceptor(&config.tls, "tls")?,
            admin_tls: crate::tls::acceptor(&config.admin.tls, "admin.tls")?,
            expiries: SessionExpiries::default(),
            metrics,
            hub: Hub::new(server_id.clone(), limits),
            broker,
            ws_config,
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            drain: std::sync::Mutex::new(None),
            drain_finished: tokio::sync::Notify::new(),
            server_id,
            config,
        }))
    }

    /// Counts a handshake refused for `reason` (every refusal, at any layer, comes here).
    pub fn count_rejection(&self, reason: &str) {
        self.metrics
            .handshakes_rejected
            .with_label_values(&[reason])
            .inc();
    }

    /// Whether the gateway refuses new work (readiness is 503): a drain
    /// runs or has drained it (until cancelled), or the process is shutting
    /// down.
    pub fn is_draining(&self) -> bool {
        self.is_shutting_down() || self.drain_slot().as_ref().is_some_and(|d| d.holds())
    }

    /// Whether SIGTERM (or SIGINT) has been received.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Why a new connection is refused now, if it is: the process shuts
    /// down, or a drain holds the gateway. `admitted` is a connection that
    /// has already joined the hub: it stays if the drain planned it (it
    /// joined just before the drain took its snapshot).
    pub fn refusal(&self, admitted: Option<&crate::hub::ConnHandle>) -> Option<&'static str> {
        let drain = self.drain_slot().clone();
        if let (Some(drain), Some(handle)) = (&drain, admitted) {
            if drain.plans(handle) {
                return None;
            }
        }
        if self.is_shutting_down() {
            Some("shutting_down")
        } else if drain.is_some_and(|d| d.holds()) {
            Some("draining")
        } else {
            None
        }
    }

    /// Re-derives the `switchyard_draining` gauge from the state.
    pub fn refresh_readiness(&self) {
        self.metrics.draining.set(i64::from(self.is_draining()));
    }

    fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.refresh_readiness();
    }

    /// The current or last drain.
    pub fn drain_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Drain>>> {
        self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection that ended, for the drain that planned it (if
    /// any); `initiator` says who closed it.
    pub fn connection_ended(&self, handle: &crate::hub::ConnHandle, initiator: Initiator) {
        let Some(drain) = self.drain_slot().clone() else {
            return;
        };
        if let Some(outcome) = drain.connection_ended(handle, initiator) {
            self.metrics
                .migrations
                .with_label_values(&[outcome.as_str()])
                .inc();
            if drain.is_active() {
                self.metrics.drain_remaining.set(drain.unended() as i64);
            }
        }
    }

    /// Closes every connection of `subject` with 4503 and refuses its older
    /// credentials from now on; returns how many connections were closed.
    pub fn revoke(&self, subject: &str) -> usize {
        self.auth.revocations.revoke(subject, unix_ms() / 1000);
        let closed = self
            .hub
            .close_subject(subject, CloseCode::SessionRevoked, "session revoked");
        self.metrics
            .sessions_ended
            .with_label_values(&["revoked"])
            .inc_by(closed as u64);
        tracing::info!(closed, "subject revoked");
        closed
    }

    /// Publishes through the broker and counts it. Both publish paths (the
    /// admin API and client `publish` frames) come here.
    pub async fn publish(&self, topic: &str, data: &RawValue) -> Result<Position, BrokerError> {
        let position = self.broker.publish(topic, data).await?;
        self.metrics.messages_published.inc();
        Ok(position)
    }

    /// The `/admin/status` body.
    pub fn status(&self) -> StatusResponse {
        StatusResponse {
            server_id: self.server_id.clone(),
            connections: self.hub.len() as u64,
            subscriptions: self.metrics.subscriptions.get().max(0) as u64,
            topics: self.broker.topic_count() as u64,
            draining: self.is_draining(),
            uptime_seconds: self.started.elapsed().as_secs(),
            drain: self
                .drain_slot()
                .as_ref()
                .map(|d| d.status(self.hub.len() as u64)),
        }
    }
}

/// The admin token from `admin.token` or `admin.token_file`.
fn admin_token(settings: &AdminSettings) -> anyhow::Result<Option<String>> {
    let token = match (&settings.token, &settings.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading admin.token_file {path}"))?
            .trim()
            .to_owned(),
        (None, None) => return Ok(None),
    };
    if token.len() < 16 {
        anyhow::bail!("admin token: must be at least 16 bytes");
    }
    Ok(Some(token))
}

/// The broker the config asks for.
fn make_broker(config: &Config, metrics: &Metrics) -> anyhow::Result<Arc<dyn Broker>> {
    let retention = Retention {
        max_entries: config.topics.history_size,
        max_age: Duration::from_millis(config.topics.history_ttl_ms),
    };
    match config.broker {
        BrokerKind::Memory => {
            metrics.backplane_up.set(1);
            let memory = Arc::new(MemoryBroker::new(MemorySettings {
                retention,
                max_topics: config.topics.max_topics,
                max_tickets: config.auth.tickets.max_outstanding,
            }));
            memory.spawn_janitor(Duration::from_millis(
                config.topics.history_ttl_ms.clamp(1_000, 60_000),
            ));
            Ok(memory)
        }
        BrokerKind::Redis => {
            let redis = RedisBroker::start(RedisOptions {
                settings: config.redis.clone(),
                retention,
                max_topics: config.topics.max_topics,
                max_pending: config.connection.outbox_max_messages,
                metrics: BackplaneMetrics {
                    up: metrics.backplane_up.clone(),
                    publish_seconds: metrics.backplane_publish_seconds.clone(),
                    reconnects: metrics.backplane_reconnects.clone(),
                    recovered_messages: metrics.backplane_recovered_messages.clone(),
                },
            })
            .context("redis broker")?;
            Ok(redis)
        }
    }
}

/// Binds a TCP listener, optionally with SO_REUSEPORT so several gateway
/// processes can share the port.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(4096)?)
}

/// The bound listeners of a gateway, before serving.
pub struct Listeners {
    /// The public listener.
    pub public: TcpListener,
    /// The admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both listeners from the config.
    pub fn bind(config: &Config) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            public: bind(config.listen, config.reuse_port).context("public listener")?,
            admin: bind(config.admin_listen, false).context("admin listener")?,
        })
    }
}

/// How the gateway is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep serving.
    Running,
    /// SIGTERM: drain (or let a running drain finish), then exit.
    Drain,
    /// SIGINT, or a second signal: close everything with 1001 now, then exit.
    Now,
}

/// Serves until `stop` leaves [`Stop::Running`], then drains or closes, and
/// returns once every connection is gone (bounded). The listeners keep
/// serving during a drain, so `/admin/status` shows its progress.
pub async fn serve(
    gateway: Arc<Gateway>,
    listeners: Listeners,
    mut stop: watch::Receiver<Stop>,
) -> anyhow::Result<()> {
    tracing::info!(
        server_id = %gateway.server_id,
        public = %listeners.public.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        "gateway listening"
    );
    let (close_listeners, listeners_closed) = watch::channel(false);
    let public = tokio::spawn(accept_loop(
        listeners.public,
        gateway.clone(),
        Listener::Public,
        listeners_closed.clone(),
    ));
    let admin = tokio::spawn(accept_loop(
        listeners.admin,
        gateway.clone(),
        Listener::Admin,
        listeners_closed,
    ));
    let keepalive = tokio::spawn(keepalive_loop(gateway.clone()));
    let expiry = tokio::spawn(session_expiry_loop(gateway.clone()));

    // A sender that goes away means the same as "stop now".
    let mut how = Stop::Running;
    while how == Stop::Running {
        if stop.changed().await.is_err() {
            how = Stop::Now;
        } else {
            how = *stop.borrow_and_update();
        }
    }
    gateway.set_shutting_down();
    let close_within = Duration::from_millis(gateway.config.shutdown_timeout_ms);
    let close_within = match how {
        Stop::Drain => match drain_until_empty(&gateway, &mut stop).await {
            // Past the stop time nothing more is waited for.
            Some(stop_at) => close_within.min(stop_at.saturating_duration_since(Instant::now())),
            None => close_within,
        },
        _ => close_within,
    };
    if !gateway.hub.is_empty() {
        close_now(&gateway, close_within).await;
    }
    let _ = close_listeners.send(true);
    keepalive.abort();
    expiry.abort();
    let _ = public.await;
    let _ = admin.await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// SIGTERM: one drain, bounded by one stop time fixed now. The drain's
/// deadline is at most `drain.grace_period_ms` from now (a running admin
/// drain keeps its schedule but is capped there; otherwise a drain starts
/// with the `drain.*` defaults), and the process stops waiting
/// `connection.close_timeout_ms` after that: the forced closes' own bound.
/// No second drain is ever started, and `DELETE /admin/drain` is refused
/// while shutting down, so nothing postpones the stop time. Returns it, or
/// `None` when a second signal cut the drain short.
async fn drain_until_empty(
    gateway: &Arc<Gateway>,
    stop: &mut watch::Receiver<Stop>,
) -> Option<Instant> {
    let settings = &gateway.config.drain;
    let grace = Duration::from_millis(settings.grace_period_ms);
    let close_timeout = Duration::from_millis(gateway.config.connection.close_timeout_ms);
    let drain_by = tokio::time::Instant::now() + grace;
    let stop_at = drain_by + close_timeout;
    let running = gateway.drain_slot().clone().filter(|d| d.is_active());
    let drain = match running {
        Some(drain) => {
            drain.cap_deadline(drain_by);
            Some(drain)
        }
        None if gateway.hub.is_empty() => None,
        None => {
            let request = DrainRequest {
                window_ms: settings.window_ms,
                max_rate: settings.max_rate,
                deadline_ms: settings.deadline_ms.min(settings.grace_period_ms),
                mode: settings.mode,
                retry_jitter_ms: settings.retry_jitter_ms,
                migrate_grace_ms: Some(settings.migrate_grace_ms),
            };
            match crate::drain::start_for_shutdown(gateway, request) {
                Ok(drain) => Some(drain),
                Err(err) => {
                    tracing::error!(%err, "cannot drain; closing now");
                    return Some(stop_at.into_std());
                }
            }
        }
    };
    let wait = async {
        gateway
            .hub
            .wait_empty(stop_at.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        // The drain reports its final counts once its last connection is
        // gone; let it, within the same stop time.
        if let Some(drain) = drain {
            while drain.is_active() {
                let finished = gateway.drain_finished.notified();
                if !drain.is_active() || tokio::time::timeout_at(stop_at, finished).await.is_err() {
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = wait => Some(stop_at.into_std()),
        _ = stop.changed() => None,
    }
}

/// Closes every connection with 1001 and waits (at most `timeout`), then
/// aborts whatever is left.
async fn close_now(gateway: &Gateway, timeout: Duration) {
    let open = gateway.hub.len();
    tracing::info!(open, "closing connections with 1001");
    gateway
        .hub
        .close_all(CloseCode::GoingAway, "server shutting down");
    if !gateway.hub.wait_empty(timeout).await {
        tracing::warn!(
            left = gateway.hub.len(),
            "shutdown timeout: aborting the rest"
        );
        gateway.hub.abort_all();
        gateway.hub.wait_empty(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Public,
    Admin,
}

async fn accept_loop(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    which: Listener,
    mut shutdown: watch::Receiver<bool>,
) {
    let routes = match which {
        Listener::Public => crate::http::public_routes(gateway.clone()).boxed(),
        Listener::Admin => crate::http::admin_routes(gateway.clone()).boxed(),
    };
    let routes = warp::service(routes);
    let tls = match which {
        Listener::Public => gateway.public_tls.clone(),
        Listener::Admin => gateway.admin_tls.clone(),
    };
    let ws = &gateway.config.websocket;
    let handshake_timeout = Duration::from_millis(ws.handshake_timeout_ms);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(ws.max_header_bytes);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let gateway = gateway.clone();
        let routes = routes.clone();
        let http = http.clone();
        // Two spawns, not one task with both branches: a task is as large
        // as the largest state it awaits, and it is copied into place when
        // spawned and again when it ends, so a plain handshake must not
        // carry the TLS branch's state (pinned by
        // `a_plain_connection_waits_for_its_head_in_a_small_task`; the
        // figures are in docs/benchmarks.md, "A plain handshake's task").
        let Some(tls) = tls.clone() else {
            tokio::spawn(serve_connection(http, tcp, gateway, routes, which, peer));
            continue;
        };
        tokio::spawn(async move {
            // The TLS handshake counts against the same slowloris budget as the headers.
            match tokio::time::timeout(handshake_timeout, tls.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    serve_connection(http, stream, gateway, routes, which, peer).await
                }
                Ok(Err(err)) => {
                    gateway.count_rejection("tls_failed");
                    tracing::debug!(%peer, %err, "TLS handshake failed");
                }
                Err(_) => {
                    gateway.count_rejection("handshake_timeout");
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// The route a `GET` to `path` upgrades to on the public listener, if any.
fn upgrade_route(gateway: &Gateway, which: Listener, method: &Method, path: &str) -> Option<Route> {
    match (which, method, path) {
        (Listener::Public, &Method::GET, "/ws") => Some(Route::Topics),
        (Listener::Public, &Method::GET, "/echo") if gateway.config.echo => Some(Route::Echo),
        _ => None,
    }
}

/// Serves one accepted connection (plain or TLS). On the public listener
/// the gateway reads the first request head itself and answers an upgrade
/// directly ([`crate::head`] says why); everything else is HTTP/1.1 served
/// by hyper — given the bytes already read — where WebSocket upgrades go to
/// [`crate::upgrade`] and the rest to the warp routes.
async fn serve_connection<IO, R>(
    http: hyper::server::conn::http1::Builder,
    io: IO,
    gateway: Arc<Gateway>,
    routes: R,
    which: Listener,
    peer: SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    R: Service<
            Request<Incoming>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    R::Future: Send + 'static,
{
    let io = match which {
        Listener::Admin => Replay::new(io, Vec::new()),
        Listener::Public => match upgrade_first_request(io, &gateway, peer).await {
            Some(io) => io,
            None => return,
        },
    };
    let service_gateway = gateway.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let gateway = service_gateway.clone();
        let upgrade = upgrade_route(&gateway, which, request.method(), request.uri().path());
        let authorized = which == Listener::Public
            || gateway.admin_auth.allows(
                request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            );
        if upgrade.is_none() && authorized {
            return futures_util::future::Either::Right(routes.clone().call(request));
        }
        futures_util::future::Either::Left(async move {
            let response = match upgrade {
                Some(route) => crate::upgrade::upgrade(gateway, request, route, peer).await,
                None => crate::http::admin_unauthorized(&gateway),
            };
            Ok::<_, std::convert::Infallible>(response)
        })
    });
    // hyper wakes this task while polling it (the two ends of a request
    // body's channel wake each other); `Repoll` answers that with a second
    // poll rather than a trip to the back of the run queue, which during a
    // fan-out is 10,000 tasks long.
    let connection = Repoll::new(Box::pin(
        http.serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
    ));
    if let Err(err) = connection.await {
        // hyper answers 431 to an oversized head and closes a connection
        // whose head does not arrive in time; count both.
        if err.is_parse_too_large() {
            gateway.count_rejection("header_too_large");
        } else if err.is_timeout() {
            gateway.count_rejection("handshake_timeout");
        }
        tracing::debug!(%peer, %err, "http connection ended with an error");
    }
}

/// Reads the first request head of a public connection and, if it is an
/// upgrade, answers it directly. Otherwise returns the connection, with the
/// bytes read replayed in front, for hyper; `None` once the connection is
/// served or gone.
async fn upgrade_first_request<IO>(
    mut io: IO,
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
) -> Option<Replay<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ws = &gateway.config.websocket;
    let timeout = Duration::from_millis(ws.handshake_timeout_ms);
    let first = tokio::time::timeout(timeout, head::read_first(&mut io, ws.max_header_bytes));
    let first = match first.await {
        Ok(Ok(first)) => first,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "connection ended before its request head");
            return None;
        }
        Err(_) => {
            gateway.count_rejection("handshake_timeout");
            tracing::debug!(%peer, "request head timed out");
            return None;
        }
    };
    if let Parsed::Complete(head, len) = first.parsed {
        if let Some(route) = upgrade_route(gateway, Listener::Public, &head.method, head.path()) {
            let mut buffer = first.buffer;
            let rest = buffer.split_off(len);
            drop(buffer);
            let gateway = gateway.clone();
            crate::upgrade::upgrade_direct(gateway, io, head, rest, route, peer).await;
            return None;
        }
    }
    Some(Replay::new(io, first.buffer))
}

/// Closes connections whose session expired with 4001 (the client refreshes
/// its token and reconnects). One task for the gateway.
async fn session_expiry_loop(gateway: Arc<Gateway>) {
    loop {
        let changed = gateway.expiries.changed.notified();
        let (due, next) = gateway.expiries.take_due(unix_ms());
        for id in due {
            if let Some(handle) = gateway.hub.get(id) {
                tracing::info!(conn = %handle.label, "session expired");
                // Counted before the close is queued, so whoever sees the
                // close also finds it counted.
                gateway
                    .metrics
                    .sessions_ended
                    .with_label_values(&["expired"])
                    .inc();
                handle.outbox.close(
                    CloseCode::SessionExpired,
                    CloseReason::text("session expired").to_json(),
                );
            }
        }
        let wait = next.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(at.saturating_sub(unix_ms()))
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changed => {}
        }
    }
}

/// Pings every connection each keepalive interval and reaps those silent for
/// twice that. One task for the whole gateway, not a timer per connection.
async fn keepalive_loop(gateway: Arc<Gateway>) {
    let interval = Duration::from_millis(gateway.config.connection.keepalive_interval_ms);
    // Check four times per interval so reaping happens between 2× and 2.25×.
    let mut tick = tokio::time::interval(interval / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let ping = ticks.is_multiple_of(4);
        let report = gateway.hub.sweep(interval * 2, ping);
        if report.reaped > 0 {
            tracing::info!(reaped = report.reaped, "reaped silent connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plain_connection_waits_for_its_head_in_a_small_task() {
        let gateway = Gateway::new(Config::default()).expect("gateway");
        let routes = warp::service(crate::http::public_routes(gateway.clone()).boxed());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let _client = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        let http = hyper::server::conn::http1::Builder::new();
        let task = serve_connection(http, tcp, gateway, routes, Listener::Public, peer);
        // What a plain connection's task is while the handshake is read
        // and answered; it is copied into place when spawned and again when
        // it ends, once per handshake (docs/benchmarks.md, "A plain
        // handshake's task").
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 3584,
            "plain connection task grew to {size} bytes: if the code grew it, \
             keep the TLS and hyper state out of the plain path (box or spawn \
             it); if only the compiler changed, raise the bound to the new \
             size and say so in the commit"
        );
    }
}
