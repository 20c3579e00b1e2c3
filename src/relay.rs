//! The streaming loop: replication stream in, Kafka records out, confirmed LSN back.
//!
//! Ties `setup`, `replication`, `pgoutput`, `outbox`, `kafka` and `ack`
//! together for one session (one replication connection), and runs sessions
//! in a loop with jittered backoff until shutdown or a fatal error. It owns no
//! protocol details of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::ack::{AckTracker, Seq};
use crate::config::Config;
use crate::config::OnInvalid;
use crate::kafka::{
    is_permanent, DeliveryError, DeliveryReport, KafkaSetupError, Producer, SendError,
};
use crate::lsn::Lsn;
use crate::metrics::{Health, Metrics};
use crate::outbox::{
    dead_letter_from_record, DeadLetter, Mapping, MappingError, OutboxTable, Record,
};
use crate::pgoutput::{self, DecodeError, Message, RelationCache, Timestamp};
use crate::replication::{self, ReplicationError, StatusWriter, StreamEvent, StreamReader};
use crate::setup::{self, SetupError};
use crate::transport::PgTarget;

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Setup(Box<SetupError>),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("cannot decode the replication stream at LSN {lsn}: {source}")]
    Decode { lsn: Lsn, source: DecodeError },
    #[error("{0}; nothing past this row is confirmed")]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("{0}; the slot stays at the last acknowledged position and the relay streams again from there")]
    Delivery(#[from] DeliveryError),
    #[error("{0}")]
    Send(SendError),
    #[error("insert into relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("Kafka refused the record of event {id} (commit LSN {lsn}) for topic {topic:?} for good: {error}; nothing past it is confirmed; fix the row or the topic, or set outbox.on_invalid = \"dead_letter\"")]
    Refused {
        topic: String,
        id: String,
        lsn: String,
        error: String,
    },
}

impl From<SetupError> for RelayError {
    fn from(e: SetupError) -> Self {
        RelayError::Setup(Box::new(e))
    }
}

impl RelayError {
    /// Errors the relay must not retry: the user has to act.
    pub fn is_fatal(&self) -> bool {
        match self {
            RelayError::Setup(e) => e.is_permanent(),
            RelayError::Replication(e) => e.is_permanent(),
            RelayError::Kafka(KafkaSetupError::Config(_)) => true,
            RelayError::Kafka(KafkaSetupError::CreateTopic { .. }) => false,
            RelayError::Delivery(_) => false,
            RelayError::Decode { .. }
            | RelayError::Mapping(_)
            | RelayError::Send(_)
            | RelayError::UnknownRelation(_)
            | RelayError::Refused { .. } => true,
        }
    }

    /// The `kind` label of `outbox_relay_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Setup(_) => "setup",
            RelayError::Replication(e) if e.is_slot_in_use() => "slot_in_use",
            RelayError::Replication(_) => "replication",
            RelayError::Decode { .. } => "decode",
            RelayError::Mapping(_) => "invalid_row",
            RelayError::Kafka(_) => "kafka_setup",
            RelayError::Delivery(_) => "delivery",
            RelayError::Send(_) | RelayError::Refused { .. } => "produce",
            RelayError::UnknownRelation(_) => "protocol",
        }
    }
}

/// The shutdown trigger handed to [`run`]: set it to `true` to stop.
pub type ShutdownRx = watch::Receiver<bool>;

async fn wait_shutdown(rx: &mut ShutdownRx) {
    // A dropped sender without a request never stops the relay.
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs the relay until shutdown (`Ok`) or a fatal error. Failed sessions are
/// retried with jittered exponential backoff; while another instance holds the
/// slot this one stands by and retries every `relay.standby_retry_ms`.
pub async fn run(
    cfg: Config,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownRx,
) -> Result<(), RelayError> {
    let pg = cfg.postgres_config().expect("validated");
    let outbox = OutboxTable::from_config(&cfg);
    let poller = tokio::spawn(poll_slot(
        pg.clone(),
        cfg.postgres.slot.clone(),
        metrics.clone(),
    ));
    let _stop_poller = AbortOnDrop(poller);
    // One producer for the process: a PostgreSQL reconnect leaves records already
    // in flight to finish (their reports carry an earlier session's sequence
    // numbers and are ignored) instead of aborting requests mid-flight.
    let (mut producer, mut reports) = Producer::new(&cfg.kafka, metrics.clone())?;
    let mut next_seq: Seq = 0;
    let mut failures = 0u32;
    let mut ever_streamed = false;
    loop {
        let mut session = Session {
            cfg: &cfg,
            outbox: &outbox,
            metrics: &metrics,
            first: !ever_streamed,
            streamed: false,
            first_seq: next_seq,
        };
        let result = session
            .run(&pg, &mut producer, &mut reports, &mut shutdown)
            .await;
        next_seq = session.first_seq;
        ever_streamed |= session.streamed;
        let err = match result {
            Ok(()) => {
                metrics.set_health(Health::Down("stopped".into()));
                return Ok(());
            }
            Err(e) => e,
        };
        metrics.error(err.kind());
        if err.is_fatal() {
            metrics.set_health(Health::Down(err.to_string()));
            return Err(err);
        }
        metrics.reconnects.inc();
        failures = if session.streamed { 1 } else { failures + 1 };
        let delay = match &err {
            RelayError::Replication(r) if r.is_slot_in_use() => {
                metrics.set_health(Health::Standby);
                let delay = jitter(Duration::from_millis(cfg.relay.standby_retry_ms));
                tracing::info!(slot = %cfg.postgres.slot, retry_in = ?delay, "slot is streaming to another instance; standing by");
                failures = 0;
                delay
            }
            _ => {
                metrics.set_health(Health::Down(err.to_string()));
                let delay = backoff(&cfg, failures);
                tracing::warn!(error = %err, retry_in = ?delay, "session failed; reconnecting");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wait_shutdown(&mut shutdown) => return Ok(()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Scales `d` by a random factor in 50-100 %.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
}

/// Exponential backoff from the configured minimum to the maximum, with jitter.
fn backoff(cfg: &Config, failures: u32) -> Duration {
    let min = cfg.relay.reconnect_backoff_min_ms;
    let base = min
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(cfg.relay.reconnect_backoff_max_ms);
    jitter(Duration::from_millis(base))
}

/// How often the slot's state is read from `pg_replication_slots`.
const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the slot gauges (retained WAL, wal_status, active) current.
async fn poll_slot(pg: PgTarget, slot: String, metrics: Arc<Metrics>) {
    let mut client = None;
    loop {
        if client.is_none() {
            client = setup::sql_connect(&pg).await.ok();
        }
        if let Some(c) = &client {
            match setup::slot_report(c, &slot).await {
                Ok(Some(r)) => {
                    metrics
                        .slot_retained_wal_bytes
                        .set(r.retained_wal_bytes as f64);
                    metrics.slot_active.set(i64::from(r.active));
                    metrics.set_slot_wal_status(r.wal_status.as_deref());
                }
                Ok(None) => {
                    metrics.slot_active.set(0);
                    metrics.set_slot_wal_status(None);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the slot's state");
                    client = None;
                }
            }
        }
        tokio::time::sleep(SLOT_POLL_INTERVAL).await;
    }
}

struct Session<'a> {
    cfg: &'a Config,
    outbox: &'a OutboxTable,
    metrics: &'a Arc<Metrics>,
    /// No session of this process has streamed yet (a missing slot may be created).
    first: bool,
    /// START_REPLICATION succeeded: the next failure starts the backoff afresh.
    streamed: bool,
    /// Sequence number of this session's first record; on return, the next
    /// session's (records of earlier sessions may still report back).
    first_seq: Seq,
}

/// What the stream loop is doing with the transaction being received.
struct Stream {
    tracker: AckTracker,
    relations: RelationCache,
    mappings: HashMap<u32, Result<Mapping, MappingError>>,
    commit_lsn: Lsn,
    commit_time: Timestamp,
    /// Records the producer's full queue did not take yet, in order; reading
    /// stops until they are all enqueued.
    pending: VecDeque<(Seq, Record)>,
}

impl Session<'_> {
    async fn run(
        &mut self,
        pg: &PgTarget,
        producer: &mut Producer,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        shutdown: &mut ShutdownRx,
    ) -> Result<(), RelayError> {
        let cfg = self.cfg;
        let client = setup::sql_connect(pg).await?;
        let slot = setup::prepare(&client, cfg, self.first).await?;
        drop(client);
        if cfg.outbox.on_invalid == OnInvalid::DeadLetter {
            producer.ensure_topic(&cfg.outbox.dead_letter_topic).await?;
        }
        let conn = replication::connect(pg).await?;
        let (mut reader, mut writer) = conn
            .start_logical(&cfg.postgres.slot, Lsn::ZERO, &cfg.postgres.publication)
            .await?;
        self.streamed = true;
        self.metrics.set_health(Health::Streaming);
        self.metrics.set_confirmed(slot.confirmed_flush);
        tracing::info!(slot = %cfg.postgres.slot, confirmed = %slot.confirmed_flush, "streaming from slot");

        let mut s = Stream {
            tracker: AckTracker::starting_at(slot.confirmed_flush, self.first_seq),
            relations: RelationCache::default(),
            mappings: HashMap::new(),
            commit_lsn: Lsn::ZERO,
            commit_time: Timestamp(0),
            pending: VecDeque::new(),
        };
        let mut ticker =
            tokio::time::interval(Duration::from_millis(cfg.postgres.status_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let result = loop {
            let step = tokio::select! {
                biased;
                _ = wait_shutdown(shutdown) => break Ok(()),
                // The timer comes before the reports so a steady stream of
                // acknowledgements can never starve the status updates.
                _ = ticker.tick() => {
                    self.metrics.records_in_flight.set(s.tracker.in_flight() as i64);
                    self.metrics.producer_queue_depth.set(i64::from(producer.queued()));
                    self.send_status(&mut writer, &s).await
                }
                // Acknowledgements before new input: memory stays bounded.
                Some(report) = reports.recv() => self.on_report(&mut s, producer, report),
                _ = tokio::time::sleep(Duration::from_millis(2)), if !s.pending.is_empty() => {
                    self.retry_pending(&mut s, producer)
                }
                event = reader.next(), if s.pending.is_empty() => match event {
                    Ok(Some(event)) => self.on_event(&mut s, producer, &mut writer, event).await,
                    Ok(None) => Err(ReplicationError::Closed { context: "streaming" }.into()),
                    Err(e) => Err(e.into()),
                },
            };
            if let Err(e) = step {
                break Err(e);
            }
        };

        // Broken connection: nothing more can be confirmed on it.
        if let Err(RelayError::Replication(_)) = &result {
            self.first_seq = s.tracker.next_seq();
            return result;
        }
        // Shutdown, a fatal row or a failed delivery: wait a bounded time for what
        // is in flight, confirm what was acknowledged and end the stream cleanly.
        let drain = if matches!(result, Err(RelayError::Delivery(_))) {
            Duration::ZERO
        } else {
            Duration::from_millis(cfg.relay.shutdown_timeout_ms)
        };
        self.drain(&mut s, producer, reports, drain).await;
        self.first_seq = s.tracker.next_seq();
        let _ = self.send_status(&mut writer, &s).await;
        end_stream(reader, writer).await;
        self.metrics
            .records_in_flight
            .set(s.tracker.in_flight() as i64);
        tracing::info!(confirmed = %s.tracker.confirmed(), unacknowledged = s.tracker.in_flight(), "stopped streaming");
        result
    }

    async fn drain(
        &self,
        s: &mut Stream,
        producer: &Producer,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        limit: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        let started = Instant::now();
        while s.tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(report)) => {
                    if let Err(e) = self.on_report(s, producer, report) {
                        tracing::warn!(error = %e, "delivery failed while draining");
                    }
                }
                _ => break,
            }
        }
        tracing::debug!(waited = ?started.elapsed(), left = s.tracker.in_flight(), "drained deliveries");
    }

    fn on_report(
        &self,
        s: &mut Stream,
        producer: &Producer,
        report: DeliveryReport,
    ) -> Result<(), RelayError> {
        if report.seq < self.first_seq {
            // A record of an earlier session: this session sends it again anyway.
            return Ok(());
        }
        match report.result {
            Ok(()) => {
                let confirmed = s.tracker.ack(report.seq);
                self.metrics.transactions_confirmed.inc_by(confirmed as u64);
                Ok(())
            }
            // The broker refused the record for good: dead-letter it under the same
            // sequence number, so the position waits for the dead-letter record's ack.
            Err(DeliveryError {
                original: Some(original),
                error,
                ..
            }) if self.dead_letter() => {
                let why = DeadLetter {
                    reason: "rejected",
                    error: error.to_string(),
                    original_topic: None,
                };
                self.send_dead_letter(
                    s,
                    producer,
                    report.seq,
                    dead_letter_from_record(&original, self.dlq(), why),
                )
            }
            // Refused for good under the stop policy: stop, naming the event.
            Err(DeliveryError {
                original: Some(original),
                error,
                ..
            }) => Err(refused(&original, error)),
            Err(e) => Err(e.into()),
        }
    }

    fn dead_letter(&self) -> bool {
        self.cfg.outbox.on_invalid == OnInvalid::DeadLetter
    }

    fn dlq(&self) -> &str {
        &self.cfg.outbox.dead_letter_topic
    }

    fn send_dead_letter(
        &self,
        s: &mut Stream,
        producer: &Producer,
        seq: Seq,
        record: Record,
    ) -> Result<(), RelayError> {
        let text = |k: &str| {
            record
                .header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let reason = text("reason").unwrap_or_else(|| "unknown".into());
        self.metrics
            .events_dead_lettered
            .with_label_values(&[&reason])
            .inc();
        let id = text("id");
        tracing::warn!(reason, id = ?id, topic = %record.topic, "sending row to the dead-letter topic");
        if s.pending.is_empty() {
            self.enqueue(s, producer, seq, record)
        } else {
            s.pending.push_back((seq, record));
            Ok(())
        }
    }

    async fn send_status(&self, writer: &mut StatusWriter, s: &Stream) -> Result<(), RelayError> {
        let before = writer.last_sent();
        writer.send_status(s.tracker.confirmed(), false).await?;
        let sent = writer.last_sent();
        if sent > before {
            self.metrics.set_confirmed(sent);
            tracing::debug!(lsn = %sent, "confirmed");
        }
        Ok(())
    }

    fn retry_pending(&self, s: &mut Stream, producer: &Producer) -> Result<(), RelayError> {
        while let Some((seq, record)) = s.pending.pop_front() {
            self.enqueue(s, producer, seq, record)?;
            if !s.pending.is_empty() && s.pending.front().map(|p| p.0) == Some(seq) {
                break; // still full: the record went back to the front
            }
        }
        Ok(())
    }

    fn enqueue(
        &self,
        s: &mut Stream,
        producer: &Producer,
        seq: Seq,
        record: Record,
    ) -> Result<(), RelayError> {
        match producer.send(seq, s.commit_time, &record) {
            Ok(()) => {
                self.metrics
                    .events_produced
                    .with_label_values(&[&record.topic])
                    .inc();
                Ok(())
            }
            Err(SendError::QueueFull) => {
                s.pending.push_front((seq, record));
                Ok(())
            }
            Err(SendError::Rejected { error, .. })
                if self.dead_letter() && is_permanent(&error) && record.topic != self.dlq() =>
            {
                let why = DeadLetter {
                    reason: "too_large",
                    error: error.to_string(),
                    original_topic: None,
                };
                let why = if error.rdkafka_error_code()
                    == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
                {
                    why
                } else {
                    DeadLetter {
                        reason: "rejected",
                        ..why
                    }
                };
                self.send_dead_letter(
                    s,
                    producer,
                    seq,
                    dead_letter_from_record(&record, self.dlq(), why),
                )
            }
            Err(SendError::Rejected { error, .. }) if is_permanent(&error) => {
                Err(refused(&record, error))
            }
            Err(e) => Err(RelayError::Send(e)),
        }
    }

    async fn on_event(
        &self,
        s: &mut Stream,
        producer: &mut Producer,
        writer: &mut StatusWriter,
        event: StreamEvent,
    ) -> Result<(), RelayError> {
        let (start, data) = match event {
            StreamEvent::Keepalive { wal_end, reply } => {
                self.metrics.set_server_wal_end(wal_end);
                s.tracker.keepalive(wal_end);
                if reply {
                    self.send_status(writer, s).await?;
                }
                return Ok(());
            }
            StreamEvent::XLogData {
                start,
                wal_end,
                data,
            } => {
                self.metrics.set_server_wal_end(wal_end);
                self.metrics.received_lsn.set(start.0 as f64);
                (start, data)
            }
        };
        let msg =
            pgoutput::decode(data).map_err(|source| RelayError::Decode { lsn: start, source })?;
        match msg {
            Message::Begin(b) => {
                s.commit_lsn = b.final_lsn;
                s.commit_time = b.commit_time;
                s.tracker.begin();
            }
            Message::Commit(c) => {
                let confirmed = s.tracker.commit(c.end_lsn);
                self.metrics.transactions_received.inc();
                self.metrics.transactions_confirmed.inc_by(confirmed as u64);
            }
            Message::Relation(rel) => {
                if self.outbox.matches(&rel) {
                    s.mappings.insert(rel.id, self.outbox.mapping(&rel));
                } else {
                    s.mappings.remove(&rel.id);
                }
                s.relations.insert(rel);
            }
            Message::Insert { relation_id, new } => {
                let Some(mapping) = s.mappings.get(&relation_id) else {
                    if s.relations.get(relation_id).is_none() {
                        return Err(RelayError::UnknownRelation(relation_id));
                    }
                    return self.ignore("insert_other_table", relation_id, s);
                };
                let rel = s
                    .relations
                    .get(relation_id)
                    .ok_or(RelayError::UnknownRelation(relation_id))?;
                let mapped = match mapping {
                    Ok(m) => m.record(&new, s.commit_lsn, rel),
                    Err(e) => Err(e.clone()),
                };
                let record = match mapped {
                    Ok(r) => r,
                    Err(e) if self.dead_letter() => {
                        let why = DeadLetter {
                            reason: e.kind(),
                            error: e.to_string(),
                            original_topic: None,
                        };
                        let record =
                            self.outbox
                                .dead_letter(&new, rel, s.commit_lsn, self.dlq(), why);
                        self.metrics
                            .events_received
                            .with_label_values(&[self.dlq()])
                            .inc();
                        let seq = s.tracker.record();
                        return self.send_dead_letter(s, producer, seq, record);
                    }
                    Err(e) => return Err(e.into()),
                };
                self.metrics
                    .events_received
                    .with_label_values(&[&record.topic])
                    .inc();
                producer.ensure_topic(&record.topic).await?;
                let seq = s.tracker.record();
                self.enqueue(s, producer, seq, record)?;
            }
            Message::Update { relation_id, .. } => return self.ignore("update", relation_id, s),
            Message::Delete { relation_id, .. } => return self.ignore("delete", relation_id, s),
            Message::Truncate { .. } => return self.ignore("truncate", 0, s),
            Message::Origin { .. } | Message::Type { .. } | Message::Message(_) => {}
        }
        Ok(())
    }

    fn ignore(&self, kind: &'static str, relation_id: u32, s: &Stream) -> Result<(), RelayError> {
        self.metrics
            .changes_ignored
            .with_label_values(&[kind])
            .inc();
        if tracing::enabled!(tracing::Level::DEBUG) {
            let table = s
                .relations
                .get(relation_id)
                .map(|r| r.qualified_name())
                .unwrap_or_default();
            tracing::debug!(change = kind, table = %table, "ignored change");
        }
        Ok(())
    }
}

/// The fatal error for a record Kafka refused for good, naming its event.
fn refused(record: &Record, error: rdkafka::error::KafkaError) -> RelayError {
    let header = |k: &str| {
        record
            .header(k)
            .map_or_else(|| "?".into(), |v| String::from_utf8_lossy(v).into_owned())
    };
    RelayError::Refused {
        topic: record.topic.clone(),
        id: header("id"),
        lsn: header("lsn"),
        error: error.to_string(),
    }
}

/// Ends the copy stream and the connection, waiting briefly for the server's side.
async fn end_stream(mut reader: StreamReader, mut writer: StatusWriter) {
    if writer.copy_done().await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(_)) = reader.next().await {}
        })
        .await;
    }
    writer.terminate().await;
}
