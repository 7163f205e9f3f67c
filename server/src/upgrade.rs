//! The WebSocket handshake, done on hyper directly rather than through
//! `warp::ws()`: warp does not expose tungstenite's buffer sizes, and its
//! default 128 KiB read buffer per connection would make an idle connection
//! cost thirty times what it must. Here every connection gets the configured
//! [`WebSocketConfig`].

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use warp::Reply;

use crate::hub::Route;
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

/// Answers an upgrade request on `route`: 101 and a connection task, or an HTTP error.
pub fn upgrade<B>(
    gateway: &Arc<Gateway>,
    mut request: Request<B>,
    route: Route,
    peer: SocketAddr,
) -> warp::reply::Response {
    let accept = match check_handshake(request.headers()) {
        Ok(accept) => accept,
        Err(rejection) => {
            gateway
                .metrics
                .handshakes_rejected
                .with_label_values(&[rejection.reason()])
                .inc();
            tracing::debug!(%peer, reason = rejection.reason(), "upgrade refused");
            let mut response =
                warp::reply::with_status(rejection.reason(), rejection.status()).into_response();
            if rejection == HandshakeRejection::BadVersion {
                response
                    .headers_mut()
                    .insert(SEC_WEBSOCKET_VERSION, http::HeaderValue::from_static("13"));
            }
            return response;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let gateway = gateway.clone();
    let ws_config = gateway.ws_config;
    tokio::spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let socket = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(ws_config),
                    )
                    .await;
                    crate::connection::run(gateway, socket, route, peer).await;
                }
                Err(err) => tracing::debug!(%peer, %err, "upgrade did not complete"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, http::HeaderValue::from_static(value));
        }
        map
    }

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
