//! The WebSocket handshake, done by the gateway rather than through
//! `warp::ws()`: warp does not expose tungstenite's buffer sizes, and its
//! default 128 KiB read buffer per connection would make an idle connection
//! cost thirty times what it must. Here every connection gets the configured
//! [`WebSocketConfig`](tokio_tungstenite::tungstenite::protocol::WebSocketConfig).
//!
//! One set of checks ([`judge`]), two transports: [`upgrade_direct`] answers
//! the first request of a connection, read by [`crate::head`], with the 101
//! and the welcome frame in one write; [`upgrade`] answers through hyper an
//! upgrade that came later on a keep-alive connection.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::header::{
    CONNECTION, HOST, ORIGIN, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use hyper_util::rt::TokioIo;
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::CloseCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use warp::Reply;

use crate::connection::{self, Welcome};
use crate::gateway::Gateway;
use crate::head::RequestHead;
use crate::hub::{AdmitLimits, AdmitRefused, ConnHandle, Route};
use crate::security::shed::{retry_after_secs, Shed};
use crate::security::{unix_ms, RedactedTarget, Session};

/// Why an upgrade request was refused with an HTTP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRejection {
    /// Not a WebSocket upgrade (missing `Upgrade: websocket` or `Connection: upgrade`).
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    BadVersion,
    /// `Sec-WebSocket-Key` is missing or not 16 bytes of base64.
    BadKey,
}

impl HandshakeRejection {
    /// The metric label and log word for this rejection.
    pub fn reason(self) -> &'static str {
        match self {
            HandshakeRejection::NotUpgrade => "not_upgrade",
            HandshakeRejection::BadVersion => "bad_version",
            HandshakeRejection::BadKey => "bad_key",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            HandshakeRejection::NotUpgrade => StatusCode::UPGRADE_REQUIRED,
            HandshakeRejection::BadVersion => StatusCode::UPGRADE_REQUIRED,
            HandshakeRejection::BadKey => StatusCode::BAD_REQUEST,
        }
    }
}

fn header_has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Checks an upgrade request (RFC 6455 §4.2.1) and returns the `Sec-WebSocket-Accept` value.
pub fn check_handshake(headers: &HeaderMap) -> Result<String, HandshakeRejection> {
    if !header_has_token(headers, UPGRADE, "websocket")
        || !header_has_token(headers, CONNECTION, "upgrade")
    {
        return Err(HandshakeRejection::NotUpgrade);
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeRejection::BadVersion);
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .ok_or(HandshakeRejection::BadKey)?;
    // 16 random bytes in base64 are 24 characters ending in "==".
    let well_formed = key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/');
    if !well_formed {
        return Err(HandshakeRejection::BadKey);
    }
    Ok(derive_accept_key(key))
}

/// What the gateway does with a well-formed handshake once it has looked at
/// its origin, credentials and its own capacity.
enum Admission {
    /// Serve the connection.
    Accept(Arc<ConnHandle>, Session),
    /// Accept the upgrade, then close at once with this code: a browser
    /// cannot read the HTTP status of a failed upgrade, but it can read a
    /// close code.
    Refuse(CloseCode, CloseReason),
}

/// An upgrade answered with an HTTP error instead of 101, already counted
/// and logged. Both transports (hyper, and the direct path) render it.
#[derive(Debug)]
pub struct Refusal {
    /// The HTTP status.
    pub status: StatusCode,
    /// The rejection reason: the metric label, and the response body.
    pub reason: &'static str,
    /// A header the client needs to act on the refusal.
    extra: Option<(HeaderName, HeaderValue)>,
}

impl Refusal {
    /// 503 with `Retry-After` for a connection admission control shed
    /// (counted when it was shed).
    pub fn overloaded(shed: Shed) -> Refusal {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: "overloaded",
            extra: Some((
                RETRY_AFTER,
                HeaderValue::from(retry_after_secs(shed.retry_ms)),
            )),
        }
    }

    /// The refusal as a hyper/warp response (the connection stays open).
    fn into_response(self) -> warp::reply::Response {
        let mut response = warp::reply::with_status(self.reason, self.status).into_response();
        if let Some((name, value)) = self.extra {
            response.headers_mut().insert(name, value);
        }
        response
    }

    /// The refusal as the bytes of an HTTP/1.1 response that closes the
    /// connection.
    pub fn write(&self, out: &mut Vec<u8>) {
        let status = self.status;
        let reason = status.canonical_reason().unwrap_or("");
        let _ = write!(
            out,
            "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: {}\r\nconnection: close\r\n",
            status.as_u16(),
            self.reason.len()
        );
        if let Some((name, value)) = &self.extra {
            let _ = write!(out, "{name}: ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.reason.as_bytes());
    }
}

/// The outcome of looking at an upgrade request.
enum Verdict {
    /// Answer with an HTTP error.
    Refused(Refusal),
    /// Answer 101 with this `Sec-WebSocket-Accept`, then serve or close.
    Upgrade(String, Admission),
}

/// Counts and logs an upgrade refused with an HTTP status.
fn refuse_http(
    gateway: &Gateway,
    reason: &'static str,
    status: StatusCode,
    peer: SocketAddr,
    target: &RedactedTarget<'_>,
) -> Refusal {
    gateway.count_rejection(reason);
    // Malformed and rate-limited handshakes are what a flood looks like: they
    // are counted, and logged only at debug so a flood cannot fill the logs.
    // Origin and credential refusals are an audit trail: info.
    let flood = matches!(
        reason,
        "rate_limited" | "not_upgrade" | "bad_version" | "bad_key" | "draining" | "shutting_down"
    );
    if flood {
        tracing::debug!(%peer, %target, reason, status = status.as_u16(), "upgrade refused");
    } else {
        tracing::info!(%peer, %target, reason, status = status.as_u16(), "upgrade refused");
    }
    Refusal {
        status,
        reason,
        extra: None,
    }
}

/// The request an upgrade is judged on, whichever way its head was read.
struct UpgradeRequest<'a> {
    headers: &'a HeaderMap,
    path: &'a str,
    query: Option<&'a str>,
    route: Route,
    peer: SocketAddr,
    /// Admission control shed the connection when it was accepted.
    shed: Option<Shed>,
}

impl UpgradeRequest<'_> {
    /// The target for logs: never the query, which may carry a ticket.
    fn target(&self) -> RedactedTarget<'_> {
        RedactedTarget {
            path: self.path,
            query: self.query,
        }
    }

    /// The `handshake` span every upgrade runs in (the connection's own
    /// span is its child).
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "handshake",
            peer = %self.peer,
            route = ?self.route,
            http.status = tracing::field::Empty
        )
    }
}

/// Answers an upgrade request that came through hyper (one that was not
/// the first request on its connection, or an HTTP/1.0 one): checks the
/// handshake, the per-IP rate, the Origin, the credentials and the
/// connection limit, then answers 101 and spawns the connection — or an
/// HTTP error.
pub async fn upgrade<B>(
    gateway: Arc<Gateway>,
    mut request: Request<B>,
    route: Route,
    peer: SocketAddr,
) -> warp::reply::Response {
    let uri = request.uri().clone();
    let about = UpgradeRequest {
        headers: request.headers(),
        path: uri.path(),
        query: uri.query(),
        route,
        peer,
        shed: None,
    };
    let span = about.span();
    let verdict = judge(&gateway, &about).instrument(span.clone()).await;
    let response = match verdict {
        Verdict::Refused(refusal) => refusal.into_response(),
        Verdict::Upgrade(accept, admission) => {
            let on_upgrade = hyper::upgrade::on(&mut request);
            let ws_config = gateway.ws_config;
            tokio::spawn(
                async move {
                    let upgraded = match on_upgrade.await {
                        Ok(upgraded) => upgraded,
                        Err(err) => {
                            tracing::debug!(%peer, %err, "upgrade did not complete");
                            if let Admission::Accept(handle, _) = admission {
                                gateway.hub.remove(handle.id);
                            }
                            return;
                        }
                    };
                    let socket = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(ws_config),
                    )
                    .await;
                    begin(gateway, socket, admission, peer, Welcome::Queue).await;
                }
                .instrument(span.clone()),
            );
            let mut response = warp::reply().into_response();
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(UPGRADE, http::HeaderValue::from_static("websocket"));
            headers.insert(CONNECTION, http::HeaderValue::from_static("Upgrade"));
            if let Ok(value) = http::HeaderValue::from_str(&accept) {
                headers.insert(SEC_WEBSOCKET_ACCEPT, value);
            }
            response
        }
    };
    span.record("http.status", response.status().as_u16());
    response
}

/// Answers an upgrade that was the first request on its connection, read by
/// the gateway itself ([`crate::head`]): the same checks as [`upgrade`], then
/// the 101 and the welcome frame in one write, and the connection goes on in
/// a task of its own. A refusal is written with `Connection: close`.
/// `rest` is what the client sent after the head (its first frames).
pub async fn upgrade_direct<IO>(
    gateway: Arc<Gateway>,
    mut io: IO,
    head: RequestHead,
    rest: Vec<u8>,
    route: Route,
    peer: SocketAddr,
    shed: Option<Shed>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let about = UpgradeRequest {
        headers: &head.headers,
        path: head.path(),
        query: head.query(),
        route,
        peer,
        shed,
    };
    let span = about.span();
    let verdict = judge(&gateway, &about).instrument(span.clone()).await;
    let mut out = Vec::with_capacity(512);
    let (status, admission) = match verdict {
        Verdict::Refused(refusal) => {
            refusal.write(&mut out);
            (refusal.status, None)
        }
        Verdict::Upgrade(accept, admission) => {
            let _ = write!(
                out,
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                 connection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            );
            if let Admission::Accept(handle, _) = &admission {
                connection::write_welcome(&gateway, handle, &mut out);
            }
            (StatusCode::SWITCHING_PROTOCOLS, Some(admission))
        }
    };
    span.record("http.status", status.as_u16());
    let written = async {
        io.write_all(&out).await?;
        io.flush().await
    };
    if let Err(err) = written.await {
        tracing::debug!(parent: &span, %peer, %err, "handshake response not written");
        if let Some(Admission::Accept(handle, _)) = admission {
            gateway.hub.remove(handle.id);
        }
        return;
    }
    let Some(admission) = admission else {
        let _ = io.shutdown().await;
        return;
    };
    drop(out);
    let socket =
        WebSocketStream::from_partially_read(io, rest, Role::Server, Some(gateway.ws_config)).await;
    begin(gateway, socket, admission, peer, Welcome::Written)
        .instrument(span)
        .await;
}

/// Starts serving an upgraded socket: the admitted connection gets a task of
/// its own, a refused one is closed with its code in this one.
async fn begin<S>(
    gateway: Arc<Gateway>,
    socket: WebSocketStream<S>,
    admission: Admission,
    peer: SocketAddr,
    welcome: Welcome,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match admission {
        // The connection's task is sized for what it holds while it lives
        // (the socket and its state), rather than for the largest of
        // everything the handshake awaits.
        Admission::Accept(handle, session) => {
            let connection = connection::run(gateway, socket, handle, session, peer, welcome);
            tokio::spawn(connection.in_current_span());
        }
        Admission::Refuse(code, reason) => {
            let timeout = Duration::from_millis(gateway.config.connection.close_timeout_ms);
            close_at_once(socket, code, reason, timeout).await
        }
    }
}

/// Looks at an upgrade request: the handshake, the per-IP rate, the Origin,
/// the credentials and the connection limit.
async fn judge(gateway: &Arc<Gateway>, request: &UpgradeRequest<'_>) -> Verdict {
    let target = request.target();
    let peer = request.peer;
    let headers = request.headers;
    let accept = match check_handshake(headers) {
        Ok(accept) => accept,
        Err(rejection) => {
            let mut refusal = refuse_http(
                gateway,
                rejection.reason(),
                rejection.status(),
                peer,
                &target,
            );
            if rejection == HandshakeRejection::BadVersion {
                refusal.extra = Some((SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13")));
            }
            return Verdict::Refused(refusal);
        }
    };
    // A draining or stopping gateway turns new connections away before any
    // other work (rate limit, Origin, credentials): cheaply, and with a time
    // to come back.
    if let Some(reason) = gateway.refusal(None) {
        return match turn_away(gateway, reason, peer, &target) {
            Ok(admission) => Verdict::Upgrade(accept, admission),
            Err(refusal) => Verdict::Refused(refusal),
        };
    }
    if let Some(shed) = request.shed {
        return overloaded(gateway, accept, shed, peer, &target);
    }
    if let Some(limiter) = &gateway.handshake_limiter {
        if !limiter.allow(peer.ip(), std::time::Instant::now()) {
            let mut refusal = refuse_http(
                gateway,
                "rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                peer,
                &target,
            );
            refusal.extra = Some((RETRY_AFTER, HeaderValue::from_static("1")));
            return Verdict::Refused(refusal);
        }
    }
    // Credentials may be checked against a JWKS fetch or Redis (tickets):
    // a bounded number of handshakes wait on them at once.
    let _slot = match gateway.shedder.begin() {
        Ok(slot) => slot,
        Err(shed) => return overloaded(gateway, accept, shed, peer, &target),
    };
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
    };
    if let Err(rejection) = gateway.origin.check(header(ORIGIN), header(HOST)) {
        let refusal = refuse_http(
            gateway,
            rejection.reason(),
            StatusCode::FORBIDDEN,
            peer,
            &target,
        );
        return Verdict::Refused(refusal);
    }
    match admit(gateway, request, &target).await {
        Ok(admission) => Verdict::Upgrade(accept, admission),
        Err(refusal) => Verdict::Refused(refusal),
    }
}

/// Authenticates the handshake and takes a connection slot. An error is the
/// HTTP refusal to send instead of upgrading (`auth.reject_with_http`).
async fn admit(
    gateway: &Arc<Gateway>,
    request: &UpgradeRequest<'_>,
    target: &RedactedTarget<'_>,
) -> Result<Admission, Refusal> {
    let peer = request.peer;
    let reject_with_http = gateway.config.auth.reject_with_http;
    let refused = |reason: &'static str, code: CloseCode, message: String| {
        gateway.count_rejection(reason);
        tracing::info!(%peer, %target, reason, code = code.as_u16(), "handshake refused after upgrade");
        Admission::Refuse(code, CloseReason::text(message))
    };
    let session = gateway
        .auth
        .authenticate(
            request.headers,
            request.query,
            gateway.tickets.as_ref(),
            unix_ms(),
        )
        .await;
    let session = match session {
        Ok(session) => session,
        Err(failure) if reject_with_http => {
            return Err(refuse_http(
                gateway,
                failure.reason(),
                failure.http_status(),
                peer,
                target,
            ))
        }
        Err(failure) => {
            return Ok(refused(
                failure.reason(),
                failure.close_code(),
                failure.to_string(),
            ))
        }
    };
    let max = gateway.config.connection.max_connections;
    let per_subject = gateway.config.auth.max_connections_per_subject;
    let limits = AdmitLimits { max, per_subject };
    match gateway
        .hub
        .admit(request.route, session.subject.clone(), limits)
    {
        Ok(handle) => {
            // A drain that started while this handshake was judged planned it
            // (it joined the hub before the drain's snapshot) or refuses it.
            if let Some(reason) = gateway.refusal(Some(&handle)) {
                gateway.hub.remove(handle.id);
                return turn_away(gateway, reason, peer, target);
            }
            tracing::debug!(%peer, %target, conn = %handle.label, method = session.method.as_str(), "handshake accepted");
            Ok(Admission::Accept(handle, session))
        }
        Err(refused_why) => {
            let (reason, status, message) = match refused_why {
                AdmitRefused::AtCapacity => (
                    "at_capacity",
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("at capacity ({max} connections)"),
                ),
                AdmitRefused::SubjectLimit => (
                    "subject_limit",
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("at most {per_subject} connections per subject"),
                ),
            };
            if reject_with_http {
                return Err(refuse_http(gateway, reason, status, peer, target));
            }
            let mut admission = refused(reason, CloseCode::AtCapacity, message);
            if let Admission::Refuse(_, reason) = &mut admission {
                // Spread the retries so a full gateway is not hit by all of them at once.
                reason.retry_ms = Some(1_000 + rand::random_range(0..4_000));
            }
            Ok(admission)
        }
    }
}

/// Counts and answers a handshake that admission control shed:
/// accepted and closed with 4003 and the `retry_ms` it was given (a browser
/// can read a close code, not an HTTP status), or 503 with `Retry-After`
/// with `auth.reject_with_http`. Nothing else is looked at: a shed
/// handshake costs a head read and one write.
fn overloaded(
    gateway: &Gateway,
    accept: String,
    shed: Shed,
    peer: SocketAddr,
    target: &RedactedTarget<'_>,
) -> Verdict {
    gateway.count_rejection("overloaded");
    tracing::debug!(%peer, %target, why = ?shed.why, retry_ms = shed.retry_ms, "handshake shed");
    if gateway.config.auth.reject_with_http {
        return Verdict::Refused(Refusal::overloaded(shed));
    }
    Verdict::Upgrade(
        accept,
        Admission::Refuse(
            CloseCode::AtCapacity,
            CloseReason {
                retry_ms: Some(shed.retry_ms),
                reason: Some("overloaded".to_owned()),
            },
        ),
    )
}

/// The least a refused client waits before it comes back to a draining or
/// stopping gateway: while the endpoints still list this pod, a client that
/// came back at once would find it again.
const MIN_TURN_AWAY_JITTER_MS: u64 = 1_000;

/// Turns a new connection away from a draining or stopping gateway: 4000
/// with a jittered `retry_ms` after the upgrade (or 503 + `Retry-After` with
/// `auth.reject_with_http`), counted under `reason`. The client was never
/// served here, so it is not counted as migrated by any drain.
fn turn_away(
    gateway: &Gateway,
    reason: &'static str,
    peer: SocketAddr,
    target: &RedactedTarget<'_>,
) -> Result<Admission, Refusal> {
    if gateway.config.auth.reject_with_http {
        let mut refusal = refuse_http(
            gateway,
            reason,
            StatusCode::SERVICE_UNAVAILABLE,
            peer,
            target,
        );
        refusal.extra = Some((RETRY_AFTER, HeaderValue::from_static("1")));
        return Err(refusal);
    }
    gateway.count_rejection(reason);
    tracing::debug!(%peer, %target, reason, "handshake turned away after upgrade");
    let window = gateway
        .config
        .drain
        .retry_jitter_ms
        .max(MIN_TURN_AWAY_JITTER_MS);
    Ok(Admission::Refuse(
        CloseCode::Migrate,
        CloseReason {
            retry_ms: Some(crate::drain::jitter(window)),
            reason: Some(reason.to_owned()),
        },
    ))
}

/// Sends a close frame on a connection that was accepted only to be refused,
/// and waits (bounded) for the peer's close.
async fn close_at_once<S>(
    mut socket: WebSocketStream<S>,
    code: CloseCode,
    reason: CloseReason,
    timeout: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: WireCloseCode::from(code.as_u16()),
        reason: Utf8Bytes::from(reason.to_json()),
    };
    if socket.close(Some(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(timeout, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::security::header_map as headers;

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn rfc_sample_key_is_accepted() {
        assert_eq!(
            check_handshake(&headers(&GOOD)).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[test]
    fn broken_handshakes_are_refused() {
        let table: [(usize, (&str, &str), HandshakeRejection); 4] = [
            (0, ("upgrade", "h2c"), HandshakeRejection::NotUpgrade),
            (
                1,
                ("connection", "keep-alive"),
                HandshakeRejection::NotUpgrade,
            ),
            (
                2,
                ("sec-websocket-version", "8"),
                HandshakeRejection::BadVersion,
            ),
            (
                3,
                ("sec-websocket-key", "short"),
                HandshakeRejection::BadKey,
            ),
        ];
        for (index, replacement, expected) in table {
            let mut pairs = GOOD;
            pairs[index] = replacement;
            assert_eq!(
                check_handshake(&headers(&pairs)),
                Err(expected),
                "{replacement:?}"
            );
        }
    }
}
