//! Preflight checks and the slot and publication, over an ordinary SQL connection.
//!
//! Checks `wal_level`, the role's REPLICATION attribute and the outbox table,
//! creates the publication (`FOR TABLE .. WITH (publish = 'insert')`) and the
//! pgoutput slot when missing, reads the slot's state ([`slot_report`], also
//! for the metrics poller) and builds the DDL that `init` runs. It does not
//! stream (see `replication`) nor decide what the admin commands print (see
//! `admin`).

use tokio_postgres::{Client, NoTls};

use crate::config::{quote_ident, quote_literal, Config, TableName};
use crate::lsn::Lsn;
use crate::outbox::MappingError;
use crate::server::Server;
use crate::shard::Shard;
use crate::transport::{self, ConnectError, HostOutcome, PgTarget, ServerState};

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
    #[error("PostgreSQL {} is not supported; outbox-relay needs PostgreSQL 14 or later: upgrade the server or point postgres.url at one", crate::server::version_text(*.version_num))]
    TooOld { version_num: i32 },
    #[error("postgres.failover_slot = \"on\" needs PostgreSQL 17 or later (this server is {}); set it to \"auto\" or \"off\", and see the README's failover section for what a failover costs before 17", crate::server::version_text(*.version_num))]
    FailoverNeeds17 { version_num: i32 },
    #[error("postgres.url reaches a standby in recovery, and logical decoding on a standby needs PostgreSQL 16 or later (this server is {}); point postgres.url at the primary, or add target_session_attrs=read-write to it so the relay picks the primary of several hosts", crate::server::version_text(*.version_num))]
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
    #[error("shard.count = {count} needs PostgreSQL 15 or later for publication row filters (this server is {}); set shard.count = 1, or upgrade", crate::server::version_text(*.version_num))]
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
    #[error("the relay's state tables ({schema}.checkpoint, {schema}.replay_request) do not exist and postgres.create_missing is false; run `outbox-relay init` or apply sql/002_relay_state.sql")]
    NoState { schema: String },
    #[error("the relay's state tables ({schema}.checkpoint, {schema}.replay_request) do not exist and this role may not create schema {schema:?}; run `outbox-relay init` as a role with CREATE on the database, or apply sql/002_relay_state.sql and grant this role USAGE on the schema and SELECT, INSERT, UPDATE on its tables")]
    NoCreateState { schema: String },
    #[error("role {role_sql} may not use the relay's state tables in schema {schema:?}; as their owner run GRANT USAGE ON SCHEMA {} TO {role_sql}; GRANT SELECT, INSERT, UPDATE ON {0}.checkpoint, {0}.replay_request TO {role_sql}; GRANT USAGE ON SEQUENCE {0}.replay_request_id_seq TO {role_sql}; or set [checkpoint] schema to a schema of this role", quote_ident(.schema))]
    NoStatePrivileges { schema: String, role_sql: String },
}

/// A publication whose row filter is not what this shard needs.
#[derive(Debug, thiserror::Error)]
#[error("publication {name:?} {}; rows a filter passes over are never relayed: {}", match .found { Some(f) => format!("filters the rows of \"{table}\" with WHERE {f}"), None => format!("publishes every row of \"{table}\"") }, match .wanted { Some(w) => format!("shard {shard} needs WHERE ({w}); run ALTER PUBLICATION {} SET TABLE {} WHERE ({w});", quote_ident(.name), .table.quoted()), None => format!("run ALTER PUBLICATION {} SET TABLE {};", quote_ident(.name), .table.quoted()) })]
pub struct RowFilterMismatch {
    pub name: String,
    pub table: TableName,
    pub found: Option<String>,
    pub wanted: Option<String>,
    pub shard: Shard,
}

/// A slot of this database named after the same base slot, of another shard count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherShardSlot {
    pub name: String,
    /// Its layout's shard count.
    pub count: u32,
    pub active: bool,
    pub confirmed: Lsn,
}

fn others_layouts(others: &[OtherShardSlot]) -> String {
    let mut counts: Vec<String> = others
        .iter()
        .map(|o| format!("{}-shard", o.count))
        .collect();
    counts.dedup();
    counts.join(" and ")
}

/// How to change the shard count without losing or silently skipping events.
pub fn reshard_procedure(count: u32, others: &[OtherShardSlot]) -> String {
    let old = others.first().map_or(1, |o| o.count);
    format!(
        "To change the count: 1. run `outbox-relay init --all-shards` with shard.count = {count}: it creates the new slots and prints the LSN they start at; 2. keep the {old}-shard relays running until `outbox-relay status --all-shards` with shard.count = {old} shows every slot confirmed at or after that LSN; 3. stop them and drop their slots and publications (SELECT pg_drop_replication_slot(...); DROP PUBLICATION ...;); 4. start the {count}-shard relays (README, \"Sharding\")"
    )
}

/// Slots of this database named after `cfg`'s base slot whose shard count is not `cfg`'s.
pub async fn other_layouts(
    client: &Client,
    cfg: &Config,
) -> Result<Vec<OtherShardSlot>, SetupError> {
    let rows = client
        .query(
            "SELECT slot_name::text, active, confirmed_flush_lsn::text FROM pg_replication_slots
             WHERE slot_type = 'logical' AND database = current_database() ORDER BY 1",
            &[],
        )
        .await
        .map_err(q("reading the replication slots"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            let count = Shard::layout_of(&cfg.shard.base_slot, &name)?;
            (count != cfg.shard.count).then(|| OtherShardSlot {
                name,
                count,
                active: r.get(1),
                confirmed: parse_lsn(r.get(2)),
            })
        })
        .collect())
}

/// With slots of another shard count present: refuses to create this
/// layout's slot (the count changed), waits while an old relay streams, and
/// refuses to start a new shard before every old slot has confirmed up to
/// where the new one starts. `has_streamed`: this slot has a checkpoint (the
/// change of layout is over for it).
async fn check_layout(
    client: &Client,
    cfg: &Config,
    own: Option<&SlotState>,
) -> Result<(), SetupError> {
    let others = other_layouts(client, cfg).await?;
    if others.is_empty() {
        return Ok(());
    }
    let Some(own) = own else {
        return Err(SetupError::ShardCountChanged {
            count: cfg.shard.count,
            others,
        });
    };
    if let Some(o) = others.iter().find(|o| o.active) {
        return Err(SetupError::ReshardWaiting {
            count: cfg.shard.count,
            slot: o.clone(),
        });
    }
    if at_risk(client, cfg).await.is_none() {
        if let Some(o) = others.iter().find(|o| o.confirmed < own.confirmed_flush) {
            return Err(SetupError::ReshardGap {
                slot: o.clone(),
                start: own.confirmed_flush,
            });
        }
    }
    tracing::warn!(slots = ?others.iter().map(|o| &o.name).collect::<Vec<_>>(), "slots of another shard count are left over from a change of shard.count; drop them (SELECT pg_drop_replication_slot(...)) or they keep WAL on the server");
    Ok(())
}

/// What the relay's last checkpoint says about a slot that is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtRisk {
    /// Everything up to this commit end LSN reached the broker.
    pub acked: Lsn,
    /// When it was acknowledged (`created_at` of later rows is after it).
    pub acked_at: String,
    /// The server's WAL position now: the range at risk ends here.
    pub current: Lsn,
}

/// Which events may be missing when the slot is gone, and how to recover.
fn missing_slot_advice(at_risk: &Option<AtRisk>) -> String {
    let recover = "create a new slot with `outbox-relay init` (or set postgres.recreate_missing_slot = true to let the relay do it), then send the rows at risk again (README, \"Failover\": re-insert them in one transaction; consumers deduplicate on the id header)";
    match at_risk {
        Some(r) => format!(
            "events committed after LSN {} (the relay's last checkpoint, acknowledged at {}) up to {} may be missing from Kafka: rows with created_at at or after {}; {recover}",
            r.acked, r.acked_at, r.current, r.acked_at
        ),
        None => format!("events committed since its last confirmed position may be missing from Kafka (the relay stored no checkpoint to narrow that down); check the outbox table against Kafka, then {recover}"),
    }
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

/// The slot's state as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub confirmed_flush: Lsn,
    pub restart_lsn: Lsn,
    pub wal_status: Option<String>,
    pub active_pid: Option<i32>,
    /// [`prepare`] created the slot just now.
    pub created: bool,
    /// 17+: a failover slot (copied to standbys with `sync_replication_slots`).
    pub failover: Option<bool>,
    /// 17+, on a standby: a copy synchronized from the primary.
    pub synced: Option<bool>,
    /// 16+: invalidated by a recovery conflict (on a standby).
    pub conflicting: Option<bool>,
    /// 17+: why the slot was invalidated, if it was.
    pub invalidation_reason: Option<String>,
    /// 17+: since when no walsender has used the slot.
    pub inactive_since: Option<String>,
    /// The session must switch the slot's failover property to this value
    /// (`ALTER_REPLICATION_SLOT`, on the replication connection) before streaming.
    pub set_failover: Option<bool>,
}

impl SlotState {
    /// Why PostgreSQL can no longer decode from the slot, if it cannot.
    pub fn invalidated(&self) -> Option<String> {
        if let Some(r) = &self.invalidation_reason {
            return Some(format!("invalidation_reason = {r}"));
        }
        if self.conflicting == Some(true) {
            return Some("conflicting = true: a recovery conflict on this standby".into());
        }
        None
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
pub async fn prepare(
    client: &Client,
    cfg: &Config,
    first_session: bool,
) -> Result<(Server, SlotState), SetupError> {
    let (server, role, publication_created) = prepare_publication(client, cfg).await?;
    let may_create = !server.in_recovery
        && (cfg.postgres.recreate_missing_slot || (first_session && publication_created));
    let slot = ensure_slot(client, cfg, &server, &role.database, may_create).await?;
    Ok((server, slot))
}

/// The checks of [`prepare`] and the publication, without the slot (for a
/// temporary slot). Returns the server, the role and whether the publication was created.
pub async fn prepare_publication(
    client: &Client,
    cfg: &Config,
) -> Result<(Server, Role, bool), SetupError> {
    let table = cfg.table().expect("validated");
    let server = Server::read(client).await?;
    server.check_supported()?;
    server.check_standby()?;
    server.failover_slot(cfg.postgres.failover_slot)?;
    if cfg.shard.count > 1 && server.version_num < 150000 {
        return Err(SetupError::ShardingNeeds15 {
            count: cfg.shard.count,
            version_num: server.version_num,
        });
    }
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

/// `CREATE PUBLICATION` for the relay (inserts only), without `;`. A
/// partitioned table is published through its root: rows of every partition,
/// present and future, arrive as rows of the table itself. A shard's
/// publication passes only its rows (`row_filter`, see `shard`).
pub fn create_publication_sql(
    publication: &str,
    table: &TableName,
    partitioned: bool,
    row_filter: Option<&str>,
) -> String {
    format!(
        "CREATE PUBLICATION {} FOR TABLE {}{} WITH (publish = 'insert'{})",
        quote_ident(publication),
        table.quoted(),
        row_filter.map_or(String::new(), |f| format!(" WHERE ({f})")),
        if partitioned {
            ", publish_via_partition_root = true"
        } else {
            ""
        }
    )
}

/// This instance's row filter (`None` when not sharded).
pub fn row_filter(cfg: &Config) -> Option<String> {
    cfg.shard.shard().row_filter(&quote_ident(&cfg.outbox.key))
}

/// Creates the pgoutput slot, without `;`; a failover slot when `failover`
/// (the five-argument form exists from PostgreSQL 17 on).
pub fn create_slot_sql(slot: &str, failover: bool) -> String {
    if failover {
        format!(
            "SELECT pg_create_logical_replication_slot({}, 'pgoutput', false, false, true)",
            quote_literal(slot)
        )
    } else {
        format!(
            "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
            quote_literal(slot)
        )
    }
}

/// Creates the publication if missing; returns whether this call created it.
async fn ensure_publication(
    client: &Client,
    cfg: &Config,
    server: &Server,
    table: &TableName,
    partitioned: bool,
) -> Result<bool, SetupError> {
    let name = &cfg.postgres.publication;
    let found = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[name],
        )
        .await
        .map_err(q("looking up the publication"))?;
    let mut created = false;
    match found {
        Some(row) if partitioned && !row.get::<_, bool>(0) => {
            return Err(SetupError::NotViaRoot {
                name: name.clone(),
                table: table.clone(),
            })
        }
        Some(_) => {}
        None if server.in_recovery => {
            return Err(SetupError::NoPublicationOnStandby {
                name: name.clone(),
                table: table.clone(),
                partitioned,
            })
        }
        None if !cfg.postgres.create_missing => {
            return Err(SetupError::NoPublication {
                name: name.clone(),
                table: table.clone(),
            })
        }
        None => {
            let sql = create_publication_sql(name, table, partitioned, row_filter(cfg).as_deref());
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    created = true;
                    tracing::info!(publication = %name, table = %table, partitioned, "created publication")
                }
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
    }
    let rowfilter = if server.version_num >= 150000 {
        "rowfilter"
    } else {
        "NULL::text"
    };
    let Some(row) = client
        .query_opt(
            &format!("SELECT {rowfilter} FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3"),
            &[name, &table.schema, &table.name],
        )
        .await
        .map_err(q("reading the publication's tables"))?
    else {
        return Err(SetupError::PublicationMissesTable {
            name: name.clone(),
            table: table.clone(),
        });
    };
    check_row_filter(cfg, table, row.get(0))?;
    Ok(created)
}

/// A publication's row filter must be exactly what this shard needs: none
/// without sharding (a filter would drop rows silently), the shard's otherwise.
/// The server prints the filter in its own form: it is recognised by the
/// hash, the count and the index.
fn check_row_filter(
    cfg: &Config,
    table: &TableName,
    found: Option<String>,
) -> Result<(), SetupError> {
    let shard = cfg.shard.shard();
    let fits = match (&found, row_filter(cfg)) {
        (None, None) => true,
        (Some(f), Some(_)) => {
            f.contains("hashtext")
                && f.contains(&format!("% {})", shard.count))
                && f.contains(&format!("= {})", shard.index))
        }
        _ => false,
    };
    if fits {
        return Ok(());
    }
    Err(SetupError::RowFilter(Box::new(RowFilterMismatch {
        name: cfg.postgres.publication.clone(),
        table: table.clone(),
        found,
        wanted: row_filter(cfg),
        shard,
    })))
}

/// Reads the slot; `None` if it does not exist.
/// Without `server`, the columns of later versions read as `NULL`.
pub async fn slot_state(
    client: &Client,
    server: Option<&Server>,
    slot: &str,
) -> Result<Option<(SlotState, String, String)>, SetupError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text, restart_lsn::text, wal_status, active_pid, {}
                 FROM pg_replication_slots WHERE slot_name = $1",
                server.map_or(crate::server::NO_SLOT_COLUMNS, Server::slot_columns)
            ),
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
            created: false,
            failover: r.get(6),
            synced: r.get(7),
            conflicting: r.get(8),
            invalidation_reason: r.get(9),
            inactive_since: r.get(10),
            set_failover: None,
        };
        (
            state,
            r.get::<_, Option<String>>(0).unwrap_or_default(),
            r.get::<_, Option<String>>(1).unwrap_or_default(),
        )
    }))
}

/// What the relay's checkpoint says about a slot that is gone (`None` without
/// state tables or a checkpoint).
async fn at_risk(client: &Client, cfg: &Config) -> Option<AtRisk> {
    let row = client
        .query_opt(
            &format!(
                "SELECT acked_lsn::text, acked_at::text, {CURRENT_WAL_SQL} FROM {}.checkpoint WHERE slot_name = $1",
                quote_ident(&cfg.checkpoint.schema)
            ),
            &[&cfg.postgres.slot],
        )
        .await
        .ok()??;
    Some(AtRisk {
        acked: parse_lsn(row.get(0)),
        acked_at: row.get(1),
        current: parse_lsn(row.get(2)),
    })
}

async fn ensure_slot(
    client: &Client,
    cfg: &Config,
    server: &Server,
    database: &str,
    may_create: bool,
) -> Result<SlotState, SetupError> {
    let name = &cfg.postgres.slot;
    let failover = server.failover_slot(cfg.postgres.failover_slot)?;
    let mut created = false;
    let existing = slot_state(client, Some(server), name).await?;
    check_layout(client, cfg, existing.as_ref().map(|(s, _, _)| s)).await?;
    if existing.is_none() {
        if !cfg.postgres.create_missing {
            return Err(SetupError::NoSlot {
                name: name.clone(),
                failover,
            });
        }
        if !may_create {
            // Another instance may have created the publication a moment ago and be
            // creating the slot now: give it a few seconds before calling the slot lost.
            for _ in 0..10 {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                if slot_state(client, Some(server), name).await?.is_some() {
                    return Box::pin(ensure_slot(client, cfg, server, database, false)).await;
                }
            }
            return Err(SetupError::SlotMissing {
                name: name.clone(),
                at_risk: at_risk(client, cfg).await,
            });
        }
        if cfg.postgres.recreate_missing_slot {
            tracing::warn!(slot = %name, "creating a missing replication slot (postgres.recreate_missing_slot): events committed while it was missing are not relayed");
        }
        let sql = if failover {
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
        } else {
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
        };
        match client.query_one(sql, &[name]).await {
            Ok(row) => {
                created = true;
                tracing::info!(slot = %name, lsn = %row.get::<_, String>(0), failover, "created replication slot")
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
    let (state, plugin, db) = slot_state(client, Some(server), name)
        .await?
        .ok_or_else(|| SetupError::NoSlot {
            name: name.clone(),
            failover,
        })?;
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
    if let Some(reason) = state.invalidated() {
        return Err(SetupError::SlotInvalidated {
            name: name.clone(),
            reason,
        });
    }
    if server.in_recovery && state.synced == Some(true) {
        return Err(SetupError::SlotSynced { name: name.clone() });
    }
    let set_failover =
        (server.has_failover_slots() && !server.in_recovery && state.failover != Some(failover))
            .then_some(failover);
    Ok(SlotState {
        created,
        set_failover,
        ..state
    })
}

/// The server's WAL position: `pg_current_wal_lsn()`, or on a standby the last replayed position.
const CURRENT_WAL_SQL: &str = "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";

/// A slot's progress, for `status` and the metrics poller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotReport {
    pub slot: String,
    /// A walsender streams from the slot right now.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Everything before it was confirmed; `0/0` if the server reports none.
    pub confirmed_flush: Lsn,
    /// Oldest WAL the slot still needs; `0/0` once the slot is lost.
    pub restart_lsn: Lsn,
    /// The server's WAL position when the report was read.
    pub current_wal: Lsn,
    /// `current_wal - restart_lsn`: WAL kept on disk for this slot (0 if `restart_lsn` is unknown).
    pub retained_wal_bytes: u64,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

impl SlotReport {
    /// Bytes of WAL written since the confirmed position (0 if there is none).
    pub fn lag_bytes(&self) -> u64 {
        if self.confirmed_flush.is_zero() {
            0
        } else {
            self.current_wal.bytes_since(self.confirmed_flush)
        }
    }
}

/// Reads the slot and the server's WAL position in one query; `None` if the slot does not exist.
pub async fn slot_report(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotReport>, SetupError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, wal_status, {CURRENT_WAL_SQL}
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&slot],
        )
        .await
        .map_err(q("reading the replication slot"))?;
    Ok(row.map(|r| {
        let restart_lsn = parse_lsn(r.get(3));
        let current_wal = parse_lsn(r.get(5));
        SlotReport {
            slot: slot.to_string(),
            active: r.get(0),
            active_pid: r.get(1),
            confirmed_flush: parse_lsn(r.get(2)),
            restart_lsn,
            current_wal,
            retained_wal_bytes: if restart_lsn.is_zero() {
                0
            } else {
                current_wal.bytes_since(restart_lsn)
            },
            wal_status: r.get(4),
        }
    }))
}

/// The server's WAL position (see [`SlotReport::current_wal`]).
pub async fn current_wal(client: &Client) -> Result<Lsn, SetupError> {
    let row = client
        .query_one(&format!("SELECT {CURRENT_WAL_SQL}"), &[])
        .await
        .map_err(q("reading the current WAL position"))?;
    Ok(parse_lsn(row.get(0)))
}

/// The tables (`schema.table`) a publication publishes; `None` if it does not exist.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Option<Vec<String>>, SetupError> {
    let rows = client
        .query(
            "SELECT t.schemaname::text || '.' || t.tablename::text
             FROM pg_publication p LEFT JOIN pg_publication_tables t ON t.pubname = p.pubname
             WHERE p.pubname = $1 ORDER BY 1",
            &[&publication],
        )
        .await
        .map_err(q("reading the publication's tables"))?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(schema: &str, name: &str) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn create_table_sql_is_the_shipped_statement_on_one_line_under_the_configured_name() {
        let code: String = OUTBOX_SQL
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect();
        assert_eq!(
            code.matches("public.outbox").count(),
            1,
            "sql/001_outbox.sql must name the table exactly once"
        );
        let sql = create_table_sql(&table("app", "Events \"v2\""));
        assert!(
            sql.starts_with(r#"CREATE TABLE IF NOT EXISTS "app"."Events ""v2""" (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregate_type text NOT NULL,"#),
            "{sql}"
        );
        assert!(
            sql.ends_with("created_at timestamptz NOT NULL DEFAULT now())"),
            "{sql}"
        );
        assert!(!sql.contains('\n') && !sql.contains("--") && !sql.contains(';'));
        assert!(!sql.contains("public.outbox"));
    }

    #[test]
    fn shipped_columns_are_parsed_from_the_sql() {
        assert_eq!(
            outbox_sql_columns(),
            [
                "id",
                "aggregate_type",
                "aggregate_id",
                "event_type",
                "payload",
                "headers",
                "created_at"
            ]
        );
    }

    #[test]
    fn publication_and_slot_statements_quote_names() {
        assert_eq!(
            create_publication_sql("outbox_relay", &table("public", "outbox"), false, None),
            r#"CREATE PUBLICATION "outbox_relay" FOR TABLE "public"."outbox" WITH (publish = 'insert')"#
        );
        assert_eq!(
            create_publication_sql("outbox_relay", &table("app", "Events"), true, Some("k = 1")),
            r#"CREATE PUBLICATION "outbox_relay" FOR TABLE "app"."Events" WHERE (k = 1) WITH (publish = 'insert', publish_via_partition_root = true)"#
        );
        assert_eq!(
            create_slot_sql("outbox_relay", false),
            "SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')"
        );
        assert_eq!(
            create_slot_sql("o'r", true),
            "SELECT pg_create_logical_replication_slot('o''r', 'pgoutput', false, false, true)"
        );
    }

    #[test]
    fn failed_checks_say_what_to_change() {
        let msg = wal_level_ok("replica".into()).unwrap_err().to_string();
        assert!(msg.starts_with("wal_level is \"replica\""), "{msg}");
        assert!(
            msg.contains("run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"),
            "{msg}"
        );
        assert!(wal_level_ok("logical".into()).is_ok());

        let cases: Vec<(SetupError, &str)> = vec![
            (
                SetupError::NoReplication { role: "user".into(), role_sql: "\"user\"".into() },
                "role \"user\" lacks the REPLICATION attribute; run ALTER ROLE \"user\" REPLICATION; as a superuser",
            ),
            (
                SetupError::NoCapacity { setting: "max_replication_slots", max: 0, in_use: 0 },
                "max_replication_slots is 0, logical replication needs at least 1; run ALTER SYSTEM SET max_replication_slots = 10; and restart PostgreSQL",
            ),
            (
                SetupError::NoCapacity { setting: "max_replication_slots", max: 4, in_use: 4 },
                "max_replication_slots is 4 and 4 in use, none left for the relay; drop an unused slot (see pg_replication_slots) or run ALTER SYSTEM SET max_replication_slots = 5; and restart PostgreSQL",
            ),
            (
                SetupError::NoCapacity { setting: "max_wal_senders", max: 2, in_use: 2 },
                "end an unused replication connection (see pg_stat_replication) or run ALTER SYSTEM SET max_wal_senders = 3;",
            ),
            (
                SetupError::NoSelect { role: "relay".into(), role_sql: "relay".into(), table: table("public", "outbox") },
                "role \"relay\" lacks SELECT on table \"public.outbox\"; run GRANT SELECT ON \"public\".\"outbox\" TO relay; as the table's owner",
            ),
            (
                SetupError::NoSchema { table: table("app", "outbox") },
                "schema \"app\" of table \"app.outbox\" does not exist; run CREATE SCHEMA \"app\"; or set outbox.table",
            ),
            (
                SetupError::NoCreateOnSchema { role: "relay".into(), role_sql: "relay".into(), table: table("app", "outbox") },
                "run GRANT CREATE ON SCHEMA \"app\" TO relay;",
            ),
            (
                SetupError::NoCreateOnDatabase { role: "relay".into(), role_sql: "relay".into(), database: "app".into(), database_sql: "app".into(), publication: "p".into() },
                "run GRANT CREATE ON DATABASE app TO relay;",
            ),
            (
                SetupError::NotTableOwner { role_sql: "relay".into(), table: table("public", "outbox"), owner_sql: "app".into(), publication: "p".into() },
                "run ALTER TABLE \"public\".\"outbox\" OWNER TO relay; or run CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert'); as app",
            ),
            (
                SetupError::PublicationNoInsert { name: "p".into() },
                "publication \"p\" does not publish inserts; run ALTER PUBLICATION \"p\" SET (publish = 'insert');",
            ),
        ];
        for (err, expected) in cases {
            let msg = err.to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
            assert!(!msg.ends_with('.'), "{msg}");
            assert!(err.is_permanent());
        }
    }

    #[test]
    fn lag_is_measured_from_the_confirmed_position() {
        let mut r = SlotReport {
            slot: "s".into(),
            active: false,
            active_pid: None,
            confirmed_flush: Lsn(100),
            restart_lsn: Lsn(40),
            current_wal: Lsn(160),
            retained_wal_bytes: 120,
            wal_status: Some("reserved".into()),
        };
        assert_eq!(r.lag_bytes(), 60);
        r.confirmed_flush = Lsn::ZERO;
        assert_eq!(r.lag_bytes(), 0);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["current_wal"], "0/A0");
        assert_eq!(json["retained_wal_bytes"], 120);
    }
}
