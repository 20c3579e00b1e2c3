//! One polling session: connect, check the table, take the leader lock, then
//! until shutdown or an error: poll the first unsent rows in order (skipping
//! those already sent and not yet removed), map and send them through the
//! shared record path, turn delivery reports into removable rows, and delete
//! (or mark) the acknowledged prefix in one statement at most every
//! `poll.after_send_interval_ms`. Waits between polls back off while the
//! table is empty; a NOTIFY from the table's trigger ends a wait early.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use super::query::{self, PollQuery, PolledRow};
use super::{PollSource, RowTracker};
use crate::lsn::Lsn;
use crate::metrics::{Health, Metrics};
use crate::outbox::{DeadLetter, Mapping, MappingError, OutboxTable};
use crate::pgoutput::{Relation, Timestamp};
use crate::relay::records::Records;
use crate::relay::{wait_shutdown, RelayError, SessionEnd, ShutdownRx};
use crate::setup::poll::PollError;
use crate::setup::poll::{self as table, Check, TableInfo};
use crate::setup::server::Server;
use crate::setup::{self, SetupError};
use crate::sink::{DeliveryReport, Sink};

/// Rows mapped and handed to the sink per wake-up before the loop looks at
/// its other inputs (delivery reports first) again.
const SEND_BATCH: usize = 256;
/// How often the backlog gauges are read.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

pub(super) async fn run(
    src: &mut PollSource,
    metrics: &Arc<Metrics>,
    sink: &mut Sink,
    reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
    shutdown: &mut ShutdownRx,
) -> Result<SessionEnd, RelayError> {
    let cfg = &src.cfg;
    let (client, mut notes) = query::connect(&src.pg).await?;
    let server = Server::read(&client).await?;
    server.check_supported()?;
    if server.in_recovery {
        return Err(PollError::NotPrimary.into());
    }
    let role = setup::read_role(&client).await?;
    let Some(info) = TableInfo::read(&client, cfg).await? else {
        return Err(SetupError::NoTable {
            table: src.table.clone(),
        }
        .into());
    };
    for (what, check) in table::checks(Some(&info), cfg, &role.name_sql) {
        match check {
            Check::Ok(_) => {}
            Check::Warn(w) => tracing::warn!(check = %what, "{w}"),
            Check::Create(sql) => {
                return Err(PollError::Missing {
                    table: src.table.clone(),
                    what,
                    sql: sql.join("; "),
                }
                .into())
            }
            Check::Problem(e) => return Err(e.into()),
        }
    }
    let rel = info.relation(&src.table);
    let mapping = src.outbox.mapping(&rel).map_err(SetupError::Columns)?;
    if let Some(pid) = query::try_lock(&client, info.oid).await? {
        return Err(PollError::LockHeld {
            table: src.table.clone(),
            pid,
        }
        .into());
    }
    query::plan_for_a_queue(&client).await?;
    if src.poll.notify {
        query::listen(&client, &src.table).await?;
    }
    let commit_time = query::track_commit_timestamp(&client).await?;
    let names: Vec<String> = info.columns.iter().map(|c| c.name.clone()).collect();
    let poll = PollQuery::new(cfg, &names, commit_time).expect("the order column was checked");
    let removal = query::prepare_removal(&client, cfg).await?;
    let records = Records::new(&cfg.outbox, metrics.clone(), src.next_seq);
    // The sink's connection first, as a WAL session does.
    tokio::select! {
        ready = sink.ready() => ready?,
        _ = wait_shutdown(shutdown) => return Ok(SessionEnd::Stopped),
    }
    if let Some(dlq) = records.dead_letter_topic() {
        sink.ensure_topic(dlq).await?;
    }
    src.led = true;
    metrics.set_health(Health::Streaming);
    tracing::info!(table = %src.table, after_send = ?src.poll.after_send, notify = src.poll.notify, commit_time, "polling the outbox table as the leader");

    let now = Instant::now();
    let first_seq = src.next_seq;
    let idle = Duration::from_millis(src.poll.interval_ms);
    let mut p = Poller {
        src,
        metrics,
        client: &client,
        poll,
        removal,
        age_expr: query::age_expr(commit_time, &info.columns),
        rel,
        mapping,
        tracker: RowTracker::starting_at(first_seq),
        records,
        fetched: VecDeque::new(),
        next_poll: now,
        was_empty: false,
        idle,
    };
    let result = p.run(sink, reports, shutdown, &mut notes).await;

    // A lost connection removes nothing more: the rows are sent again by
    // whichever instance polls next. Otherwise wait a bounded time for what
    // is in flight and remove what was acknowledged.
    if !client.is_closed() {
        let drain = match &result {
            Err(RelayError::Delivery(_)) => Duration::ZERO,
            _ => Duration::from_millis(p.src.cfg.relay.shutdown_timeout_ms),
        };
        p.drain(sink, reports, drain).await;
        if let Err(e) = p.remove().await {
            tracing::warn!(error = %e, "could not remove the last acknowledged rows; they are sent again");
        }
    }
    p.src.next_seq = p.tracker.next_seq();
    metrics.records_in_flight.set(p.tracker.in_flight() as i64);
    tracing::info!(in_flight = p.tracker.in_flight(), "stopped polling");
    result
}

/// What the loop keeps while it polls.
struct Poller<'a> {
    src: &'a mut PollSource,
    metrics: &'a Arc<Metrics>,
    client: &'a Client,
    poll: PollQuery,
    removal: Statement,
    age_expr: Option<String>,
    rel: Relation,
    mapping: Mapping,
    tracker: RowTracker,
    records: Records,
    /// Rows read by the last poll and not handed to the sink yet, in order.
    fetched: VecDeque<PolledRow>,
    next_poll: Instant,
    /// The last poll found no row to send.
    was_empty: bool,
    /// The next wait after an empty poll.
    idle: Duration,
}

impl Poller<'_> {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.src.poll.interval_ms)
    }

    async fn run(
        &mut self,
        sink: &mut Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        shutdown: &mut ShutdownRx,
        notes: &mut mpsc::UnboundedReceiver<()>,
    ) -> Result<SessionEnd, RelayError> {
        let batch = self.src.poll.batch_size as usize;
        let remove_every = Duration::from_millis(self.src.poll.after_send_interval_ms);
        let shutdown_requested = wait_shutdown(shutdown);
        tokio::pin!(shutdown_requested);
        let poll_timer = tokio::time::sleep_until(self.next_poll);
        tokio::pin!(poll_timer);
        let remove_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(remove_timer);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backlog_due = Instant::now();
        let mut notes_open = self.src.poll.notify;
        loop {
            let can_poll = self.fetched.is_empty()
                && !self.records.has_pending()
                && self.tracker.outstanding() <= batch;
            let step = tokio::select! {
                biased;
                _ = &mut shutdown_requested => return Ok(SessionEnd::Stopped),
                _ = ticker.tick() => {
                    self.metrics.records_in_flight.set(self.tracker.in_flight() as i64);
                    self.metrics.producer_queue_depth.set(i64::from(sink.queued()));
                    // A dead sink connection ends the session also while idle.
                    if let Err(e) = sink.check() {
                        Err(RelayError::Send(e))
                    } else if Instant::now() >= backlog_due {
                        backlog_due = Instant::now() + BACKLOG_INTERVAL;
                        self.backlog().await
                    } else {
                        Ok(())
                    }
                }
                // Before the reports, so a steady stream of them cannot starve it.
                _ = &mut remove_timer, if self.tracker.has_removable() => {
                    remove_timer.as_mut().reset(Instant::now() + remove_every);
                    self.remove().await.map_err(RelayError::from)
                }
                // Acknowledgements before new input: memory stays bounded.
                Some(report) = reports.recv() => {
                    let tracker = &mut self.tracker;
                    self.records.on_reports(sink, reports, report, |seq| {
                        tracker.ack(seq);
                    })
                }
                _ = tokio::time::sleep(Duration::from_millis(2)), if self.records.has_pending() => {
                    self.records.retry_pending(sink)
                }
                _ = std::future::ready(()), if !self.fetched.is_empty() && !self.records.has_pending() => {
                    self.send_fetched(sink).await
                }
                note = notes.recv(), if notes_open => {
                    match note {
                        Some(()) => {
                            while notes.try_recv().is_ok() {}
                            // Idle: poll now. Busy, the next poll is due within
                            // interval_ms anyway, which bounds the poll rate.
                            if self.was_empty {
                                self.next_poll = Instant::now();
                                poll_timer.as_mut().reset(self.next_poll);
                            }
                        }
                        None => notes_open = false,
                    }
                    Ok(())
                }
                _ = &mut poll_timer, if can_poll => {
                    let r = self.poll(batch).await;
                    poll_timer.as_mut().reset(self.next_poll);
                    r
                }
            };
            step?;
            self.metrics
                .records_in_flight
                .set(self.tracker.in_flight() as i64);
        }
    }

    /// Reads the first unsent rows not already sent, up to a batch, and
    /// decides when to poll next.
    async fn poll(&mut self, batch: usize) -> Result<(), RelayError> {
        let limit = batch + self.tracker.outstanding();
        let now = Instant::now();
        let rows = self.poll.run(self.client, limit).await?;
        let took = now.elapsed();
        let m = &self.metrics.poll;
        m.rows_read.inc_by(rows.len() as u64);
        // Cut by the limit: more rows may wait right behind.
        let mut more = rows.len() == limit;
        for row in rows {
            if self.tracker.is_outstanding(row.order) {
                continue;
            }
            if self.fetched.len() == batch {
                more = true;
                break;
            }
            self.fetched.push_back(row);
        }
        let found = !self.fetched.is_empty();
        self.was_empty = !found;
        tracing::debug!(took = ?took, new = self.fetched.len(), in_flight = self.tracker.in_flight(), outstanding = self.tracker.outstanding(), more, "polled");
        m.queries
            .with_label_values(&[if found { "rows" } else { "empty" }])
            .inc();
        self.next_poll = if more {
            now
        } else if found {
            self.idle = self.interval();
            now + self.interval()
        } else if self.src.poll.notify {
            now + Duration::from_millis(self.src.poll.max_interval_ms)
        } else {
            let wait = self.idle;
            self.idle = (self.idle * 2).min(Duration::from_millis(self.src.poll.max_interval_ms));
            now + wait
        };
        Ok(())
    }

    /// Maps and hands the fetched rows to the sink, in order, until the
    /// sink's queue is full or [`SEND_BATCH`] rows went.
    async fn send_fetched(&mut self, sink: &mut Sink) -> Result<(), RelayError> {
        let read_at = Timestamp(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64),
        );
        for _ in 0..SEND_BATCH {
            if self.records.has_pending() {
                break;
            }
            let Some(row) = self.fetched.pop_front() else {
                break;
            };
            let commit_time = row.committed_us.map_or(read_at, Timestamp);
            let mapped = self
                .mapping
                .record_at(&row.tuple, Lsn::ZERO, &Bytes::new(), &self.rel);
            match mapped {
                Ok(record) => {
                    self.records.received(&record.topic);
                    sink.ensure_topic(&record.topic).await?;
                    let seq = self.tracker.send(row.order);
                    self.records.send(sink, seq, commit_time, record)?;
                }
                Err(e) => {
                    let Some(dlq) = self.records.dead_letter_topic().map(str::to_string) else {
                        self.fetched.clear();
                        return Err(PollError::BadRow {
                            column: self.src.poll.order_column.clone(),
                            value: row.order,
                            source: e,
                        }
                        .into());
                    };
                    let mut record = dead_letter(&self.src.outbox, &row, &self.rel, &dlq, &e);
                    record.headers.retain(|(k, _)| k != "lsn");
                    self.records.received(&record.topic);
                    let seq = self.tracker.send(row.order);
                    self.records
                        .send_dead_letter(sink, seq, commit_time, record)?;
                }
            }
        }
        Ok(())
    }

    /// Deletes (or marks) the acknowledged prefix in one statement.
    async fn remove(&mut self) -> Result<(), SetupError> {
        let values = self.tracker.take_removable();
        if values.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.client
            .execute(&self.removal, &[&values])
            .await
            .map_err(setup::q("removing sent rows"))?;
        tracing::debug!(took = ?started.elapsed(), rows = values.len(), "removed sent rows");
        self.tracker.removed(&values);
        self.metrics.poll.rows_removed.inc_by(values.len() as u64);
        Ok(())
    }

    /// Waits up to `limit` for the records in flight.
    async fn drain(
        &mut self,
        sink: &Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        limit: Duration,
    ) {
        let deadline = Instant::now() + limit;
        while self.tracker.in_flight() > self.records.unacknowledgeable() {
            match tokio::time::timeout_at(deadline, reports.recv()).await {
                Ok(Some(report)) => match self.records.on_report(sink, report) {
                    Ok(Some(seq)) => {
                        self.tracker.ack(seq);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "delivery failed while draining"),
                },
                _ => break,
            }
        }
    }

    /// The backlog gauges.
    async fn backlog(&mut self) -> Result<(), RelayError> {
        let (rows, age) =
            query::backlog(self.client, &self.src.cfg, self.age_expr.as_deref()).await?;
        self.metrics.poll.backlog_rows.set(rows);
        self.metrics
            .poll
            .oldest_unsent_age
            .set(age.unwrap_or(0.0).max(0.0));
        Ok(())
    }
}

/// The dead-letter record of a row that could not be mapped.
fn dead_letter(
    outbox: &OutboxTable,
    row: &PolledRow,
    rel: &Relation,
    topic: &str,
    e: &MappingError,
) -> crate::outbox::Record {
    outbox.dead_letter(
        &row.tuple,
        rel,
        Lsn::ZERO,
        topic,
        DeadLetter {
            reason: e.kind(),
            error: e.to_string(),
            original_topic: None,
        },
    )
}
