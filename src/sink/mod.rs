//! Where records go: the seam every sink sits behind (Kafka in `kafka`,
//! Redis in `redis`, NATS JetStream in `nats`, RabbitMQ in `rabbitmq`, and
//! stdout as JSON lines in `stdout`).
//!
//! The acknowledgement contract, which every sink keeps and the rest of the
//! relay relies on:
//! - `send` either refuses the record at once (`SendError`: `QueueFull` is
//!   backpressure, the same record is offered again; anything else is an
//!   error the session handles) or takes it, and then exactly one
//!   `DeliveryReport` with the record's `Seq` arrives on the channel `new`
//!   returned, in any order across records.
//! - A report is `Ok` only once the record is durable in the destination as
//!   far as that system can say (Kafka: acknowledged by every in-sync replica,
//!   `acks=all`; stdout: written and flushed). Only then may the ack tracker
//!   let the slot and the checkpoint pass it.
//! - An `Err` report says why (`DeliveryError`); a permanent one carries the
//!   record so `outbox.on_invalid` can dead-letter it.
//! - Records of one key keep their order in the destination.
//!
//! A new sink is a new module here, a `SinkKind`, its config section, and an
//! arm in each `match` below.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::ack::Seq;
use crate::config::{Config, SinkKind};
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;
use kafka::Producer;

pub mod kafka;
pub mod nats;
pub mod rabbitmq;
pub mod redis;
mod stdout;
pub mod task;

pub use nats::NatsSink;
pub use rabbitmq::RabbitMqSink;
pub use redis::RedisSink;
pub use stdout::{json_line, StdoutSink};

/// The outcome of one record taken by [`Sink::send`].
#[derive(Debug)]
pub struct DeliveryReport {
    pub seq: Seq,
    pub result: Result<(), DeliveryError>,
}

/// A record the destination did not accept (after the client's own retries).
#[derive(Debug, thiserror::Error)]
#[error("{sink} did not accept the record for {topic:?}: {error}")]
pub struct DeliveryError {
    /// The destination's name for messages ("Kafka", "Redis", ...).
    pub sink: &'static str,
    /// The record's topic (stream, subject, routing key).
    pub topic: String,
    /// What the destination or its client said, with a hint where one helps.
    pub error: String,
    /// Set when the destination refused this record for good (retrying cannot
    /// help), so `outbox.on_invalid` decides: stop, or the dead-letter topic.
    pub refused: Option<Refusal>,
}

/// A record refused for good, as sent.
#[derive(Debug)]
pub struct Refusal {
    /// The dead-letter `reason` header: `rejected`, `too_large`, `unroutable`.
    pub reason: &'static str,
    pub original: Box<Record>,
}

/// Why [`Sink::send`] did not take a record.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The sink's queue is full: back off and offer the same record again.
    #[error("the sink's queue is full")]
    QueueFull,
    /// This record is refused for good (too large, invalid destination):
    /// `outbox.on_invalid` decides.
    #[error("{sink} refuses the record for {topic:?}: {error}")]
    Refused {
        sink: &'static str,
        topic: String,
        /// The dead-letter `reason` header: `rejected`, `too_large`, `unroutable`.
        reason: &'static str,
        error: String,
    },
    /// The client cannot take records at all (closed connection): the session
    /// ends and streams again from the slot with a new sink.
    #[error("{sink} cannot take records: {error}")]
    Unavailable { sink: &'static str, error: String },
    /// The client rejected the record for a reason retrying does not fix and
    /// that is not the record's (the relay stops and names it).
    #[error("cannot enqueue the record for {topic:?}: {error}")]
    Failed { topic: String, error: String },
    /// The stdout sink could not write (closed pipe, full disk).
    #[error("cannot write the record to stdout: {0}")]
    Output(std::io::Error),
}

/// Why a sink could not be created or prepared.
#[derive(Debug, thiserror::Error)]
pub enum SinkSetupError {
    /// The configuration is wrong: the relay stops (exit 2).
    #[error("invalid {sink} configuration: {message}")]
    Config { sink: &'static str, message: String },
    /// The destination cannot be reached or refused the connection for now: retried.
    #[error("cannot connect to {sink}: {error}")]
    Connect { sink: &'static str, error: String },
    /// A topic (stream, exchange) could not be created: retried.
    #[error("cannot create topic {topic:?}: {error}; create it by hand or check the relay's CREATE permission")]
    CreateTopic { topic: String, error: String },
}

/// Seconds from a transaction's commit to now (`delivery_latency_seconds`).
pub(crate) fn seconds_since(commit_time: Timestamp) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    now.saturating_sub(commit_time.unix_micros()).max(0) as f64 / 1e6
}

impl SinkKind {
    /// The `sink` label of every metric series.
    pub fn label(self) -> &'static str {
        match self {
            SinkKind::Kafka => "kafka",
            SinkKind::Stdout => "stdout",
            SinkKind::Redis => "redis",
            SinkKind::Nats => "nats",
            SinkKind::RabbitMq => "rabbitmq",
        }
    }
}

pub enum Sink {
    Kafka(Producer),
    Stdout(StdoutSink),
    Redis(RedisSink),
    Nats(NatsSink),
    RabbitMq(RabbitMqSink),
}

impl Sink {
    /// The configured sink and the channel its delivery reports arrive on.
    pub fn new(
        cfg: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<(Sink, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        match cfg.sink.kind {
            SinkKind::Kafka => {
                let (p, rx) = Producer::new(&cfg.kafka, metrics)?;
                Ok((Sink::Kafka(p), rx))
            }
            SinkKind::Stdout => {
                let (tx, rx) = mpsc::unbounded_channel();
                Ok((Sink::Stdout(StdoutSink::new(tx)), rx))
            }
            SinkKind::Redis => {
                let (r, rx) = RedisSink::new(&cfg.redis, metrics)?;
                Ok((Sink::Redis(r), rx))
            }
            SinkKind::Nats => {
                let (s, rx) = NatsSink::new(&cfg.nats, metrics)?;
                Ok((Sink::Nats(s), rx))
            }
            SinkKind::RabbitMq => {
                let (s, rx) = RabbitMqSink::new(&cfg.rabbitmq, metrics)?;
                Ok((Sink::RabbitMq(s), rx))
            }
        }
    }

    pub async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkSetupError> {
        match self {
            Sink::Kafka(p) => p.ensure_topic(topic).await,
            // Routing keys need no creating; an unroutable record comes back per record.
            Sink::Stdout(_) | Sink::Redis(_) | Sink::RabbitMq(_) => Ok(()),
            Sink::Nats(s) => s.ensure_topic(topic).await,
        }
    }

    /// Waits until a sink that connects in the background is connected: the
    /// session asks before it streams, so an unreachable destination is a
    /// `Connect` error (retried, and `/readyz` says why).
    pub async fn ready(&mut self) -> Result<(), SinkSetupError> {
        match self {
            Sink::Kafka(_) | Sink::Stdout(_) => Ok(()),
            Sink::Redis(r) => r.ready().await,
            Sink::Nats(s) => s.ready().await,
            Sink::RabbitMq(s) => s.ready().await,
        }
    }

    /// `Unavailable` once the sink's connection is gone, also while nothing
    /// is being sent (the session asks on every status tick).
    pub fn check(&self) -> Result<(), SendError> {
        match self {
            Sink::Kafka(_) | Sink::Stdout(_) => Ok(()),
            Sink::Redis(r) => r.check(),
            Sink::Nats(s) => match s.fatal_error() {
                Some(error) => Err(SendError::Unavailable {
                    sink: "NATS",
                    error,
                }),
                None => Ok(()),
            },
            Sink::RabbitMq(s) => s.check(),
        }
    }

    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        match self {
            Sink::Kafka(p) => p.send(seq, commit_time, record),
            Sink::Stdout(s) => s.send(seq, record),
            Sink::Redis(r) => r.send(seq, commit_time, record),
            Sink::Nats(s) => s.send(seq, commit_time, record),
            Sink::RabbitMq(s) => s.send(seq, commit_time, record),
        }
    }

    /// Why the sink cannot be used any more, if so (see [`Producer::fatal_error`]).
    pub fn fatal_error(&self) -> Option<String> {
        match self {
            Sink::Kafka(p) => p.fatal_error(),
            Sink::Stdout(_) => None,
            Sink::Redis(r) => r.fatal_error(),
            Sink::Nats(s) => s.fatal_error(),
            Sink::RabbitMq(s) => s.fatal_error(),
        }
    }

    /// Records enqueued and not yet reported.
    pub fn queued(&self) -> i32 {
        match self {
            Sink::Kafka(p) => p.queued(),
            Sink::Stdout(_) => 0,
            Sink::Redis(r) => r.queued(),
            Sink::Nats(s) => s.queued(),
            Sink::RabbitMq(s) => s.queued(),
        }
    }
}
