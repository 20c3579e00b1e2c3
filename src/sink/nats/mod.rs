//! The NATS JetStream sink: each record is published to the subject named by
//! its topic, with its headers as NATS headers, its key in the `key` header and
//! its event id as `Nats-Msg-Id` (JetStream drops a copy re-sent within the
//! stream's `duplicate_window`). A record counts as delivered only once its
//! PubAck arrived, i.e. once the stream stored it.
//!
//! Publishing is pipelined on one connection: records leave in the order the
//! session sent them, up to `nats.max_outstanding` wait for their PubAck, and
//! they are reported in that order. The connection is never re-established:
//! what the client had written when a connection broke may be lost while what
//! it sent after reconnecting would be stored, a later record of a key ahead
//! of an earlier one. So a lost connection, a PubAck timeout or a stream
//! error ends the sink ([`TaskSink`]): the run loop makes a new one and
//! streams again from the slot, and `Nats-Msg-Id` drops what had been stored.
//!
//! Layout: `message` (subject, headers, size), `connect` (credentials, TLS,
//! a client that never reconnects), `publish` (the task), `stream`
//! (`nats.create_stream`). Not here: which subjects exist (streams are the
//! user's, unless `nats.create_stream`), and what is confirmed (`ack`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{mpsc, watch};

use super::task::TaskSink;
use super::{DeliveryReport, SendError, SinkSetupError};
use crate::ack::Seq;
use crate::config::NatsConfig;
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

mod connect;
mod message;
mod publish;
mod stream;

use message::{headers, message_size, valid_subject};
pub use message::{KEY_HEADER, TIMESTAMP_HEADER};
use publish::Publisher;
use stream::{ensure_stream, StreamSettings};

pub(super) const SINK: &str = "NATS";
/// The server's `max_payload` until it told its own (its default, 1 MiB).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Where the connection stands, as `ensure_topic` sees it.
#[derive(Clone)]
enum Conn {
    Connecting,
    Up(jetstream::Context),
    /// Why connecting failed, and whether the user must fix it (credentials, TLS).
    Failed {
        error: String,
        config: bool,
    },
}
pub struct NatsSink {
    task: TaskSink,
    conn: watch::Receiver<Conn>,
    max_payload: Arc<AtomicUsize>,
    create: Option<StreamSettings>,
    /// Subjects `ensure_topic` has seen (and, with `create`, made sure a stream captures).
    ensured: HashSet<String>,
}

impl NatsSink {
    pub fn new(
        cfg: &NatsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(NatsSink, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        let servers = cfg.servers().map_err(|message| SinkSetupError::Config {
            sink: SINK,
            message: format!("nats.url: {message}"),
        })?;
        let (conn_tx, conn) = watch::channel(Conn::Connecting);
        let max_payload = Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD));
        let publisher = Publisher {
            cfg: cfg.clone(),
            servers,
            conn: conn_tx,
            max_payload: max_payload.clone(),
            metrics: metrics.clone(),
        };
        let (task, reports) =
            TaskSink::spawn(SINK, cfg.max_outstanding, metrics, |rx, reporter| {
                publisher.run(rx, reporter)
            });
        let create = cfg.create_stream.then(|| StreamSettings {
            name: cfg.stream.clone(),
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        });
        Ok((
            NatsSink {
                task,
                conn,
                max_payload,
                create,
                ensured: HashSet::new(),
            },
            reports,
        ))
    }

    /// With `nats.create_stream`, makes sure the stream captures `topic`
    /// (once per subject); waits for the connection first.
    pub async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkSetupError> {
        if self.ensured.contains(topic) {
            return Ok(());
        }
        let ctx = self.connected().await?;
        if let Some(s) = &self.create {
            ensure_stream(&ctx, s, topic)
                .await
                .map_err(|error| SinkSetupError::CreateTopic {
                    topic: topic.to_string(),
                    error,
                })?;
        }
        self.ensured.insert(topic.to_string());
        Ok(())
    }

    /// Waits until the first connection is up, or says why it failed:
    /// `Config` for what the user must fix (credentials, TLS), else `Connect`.
    pub async fn ready(&mut self) -> Result<(), SinkSetupError> {
        self.connected().await.map(|_| ())
    }

    async fn connected(&mut self) -> Result<jetstream::Context, SinkSetupError> {
        let conn = match self.conn.wait_for(|c| !matches!(c, Conn::Connecting)).await {
            Ok(c) => c.clone(),
            Err(_) => Conn::Failed {
                error: self
                    .task
                    .fatal_error()
                    .unwrap_or_else(|| "the connection task stopped".into()),
                config: false,
            },
        };
        match conn {
            Conn::Up(ctx) => Ok(ctx),
            Conn::Failed {
                error,
                config: true,
            } => Err(SinkSetupError::Config {
                sink: SINK,
                message: error,
            }),
            Conn::Failed { error, .. } => Err(SinkSetupError::Connect { sink: SINK, error }),
            Conn::Connecting => Err(SinkSetupError::Connect {
                sink: SINK,
                error: "still connecting".into(),
            }),
        }
    }

    /// Takes a record, or refuses one JetStream could never store (too large
    /// for the server, an invalid subject or header).
    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        let refused = |reason: &'static str, error: String| SendError::Refused {
            sink: SINK,
            topic: record.topic.clone(),
            reason,
            error,
        };
        if !valid_subject(&record.topic) {
            return Err(refused(
                "rejected",
                "not a valid NATS subject (an empty token between dots); change outbox.topic"
                    .into(),
            ));
        }
        let headers = headers(record).map_err(|e| refused("rejected", e))?;
        let size = message_size(&headers, record);
        let max = self.max_payload.load(Ordering::Relaxed);
        if size > max {
            return Err(refused(
                "too_large",
                format!("the message is {size} bytes with its headers, above the server's max_payload of {max}; raise max_payload in the server's configuration or shrink the payload"),
            ));
        }
        self.task.send(seq, commit_time, record)
    }

    pub fn fatal_error(&self) -> Option<String> {
        self.task.fatal_error()
    }

    pub fn queued(&self) -> i32 {
        self.task.queued()
    }
}
