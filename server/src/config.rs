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
use switchyard_protocol::topic::TopicPattern;
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

impl ConfigError {
    fn field(field: &str, message: impl Into<String>) -> Self {
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
    pub listen: SocketAddr,
    /// Admin listener: `/admin/*`, `/api/publish`. Never expose it publicly.
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
    /// SIGTERM: the drain's deadline is at most this (keep it below the
    /// pod's terminationGracePeriodSeconds, which ends in SIGKILL).
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
            read_buffer_bytes: 2 * 1024,
            write_buffer_bytes: 16 * 1024,
            max_write_buffer_bytes: 1024 * 1024,
            handshake_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
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
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if !name.is_empty() {
                switchyard_protocol::topic::validate_topic(name, self.topics.max_topic_length)
                    .map_err(|e| ConfigError::field("topics.client_publish", e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The topic patterns clients may publish on.
    pub fn client_publish_patterns(&self) -> Vec<TopicPattern> {
        self.topics
            .client_publish
            .iter()
            .map(TopicPattern::new)
            .collect()
    }
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
        let table: [Row; 8] = [
            (&[], &["worker_threads=0"], "worker_threads"),
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
