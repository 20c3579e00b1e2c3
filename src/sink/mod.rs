//! Where records go: the seam every sink sits behind (today Kafka in
//! `kafka`, and stdout as JSON lines in `stdout`).
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
use crate::kafka::{DeliveryReport, KafkaSetupError, Producer, SendError};
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

mod stdout;

pub use stdout::{json_line, StdoutSink};

pub enum Sink {
    Kafka(Producer),
    Stdout(StdoutSink),
}

impl Sink {
    /// The configured sink and the channel its delivery reports arrive on.
    pub fn new(
        cfg: &Config,
        metrics: Arc<Metrics>,
    ) -> Result<(Sink, mpsc::UnboundedReceiver<DeliveryReport>), KafkaSetupError> {
        match cfg.sink.kind {
            SinkKind::Kafka => {
                let (p, rx) = Producer::new(&cfg.kafka, metrics)?;
                Ok((Sink::Kafka(p), rx))
            }
            SinkKind::Stdout => {
                let (tx, rx) = mpsc::unbounded_channel();
                Ok((Sink::Stdout(StdoutSink::new(tx)), rx))
            }
        }
    }

    pub async fn ensure_topic(&mut self, topic: &str) -> Result<(), KafkaSetupError> {
        match self {
            Sink::Kafka(p) => p.ensure_topic(topic).await,
            Sink::Stdout(_) => Ok(()),
        }
    }

    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        match self {
            Sink::Kafka(p) => p.send(seq, commit_time, record),
            Sink::Stdout(s) => s.send(seq, record),
        }
    }

    /// Why the sink cannot be used any more, if so (see [`Producer::fatal_error`]).
    pub fn fatal_error(&self) -> Option<String> {
        match self {
            Sink::Kafka(p) => p.fatal_error(),
            Sink::Stdout(_) => None,
        }
    }

    /// Records enqueued and not yet reported.
    pub fn queued(&self) -> i32 {
        match self {
            Sink::Kafka(p) => p.queued(),
            Sink::Stdout(_) => 0,
        }
    }
}
