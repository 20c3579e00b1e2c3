//! The relay's configuration: one TOML file plus environment overrides.
//!
//! Parses, fills defaults and validates everything that can be checked without
//! connecting (unknown keys, the connection string, the table name, the topic
//! template, producer properties the relay must own). It does not connect to
//! anything; runtime checks (wal_level, privileges, columns) live elsewhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

mod outbox;
mod rabbitmq;
mod replay;
mod shard;
use crate::transport::PgTarget;
pub use outbox::{
    Columns, Format, KeyFormat, OnInvalid, OptionalColumn, OutboxConfig, Placement, PlacementKind,
    Preset, RelayHeader, ValueFormat,
};
pub use rabbitmq::{ExchangeType, RabbitMqConfig, TlsFiles, ENV_RABBITMQ_URL};
pub use replay::{parse_window, CheckpointConfig, ReplayConfig, SinkConfig, SinkKind, Window};
pub use shard::{ShardConfig, ENV_SHARD_COUNT, ENV_SHARD_INDEX};

/// Environment variable that overrides `postgres.url` (keeps the password out of the file).
pub const ENV_POSTGRES_URL: &str = "OUTBOX_RELAY_POSTGRES_URL";
/// Environment variable that overrides `kafka.brokers`.
pub const ENV_KAFKA_BROKERS: &str = "OUTBOX_RELAY_KAFKA_BROKERS";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub replay: ReplayConfig,
    #[serde(default)]
    pub sink: SinkConfig,
    #[serde(default)]
    pub shard: ShardConfig,
    #[serde(default)]
    pub rabbitmq: RabbitMqConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics`, `/healthz` and `/readyz` listener. Default
    /// `127.0.0.1:9187` (loopback only); `0.0.0.0:9187` exposes it; "" disables it.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq URL (`postgresql://user:pass@host:port/db`) or key=value conninfo.
    /// Required unless `OUTBOX_RELAY_POSTGRES_URL` is set, which overrides it.
    #[serde(default)]
    pub url: Option<String>,
    /// File holding the connection string (a mounted secret), instead of `url`.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// File holding the password, which then need not be in the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Logical replication slot (pgoutput). Default `outbox_relay`.
    #[serde(default = "default_name")]
    pub slot: String,
    /// Publication the slot streams. Default `outbox_relay`.
    #[serde(default = "default_name")]
    pub publication: String,
    /// Create the publication and the slot when they are missing. Default `true`.
    #[serde(default = "yes")]
    pub create_missing: bool,
    /// Create the slot even when its publication already exists or the slot
    /// disappeared while running (events committed meanwhile are skipped).
    /// Default `false`: a missing slot is then a fatal error.
    #[serde(default)]
    pub recreate_missing_slot: bool,
    /// Whether the relay creates its slot as a failover slot, which PostgreSQL 17+
    /// copies to standbys running with `sync_replication_slots = on`, so a
    /// promoted standby has it: `auto` (default: on 17 and later), `on` (an
    /// error below 17), `off`. On 17+ an existing slot is switched to match.
    #[serde(default)]
    pub failover_slot: FailoverSlot,
    /// Interval between standby status updates, in milliseconds. Default 1000.
    /// Keep it well below the server's `wal_sender_timeout`.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Shortest interval between two standby status updates sent because the
    /// acknowledged position advanced, in milliseconds. Default 20. The slot's
    /// confirmed position trails the acknowledged one by about this much (plus
    /// the walsender's reaction), so a restart after a crash re-sends only what
    /// was in flight and what was acknowledged in this last interval.
    #[serde(default = "default_confirm_interval_ms")]
    pub confirm_interval_ms: u64,
}

/// `postgres.failover_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverSlot {
    /// A failover slot where the server supports it (PostgreSQL 17+).
    #[default]
    Auto,
    /// A failover slot, or an error below PostgreSQL 17.
    On,
    /// An ordinary slot.
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default `127.0.0.1:9092`; `OUTBOX_RELAY_KAFKA_BROKERS` overrides.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Create a topic through the admin API the first time a record is routed to it. Default `false`
    /// (topics are expected to exist, or the broker to auto-create them).
    #[serde(default)]
    pub create_topics: bool,
    /// Partitions of topics created by `create_topics`. Default 1.
    #[serde(default = "one_i32")]
    pub topic_partitions: i32,
    /// Replication factor of topics created by `create_topics`. Default 1.
    #[serde(default = "one_i32")]
    pub topic_replication_factor: i32,
    /// Any librdkafka producer property (`compression.type`, `linger.ms`, `security.protocol`,
    /// `sasl.mechanism`, ...). Values may be strings, numbers or booleans.
    #[serde(default)]
    pub properties: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// How long shutdown waits for in-flight deliveries, in milliseconds. Default 10000.
    #[serde(default = "default_shutdown_ms")]
    pub shutdown_timeout_ms: u64,
    /// First reconnect delay after a failure, in milliseconds (doubles, with jitter). Default 500.
    #[serde(default = "default_backoff_min_ms")]
    pub reconnect_backoff_min_ms: u64,
    /// Largest reconnect delay, in milliseconds. Default 30000.
    #[serde(default = "default_backoff_max_ms")]
    pub reconnect_backoff_max_ms: u64,
    /// While another instance streams from the slot, how often to try to take
    /// it over, in milliseconds (with jitter). Default 1000.
    #[serde(default = "default_standby_retry_ms")]
    pub standby_retry_ms: u64,
}

fn default_standby_retry_ms() -> u64 {
    1000
}

fn default_name() -> String {
    "outbox_relay".into()
}
fn yes() -> bool {
    true
}
fn default_status_interval_ms() -> u64 {
    1000
}
fn default_confirm_interval_ms() -> u64 {
    20
}
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn one_i32() -> i32 {
    1
}
fn default_shutdown_ms() -> u64 {
    10_000
}
fn default_backoff_min_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            create_topics: false,
            topic_partitions: 1,
            topic_replication_factor: 1,
            properties: BTreeMap::new(),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            shutdown_timeout_ms: default_shutdown_ms(),
            reconnect_backoff_min_ms: default_backoff_min_ms(),
            reconnect_backoff_max_ms: default_backoff_max_ms(),
            standby_retry_ms: default_standby_retry_ms(),
        }
    }
}

/// A configuration the relay refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path:?}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path:?}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot read secret file {path:?}: {source}; check postgres.url_file / postgres.password_file")]
    ReadSecret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} is missing: {hint}")]
    Missing { key: &'static str, hint: String },
    #[error("invalid {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("conflicting options: {message}")]
    Conflict { message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A table name split into schema and table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    /// `"schema"."table"`, for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One piece of a parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Column(String),
}

/// Parses `outbox.event.{aggregate_type}` into literal and column parts.
pub fn parse_topic_template(t: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(TemplatePart::Literal(rest.to_string()));
                break;
            }
            Some(i) if rest.as_bytes()[i] == b'}' => {
                return Err(format!(
                    "unmatched '}}' at byte {} of {t:?}",
                    t.len() - rest.len() + i
                ));
            }
            Some(i) => {
                if i > 0 {
                    parts.push(TemplatePart::Literal(rest[..i].to_string()));
                }
                let after = &rest[i + 1..];
                let end = after
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{{' in {t:?}"))?;
                let col = &after[..end];
                if col.is_empty() || col.contains('{') {
                    return Err(format!("empty or nested column reference in {t:?}"));
                }
                parts.push(TemplatePart::Column(col.to_string()));
                rest = &after[end + 1..];
            }
        }
    }
    if parts.is_empty() {
        return Err("the topic template is empty".into());
    }
    Ok(parts)
}

fn validate_identifier(key: &'static str, v: &str) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > 63 {
        return Err(invalid(key, format!("{v:?} must be 1 to 63 characters")));
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            key,
            format!("{v:?} may contain only lowercase letters, digits and '_'"),
        ));
    }
    Ok(())
}

/// librdkafka properties the relay sets itself; setting them would break its guarantees.
const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("metadata.broker.list", "set kafka.brokers instead"),
    (
        "enable.idempotence",
        "the relay always enables it so retries cannot reorder or duplicate records",
    ),
    ("acks", "idempotence requires acks=all; the relay sets it"),
    (
        "request.required.acks",
        "idempotence requires acks=all; the relay sets it",
    ),
    (
        "transactional.id",
        "the relay does not use Kafka transactions",
    ),
    (
        "delivery.report.only.error",
        "the relay needs every delivery report to confirm the LSN",
    ),
    ("dr_msg_cb", "the relay installs its own delivery callback"),
];

impl Config {
    /// Reads, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::from_toml(&text, path, |k| std::env::var(k).ok())
    }

    /// Parses and validates config text; `env` looks up environment overrides.
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        if let Some(url) = env(ENV_POSTGRES_URL).filter(|v| !v.is_empty()) {
            cfg.postgres.url = Some(url);
            cfg.postgres.url_file = None;
        } else if let Some(file) = &cfg.postgres.url_file {
            if cfg.postgres.url.is_some() {
                return Err(ConfigError::Conflict {
                    message: "postgres.url and postgres.url_file are both set; remove one".into(),
                });
            }
            cfg.postgres.url = Some(read_secret(file)?);
        }
        if let Some(b) = env(ENV_KAFKA_BROKERS).filter(|v| !v.is_empty()) {
            cfg.kafka.brokers = b;
        }
        cfg.shard.resolve(&env)?;
        cfg.rabbitmq.resolve(&env, cfg.sink.kind)?;
        cfg.validate()?;
        if cfg.shard.count > 1 && !cfg.outbox.messages_prefix.is_empty() {
            return Err(ConfigError::Conflict {
                message: "outbox.messages_prefix cannot be combined with shard.count > 1: logical messages pass no publication row filter, so every shard would relay each one; remove messages_prefix (write outbox rows) or set shard.count = 1".into(),
            });
        }
        // From here on postgres.slot and postgres.publication are this shard's.
        let shard = cfg.shard.shard();
        cfg.shard.base_slot = std::mem::take(&mut cfg.postgres.slot);
        cfg.shard.base_publication = std::mem::take(&mut cfg.postgres.publication);
        cfg.postgres.slot = shard.name(&cfg.shard.base_slot);
        cfg.postgres.publication = shard.name(&cfg.shard.base_publication);
        validate_identifier("postgres.slot", &cfg.postgres.slot)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.postgres_config()?;
        validate_identifier("postgres.slot", &self.postgres.slot)?;
        if self.postgres.publication.is_empty() {
            return Err(invalid("postgres.publication", "must not be empty"));
        }
        if !(100..=60_000).contains(&self.postgres.status_interval_ms) {
            return Err(invalid(
                "postgres.status_interval_ms",
                format!(
                    "{} is outside 100..=60000; keep it well below wal_sender_timeout",
                    self.postgres.status_interval_ms
                ),
            ));
        }
        if !(1..=self.postgres.status_interval_ms).contains(&self.postgres.confirm_interval_ms) {
            return Err(invalid(
                "postgres.confirm_interval_ms",
                format!(
                    "{} is outside 1..={} (postgres.status_interval_ms); a status update is sent at least that often anyway",
                    self.postgres.confirm_interval_ms, self.postgres.status_interval_ms
                ),
            ));
        }
        self.table()?;
        let parts =
            parse_topic_template(&self.outbox.topic).map_err(|m| invalid("outbox.topic", m))?;
        if !parts.iter().any(|p| matches!(p, TemplatePart::Column(_))) {
            tracing::debug!(topic = %self.outbox.topic, "topic template has no column reference: every event goes to one topic");
        }
        let c = &self.outbox.columns;
        for (key, v) in [
            ("outbox.key", &self.outbox.key),
            ("outbox.columns.id", &c.id),
            ("outbox.columns.aggregate_type", &c.aggregate_type),
            ("outbox.columns.aggregate_id", &c.aggregate_id),
            ("outbox.columns.event_type", &c.event_type),
            ("outbox.columns.payload", &c.payload),
        ] {
            if v.is_empty() {
                return Err(invalid(key, "must name a column"));
            }
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                format!("must list at least one host:port (or set {ENV_KAFKA_BROKERS})"),
            ));
        }
        if self.kafka.topic_partitions < 1 {
            return Err(invalid("kafka.topic_partitions", "must be at least 1"));
        }
        if self.kafka.topic_replication_factor < 1 {
            return Err(invalid(
                "kafka.topic_replication_factor",
                "must be at least 1",
            ));
        }
        for (k, v) in &self.kafka.properties {
            if let Some((_, why)) = OWNED_PROPERTIES.iter().find(|(owned, _)| owned == k) {
                return Err(ConfigError::Conflict {
                    message: format!("remove kafka.properties.{k:?}: {why}"),
                });
            }
            property_value(v).map_err(|m| invalid("kafka.properties", format!("{k:?}: {m}")))?;
        }
        if self.relay.reconnect_backoff_min_ms == 0
            || self.relay.reconnect_backoff_min_ms > self.relay.reconnect_backoff_max_ms
        {
            return Err(invalid(
                "relay.reconnect_backoff_min_ms",
                "must be at least 1 and not above relay.reconnect_backoff_max_ms",
            ));
        }
        if !crate::outbox::valid_topic(&self.outbox.dead_letter_topic) {
            return Err(invalid(
                "outbox.dead_letter_topic",
                format!(
                    "{:?} is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)",
                    self.outbox.dead_letter_topic
                ),
            ));
        }
        replay::validate(&self.checkpoint, &self.replay, &self.sink)?;
        if self.relay.standby_retry_ms < 10 {
            return Err(invalid("relay.standby_retry_ms", "must be at least 10"));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{:?} is not an address like \"127.0.0.1:9187\" (use \"\" to disable)",
                    self.metrics.listen
                ),
            ));
        }
        Ok(())
    }

    /// The parsed connection string and its TLS settings (`sslmode`,
    /// `sslrootcert`; the root certificate file is read here). Errors never
    /// contain the string itself (it may hold a password).
    pub fn postgres_config(&self) -> Result<PgTarget, ConfigError> {
        let url = self
            .postgres
            .url
            .as_deref()
            .ok_or_else(|| ConfigError::Missing {
                key: "postgres.url",
                hint: format!("set it in the config file or in {ENV_POSTGRES_URL}"),
            })?;
        let (rest, tls_params) =
            crate::transport::split_params(url).map_err(|m| invalid("postgres.url", m))?;
        let mut cfg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            invalid(
                "postgres.url",
                format!("is not a valid libpq URL or key=value connection string ({e}); example: postgresql://relay@127.0.0.1:5432/app"),
            )
        })?;
        if cfg.get_hosts().is_empty() {
            cfg.host("localhost");
        }
        if cfg.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
            cfg.user(&user);
        }
        if cfg.get_dbname().is_none() {
            let user = cfg.get_user().unwrap_or("postgres").to_string();
            cfg.dbname(&user);
        }
        cfg.application_name("outbox-relay");
        if let Some(file) = &self.postgres.password_file {
            cfg.password(read_secret(file)?);
        }
        // TLS is set up by `transport` for both connections, per the TLS parameters.
        PgTarget::new(cfg, &tls_params).map_err(|m| invalid("postgres.url", m))
    }

    pub fn table(&self) -> Result<TableName, ConfigError> {
        let t = &self.outbox.table;
        let (schema, name) = t.split_once('.').unwrap_or(("public", t));
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(invalid(
                "outbox.table",
                format!("{t:?} must be \"table\" or \"schema.table\""),
            ));
        }
        Ok(TableName {
            schema: schema.into(),
            name: name.into(),
        })
    }

    pub fn topic_template(&self) -> Vec<TemplatePart> {
        parse_topic_template(&self.outbox.topic).expect("validated")
    }
}

/// Reads a secret file; the content is trimmed of surrounding whitespace and
/// never appears in an error.
fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadSecret {
        path: path.into(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(ConfigError::Invalid {
            key: "postgres.url_file/password_file",
            message: format!("{path:?} is empty"),
        });
    }
    Ok(text.to_string())
}

/// Renders a TOML property value as the string librdkafka expects.
pub fn property_value(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "must be a string, number or boolean, not {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("relay.toml"), |_| None)
    }

    const MINIMAL: &str = "[postgres]\nurl = \"postgresql://relay:s3cret@db:5432/app\"\n";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.postgres.slot, "outbox_relay");
        assert_eq!(c.postgres.publication, "outbox_relay");
        assert_eq!(c.outbox.table, "public.outbox");
        assert_eq!(c.outbox.topic, "outbox.event.{aggregate_type}");
        assert_eq!(c.outbox.key, "aggregate_id");
        assert_eq!(c.outbox.columns.payload, "payload");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.postgres.status_interval_ms, 1000);
        assert_eq!(c.postgres.confirm_interval_ms, 20);
        assert_eq!(c.checkpoint.interval_ms, 1000);
        assert_eq!(c.checkpoint.write_interval_ms, 20);
        let pg = c.postgres_config().unwrap();
        assert_eq!(pg.config.get_user(), Some("relay"));
        assert_eq!(pg.config.get_dbname(), Some("app"));
        assert_eq!(pg.tls.mode(), crate::transport::SslMode::Prefer);
        assert_eq!(
            c.table().unwrap(),
            TableName {
                schema: "public".into(),
                name: "outbox".into()
            }
        );
    }

    #[test]
    fn environment_overrides_url_and_brokers() {
        let env = |k: &str| match k {
            ENV_POSTGRES_URL => Some("host=/run/postgresql user=x dbname=y".to_string()),
            ENV_KAFKA_BROKERS => Some("k1:9092,k2:9092".to_string()),
            _ => None,
        };
        let c = Config::from_toml("[postgres]\n", Path::new("r.toml"), env).unwrap();
        assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(c.postgres_config().unwrap().config.get_dbname(), Some("y"));
    }

    #[test]
    fn bad_configs_name_the_key_and_never_leak_the_password() {
        let cases: &[(&str, &str)] = &[
            ("[postgres]\nurl = \"postgresql://a@b/c\"\nslott = \"x\"\n", "unknown field `slott`"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\nslot = 5\n", "invalid type"),
            ("[postgres]\n", "postgres.url is missing"),
            ("[postgres]\nurl = \"postgresql://u:s3cret@h:notaport/db\"\n", "invalid postgres.url"),
            ("[postgres]\nurl = \"postgresql://u:s3cret@h/db?sslmode=verify\"\n", "invalid postgres.url: sslmode=\"verify\" is not one of"),
            ("[postgres]\nurl = \"postgresql://u:s3cret@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem\"\n", "cannot read sslrootcert \"/nonexistent.pem\""),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\nslot = \"Bad-Slot\"\n", "postgres.slot"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[outbox]\ntopic = \"x.{aggregate_type\"\n", "unclosed"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[outbox]\ntopic = \"x}\"\n", "unmatched"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[outbox]\ntable = \"a.b.c\"\n", "outbox.table"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[kafka.properties]\n\"enable.idempotence\" = false\n", "remove kafka.properties.\"enable.idempotence\""),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[kafka.properties]\n\"bootstrap.servers\" = \"x\"\n", "set kafka.brokers instead"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[kafka.properties]\n\"linger.ms\" = [1]\n", "must be a string, number or boolean"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\nstatus_interval_ms = 0\n", "postgres.status_interval_ms"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\nconfirm_interval_ms = 2000\n", "postgres.confirm_interval_ms"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[checkpoint]\nwrite_interval_ms = 0\n", "checkpoint.write_interval_ms"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[relay]\nreconnect_backoff_min_ms = 0\n", "reconnect_backoff_min_ms"),
            ("[postgres]\nurl = \"postgresql://a@b/c\"\n[outbox.columns]\npayload = \"\"\n", "outbox.columns.payload"),
        ];
        for (text, expected) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(expected),
                "{text:?}: {err:?} lacks {expected:?}"
            );
            assert!(!err.contains("s3cret"), "password leaked: {err}");
        }
    }

    #[test]
    fn secrets_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("url");
        let pw = dir.path().join("pw");
        std::fs::write(&url, "postgresql://relay@db:5432/app\n").unwrap();
        std::fs::write(&pw, "s3cret\n").unwrap();
        let text = format!(
            "[postgres]\nurl_file = {:?}\npassword_file = {:?}\n",
            url, pw
        );
        let c = parse(&text).unwrap();
        let pg = c.postgres_config().unwrap();
        assert_eq!(pg.config.get_user(), Some("relay"));
        assert_eq!(pg.config.get_password(), Some(&b"s3cret"[..]));

        let both = format!(
            "[postgres]\nurl = \"postgresql://a@b/c\"\nurl_file = {:?}\n",
            url
        );
        assert!(parse(&both).unwrap_err().to_string().contains("remove one"));
        let missing = "[postgres]\nurl_file = \"/nonexistent/url\"\n";
        assert!(parse(missing)
            .unwrap_err()
            .to_string()
            .contains("cannot read secret file \"/nonexistent/url\""));
    }

    #[test]
    fn topic_templates() {
        use TemplatePart::*;
        assert_eq!(
            parse_topic_template("outbox.event.{aggregate_type}").unwrap(),
            vec![
                Literal("outbox.event.".into()),
                Column("aggregate_type".into())
            ]
        );
        assert_eq!(
            parse_topic_template("{a}-{b}").unwrap(),
            vec![Column("a".into()), Literal("-".into()), Column("b".into())]
        );
        assert_eq!(
            parse_topic_template("fixed").unwrap(),
            vec![Literal("fixed".into())]
        );
        assert!(parse_topic_template("").is_err());
        assert!(parse_topic_template("{}").is_err());
    }

    #[test]
    fn property_values_render_for_librdkafka() {
        let c = parse(
            "[postgres]\nurl = \"postgresql://a@b/c\"\n[kafka.properties]\n\"linger.ms\" = 5\n\"compression.type\" = \"lz4\"\n\"socket.nagle.disable\" = true\n",
        )
        .unwrap();
        let rendered: Vec<_> = c
            .kafka
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), property_value(v).unwrap()))
            .collect();
        assert_eq!(
            rendered,
            [
                ("compression.type", "lz4".to_string()),
                ("linger.ms", "5".to_string()),
                ("socket.nagle.disable", "true".to_string())
            ]
        );
    }
}
