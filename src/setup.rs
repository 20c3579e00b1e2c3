//! Preflight checks and the slot and publication, over an ordinary SQL connection.
//!
//! Checks `wal_level`, the role's REPLICATION attribute and the outbox table,
//! creates the publication (`FOR TABLE .. WITH (publish = 'insert')`) and the
//! pgoutput slot when missing, reads the slot's state ([`slot_report`], also
//! for the metrics poller) and builds the DDL that `init` runs. It does not
//! stream (see `replication`) nor decide what the admin commands print (see
//! `admin`).
//!
//! Here: the errors, the connection (`target_session_attrs` across hosts),
//! the role and server checks, and [`prepare`]. In `publication` the
//! publication, in `slot` the slot, in `shards` the checks of a sharded layout.

use tokio_postgres::{Client, NoTls};

use crate::config::{quote_ident, quote_literal, Config, TableName};
use crate::lsn::Lsn;
use crate::outbox::MappingError;
use crate::transport::{self, ConnectError, HostOutcome, PgTarget, ServerState};
use server::Server;

pub mod poll;
mod publication;
pub mod server;
mod shards;
mod slot;

use publication::ensure_publication;
pub use publication::{create_publication_sql, publication_tables};
use shards::{check_layout, check_row_filter, others_layouts};
pub use shards::{other_layouts, reshard_procedure, row_filter, OtherShardSlot, RowFilterMismatch};
pub use slot::{
    create_slot_sql, current_wal, slot_report, slot_state, AtRisk, SlotReport, SlotState,
};
use slot::{ensure_slot, missing_slot_advice};

/// `sql/001_outbox.sql`, the outbox table as shipped (named `public.outbox`).
pub const OUTBOX_SQL: &str = include_str!("../sql/001_outbox.sql");

/// A problem found before streaming.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot connect to PostgreSQL: {}", redact(.0))]
    Connect(tokio_postgres::Error),
    /// No stream: the server is unreachable, or TLS failed.
    #[error(transparent)]
    Transport(ConnectError),
    #[error("query failed while {context}: {}", redact(.source))]
    Query {
        context: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("wal_level is {actual:?}, logical replication needs \"logical\"; run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL")]
    WalLevel { actual: String },
    /// `role_sql` is the role name as SQL (quoted by the server where needed).
    #[error("role {role:?} lacks the REPLICATION attribute; run ALTER ROLE {role_sql} REPLICATION; as a superuser")]
    NoReplication { role: String, role_sql: String },
    #[error(
        "table \"{table}\" does not exist; create it with sql/001_outbox.sql or set outbox.table"
    )]
    NoTable { table: TableName },
    #[error("publication {name:?} does not exist and postgres.create_missing is false; run CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert');", quote_ident(.name), .table.quoted())]
    NoPublication { name: String, table: TableName },
    #[error("publication {name:?} does not include table \"{table}\"; run ALTER PUBLICATION {} ADD TABLE {};", quote_ident(.name), .table.quoted())]
    PublicationMissesTable { name: String, table: TableName },
    #[error("replication slot {name:?} does not exist and postgres.create_missing is false; run {};", create_slot_sql(.name, *.failover))]
    NoSlot { name: String, failover: bool },
    #[error("replication slot {name:?} is missing but its publication exists: the slot was dropped or lost, or this server was promoted from a standby that had no copy of it (PostgreSQL 16 and older keep logical slots on the primary only; on 17 and later use a failover slot, postgres.failover_slot); {}", missing_slot_advice(.at_risk))]
    SlotMissing {
        name: String,
        /// What the relay's checkpoint says was acknowledged last, if anything.
        at_risk: Option<AtRisk>,
    },
    #[error("replication slot {name:?} does not exist on this standby, and the relay never creates a slot on a standby by itself; run `outbox-relay init` against the standby to create it (it waits for a running-transactions record from the primary: run SELECT pg_log_standby_snapshot(); there)")]
    NoSlotOnStandby { name: String },
    #[error("PostgreSQL {} is not supported; outbox-relay needs PostgreSQL 14 or later: upgrade the server or point postgres.url at one", crate::setup::server::version_text(*.version_num))]
    TooOld { version_num: i32 },
    #[error("postgres.failover_slot = \"on\" needs PostgreSQL 17 or later (this server is {}); set it to \"auto\" or \"off\", and see the README's failover section for what a failover costs before 17", crate::setup::server::version_text(*.version_num))]
    FailoverNeeds17 { version_num: i32 },
    #[error("postgres.url reaches a standby in recovery, and logical decoding on a standby needs PostgreSQL 16 or later (this server is {}); point postgres.url at the primary, or add target_session_attrs=read-write to it so the relay picks the primary of several hosts", crate::setup::server::version_text(*.version_num))]
    StandbyNeeds16 { version_num: i32 },
    #[error("postgres.url reaches a standby with hot_standby_feedback = off: the primary would remove rows the slot still needs and PostgreSQL would invalidate the slot; run ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf(); on the standby, or point postgres.url at the primary")]
    NoHotStandbyFeedback,
    /// A failover slot copied to a standby that is not promoted yet: retried.
    #[error("replication slot {name:?} on this server is a copy synchronized from the primary (synced = true), and this server is still a standby; waiting until it is promoted or postgres.url reaches the primary (add target_session_attrs=read-write to a multi-host postgres.url to follow the primary)")]
    SlotSynced { name: String },
    #[error("replication slot {name:?} was invalidated ({reason}): PostgreSQL can no longer decode changes from it, so events committed since its last confirmed position may be missing from Kafka; check the outbox table for rows not in Kafka, then run SELECT pg_drop_replication_slot({}); and `outbox-relay init` to create a new slot", quote_literal(.name))]
    SlotInvalidated { name: String, reason: String },
    #[error("publication {name:?} does not exist, and this server is a standby where it cannot be created; run CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert'{}); on the primary (or `outbox-relay init` against the primary)", quote_ident(.name), .table.quoted(), if *.partitioned { ", publish_via_partition_root = true" } else { "" })]
    NoPublicationOnStandby {
        name: String,
        table: TableName,
        partitioned: bool,
    },
    #[error(transparent)]
    RowFilter(Box<RowFilterMismatch>),
    #[error("shard.count = {count} needs PostgreSQL 15 or later for publication row filters (this server is {}); set shard.count = 1, or upgrade", crate::setup::server::version_text(*.version_num))]
    ShardingNeeds15 { count: u32, version_num: i32 },
    #[error("shard.count is {count}, but the slots of this database are of a {} layout ({}); the relay does not create a new set of slots by itself, which could skip or repeat events. {}", others_layouts(.others), .others.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", "), reshard_procedure(*.count, .others))]
    ShardCountChanged {
        count: u32,
        others: Vec<OtherShardSlot>,
    },
    /// The new layout's relay waits while one of the old layout streams: retried.
    #[error("slot {} of the {}-shard layout is still streaming to a relay; this {count}-shard relay waits until the old relays are stopped (README, \"Sharding\")", .slot.name, .slot.count)]
    ReshardWaiting { count: u32, slot: OtherShardSlot },
    #[error("slot {} of the {}-shard layout confirmed only up to {} and this shard's slot starts at {start}: events committed in between would be skipped; start the {}-shard relays again until `outbox-relay status` shows their confirmed_flush_lsn at or after {start}, stop them, then drop their slots (README, \"Sharding\")", .slot.name, .slot.count, .slot.confirmed, .slot.count)]
    ReshardGap { slot: OtherShardSlot, start: Lsn },
    #[error("table \"{table}\" is partitioned and publication {name:?} publishes its partitions under their own names; run ALTER PUBLICATION {} SET (publish_via_partition_root = true); so rows arrive as rows of \"{table}\" and partitions added later are included", quote_ident(.name))]
    NotViaRoot { name: String, table: TableName },
    #[error("replication slot {name:?} uses plugin {plugin:?} (database {database:?}); the relay needs a pgoutput slot in database {expected_db:?}: use another slot name or drop it")]
    WrongSlot {
        name: String,
        plugin: String,
        database: String,
        expected_db: String,
    },
    #[error("replication slot {name:?} is lost (wal_status = lost): {}", lost_slot_advice(.name))]
    SlotLost { name: String },
    /// `max_replication_slots` or `max_wal_senders` leaves nothing for the relay.
    #[error("{}", capacity_message(.setting, *.max, *.in_use))]
    NoCapacity {
        setting: &'static str,
        max: i64,
        in_use: i64,
    },
    #[error("role {role:?} lacks SELECT on table \"{table}\"; run GRANT SELECT ON {} TO {role_sql}; as the table's owner", .table.quoted())]
    NoSelect {
        role: String,
        role_sql: String,
        table: TableName,
    },
    #[error("schema {:?} of table \"{table}\" does not exist; run CREATE SCHEMA {}; or set outbox.table", schema_of(.table), schema_sql(.table))]
    NoSchema { table: TableName },
    #[error("table \"{table}\" does not exist and role {role:?} may not create tables in schema {:?}; run GRANT CREATE ON SCHEMA {} TO {role_sql}; or create the table with sql/001_outbox.sql as the schema's owner", schema_of(.table), schema_sql(.table))]
    NoCreateOnSchema {
        role: String,
        role_sql: String,
        table: TableName,
    },
    #[error("publication {publication:?} does not exist and role {role:?} may not create publications in database {database:?}; run GRANT CREATE ON DATABASE {database_sql} TO {role_sql}; or create the publication as a superuser")]
    NoCreateOnDatabase {
        role: String,
        role_sql: String,
        database: String,
        database_sql: String,
        publication: String,
    },
    #[error("publication {publication:?} does not exist and only the owner of table \"{table}\" ({owner_sql}) or a superuser may create it; run ALTER TABLE {} OWNER TO {role_sql}; or run CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert'); as {owner_sql}", .table.quoted(), quote_ident(.publication), .table.quoted())]
    NotTableOwner {
        role_sql: String,
        table: TableName,
        /// The owner's name as SQL (quoted by the server where needed).
        owner_sql: String,
        publication: String,
    },
    #[error("publication {name:?} does not publish inserts; run ALTER PUBLICATION {} SET (publish = 'insert');", quote_ident(.name))]
    PublicationNoInsert { name: String },
    /// The configured columns do not match the table (or the table `init` would create).
    #[error(transparent)]
    Columns(MappingError),
    /// What polling needs from the table (`source.kind = "poll"`).
    #[error(transparent)]
    Poll(Box<poll::PollError>),
    #[error("the relay's state tables ({schema}.checkpoint, {schema}.replay_request) do not exist and postgres.create_missing is false; run `outbox-relay init` or apply sql/002_relay_state.sql")]
    NoState { schema: String },
    #[error("the relay's state tables ({schema}.checkpoint, {schema}.replay_request) do not exist and this role may not create schema {schema:?}; run `outbox-relay init` as a role with CREATE on the database, or apply sql/002_relay_state.sql and grant this role USAGE on the schema and SELECT, INSERT, UPDATE on its tables")]
    NoCreateState { schema: String },
    #[error("role {role_sql} may not use the relay's state tables in schema {schema:?}; as their owner run GRANT USAGE ON SCHEMA {} TO {role_sql}; GRANT SELECT, INSERT, UPDATE ON {0}.checkpoint, {0}.replay_request TO {role_sql}; GRANT USAGE ON SEQUENCE {0}.replay_request_id_seq TO {role_sql}; or set [checkpoint] schema to a schema of this role", quote_ident(.schema))]
    NoStatePrivileges { schema: String, role_sql: String },
}

/// What a lost (invalidated) slot means and how to recover; also said when the
/// server reports the invalidation on the replication connection.
pub fn lost_slot_advice(slot: &str) -> String {
    format!(
        "PostgreSQL removed WAL the slot still needed (max_slot_wal_keep_size), so events committed while it was behind may be missing from Kafka; check the outbox table for rows not in Kafka, then run SELECT pg_drop_replication_slot({}); and `outbox-relay init` to create a new slot, and raise max_slot_wal_keep_size",
        quote_literal(slot)
    )
}

fn schema_of(t: &TableName) -> &str {
    &t.schema
}

fn schema_sql(t: &TableName) -> String {
    quote_ident(&t.schema)
}

/// Explains a setting that leaves no slot or walsender for the relay, and how to raise it.
fn capacity_message(setting: &str, max: i64, in_use: i64) -> String {
    if max <= 0 {
        return format!("{setting} is {max}, logical replication needs at least 1; run ALTER SYSTEM SET {setting} = 10; and restart PostgreSQL");
    }
    let free = if setting == "max_replication_slots" {
        "drop an unused slot (see pg_replication_slots)"
    } else {
        "end an unused replication connection (see pg_stat_replication)"
    };
    format!(
        "{setting} is {max} and {in_use} in use, none left for the relay; {free} or run ALTER SYSTEM SET {setting} = {}; and restart PostgreSQL",
        in_use.max(max) + 1
    )
}

/// Database errors print their own message, others their cause (an I/O error,
/// "connection refused"); never the connection string.
fn redact(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => {
            let mut s = format!(
                "{} {}: {}",
                db.severity().to_lowercase(),
                db.code().code(),
                db.message()
            );
            if let Some(hint) = transport::refusal_hint(db.code().code(), db.message()) {
                s.push_str("; ");
                s.push_str(hint);
            }
            s
        }
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

impl From<ConnectError> for SetupError {
    fn from(e: ConnectError) -> Self {
        SetupError::Transport(e)
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
            SetupError::Transport(e) => e.is_permanent(),
            SetupError::SlotSynced { .. } | SetupError::ReshardWaiting { .. } => false,
            _ => true,
        }
    }
}

/// Opens an SQL connection over the same kind of stream as the replication
/// connection (`transport`: socket and TLS per `sslmode`); the connection task
/// runs in the background.
pub async fn sql_connect(target: &PgTarget) -> Result<Client, SetupError> {
    transport::connect_any(target, |stream| async move {
        // TLS, if any, is already in place: tokio-postgres's own sslmode is disable.
        match target.config.connect_raw(stream, NoTls).await {
            Ok((client, conn)) => {
                let state = ServerState::from_parameters(
                    conn.parameter("in_hot_standby"),
                    conn.parameter("default_transaction_read_only"),
                );
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %redact(&e), "SQL connection closed");
                    }
                });
                HostOutcome::Connected(client, state)
            }
            Err(e) => {
                let e = SetupError::Connect(e);
                if e.is_permanent() {
                    HostOutcome::Fail(e)
                } else {
                    HostOutcome::Next(e)
                }
            }
        }
    })
    .await
}

pub(crate) fn q(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SetupError {
    move |source| SetupError::Query { context, source }
}

fn parse_lsn(s: Option<String>) -> Lsn {
    s.and_then(|s| s.parse().ok()).unwrap_or(Lsn::ZERO)
}

/// The connected role, as far as the checks need it.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    /// The name as SQL: `quote_ident(current_user)`.
    pub name_sql: String,
    pub replication: bool,
    pub superuser: bool,
    pub database: String,
    /// The database name as SQL: `quote_ident(current_database())`.
    pub database_sql: String,
    /// CREATE on the current database (needed to create a publication).
    pub create_on_database: bool,
}

impl Role {
    /// The REPLICATION check (superusers may replicate without the attribute).
    pub fn check_replication(&self) -> Result<(), SetupError> {
        if self.replication || self.superuser {
            Ok(())
        } else {
            Err(SetupError::NoReplication {
                role: self.name.clone(),
                role_sql: self.name_sql.clone(),
            })
        }
    }
}

/// Reads `wal_level` and fails unless it is `logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SetupError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q("reading wal_level"))?
        .get(0);
    wal_level_ok(wal_level)
}

/// `Ok` for `logical`, else the error that says how to change it.
pub fn wal_level_ok(actual: String) -> Result<(), SetupError> {
    if actual == "logical" {
        Ok(())
    } else {
        Err(SetupError::WalLevel { actual })
    }
}

/// Reads the connected role's attributes and database privileges.
pub async fn read_role(client: &Client) -> Result<Role, SetupError> {
    let row = client
        .query_one(
            "SELECT current_user::text, quote_ident(current_user), rolreplication, rolsuper,
                    current_database()::text, quote_ident(current_database()),
                    has_database_privilege(current_database(), 'CREATE')
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q("reading the role's attributes"))?;
    Ok(Role {
        name: row.get(0),
        name_sql: row.get(1),
        replication: row.get(2),
        superuser: row.get(3),
        database: row.get(4),
        database_sql: row.get(5),
        create_on_database: row.get(6),
    })
}

/// Checks the server and role, creates what is missing, and returns the
/// server and the slot's state.
///
/// The slot is created only on a first run, when this call also created the
/// publication (or with `postgres.recreate_missing_slot`). A missing slot next to
/// an existing publication means the slot was dropped or lost, or the server was
/// promoted from a standby without a copy of it, and creating a new one would
/// silently skip every event committed since: that is an error. On a standby
/// the relay never creates the slot itself (`init` does).
/// `first_session` is false once this process has streamed from the slot.
///
/// `created_publication`: this process created the publication (in this or
/// an earlier attempt that failed before the slot existed, e.g. with all
/// replication slots in use); set here when it does. Only then, before the
/// first session streamed, is a missing slot created rather than called lost.
pub async fn prepare(
    client: &Client,
    cfg: &Config,
    first_session: bool,
    created_publication: &mut bool,
) -> Result<(Server, SlotState), SetupError> {
    let (server, role, publication_created) = prepare_publication(client, cfg).await?;
    *created_publication |= publication_created;
    let may_create = !server.in_recovery
        && (cfg.postgres.recreate_missing_slot || (first_session && *created_publication));
    let slot = ensure_slot(client, cfg, &server, &role.database, may_create).await?;
    Ok((server, slot))
}

/// The checks of [`prepare`] and the publication, without the slot (for a
/// temporary slot). Returns the server, the role and whether the publication was created.
pub async fn prepare_publication(
    client: &Client,
    cfg: &Config,
) -> Result<(Server, Role, bool), SetupError> {
    let table = cfg.table().clone();
    let server = Server::read(client).await?;
    server.check(cfg)?;
    check_wal_level(client).await?;
    let role = read_role(client).await?;
    role.check_replication()?;
    let Some(partitioned) = table_kind(client, &table).await? else {
        return Err(SetupError::NoTable { table });
    };
    let created = ensure_publication(client, cfg, &server, &table, partitioned).await?;
    Ok((server, role, created))
}

/// `Some(partitioned)` if the table exists.
pub async fn table_kind(client: &Client, table: &TableName) -> Result<Option<bool>, SetupError> {
    Ok(client
        .query_opt(
            "SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .map_err(q("looking up the outbox table"))?
        .map(|r| r.get(0)))
}

/// `CREATE TABLE IF NOT EXISTS` of `sql/001_outbox.sql` for `table`, on one line, without `;`.
/// The columns of the table `oid`, in order, as pgoutput would describe them.
pub async fn table_columns(
    client: &Client,
    oid: u32,
) -> Result<Vec<crate::pgoutput::Column>, SetupError> {
    Ok(client
        .query(
            "SELECT attname::text, atttypid, atttypmod FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(q("reading the outbox table's columns"))?
        .iter()
        .map(|r| crate::pgoutput::Column {
            is_key: false,
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
        })
        .collect())
}

pub fn create_table_sql(table: &TableName) -> String {
    outbox_sql_one_line().replacen("public.outbox", &table.quoted(), 1)
}

/// The columns `sql/001_outbox.sql` creates, in order.
pub fn outbox_sql_columns() -> Vec<String> {
    let sql = outbox_sql_one_line();
    let body = &sql[sql.find('(').map_or(0, |i| i + 1)..sql.rfind(')').unwrap_or(sql.len())];
    body.split(',')
        .filter_map(|def| def.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The shipped statement without comments, whitespace collapsed, without the `;`.
fn outbox_sql_one_line() -> String {
    let code: Vec<&str> = OUTBOX_SQL
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect();
    code.join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("( ", "(")
        .replace(" )", ")")
        .trim_end_matches(';')
        .to_string()
}

#[cfg(test)]
mod tests;
