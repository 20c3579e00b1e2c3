//! The checkpoint writer: stores the acknowledged position that sessions
//! publish in `outbox_relay.checkpoint`, promptly and at a bounded rate, and
//! tells sessions whether a replay request waits.
//!
//! It writes only what a session published, which is only ever what Kafka
//! acknowledged (see `ack`): the stored row never leads the broker. It does not
//! decide what is acknowledged, nor confirm anything to the slot.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::Progress;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::setup::{self, q, SetupError};
use crate::state::{Checkpoint, StateStore};
use crate::transport::PgTarget;

/// A checkpoint write only for the window (the acknowledged position did not
/// move) waits this long after the previous one: each write is WAL that moves
/// the window on an idle database, which must not turn into a write per tick.
const WINDOW_ONLY_WRITE_INTERVAL: Duration = Duration::from_secs(30);

/// What woke the writer up.
enum Wake {
    /// `checkpoint.interval_ms`: look for replay requests, store a moved window.
    Tick,
    /// The acknowledged position advanced and the write interval has passed.
    Write,
    /// A session published something (not yet an advance worth a write).
    Published,
    Stop,
}

/// Stores the acknowledged position within `checkpoint.write_interval_ms` of
/// each advance (at most one write per interval), once more when stopped, and
/// looks for replay requests every `checkpoint.interval_ms`.
pub(super) async fn checkpoint_task(
    pg: PgTarget,
    cfg: Config,
    metrics: Arc<Metrics>,
    mut progress: watch::Receiver<Progress>,
    pending: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let write_interval = Duration::from_millis(cfg.checkpoint.write_interval_ms);
    let poll_interval = Duration::from_millis(cfg.checkpoint.interval_ms);
    let mut w = Writer {
        pg,
        cfg,
        write_interval,
        metrics,
        store: None,
        written: Progress::default(),
        written_at: Instant::now(),
        last_write: None,
        failing: false,
    };
    let mut ticker = tokio::time::interval(poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let write_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(write_timer);
    loop {
        let advanced = {
            let p = progress.borrow();
            p.ready && p.acked > w.written.acked
        };
        let wake = tokio::select! {
            biased;
            _ = &mut stop => Wake::Stop,
            _ = &mut write_timer, if advanced => Wake::Write,
            changed = progress.changed(), if !advanced => match changed {
                Ok(()) => Wake::Published,
                // The relay dropped its side: only the stop signal is left.
                Err(_) => {
                    let _ = (&mut stop).await;
                    Wake::Stop
                }
            },
            _ = ticker.tick() => Wake::Tick,
        };
        if matches!(wake, Wake::Published) {
            continue;
        }
        let stopping = matches!(wake, Wake::Stop);
        let p = progress.borrow().clone();
        if !p.ready {
            if stopping {
                return;
            }
            continue;
        }
        // The next write may follow one interval after this one; after a
        // failure, retry at the replay-request pace instead of every interval.
        match w
            .step(&p, stopping, matches!(wake, Wake::Tick), &pending)
            .await
        {
            Step::Wrote => write_timer.as_mut().reset(Instant::now() + write_interval),
            Step::Failed => write_timer.as_mut().reset(Instant::now() + poll_interval),
            Step::Nothing => {}
        }
        if stopping {
            return;
        }
    }
}

/// What one step of the writer did.
enum Step {
    Wrote,
    Nothing,
    Failed,
}

/// The writer's connection and what it stored last.
struct Writer {
    pg: PgTarget,
    cfg: Config,
    write_interval: Duration,
    metrics: Arc<Metrics>,
    store: Option<StateStore>,
    written: Progress,
    /// When `written` was stored (at first: when the writer started).
    written_at: Instant,
    /// When this writer last stored anything.
    last_write: Option<Instant>,
    /// The last step failed (logged once per failure, not per attempt).
    failing: bool,
}

impl Writer {
    /// Connects if needed, stores `p` if it is due and, with `poll`, reads
    /// whether a replay request waits.
    async fn step(
        &mut self,
        p: &Progress,
        stopping: bool,
        poll: bool,
        pending: &watch::Sender<bool>,
    ) -> Step {
        if self.store.is_none() {
            match connect(&self.pg, &self.cfg).await {
                Ok(st) => self.store = Some(st),
                Err(e) => {
                    tracing::debug!(error = %e, "checkpoint: cannot connect");
                    return Step::Failed;
                }
            }
        }
        let Some(st) = &self.store else {
            return Step::Failed;
        };
        // A tick never writes sooner than the write interval allows.
        let interval_passed = self
            .last_write
            .map_or(true, |t| t.elapsed() >= self.write_interval);
        let due = (p.acked > self.written.acked && (stopping || interval_passed))
            || (p.window_start != self.written.window_start
                && (stopping || self.written_at.elapsed() >= WINDOW_ONLY_WRITE_INTERVAL));
        let result = async {
            if due {
                st.save(&Checkpoint {
                    acked: p.acked,
                    acked_at: SystemTime::now(),
                    window_start: p.window_start,
                    window_samples: p.window_samples.clone(),
                })
                .await?;
                self.metrics.checkpoint_lsn.set(p.acked.0 as f64);
            }
            if poll && !stopping {
                pending.send_replace(st.has_pending().await?);
            }
            Ok::<_, SetupError>(())
        }
        .await;
        match result {
            Ok(()) => {
                if due {
                    self.written = p.clone();
                    self.written_at = Instant::now();
                    self.last_write = Some(self.written_at);
                }
                if self.failing {
                    tracing::info!("checkpoint writes work again");
                    self.failing = false;
                }
                if due {
                    Step::Wrote
                } else {
                    Step::Nothing
                }
            }
            Err(e) => {
                self.metrics.error("checkpoint");
                if !self.failing {
                    // The slot still guarantees delivery; only the skipping of
                    // acknowledged transactions after a restart and replay
                    // requests wait for it.
                    tracing::warn!(error = %e, "cannot store the checkpoint or read replay requests; retrying");
                    self.failing = true;
                }
                if st.client().is_closed() {
                    self.store = None;
                }
                Step::Failed
            }
        }
    }
}

/// The writer's own connection. Its commits do not wait for the WAL flush
/// (`synchronous_commit = off`): a write every few milliseconds then costs no
/// fsync, and what a server crash can take back (the last few hundred
/// milliseconds of writes) only means re-sending those records, as the slot's
/// own `confirmed_flush_lsn` does after such a crash. A stored position is
/// never ahead of Kafka either way.
async fn connect(pg: &PgTarget, cfg: &Config) -> Result<StateStore, SetupError> {
    let client = setup::sql_connect(pg).await?;
    client
        .batch_execute("SET synchronous_commit = off")
        .await
        .map_err(q("setting synchronous_commit for checkpoint writes"))?;
    Ok(StateStore::new(client, cfg))
}
