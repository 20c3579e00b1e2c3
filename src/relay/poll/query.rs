//! The SQL of polling, all on the one connection that holds the leader lock:
//! connecting with NOTIFY delivery, the session-level advisory lock, reading a
//! batch of unsent rows as text (exactly the text pgoutput would send), and
//! removing or marking the acknowledged rows.
//!
//! The lock lives as long as this connection's backend: every poll and every
//! removal runs on it, so a poll that answered proves the lock was still held;
//! a lost connection ends the session before anything else is sent.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage, Statement};

use crate::config::{quote_ident, AfterSend, Config, PollConfig, TableName};
use crate::pgoutput::{Tuple, Value};
use crate::setup::{q, SetupError};
use crate::transport::{self, HostOutcome, PgTarget, ServerState};

/// First key of the two-key advisory lock (`pg_locks.classid`); the second is
/// the table's OID, so each outbox table has its own leader.
pub const LOCK_CLASS: i32 = 0x6f62_7872; // "obxr"

/// An SQL connection whose notifications arrive on the returned channel.
pub async fn connect(
    target: &PgTarget,
) -> Result<(Client, mpsc::UnboundedReceiver<()>), SetupError> {
    transport::connect_any(target, |stream| async move {
        match target.config.connect_raw(stream, NoTls).await {
            Ok((client, mut conn)) => {
                let state = ServerState::from_parameters(
                    conn.parameter("in_hot_standby"),
                    conn.parameter("default_transaction_read_only"),
                );
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => {
                                let _ = tx.send(());
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::debug!(error = %e, "polling connection closed");
                                break;
                            }
                            None => break,
                        }
                    }
                });
                HostOutcome::Connected((client, rx), state)
            }
            Err(e) => {
                let e = SetupError::Connect(e);
                if e.is_permanent() {
                    HostOutcome::Fail(e)
                } else {
                    HostOutcome::Next(e)
                }
            }
        }
    })
    .await
}

/// Takes the leader lock of the table with OID `oid`: `Ok(None)` when taken,
/// else `Ok(Some(pid))` of the backend holding it (if still there).
pub async fn try_lock(client: &Client, oid: u32) -> Result<Option<Option<i32>>, SetupError> {
    // The OID's bits as int4: pg_locks.objid then shows the OID itself.
    let key = oid as i32;
    let taken: bool = client
        .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_CLASS, &key])
        .await
        .map_err(q("taking the polling leader lock"))?
        .get(0);
    if taken {
        return Ok(None);
    }
    Ok(Some(holder(client, oid).await?))
}

/// The backend holding the leader lock of the table with OID `oid`, if any.
pub async fn holder(client: &Client, oid: u32) -> Result<Option<i32>, SetupError> {
    Ok(client
        .query_opt(
            "SELECT pid FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 2
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND classid = ($1::int8)::oid AND objid = $2",
            &[&i64::from(LOCK_CLASS), &oid],
        )
        .await
        .map_err(q("reading who holds the polling leader lock"))?
        .map(|r| r.get(0)))
}

/// Plans the poll and the removal with the index, whatever the statistics
/// say: an outbox polled with deletes is nearly empty most of the time, so
/// its statistics (after a vacuum, or on a new table) promise a tiny table and
/// the planner picks a sequential scan and a sort, which reads every dead row
/// version still in the heap on every poll (measured at a 10 ms interval and
/// 5,000 rows/s on a new table: p99 127-232 ms without this, 46-71 ms with
/// it). Only this connection's queries are affected.
pub async fn plan_for_a_queue(client: &Client) -> Result<(), SetupError> {
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .map_err(q("setting enable_seqscan = off for the polling connection"))
}

/// `LISTEN` on the table's channel.
pub async fn listen(client: &Client, table: &TableName) -> Result<(), SetupError> {
    client
        .batch_execute(&format!(
            "LISTEN {}",
            quote_ident(&PollConfig::channel(table))
        ))
        .await
        .map_err(q("listening for the outbox table's notifications"))
}

/// `WHERE` of the unsent rows (empty with `after_send = "delete"`).
pub fn unsent_filter(p: &PollConfig) -> String {
    match p.after_send {
        AfterSend::Delete => String::new(),
        AfterSend::Mark => format!(" WHERE {} IS NULL", quote_ident(&p.sent_column)),
    }
}

/// One row read by a poll.
#[derive(Debug)]
pub struct PolledRow {
    /// The order column's value.
    pub order: i64,
    pub tuple: Tuple,
    /// Commit time in microseconds since the Unix epoch (with
    /// `track_commit_timestamp`), else `None`.
    pub committed_us: Option<i64>,
}

/// The poll: the first `limit` unsent rows in order, every column as text.
pub struct PollQuery {
    head: String,
    columns: usize,
    order_index: usize,
    commit_time: bool,
}

impl PollQuery {
    /// For the table's `columns` (all of them, in order); `commit_time` reads
    /// each row's commit timestamp (needs `track_commit_timestamp = on`).
    pub fn new(cfg: &Config, columns: &[String], commit_time: bool) -> Option<PollQuery> {
        let p = &cfg.poll;
        let order_index = columns.iter().position(|c| *c == p.order_column)?;
        let mut list: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        if commit_time {
            list.push(
                "(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8".into(),
            );
        }
        Some(PollQuery {
            head: format!(
                "SELECT {} FROM {}{} ORDER BY {} LIMIT ",
                list.join(", "),
                cfg.table().quoted(),
                unsent_filter(p),
                quote_ident(&p.order_column)
            ),
            columns: columns.len(),
            order_index,
            commit_time,
        })
    }

    /// Runs the poll. The simple query protocol returns every value in text
    /// form, from the type's output function, as pgoutput sends it.
    pub async fn run(&self, client: &Client, limit: usize) -> Result<Vec<PolledRow>, SetupError> {
        let sql = format!("{}{limit}", self.head);
        let messages = client
            .simple_query(&sql)
            .await
            .map_err(q("polling the outbox table"))?;
        let mut rows = Vec::with_capacity(limit.min(4096));
        for m in messages {
            let SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let mut values = Vec::with_capacity(self.columns);
            for i in 0..self.columns {
                values.push(match r.get(i) {
                    Some(text) => Value::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => Value::Null,
                });
            }
            let order = r
                .get(self.order_index)
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MIN);
            let committed_us = if self.commit_time {
                r.get(self.columns).and_then(|v| v.parse().ok())
            } else {
                None
            };
            rows.push(PolledRow {
                order,
                tuple: Tuple(values),
                committed_us,
            });
        }
        Ok(rows)
    }
}

/// Removes (or marks) acknowledged rows by their order values.
pub async fn prepare_removal(client: &Client, cfg: &Config) -> Result<Statement, SetupError> {
    let p = &cfg.poll;
    let table = cfg.table().quoted();
    let order = quote_ident(&p.order_column);
    let sql = match p.after_send {
        AfterSend::Delete => format!("DELETE FROM {table} WHERE {order} = ANY($1::int8[])"),
        AfterSend::Mark => {
            let sent = quote_ident(&p.sent_column);
            format!("UPDATE {table} SET {sent} = now() WHERE {order} = ANY($1::int8[]) AND {sent} IS NULL")
        }
    };
    client
        .prepare(&sql)
        .await
        .map_err(q("preparing the removal of sent rows"))
}

/// Whether the server records commit timestamps.
pub async fn track_commit_timestamp(client: &Client) -> Result<bool, SetupError> {
    let v: String = client
        .query_one("SELECT current_setting('track_commit_timestamp')", &[])
        .await
        .map_err(q("reading track_commit_timestamp"))?
        .get(0);
    Ok(v == "on")
}

/// The unsent rows' order span (`max - min + 1`, an upper bound of their
/// count: rolled-back inserts leave gaps) and the oldest one's age in seconds
/// (`age_expr` of it), both from the index's ends.
pub async fn backlog(
    client: &Client,
    cfg: &Config,
    age_expr: Option<&str>,
) -> Result<(i64, Option<f64>), SetupError> {
    let p = &cfg.poll;
    let table = cfg.table().quoted();
    let order = quote_ident(&p.order_column);
    let filter = unsent_filter(p);
    let span: i64 = client
        .query_one(
            &format!(
                "SELECT COALESCE(max({order}) - min({order}) + 1, 0)::int8 FROM {table}{filter}"
            ),
            &[],
        )
        .await
        .map_err(q("reading the backlog"))?
        .get(0);
    let age = match age_expr {
        Some(expr) if span > 0 => client
            .query_opt(
                &format!("SELECT extract(epoch FROM now() - {expr})::float8 FROM {table}{filter} ORDER BY {order} LIMIT 1"),
                &[],
            )
            .await
            .map_err(q("reading the oldest unsent row"))?
            .and_then(|r| r.get::<_, Option<f64>>(0)),
        _ => None,
    };
    Ok((span, age))
}

/// What the oldest unsent row's age is measured from: its commit time with
/// `track_commit_timestamp`, else a `created_at` timestamp column, else nothing.
pub fn age_expr(commit_time: bool, columns: &[crate::pgoutput::Column]) -> Option<String> {
    if commit_time {
        return Some("pg_xact_commit_timestamp(xmin)".into());
    }
    columns
        .iter()
        .find(|c| c.name == "created_at" && matches!(c.type_oid, 1114 | 1184))
        .map(|_| "created_at".into())
}
