//! The WebSocket handshake, done on hyper directly rather than through
//! `warp::ws()`: warp does not expose tungstenite's buffer sizes, and its
//! default 128 KiB read buffer per connection would make an idle connection
//! cost thirty times what it must. Here every connection gets the configured
//! [`WebSocketConfig`].

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use futures_util::StreamExt;
use http::header::{
    CONNECTION, HOST, ORIGIN, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::CloseCode;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use warp::Reply;

use crate::hub::{ConnHandle, Route};
use crate::security::{unix_ms, RedactedTarget, Session};
use crate::server::Gateway;

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

/// Counts and logs an upgrade refused with an HTTP status.
fn refuse_http(
    gateway: &Gateway,
    reason: &'static str,
    status: StatusCode,
    peer: SocketAddr,
    target: &RedactedTarget<'_>,
) -> warp::reply::Response {
    gateway.count_rejection(reason);
    // Malformed and rate-limited handshakes are what a flood looks like: they
    // are counted, and logged only at debug so a flood cannot fill the logs.
    // Origin and credential refusals are an audit trail: info.
    let flood = matches!(
        reason,
        "rate_limited" | "not_upgrade" | "bad_version" | "bad_key"
    );
    if flood {
        tracing::debug!(%peer, %target, reason, status = status.as_u16(), "upgrade refused");
    } else {
        tracing::info!(%peer, %target, reason, status = status.as_u16(), "upgrade refused");
    }
    warp::reply::with_status(reason, status).into_response()
}

/// Answers an upgrade request on `route`: checks the handshake, the per-IP
/// rate, the Origin, the credentials and the connection limit, then answers
/// 101 and spawns the connection — or an HTTP error. All of it runs in a
/// `handshake` span (the connection's own span is its child).
pub async fn upgrade<B>(
    gateway: Arc<Gateway>,
    request: Request<B>,
    route: Route,
    peer: SocketAddr,
) -> warp::reply::Response {
    let span = tracing::info_span!(
        "handshake",
        %peer,
        route = ?route,
        http.status = tracing::field::Empty
    );
    let response = upgrade_checked(gateway, request, route, peer)
        .instrument(span.clone())
        .await;
    span.record("http.status", response.status().as_u16());
    response
}

async fn upgrade_checked<B>(
    gateway: Arc<Gateway>,
    mut request: Request<B>,
    route: Route,
    peer: SocketAddr,
) -> warp::reply::Response {
    // Never log the query: it may carry a ticket.
    let uri = request.uri().clone();
    let target = RedactedTarget {
        path: uri.path(),
        query: uri.query(),
    };
    let accept = match check_handshake(request.headers()) {
        Ok(accept) => accept,
        Err(rejection) => {
            let mut response = refuse_http(
                &gateway,
                rejection.reason(),
                rejection.status(),
                peer,
                &target,
            );
            if rejection == HandshakeRejection::BadVersion {
                response
                    .headers_mut()
                    .insert(SEC_WEBSOCKET_VERSION, http::HeaderValue::from_static("13"));
            }
            return response;
        }
    };
    if let Some(limiter) = &gateway.handshake_limiter {
        if !limiter.allow(peer.ip(), std::time::Instant::now()) {
            let mut response = refuse_http(
                &gateway,
                "rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                peer,
                &target,
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, http::HeaderValue::from_static("1"));
            return response;
        }
    }
    let headers = request.headers();
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
    };
    if let Err(rejection) = gateway.origin.check(header(ORIGIN), header(HOST)) {
        return refuse_http(
            &gateway,
            rejection.reason(),
            StatusCode::FORBIDDEN,
            peer,
            &target,
        );
    }
    let admission = match admit(&gateway, &request, route, peer, &target).await {
        Ok(admission) => admission,
        Err(response) => return response,
    };
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
            match admission {
                // The connection gets a task of its own, sized for what it
                // holds while it lives (the socket and its state), rather
                // than going on in this one, whose allocation is sized for
                // the largest of everything it awaits (the upgrade, the
                // refusal path).
                Admission::Accept(handle, session) => {
                    let connection = crate::connection::run(gateway, socket, handle, session, peer);
                    tokio::spawn(connection.in_current_span());
                }
                Admission::Refuse(code, reason) => {
                    let timeout = Duration::from_millis(gateway.config.connection.close_timeout_ms);
                    close_at_once(socket, code, reason, timeout).await
                }
            }
        }
        .in_current_span(),
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

/// Authenticates the handshake and takes a connection slot. An error is the
/// HTTP response to send instead of upgrading (`auth.reject_with_http`).
async fn admit<B>(
    gateway: &Arc<Gateway>,
    request: &Request<B>,
    route: Route,
    peer: SocketAddr,
    target: &RedactedTarget<'_>,
) -> Result<Admission, warp::reply::Response> {
    let reject_with_http = gateway.config.auth.reject_with_http;
    let refused = |reason: &'static str, code: CloseCode, message: String| {
        gateway.count_rejection(reason);
        tracing::info!(%peer, %target, reason, code = code.as_u16(), "handshake refused after upgrade");
        Admission::Refuse(code, CloseReason::text(message))
    };
    let session = gateway
        .auth
        .authenticate(
            request.headers(),
            request.uri().query(),
            gateway.broker.as_ref(),
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
    match gateway.hub.admit(route, session.subject.clone(), max) {
        Some(handle) => {
            tracing::debug!(%peer, %target, conn = %handle.label, method = session.method.as_str(), "handshake accepted");
            Ok(Admission::Accept(handle, session))
        }
        None if reject_with_http => Err(refuse_http(
            gateway,
            "at_capacity",
            StatusCode::SERVICE_UNAVAILABLE,
            peer,
            target,
        )),
        None => {
            let mut admission = refused(
                "at_capacity",
                CloseCode::AtCapacity,
                format!("at capacity ({max} connections)"),
            );
            if let Admission::Refuse(_, reason) = &mut admission {
                // Spread the retries so a full gateway is not hit by all of them at once.
                reason.retry_ms = Some(1_000 + rand::random_range(0..4_000));
            }
            Ok(admission)
        }
    }
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
