//! HTTP routes of both listeners, as warp filters. WebSocket upgrades do not
//! come here (see [`crate::upgrade`]); everything else does.

use std::convert::Infallible;
use std::sync::Arc;

use http::StatusCode;
use std::time::Duration;

use switchyard_protocol::admin::{
    ApiError, PublishRequest, PublishResponse, RevokeRequest, RevokeResponse, TicketRequest,
    TicketResponse,
};
use switchyard_protocol::topic::{validate_topic, TopicPattern};
use tracing::Instrument;
use warp::{Filter, Rejection, Reply};

use crate::broker::BrokerError;
use crate::drain::DrainRefused;
use crate::gateway::Gateway;
use crate::security::tickets::{new_ticket, TicketError, TicketGrant};
use crate::security::token::MAX_TOKEN_PATTERNS;
use crate::security::unix_ms;
use switchyard_protocol::drain::DrainRequest;

const DEMO_PAGE: &str = include_str!("../static/index.html");
/// The browser client (client/js/switchyard.js), served at `/switchyard.js`.
const BROWSER_CLIENT: &str = include_str!("../../client/js/switchyard.js");

fn with_gateway(
    gateway: Arc<Gateway>,
) -> impl Filter<Extract = (Arc<Gateway>,), Error = Infallible> + Clone {
    warp::any().map(move || gateway.clone())
}

/// A JSON error response.
pub fn api_error(
    status: StatusCode,
    error: &str,
    message: impl Into<String>,
) -> warp::reply::Response {
    warp::reply::with_status(
        warp::reply::json(&ApiError {
            error: error.to_owned(),
            message: message.into(),
        }),
        status,
    )
    .into_response()
}

/// Public listener: demo page, health, readiness, metrics.
pub fn public_routes(
    gateway: Arc<Gateway>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let demo = warp::path::end()
        .and(warp::get())
        .map(|| warp::reply::html(DEMO_PAGE).into_response());
    let browser_client = warp::path!("switchyard.js").and(warp::get()).map(|| {
        warp::reply::with_header(
            BROWSER_CLIENT,
            "content-type",
            "text/javascript; charset=utf-8",
        )
        .into_response()
    });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| "ok".into_response());
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_gateway(gateway.clone()))
        .map(|gateway: Arc<Gateway>| {
            if gateway.is_draining() {
                warp::reply::with_status("draining", StatusCode::SERVICE_UNAVAILABLE)
                    .into_response()
            } else if let Err(why) = gateway.broker.health() {
                warp::reply::with_status(why, StatusCode::SERVICE_UNAVAILABLE).into_response()
            } else {
                match gateway.auth.jwks().map(|jwks| jwks.health()) {
                    Some(Err(why)) => {
                        warp::reply::with_status(why, StatusCode::SERVICE_UNAVAILABLE)
                            .into_response()
                    }
                    Some(Ok(Some(note))) => format!("ready ({note})").into_response(),
                    _ => "ready".into_response(),
                }
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_gateway(gateway))
        .map(|gateway: Arc<Gateway>| {
            warp::reply::with_header(
                gateway.metrics.render(),
                "content-type",
                "text/plain; version=0.0.4",
            )
            .into_response()
        });
    demo.or(browser_client)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(metrics)
        .unify()
        .recover(recover)
        .unify()
}

/// Admin listener: status, drain, revoke, and the publish and ticket APIs.
/// Every route needs the admin bearer token when one is configured (checked
/// before routing, in `server::serve_http`).
pub fn admin_routes(
    gateway: Arc<Gateway>,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let body_limit = gateway.config.websocket.max_message_bytes as u64 + 4096;
    let status = warp::path!("admin" / "status")
        .and(warp::get())
        .and(with_gateway(gateway.clone()))
        .map(|gateway: Arc<Gateway>| warp::reply::json(&gateway.status()).into_response());
    let publish = warp::path!("api" / "publish")
        .and(warp::post())
        .and(warp::body::content_length_limit(body_limit))
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .and(with_gateway(gateway.clone()))
        .then(publish);
    let drain_limit = 4096;
    let start_drain = warp::path!("admin" / "drain")
        .and(warp::post())
        .and(warp::body::content_length_limit(drain_limit))
        .and(warp::body::bytes())
        .and(with_gateway(gateway.clone()))
        .map(start_drain);
    let tickets = warp::path!("api" / "tickets")
        .and(warp::post())
        .and(warp::body::content_length_limit(64 * 1024))
        .and(warp::body::bytes())
        .and(with_gateway(gateway.clone()))
        .then(mint_ticket);
    let revoke = warp::path!("admin" / "revoke")
        .and(warp::post())
        .and(warp::body::content_length_limit(4096))
        .and(warp::body::bytes())
        .and(with_gateway(gateway.clone()))
        .map(revoke);
    let cancel_drain = warp::path!("admin" / "drain")
        .and(warp::delete())
        .and(with_gateway(gateway))
        .map(
            |gateway: Arc<Gateway>| match crate::drain::cancel(gateway.as_ref()) {
                Ok(drain) => {
                    warp::reply::json(&drain.status(gateway.hub.len() as u64)).into_response()
                }
                Err(err) => api_error(StatusCode::CONFLICT, err.code(), err.to_string()),
            },
        );
    status
        .or(publish)
        .unify()
        .or(start_drain)
        .unify()
        .or(cancel_drain)
        .unify()
        .or(tickets)
        .unify()
        .or(revoke)
        .unify()
        .recover(recover)
        .unify()
}

/// The 401 every admin route answers without the bearer token.
/// A request the admin listener refuses as coming from a web page: 403 (415
/// for a body not declared JSON), counted by reason.
pub fn admin_refused(
    gateway: &Gateway,
    refusal: crate::security::browser::BrowserRefusal,
) -> warp::reply::Response {
    use crate::security::browser::BrowserRefusal;
    gateway
        .metrics
        .admin_refused
        .with_label_values(&[refusal.as_str()])
        .inc();
    let status = match refusal {
        BrowserRefusal::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        _ => StatusCode::FORBIDDEN,
    };
    api_error(status, refusal.as_str(), refusal.message())
}

pub fn admin_unauthorized(gateway: &Gateway) -> warp::reply::Response {
    gateway.metrics.admin_unauthorized.inc();
    let mut response = api_error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send Authorization: Bearer <admin token>",
    );
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"switchyard-admin\""),
    );
    response
}

fn parse_patterns(list: &Option<Vec<String>>, max_len: usize, field: &str) -> Result<(), String> {
    let Some(list) = list else { return Ok(()) };
    if list.len() > MAX_TOKEN_PATTERNS {
        return Err(format!("{field}: at most {MAX_TOKEN_PATTERNS} patterns"));
    }
    for pattern in list {
        TopicPattern::parse(pattern, max_len).map_err(|e| format!("{field}: {pattern:?}: {e}"))?;
    }
    Ok(())
}

/// `POST /api/tickets`: mints a single-use ticket for a subject the caller
/// (the application backend) has authenticated.
async fn mint_ticket(body: bytes::Bytes, gateway: Arc<Gateway>) -> warp::reply::Response {
    let request: TicketRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{sub, subscribe?: [pattern], publish?: [pattern], exp?: unix seconds}}: {err}"),
            )
        }
    };
    let settings = &gateway.config.auth.tickets;
    let now_s = unix_ms() / 1000;
    let max_len = gateway.config.topics.max_topic_length;
    let checked = if let Err(message) = crate::security::check_subject(&request.sub) {
        Err(message)
    } else if request.exp.is_some_and(|exp| exp <= now_s) {
        Err("exp is in the past".to_owned())
    } else {
        parse_patterns(&request.subscribe, max_len, "subscribe")
            .and_then(|()| parse_patterns(&request.publish, max_len, "publish"))
    };
    if let Err(message) = checked {
        return api_error(StatusCode::BAD_REQUEST, "bad_request", message);
    }
    let grant = TicketGrant {
        exp: request
            .exp
            .unwrap_or(now_s + settings.session_ttl_ms.div_ceil(1000)),
        sub: request.sub,
        subscribe: request.subscribe,
        publish: request.publish,
        minted_at: now_s,
    };
    let ticket = new_ticket();
    let ttl = Duration::from_millis(settings.ttl_ms);
    let grant_json = match serde_json::to_string(&grant) {
        Ok(json) => json,
        Err(err) => {
            return api_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                err.to_string(),
            )
        }
    };
    match gateway.tickets.store_ticket(&ticket, grant_json, ttl).await {
        Ok(()) => {
            gateway.metrics.tickets_issued.inc();
            warp::reply::with_status(
                warp::reply::json(&TicketResponse {
                    ticket,
                    expires_in_ms: settings.ttl_ms,
                }),
                StatusCode::CREATED,
            )
            .into_response()
        }
        Err(err @ TicketError::Full(_)) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "tickets_full",
            err.to_string(),
        ),
        Err(err) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            err.to_string(),
        ),
    }
}

/// `POST /admin/revoke {sub}`: closes that subject's connections with 4503.
fn revoke(body: bytes::Bytes, gateway: Arc<Gateway>) -> warp::reply::Response {
    match serde_json::from_slice::<RevokeRequest>(&body) {
        Ok(request) if !request.sub.is_empty() => {
            let closed = gateway.revoke(&request.sub) as u64;
            warp::reply::json(&RevokeResponse {
                sub: request.sub,
                closed,
            })
            .into_response()
        }
        Ok(_) => api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "sub must not be empty",
        ),
        Err(err) => api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {{\"sub\": string}}: {err}"),
        ),
    }
}

fn start_drain(body: bytes::Bytes, gateway: Arc<Gateway>) -> warp::reply::Response {
    let request: DrainRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "expected {{window_ms, max_rate, deadline_ms, mode: close|make_before_break, retry_jitter_ms?, migrate_grace_ms?}}: {err}"
                ),
            )
        }
    };
    match crate::drain::start(&gateway, request) {
        Ok(drain) => warp::reply::with_status(
            warp::reply::json(&drain.status(gateway.hub.len() as u64)),
            StatusCode::ACCEPTED,
        )
        .into_response(),
        Err(err @ (DrainRefused::AlreadyDraining | DrainRefused::ShuttingDown)) => {
            api_error(StatusCode::CONFLICT, err.code(), err.to_string())
        }
        Err(err) => api_error(StatusCode::BAD_REQUEST, "bad_request", err.to_string()),
    }
}

async fn publish(
    headers: http::HeaderMap,
    body: bytes::Bytes,
    gateway: Arc<Gateway>,
) -> warp::reply::Response {
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{\"topic\": string, \"data\": any JSON}}: {err}"),
            )
        }
    };
    if let Err(err) = validate_topic(&request.topic, gateway.config.topics.max_topic_length) {
        return api_error(StatusCode::BAD_REQUEST, "invalid_topic", err.to_string());
    }
    // The publish (and the fan-out inside it) continues the caller's trace.
    let span = tracing::info_span!(
        "publish",
        topic = %request.topic,
        offset = tracing::field::Empty
    );
    switchyard_telemetry::continue_trace(&span, &headers);
    let published = gateway
        .publish(&request.topic, &request.data)
        .instrument(span.clone())
        .await;
    if let Ok(position) = &published {
        span.record("offset", position.offset);
    }
    match published {
        Ok(position) => warp::reply::json(&PublishResponse {
            topic: request.topic,
            position,
        })
        .into_response(),
        Err(err @ BrokerError::TooManyTopics(_)) => api_error(
            StatusCode::INSUFFICIENT_STORAGE,
            "too_many_topics",
            err.to_string(),
        ),
        Err(err @ BrokerError::Unavailable(_)) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            err.to_string(),
        ),
        Err(err @ BrokerError::OutcomeUnknown(_)) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "outcome_unknown",
            err.to_string(),
        ),
    }
}

/// Turns warp's rejections into JSON errors with the right status.
async fn recover(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let response = if rejection.is_not_found() {
        api_error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body exceeds websocket.max_message_bytes",
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        api_error(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "send a Content-Length header",
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        api_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        )
    } else {
        api_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{rejection:?}"),
        )
    };
    Ok(response)
}
