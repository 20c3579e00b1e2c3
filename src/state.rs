//! The relay's own tables: the checkpoint (acknowledged position per slot) and
//! replay requests, in the `[checkpoint] schema` (`sql/002_relay_state.sql`).
//!
//! Plain SQL over its own connection; none of these tables is in the
//! publication, so writing them never feeds back into the stream. It does not
//! decide when to write (see `relay`) nor what `replay` prints (see `admin`).

use std::time::SystemTime;

use tokio_postgres::Client;

use crate::config::{quote_ident, Config};
use crate::lsn::Lsn;
use crate::setup::{q, SetupError};

mod store;

pub use store::StateStore;

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
