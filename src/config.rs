//! The relay's configuration: one TOML file plus environment overrides,
//! parsed, validated and resolved once at start.
//!
//! One file per section under `config/` (each with its `Default` and its
//! `validate`); `names` (table names, SQL quoting) and `topic` (the topic
//! template and the topic name rule) are leaves the rest of the crate uses.
//! [`Config::from_toml`] fills defaults, applies environment overrides, reads
//! secret files, validates everything that can be checked without connecting
//! (unknown keys, the connection string, the table name, the topic template,
//! producer properties the relay must own) and keeps the parsed forms
//! ([`Config::table`], [`Config::topic_template`], [`Config::pg`],
//! [`Config::window`]) so nothing is parsed twice. Runtime checks (wal_level,
//! privileges, columns) live elsewhere.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod kafka;
mod names;
mod nats;
mod outbox;
mod poll;
mod postgres;
mod rabbitmq;
mod redis;
mod relay;
mod replay;
mod secret;
mod shard;
mod topic;

use crate::transport::PgTarget;
pub use kafka::{KafkaConfig, ENV_KAFKA_BROKERS};
pub(crate) use names::validate_identifier;
pub use names::{quote_ident, quote_literal, TableName};
pub use nats::{NatsConfig, ENV_NATS_URL};
pub use outbox::{
    Columns, Format, KeyFormat, OnInvalid, OptionalColumn, OutboxConfig, Placement, PlacementKind,
    Preset, RelayHeader, ValueFormat,
};
pub use poll::{AfterSend, PollConfig, SourceConfig, SourceKind};
pub use postgres::{FailoverSlot, PostgresConfig, ENV_POSTGRES_URL};
pub use rabbitmq::{ExchangeType, RabbitMqConfig, ENV_RABBITMQ_URL};
pub use redis::{RedisConfig, RedisMode, ENV_REDIS_URL};
pub use relay::{MetricsConfig, RelayConfig};
pub use replay::{parse_window, CheckpointConfig, ReplayConfig, SinkConfig, SinkKind, Window};
pub use shard::{ShardConfig, ENV_SHARD_COUNT, ENV_SHARD_INDEX};
pub use topic::{parse_topic_template, valid_topic, TemplatePart};

/// The file as written: sections with their defaults, nothing resolved yet.
/// Every section may be left out (`postgres.url` can come from the environment).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    postgres: PostgresConfig,
    outbox: OutboxConfig,
    kafka: KafkaConfig,
    relay: RelayConfig,
    metrics: MetricsConfig,
    checkpoint: CheckpointConfig,
    replay: ReplayConfig,
    sink: SinkConfig,
    shard: ShardConfig,
    redis: RedisConfig,
    nats: NatsConfig,
    rabbitmq: RabbitMqConfig,
    source: SourceConfig,
    poll: PollConfig,
}

/// A validated configuration: the sections as written (with defaults and
/// environment overrides) and what was parsed from them once.
#[derive(Debug, Clone)]
pub struct Config {
    pub postgres: PostgresConfig,
    pub outbox: OutboxConfig,
    pub kafka: KafkaConfig,
    pub relay: RelayConfig,
    pub metrics: MetricsConfig,
    pub checkpoint: CheckpointConfig,
    pub replay: ReplayConfig,
    pub sink: SinkConfig,
    pub shard: ShardConfig,
    pub redis: RedisConfig,
    pub nats: NatsConfig,
    pub rabbitmq: RabbitMqConfig,
    pub source: SourceConfig,
    pub poll: PollConfig,
    table: TableName,
    topic: Vec<TemplatePart>,
    pg: PgTarget,
    window: Option<Window>,
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

impl Config {
    /// Reads, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::from_toml(&text, path, |k| std::env::var(k).ok())
    }

    /// Parses, validates and resolves config text; `env` looks up environment overrides.
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        raw.postgres.apply_env(&env)?;
        raw.kafka.apply_env(&env);
        raw.shard.resolve(&env)?;
        raw.redis.resolve(&env)?;
        raw.nats.resolve(&env, raw.sink.kind)?;
        raw.rabbitmq.resolve(&env, raw.sink.kind)?;
        let pg = raw.postgres.target()?;
        raw.postgres.validate()?;
        let table = TableName::parse("outbox.table", &raw.outbox.table)?;
        let topic =
            parse_topic_template(&raw.outbox.topic).map_err(|m| invalid("outbox.topic", m))?;
        if !topic.iter().any(|p| matches!(p, TemplatePart::Column(_))) {
            tracing::debug!(topic = %raw.outbox.topic, "topic template has no column reference: every event goes to one topic");
        }
        validate_outbox(&raw.outbox)?;
        raw.kafka.validate()?;
        raw.relay.validate()?;
        let window = replay::validate(&raw.checkpoint, &raw.replay, &raw.sink)?;
        raw.redis
            .validate(raw.sink.kind == SinkKind::Redis, &raw.outbox)?;
        raw.metrics.validate()?;
        poll::validate(&raw.source, &raw.poll, &raw.shard, &raw.outbox, &raw.replay)?;
        if raw.shard.count > 1 && !raw.outbox.messages_prefix.is_empty() {
            return Err(ConfigError::Conflict {
                message: "outbox.messages_prefix cannot be combined with shard.count > 1: logical messages pass no publication row filter, so every shard would relay each one; remove messages_prefix (write outbox rows) or set shard.count = 1".into(),
            });
        }
        // From here on postgres.slot and postgres.publication are this shard's.
        let shard = raw.shard.shard();
        raw.shard.base_slot = std::mem::take(&mut raw.postgres.slot);
        raw.shard.base_publication = std::mem::take(&mut raw.postgres.publication);
        raw.postgres.slot = shard.name(&raw.shard.base_slot);
        raw.postgres.publication = shard.name(&raw.shard.base_publication);
        validate_identifier("postgres.slot", &raw.postgres.slot)?;
        Ok(Config {
            postgres: raw.postgres,
            outbox: raw.outbox,
            kafka: raw.kafka,
            relay: raw.relay,
            metrics: raw.metrics,
            checkpoint: raw.checkpoint,
            replay: raw.replay,
            sink: raw.sink,
            shard: raw.shard,
            redis: raw.redis,
            nats: raw.nats,
            rabbitmq: raw.rabbitmq,
            source: raw.source,
            poll: raw.poll,
            table,
            topic,
            pg,
            window,
        })
    }

    /// The connection to PostgreSQL (`postgres.url` parsed, TLS settings and
    /// secret files read at load).
    pub fn pg(&self) -> &PgTarget {
        &self.pg
    }

    /// `outbox.table`, split into schema and table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// `outbox.topic`, parsed.
    pub fn topic_template(&self) -> &[TemplatePart] {
        &self.topic
    }

    /// `replay.window`, parsed.
    pub fn window(&self) -> Option<Window> {
        self.window
    }
}

/// The `[outbox]` checks that need nothing but the section.
fn validate_outbox(outbox: &OutboxConfig) -> Result<(), ConfigError> {
    let c = &outbox.columns;
    for (key, v) in [
        ("outbox.key", &outbox.key),
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
    if !valid_topic(&outbox.dead_letter_topic) {
        return Err(invalid(
            "outbox.dead_letter_topic",
            format!(
                "{:?} is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)",
                outbox.dead_letter_topic
            ),
        ));
    }
    Ok(())
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
        let pg = c.pg().clone();
        assert_eq!(pg.config.get_user(), Some("relay"));
        assert_eq!(pg.config.get_dbname(), Some("app"));
        assert_eq!(pg.tls.mode(), crate::transport::SslMode::Prefer);
        assert_eq!(
            c.table().clone(),
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
        assert_eq!(c.pg().clone().config.get_dbname(), Some("y"));
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
        let pg = c.pg().clone();
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
            .property_strings()
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
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
