//! One session: one replication connection from START_REPLICATION to its end.
//!
//! Starts streaming, decodes each event and classifies each transaction (live,
//! replayed, skipped), and confirms what the ack tracker allows, held back by the
//! replay window. Outbox rows and logical messages become records in `events`
//! and go down the record path (`relay::records`: sink, delivery reports, dead
//! letters); the checkpoint, replay requests and published progress are in
//! `positions`. What passes from one session to the next is [`Carried`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::plan::{Plan, TxClass};
use super::{wait_shutdown, Progress, RelayError, RunOptions, ShutdownRx, WindowKeeper};
use crate::ack::{AckTracker, Seq};
use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::{Health, Metrics};
use crate::outbox::{lsn_header, Mapping, MappingError, OutboxTable};
use crate::pgoutput::{self, Message, RelationCache, Timestamp};
use crate::replication::{self, ReplicationError, StatusWriter, StreamEvent, StreamReader};
use crate::setup;
use crate::sink::DeliveryReport;
use crate::sink::Sink;
use crate::state::StateStore;

mod events;
mod positions;

use super::records::Records;
use crate::transport::PgTarget;

/// What passes from one session to the next (owned by the run loop).
#[derive(Default)]
pub(super) struct Carried {
    /// Sequence number of the next session's first record: records of earlier
    /// sessions may still report back, and are told apart by it.
    pub next_seq: Seq,
    /// Highest position below which everything was acknowledged, in this process.
    pub acked: Lsn,
    /// A session of this process has streamed (before that, a missing slot may be created).
    pub ever_streamed: bool,
    /// This process created the publication: until a session streamed, a
    /// missing slot is the one it has yet to create, not a lost one.
    pub created_publication: bool,
    /// `[replay] window`, kept across sessions.
    pub window: Option<WindowKeeper>,
}

pub(super) struct Session<'a> {
    pub cfg: &'a Config,
    pub outbox: &'a OutboxTable,
    pub metrics: &'a Arc<Metrics>,
    pub opts: &'a RunOptions,
    /// Acknowledged positions are confirmed to the slot and checkpointed.
    pub confirms: bool,
    /// No session of this process has streamed yet (a missing slot may be created).
    pub first: bool,
    /// START_REPLICATION succeeded: the next failure starts the backoff afresh.
    pub streamed: bool,
    /// What the previous session handed on; updated for the next one on return.
    pub carried: &'a mut Carried,
    /// The window position last confirmed, and since when it was acknowledged.
    pub window_start: Option<(Lsn, SystemTime)>,
    pub progress: &'a watch::Sender<Progress>,
}

/// Most events handled per wake-up before the loop looks at its other inputs again.
const BATCH: usize = 256;

/// Why a session ended without an error.
pub(crate) enum SessionEnd {
    /// Shutdown, or the replay it was started for is done.
    Stopped,
    /// A replay request waits: stream again from the slot to execute it.
    Restart,
}

/// The transaction being received.
struct Transaction {
    commit_lsn: Lsn,
    /// The `lsn` header of the transaction's records, made once per transaction.
    lsn_text: Bytes,
    commit_time: Timestamp,
    /// What is done with it: relayed, replayed, or skipped.
    class: TxClass,
}

/// What the stream loop keeps while it streams.
struct Stream {
    tracker: AckTracker,
    relations: RelationCache,
    mappings: HashMap<u32, Result<Mapping, MappingError>>,
    tx: Transaction,
    /// Records on their way to the sink and back.
    records: Records,
    plan: Plan,
    /// A record was acknowledged since progress was last published.
    acked_since_publish: bool,
    /// The `replayed` header value of the running job.
    replay_header: Bytes,
    /// The relay's tables (None for a temporary slot or an unconfirming stdout sink).
    store: Option<StateStore>,
    /// The tracker's confirmable position when it was last passed on (status
    /// update, checkpoint progress): past it, [`Session::pass_on`] is due.
    passed_on: Lsn,
}

impl Session<'_> {
    pub async fn run(
        &mut self,
        pg: &PgTarget,
        producer: &mut Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        shutdown: &mut ShutdownRx,
        requests: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, RelayError> {
        let cfg = self.cfg;
        let client = setup::sql_connect(pg).await?;
        let (slot_name, slot, plan, store) = if let Some(temp) = &self.opts.temporary_slot {
            setup::prepare_publication(&client, cfg).await?;
            let plan = Plan {
                live: true,
                ..Plan::default()
            };
            (temp.clone(), None, plan, None)
        } else {
            let (server, slot) = setup::prepare(
                &client,
                cfg,
                self.first,
                &mut self.carried.created_publication,
            )
            .await?;
            let (plan, store) = self.plan(client, &server, &slot).await?;
            if store.is_some() {
                self.progress
                    .send_if_modified(|p| !std::mem::replace(&mut p.ready, true));
            }
            (cfg.postgres.slot.clone(), Some(slot), plan, store)
        };
        let confirmed = slot.as_ref().map_or(Lsn::ZERO, |s| s.confirmed_flush);
        let records = Records::new(&cfg.outbox, self.metrics.clone(), self.carried.next_seq);
        // The sink's connection first (up to its connect timeout): an
        // unreachable destination is a `Connect` error, and `/readyz` says why.
        tokio::select! {
            ready = producer.ready() => ready?,
            _ = wait_shutdown(shutdown) => return Ok(SessionEnd::Stopped),
        }
        if let Some(dlq) = records.dead_letter_topic() {
            producer.ensure_topic(dlq).await?;
        }
        let start = match self.opts.start_lsn {
            Some(start) if self.first => start,
            _ => Lsn::ZERO,
        };
        let mut conn = replication::connect(pg).await?;
        if self.opts.temporary_slot.is_some() {
            conn.create_temporary_slot(&slot_name).await?;
        }
        // The slot's position as the server that streams sees it: with several
        // hosts in postgres.url the SQL connection may have reached another one
        // (a failover in between), and the tracker must start where this one is.
        let confirmed = match &slot {
            Some(_) => conn.confirmed_flush(&slot_name).await?.ok_or_else(|| {
                ReplicationError::NoSlotHere {
                    slot: slot_name.clone(),
                }
            })?,
            None => confirmed,
        };
        if let Some(failover) = slot.as_ref().and_then(|s| s.set_failover) {
            conn.set_failover(&slot_name, failover).await?;
            tracing::info!(slot = %slot_name, failover, "changed the slot's failover property (postgres.failover_slot)");
        }
        let (mut reader, mut writer) = conn
            .start_logical(&slot_name, start, &cfg.postgres.publication)
            .await?;
        self.streamed = true;
        // Whatever the window says, never confirm less than the slot already has:
        // PostgreSQL would store the lower position.
        writer.raise_floor(confirmed);
        // Holding the slot, this instance may take a replay request.
        let mut plan = plan;
        if let Some(store) = &store {
            if !self.claim(&mut plan, store, confirmed).await? {
                end_stream(reader, writer).await;
                return Ok(SessionEnd::Stopped);
            }
        }
        self.metrics.set_health(Health::Streaming);
        self.metrics.set_confirmed(confirmed);
        if let Some(p) = &plan.job {
            tracing::info!(request = p.job.id, from = %p.job.from, to = %p.job.to, only_topic = ?p.job.only_topic, topic_suffix = ?p.job.topic_suffix, "replaying");
        }
        if start > Lsn::ZERO {
            self.report_start(pg, start).await;
        }
        tracing::info!(slot = %slot_name, confirmed = %confirmed, skip_through = %plan.skip_through, "streaming from slot");

        let replay_header = Bytes::from(
            plan.job
                .as_ref()
                .map_or(String::new(), |p| p.job.id.to_string()),
        );
        let mut s = Stream {
            tracker: AckTracker::starting_at(confirmed, self.carried.next_seq),
            relations: RelationCache::default(),
            mappings: HashMap::new(),
            tx: Transaction {
                commit_lsn: Lsn::ZERO,
                lsn_text: Bytes::new(),
                commit_time: Timestamp(0),
                class: TxClass::Live,
            },
            records,
            plan,
            acked_since_publish: false,
            replay_header,
            store,
            passed_on: confirmed,
        };
        let mut ticker =
            tokio::time::interval(Duration::from_millis(cfg.postgres.status_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Passes an advanced acknowledged position on at most once per
        // `postgres.confirm_interval_ms`: right away after a quiet spell, then
        // at that rate while acknowledgements keep coming.
        let confirm_interval = Duration::from_millis(cfg.postgres.confirm_interval_ms);
        let confirm_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(confirm_timer);
        // Only requests filed after this session took its own count.
        let takes_requests = self.confirms;
        requests.borrow_and_update();
        // Built once: re-creating these futures on every iteration showed up in profiles.
        let shutdown_requested = wait_shutdown(shutdown);
        tokio::pin!(shutdown_requested);

        let result = loop {
            let step = tokio::select! {
                biased;
                _ = &mut shutdown_requested => break Ok(SessionEnd::Stopped),
                // The timer comes before the reports so a steady stream of
                // acknowledgements can never starve the status updates.
                _ = ticker.tick() => {
                    // A sink whose connection died ends the session (and
                    // `/readyz` says why) also while nothing is being sent.
                    if let Err(e) = producer.check() {
                        break Err(RelayError::Send(e));
                    }
                    self.metrics.records_in_flight.set(s.tracker.in_flight() as i64);
                    self.metrics.producer_queue_depth.set(i64::from(producer.queued()));
                    let requests = takes_requests.then_some(&mut *requests);
                    match self.on_tick(&mut s, &mut writer, requests).await {
                        Ok(Some(end)) => break Ok(end),
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                // Before the reports too, for the same reason.
                _ = &mut confirm_timer, if s.tracker.confirmed() > s.passed_on => {
                    confirm_timer.as_mut().reset(tokio::time::Instant::now() + confirm_interval);
                    self.pass_on(&mut s, &mut writer, false).await
                }
                // Acknowledgements before new input: memory stays bounded.
                Some(report) = reports.recv() => self.on_reports(&mut s, producer, reports, report),
                _ = async { tokio::time::sleep(Duration::from_millis(2)).await }, if s.records.has_pending() => {
                    s.records.retry_pending(producer)
                }
                event = reader.next(), if !s.records.has_pending() => match event {
                    Ok(Some(event)) => self.on_events(&mut s, producer, &mut writer, &mut reader, event).await,
                    Ok(None) => Err(ReplicationError::Closed { context: "streaming" }.into()),
                    Err(e) => Err(e.into()),
                },
            };
            if let Err(e) = step {
                break Err(e);
            }
            // An atomic store per wake-up: a scrape sees the in-flight count of
            // the moment, not of the last tick (what a crash would re-send).
            self.metrics
                .records_in_flight
                .set(s.tracker.in_flight() as i64);
        };

        // Broken connection: nothing more can be confirmed on it.
        if let Err(RelayError::Replication(_)) = &result {
            self.carried.next_seq = s.tracker.next_seq();
            self.publish(&mut s);
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
        self.carried.next_seq = s.tracker.next_seq();
        let _ = self.send_status(&mut writer, &s, true).await;
        self.publish(&mut s);
        self.abandon_job(&s, &result).await;
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
        producer: &Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        limit: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        let started = Instant::now();
        while s.tracker.in_flight() > s.records.unacknowledgeable() {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(report)) => match s.records.on_report(producer, report) {
                    Ok(Some(seq)) => self.acked(s, seq),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "delivery failed while draining"),
                },
                _ => break,
            }
        }
        tracing::debug!(waited = ?started.elapsed(), left = s.tracker.in_flight(), "drained deliveries");
    }

    /// `first` and the events already buffered behind it, up to [`BATCH`]
    /// (fewer wake-ups per event), stopping when the producer's queue is full.
    async fn on_events(
        &mut self,
        s: &mut Stream,
        producer: &mut Sink,
        writer: &mut StatusWriter,
        reader: &mut StreamReader,
        first: StreamEvent,
    ) -> Result<(), RelayError> {
        self.on_event(s, producer, writer, first).await?;
        for _ in 1..BATCH {
            if s.records.has_pending() {
                break;
            }
            match reader.next_buffered() {
                None => break,
                Some(Ok(Some(event))) => self.on_event(s, producer, writer, event).await?,
                Some(Ok(None)) => {
                    return Err(ReplicationError::Closed {
                        context: "streaming",
                    }
                    .into())
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn on_event(
        &mut self,
        s: &mut Stream,
        producer: &mut Sink,
        writer: &mut StatusWriter,
        event: StreamEvent,
    ) -> Result<(), RelayError> {
        let (start, data) = match event {
            StreamEvent::Keepalive { wal_end, reply } => {
                self.metrics.set_server_wal_end(wal_end);
                s.tracker.keepalive(wal_end);
                if reply {
                    self.send_status(writer, s, true).await?;
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
                s.tx = Transaction {
                    commit_lsn: b.final_lsn,
                    lsn_text: lsn_header(b.final_lsn),
                    commit_time: b.commit_time,
                    class: s.plan.classify(b.final_lsn),
                };
                if let (TxClass::Replay, Some(p)) = (s.tx.class, s.plan.job.as_mut()) {
                    p.begin();
                }
                s.tracker.begin();
            }
            Message::Commit(c) => {
                let confirmed = s.tracker.commit(c.end_lsn);
                self.metrics.transactions_received.inc();
                self.metrics.transactions_confirmed.inc_by(confirmed as u64);
                match (s.tx.class, s.plan.job.as_mut()) {
                    (TxClass::Skip, _) => self.metrics.transactions_skipped.inc(),
                    (TxClass::Replay, Some(p)) => p.commit(),
                    _ => {}
                }
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
                return self.on_insert(s, producer, relation_id, new).await
            }
            Message::Message(m) => return self.on_logical_message(s, producer, m).await,
            Message::Update { relation_id, .. } => return self.ignore("update", relation_id, s),
            Message::Delete { relation_id, .. } => return self.ignore("delete", relation_id, s),
            Message::Truncate { .. } => return self.ignore("truncate", 0, s),
            Message::Origin { .. } | Message::Type { .. } => {}
        }
        Ok(())
    }

    /// `first` and the reports already waiting behind it, into the tracker.
    fn on_reports(
        &self,
        s: &mut Stream,
        producer: &Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        first: DeliveryReport,
    ) -> Result<(), RelayError> {
        let Stream {
            records,
            tracker,
            acked_since_publish,
            ..
        } = s;
        let metrics = self.metrics;
        records.on_reports(producer, reports, first, |seq| {
            let confirmed = tracker.ack(seq);
            metrics.transactions_confirmed.inc_by(confirmed as u64);
            *acked_since_publish = true;
        })
    }

    /// A record the sink acknowledged.
    fn acked(&self, s: &mut Stream, seq: Seq) {
        let confirmed = s.tracker.ack(seq);
        self.metrics.transactions_confirmed.inc_by(confirmed as u64);
        s.acked_since_publish = true;
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
