//! The gateway's listeners, accept loops, keepalive and shutdown (the
//! shared state is [`crate::gateway`]). Shutdown is a `watch` signal that
//! flows down: the accept loops stop, every connection is asked to close
//! (or is drained), and the process waits, bounded, for them to go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::drain::DrainRequest;
use switchyard_protocol::CloseCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tower_service::Service;
use warp::Filter;

use crate::config::Config;
pub use crate::gateway::Gateway;
use crate::head::{self, Parsed, Replay};
use crate::hub::Route;
use crate::repoll::Repoll;
use crate::security::shed::Shed;
use crate::security::unix_ms;

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
    let jwks = gateway
        .auth
        .jwks()
        .map(|jwks| tokio::spawn(jwks.clone().run(gateway.metrics.jwks.clone())));

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
    if let Some(jwks) = jwks {
        jwks.abort();
    }
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
    let running = gateway.drains.current().filter(|d| d.is_active());
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
                let finished = gateway.drains.finished.notified();
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
        // Admission control: a storm of reconnects is shed here, before
        // any TLS work; a plain connection is still told when to come back.
        let mut shed = None;
        if which == Listener::Public {
            if let Err(why) = gateway.shedder.accept() {
                if tls.is_some() {
                    gateway.count_rejection("overloaded_tls");
                    drop(tcp);
                    continue;
                }
                // Counted when it is answered: a probe is not shed.
                shed = Some(why);
            }
        }
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
            tokio::spawn(serve_connection(
                http, tcp, gateway, routes, which, peer, shed,
            ));
            continue;
        };
        tokio::spawn(async move {
            // The TLS handshake counts against the same slowloris budget as the headers.
            match tokio::time::timeout(handshake_timeout, tls.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    serve_connection(http, stream, gateway, routes, which, peer, None).await
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
    shed: Option<Shed>,
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
        Listener::Public => match upgrade_first_request(io, &gateway, peer, shed).await {
            Some(io) => io,
            None => return,
        },
    };
    let service_gateway = gateway.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let gateway = service_gateway.clone();
        let upgrade = upgrade_route(&gateway, which, request.method(), request.uri().path());
        // Web pages are kept off the admin listener before anything else,
        // whatever the token setting (`security::browser`).
        let refused = (which == Listener::Admin)
            .then(|| {
                crate::security::browser::refusal(
                    request.method(),
                    request.headers(),
                    &gateway.config.admin.allowed_hosts,
                    gateway.config.admin_listen.ip().is_loopback(),
                )
            })
            .flatten();
        if let Some(refusal) = refused {
            let response = crate::http::admin_refused(&gateway, refusal);
            return futures_util::future::Either::Left(futures_util::future::Either::Left(
                std::future::ready(Ok::<_, std::convert::Infallible>(response)),
            ));
        }
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
        futures_util::future::Either::Left(futures_util::future::Either::Right(async move {
            let response = match upgrade {
                Some(route) => crate::upgrade::upgrade(gateway, request, route, peer).await,
                None => crate::http::admin_unauthorized(&gateway),
            };
            Ok::<_, std::convert::Infallible>(response)
        }))
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

/// Paths on the public listener admission control never sheds.
const NEVER_SHED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Reads the first request head of a public connection and, if it is an
/// upgrade, answers it directly. Otherwise returns the connection, with the
/// bytes read replayed in front, for hyper; `None` once the connection is
/// served or gone. A connection admission control shed (`shed`) is answered
/// here whatever it asks: 4003 after an upgrade, 503 otherwise.
async fn upgrade_first_request<IO>(
    mut io: IO,
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    shed: Option<Shed>,
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
    // The kubelet's probes and Prometheus' scrapes are answered whatever
    // the load: a storm must not make the pod look unready (that would
    // send the storm on to the other pods) or hide it from the metrics.
    let shed = shed.filter(|_| {
        !matches!(&first.parsed, Parsed::Complete(head, _)
            if head.method == Method::GET && NEVER_SHED.contains(&head.path()))
    });
    if let Parsed::Complete(head, len) = first.parsed {
        if let Some(route) = upgrade_route(gateway, Listener::Public, &head.method, head.path()) {
            let mut buffer = first.buffer;
            let rest = buffer.split_off(len);
            drop(buffer);
            let gateway = gateway.clone();
            crate::upgrade::upgrade_direct(gateway, io, head, rest, route, peer, shed).await;
            return None;
        }
    }
    if let Some(shed) = shed {
        gateway.count_rejection("overloaded");
        let mut out = Vec::with_capacity(160);
        crate::upgrade::Refusal::overloaded(shed).write(&mut out);
        let _ = io.write_all(&out).await;
        let _ = io.shutdown().await;
        return None;
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
        let task = serve_connection(http, tcp, gateway, routes, Listener::Public, peer, None);
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
