//! The polling source (`source.kind = "poll"`): reads unsent outbox rows over
//! an ordinary SQL connection, hands them to the sink through the same record
//! path as the WAL mode, and deletes (or marks) them once the sink
//! acknowledged them. No slot, no publication, no REPLICATION privilege, any
//! `wal_level`. docs/polling.md explains why it skips no row and which order
//! it keeps.
//!
//! - here: [`PollSource`] (what lasts across sessions);
//! - `setup::poll`: the catalog facts and the checks `run` and `init` share,
//!   and `PollError`;
//! - `query`: the SQL connection with NOTIFY, the leader lock, the poll and
//!   removal statements, the backlog;
//! - `session`: one session: lock, poll, send, remove, wait;
//! - `tracker`: which sent rows may be removed (pure);
//! - `admin::poll`: what `init` and `status` print in this mode.
//!
//! It does not map rows (`outbox`), talk to the sink (`relay::records`,
//! `sink`) or decide what an error means (`relay::policy` asks
//! `PollError::disposition`).

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::ack::Seq;
use crate::config::{Config, PollConfig, RelayHeader, TableName};
use crate::metrics::Metrics;
use crate::outbox::OutboxTable;
use crate::relay::{RelayError, RunOptions, SessionEnd, ShutdownRx};
use crate::setup::poll::PollError;
use crate::sink::{DeliveryReport, Sink};
use crate::transport::PgTarget;

pub(crate) mod query;
mod session;
mod tracker;

pub use tracker::RowTracker;

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
