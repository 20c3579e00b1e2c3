//! The source seam: where a session's records come from.
//!
//! A source runs one session at a time inside [`super::run_with`]'s loop:
//! it connects, reads events, hands records to the shared record path
//! (`records::Records`: the sink, delivery reports, dead letters), makes what
//! the sink acknowledged durable at the source (the WAL: confirming the slot
//! and the checkpoint; polling: deleting or marking the rows), and returns
//! `Ok` on shutdown or the error that ended it. The loop decides what the
//! error means (`policy`), when to try again, and owns the sink.
//!
//! A new source is a new module (as `relay::poll`), a `SourceKind`, and an arm
//! in each `match` below.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::checkpoint_task;
use super::session::{Carried, Session, SessionEnd};
use super::{AbortOnDrop, Progress, RelayError, RunOptions, ShutdownRx};
use crate::config::{Config, SourceKind};
use crate::metrics::Metrics;
use crate::outbox::OutboxTable;
use crate::relay::poll::PollSource;
use crate::setup;
use crate::sink::{DeliveryReport, Sink};
use crate::transport::PgTarget;

pub(super) enum Source {
    Wal(Box<WalSource>),
    Poll(Box<PollSource>),
}

impl Source {
    pub(super) fn new(
        cfg: &Config,
        metrics: &Arc<Metrics>,
        opts: &RunOptions,
    ) -> Result<Source, RelayError> {
        Ok(match cfg.source.kind {
            SourceKind::Wal => Source::Wal(Box::new(WalSource::new(cfg, metrics, opts))),
            SourceKind::Poll => Source::Poll(Box::new(PollSource::new(cfg, opts)?)),
        })
    }

    /// Runs one session until shutdown or an error.
    pub(super) async fn session(
        &mut self,
        cfg: &Config,
        metrics: &Arc<Metrics>,
        opts: &RunOptions,
        sink: &mut Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        shutdown: &mut ShutdownRx,
    ) -> Result<SessionEnd, RelayError> {
        match self {
            Source::Wal(w) => w.session(cfg, metrics, opts, sink, reports, shutdown).await,
            Source::Poll(p) => p.session(metrics, sink, reports, shutdown).await,
        }
    }

    /// The last session got going (streamed from the slot, or held the leader
    /// lock): the next failure starts the backoff afresh.
    pub(super) fn progressed(&self) -> bool {
        match self {
            Source::Wal(w) => w.streamed,
            Source::Poll(p) => p.progressed(),
        }
    }

    /// After the last session: store what is left to store.
    pub(super) async fn finish(self) {
        match self {
            Source::Wal(w) => w.finish().await,
            Source::Poll(_) => {}
        }
    }
}

/// The WAL source: sessions of the replication stream, the checkpoint writer
/// and the slot's gauges.
pub(super) struct WalSource {
    pg: PgTarget,
    outbox: OutboxTable,
    /// Acknowledged positions are confirmed to the slot and checkpointed.
    confirms: bool,
    carried: Carried,
    /// Written by sessions, stored by the checkpoint task; requests flow back.
    progress_tx: watch::Sender<Progress>,
    pending_rx: watch::Receiver<bool>,
    stop_tx: Option<oneshot::Sender<()>>,
    checkpointer: Option<tokio::task::JoinHandle<()>>,
    _slot_poller: AbortOnDrop,
    /// The last session started streaming.
    streamed: bool,
}

impl WalSource {
    fn new(cfg: &Config, metrics: &Arc<Metrics>, opts: &RunOptions) -> WalSource {
        let pg = cfg.pg().clone();
        let confirms =
            cfg.sink.confirms() && opts.temporary_slot.is_none() && opts.replay_request.is_none();
        let poller = tokio::spawn(poll_slot(
            pg.clone(),
            cfg.postgres.slot.clone(),
            metrics.clone(),
        ));
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let (pending_tx, pending_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        let checkpointer = confirms.then(|| {
            tokio::spawn(checkpoint_task(
                pg.clone(),
                cfg.clone(),
                metrics.clone(),
                progress_rx,
                pending_tx,
                stop_rx,
            ))
        });
        WalSource {
            pg,
            outbox: OutboxTable::from_config(cfg),
            confirms,
            carried: Carried::default(),
            progress_tx,
            pending_rx,
            stop_tx: Some(stop_tx),
            checkpointer,
            _slot_poller: AbortOnDrop(poller),
            streamed: false,
        }
    }

    async fn session(
        &mut self,
        cfg: &Config,
        metrics: &Arc<Metrics>,
        opts: &RunOptions,
        sink: &mut Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        shutdown: &mut ShutdownRx,
    ) -> Result<SessionEnd, RelayError> {
        let mut session = Session {
            cfg,
            outbox: &self.outbox,
            metrics,
            opts,
            confirms: self.confirms,
            first: !self.carried.ever_streamed,
            streamed: false,
            carried: &mut self.carried,
            window_start: None,
            progress: &self.progress_tx,
        };
        let result = session
            .run(&self.pg, sink, reports, shutdown, &mut self.pending_rx)
            .await;
        self.streamed = session.streamed;
        self.carried.ever_streamed |= self.streamed;
        result
    }

    /// The last acknowledged position is stored before the process exits.
    async fn finish(mut self) {
        if let Some(task) = self.checkpointer.take() {
            if let Some(stop) = self.stop_tx.take() {
                let _ = stop.send(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
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
