//! One session: one replication connection from START_REPLICATION to its end.
//!
//! Starts streaming, decodes each event and classifies each transaction (live,
//! replayed, skipped), and confirms what the ack tracker allows, held back by the
//! replay window. Outbox rows and logical messages become records in `events`;
//! the record path (sink, delivery reports, dead letters) is in `produce`; the
//! checkpoint, replay requests and published progress in `positions`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::plan::{Plan, TxClass};
use super::{wait_shutdown, Progress, RelayError, RunOptions, ShutdownRx, WindowKeeper};
use crate::ack::{AckTracker, Seq};
use crate::config::{Config, OnInvalid};
use crate::lsn::Lsn;
use crate::metrics::{Health, Metrics};
use crate::outbox::{lsn_header, Mapping, MappingError, OutboxTable, Record};
use crate::pgoutput::{self, Message, RelationCache, Timestamp};
use crate::replication::{self, ReplicationError, StatusWriter, StreamEvent, StreamReader};
use crate::setup;
use crate::sink::DeliveryReport;
use crate::sink::Sink;
use crate::state::{Outcome, StateStore};

mod events;
mod positions;
mod produce;

use crate::transport::PgTarget;
use produce::TopicCounters;

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
    /// Sequence number of this session's first record; on return, the next
    /// session's (records of earlier sessions may still report back).
    pub first_seq: Seq,
    /// Highest position below which everything was acknowledged, in this process.
    pub acked: Lsn,
    /// `[replay] window`, kept across sessions.
    pub window: &'a mut Option<WindowKeeper>,
    /// The window position last confirmed, and since when it was acknowledged.
    pub window_start: Option<(Lsn, SystemTime)>,
    pub progress: &'a watch::Sender<Progress>,
}

/// Most events (or delivery reports) handled per wake-up before the loop looks
/// at its other inputs again.
const BATCH: usize = 256;

/// Why a session ended without an error.
pub(super) enum SessionEnd {
    /// Shutdown, or the replay it was started for is done.
    Stopped,
    /// A replay request waits: stream again from the slot to execute it.
    Restart,
}

/// What the stream loop is doing with the transaction being received.
struct Stream {
    tracker: AckTracker,
    relations: RelationCache,
    mappings: HashMap<u32, Result<Mapping, MappingError>>,
    commit_lsn: Lsn,
    /// The `lsn` header of the transaction's records, made once per transaction.
    lsn_text: Bytes,
    commit_time: Timestamp,
    /// Per-topic counters, looked up once per topic instead of once per record.
    topic_counters: HashMap<String, TopicCounters>,
    /// Records the producer's full queue did not take yet, in order; reading
    /// stops until they are all enqueued.
    pending: VecDeque<(Seq, Record)>,
    plan: Plan,
    /// What is done with the transaction being received.
    class: TxClass,
    /// A record was acknowledged since progress was last published.
    acked_since_publish: bool,
    /// The `replayed` header value of the running job.
    replay_header: Bytes,
    /// The relay's tables (None for a temporary slot or an unconfirming stdout sink).
    store: Option<StateStore>,
    /// Records refused for good: never acknowledged, so draining does not wait for them.
    refused: usize,
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
            let (server, slot) = setup::prepare(&client, cfg, self.first).await?;
            let (plan, store) = self.plan(client, &server, &slot).await?;
            if store.is_some() {
                self.progress
                    .send_if_modified(|p| !std::mem::replace(&mut p.ready, true));
            }
            (cfg.postgres.slot.clone(), Some(slot), plan, store)
        };
        let confirmed = slot.as_ref().map_or(Lsn::ZERO, |s| s.confirmed_flush);
        if cfg.outbox.on_invalid == OnInvalid::DeadLetter {
            producer.ensure_topic(&cfg.outbox.dead_letter_topic).await?;
        }
        // The sink's connection first (RabbitMQ: up to its connect timeout).
        tokio::select! {
            ready = producer.ready() => ready?,
            _ = wait_shutdown(shutdown) => return Ok(SessionEnd::Stopped),
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
            tracker: AckTracker::starting_at(confirmed, self.first_seq),
            relations: RelationCache::default(),
            mappings: HashMap::new(),
            commit_lsn: Lsn::ZERO,
            lsn_text: Bytes::new(),
            commit_time: Timestamp(0),
            topic_counters: HashMap::new(),
            pending: VecDeque::new(),
            plan,
            class: TxClass::Live,
            acked_since_publish: false,
            replay_header,
            store,
            refused: 0,
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
                    self.metrics.records_in_flight.set(s.tracker.in_flight() as i64);
                    self.metrics.producer_queue_depth.set(i64::from(producer.queued()));
                    let requests = takes_requests.then_some(&mut *requests);
                    match producer.check() {
                        Err(e) => Err(RelayError::Send(e)),
                        Ok(()) => match self.on_tick(&mut s, &mut writer, requests).await {
                            Ok(Some(end)) => break Ok(end),
                            Ok(None) => Ok(()),
                            Err(e) => Err(e),
                        },
                    }
                }
                // Before the reports too, for the same reason.
                _ = &mut confirm_timer, if s.tracker.confirmed() > s.passed_on => {
                    confirm_timer.as_mut().reset(tokio::time::Instant::now() + confirm_interval);
                    self.pass_on(&mut s, &mut writer, false).await
                }
                // Acknowledgements before new input: memory stays bounded.
                Some(report) = reports.recv() => self.on_reports(&mut s, producer, reports, report),
                _ = async { tokio::time::sleep(Duration::from_millis(2)).await }, if !s.pending.is_empty() => {
                    self.retry_pending(&mut s, producer)
                }
                event = reader.next(), if s.pending.is_empty() => match event {
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
            self.first_seq = s.tracker.next_seq();
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
        self.first_seq = s.tracker.next_seq();
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

    /// Status update, window, checkpoint progress and the running replay.
    async fn on_tick(
        &mut self,
        s: &mut Stream,
        writer: &mut StatusWriter,
        requests: Option<&mut watch::Receiver<bool>>,
    ) -> Result<Option<SessionEnd>, RelayError> {
        if let Some(w) = self.window.as_mut() {
            w.observe(SystemTime::now(), s.tracker.confirmed());
        }
        self.pass_on(s, writer, true).await?;
        if s.plan.job_done(s.tracker.confirmed()) {
            let p = s.plan.job.take().expect("job_done checked it");
            tracing::info!(
                request = p.job.id,
                transactions = p.transactions,
                events = p.events,
                "replay done"
            );
            let outcome = Outcome::Done {
                transactions: p.transactions,
                events: p.events,
            };
            if let Some(store) = &s.store {
                store.finish(p.job.id, &outcome).await?;
            }
            if self.opts.replay_request.is_some() {
                return Ok(Some(SessionEnd::Stopped));
            }
        }
        if let (Some(requests), None) = (requests, &s.plan.job) {
            if requests.has_changed().unwrap_or(false) && *requests.borrow_and_update() {
                tracing::info!("a replay request is waiting; finishing deliveries and streaming again from the slot");
                return Ok(Some(SessionEnd::Restart));
            }
        }
        Ok(None)
    }

    /// Passes the acknowledged position on: confirms it to the slot (unless
    /// the replay window holds the slot back) and hands it to the checkpoint
    /// writer. Called on every tick (`always`: the status update goes out as
    /// the keepalive) and, between ticks, whenever the position advanced, so
    /// that a crash re-sends only what was in flight and what was
    /// acknowledged in the last `postgres.confirm_interval_ms`.
    async fn pass_on(
        &mut self,
        s: &mut Stream,
        writer: &mut StatusWriter,
        always: bool,
    ) -> Result<(), RelayError> {
        s.passed_on = s.tracker.confirmed();
        self.metrics.acked_lsn.set(s.passed_on.0 as f64);
        self.send_status(writer, s, always).await?;
        self.publish(s);
        Ok(())
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
        while s.tracker.in_flight() > s.refused + s.pending.len() {
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
            if !s.pending.is_empty() {
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

    /// Sends the position the slot may move to; with `always` false only
    /// when it is past the last one sent (the timer's update doubles as the
    /// keepalive, so it goes out regardless).
    async fn send_status(
        &mut self,
        writer: &mut StatusWriter,
        s: &Stream,
        always: bool,
    ) -> Result<(), RelayError> {
        let acked = s.tracker.confirmed();
        let target = if !self.confirms {
            Lsn::ZERO // PostgreSQL ignores a zero position: the slot stays
        } else if let Some(w) = self.window.as_mut() {
            let now = SystemTime::now();
            if let Some((lsn, since)) = w.target(now) {
                let lsn = lsn.min(acked);
                self.window_start = Some((lsn, since));
            }
            let start = self
                .window_start
                .map_or(writer.last_sent(), |(l, _)| l.max(writer.last_sent()));
            let age = self
                .window_start
                .and_then(|(_, t)| now.duration_since(t).ok())
                .unwrap_or_default();
            self.metrics.set_replay_window(start, acked, age);
            self.window_start.map_or(Lsn::ZERO, |(l, _)| l)
        } else {
            acked
        };
        let before = writer.last_sent();
        if !always && target <= before {
            return Ok(());
        }
        writer.send_status(target, false).await?;
        let sent = writer.last_sent();
        if sent > before {
            self.metrics.set_confirmed(sent);
            tracing::debug!(lsn = %sent, "confirmed");
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
                s.commit_lsn = b.final_lsn;
                s.lsn_text = lsn_header(b.final_lsn);
                s.commit_time = b.commit_time;
                s.class = s.plan.classify(b.final_lsn);
                if let (TxClass::Replay, Some(p)) = (s.class, s.plan.job.as_mut()) {
                    p.begin();
                }
                s.tracker.begin();
            }
            Message::Commit(c) => {
                let confirmed = s.tracker.commit(c.end_lsn);
                self.metrics.transactions_received.inc();
                self.metrics.transactions_confirmed.inc_by(confirmed as u64);
                match (s.class, s.plan.job.as_mut()) {
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
