//! The gateway's shared state: configuration, metrics, the hub of live
//! connections, the broker, the security checks, the drain slot and the
//! shutdown flag — what the listeners, the handshake, the connections and
//! the drain engine all reach. Built once per process by [`Gateway::new`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::value::RawValue;
use switchyard_protocol::admin::StatusResponse;
use switchyard_protocol::{CloseCode, Position};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::broker::backplane::{BackplaneMetrics, RedisBroker, RedisOptions};
use crate::broker::log::Retention;
use crate::broker::memory::{MemoryBroker, MemorySettings};
use crate::broker::{Broker, BrokerError};
use crate::config::{AdminSettings, BrokerKind, Config, ConfigError};
use crate::drain::{DrainHost, Drains};
use crate::hub::{ConnHandle, Hub};
use crate::metrics::{Initiator, Metrics};
use crate::outbox::OutboxLimits;
use crate::security::auth::{AdminAuth, Authenticator};
use crate::security::expiry::SessionExpiries;
use crate::security::origin::OriginPolicy;
use crate::security::ratelimit::IpRateLimiter;
use crate::security::shed::{ShedLimits, Shedder};
use crate::security::tickets::TicketStore;
use crate::security::unix_ms;

/// Addresses the per-IP handshake limiter tracks at most: its memory stays
/// bounded (a bucket and a map entry each) under a flood from many
/// addresses, and a busy gateway's legitimate clients still fit.
const MAX_RATE_LIMITED_IPS: usize = 100_000;

/// Everything the listeners and connections share. Outside the crate only
/// its construction and its metrics are reachable (for embedding and the
/// load generator's tests); the rest is the gateway's own.
pub struct Gateway {
    /// The effective configuration.
    pub(crate) config: Config,
    /// This gateway's id.
    pub(crate) server_id: String,
    /// Metrics.
    pub metrics: Metrics,
    /// Live connections.
    pub(crate) hub: Hub,
    /// Topic broker.
    pub(crate) broker: Arc<dyn Broker>,
    /// Where connection tickets live (the same memory or Redis store as the
    /// broker's, reached through its own trait).
    pub(crate) tickets: Arc<dyn TicketStore>,
    /// tungstenite settings for every connection.
    pub(crate) ws_config: WebSocketConfig,
    started: Instant,
    /// The drain state: the current or last drain, shutting down.
    pub(crate) drains: Drains,
    /// The Origin check of the public listener.
    pub(crate) origin: OriginPolicy,
    /// Authenticates handshakes; holds the revocations.
    pub(crate) auth: Authenticator,
    /// The admin listener's bearer token.
    pub(crate) admin_auth: AdminAuth,
    /// TLS on the public listener, when configured.
    pub(crate) public_tls: Option<TlsAcceptor>,
    /// TLS on the admin listener, when configured.
    pub(crate) admin_tls: Option<TlsAcceptor>,
    /// Handshakes per second per IP, when limited.
    pub(crate) handshake_limiter: Option<IpRateLimiter>,
    /// Admission control on the public listener: every client together.
    pub(crate) shedder: Shedder,
    /// When each authenticated session expires.
    pub(crate) expiries: SessionExpiries,
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
        let (broker, tickets) = make_broker(&config, &metrics)?;
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
        // What the settings name but only startup can check (files, keys,
        // certificates) fails as a configuration error naming the setting,
        // which the binary reports with exit code 2 like any other.
        let origin = OriginPolicy::new(
            &config.origin.allowed,
            config.origin.allow_same_host,
            config.origin.allow_missing,
        )
        .map_err(|err| ConfigError::field("origin.allowed", err.to_string()))?;
        let auth = Authenticator::new(&config)
            .map_err(|err| ConfigError::field("auth.jwt", err.to_string()))?;
        let admin_auth = AdminAuth::new(admin_token(&config.admin)?);
        let public_tls = crate::tls::acceptor(&config.tls, "tls")
            .map_err(|err| ConfigError::field("tls", err.to_string()))?;
        let admin_tls = crate::tls::acceptor(&config.admin.tls, "admin.tls")
            .map_err(|err| ConfigError::field("admin.tls", err.to_string()))?;
        let handshake_limiter = (ws.handshake_rate_per_ip > 0).then(|| {
            IpRateLimiter::new(
                ws.handshake_rate_per_ip,
                ws.handshake_burst_per_ip,
                MAX_RATE_LIMITED_IPS,
            )
        });
        let shedder = Shedder::new(ShedLimits {
            max_in_flight: ws.max_handshakes_in_flight,
            rate: ws.handshake_rate,
            burst: ws.handshake_burst,
        });
        Ok(Arc::new(Gateway {
            shedder,
            origin,
            auth,
            admin_auth,
            handshake_limiter,
            public_tls,
            admin_tls,
            expiries: SessionExpiries::default(),
            metrics,
            hub: Hub::new(server_id.clone(), limits),
            broker,
            tickets,
            ws_config,
            started: Instant::now(),
            drains: Drains::default(),
            server_id,
            config,
        }))
    }

    /// Counts a handshake refused for `reason` (every refusal, at any layer, comes here).
    pub(crate) fn count_rejection(&self, reason: &str) {
        self.metrics
            .handshakes_rejected
            .with_label_values(&[reason])
            .inc();
    }

    /// Whether the gateway refuses new work (readiness is 503); see
    /// [`Drains::is_draining`].
    pub(crate) fn is_draining(&self) -> bool {
        self.drains.is_draining()
    }

    /// Why a new connection is refused now, if it is; see [`Drains::refusal`].
    pub(crate) fn refusal(&self, admitted: Option<&ConnHandle>) -> Option<&'static str> {
        self.drains.refusal(admitted)
    }

    /// SIGTERM or SIGINT: readiness goes to 503 and new connections are turned away.
    pub(crate) fn set_shutting_down(&self) {
        self.drains.set_shutting_down(&self.metrics);
    }

    /// Counts a connection that ended, for the drain that planned it (if
    /// any); `initiator` says who closed it.
    pub(crate) fn connection_ended(&self, handle: &ConnHandle, initiator: Initiator) {
        self.drains
            .connection_ended(handle, initiator, &self.metrics);
    }

    /// Closes every connection of `subject` with 4503 and refuses its older
    /// credentials from now on; returns how many connections were closed.
    pub(crate) fn revoke(&self, subject: &str) -> usize {
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
    pub(crate) async fn publish(
        &self,
        topic: &str,
        data: &RawValue,
    ) -> Result<Position, BrokerError> {
        match self.broker.publish(topic, data).await {
            Ok(position) => {
                self.metrics.messages_published.inc();
                Ok(position)
            }
            Err(err) => {
                self.metrics
                    .publishes_failed
                    .with_label_values(&[err.reason()])
                    .inc();
                Err(err)
            }
        }
    }

    /// The `/admin/status` body.
    pub(crate) fn status(&self) -> StatusResponse {
        StatusResponse {
            server_id: self.server_id.clone(),
            connections: self.hub.len() as u64,
            subscriptions: self.metrics.subscriptions.get().max(0) as u64,
            topics: self.broker.topic_count() as u64,
            draining: self.is_draining(),
            uptime_seconds: self.started.elapsed().as_secs(),
            drain: self
                .drains
                .current()
                .map(|d| d.status(self.hub.len() as u64)),
            admission: Some(self.shedder.status(self.metrics.shed_total())),
        }
    }
}

impl DrainHost for Gateway {
    fn hub(&self) -> &Hub {
        &self.hub
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn drains(&self) -> &Drains {
        &self.drains
    }

    fn default_migrate_grace(&self) -> Duration {
        Duration::from_millis(self.config.drain.migrate_grace_ms)
    }

    fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.config.connection.close_timeout_ms)
    }
}

/// The admin token from `admin.token` or `admin.token_file`.
fn admin_token(settings: &AdminSettings) -> Result<Option<String>, ConfigError> {
    let (token, field) = match (&settings.token, &settings.token_file) {
        (Some(token), _) => (token.clone(), "admin.token"),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                ConfigError::field("admin.token_file", format!("cannot read {path}: {err}"))
            })?;
            (text.trim().to_owned(), "admin.token_file")
        }
        (None, None) => return Ok(None),
    };
    if token.len() < 16 {
        return Err(ConfigError::field(
            field,
            "the admin token must be at least 16 bytes",
        ));
    }
    Ok(Some(token))
}

/// The broker the config asks for, and its ticket store.
fn make_broker(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<(Arc<dyn Broker>, Arc<dyn TicketStore>)> {
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
            Ok((memory.clone(), memory))
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
                    foreign_messages: metrics.backplane_foreign_messages.clone(),
                    stale_messages: metrics.backplane_stale_messages.clone(),
                },
            })
            .map_err(|err| ConfigError::field("redis", err.to_string()))?;
            Ok((redis.clone(), redis))
        }
    }
}
