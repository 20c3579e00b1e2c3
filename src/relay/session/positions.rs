//! Where a session starts and what it hands on: the checkpoint and the replay
//! window it reads, the replay request it claims (and gives up), and the
//! acknowledged position it publishes for the checkpoint writer.

use super::{Session, SessionEnd, Stream};
use crate::lsn::Lsn;
use crate::relay::plan::{JobProgress, Plan};
use crate::relay::{Progress, RelayError, WindowKeeper};
use crate::server::Server;
use crate::setup;
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
        plan.acknowledged = stored.max(self.acked);
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
            Some(start) => self.acked.max(start),
            None => stored.max(self.acked),
        };
        if let (true, Some(w)) = (self.first && self.confirms, cfg.replay.window()) {
            let mut seed = Vec::new();
            if let Some(cp) = &checkpoint {
                seed.extend(cp.window_samples.iter().copied());
                seed.push((cp.acked_at, cp.acked));
                seed.extend(cp.window_start.map(|(l, t)| (t, l)));
            }
            *self.window = Some(WindowKeeper::new(w, &seed));
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
            self.acked = self.acked.max(s.tracker.confirmed());
            s.acked_since_publish = false;
        }
        let acked = self.acked;
        let window_start = self.window_start;
        let window = self.window.as_ref();
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
}
