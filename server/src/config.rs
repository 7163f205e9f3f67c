//! Gateway configuration.
//!
//! Layers, later ones winning: built-in defaults, a YAML file (`--config`),
//! `SWITCHYARD_*` environment variables, command-line flags. Every layer is
//! merged as a YAML tree and deserialized once, so an error names the field
//! whatever layer it came from, and every setting has a safe default: the
//! gateway runs with no file and no external service.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use thiserror::Error;

/// Prefix of environment variables that override settings.
pub const ENV_PREFIX: &str = "SWITCHYARD_";

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error("config file {path} is not valid YAML: {source}")]
    Yaml {
        /// The file.
        path: String,
        /// The parse error.
        source: serde_yaml::Error,
    },
    /// An override is not of the form `path=value`.
    #[error("override {0:?} is not of the form section.field=value")]
    BadOverride(String),
    /// A field has a value of the wrong type, or an unknown field was given.
    #[error("invalid config at {field}: {message}")]
    Field {
        /// The dotted path of the field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A message frame's bytes beyond its data and topic name: the op, the
/// epoch and offset, the JSON punctuation (well under this).
const FRAME_ENVELOPE_BYTES: usize = 256;

impl ConfigError {
    /// A setting that is wrong, named by its dotted path.
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This gateway's id, shown to clients in `welcome` and in `/admin/status`.
    /// Defaults to `$POD_NAME`, else `sy-` and random hex.
    pub server_id: Option<String>,
    /// Public listener: `/ws`, `/`, `/healthz`, `/readyz`, `/metrics`.
    /// `IP:PORT`; an IPv6 IP bracketed or not ([`parse_listen`]).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Admin listener: `/admin/*`, `/api/publish`. Never expose it publicly.
    #[serde(deserialize_with = "listen_address")]
    pub admin_listen: SocketAddr,
    /// Set SO_REUSEPORT on the public listener so several gateway processes
    /// can share one port (the kernel spreads connections across them).
    pub reuse_port: bool,
    /// Serve `GET /echo`: every message straight back, through the same
    /// handshake, limits and connection machinery as `/ws`. For conformance suites.
    pub echo: bool,
    /// How long SIGINT waits for connections to close after 1001 (SIGTERM drains instead).
    pub shutdown_timeout_ms: u64,
    /// Runtime worker threads; default one per CPU. Set it to the pod's CPU
    /// limit: more threads than cores only adds context switches.
    pub worker_threads: Option<usize>,
    /// Logging.
    pub log: LogSettings,
    /// WebSocket framing and handshake limits.
    pub websocket: WebSocketSettings,
    /// Per-connection queues, keepalive and violations.
    pub connection: ConnectionSettings,
    /// Topic logs.
    pub topics: TopicSettings,
    /// Where topic logs live: `memory` (this process only) or `redis` (shared
    /// by every gateway on the same Redis and key prefix).
    pub broker: BrokerKind,
    /// The Redis backplane, used when `broker: redis`.
    pub redis: RedisSettings,
    /// Drain defaults: SIGTERM uses them; `POST /admin/drain` may override.
    pub drain: DrainSettings,
    /// Which page origins may open WebSockets (against cross-site WebSocket hijacking).
    pub origin: OriginSettings,
    /// How clients authenticate, and what an unauthenticated handshake gets.
    pub auth: AuthSettings,
    /// The admin listener's bearer token and TLS.
    pub admin: AdminSettings,
    /// TLS on the public listener (wss:// and https://).
    pub tls: TlsSettings,
}

/// Origin check settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OriginSettings {
    /// Allowed origins: exact (`https://app.example.com`, port included when
    /// not the default) or every subdomain (`https://*.example.com`).
    pub allowed: Vec<String>,
    /// Also allow an Origin whose host and port equal the request's `Host`
    /// (the page was served by the same address as the socket).
    pub allow_same_host: bool,
    /// Allow handshakes without an Origin header. Browsers always send one,
    /// so these are non-browser clients, which carry no ambient cookie.
    pub allow_missing: bool,
}

impl Default for OriginSettings {
    fn default() -> Self {
        OriginSettings {
            allowed: Vec::new(),
            allow_same_host: true,
            allow_missing: true,
        }
    }
}

/// A kind of credential a handshake may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A JWT in the session cookie (`auth.cookie_name`), for browsers.
    Cookie,
    /// A JWT in `Authorization: Bearer`, for non-browser clients.
    Bearer,
    /// A single-use ticket in `?ticket=`, minted by `POST /api/tickets`.
    Ticket,
}

/// JWT signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, verified with a public key or JWKS.
    Rs256,
    /// ECDSA P-256 with SHA-256, verified with a public key or JWKS.
    Es256,
}

/// How JWTs are verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// The only algorithm accepted.
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret (prefer `secret_file`; this one is for env variables).
    pub secret: Option<String>,
    /// HS256: file holding the shared secret (a mounted Secret).
    pub secret_file: Option<String>,
    /// RS256/ES256: PEM public key.
    pub public_key_file: Option<String>,
    /// RS256/ES256: JSON Web Key Set; the token's `kid` picks the key.
    pub jwks_file: Option<String>,
    /// RS256/ES256: the identity provider's JWKS endpoint (`https://` only),
    /// fetched at startup, refreshed on its `Cache-Control: max-age` and on
    /// a token with an unknown `kid`; the last good set is kept while the
    /// provider is down.
    pub jwks_url: Option<String>,
    /// PEM CA certificates trusted for `jwks_url` besides the system's (a
    /// private CA).
    pub jwks_ca_file: Option<String>,
    /// Refresh interval when the JWKS response has no `max-age`.
    pub jwks_refresh_ms: u64,
    /// Least time between two fetches of `jwks_url`: tokens with unknown
    /// `kid`s trigger at most one fetch per interval, so a flood of random
    /// `kid`s cannot hammer the provider.
    pub jwks_min_refresh_ms: u64,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew allowed on `nbf` (seconds). `exp` gets none: it is also
    /// when the connection is closed with 4001.
    pub leeway_s: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            secret: None,
            secret_file: None,
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh_ms: 300_000,
            jwks_min_refresh_ms: 10_000,
            issuer: None,
            audience: None,
            leeway_s: 5,
        }
    }
}

/// Ticket settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketSettings {
    /// Time within which a ticket must be redeemed.
    pub ttl_ms: u64,
    /// Session lifetime when the minting request gives no `exp`.
    pub session_ttl_ms: u64,
    /// Most unredeemed tickets held in memory (memory broker).
    pub max_outstanding: usize,
}

impl Default for TicketSettings {
    fn default() -> Self {
        TicketSettings {
            ttl_ms: 30_000,
            session_ttl_ms: 3_600_000,
            max_outstanding: 100_000,
        }
    }
}

/// Authentication settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Admit handshakes that carry no credential. Unset: admitted only when
    /// no JWT key is configured and the public listener is on loopback (a
    /// developer's machine); anywhere else it must be set explicitly.
    pub anonymous: Option<bool>,
    /// Credentials looked for, by precedence ticket, bearer, cookie.
    pub accept: Vec<CredentialKind>,
    /// The session cookie's name.
    pub cookie_name: String,
    /// Refuse failed authentication with HTTP 401 before the upgrade instead
    /// of accepting and closing with 4501/4001/4503 (browsers cannot read the
    /// status of a failed upgrade; non-browser deployments may prefer it).
    pub reject_with_http: bool,
    /// JWT verification.
    pub jwt: JwtSettings,
    /// Subscribe patterns for sessions whose token or ticket lists none, and for anonymous ones.
    pub default_subscribe: Vec<String>,
    /// Single-use tickets.
    pub tickets: TicketSettings,
    /// How long a revocation refuses older credentials of its subject; at
    /// least the longest token lifetime you issue.
    pub revocation_ttl_ms: u64,
    /// Most connections one subject (`sub`) may hold on this gateway; the
    /// next is refused with 4003. 0: no limit.
    pub max_connections_per_subject: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            anonymous: None,
            accept: vec![
                CredentialKind::Ticket,
                CredentialKind::Bearer,
                CredentialKind::Cookie,
            ],
            cookie_name: "switchyard_session".to_owned(),
            reject_with_http: false,
            jwt: JwtSettings::default(),
            default_subscribe: vec!["*".to_owned()],
            tickets: TicketSettings::default(),
            revocation_ttl_ms: 24 * 3_600_000,
            max_connections_per_subject: 0,
        }
    }
}

/// Certificate and key files for a TLS listener.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first. With `key_file`, the listener speaks TLS.
    pub cert_file: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<String>,
}

impl TlsSettings {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

/// Admin listener settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// The bearer token (prefer `token_file`; this one is for env variables).
    pub token: Option<String>,
    /// File holding the bearer token (a mounted Secret).
    pub token_file: Option<String>,
    /// TLS on the admin listener.
    pub tls: TlsSettings,
    /// Names the admin listener answers in `Host` besides its address and
    /// `localhost` (e.g. a Service name a client calls). Off loopback, any
    /// name passes while this is empty.
    pub allowed_hosts: Vec<String>,
}

/// Drain defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainSettings {
    /// Window over which closes are spread.
    pub window_ms: u64,
    /// Most closes per second for this gateway.
    pub max_rate: u64,
    /// Everything left is closed this long after the drain starts.
    pub deadline_ms: u64,
    /// `close` or `make_before_break`.
    pub mode: switchyard_protocol::drain::DrainMode,
    /// `retry_ms` told to closed clients is random in [0, this].
    pub retry_jitter_ms: u64,
    /// make_before_break: time a client has after `migrate` before 4000.
    pub migrate_grace_ms: u64,
    /// SIGTERM: the drain's deadline is at most this long after the signal,
    /// and the process exits by this + `connection.close_timeout_ms` (keep
    /// that below the pod's terminationGracePeriodSeconds, which ends in
    /// SIGKILL).
    pub grace_period_ms: u64,
}

impl Default for DrainSettings {
    fn default() -> Self {
        DrainSettings {
            window_ms: 10_000,
            max_rate: 200,
            deadline_ms: 25_000,
            mode: switchyard_protocol::drain::DrainMode::MakeBeforeBreak,
            retry_jitter_ms: 2_000,
            migrate_grace_ms: 5_000,
            grace_period_ms: 25_000,
        }
    }
}

/// Which broker holds the topic logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerKind {
    /// In-process logs; the embedded default.
    Memory,
    /// Redis streams and pub/sub, shared across gateways.
    Redis,
}

/// Redis backplane settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]`; `rediss://` for TLS.
    pub url: String,
    /// Prefix of every key and channel, so several ConnectionServices can share one Redis.
    pub key_prefix: String,
    /// Multiplexed command connections, used round robin.
    pub pool_size: usize,
    /// Time allowed to establish a connection.
    pub connect_timeout_ms: u64,
    /// Time allowed for one command; past it the command fails and the
    /// publish API answers 503.
    pub command_timeout_ms: u64,
    /// Longest wait between reconnection attempts (backoff doubles up to it).
    pub reconnect_max_delay_ms: u64,
    /// How long a topic's log and epoch stay in Redis after its last publish.
    /// When they expire, the next publish starts a new epoch.
    pub topic_ttl_ms: u64,
    /// With `rediss://`: a PEM file of the CA that signed Redis's certificate
    /// (a private CA). Without it, the system's trust store is used.
    pub tls_ca_file: Option<String>,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "switchyard".to_owned(),
            pool_size: 1,
            connect_timeout_ms: 2_000,
            command_timeout_ms: 2_000,
            reconnect_max_delay_ms: 5_000,
            topic_ttl_ms: 24 * 3_600_000,
            tls_ca_file: None,
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `switchyard_server=debug`.
    /// `RUST_LOG`, when set, wins.
    pub level: String,
}

/// WebSocket framing and handshake limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Largest message a client may send (bytes); larger ones close with 1009.
    pub max_message_bytes: usize,
    /// Largest single frame a client may send (bytes); larger ones close with 1009.
    pub max_frame_bytes: usize,
    /// Read buffer per connection, allocated up front. Small keeps idle
    /// connections cheap; it is not a message size limit.
    pub read_buffer_bytes: usize,
    /// Outgoing bytes gathered before a write to the socket.
    pub write_buffer_bytes: usize,
    /// Most outgoing bytes held for a socket that cannot take them.
    pub max_write_buffer_bytes: usize,
    /// Time allowed to send the HTTP request headers (against slowloris).
    pub handshake_timeout_ms: u64,
    /// Largest HTTP request head accepted on the public listener.
    pub max_header_bytes: usize,
    /// Handshakes per second per client IP (token bucket); 0 turns the limit
    /// off. Behind an L7 proxy every client has the proxy's IP: limit there.
    pub handshake_rate_per_ip: u32,
    /// Burst of handshakes one IP may make at once.
    pub handshake_burst_per_ip: u32,
    /// Connections the public listener accepts per second, from every
    /// client together (token bucket, charged at the TCP accept, before
    /// TLS); 0 turns the bound off. Beyond it a WebSocket upgrade is
    /// answered with 4003 and a `retry_ms` spread over a window that grows
    /// with the overload (503 + `Retry-After` with `auth.reject_with_http`),
    /// and a TLS connection is closed before its TLS handshake.
    pub handshake_rate: u32,
    /// Connections accepted at once on top of `handshake_rate`.
    pub handshake_burst: u32,
    /// Handshakes judged at once (from the request head to the answer:
    /// credentials, tickets); beyond it 4003 with `retry_ms` as above. 0
    /// turns the bound off.
    pub max_handshakes_in_flight: usize,
}

/// Per-connection settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Most frames queued for one connection; beyond it the connection is a
    /// slow consumer and is closed with 4002.
    pub outbox_max_messages: usize,
    /// Most bytes queued for one connection (a single frame always fits).
    pub outbox_max_bytes: usize,
    /// Protocol ping and `heartbeat` interval. A connection silent for twice
    /// this long is reaped.
    pub keepalive_interval_ms: u64,
    /// Protocol violations (bad JSON, unknown op, binary frame, …) tolerated
    /// before the connection is closed with 4500.
    pub max_violations: u32,
    /// How long a closing connection waits for the peer's close frame.
    pub close_timeout_ms: u64,
    /// Most topics one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Most open connections on this gateway; beyond it a handshake is
    /// accepted and closed with 4003 (back off, reconnect).
    pub max_connections: usize,
    /// Client publishes per second per connection (token bucket); an excess
    /// publish gets a `rate_limited` error, `max_violations` in a row close 4002.
    pub publish_rate: u32,
    /// Burst of publishes one connection may make at once.
    pub publish_burst: u32,
}

/// Topic log settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSettings {
    /// Messages kept per topic for resume.
    pub history_size: usize,
    /// Age after which a message leaves the history.
    pub history_ttl_ms: u64,
    /// Most topic logs held at once.
    pub max_topics: usize,
    /// Longest topic name (bytes).
    pub max_topic_length: usize,
    /// Topic patterns clients may publish on (`chat.*`, `*`, exact names).
    /// Empty: clients may not publish; only `POST /api/publish` can.
    pub client_publish: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            reuse_port: false,
            echo: false,
            shutdown_timeout_ms: 10_000,
            worker_threads: None,
            log: LogSettings::default(),
            websocket: WebSocketSettings::default(),
            connection: ConnectionSettings::default(),
            topics: TopicSettings::default(),
            broker: BrokerKind::Memory,
            redis: RedisSettings::default(),
            drain: DrainSettings::default(),
            origin: OriginSettings::default(),
            auth: AuthSettings::default(),
            admin: AdminSettings::default(),
            tls: TlsSettings::default(),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        WebSocketSettings {
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            // What an idle connection keeps for reading: client frames are
            // small (subscribe, publish), and a larger frame gets a buffer of
            // its own size once its header is read, so the idle buffer is
            // kept small (bench/core.sh measures the idle cost per
            // connection; figures in docs/benchmarks.md).
            read_buffer_bytes: 512,
            write_buffer_bytes: 16 * 1024,
            max_write_buffer_bytes: 1024 * 1024,
            handshake_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            handshake_rate_per_ip: 0,
            handshake_burst_per_ip: 100,
            // A survivor of a crashed pod takes its share of that pod's
            // clients at once; 5,000/s is a quarter of what one core does
            // in plain handshakes and what two do with TLS
            // (bench/handshakes.sh), and a crashed pod's 10,000 clients
            // over two survivors are back within about a second.
            handshake_rate: 5_000,
            handshake_burst: 5_000,
            max_handshakes_in_flight: 512,
        }
    }
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            outbox_max_messages: 2048,
            outbox_max_bytes: 4 * 1024 * 1024,
            keepalive_interval_ms: 25_000,
            max_violations: 3,
            close_timeout_ms: 2_000,
            max_subscriptions: 64,
            max_connections: 100_000,
            publish_rate: 100,
            publish_burst: 200,
        }
    }
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            history_size: 1000,
            history_ttl_ms: 300_000,
            max_topics: 100_000,
            max_topic_length: 128,
            client_publish: Vec::new(),
        }
    }
}

/// A listen address: `IP:PORT`, where an IPv6 IP may be bracketed
/// (`[fd00::a]:8080`) or not (`fd00::a:8080`). Kubernetes' `$(POD_IP):8080`
/// gives the unbracketed form on an IPv6 pod; as a listen address always
/// has a port, the last `:` starts it.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let invalid = || format!("{text:?} is not IP:PORT (e.g. 10.0.0.1:8080, [fd00::1]:8080)");
    let (ip, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| invalid())?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    Ok(SocketAddr::new(ip.into(), port))
}

fn listen_address<'de, D: serde::Deserializer<'de>>(de: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(de)?;
    parse_listen(&text).map_err(serde::de::Error::custom)
}

impl Config {
    /// Builds the configuration from its layers: defaults, the optional YAML
    /// file, `SWITCHYARD_*` variables from `env`, then `overrides`
    /// (`section.field=value`, as given by command-line flags).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut tree = Value::Mapping(Mapping::new());
        if let Some(path) = file {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: shown.clone(),
                source,
            })?;
            let file_tree: Value =
                serde_yaml::from_str(&text).map_err(|source| ConfigError::Yaml {
                    path: shown,
                    source,
                })?;
            if !file_tree.is_null() {
                merge(&mut tree, file_tree);
            }
        }
        for (key, value) in env {
            if let Some(path) = env_key_to_path(&key) {
                set_path(&mut tree, &path, parse_scalar(&value), &key)?;
            }
        }
        for item in overrides {
            let (path, value) = item
                .split_once('=')
                .filter(|(path, _)| !path.is_empty())
                .ok_or_else(|| ConfigError::BadOverride(item.clone()))?;
            set_path(&mut tree, path.trim(), parse_scalar(value), item)?;
        }
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|err| {
            let field = err.path().to_string();
            ConfigError::field(&field, err.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations between fields that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ws = &self.websocket;
        let conn = &self.connection;
        let positive = [
            ("websocket.max_message_bytes", ws.max_message_bytes as u64),
            ("websocket.max_frame_bytes", ws.max_frame_bytes as u64),
            ("websocket.handshake_timeout_ms", ws.handshake_timeout_ms),
            (
                "connection.outbox_max_messages",
                conn.outbox_max_messages as u64,
            ),
            ("connection.outbox_max_bytes", conn.outbox_max_bytes as u64),
            (
                "connection.keepalive_interval_ms",
                conn.keepalive_interval_ms,
            ),
            ("connection.max_violations", u64::from(conn.max_violations)),
            ("connection.close_timeout_ms", conn.close_timeout_ms),
            ("topics.max_topics", self.topics.max_topics as u64),
            (
                "topics.max_topic_length",
                self.topics.max_topic_length as u64,
            ),
            ("topics.history_ttl_ms", self.topics.history_ttl_ms),
            ("redis.pool_size", self.redis.pool_size as u64),
            ("redis.connect_timeout_ms", self.redis.connect_timeout_ms),
            ("redis.command_timeout_ms", self.redis.command_timeout_ms),
            (
                "redis.reconnect_max_delay_ms",
                self.redis.reconnect_max_delay_ms,
            ),
            ("redis.topic_ttl_ms", self.redis.topic_ttl_ms),
            ("drain.max_rate", self.drain.max_rate),
            ("drain.deadline_ms", self.drain.deadline_ms),
            ("drain.grace_period_ms", self.drain.grace_period_ms),
            ("connection.max_connections", conn.max_connections as u64),
            ("connection.publish_rate", u64::from(conn.publish_rate)),
            ("connection.publish_burst", u64::from(conn.publish_burst)),
            ("auth.tickets.ttl_ms", self.auth.tickets.ttl_ms),
            (
                "auth.tickets.session_ttl_ms",
                self.auth.tickets.session_ttl_ms,
            ),
            (
                "auth.tickets.max_outstanding",
                self.auth.tickets.max_outstanding as u64,
            ),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::field(field, "must be greater than 0"));
        }
        if ws.max_frame_bytes > ws.max_message_bytes {
            return Err(ConfigError::field(
                "websocket.max_frame_bytes",
                format!(
                    "{} exceeds websocket.max_message_bytes ({})",
                    ws.max_frame_bytes, ws.max_message_bytes
                ),
            ));
        }
        if ws.read_buffer_bytes < 256 {
            return Err(ConfigError::field(
                "websocket.read_buffer_bytes",
                "must be at least 256",
            ));
        }
        if ws.max_write_buffer_bytes <= ws.write_buffer_bytes {
            return Err(ConfigError::field(
                "websocket.max_write_buffer_bytes",
                "must be greater than websocket.write_buffer_bytes",
            ));
        }
        // The largest frame the gateway sends is the largest message it
        // accepts (an echo, a publish) in its envelope; a write buffer that
        // cannot hold it would end such a connection (with 1011).
        let largest_frame =
            ws.max_message_bytes + self.topics.max_topic_length + FRAME_ENVELOPE_BYTES;
        if ws.max_write_buffer_bytes < largest_frame {
            return Err(ConfigError::field(
                "websocket.max_write_buffer_bytes",
                format!(
                    "must hold the largest frame the gateway sends: websocket.max_message_bytes + topics.max_topic_length + {FRAME_ENVELOPE_BYTES} = {largest_frame}"
                ),
            ));
        }
        if ws.max_header_bytes < 8192 {
            return Err(ConfigError::field(
                "websocket.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(ConfigError::field(
                "admin_listen",
                "must differ from listen",
            ));
        }
        if self.redis.topic_ttl_ms < self.topics.history_ttl_ms {
            return Err(ConfigError::field(
                "redis.topic_ttl_ms",
                "must be at least topics.history_ttl_ms",
            ));
        }
        if self.broker == BrokerKind::Redis {
            if !(self.redis.url.starts_with("redis://") || self.redis.url.starts_with("rediss://"))
            {
                return Err(ConfigError::field(
                    "redis.url",
                    "must start with redis:// or rediss://",
                ));
            }
            let prefix_ok = !self.redis.key_prefix.is_empty()
                && switchyard_protocol::topic::validate_topic(&self.redis.key_prefix, 64).is_ok();
            if !prefix_ok {
                return Err(ConfigError::field(
                    "redis.key_prefix",
                    "must be 1 to 64 characters of [A-Za-z0-9_.:/-]",
                ));
            }
        }
        if self.worker_threads == Some(0) {
            return Err(ConfigError::field("worker_threads", "must be at least 1"));
        }
        if let Some(id) = &self.server_id {
            if id.is_empty() || id.len() > 64 {
                return Err(ConfigError::field("server_id", "must be 1 to 64 bytes"));
            }
        }
        for pattern in &self.topics.client_publish {
            validate_pattern(
                pattern,
                self.topics.max_topic_length,
                "topics.client_publish",
            )?;
        }
        for pattern in &self.auth.default_subscribe {
            validate_pattern(
                pattern,
                self.topics.max_topic_length,
                "auth.default_subscribe",
            )?;
        }
        self.validate_security()
    }

    /// Security settings: origins parse, keys fit the algorithm, and nothing
    /// reachable beyond loopback is left open by default.
    fn validate_security(&self) -> Result<(), ConfigError> {
        crate::security::origin::OriginPolicy::new(
            &self.origin.allowed,
            self.origin.allow_same_host,
            self.origin.allow_missing,
        )
        .map_err(|e| ConfigError::field("origin.allowed", e.to_string()))?;
        let jwt = &self.auth.jwt;
        let symmetric = jwt.secret.is_some() || jwt.secret_file.is_some();
        let key_sources = [
            jwt.public_key_file.is_some(),
            jwt.jwks_file.is_some(),
            jwt.jwks_url.is_some(),
        ];
        let asymmetric = key_sources.contains(&true);
        match jwt.algorithm {
            JwtAlgorithm::Hs256 if asymmetric => {
                return Err(ConfigError::field(
                    "auth.jwt.algorithm",
                    "HS256 takes secret or secret_file, not a public key",
                ))
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 if symmetric => {
                return Err(ConfigError::field(
                    "auth.jwt.algorithm",
                    "RS256/ES256 take public_key_file, jwks_file or jwks_url, not a secret",
                ))
            }
            _ => {}
        }
        if key_sources.iter().filter(|set| **set).count() > 1 {
            return Err(ConfigError::field(
                "auth.jwt",
                "set one of public_key_file, jwks_file and jwks_url",
            ));
        }
        if let Some(url) = &jwt.jwks_url {
            crate::security::jwks::JwksUrl::parse(url)
                .map_err(|e| ConfigError::field("auth.jwt.jwks_url", e))?;
            if jwt.jwks_min_refresh_ms == 0 || jwt.jwks_refresh_ms < jwt.jwks_min_refresh_ms {
                return Err(ConfigError::field(
                    "auth.jwt.jwks_refresh_ms",
                    "must be at least auth.jwt.jwks_min_refresh_ms, which must be above 0",
                ));
            }
        } else if jwt.jwks_ca_file.is_some() {
            return Err(ConfigError::field(
                "auth.jwt.jwks_ca_file",
                "only used with auth.jwt.jwks_url",
            ));
        }
        if jwt.secret.as_deref().is_some_and(|s| s.len() < 32) {
            return Err(ConfigError::field(
                "auth.jwt.secret",
                "must be at least 32 bytes (256 bits) for HS256",
            ));
        }
        if self.auth.accept.is_empty() && self.auth.anonymous != Some(true) {
            return Err(ConfigError::field(
                "auth.accept",
                "accepts no credential and anonymous is not true: nobody could connect",
            ));
        }
        if self.auth.anonymous.is_none()
            && !self.listen.ip().is_loopback()
            && !self.jwt_configured()
        {
            return Err(ConfigError::field(
                "auth.anonymous",
                "set it to true or false: the public listener is not on loopback and no JWT key is configured",
            ));
        }
        if self.auth.cookie_name.is_empty()
            || !self
                .auth
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::field(
                "auth.cookie_name",
                "must be 1+ characters of [A-Za-z0-9_-]",
            ));
        }
        let admin_has_token = self.admin.token.is_some() || self.admin.token_file.is_some();
        if !admin_has_token && !self.admin_listen.ip().is_loopback() {
            return Err(ConfigError::field(
                "admin.token_file",
                "the admin listener is not on loopback: it needs admin.token_file (or admin.token)",
            ));
        }
        if self.admin.token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::field(
                "admin.token",
                "must be at least 16 bytes",
            ));
        }
        for (field, tls) in [("tls", &self.tls), ("admin.tls", &self.admin.tls)] {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(ConfigError::field(
                    field,
                    "cert_file and key_file go together",
                ));
            }
        }
        Ok(())
    }

    /// Whether a JWT key is configured.
    pub fn jwt_configured(&self) -> bool {
        let jwt = &self.auth.jwt;
        jwt.secret.is_some()
            || jwt.secret_file.is_some()
            || jwt.public_key_file.is_some()
            || jwt.jwks_file.is_some()
            || jwt.jwks_url.is_some()
    }

    /// Whether handshakes without a credential are admitted (see [`AuthSettings::anonymous`]).
    pub fn anonymous_allowed(&self) -> bool {
        self.auth
            .anonymous
            .unwrap_or_else(|| !self.jwt_configured() && self.listen.ip().is_loopback())
    }

    /// The configuration with every secret value replaced, for printing.
    pub fn redacted(&self) -> Config {
        let mut config = self.clone();
        let hide = |value: &mut Option<String>| {
            if value.is_some() {
                *value = Some("REDACTED".to_owned());
            }
        };
        hide(&mut config.auth.jwt.secret);
        hide(&mut config.admin.token);
        config
    }
}

/// Checks a topic pattern: `*`, or a topic name optionally ending in `*`.
fn validate_pattern(pattern: &str, max_len: usize, field: &str) -> Result<(), ConfigError> {
    switchyard_protocol::topic::TopicPattern::parse(pattern, max_len)
        .map(|_| ())
        .map_err(|e| ConfigError::field(field, format!("{pattern:?}: {e}")))
}

/// `SWITCHYARD_CONNECTION__KEEPALIVE_INTERVAL_MS` → `connection.keepalive_interval_ms`;
/// `SWITCHYARD_ADMIN_LISTEN` → `admin_listen`. `__` separates sections.
fn env_key_to_path(key: &str) -> Option<String> {
    let rest = key.strip_prefix(ENV_PREFIX)?;
    (!rest.is_empty()).then(|| rest.to_ascii_lowercase().replace("__", "."))
}

/// Reads an override value as YAML so numbers, booleans and lists keep their type.
fn parse_scalar(raw: &str) -> Value {
    serde_yaml::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

/// Sets `value` at a dotted path, creating sections on the way.
fn set_path(tree: &mut Value, path: &str, value: Value, origin: &str) -> Result<(), ConfigError> {
    let mut node = tree;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if part.is_empty() {
            return Err(ConfigError::BadOverride(origin.to_owned()));
        }
        let map = match node {
            Value::Mapping(map) => map,
            _ => {
                return Err(ConfigError::field(
                    path,
                    format!("{origin}: a parent of this field is not a section"),
                ))
            }
        };
        let key = Value::String(part.to_owned());
        if parts.peek().is_none() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Mapping::new()));
    }
    Ok(())
}

/// Deep-merges `overlay` into `base`: mappings merge, anything else replaces.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Mapping(base), Value::Mapping(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], overrides: &[&str]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        Config::load(None, env, &overrides)
    }

    #[test]
    fn defaults_are_valid() {
        let config = load(&[], &[]).expect("defaults");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(config.connection.keepalive_interval_ms, 25_000);
    }

    /// Issue 19, defect 3: `$(POD_IP):8080` on an IPv6 pod is an
    /// unbracketed IPv6 literal and a port; it failed with exit code 2.
    #[test]
    fn listen_addresses_take_ipv6_with_or_without_brackets() {
        let table = [
            ("10.1.2.3:8080", Some("10.1.2.3:8080")),
            ("[fd00::a]:8080", Some("[fd00::a]:8080")),
            ("fd00::a:8080", Some("[fd00::a]:8080")),
            ("::ffff:127.0.0.10:9090", Some("[::ffff:127.0.0.10]:9090")),
            ("::1:0", Some("[::1]:0")),
            ("fd00::a", None),
            ("10.1.2.3", None),
            ("fd00::a:99999", None),
            ("nowhere:80", None),
            ("", None),
        ];
        for (text, expected) in table {
            let parsed = parse_listen(text).map(|a| a.to_string());
            assert_eq!(parsed.ok().as_deref(), expected, "{text}");
        }
        let config = load(
            &[
                ("SWITCHYARD_LISTEN", "fd00::a:8080"),
                ("SWITCHYARD_ADMIN_LISTEN", "fd00::a:9090"),
                ("SWITCHYARD_AUTH__ANONYMOUS", "true"),
                ("SWITCHYARD_ADMIN__TOKEN", "0123456789abcdef-token"),
            ],
            &[],
        )
        .expect("an IPv6 pod's environment");
        assert_eq!(config.listen.to_string(), "[fd00::a]:8080");
        assert_eq!(config.admin_listen.to_string(), "[fd00::a]:9090");
    }

    #[test]
    fn layers_override_in_order() {
        let config = load(
            &[
                ("SWITCHYARD_LISTEN", "127.0.0.1:7000"),
                ("SWITCHYARD_CONNECTION__KEEPALIVE_INTERVAL_MS", "500"),
                ("HOME", "/root"),
            ],
            &[
                "connection.keepalive_interval_ms=700",
                "topics.client_publish=[chat.*, x]",
            ],
        )
        .expect("config");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.connection.keepalive_interval_ms, 700);
        assert_eq!(config.topics.client_publish, vec!["chat.*", "x"]);
    }

    #[test]
    fn errors_name_the_field() {
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
        let table: [Row; 9] = [
            (&[], &["worker_threads=0"], "worker_threads"),
            (
                &[],
                &[
                    "websocket.max_message_bytes=2000000",
                    "websocket.max_frame_bytes=65536",
                ],
                "websocket.max_write_buffer_bytes",
            ),
            (&[], &["broker=redis", "redis.url=http://x"], "redis.url"),
            (
                &[],
                &["connection.keepalive_interval_ms=soon"],
                "connection.keepalive_interval_ms",
            ),
            (
                &[("SWITCHYARD_ADMIN_LISTEN", "nowhere")],
                &[],
                "admin_listen",
            ),
            (&[], &["connection.no_such_thing=1"], "connection"),
            (
                &[],
                &["websocket.max_frame_bytes=999999"],
                "websocket.max_frame_bytes",
            ),
            (
                &[],
                &["connection.outbox_max_messages=0"],
                "connection.outbox_max_messages",
            ),
            (
                &[],
                &["topics.client_publish=[bad topic]"],
                "topics.client_publish",
            ),
        ];
        for (env, overrides, field) in table {
            let err = load(env, overrides).expect_err(field).to_string();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
        assert!(matches!(
            load(&[], &["novalue"]),
            Err(ConfigError::BadOverride(_))
        ));
    }

    #[test]
    fn security_settings_are_checked_and_nothing_is_open_off_loopback() {
        let secret = "auth.jwt.secret=0123456789abcdef0123456789abcdef";
        let refused: [(&[&str], &str); 8] = [
            (&["listen=0.0.0.0:8080"], "auth.anonymous"),
            (&["admin_listen=0.0.0.0:9090"], "admin.token_file"),
            (&["auth.jwt.secret=short"], "auth.jwt.secret"),
            (&["auth.jwt.algorithm=RS256", secret], "auth.jwt.algorithm"),
            (&["auth.jwt.public_key_file=/k.pem"], "auth.jwt.algorithm"),
            (&["origin.allowed=[example.com]"], "origin.allowed"),
            (&["tls.cert_file=/c.pem"], "tls"),
            (&["auth.accept=[]", "auth.anonymous=false"], "auth.accept"),
        ];
        for (overrides, field) in refused {
            let err = load(&[], overrides).expect_err(field).to_string();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
        // Anonymous unset: admitted only on loopback without a JWT key.
        let table: [(&[&str], bool); 4] = [
            (&[], true),
            (&[secret], false),
            (&["listen=0.0.0.0:8080", secret], false),
            (&["listen=0.0.0.0:8080", "auth.anonymous=true"], true),
        ];
        for (overrides, anonymous) in table {
            let config = load(&[], overrides).expect("valid");
            assert_eq!(config.anonymous_allowed(), anonymous, "{overrides:?}");
        }
        let printed = serde_yaml::to_string(
            &load(&[], &[secret, "admin.token=0123456789abcdef"])
                .expect("valid")
                .redacted(),
        )
        .expect("yaml");
        assert!(!printed.contains("0123456789abcdef"), "{printed}");
    }

    #[test]
    fn file_layer_is_read() {
        let dir = std::env::temp_dir().join(format!("sy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("gateway.yaml");
        std::fs::write(&path, "echo: true\ntopics:\n  history_size: 5\n").expect("write");
        let config =
            Config::load(Some(&path), Vec::new(), &["topics.max_topics=9".into()]).expect("config");
        assert!(config.echo);
        assert_eq!(config.topics.history_size, 5);
        assert_eq!(config.topics.max_topics, 9);
        std::fs::write(&path, "topics: [").expect("write");
        assert!(matches!(
            Config::load(Some(&path), Vec::new(), &[]),
            Err(ConfigError::Yaml { .. })
        ));
    }
}
