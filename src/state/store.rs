//! [`StateStore`]: the checkpoint row of one slot and the replay requests, read
//! and written over plain SQL.

use std::borrow::Borrow;
use std::time::SystemTime;

use tokio_postgres::Client;

use super::*;

/// Reads and writes the relay's tables for one slot, over an owned or a
/// borrowed client.
pub struct StateStore<C: Borrow<Client> = Client> {
    client: C,
    schema: String,
    slot: String,
}

impl<C: Borrow<Client>> StateStore<C> {
    pub fn new(client: C, cfg: &Config) -> StateStore<C> {
        StateStore {
            client,
            schema: quote_ident(&cfg.checkpoint.schema),
            slot: cfg.postgres.slot.clone(),
        }
    }

    pub fn client(&self) -> &Client {
        self.client.borrow()
    }

    pub async fn load(&self) -> Result<Option<Checkpoint>, SetupError> {
        let row = self
            .client()
            .query_opt(
                &format!(
                    "SELECT acked_lsn::text, acked_at, window_start_lsn::text, window_start_at,
                            window_samples::text
                     FROM {}.checkpoint WHERE slot_name = $1",
                    self.schema
                ),
                &[&self.slot],
            )
            .await
            .map_err(q("reading the checkpoint"))?;
        Ok(row.map(|r| {
            let lsn = |i: usize| {
                r.get::<_, Option<String>>(i)
                    .and_then(|s| s.parse::<Lsn>().ok())
            };
            let window = match (lsn(2), r.get::<_, Option<SystemTime>>(3)) {
                (Some(l), Some(t)) => Some((l, t)),
                _ => None,
            };
            Checkpoint {
                acked: lsn(0).unwrap_or(Lsn::ZERO),
                acked_at: r.get(1),
                window_start: window,
                window_samples: samples_of(
                    r.get::<_, Option<String>>(4)
                        .and_then(|t| serde_json::from_str(&t).ok()),
                ),
            }
        }))
    }

    /// Stores `cp`; the stored position never moves backwards.
    pub async fn save(&self, cp: &Checkpoint) -> Result<(), SetupError> {
        let (wl, wt) = match cp.window_start {
            Some((l, t)) => (Some(l.to_string()), Some(t)),
            None => (None, None),
        };
        self.client()
            .execute(
                &format!(
                    "INSERT INTO {s}.checkpoint AS c
                         (slot_name, acked_lsn, acked_at, window_start_lsn, window_start_at,
                          window_samples, updated_at)
                     VALUES ($1, $2::text::pg_lsn, $3, $4::text::pg_lsn, $5, $6::text::jsonb, now())
                     ON CONFLICT (slot_name) DO UPDATE SET
                         acked_at = CASE WHEN EXCLUDED.acked_lsn > c.acked_lsn
                                         THEN EXCLUDED.acked_at ELSE c.acked_at END,
                         acked_lsn = GREATEST(c.acked_lsn, EXCLUDED.acked_lsn),
                         window_start_lsn = EXCLUDED.window_start_lsn,
                         window_start_at = EXCLUDED.window_start_at,
                         window_samples = EXCLUDED.window_samples,
                         updated_at = now()",
                    s = self.schema
                ),
                &[
                    &self.slot,
                    &cp.acked.to_string(),
                    &cp.acked_at,
                    &wl,
                    &wt,
                    &(!cp.window_samples.is_empty())
                        .then(|| samples_json(&cp.window_samples).to_string()),
                ],
            )
            .await
            .map_err(q("writing the checkpoint"))?;
        Ok(())
    }

    /// Whether a replay request waits for this slot.
    pub async fn has_pending(&self) -> Result<bool, SetupError> {
        let row = self
            .client()
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {}.replay_request
                                    WHERE slot_name = $1 AND state = 'pending')",
                    self.schema
                ),
                &[&self.slot],
            )
            .await
            .map_err(q("looking for replay requests"))?;
        Ok(row.get(0))
    }

    /// Marks the oldest waiting request (`only`: that one) as running and returns
    /// it. A request left running by a process that died is taken again, at
    /// most [`MAX_ATTEMPTS`] times in all: then it is marked failed, so that a
    /// request that cannot succeed never holds up the live stream for good.
    pub async fn claim(&self, only: Option<i64>) -> Result<Option<ReplayJob>, SetupError> {
        self.client()
            .execute(
                &format!(
                    "UPDATE {s}.replay_request SET state = 'failed', finished_at = now(),
                         error = coalesce(error, 'abandoned after ' || attempts || ' attempts')
                     WHERE slot_name = $1 AND state = 'running' AND attempts >= $2",
                    s = self.schema
                ),
                &[&self.slot, &MAX_ATTEMPTS],
            )
            .await
            .map_err(q("giving up on replay requests"))?;
        let row = self
            .client()
            .query_opt(
                &format!(
                    "UPDATE {s}.replay_request
                     SET state = 'running', started_at = now(), attempts = attempts + 1
                     WHERE id = (SELECT id FROM {s}.replay_request
                                 WHERE slot_name = $1 AND state IN ('pending', 'running')
                                   AND ($2::int8 IS NULL OR id = $2)
                                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING id, from_lsn::text, to_lsn::text, only_topic, topic_suffix",
                    s = self.schema
                ),
                &[&self.slot, &only],
            )
            .await
            .map_err(q("claiming a replay request"))?;
        Ok(row.map(|r| ReplayJob {
            id: r.get(0),
            from: r.get::<_, String>(1).parse().unwrap_or(Lsn::ZERO),
            to: r.get::<_, String>(2).parse().unwrap_or(Lsn::ZERO),
            only_topic: r.get(3),
            topic_suffix: r.get(4),
        }))
    }

    /// Forgets the stored position: the slot was just created, so nothing
    /// stored for a slot of this name before says anything about its stream.
    pub async fn reset(&self) -> Result<(), SetupError> {
        self.client()
            .execute(
                &format!(
                    "DELETE FROM {}.checkpoint WHERE slot_name = $1",
                    self.schema
                ),
                &[&self.slot],
            )
            .await
            .map_err(q("resetting the checkpoint"))?;
        Ok(())
    }

    /// Records how the request `id` ended.
    pub async fn finish(&self, id: i64, outcome: &Outcome) -> Result<(), SetupError> {
        let (state, tx, ev, err) = match outcome {
            Outcome::Done {
                transactions,
                events,
            } => (
                "done",
                Some(*transactions as i64),
                Some(*events as i64),
                None,
            ),
            Outcome::Failed(e) => ("failed", None, None, Some(e.as_str())),
        };
        self.client()
            .execute(
                &format!(
                    "UPDATE {}.replay_request SET state = $2, finished_at = now(),
                         transactions = $3, events = $4, error = $5
                     WHERE id = $1 AND state IN ('pending', 'running')",
                    self.schema
                ),
                &[&id, &state, &tx, &ev, &err],
            )
            .await
            .map_err(q("recording the end of a replay"))?;
        Ok(())
    }

    /// Adds a pending request and returns its id.
    pub async fn request(
        &self,
        from: Lsn,
        to: Lsn,
        only_topic: Option<&str>,
        topic_suffix: Option<&str>,
    ) -> Result<i64, SetupError> {
        let row = self.client()
            .query_one(
                &format!(
                    "INSERT INTO {}.replay_request (slot_name, from_lsn, to_lsn, only_topic, topic_suffix)
                     VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, $5) RETURNING id",
                    self.schema
                ),
                &[
                    &self.slot,
                    &from.to_string(),
                    &to.to_string(),
                    &only_topic,
                    &topic_suffix,
                ],
            )
            .await
            .map_err(q("adding a replay request"))?;
        Ok(row.get(0))
    }

    pub async fn request_state(&self, id: i64) -> Result<Option<RequestState>, SetupError> {
        let row = self
            .client()
            .query_opt(
                &format!(
                    "SELECT state, transactions, events, error, to_lsn::text
                     FROM {}.replay_request WHERE id = $1",
                    self.schema
                ),
                &[&id],
            )
            .await
            .map_err(q("reading a replay request"))?;
        Ok(row.map(|r| RequestState {
            state: r.get(0),
            transactions: r.get(1),
            events: r.get(2),
            error: r.get(3),
            to: r.get::<_, String>(4).parse().unwrap_or(Lsn::ZERO),
        }))
    }

    /// Ends request `id`'s range at `to` (what the executing instance has acknowledged).
    pub async fn lower_to(&self, id: i64, to: Lsn) -> Result<(), SetupError> {
        self.client()
            .execute(
                &format!(
                    "UPDATE {}.replay_request SET to_lsn = $2::text::pg_lsn
                     WHERE id = $1 AND to_lsn > $2::text::pg_lsn",
                    self.schema
                ),
                &[&id, &to.to_string()],
            )
            .await
            .map_err(q("lowering the end of a replay request"))?;
        Ok(())
    }

    /// Marks the request failed whether or not it started (the process that
    /// executed it stops, or gave up).
    pub async fn fail(&self, id: i64, why: &str) -> Result<(), SetupError> {
        self.finish(id, &Outcome::Failed(why.to_string())).await
    }

    /// Withdraws a request nobody started yet; returns whether it was still pending.
    pub async fn cancel(&self, id: i64) -> Result<bool, SetupError> {
        let n = self
            .client()
            .execute(
                &format!(
                    "UPDATE {}.replay_request SET state = 'cancelled', finished_at = now()
                     WHERE id = $1 AND state = 'pending'",
                    self.schema
                ),
                &[&id],
            )
            .await
            .map_err(q("cancelling a replay request"))?;
        Ok(n == 1)
    }
}
