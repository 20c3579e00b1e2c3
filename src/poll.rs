//! The polling source (`source.kind = "poll"`): reads unsent outbox rows over
//! an ordinary SQL connection, hands them to the sink through the same record
//! path as the WAL mode, and deletes (or marks) them once the sink
//! acknowledged them. No slot, no publication, no REPLICATION privilege, any
//! `wal_level`. docs/polling.md explains why it skips no row and which order
//! it keeps.
//!
//! - here: [`PollSource`] (what lasts across sessions) and [`PollError`];
//! - `table`: the catalog facts and the checks `run` and `init` share;
//! - `query`: the SQL connection with NOTIFY, the leader lock, the poll and
//!   removal statements, the backlog;
//! - `session`: one session: lock, poll, send, remove, wait;
//! - `tracker`: which sent rows may be removed (pure);
//! - `admin`: what `init` and `status` print in this mode.
//!
//! It does not map rows (`outbox`), talk to the sink (`relay::records`,
//! `sink`) or decide what an error means (`relay::policy` asks
//! [`PollError::disposition`]).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::ack::Seq;
use crate::config::{Config, PollConfig, RelayHeader, TableName};
use crate::metrics::Metrics;
use crate::outbox::{MappingError, OutboxTable};
use crate::relay::policy::{EXIT_RUNTIME, EXIT_USER};
use crate::relay::{Disposition, RelayError, RunOptions, SessionEnd, ShutdownRx};
use crate::sink::{DeliveryReport, Sink};
use crate::transport::PgTarget;

pub mod admin;
mod query;
mod session;
pub mod table;
mod tracker;

pub use tracker::RowTracker;

/// What polling cannot work with, or the row it stopped at.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{what} reads the WAL through a replication slot, which source.kind = \"poll\" does not use; run it with a config of source.kind = \"wal\"")]
    WalOnly { what: &'static str },
    #[error("postgres.url reaches a standby in recovery: polling deletes or marks the rows it sent, which needs the primary; point postgres.url at the primary, or add target_session_attrs=read-write to a multi-host URL")]
    NotPrimary,
    #[error("role {role_sql} lacks {privileges} on table \"{table}\", which polling needs (read the rows, then remove or mark them); run GRANT {privileges} ON {} TO {role_sql}; as the table's owner", .table.quoted())]
    NoPrivilege {
        table: TableName,
        privileges: String,
        role_sql: String,
    },
    #[error("poll.order_column {column:?} of table \"{table}\" is not an integer (smallint, integer, bigint); name an integer column assigned from a sequence, or a new name for `outbox-relay init` to add as an identity column")]
    OrderColumnType { table: TableName, column: String },
    #[error("sequence {sequence} behind poll.order_column caches {cache} values per session, so values are not taken in insert order across sessions and per-key order could break; run ALTER SEQUENCE {sequence} CACHE 1;")]
    SequenceCache { sequence: String, cache: i64 },
    #[error("poll.sent_column {column:?} of table \"{table}\" is not a timestamptz (or timestamp); name another column for `outbox-relay init` to add, or change its type")]
    SentColumnType { table: TableName, column: String },
    #[error("no unique index on column {column:?} of table \"{table}\": with duplicate values, removing a sent row could remove an unsent one; run {sql};")]
    NotUnique {
        table: TableName,
        column: String,
        sql: String,
    },
    #[error("role {role_sql} cannot {what}: table \"{table}\" is owned by {owner_sql}; run `outbox-relay init` as {owner_sql} (or a superuser)")]
    NotOwner {
        table: TableName,
        owner_sql: String,
        role_sql: String,
        what: String,
    },
    #[error("the {what} polling needs is missing on table \"{table}\" and the relay never alters the table itself; run `outbox-relay init` (--dry-run prints the SQL), or as the table's owner: {sql};")]
    Missing {
        table: TableName,
        what: String,
        sql: String,
    },
    /// Another instance polls this table: stand by.
    #[error("another instance polls table \"{table}\" (it holds the leader lock{})", .pid.map(|p| format!(", backend pid {p}")).unwrap_or_default())]
    LockHeld { table: TableName, pid: Option<i32> },
    #[error("{source}; it has {column} = {value}: it and every row after it stay in the table; fix or delete the row (or set outbox.on_invalid = \"dead_letter\") and start again")]
    BadRow {
        column: String,
        value: i64,
        source: MappingError,
    },
}

impl PollError {
    /// The `kind` label of `outbox_relay_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            PollError::LockHeld { .. } => "lock_held",
            PollError::BadRow { .. } => "invalid_row",
            _ => "setup",
        }
    }

    pub fn disposition(&self) -> Disposition {
        match self {
            PollError::LockHeld { .. } => Disposition::Standby,
            PollError::BadRow { .. } => Disposition::Stop { exit: EXIT_RUNTIME },
            _ => Disposition::Stop { exit: EXIT_USER },
        }
    }
}

/// The polling source: what lasts from one session to the next.
pub struct PollSource {
    pg: PgTarget,
    table: TableName,
    poll: PollConfig,
    cfg: Config,
    /// The mapping, without the `lsn` header (polling knows no commit LSN).
    outbox: OutboxTable,
    /// Sequence number of the next session's first record.
    next_seq: Seq,
    /// The last session held the leader lock.
    led: bool,
}

impl PollSource {
    pub(crate) fn new(cfg: &Config, opts: &RunOptions) -> Result<PollSource, RelayError> {
        let what = if opts.start_lsn.is_some() {
            Some("run --start-lsn")
        } else if opts.temporary_slot.is_some() {
            Some("tail")
        } else if opts.replay_request.is_some() {
            Some("replay")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(PollError::WalOnly { what }.into());
        }
        let mut mapped = cfg.clone();
        mapped
            .outbox
            .relay_headers
            .retain(|h| *h != RelayHeader::Lsn);
        Ok(PollSource {
            pg: cfg.pg().clone(),
            table: cfg.table().clone(),
            poll: cfg.poll.clone(),
            outbox: OutboxTable::from_config(&mapped),
            cfg: cfg.clone(),
            next_seq: 0,
            led: false,
        })
    }

    /// The last session held the leader lock.
    pub fn progressed(&self) -> bool {
        self.led
    }

    /// One session: connect, check, take the leader lock, then poll until
    /// shutdown or an error.
    pub(crate) async fn session(
        &mut self,
        metrics: &Arc<Metrics>,
        sink: &mut Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        shutdown: &mut ShutdownRx,
    ) -> Result<SessionEnd, RelayError> {
        self.led = false;
        session::run(self, metrics, sink, reports, shutdown).await
    }
}
