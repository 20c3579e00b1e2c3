//! The relay's own tables: the checkpoint (acknowledged position per slot) and
//! replay requests, in the `[checkpoint] schema` (`sql/002_relay_state.sql`).
//!
//! Plain SQL over its own connection; none of these tables is in the
//! publication, so writing them never feeds back into the stream. It does not
//! decide when to write (see `relay`) nor what `replay` prints (see `admin`).

use std::borrow::Borrow;
use std::time::SystemTime;

use tokio_postgres::Client;

use crate::config::{quote_ident, Config};
use crate::lsn::Lsn;
use crate::setup::{q, SetupError};

/// How often a replay request is started before it counts as failed.
pub const MAX_ATTEMPTS: i32 = 3;

/// `sql/002_relay_state.sql`, as shipped (schema `outbox_relay`).
pub const STATE_SQL: &str = include_str!("../sql/002_relay_state.sql");

/// The statements of `sql/002_relay_state.sql` for `schema`, one line each, without `;`.
pub fn state_sql(schema: &str) -> Vec<String> {
    let code: Vec<&str> = STATE_SQL
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect();
    code.join(" ")
        .split(';')
        .map(|s| {
            s.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace("( ", "(")
                .replace(" )", ")")
                .replace("outbox_relay", &quote_ident(schema))
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// The acknowledged position stored for a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Everything up to here was acknowledged by Kafka (a commit end LSN).
    pub acked: Lsn,
    pub acked_at: SystemTime,
    /// Where the relay keeps the slot for `[replay] window` (None without a window).
    pub window_start: Option<(Lsn, SystemTime)>,
    /// Acknowledged positions over time that the window moves along (oldest first).
    pub window_samples: Vec<(SystemTime, Lsn)>,
}

/// `[[unix ms, "X/X"], ...]`, the form of `checkpoint.window_samples`.
fn samples_json(samples: &[(SystemTime, Lsn)]) -> serde_json::Value {
    samples
        .iter()
        .map(|(t, l)| {
            let ms = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            serde_json::json!([ms, l.to_string()])
        })
        .collect()
}

fn samples_of(v: Option<serde_json::Value>) -> Vec<(SystemTime, Lsn)> {
    let Some(serde_json::Value::Array(items)) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| {
            let ms = i.get(0)?.as_u64()?;
            let lsn = i.get(1)?.as_str()?.parse().ok()?;
            Some((
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                lsn,
            ))
        })
        .collect()
}

/// A replay the relay executes: transactions whose commit end LSN is in `(from, to]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayJob {
    pub id: i64,
    pub from: Lsn,
    pub to: Lsn,
    pub only_topic: Option<String>,
    pub topic_suffix: Option<String>,
}

/// A replay request's row, as `replay` reports it.
#[derive(Debug, Clone)]
pub struct RequestState {
    pub state: String,
    /// The range's end: lowered by the executing instance to what it had acknowledged.
    pub to: Lsn,
    pub transactions: Option<i64>,
    pub events: Option<i64>,
    pub error: Option<String>,
}

/// How a replay ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Done { transactions: u64, events: u64 },
    Failed(String),
}

/// Whether both tables exist (looked up in the catalog: a role without USAGE
/// on the schema still learns that they exist).
pub async fn exists(client: &Client, schema: &str) -> Result<bool, SetupError> {
    Ok(privileges(client, schema).await?.is_some())
}

/// `None` if the tables are missing, else whether this role may use them
/// (USAGE on the schema, SELECT, INSERT and UPDATE on both tables).
pub async fn privileges(client: &Client, schema: &str) -> Result<Option<bool>, SetupError> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE c.relkind = 'r') = 2,
                    COALESCE(bool_and(has_schema_privilege(n.oid, 'USAGE')
                        AND CASE c.relkind
                            WHEN 'S' THEN has_sequence_privilege(c.oid, 'USAGE')
                            ELSE has_table_privilege(c.oid, 'SELECT')
                                 AND has_table_privilege(c.oid, 'INSERT')
                                 AND has_table_privilege(c.oid, 'UPDATE')
                        END), false)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1
               AND c.relname IN ('checkpoint', 'replay_request', 'replay_request_id_seq')",
            &[&schema],
        )
        .await
        .map_err(q("looking up the relay's state tables"))?;
    Ok(row.get::<_, bool>(0).then(|| row.get(1)))
}

/// Makes sure the tables exist: creates them with `postgres.create_missing`,
/// otherwise says to run `init`.
pub async fn ensure(client: &Client, cfg: &Config) -> Result<(), SetupError> {
    let schema = &cfg.checkpoint.schema;
    match privileges(client, schema).await? {
        Some(true) => return Ok(()),
        Some(false) => {
            return Err(SetupError::NoStatePrivileges {
                schema: schema.clone(),
                role_sql: crate::setup::read_role(client).await?.name_sql,
            })
        }
        None => {}
    }
    if !cfg.postgres.create_missing {
        return Err(SetupError::NoState {
            schema: schema.clone(),
        });
    }
    // IF NOT EXISTS still races on the catalog's unique indexes when another
    // instance creates the same objects at the same moment: one more pass then.
    for attempt in 0..2 {
        match create_state(client, schema).await {
            Ok(()) => break,
            Err(e)
                if e.as_db_error()
                    .is_some_and(|db| db.code().code() == "42501") =>
            {
                return Err(SetupError::NoCreateState {
                    schema: schema.clone(),
                })
            }
            Err(_) if attempt == 0 => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(_) if exists(client, schema).await? => break,
            Err(e) => return Err(q("creating the relay's state tables")(e)),
        }
    }
    tracing::info!(schema = %schema, "created the relay's state tables");
    Ok(())
}

async fn create_state(client: &Client, schema: &str) -> Result<(), tokio_postgres::Error> {
    for stmt in state_sql_for(client, schema).await? {
        client.batch_execute(&stmt).await?;
    }
    Ok(())
}

/// [`state_sql`] without `CREATE SCHEMA` when the schema exists: PostgreSQL
/// checks CREATE on the database before IF NOT EXISTS, and a role may own an
/// existing schema without that privilege.
pub fn state_sql_to_create(schema: &str, schema_exists: bool) -> Vec<String> {
    state_sql(schema)
        .into_iter()
        .filter(|s| !(schema_exists && s.starts_with("CREATE SCHEMA")))
        .collect()
}

/// [`state_sql_to_create`], asking the server whether the schema exists.
async fn state_sql_for(
    client: &Client,
    schema: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await?
        .get(0);
    Ok(state_sql_to_create(schema, exists))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_samples_round_trip_through_json() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_000_000_123);
        let samples = vec![(t, Lsn(0x1_0000_0028)), (t, Lsn(7))];
        let json = samples_json(&samples);
        assert_eq!(json[0], serde_json::json!([1_764_000_000_123u64, "1/28"]));
        assert_eq!(samples_of(Some(json)), samples);
        assert!(samples_of(Some(serde_json::json!({"not": "a list"}))).is_empty());
    }

    #[test]
    fn shipped_sql_splits_into_statements_under_the_configured_schema() {
        let stmts = state_sql("relay state");
        assert_eq!(stmts.len(), 3, "{stmts:#?}");
        assert_eq!(stmts[0], "CREATE SCHEMA IF NOT EXISTS \"relay state\"");
        assert!(stmts[1].starts_with("CREATE TABLE IF NOT EXISTS \"relay state\".checkpoint ("));
        assert!(stmts[2].contains("\"relay state\".replay_request"));
        assert!(stmts.iter().all(|s| !s.contains(';') && !s.contains("--")));
    }
}
