//! The RabbitMQ sink: each record is published to one exchange with its topic
//! as the routing key, persistent (delivery mode 2) and `mandatory`, on one
//! channel in publisher-confirm mode, and reported once the server confirmed
//! it. Not here: what the slot may confirm (`ack`), what a refused record
//! becomes (`relay::session::produce`, `outbox.on_invalid`).
//!
//! - here: the sink the session sees (`send`, `ready`, `check`) and its settings;
//! - `message`: a record as an AMQP message (routing key, body, properties),
//!   what AMQP cannot carry, and which record a returned message was;
//! - `publisher`: the task that owns the connection, publishes in confirmed
//!   batches and reports each record.

use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::ExchangeKind;
use tokio::sync::{mpsc, watch};

use super::task::TaskSink;
use super::{DeliveryReport, SendError, SinkSetupError};
use crate::ack::Seq;
use crate::config::{ExchangeType, RabbitMqConfig};
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

mod message;
mod publisher;

pub use message::properties;

pub(super) const SINK: &str = "RabbitMQ";
/// Records waiting for the task beyond the batch it gathers (the session's backpressure).
const QUEUE: usize = 64;

/// Where the task's connection stands, for [`RabbitMqSink::ready`].
#[derive(Debug, Clone)]
pub(super) enum Link {
    Connecting,
    Up,
    Down(String),
}

/// The RabbitMQ sink (see the module comment).
pub struct RabbitMqSink {
    inner: TaskSink,
    link: watch::Receiver<Link>,
    max_message_bytes: usize,
}

/// What the task needs, resolved from `[rabbitmq]`.
pub(super) struct Settings {
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    exchange: String,
    declare: Option<ExchangeKind>,
    max_in_flight: usize,
    connect_timeout: Duration,
    /// `host:port (vhost "v")`, for messages (never the credentials).
    address: String,
}

impl Settings {
    fn new(cfg: &RabbitMqConfig) -> Result<Settings, SinkSetupError> {
        let uri = cfg.uri.clone().ok_or_else(|| SinkSetupError::Config {
            sink: SINK,
            message:
                "rabbitmq.url is missing; set it, rabbitmq.url_file or OUTBOX_RELAY_RABBITMQ_URL"
                    .into(),
        })?;
        let identity = match (&cfg.tls.cert_pem, &cfg.tls.key_pem) {
            (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let declare = cfg.declare.then_some(match cfg.exchange_type {
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Headers => ExchangeKind::Headers,
        });
        let address = format!(
            "{}:{} (vhost {:?})",
            uri.authority.host, uri.authority.port, uri.vhost
        );
        Ok(Settings {
            uri,
            tls: OwnedTLSConfig {
                identity,
                cert_chain: cfg.tls.ca_pem.clone(),
            },
            exchange: cfg.exchange.clone(),
            declare,
            max_in_flight: cfg.max_in_flight,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            address,
        })
    }
}

impl RabbitMqSink {
    /// Starts the task that connects and publishes; [`RabbitMqSink::ready`]
    /// says whether connecting worked.
    pub fn new(
        cfg: &RabbitMqConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(RabbitMqSink, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        let settings = Settings::new(cfg)?;
        let (link_tx, link) = watch::channel(Link::Connecting);
        let (inner, reports) = TaskSink::spawn(SINK, QUEUE, metrics, move |rx, reporter| {
            publisher::run(settings, rx, reporter, link_tx)
        });
        Ok((
            RabbitMqSink {
                inner,
                link,
                max_message_bytes: cfg.max_message_bytes,
            },
            reports,
        ))
    }

    /// Waits until the task connected (or gave up): the session starts only
    /// with a usable connection, and `/readyz` says why not.
    pub async fn ready(&mut self) -> Result<(), SinkSetupError> {
        let connect = |error: String| SinkSetupError::Connect { sink: SINK, error };
        let state = self
            .link
            .wait_for(|l| !matches!(l, Link::Connecting))
            .await
            .map(|l| l.clone());
        match (state, self.inner.fatal_error()) {
            (_, Some(error)) | (Ok(Link::Down(error)), None) => Err(connect(error)),
            (Ok(_), None) => Ok(()),
            (Err(_), None) => Err(connect("the sink's task stopped".into())),
        }
    }

    /// `Unavailable` once the connection is gone (checked on every status tick,
    /// so an idle session ends too and readiness follows the connection).
    pub fn check(&self) -> Result<(), SendError> {
        match self.inner.fatal_error() {
            Some(error) => Err(SendError::Unavailable { sink: SINK, error }),
            None => Ok(()),
        }
    }

    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        if let Some((reason, error)) = message::refusal(record, self.max_message_bytes) {
            return Err(SendError::Refused {
                sink: SINK,
                topic: record.topic.clone(),
                reason,
                error,
            });
        }
        self.inner.send(seq, commit_time, record)
    }

    pub fn fatal_error(&self) -> Option<String> {
        self.inner.fatal_error()
    }

    pub fn queued(&self) -> i32 {
        self.inner.queued()
    }
}
