//! The Kafka producer and its delivery reports.
//!
//! Wraps an idempotent librdkafka producer: records are enqueued without
//! waiting, each tagged with its sequence number, and every delivery report is
//! forwarded on a channel for the ack tracker. Also creates topics on request.
//! It does not decide what is confirmed (see `ack`) nor how rows map to records
//! (see `outbox`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use tokio::sync::mpsc;

use crate::ack::Seq;
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;
use crate::sink::{DeliveryError, DeliveryReport, Refusal, SendError, SinkSetupError};

/// Defaults the relay applies unless `[kafka.properties]` sets them.
const DEFAULT_PROPERTIES: &[(&str, &str)] = &[
    // Bounded memory: at most this much payload waits in librdkafka's queue.
    ("queue.buffering.max.kbytes", "65536"),
    // The kbytes bound counts payload only; per-message overhead makes the
    // message count the bound that matters for small records (librdkafka's
    // default of 100000 let RSS reach 91 MB with the broker stalled, 20000 kept
    // it near 30 MB at the same catch-up speed: docs/benchmarks.md).
    ("queue.buffering.max.messages", "20000"),
    // The idempotent producer keeps one request per partition in flight
    // (librdkafka counts its limit of 5 in messages); while it waits for the
    // broker, a batch whose linger has expired makes the broker thread
    // busy-poll. Against a broker answering in 10 ms, 10 instead of 5 cut the
    // relay from 0.49-0.57 to 0.22 core at 5,000 events/s, with no worse p50 or
    // p99; it adds 2-3 ms of median against one that answers at once
    // (docs/benchmarks.md, "Third round").
    ("linger.ms", "10"),
    // The Java client's partitioner (murmur2 of the key bytes), so a key lands
    // in the same partition as when Debezium or any Java producer wrote it, and
    // an empty key is hashed like any other (librdkafka's `consistent_random`
    // spreads empty keys over partitions at random). README: "Partitioning".
    ("partitioner", "murmur2_random"),
    // Broker round-trip times for outbox_relay_broker_rtt_seconds.
    ("statistics.interval.ms", "10000"),
    ("message.timeout.ms", "300000"),
];

/// Broker or client errors that retrying cannot fix: the record itself is
/// refused, so `outbox.on_invalid` decides (stop, or the dead-letter topic).
pub fn is_permanent(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidRecord
                // A partition the topic does not have (a placed partition column).
                | RDKafkaErrorCode::UnknownPartition
        )
    )
}

/// Copies a refused message back into a [`Record`] (rare path: permanent failures only).
fn record_of(msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    use rdkafka::message::Headers;
    let bytes = |b: Option<&[u8]>| bytes::Bytes::copy_from_slice(b.unwrap_or_default());
    Record {
        topic: msg.topic().to_string(),
        key: bytes(msg.key()),
        value: msg.payload().map(bytes::Bytes::copy_from_slice),
        headers: msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string().into(), bytes(h.value)))
                    .collect()
            })
            .unwrap_or_default(),
        partition: Some(msg.partition()),
        timestamp_ms: msg.timestamp().to_millis(),
    }
}

fn hint(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
            "; create the topic or set kafka.create_topics = true"
        }
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
            "; raise the broker's message.max.bytes or shrink the payload"
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
            "; grant the relay's principal WRITE on the topic"
        }
        Some(RDKafkaErrorCode::MessageTimedOut) => {
            "; the broker was unreachable for message.timeout.ms"
        }
        _ => "",
    }
}

fn config_error(e: KafkaError) -> SinkSetupError {
    SinkSetupError::Config {
        sink: "Kafka",
        message: format!("{e}; check [kafka.properties]"),
    }
}

/// The dead-letter reason for a record Kafka refuses for good.
fn refusal_reason(e: &KafkaError) -> &'static str {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) {
        "too_large"
    } else {
        "rejected"
    }
}

/// What travels with each record through librdkafka to its delivery report.
pub struct InFlight {
    pub seq: Seq,
    pub commit_time: Timestamp,
}

pub struct Context {
    reports: mpsc::UnboundedSender<DeliveryReport>,
    metrics: Arc<Metrics>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.error("kafka_client");
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): only the
    /// brokers' round-trip times are read, the number to compare with
    /// `linger.ms` (the full report also lists every topic and partition).
    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<StatsReport>(statistics) {
            Ok(report) => record_broker_rtt(&self.metrics, &report),
            Err(e) => tracing::debug!(error = %e, "unreadable librdkafka statistics"),
        }
    }
}

/// The part of a librdkafka statistics report the relay reads.
#[derive(Debug, serde::Deserialize)]
struct StatsReport {
    #[serde(default)]
    brokers: std::collections::HashMap<String, BrokerStats>,
}

#[derive(Debug, serde::Deserialize)]
struct BrokerStats {
    nodeid: i32,
    nodename: String,
    rtt: Option<RttWindow>,
}

/// A round-trip window, in microseconds. librdkafka's histogram covers up to
/// 500 ms; slower samples only count in `outofrange` (and `max`).
#[derive(Debug, serde::Deserialize)]
struct RttWindow {
    cnt: i64,
    max: i64,
    p50: i64,
    p99: i64,
    #[serde(default)]
    outofrange: i64,
}

/// Sets `broker_rtt_seconds` from one statistics report: brokers with a node
/// id (not the bootstrap entries) that answered requests in the interval.
/// Brokers without samples in the interval drop out, so an idle or
/// unreachable broker shows no value rather than an old one.
fn record_broker_rtt(metrics: &Metrics, report: &StatsReport) {
    metrics.broker_rtt.reset();
    for broker in report.brokers.values() {
        let Some(rtt) = broker.rtt.as_ref().filter(|w| w.cnt > 0) else {
            continue;
        };
        if broker.nodeid < 0 {
            continue;
        }
        // Past the histogram's range the percentiles stop growing: use the
        // maximum, so a very slow broker never reads as a fast one.
        let p50 = if rtt.outofrange > 0 && rtt.p50 == 0 {
            rtt.max
        } else {
            rtt.p50
        };
        let p99 = if rtt.outofrange > 0 { rtt.max } else { rtt.p99 };
        for (stat, micros) in [("p50", p50), ("p99", p99)] {
            metrics
                .broker_rtt
                .with_label_values(&[&broker.nodename, stat])
                .set(micros as f64 / 1e6);
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<InFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, inflight: Box<InFlight>) {
        let result = match result {
            Ok(msg) => {
                self.metrics
                    .events_acked
                    .with_label_values(&[msg.topic()])
                    .inc();
                self.metrics
                    .delivery_latency
                    .observe(crate::sink::seconds_since(inflight.commit_time));
                Ok(())
            }
            Err((error, msg)) => {
                self.metrics
                    .events_failed
                    .with_label_values(&[msg.topic()])
                    .inc();
                let refused = is_permanent(error).then(|| Refusal {
                    reason: refusal_reason(error),
                    original: Box::new(record_of(msg)),
                });
                Err(DeliveryError {
                    sink: "Kafka",
                    topic: msg.topic().to_string(),
                    error: format!("{error}{}", hint(error)),
                    refused,
                })
            }
        };
        // The receiver is gone only when the session ended; its records are re-sent then.
        let _ = self.reports.send(DeliveryReport {
            seq: inflight.seq,
            result,
        });
    }
}

/// The client configuration shared by the producer and the admin client.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in DEFAULT_PROPERTIES {
        cc.set(*k, *v);
    }
    for (k, v) in cfg.property_strings() {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &cfg.brokers);
    cc
}

/// An idempotent producer whose delivery reports arrive on a channel.
pub struct Producer {
    inner: ThreadedProducer<Context>,
    admin: Option<(AdminClient<DefaultClientContext>, NewTopicSettings)>,
    known_topics: HashSet<String>,
}

struct NewTopicSettings {
    partitions: i32,
    replication: i32,
}

impl Producer {
    pub fn new(
        cfg: &KafkaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Producer, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut cc = client_config(cfg);
        cc.set("enable.idempotence", "true").set("acks", "all");
        let inner: ThreadedProducer<Context> = cc
            .create_with_context(Context {
                reports: tx,
                metrics,
            })
            .map_err(config_error)?;
        let admin = if cfg.create_topics {
            let admin: AdminClient<DefaultClientContext> = client_config(cfg)
                // Its default context would log every statistics report.
                .set("statistics.interval.ms", "0")
                .create()
                .map_err(config_error)?;
            Some((
                admin,
                NewTopicSettings {
                    partitions: cfg.topic_partitions,
                    replication: cfg.topic_replication_factor,
                },
            ))
        } else {
            None
        };
        Ok((
            Producer {
                inner,
                admin,
                known_topics: HashSet::new(),
            },
            rx,
        ))
    }

    /// With `kafka.create_topics`, creates `topic` the first time it is seen
    /// (an existing topic is fine). Without it, does nothing.
    pub async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkSetupError> {
        let Some((admin, settings)) = &self.admin else {
            return Ok(());
        };
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            settings.partitions,
            TopicReplication::Fixed(settings.replication),
        );
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let err = |error: String| SinkSetupError::CreateTopic {
            topic: topic.to_string(),
            error,
        };
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| err(e.to_string()))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(err(code.to_string())),
            }
        }
        self.known_topics.insert(topic.to_string());
        Ok(())
    }

    /// Enqueues a record of the transaction committed at `commit_time`; its
    /// delivery report will carry `seq`.
    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(&v[..]),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(&record.topic, Box::new(InFlight { seq, commit_time }))
                .key(&record.key[..])
                .headers(headers);
        // No payload: a tombstone.
        rec.payload = record.value.as_deref();
        rec.partition = record.partition;
        rec.timestamp = record.timestamp_ms;
        match self.inner.send(rec) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((error, _)) if is_permanent(&error) => Err(SendError::Refused {
                sink: "Kafka",
                topic: record.topic.clone(),
                reason: refusal_reason(&error),
                error: format!("{error}{}", hint(&error)),
            }),
            Err((error, _)) => Err(SendError::Failed {
                topic: record.topic.clone(),
                error: format!("{error}{}", hint(&error)),
            }),
        }
    }

    /// librdkafka's fatal error, after which this producer can send nothing
    /// more (for example an idempotence violation it cannot recover from).
    pub fn fatal_error(&self) -> Option<String> {
        self.inner
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code}: {reason}"))
    }

    /// Records enqueued or in flight inside librdkafka.
    pub fn queued(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Waits up to `timeout` for everything enqueued to be delivered (blocking).
    pub fn flush(&self, timeout: Duration) -> bool {
        self.inner.flush(timeout).is_ok()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn records_the_broker_refuses_for_good_are_permanent_the_rest_retried() {
        use rdkafka::error::KafkaError::MessageProduction as Produce;
        for code in [
            RDKafkaErrorCode::UnknownPartition,
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(is_permanent(&Produce(code)), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert!(!is_permanent(&Produce(code)), "{code:?}");
        }
    }
    use super::*;

    fn report(json: &str) -> StatsReport {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn broker_round_trips_in_seconds_without_bootstrap_entries() {
        let m = Metrics::new();
        let r = report(
            r#"{"name": "rdkafka#producer-1", "topics": {}, "brokers": {
                "127.0.0.1:9092/bootstrap": {"nodeid": -1, "nodename": "127.0.0.1:9092",
                    "rtt": {"cnt": 3, "max": 9000, "p50": 9000, "p99": 9000, "outofrange": 0}},
                "127.0.0.1:9092/1": {"nodeid": 1, "nodename": "127.0.0.1:9092",
                    "rtt": {"cnt": 40, "max": 7000, "p50": 2500, "p99": 6000, "outofrange": 0}},
                "b2:9092/2": {"nodeid": 2, "nodename": "b2:9092",
                    "rtt": {"cnt": 0, "max": 0, "p50": 0, "p99": 0, "outofrange": 0}}}}"#,
        );
        record_broker_rtt(&m, &r);
        let get = |b: &str, s: &str| m.broker_rtt.with_label_values(&[b, s]).get();
        assert_eq!(get("127.0.0.1:9092", "p50"), 0.0025);
        assert_eq!(get("127.0.0.1:9092", "p99"), 0.006);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains("b2:9092"), "no samples, no value: {text}");
    }

    #[test]
    fn a_broker_beyond_the_histogram_range_reads_as_its_maximum() {
        let m = Metrics::new();
        record_broker_rtt(
            &m,
            &report(
                r#"{"brokers": {"k:9092/1": {"nodeid": 1, "nodename": "k:9092",
                    "rtt": {"cnt": 5, "max": 1200000, "p50": 0, "p99": 0, "outofrange": 5}}}}"#,
            ),
        );
        assert_eq!(
            m.broker_rtt.with_label_values(&["k:9092", "p50"]).get(),
            1.2
        );
        assert_eq!(
            m.broker_rtt.with_label_values(&["k:9092", "p99"]).get(),
            1.2
        );
        // The next report without samples for it removes the stale value.
        record_broker_rtt(&m, &report(r#"{"brokers": {}}"#));
        assert!(!String::from_utf8(m.render()).unwrap().contains("k:9092"));
    }
}
