//! Prometheus metrics, all named `switchyard_*`, on a registry of our own.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::local::LocalHistogram;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Tells `Metrics` instances apart (tests run several gateways in one
/// process), so a thread's cached local histogram is never flushed into the
/// wrong registry.
static NEXT_METRICS_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's buffer for fan-out latencies, with the id of the
    /// `Metrics` it belongs to.
    static FANOUT_LATENCY_LOCAL: RefCell<Option<(u64, LocalHistogram)>> = const { RefCell::new(None) };
}

/// Who ended a connection, for `switchyard_connections_closed_total{initiator}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The client sent a close frame.
    Client,
    /// The gateway sent a close frame.
    Server,
    /// The connection ended without a close handshake (reset, EOF, reaped).
    Abrupt,
}

impl Initiator {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Server => "server",
            Initiator::Abrupt => "abrupt",
        }
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    id: u64,
    registry: Registry,
    /// `switchyard_connections`: open WebSocket connections.
    pub connections: IntGauge,
    /// `switchyard_connections_opened_total`.
    pub connections_opened: IntCounter,
    /// `switchyard_connections_closed_total{code,initiator}`.
    pub connections_closed: IntCounterVec,
    /// `switchyard_handshakes_rejected_total{reason}`: upgrades refused before a connection existed.
    pub handshakes_rejected: IntCounterVec,
    /// `switchyard_messages_received_total`: data frames from clients.
    pub messages_received: IntCounter,
    /// `switchyard_messages_sent_total`: data frames to clients.
    pub messages_sent: IntCounter,
    /// `switchyard_message_bytes_received_total`.
    pub bytes_received: IntCounter,
    /// `switchyard_message_bytes_sent_total`.
    pub bytes_sent: IntCounter,
    /// `switchyard_messages_published_total`: messages accepted into topic logs.
    pub messages_published: IntCounter,
    /// `switchyard_slow_consumers_total{reason}`: connections the server
    /// closed with 4002, by [`crate::outbox::Slow`] (a full queue, a
    /// subscribe backlog or a backplane recovery that overflowed, a publish
    /// rate abused `max_violations` times in a row: the same code).
    pub slow_consumers: IntCounterVec,
    /// `switchyard_protocol_violations_total{kind}`.
    pub protocol_violations: IntCounterVec,
    /// `switchyard_subscriptions`: active topic subscriptions.
    pub subscriptions: IntGauge,
    /// `switchyard_resume_total{recovered}`: subscribes with `since`.
    pub resume: IntCounterVec,
    /// `switchyard_fanout_latency_seconds`: publish accepted → frame written to the socket.
    pub fanout_latency: Histogram,
    /// `switchyard_draining`: 1 while the gateway refuses new work.
    pub draining: IntGauge,
    /// `switchyard_drain_active`: 1 while a drain runs.
    pub drain_active: IntGauge,
    /// `switchyard_drain_remaining`: the running drain's planned connections not yet gone (0 with no drain running).
    pub drain_remaining: IntGauge,
    /// `switchyard_drain_total`: connections the running drain planned to
    /// move (0 with no drain running): with `drain_remaining`, its progress.
    pub drain_total: IntGauge,
    /// `switchyard_drain_max_rate`: the running drain's cap on signals per
    /// second (0 with no drain running), to draw against the signal rate.
    pub drain_max_rate: IntGauge,
    /// `switchyard_drain_deadline_timestamp_seconds`: when the running drain
    /// closes what is left (unix time; 0 with no drain running).
    pub drain_deadline: IntGauge,
    /// `switchyard_migrations_total{how="client|slot|deadline|other"}`.
    pub migrations: IntCounterVec,
    /// `switchyard_drain_signals_total{signal="migrate|close"}`: `migrate`
    /// frames queued at their slots, and 4000 closes started at a slot or
    /// when a migrate's grace ran out (not at the deadline): the drain's
    /// pace as the gateway sends it.
    pub drain_signals: IntCounterVec,
    /// `switchyard_backplane_up`: 1 while the Redis backplane is connected (always 1 for memory).
    pub backplane_up: IntGauge,
    /// `switchyard_backplane_publish_seconds`: one publish round trip to the backplane.
    pub backplane_publish_seconds: Histogram,
    /// `switchyard_backplane_reconnects_total`.
    pub backplane_reconnects: IntCounter,
    /// `switchyard_backplane_recovered_messages_total`: messages a pod missed
    /// on pub/sub and delivered from the stream after reconnecting.
    pub backplane_recovered_messages: IntCounter,
    /// `switchyard_backplane_foreign_messages_total`: pub/sub messages of
    /// another deployment whose prefix and topic name the same channel,
    /// dropped.
    pub backplane_foreign_messages: IntCounter,
    /// `switchyard_backplane_stale_messages_total`: pub/sub messages of an
    /// epoch their topic has moved past (its keys were lost and made
    /// again), dropped.
    pub backplane_stale_messages: IntCounter,
    /// `switchyard_authorization_denied_total{action="subscribe|publish"}`:
    /// requests on topics the session may not use.
    pub authorization_denied: IntCounterVec,
    /// `switchyard_publishes_rate_limited_total`: client publishes refused by the rate limit.
    pub publishes_rate_limited: IntCounter,
    /// `switchyard_publishes_failed_total{reason}`: publishes (admin API and
    /// clients) the broker did not take, by [`crate::broker::BrokerError`]:
    /// `unavailable` (Redis unreachable, not published), `outcome_unknown`
    /// (sent, no answer), `too_many_topics`.
    pub publishes_failed: IntCounterVec,
    /// `switchyard_sessions_ended_total{reason="expired|revoked"}`: connections
    /// closed because their session ended (4001, 4503).
    pub sessions_ended: IntCounterVec,
    /// `switchyard_admin_unauthorized_total`: admin requests without the bearer token.
    pub admin_unauthorized: IntCounter,
    /// `switchyard_admin_refused_total{reason}`: admin requests refused as
    /// coming from a web page (`security::browser`).
    pub admin_refused: IntCounterVec,
    /// `switchyard_tickets_issued_total`.
    pub tickets_issued: IntCounter,
    /// `switchyard_jwks_*`: fetches of `auth.jwt.jwks_url` and the set in hand.
    pub jwks: crate::security::jwks::JwksMetrics,
}

/// Every `reason` of `switchyard_handshakes_rejected_total` (README, metrics),
/// started at zero.
pub const HANDSHAKE_REJECTIONS: [&str; 21] = [
    "not_upgrade",
    "bad_version",
    "bad_key",
    "rate_limited",
    "origin_not_allowed",
    "origin_missing",
    "missing_credentials",
    "bad_token",
    "token_expired",
    "bad_ticket",
    "revoked",
    "auth_unavailable",
    "at_capacity",
    "header_too_large",
    "handshake_timeout",
    "tls_failed",
    "subject_limit",
    "draining",
    "shutting_down",
    "overloaded",
    "overloaded_tls",
];

/// Every `kind` of `switchyard_protocol_violations_total`, started at zero:
/// frames (`bad_frame`, `unknown_op`, `binary`, `invalid_topic`,
/// `too_many_subscriptions`) and the closes on bad input (`too_big`,
/// `invalid_utf8`, `framing`).
pub const PROTOCOL_VIOLATIONS: [&str; 8] = [
    "bad_frame",
    "unknown_op",
    "binary",
    "invalid_topic",
    "too_many_subscriptions",
    "too_big",
    "invalid_utf8",
    "framing",
];

/// The `reason` labels of connections admission control shed
/// (`security::shed`): answered 4003/503, or closed before TLS.
pub const SHED_REASONS: [&str; 2] = ["overloaded", "overloaded_tls"];

impl Metrics {
    /// Connections admission control has shed so far.
    pub fn shed_total(&self) -> u64 {
        SHED_REASONS
            .iter()
            .map(|reason| self.handshakes_rejected.with_label_values(&[reason]).get())
            .sum()
    }

    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        // The process's own resources and what was built, for the
        // dashboards' memory, open-files and version panels.
        switchyard_telemetry::process::register(&registry, "gateway")?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let metric = IntCounter::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(metric.clone()))?;
                Ok(metric)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let fanout_latency = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_fanout_latency_seconds",
                "Time from a publish being accepted to its frame being written to a subscriber's socket.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(fanout_latency.clone()))?;
        let backplane_publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_backplane_publish_seconds",
                "Time of one publish round trip to the Redis backplane.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
        )?;
        registry.register(Box::new(backplane_publish_seconds.clone()))?;
        let metrics = Metrics {
            id: NEXT_METRICS_ID.fetch_add(1, Ordering::Relaxed),
            connections: gauge("switchyard_connections", "Open WebSocket connections.")?,
            connections_opened: counter(
                "switchyard_connections_opened_total",
                "WebSocket connections accepted.",
            )?,
            connections_closed: counter_vec(
                "switchyard_connections_closed_total",
                "WebSocket connections ended, by close code and by who ended them (client, server, abrupt).",
                &["code", "initiator"],
            )?,
            handshakes_rejected: counter_vec(
                "switchyard_handshakes_rejected_total",
                "WebSocket upgrade requests refused before a connection existed.",
                &["reason"],
            )?,
            messages_received: counter(
                "switchyard_messages_received_total",
                "Data frames received from clients.",
            )?,
            messages_sent: counter(
                "switchyard_messages_sent_total",
                "Data frames written to clients.",
            )?,
            bytes_received: counter(
                "switchyard_message_bytes_received_total",
                "Payload bytes of data frames received from clients.",
            )?,
            bytes_sent: counter(
                "switchyard_message_bytes_sent_total",
                "Payload bytes of data frames written to clients.",
            )?,
            messages_published: counter(
                "switchyard_messages_published_total",
                "Messages accepted into topic logs.",
            )?,
            slow_consumers: counter_vec(
                "switchyard_slow_consumers_total",
                "Connections the server closed with 4002, by reason: queue_full (its outgoing queue), subscribe_backlog, recovery_overflow (the backplane's), publish_rate (abused max_violations times in a row).",
                &["reason"],
            )?,
            protocol_violations: counter_vec(
                "switchyard_protocol_violations_total",
                "Client frames that broke the protocol, by kind.",
                &["kind"],
            )?,
            subscriptions: gauge("switchyard_subscriptions", "Active topic subscriptions.")?,
            resume: counter_vec(
                "switchyard_resume_total",
                "Subscriptions with `since`, by whether the stream was recovered without a gap.",
                &["recovered"],
            )?,
            fanout_latency,
            draining: gauge(
                "switchyard_draining",
                "1 while the gateway is draining or shutting down.",
            )?,
            drain_active: gauge("switchyard_drain_active", "1 while a drain runs.")?,
            drain_total: gauge(
                "switchyard_drain_total",
                "Connections the running drain planned to move (0 with no drain running).",
            )?,
            drain_max_rate: gauge(
                "switchyard_drain_max_rate",
                "The running drain's cap on migrate frames and closes per second (0 with no drain running).",
            )?,
            drain_deadline: gauge(
                "switchyard_drain_deadline_timestamp_seconds",
                "Unix time at which the running drain closes what is left (0 with no drain running).",
            )?,
            drain_remaining: gauge(
                "switchyard_drain_remaining",
                "Connections the running drain planned that are still open (0 when no drain runs).",
            )?,
            migrations: counter_vec(
                "switchyard_migrations_total",
                "Connections a drain planned, by how they left: client (closed by the client after migrate), slot (4000 at its slot or after the grace), deadline (4000 at the deadline), other (any other end).",
                &["how"],
            )?,
            drain_signals: counter_vec(
                "switchyard_drain_signals_total",
                "Drain signals sent: migrate frames at their slots, 4000 closes at a slot or after the grace.",
                &["signal"],
            )?,
            backplane_up: gauge(
                "switchyard_backplane_up",
                "1 while the topic backplane is reachable (always 1 for the in-memory broker).",
            )?,
            backplane_publish_seconds,
            backplane_reconnects: counter(
                "switchyard_backplane_reconnects_total",
                "Times the Redis backplane connection was re-established after a loss.",
            )?,
            backplane_recovered_messages: counter(
                "switchyard_backplane_recovered_messages_total",
                "Messages missed on pub/sub during a reconnect and delivered from the stream.",
            )?,
            backplane_foreign_messages: counter(
                "switchyard_backplane_foreign_messages_total",
                "Pub/sub messages of another deployment on a channel this one also uses (a key prefix nested in another), dropped.",
            )?,
            backplane_stale_messages: counter(
                "switchyard_backplane_stale_messages_total",
                "Pub/sub messages of an epoch their topic has moved past (its Redis keys were lost and made again), dropped.",
            )?,
            authorization_denied: counter_vec(
                "switchyard_authorization_denied_total",
                "Subscribes and publishes on topics the session may not use, by action.",
                &["action"],
            )?,
            publishes_rate_limited: counter(
                "switchyard_publishes_rate_limited_total",
                "Client publishes refused by the per-connection rate limit.",
            )?,
            publishes_failed: counter_vec(
                "switchyard_publishes_failed_total",
                "Publishes the broker did not take, by reason: unavailable (not published; Redis unreachable), outcome_unknown (sent, no answer), too_many_topics.",
                &["reason"],
            )?,
            sessions_ended: counter_vec(
                "switchyard_sessions_ended_total",
                "Connections closed because their session ended: expired (4001) or revoked (4503).",
                &["reason"],
            )?,
            admin_unauthorized: counter(
                "switchyard_admin_unauthorized_total",
                "Admin listener requests refused with 401 for a missing or wrong bearer token.",
            )?,
            admin_refused: counter_vec(
                "switchyard_admin_refused_total",
                "Admin listener requests refused as coming from a web page: origin, fetch_metadata, host, content_type.",
                &["reason"],
            )?,
            tickets_issued: counter(
                "switchyard_tickets_issued_total",
                "Single-use connection tickets minted through POST /api/tickets.",
            )?,
            jwks: crate::security::jwks::JwksMetrics {
                refreshes: counter_vec(
                    "switchyard_jwks_refreshes_total",
                    "Fetches of the identity provider's key set (auth.jwt.jwks_url), by result: ok, error (the last good set stays).",
                    &["result"],
                )?,
                keys: gauge(
                    "switchyard_jwks_keys",
                    "Usable keys in the identity provider's key set in hand.",
                )?,
                last_success: gauge(
                    "switchyard_jwks_last_success_timestamp_seconds",
                    "Unix time of the last good fetch of the identity provider's key set.",
                )?,
            },
            registry,
        };
        // Known label values start at zero, so dashboards and alerts see the
        // series (a rate of 0) before the first event rather than no data.
        for recovered in ["true", "false"] {
            metrics.resume.with_label_values(&[recovered]);
        }
        for how in ["client", "slot", "deadline", "other"] {
            metrics.migrations.with_label_values(&[how]);
        }
        for refusal in crate::security::browser::BrowserRefusal::ALL {
            metrics.admin_refused.with_label_values(&[refusal.as_str()]);
        }
        for signal in ["migrate", "close"] {
            metrics.drain_signals.with_label_values(&[signal]);
        }
        for result in ["ok", "error"] {
            metrics.jwks.refreshes.with_label_values(&[result]);
        }
        for reason in HANDSHAKE_REJECTIONS {
            metrics.handshakes_rejected.with_label_values(&[reason]);
        }
        for why in crate::outbox::Slow::ALL {
            metrics.slow_consumers.with_label_values(&[why.as_str()]);
        }
        for reason in crate::broker::BrokerError::REASONS {
            metrics.publishes_failed.with_label_values(&[reason]);
        }
        for action in ["subscribe", "publish"] {
            metrics.authorization_denied.with_label_values(&[action]);
        }
        for kind in PROTOCOL_VIOLATIONS {
            metrics.protocol_violations.with_label_values(&[kind]);
        }
        Ok(metrics)
    }

    /// Counts a connection that ended.
    pub fn connection_closed(&self, code: u16, initiator: Initiator) {
        self.connections_closed
            .with_label_values(&[close_code_label(code), initiator.as_str()])
            .inc();
        self.connections.dec();
    }

    /// Observes the fan-out latencies of one written batch (seconds each).
    ///
    /// A histogram observation is four atomic updates on cache lines every
    /// worker thread writes, once per frame a visible share of the gateway's
    /// CPU under fan-out (`bench/cpu.sh`). The batch is counted in this thread's local histogram
    /// first and flushed before returning: one set of updates per batch, and
    /// nothing left behind in a thread that then goes idle.
    pub fn observe_fanout_latencies(&self, latencies: impl IntoIterator<Item = f64>) {
        FANOUT_LATENCY_LOCAL.with(|cell| {
            let mut cell = cell.borrow_mut();
            let local = match &mut *cell {
                Some((id, local)) if *id == self.id => local,
                slot => &slot.insert((self.id, self.fanout_latency.local())).1,
            };
            for latency in latencies {
                local.observe(latency);
            }
            local.flush();
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The close codes `switchyard_connections_closed_total{code}` names: the
/// protocol's (docs/protocol.md), the standard ones, and 1005/1006 (a close
/// without a code, a connection that ended without a close frame).
const NAMED_CLOSE_CODES: [(u16, &str); 22] = [
    (1000, "1000"),
    (1001, "1001"),
    (1002, "1002"),
    (1003, "1003"),
    (1005, "1005"),
    (1006, "1006"),
    (1007, "1007"),
    (1008, "1008"),
    (1009, "1009"),
    (1010, "1010"),
    (1011, "1011"),
    (1012, "1012"),
    (1013, "1013"),
    (1014, "1014"),
    (4000, "4000"),
    (4001, "4001"),
    (4002, "4002"),
    (4003, "4003"),
    (4500, "4500"),
    (4501, "4501"),
    (4502, "4502"),
    (4503, "4503"),
];

/// The `code` label of a closed connection: a named code as itself; any
/// other (a client may close with anything in 3000–4999) by its class,
/// `other_reconnect` or `other_terminal`, so one client cannot grow the
/// series per gateway beyond a fixed set (`close_codes_are_a_bounded_label`).
/// Called once per closed connection: no allocation.
fn close_code_label(code: u16) -> &'static str {
    if let Some((_, label)) = NAMED_CLOSE_CODES.iter().find(|(named, _)| *named == code) {
        return label;
    }
    match switchyard_protocol::CloseCode::from_u16(code).class() {
        switchyard_protocol::CloseClass::Terminal => "other_terminal",
        _ => "other_reconnect",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What was built and what the process uses are exported with the rest:
    /// the version from Cargo, the revision `unknown` outside an image build,
    /// the process collector's standard families with values.
    #[test]
    fn build_info_and_process_metrics_are_exported() {
        let text = Metrics::new().expect("metrics").render();
        let revision = switchyard_telemetry::process::BUILD_REVISION;
        let build = format!(
            r#"switchyard_build_info{{component="gateway",revision="{revision}",version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == build), "{build} in\n{text}");
        for family in [
            "process_open_fds",
            "process_max_fds",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_start_time_seconds",
        ] {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(family)?.strip_prefix(' '))
                .and_then(|v| v.parse::<f64>().ok());
            assert!(
                value.is_some_and(|v| v > 0.0 || family == "process_cpu_seconds_total"),
                "{family}: {value:?}"
            );
        }
    }

    /// Issue 27: every code a client could close with (all of u16) adds at
    /// most the named codes and two classes to the label set (4504–4999 are
    /// the 496 unnamed terminal ones).
    #[test]
    fn close_codes_are_a_bounded_label() {
        let metrics = Metrics::new().expect("metrics");
        for code in 0..=u16::MAX {
            metrics.connection_closed(code, Initiator::Client);
        }
        let text = metrics.render();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("switchyard_connections_closed_total{"))
            .collect();
        assert_eq!(series.len(), NAMED_CLOSE_CODES.len() + 2, "{series:#?}");
        for expected in [
            r#"switchyard_connections_closed_total{code="4002",initiator="client"} 1"#,
            r#"switchyard_connections_closed_total{code="other_terminal",initiator="client"} 496"#,
        ] {
            assert!(series.contains(&expected), "{expected} in {series:#?}");
        }
        assert_eq!(close_code_label(3000), "other_reconnect");
        assert_eq!(close_code_label(4499), "other_reconnect");
        assert_eq!(close_code_label(4777), "other_terminal");
        assert_eq!(close_code_label(1006), "1006");
    }

    #[test]
    fn renders_every_required_family() {
        let metrics = Metrics::new().expect("metrics");
        metrics.connections.inc();
        metrics.connection_closed(4002, Initiator::Server);
        metrics.resume.with_label_values(&["true"]).inc();
        metrics.fanout_latency.observe(0.001);
        let text = metrics.render();
        for family in [
            "switchyard_connections 0",
            "switchyard_connections_opened_total 0",
            "switchyard_connections_closed_total{code=\"4002\",initiator=\"server\"} 1",
            "switchyard_messages_received_total",
            "switchyard_messages_sent_total",
            "switchyard_message_bytes_received_total",
            "switchyard_message_bytes_sent_total",
            "switchyard_slow_consumers_total{reason=\"queue_full\"} 0",
            "switchyard_subscriptions",
            "switchyard_resume_total{recovered=\"true\"} 1",
            "switchyard_fanout_latency_seconds_count 1",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
    }

    #[test]
    fn batch_latencies_are_counted_at_once_in_their_own_registry() {
        let first = Metrics::new().expect("metrics");
        let second = Metrics::new().expect("metrics");
        first.observe_fanout_latencies([0.001, 0.002, 0.3]);
        // Same thread, another registry: the cached local histogram is replaced.
        second.observe_fanout_latencies([0.004]);
        first.observe_fanout_latencies([]);
        first.observe_fanout_latencies([0.0001]);
        assert_eq!(first.fanout_latency.get_sample_count(), 4);
        assert_eq!(second.fanout_latency.get_sample_count(), 1);
        assert!((first.fanout_latency.get_sample_sum() - 0.3031).abs() < 1e-9);
        let text = first.render();
        for bucket in [
            "switchyard_fanout_latency_seconds_bucket{le=\"0.0001\"} 1",
            "switchyard_fanout_latency_seconds_bucket{le=\"0.001\"} 2",
            "switchyard_fanout_latency_seconds_bucket{le=\"0.0025\"} 3",
            "switchyard_fanout_latency_seconds_bucket{le=\"0.25\"} 3",
            "switchyard_fanout_latency_seconds_bucket{le=\"0.5\"} 4",
        ] {
            assert!(text.contains(bucket), "missing {bucket} in\n{text}");
        }
    }
}
