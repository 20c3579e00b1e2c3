//! Preflight checks and the slot and publication, over an ordinary SQL connection.
//!
//! Checks `wal_level`, the role's REPLICATION attribute and the outbox table,
//! creates the publication (`FOR TABLE .. WITH (publish = 'insert')`) and the
//! pgoutput slot when missing, and reads the slot's state. It does not stream
//! (see `replication`).

use tokio_postgres::{Client, NoTls};

use crate::config::{quote_ident, Config, TableName};
use crate::lsn::Lsn;

/// A problem found before streaming.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot connect to PostgreSQL: {}", redact(.0))]
    Connect(tokio_postgres::Error),
    #[error("query failed while {context}: {}", redact(.source))]
    Query {
        context: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("wal_level is {actual:?}, logical replication needs \"logical\"; run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL")]
    WalLevel { actual: String },
    #[error("role {role:?} lacks the REPLICATION attribute; run ALTER ROLE {role} REPLICATION; as a superuser")]
    NoReplication { role: String },
    #[error(
        "table \"{table}\" does not exist; create it with sql/001_outbox.sql or set outbox.table"
    )]
    NoTable { table: TableName },
    #[error("publication {name:?} does not exist and postgres.create_missing is false; run CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert');", quote_ident(.name), .table.quoted())]
    NoPublication { name: String, table: TableName },
    #[error("publication {name:?} does not include table \"{table}\"; run ALTER PUBLICATION {} ADD TABLE {};", quote_ident(.name), .table.quoted())]
    PublicationMissesTable { name: String, table: TableName },
    #[error("replication slot {name:?} does not exist and postgres.create_missing is false; run SELECT pg_create_logical_replication_slot('{name}', 'pgoutput');")]
    NoSlot { name: String },
    #[error("replication slot {name:?} uses plugin {plugin:?} (database {database:?}); the relay needs a pgoutput slot in database {expected_db:?}: use another slot name or drop it")]
    WrongSlot {
        name: String,
        plugin: String,
        database: String,
        expected_db: String,
    },
    #[error("replication slot {name:?} is lost (wal_status = lost): PostgreSQL removed WAL it still needed, so events committed while it was behind may be missing from Kafka; check the outbox table for rows not in Kafka, then drop and recreate the slot")]
    SlotLost { name: String },
}

/// Database errors print their own message, never the connection string.
fn redact(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {}: {}",
            db.severity().to_lowercase(),
            db.code().code(),
            db.message()
        ),
        None => e.to_string(),
    }
}

impl SetupError {
    /// Problems a restart cannot fix: the user must act.
    pub fn is_permanent(&self) -> bool {
        match self {
            SetupError::Connect(e) | SetupError::Query { source: e, .. } => {
                e.as_db_error().is_some_and(|db| {
                    let c = db.code().code();
                    c.starts_with("28") || c.starts_with("42") || c == "3D000"
                })
            }
            _ => true,
        }
    }
}

/// The slot's state as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Lsn,
    pub restart_lsn: Lsn,
    pub wal_status: Option<String>,
    pub active_pid: Option<i32>,
}

/// Opens a plain SQL connection (the connection task runs in the background).
pub async fn sql_connect(cfg: &tokio_postgres::Config) -> Result<Client, SetupError> {
    let (client, conn) = cfg.connect(NoTls).await.map_err(SetupError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %redact(&e), "SQL connection closed");
        }
    });
    Ok(client)
}

fn q(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    move |source| SetupError::Query { context, source }
}

fn parse_lsn(s: Option<String>) -> Lsn {
    s.and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO)
}

/// Checks the server and role, creates what is missing, and returns the slot's state.
pub async fn prepare(client: &Client, cfg: &Config) -> Result<SlotState, SetupError> {
    let table = cfg.table().expect("validated");
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel { actual: wal_level });
    }
    let row = client
        .query_one("SELECT current_user::text, rolreplication OR rolsuper, current_database()::text FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .map_err(q("reading the role's attributes"))?;
    let (role, can_replicate, database): (String, bool, String) =
        (row.get(0), row.get(1), row.get(2));
    if !can_replicate {
        return Err(SetupError::NoReplication { role });
    }
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
        .await
        .map_err(q("looking up the outbox table"))?
        .get(0);
    if !exists {
        return Err(SetupError::NoTable { table });
    }
    ensure_publication(client, cfg, &table).await?;
    ensure_slot(client, cfg, &database).await
}

async fn ensure_publication(
    client: &Client,
    cfg: &Config,
    table: &TableName,
) -> Result<(), SetupError> {
    let name = &cfg.postgres.publication;
    let found = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[name])
        .await
        .map_err(q("looking up the publication"))?;
    if found.is_none() {
        if !cfg.postgres.create_missing {
            return Err(SetupError::NoPublication {
                name: name.clone(),
                table: table.clone(),
            });
        }
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')",
            quote_ident(name),
            table.quoted()
        );
        match client.batch_execute(&sql).await {
            Ok(()) => tracing::info!(publication = %name, table = %table, "created publication"),
            // Another relay instance created it at the same moment.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
            Err(source) => {
                return Err(SetupError::Query {
                    context: "creating the publication",
                    source,
                })
            }
        }
    }
    let includes = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[name, &table.schema, &table.name],
        )
        .await
        .map_err(q("reading the publication's tables"))?;
    if includes.is_none() {
        return Err(SetupError::PublicationMissesTable {
            name: name.clone(),
            table: table.clone(),
        });
    }
    Ok(())
}

/// Reads the slot; `None` if it does not exist.
pub async fn slot_state(
    client: &Client,
    slot: &str,
) -> Result<Option<(SlotState, String, String)>, SetupError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text, restart_lsn::text, wal_status, active_pid
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(q("reading the replication slot"))?;
    Ok(row.map(|r| {
        let state = SlotState {
            confirmed_flush: parse_lsn(r.get(2)),
            restart_lsn: parse_lsn(r.get(3)),
            wal_status: r.get(4),
            active_pid: r.get(5),
        };
        (
            state,
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get::<_, Option<String>>(1).unwrap_or_default(),
        )
    }))
}

async fn ensure_slot(
    client: &Client,
    cfg: &Config,
    database: &str,
) -> Result<SlotState, SetupError> {
    let name = &cfg.postgres.slot;
    if slot_state(client, name).await?.is_none() {
        if !cfg.postgres.create_missing {
            return Err(SetupError::NoSlot { name: name.clone() });
        }
        match client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[name],
            )
            .await
        {
            Ok(row) => {
                tracing::info!(slot = %name, lsn = %row.get::<_, String>(0), "created replication slot")
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => {}
            Err(source) => {
                return Err(SetupError::Query {
                    context: "creating the replication slot",
                    source,
                })
            }
        }
    }
    let (state, plugin, db) = slot_state(client, name)
        .await?
        .ok_or_else(|| SetupError::NoSlot { name: name.clone() })?;
    if plugin != "pgoutput" || db != database {
        return Err(SetupError::WrongSlot {
            name: name.clone(),
            plugin,
            database: db,
            expected_db: database.to_string(),
        });
    }
    if state.wal_status.as_deref() == Some("lost") {
        return Err(SetupError::SlotLost { name: name.clone() });
    }
    Ok(state)
}
