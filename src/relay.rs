//! The streaming loop: replication stream in, Kafka records out, confirmed LSN back.
//!
//! Ties `setup`, `replication`, `pgoutput`, `outbox`, `kafka` and `ack`
//! together for one session (one replication connection), and runs sessions
//! in a loop with jittered backoff until shutdown or a fatal error. It owns no
//! protocol details of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::ack::{AckTracker, Seq};
use crate::config::Config;
use crate::kafka::{DeliveryError, DeliveryReport, KafkaSetupError, Producer, SendError};
use crate::lsn::Lsn;
use crate::outbox::{Mapping, MappingError, OutboxTable, Record};
use crate::pgoutput::{self, DecodeError, Message, RelationCache};
use crate::replication::{self, ReplicationError, StatusWriter, StreamEvent, StreamReader};
use crate::setup::{self, SetupError};

/// Counters and positions of a running relay, readable from other tasks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Outbox rows decoded from the stream.
    pub events_received: AtomicU64,
    /// Records handed to the producer.
    pub events_produced: AtomicU64,
    /// Records acknowledged by the broker.
    pub events_acked: AtomicU64,
    /// Records whose delivery finally failed.
    pub events_failed: AtomicU64,
    /// Changes that are not outbox inserts (other tables, updates, deletes, truncates).
    pub changes_ignored: AtomicU64,
    /// Transactions (Commit messages) received.
    pub transactions_received: AtomicU64,
    /// The last LSN sent to the server as flushed.
    pub confirmed_lsn: AtomicU64,
    /// The last WAL end reported by the server.
    pub server_wal_end: AtomicU64,
    /// Sessions that ended with an error and were restarted.
    pub reconnects: AtomicU64,
    /// True while this instance streams from the slot.
    pub active: AtomicBool,
}

impl Stats {
    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed_lsn.load(Ordering::Relaxed))
    }
}

/// Why the relay stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Setup(#[from] SetupError),
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
            | RelayError::UnknownRelation(_) => true,
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
/// retried with jittered exponential backoff.
pub async fn run(
    cfg: Config,
    stats: Arc<Stats>,
    mut shutdown: ShutdownRx,
) -> Result<(), RelayError> {
    let pg = cfg.postgres_config().expect("validated");
    let outbox = OutboxTable::from_config(&cfg);
    let mut failures = 0u32;
    loop {
        let mut session = Session {
            cfg: &cfg,
            outbox: &outbox,
            stats: &stats,
            streamed: false,
        };
        let result = session.run(&pg, &mut shutdown).await;
        stats.active.store(false, Ordering::Relaxed);
        let err = match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => e,
        };
        failures = if session.streamed { 1 } else { failures + 1 };
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = backoff(&cfg, failures);
        match &err {
            RelayError::Replication(r) if r.is_slot_in_use() => {
                tracing::info!(slot = %cfg.postgres.slot, retry_in = ?delay, "slot is streaming to another instance; standing by")
            }
            _ => tracing::warn!(error = %err, retry_in = ?delay, "session failed; reconnecting"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wait_shutdown(&mut shutdown) => return Ok(()),
        }
    }
}

/// Exponential backoff from the configured minimum to the maximum, with 50-100% jitter.
fn backoff(cfg: &Config, failures: u32) -> Duration {
    let min = cfg.relay.reconnect_backoff_min_ms;
    let max = cfg.relay.reconnect_backoff_max_ms;
    let base = min
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(max);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = 0.5 + f64::from(nanos % 1000) / 2000.0;
    Duration::from_millis((base as f64 * jitter) as u64)
}

struct Session<'a> {
    cfg: &'a Config,
    outbox: &'a OutboxTable,
    stats: &'a Stats,
    /// START_REPLICATION succeeded: the next failure starts the backoff afresh.
    streamed: bool,
}

/// What the stream loop is doing with the transaction being received.
struct Stream {
    tracker: AckTracker,
    relations: RelationCache,
    mappings: HashMap<u32, Result<Mapping, MappingError>>,
    commit_lsn: Lsn,
    /// A record the producer's full queue did not take yet; reading stops until it does.
    pending: Option<(Seq, Record)>,
}

impl Session<'_> {
    async fn run(
        &mut self,
        pg: &tokio_postgres::Config,
        shutdown: &mut ShutdownRx,
    ) -> Result<(), RelayError> {
        let cfg = self.cfg;
        let client = setup::sql_connect(pg).await?;
        let slot = setup::prepare(&client, cfg).await?;
        drop(client);
        let (mut producer, mut reports) = Producer::new(&cfg.kafka)?;
        let conn = replication::connect(pg).await?;
        let (mut reader, mut writer) = conn
            .start_logical(&cfg.postgres.slot, Lsn::ZERO, &cfg.postgres.publication)
            .await?;
        self.streamed = true;
        self.stats.active.store(true, Ordering::Relaxed);
        self.stats
            .confirmed_lsn
            .fetch_max(slot.confirmed_flush.0, Ordering::Relaxed);
        tracing::info!(slot = %cfg.postgres.slot, confirmed = %slot.confirmed_flush, "streaming from slot");

        let mut s = Stream {
            tracker: AckTracker::new(slot.confirmed_flush),
            relations: RelationCache::default(),
            mappings: HashMap::new(),
            commit_lsn: Lsn::ZERO,
            pending: None,
        };
        let mut ticker =
            tokio::time::interval(Duration::from_millis(cfg.postgres.status_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let result = loop {
            let step = tokio::select! {
                biased;
                _ = wait_shutdown(shutdown) => break Ok(()),
                Some(report) = reports.recv() => self.on_report(&mut s, report),
                _ = ticker.tick() => self.send_status(&mut writer, &s, false).await,
                _ = tokio::time::sleep(Duration::from_millis(2)), if s.pending.is_some() => {
                    self.retry_pending(&mut s, &producer)
                }
                event = reader.next(), if s.pending.is_none() => match event {
                    Ok(Some(event)) => self.on_event(&mut s, &mut producer, &mut writer, event).await,
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
            producer.purge();
            return result;
        }
        // Shutdown, a fatal row or a failed delivery: wait a bounded time for what
        // is in flight, confirm what was acknowledged and end the stream cleanly.
        let drain = if matches!(result, Err(RelayError::Delivery(_))) {
            Duration::ZERO
        } else {
            Duration::from_millis(cfg.relay.shutdown_timeout_ms)
        };
        self.drain(&mut s, &mut reports, drain).await;
        producer.purge();
        let _ = self.send_status(&mut writer, &s, false).await;
        end_stream(reader, writer).await;
        tracing::info!(confirmed = %s.tracker.confirmed(), unacknowledged = s.tracker.in_flight(), "stopped streaming");
        result
    }

    async fn drain(
        &self,
        s: &mut Stream,
        reports: &mut tokio::sync::mpsc::UnboundedReceiver<DeliveryReport>,
        limit: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        let started = Instant::now();
        while s.tracker.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(report)) => {
                    if let Err(e) = self.on_report(s, report) {
                        tracing::warn!(error = %e, "delivery failed while draining");
                    }
                }
                _ => break,
            }
        }
        tracing::debug!(waited = ?started.elapsed(), left = s.tracker.in_flight(), "drained deliveries");
    }

    fn on_report(&self, s: &mut Stream, report: DeliveryReport) -> Result<(), RelayError> {
        match report.result {
            Ok(()) => {
                s.tracker.ack(report.seq);
                self.stats.events_acked.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.events_failed.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    async fn send_status(
        &self,
        writer: &mut StatusWriter,
        s: &Stream,
        reply: bool,
    ) -> Result<(), RelayError> {
        let lsn = s.tracker.confirmed();
        writer.send_status(lsn, reply).await?;
        let sent = writer.last_sent();
        if self
            .stats
            .confirmed_lsn
            .fetch_max(sent.0, Ordering::Relaxed)
            < sent.0
        {
            tracing::debug!(lsn = %sent, "confirmed");
        }
        Ok(())
    }

    fn retry_pending(&self, s: &mut Stream, producer: &Producer) -> Result<(), RelayError> {
        let Some((seq, record)) = s.pending.take() else {
            return Ok(());
        };
        self.enqueue(s, producer, seq, record)
    }

    fn enqueue(
        &self,
        s: &mut Stream,
        producer: &Producer,
        seq: Seq,
        record: Record,
    ) -> Result<(), RelayError> {
        match producer.send(seq, &record) {
            Ok(()) => {
                self.stats.events_produced.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(SendError::QueueFull) => {
                s.pending = Some((seq, record));
                Ok(())
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
                self.stats
                    .server_wal_end
                    .fetch_max(wal_end.0, Ordering::Relaxed);
                s.tracker.keepalive(wal_end);
                if reply {
                    self.send_status(writer, s, false).await?;
                }
                return Ok(());
            }
            StreamEvent::XLogData {
                start,
                wal_end,
                data,
            } => {
                self.stats
                    .server_wal_end
                    .fetch_max(wal_end.0, Ordering::Relaxed);
                (start, data)
            }
        };
        let msg =
            pgoutput::decode(data).map_err(|source| RelayError::Decode { lsn: start, source })?;
        match msg {
            Message::Begin(b) => {
                s.commit_lsn = b.final_lsn;
                s.tracker.begin();
            }
            Message::Commit(c) => {
                s.tracker.commit(c.end_lsn);
                self.stats
                    .transactions_received
                    .fetch_add(1, Ordering::Relaxed);
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
                    return self.ignore("insert into another table", relation_id, s);
                };
                let rel = s
                    .relations
                    .get(relation_id)
                    .ok_or(RelayError::UnknownRelation(relation_id))?;
                let record = match mapping {
                    Ok(m) => m.record(&new, s.commit_lsn, rel)?,
                    Err(e) => return Err(e.clone().into()),
                };
                self.stats.events_received.fetch_add(1, Ordering::Relaxed);
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

    fn ignore(&self, what: &'static str, relation_id: u32, s: &Stream) -> Result<(), RelayError> {
        self.stats.changes_ignored.fetch_add(1, Ordering::Relaxed);
        let table = s
            .relations
            .get(relation_id)
            .map(|r| r.qualified_name())
            .unwrap_or_default();
        tracing::debug!(change = what, table = %table, "ignored change");
        Ok(())
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
