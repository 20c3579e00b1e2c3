//! The publishing task: connects, publishes records in the order the session
//! sent them with up to `nats.max_outstanding` PubAcks outstanding, reports
//! each in that order, and ends when the connection broke or a publish failed
//! for a reason retrying may fix.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, ErrorCode};
use tokio::sync::{mpsc, watch};

use super::connect::{connect, Events};
use super::message::headers;
use super::{Conn, SINK};
use crate::config::NatsConfig;
use crate::metrics::Metrics;
use crate::sink::task::{Item, Reporter};
use crate::sink::{DeliveryError, Refusal};

/// The task's side: connects, publishes, reports.
pub(super) struct Publisher {
    pub(super) cfg: NatsConfig,
    pub(super) servers: Vec<async_nats::ServerAddr>,
    pub(super) conn: watch::Sender<Conn>,
    pub(super) max_payload: Arc<AtomicUsize>,
    pub(super) metrics: Arc<Metrics>,
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

impl Publisher {
    /// The task: returns only when the sink can no longer be used.
    pub(super) async fn run(
        self,
        mut rx: mpsc::Receiver<Item>,
        reporter: Reporter,
    ) -> Result<(), String> {
        let events = Arc::new(Events::default());
        let mut lost = events.lost.subscribe();
        let client = match connect(
            &self.cfg,
            &self.servers,
            events.clone(),
            self.metrics.clone(),
        )
        .await
        {
            Ok(c) => c,
            Err(failed) => {
                let (why, config) = match &failed {
                    Conn::Failed { error, config } => (error.clone(), *config),
                    Conn::Connecting | Conn::Up(_) => (String::new(), false),
                };
                self.conn.send_replace(failed);
                if config {
                    // Credentials or TLS the user must fix: `ready` says so and
                    // the relay stops (exit 2). A task that ended would make the
                    // run loop take the sink for broken and retry instead.
                    std::future::pending::<()>().await;
                }
                return Err(format!("cannot connect to NATS: {why}"));
            }
        };
        let info = client.server_info();
        self.max_payload.store(info.max_payload, Ordering::Relaxed);
        tracing::info!(server = %info.server_name, version = %info.version, max_payload = info.max_payload, "connected to NATS");
        let max = self.cfg.max_outstanding;
        let ctx = jetstream::ContextBuilder::new()
            .timeout(self.cfg.ack_timeout())
            .max_ack_inflight(max)
            .backpressure_on_inflight(true)
            .build(client);
        self.conn.send_replace(Conn::Up(ctx.clone()));
        let mut inflight: VecDeque<(Item, AckFuture)> = VecDeque::with_capacity(max);
        loop {
            let waiting = !inflight.is_empty();
            let room = inflight.len() < max;
            tokio::select! {
                biased;
                _ = async { lost.wait_for(|l| *l).await.map(|_| ()) } => {
                    return Err("the connection to NATS was lost; the records not acknowledged are sent again from the slot".into());
                }
                res = async { (&mut inflight.front_mut().expect("waiting").1).await }, if waiting => {
                    let (item, _) = inflight.pop_front().expect("waiting");
                    match res {
                        Ok(_) => reporter.acked(&item),
                        Err(e) => {
                            let last = events.last_server_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            let (error, permanent) = classify(&e, &item.record.topic, &self.cfg, last);
                            let topic = item.record.topic.clone();
                            let refused = permanent.map(|reason| Refusal { reason, original: Box::new(item.record) });
                            let stop = refused.is_none();
                            reporter.failed(item.seq, DeliveryError { sink: SINK, topic, error: error.clone(), refused });
                            if stop {
                                return Err(error);
                            }
                        }
                    }
                }
                item = rx.recv(), if room => {
                    let Some(item) = item else { return Ok(()) };
                    // Checked in `send`: cannot fail here.
                    let headers = headers(&item.record).unwrap_or_default();
                    let payload = item.record.value.clone().unwrap_or_default();
                    let subject = item.record.topic.clone();
                    match ctx.publish_with_headers(subject, headers, payload).await {
                        Ok(ack) => inflight.push_back((item, Box::pin(ack.into_future()))),
                        Err(e) => return Err(format!("cannot publish to {:?}: {e}", item.record.topic)),
                    }
                }
            }
        }
    }
}

/// What a failed publish means: the error text, and the dead-letter reason
/// when JetStream refuses this record for good (retrying cannot help).
fn classify(
    e: &PublishError,
    subject: &str,
    cfg: &NatsConfig,
    last_server_error: Option<String>,
) -> (String, Option<&'static str>) {
    match e.kind() {
        PublishErrorKind::StreamNotFound => (
            format!("no JetStream stream captures subject {subject:?} (no responders); create a stream whose subjects include it (e.g. nats stream add OUTBOX --subjects '{subject}') or set nats.create_stream = true"),
            None,
        ),
        PublishErrorKind::TimedOut => {
            let server = last_server_error
                .map(|e| format!(" (the server's last error: {e})"))
                .unwrap_or_default();
            (
                format!("no PubAck within nats.ack_timeout_ms ({} ms){server}", cfg.ack_timeout_ms),
                None,
            )
        }
        _ => {
            let js = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>());
            match js.map(|j| j.error_code()) {
                Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => (
                    format!("{e}: {}; raise the stream's max_msg_size or shrink the payload", js.map(ToString::to_string).unwrap_or_default()),
                    Some("too_large"),
                ),
                _ => (
                    match js {
                        Some(j) => format!("{e}: {j}"),
                        None => e.to_string(),
                    },
                    None,
                ),
            }
        }
    }
}
