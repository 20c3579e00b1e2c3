//! `[kafka]`: the broker, topic creation and librdkafka properties.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// Environment variable that overrides `kafka.brokers`.
pub const ENV_KAFKA_BROKERS: &str = "OUTBOX_RELAY_KAFKA_BROKERS";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated. Default `127.0.0.1:9092`; `OUTBOX_RELAY_KAFKA_BROKERS` overrides.
    pub brokers: String,
    /// Create a topic through the admin API the first time a record is routed to it. Default `false`
    /// (topics are expected to exist, or the broker to auto-create them).
    pub create_topics: bool,
    /// Partitions of topics created by `create_topics`. Default 1.
    pub topic_partitions: i32,
    /// Replication factor of topics created by `create_topics`. Default 1.
    pub topic_replication_factor: i32,
    /// Any librdkafka producer property (`compression.type`, `linger.ms`, `security.protocol`,
    /// `sasl.mechanism`, ...). Values may be strings, numbers or booleans.
    pub properties: BTreeMap<String, toml::Value>,
    /// `properties` as the strings librdkafka takes, made once by validation.
    #[serde(skip)]
    resolved_properties: Vec<(String, String)>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            create_topics: false,
            topic_partitions: 1,
            topic_replication_factor: 1,
            properties: BTreeMap::new(),
            resolved_properties: Vec::new(),
        }
    }
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

impl KafkaConfig {
    pub(super) fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) {
        if let Some(b) = env(ENV_KAFKA_BROKERS).filter(|v| !v.is_empty()) {
            self.brokers = b;
        }
    }

    /// Checks the section and renders `properties` for librdkafka (done by
    /// `Config::from_toml`; a section built in code must call it before use).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(invalid(
                "kafka.brokers",
                format!("must list at least one host:port (or set {ENV_KAFKA_BROKERS})"),
            ));
        }
        if self.topic_partitions < 1 {
            return Err(invalid("kafka.topic_partitions", "must be at least 1"));
        }
        if self.topic_replication_factor < 1 {
            return Err(invalid(
                "kafka.topic_replication_factor",
                "must be at least 1",
            ));
        }
        let mut resolved = Vec::with_capacity(self.properties.len());
        for (k, v) in &self.properties {
            if let Some((_, why)) = OWNED_PROPERTIES.iter().find(|(owned, _)| owned == k) {
                return Err(ConfigError::Conflict {
                    message: format!("remove kafka.properties.{k:?}: {why}"),
                });
            }
            let v = property_value(v)
                .map_err(|m| invalid("kafka.properties", format!("{k:?}: {m}")))?;
            resolved.push((k.clone(), v));
        }
        self.resolved_properties = resolved;
        Ok(())
    }

    /// `properties` as librdkafka takes them.
    pub fn property_strings(&self) -> &[(String, String)] {
        &self.resolved_properties
    }
}

/// Renders a TOML property value as the string librdkafka expects.
fn property_value(v: &toml::Value) -> Result<String, String> {
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
