//! What `init` reads from the server before deciding anything: the role, the
//! server, the table, the publication, the slot and the relay's own schema.

use tokio_postgres::Client;

use super::*;

/// What `init` found on the server; everything [`plan`] needs.
#[derive(Debug, Clone)]
pub struct Facts {
    pub server: Server,
    pub wal_level: String,
    pub max_replication_slots: i64,
    pub slots_in_use: i64,
    pub max_wal_senders: i64,
    pub wal_senders_in_use: i64,
    pub role: Role,
    pub table: TableFacts,
    /// `None` if the publication does not exist.
    pub publication: Option<PublicationFacts>,
    /// `None` if the slot does not exist.
    pub slot: Option<SlotFacts>,
    pub state: StateFacts,
    /// Slots of the same base name with another shard count.
    pub other_layouts: Vec<OtherShardSlot>,
}

/// The relay's own tables (`[checkpoint] schema`).
#[derive(Debug, Clone)]
pub struct StateFacts {
    pub exists: bool,
    /// The role may read and write them (if they exist).
    pub usable: bool,
    /// The role may create what is missing (CREATE on the database, or on the existing schema).
    pub may_create: bool,
    pub schema_exists: bool,
}

#[derive(Debug, Clone)]
pub enum TableFacts {
    Exists {
        /// The owner's name as SQL.
        owner_sql: String,
        /// The role is (a member of) the owner, or a superuser.
        owned: bool,
        select: bool,
        /// A partitioned table (published through its root).
        partitioned: bool,
        columns: Vec<Column>,
    },
    Missing {
        schema_exists: bool,
        create_on_schema: bool,
    },
}

#[derive(Debug, Clone)]
pub struct PublicationFacts {
    pub includes_table: bool,
    pub publishes_insert: bool,
    /// `publish_via_partition_root`.
    pub via_root: bool,
}

#[derive(Debug, Clone)]
pub struct SlotFacts {
    pub plugin: String,
    pub database: String,
    pub active: bool,
    pub wal_status: Option<String>,
    /// 17+: a failover slot.
    pub failover: Option<bool>,
    /// 17+, on a standby: synchronized from the primary.
    pub synced: Option<bool>,
    /// Why PostgreSQL can no longer decode from it (conflict, ...).
    pub invalidated: Option<String>,
}

/// Reads everything `init` checks.
pub async fn inspect(client: &Client, cfg: &Config) -> Result<Facts, SetupError> {
    let table = cfg.table().clone();
    let server = Server::read(client).await?;
    let settings = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int8,
                    (SELECT count(*) FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int8,
                    (SELECT count(*) FROM pg_stat_replication)",
            &[],
        )
        .await
        .map_err(q("reading the server's settings"))?;
    let role = setup::read_role(client).await?;
    let found = client
        .query_opt(
            "SELECT c.oid, quote_ident(pg_get_userbyid(c.relowner)),
                    pg_has_role(c.relowner, 'USAGE'), has_table_privilege(c.oid, 'SELECT'),
                    c.relkind = 'p'
             FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .map_err(q("looking up the outbox table"))?;
    let table_facts = match found {
        Some(row) => {
            let oid: u32 = row.get(0);
            let columns = crate::setup::table_columns(client, oid).await?;
            TableFacts::Exists {
                owner_sql: row.get(1),
                owned: row.get::<_, bool>(2) || role.superuser,
                select: row.get(3),
                partitioned: row.get(4),
                columns,
            }
        }
        None => {
            let schema = client
                .query_opt(
                    "SELECT has_schema_privilege(oid, 'CREATE') FROM pg_namespace WHERE nspname = $1",
                    &[&table.schema],
                )
                .await
                .map_err(q("looking up the outbox table's schema"))?;
            TableFacts::Missing {
                schema_exists: schema.is_some(),
                create_on_schema: schema.is_some_and(|r| r.get(0)),
            }
        }
    };
    let publication = client
        .query_opt(
            "SELECT p.pubinsert, EXISTS (SELECT 1 FROM pg_publication_tables t
                 WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3),
                    p.pubviaroot
             FROM pg_publication p WHERE p.pubname = $1",
            &[&cfg.postgres.publication, &table.schema, &table.name],
        )
        .await
        .map_err(q("looking up the publication"))?
        .map(|r| PublicationFacts {
            publishes_insert: r.get(0),
            includes_table: r.get(1),
            via_root: r.get(2),
        });
    let slot = setup::slot_state(client, Some(&server), &cfg.postgres.slot)
        .await?
        .map(|(state, plugin, database)| SlotFacts {
            plugin,
            database,
            active: state.active_pid.is_some(),
            invalidated: state.invalidated(),
            wal_status: state.wal_status,
            failover: state.failover,
            synced: state.synced,
        });
    let schema = &cfg.checkpoint.schema;
    let row = client
        .query_one(
            "SELECT COALESCE((SELECT has_schema_privilege(oid, 'CREATE') FROM pg_namespace WHERE nspname = $1),
                             has_database_privilege(current_database(), 'CREATE')),
                    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[schema],
        )
        .await
        .map_err(q("checking privileges for the relay's state tables"))?;
    let privileges = crate::state::privileges(client, schema).await?;
    let state = StateFacts {
        exists: privileges.is_some(),
        usable: privileges.unwrap_or(false),
        may_create: row.get(0),
        schema_exists: row.get(1),
    };
    let other_layouts = setup::other_layouts(client, cfg).await?;
    Ok(Facts {
        other_layouts,
        server,
        state,
        wal_level: settings.get(0),
        max_replication_slots: settings.get(1),
        slots_in_use: settings.get(2),
        max_wal_senders: settings.get(3),
        wal_senders_in_use: settings.get(4),
        role,
        table: table_facts,
        publication,
        slot,
    })
}
