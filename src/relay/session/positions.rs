//! Where a session starts and what it hands on: the checkpoint and the replay
//! window it reads, the replay request it claims (and gives up), the position
//! it confirms to the slot (held back by the window) on every tick and as
//! acknowledgements arrive, and the acknowledged position it publishes for the
//! checkpoint writer.

use std::time::SystemTime;

use tokio::sync::watch;

use super::{Session, SessionEnd, Stream};
use crate::lsn::Lsn;
use crate::relay::plan::{JobProgress, Plan};
use crate::relay::{Progress, RelayError, WindowKeeper};
use crate::replication::StatusWriter;
use crate::setup;
use crate::setup::server::Server;
use crate::state::{Outcome, StateStore};
use crate::transport::PgTarget;

impl Session<'_> {
    /// A replay that ends with its session is marked failed, so that it does not
    /// hold up the next session: on an error (a refused record, an invalid
    /// suffixed topic) it would fail again; when `replay` itself was stopped,
    /// the user asked for it. A live relay's shutdown leaves it to the next
    /// instance (it is started again, at most `state::MAX_ATTEMPTS` times).
    pub(super) async fn abandon_job(&self, s: &Stream, result: &Result<SessionEnd, RelayError>) {
        let (Some(p), Some(store)) = (&s.plan.job, &s.store) else {
            return;
        };
        let why = match result {
            // A session that will be retried (connection, delivery) takes the
            // request up again; only an error the user must fix ends it.
            Err(e) if e.is_fatal() => format!("stopped by an error: {e}"),
            Err(_) => return,
            Ok(_) if self.opts.replay_request.is_some() => "interrupted before it was done".into(),
            Ok(_) => return,
        };
        tracing::error!(request = p.job.id, "replay failed: {why}");
        if let Err(e) = store.fail(p.job.id, &why).await {
            tracing::warn!(request = p.job.id, error = %e, "cannot mark the replay request failed");
        }
    }

    /// Reads the checkpoint: what to skip. Sets up the replay window on a first run.
    pub(super) async fn plan(
        &mut self,
        client: tokio_postgres::Client,
        server: &Server,
        slot: &setup::SlotState,
    ) -> Result<(Plan, Option<StateStore>), RelayError> {
        let cfg = self.cfg;
        let mut plan = Plan {
            live: self.opts.replay_request.is_none(),
            ..Plan::default()
        };
        if !self.confirms && self.opts.replay_request.is_none() {
            return Ok((plan, None)); // stdout without confirming: everything from the slot
        }
        if server.in_recovery {
            // A standby is read-only: no checkpoint row, no replay requests;
            // the slot alone keeps the position.
            if self.first {
                tracing::info!(version = %server.version(), "decoding on a standby: checkpoints and replay requests are not stored here (the standby is read-only); after a crash the relay resends from the slot's confirmed position");
            }
            return Ok((plan, None));
        }
        crate::state::ensure(&client, cfg).await?;
        let store = StateStore::new(client, cfg);
        if slot.created {
            // A new slot is a new stream: what was stored under its name before
            // describes another one.
            store.reset().await?;
        }
        let checkpoint = store.load().await?;
        if let Some(cp) = &checkpoint {
            let current = setup::current_wal(store.client()).await?;
            if cp.acked > current {
                return Err(RelayError::CheckpointAhead {
                    slot: cfg.postgres.slot.clone(),
                    schema: cfg.checkpoint.schema.clone(),
                    checkpoint: cp.acked,
                    current,
                });
            }
            self.metrics.checkpoint_lsn.set(cp.acked.0 as f64);
        }
        let stored = checkpoint.as_ref().map_or(Lsn::ZERO, |c| c.acked);
        plan.acknowledged = stored.max(self.carried.acked);
        plan.skip_through = match self.opts.start_lsn {
            // --start-lsn: everything after it, acknowledged before or not.
            Some(start) if self.first => {
                if start < slot.confirmed_flush {
                    return Err(RelayError::StartBehindSlot {
                        slot: cfg.postgres.slot.clone(),
                        start,
                        confirmed: slot.confirmed_flush,
                    });
                }
                if start > stored {
                    tracing::warn!(start = %start, checkpoint = %stored, "--start-lsn is past the checkpoint: events committed between them are not sent");
                }
                Lsn::ZERO
            }
            // After a reconnect, only what this process acknowledged since: the
            // re-send asked for goes on where it was.
            Some(start) => self.carried.acked.max(start),
            None => stored.max(self.carried.acked),
        };
        if let (true, Some(w)) = (self.first && self.confirms, cfg.window()) {
            let mut seed = Vec::new();
            if let Some(cp) = &checkpoint {
                seed.extend(cp.window_samples.iter().copied());
                seed.push((cp.acked_at, cp.acked));
                seed.extend(cp.window_start.map(|(l, t)| (t, l)));
            }
            self.carried.window = Some(WindowKeeper::new(w, &seed));
        }
        Ok((plan, Some(store)))
    }

    /// Takes the next replay request (or the one this process was started for)
    /// into `plan`. False: the request this process was started for is gone.
    pub(super) async fn claim(
        &self,
        plan: &mut Plan,
        store: &StateStore,
        confirmed: Lsn,
    ) -> Result<bool, RelayError> {
        let only = self.opts.replay_request;
        if !self.confirms && only.is_none() {
            return Ok(true);
        }
        let Some(mut job) = store.claim(only).await? else {
            return Ok(only.is_none());
        };
        let why = if job.from < confirmed {
            Some(format!(
                "cannot replay from {}: the slot keeps WAL only from {confirmed} (the earliest replayable LSN); set [replay] window to keep more",
                job.from
            ))
        } else if job.to > plan.acknowledged {
            // `replay` asks the instance holding the slot, which knows what it
            // has acknowledged, stored or not yet: the range ends there.
            if job.from >= plan.acknowledged {
                Some(format!(
                    "nothing to replay from {}: everything acknowledged so far ends at {} (nothing after it was produced yet)",
                    job.from, plan.acknowledged
                ))
            } else {
                tracing::info!(request = job.id, requested = %job.to, to = %plan.acknowledged, "replay range ends at what was acknowledged");
                store.lower_to(job.id, plan.acknowledged).await?;
                job.to = plan.acknowledged;
                None
            }
        } else {
            None
        };
        if let Some(why) = why {
            tracing::error!(request = job.id, "{why}");
            store.finish(job.id, &Outcome::Failed(why)).await?;
            return Ok(only.is_none());
        }
        plan.job = Some(JobProgress {
            job,
            transactions: 0,
            events: 0,
            events_at_begin: 0,
        });
        Ok(true)
    }

    /// `--start-lsn`: says where the server really started.
    pub(super) async fn report_start(&self, pg: &PgTarget, start: Lsn) {
        let Ok(client) = setup::sql_connect(pg).await else {
            return;
        };
        if let Ok(Some((slot, _, _))) =
            setup::slot_state(&client, None, &self.cfg.postgres.slot).await
        {
            if slot.confirmed_flush > start {
                tracing::warn!(requested = %start, actual = %slot.confirmed_flush, "the server moved the start forward to the slot's confirmed position");
            } else {
                tracing::info!(start = %start, "streaming from --start-lsn");
            }
        }
    }

    /// Hands the acknowledged position to the checkpoint writer (only once
    /// records were acknowledged: keepalives alone never cause a write).
    pub(super) fn publish(&mut self, s: &mut Stream) {
        if !self.confirms {
            return;
        }
        if s.acked_since_publish {
            self.carried.acked = self.carried.acked.max(s.tracker.confirmed());
            s.acked_since_publish = false;
        }
        let acked = self.carried.acked;
        let window_start = self.window_start;
        let window = self.carried.window.as_ref();
        // Without the relay's tables (a read-only standby) nothing is written.
        let ready = s.store.is_some();
        self.progress.send_if_modified(|p| {
            if p.acked == acked && p.window_start == window_start {
                return false;
            }
            *p = Progress {
                acked,
                window_start,
                window_samples: window
                    .map(|w| w.snapshot(crate::relay::WINDOW_SAMPLES_STORED))
                    .unwrap_or_default(),
                ready,
            };
            true
        });
    }

    /// Status update, window, checkpoint progress and the running replay.
    pub(super) async fn on_tick(
        &mut self,
        s: &mut Stream,
        writer: &mut StatusWriter,
        requests: Option<&mut watch::Receiver<bool>>,
    ) -> Result<Option<SessionEnd>, RelayError> {
        if let Some(w) = self.carried.window.as_mut() {
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
    pub(super) async fn pass_on(
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

    /// Sends the position the slot may move to; with `always` false only
    /// when it is past the last one sent (the timer's update doubles as the
    /// keepalive, so it goes out regardless).
    pub(super) async fn send_status(
        &mut self,
        writer: &mut StatusWriter,
        s: &Stream,
        always: bool,
    ) -> Result<(), RelayError> {
        let acked = s.tracker.confirmed();
        let target = if !self.confirms {
            Lsn::ZERO // PostgreSQL ignores a zero position: the slot stays
        } else if let Some(w) = self.carried.window.as_mut() {
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
}
