//! The run loop: a source's records out to the sink, acknowledgements back.
//!
//! [`run_with`] runs one session of the configured source at a time (the
//! source seam, `source`: the WAL through a replication slot, `session`; or
//! polling the table, `relay::poll`) and in between decides from the error's
//! [`Disposition`] whether to reconnect with jittered backoff, stand by while
//! another instance is active, or stop; it owns the sink and replaces a broken
//! one. The record path both sources share is `records`. It owns no protocol
//! details of its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::{Health, Metrics};
use crate::outbox::MappingError;
use crate::pgoutput::DecodeError;
use crate::replication::ReplicationError;
use crate::setup::SetupError;
use crate::sink::Sink;
use crate::sink::{DeliveryError, SendError, SinkSetupError};

mod checkpoint;
mod plan;
pub mod policy;
pub mod poll;
pub(crate) mod records;
mod session;
mod source;
mod window;

pub use policy::Disposition;
pub(crate) use session::SessionEnd;
use source::Source;
pub use window::WindowKeeper;

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
    /// The polling source (`poll`): its checks, queries and leader lock.
    #[error(transparent)]
    Poll(Box<crate::setup::poll::PollError>),
    #[error(transparent)]
    Sink(#[from] SinkSetupError),
    #[error("{0}; the slot stays at the last acknowledged position and the relay streams again from there")]
    Delivery(#[from] DeliveryError),
    #[error("{0}")]
    Send(SendError),
    #[error("insert into relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("{sink} refused the record of event {id} (commit LSN {lsn}) for topic {topic:?} for good: {error}; nothing past it is confirmed; fix the row or the topic, or set outbox.on_invalid = \"dead_letter\"")]
    Refused {
        sink: &'static str,
        topic: String,
        id: String,
        lsn: String,
        error: String,
    },
    #[error("cannot start at {start}: slot {slot:?} has already confirmed everything up to {confirmed} and a slot never goes back; start without --start-lsn or with one at or after {confirmed} (`outbox-relay status` shows earliest_replayable_lsn; configure [replay] window to be able to go further back)")]
    StartBehindSlot {
        slot: String,
        start: Lsn,
        confirmed: Lsn,
    },
    #[error("the checkpoint stored for slot {slot:?} ({checkpoint}) is ahead of this server's WAL ({current}): it was copied from another cluster (dump and restore, migration), and trusting it would skip events; delete it with DELETE FROM {schema}.checkpoint WHERE slot_name = '{slot}'; and start again")]
    CheckpointAhead {
        slot: String,
        schema: String,
        checkpoint: Lsn,
        current: Lsn,
    },
}

impl From<SetupError> for RelayError {
    fn from(e: SetupError) -> Self {
        RelayError::Setup(Box::new(e))
    }
}

impl From<crate::setup::poll::PollError> for RelayError {
    fn from(e: crate::setup::poll::PollError) -> Self {
        RelayError::Poll(Box::new(e))
    }
}

impl RelayError {
    /// The `kind` label of `outbox_relay_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Setup(_) => "setup",
            RelayError::Replication(e) if e.is_slot_in_use() => "slot_in_use",
            RelayError::Replication(_) => "replication",
            RelayError::Decode { .. } => "decode",
            RelayError::Mapping(_) => "invalid_row",
            RelayError::Poll(e) => e.kind(),
            RelayError::Sink(_) => "sink_setup",
            RelayError::Delivery(_) => "delivery",
            RelayError::Send(_) | RelayError::Refused { .. } => "produce",
            RelayError::UnknownRelation(_) => "protocol",
            RelayError::StartBehindSlot { .. } | RelayError::CheckpointAhead { .. } => "setup",
        }
    }
}

/// The shutdown trigger handed to [`run`]: set it to `true` to stop.
pub type ShutdownRx = watch::Receiver<bool>;

pub(crate) async fn wait_shutdown(rx: &mut ShutdownRx) {
    // A dropped sender without a request never stops the relay.
    if rx.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How `run` streams, beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `run --start-lsn`: the first session starts here instead of at the slot's
    /// confirmed position (refused if behind it) and produces every transaction
    /// after it, checkpoint or not.
    pub start_lsn: Option<Lsn>,
    /// `tail`: stream from a temporary slot of this name, confirm nothing.
    pub temporary_slot: Option<String>,
    /// `replay` with no instance running: execute this request, produce nothing
    /// else, confirm nothing, and return once it is done.
    pub replay_request: Option<i64>,
}

/// What a session reports to the checkpoint writer.
#[derive(Debug, Clone, Default, PartialEq)]
struct Progress {
    /// Highest commit end LSN below which everything is acknowledged.
    acked: Lsn,
    /// The slot position kept for the replay window, and since when it was acked.
    window_start: Option<(Lsn, SystemTime)>,
    /// The window's samples, thinned ([`WINDOW_SAMPLES_STORED`]).
    window_samples: Vec<(SystemTime, Lsn)>,
    /// A session made sure the tables exist: the writer may start.
    ready: bool,
}

/// Window samples stored with the checkpoint.
const WINDOW_SAMPLES_STORED: usize = 64;

/// Runs the relay until shutdown (`Ok`) or a fatal error. Failed sessions are
/// retried with jittered exponential backoff; while another instance holds the
/// slot this one stands by and retries every `relay.standby_retry_ms`.
pub async fn run(
    cfg: Config,
    metrics: Arc<Metrics>,
    shutdown: ShutdownRx,
) -> Result<(), RelayError> {
    run_with(cfg, metrics, shutdown, RunOptions::default()).await
}

/// [`run`] with [`RunOptions`]: the loop every source runs in. The source
/// (`source::Source`: the WAL, or polling the table) runs one session at a
/// time; this loop owns the sink, decides from [`RelayError::disposition`]
/// whether to retry with backoff, stand by or stop, and replaces a broken sink.
pub async fn run_with(
    cfg: Config,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownRx,
    opts: RunOptions,
) -> Result<(), RelayError> {
    let mut source = Source::new(&cfg, &metrics, &opts)?;
    // One sink for the process: a PostgreSQL reconnect leaves records already
    // in flight to finish (their reports carry an earlier session's sequence
    // numbers and are ignored) instead of aborting requests mid-flight.
    let (mut sink, mut reports) = Sink::new(&cfg, metrics.clone())?;
    let mut failures = 0u32;
    let result = loop {
        let result = source
            .session(
                &cfg,
                &metrics,
                &opts,
                &mut sink,
                &mut reports,
                &mut shutdown,
            )
            .await;
        let progressed = source.progressed();
        let err = match result {
            Ok(SessionEnd::Restart) => continue,
            Ok(SessionEnd::Stopped) => {
                metrics.set_health(Health::Down("stopped".into()));
                break Ok(());
            }
            Err(e) => e,
        };
        metrics.error(err.kind());
        // A record that could not be delivered for message.timeout.ms, or a
        // fatal librdkafka error (after which every send fails at once), may
        // mean the producer itself is stuck (an idempotent producer whose id the
        // broker no longer knows retries for ever): the next session gets a new
        // one. Records of the old one were not confirmed; the new session sends
        // them again from the slot (or the table).
        let broken_producer = sink.fatal_error().or_else(|| {
            matches!(err, RelayError::Delivery(_)).then(|| "a delivery failed".to_string())
        });
        let disposition = err.disposition();
        // `replay` without a live relay needs the slot now, not later.
        let replay_blocked = opts.replay_request.is_some() && disposition == Disposition::Standby;
        // A fatal producer error is retried with a new producer, whatever the record's error said.
        let stop = matches!(disposition, Disposition::Stop { .. }) && broken_producer.is_none();
        if stop || replay_blocked {
            metrics.set_health(Health::Down(err.to_string()));
            break Err(err);
        }
        metrics.reconnects.inc();
        failures = if progressed { 1 } else { failures + 1 };
        if let Some(why) = broken_producer {
            tracing::warn!(reason = %why, "recreating the sink's client");
            match Sink::new(&cfg, metrics.clone()) {
                Ok((new_sink, new_reports)) => {
                    let old = std::mem::replace(&mut sink, new_sink);
                    reports = new_reports;
                    // Dropping purges and joins librdkafka's threads: not on a runtime worker.
                    tokio::task::spawn_blocking(move || drop(old));
                }
                Err(e) => break Err(e.into()),
            }
        }
        let delay = match disposition {
            Disposition::Standby => {
                metrics.set_health(Health::Standby);
                let delay = jitter(Duration::from_millis(cfg.relay.standby_retry_ms));
                tracing::info!(reason = %err, retry_in = ?delay, "another instance is active; standing by");
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
            _ = wait_shutdown(&mut shutdown) => break Ok(()),
        }
    };
    source.finish().await;
    result
}

pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

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
