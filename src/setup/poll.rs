//! What polling needs from the outbox table, read from the catalog
//! ([`TableInfo::read`]), and the checks over it ([`checks`], pure): the order
//! column (an integer from a sequence with CACHE 1), a unique index on it
//! (partial on the unsent rows with `after_send = "mark"`), the sent column,
//! the NOTIFY trigger, and the role's privileges. `run` refuses to poll while
//! one fails; `init` prints the same checks and creates what is missing.
//! [`PollError`]: what polling cannot work with, or the row it stopped at
//! (what it means is decided in `relay::policy`).

use tokio_postgres::Client;

use crate::config::{quote_ident, quote_literal, AfterSend, Config, PollConfig, TableName};
use crate::outbox::MappingError;
use crate::pgoutput::{Column, Relation};
use crate::setup::{q, SetupError};

/// What polling cannot work with, or the row it stopped at.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{what} reads the WAL through a replication slot, which source.kind = \"poll\" does not use; run it with a config of source.kind = \"wal\"")]
    WalOnly { what: &'static str },
    #[error("postgres.url reaches a standby in recovery: polling deletes or marks the rows it sent, which needs the primary; point postgres.url at the primary, or add target_session_attrs=read-write to a multi-host URL")]
    NotPrimary,
    #[error("role {role_sql} lacks {privileges} on table \"{table}\", which polling needs (read the rows, then remove or mark them); run GRANT {privileges} ON {} TO {role_sql}; as the table's owner", .table.quoted())]
    NoPrivilege {
        table: TableName,
        privileges: String,
        role_sql: String,
    },
    #[error("poll.order_column {column:?} of table \"{table}\" is not an integer (smallint, integer, bigint); name an integer column assigned from a sequence, or a new name for `outbox-relay init` to add as an identity column")]
    OrderColumnType { table: TableName, column: String },
    #[error("sequence {sequence} behind poll.order_column caches {cache} values per session, so values are not taken in insert order across sessions and per-key order could break; run ALTER SEQUENCE {sequence} CACHE 1;")]
    SequenceCache { sequence: String, cache: i64 },
    #[error("poll.sent_column {column:?} of table \"{table}\" is not a timestamptz (or timestamp); name another column for `outbox-relay init` to add, or change its type")]
    SentColumnType { table: TableName, column: String },
    #[error("no unique index on column {column:?} of table \"{table}\": with duplicate values, removing a sent row could remove an unsent one; run {sql};")]
    NotUnique {
        table: TableName,
        column: String,
        sql: String,
    },
    #[error("role {role_sql} cannot {what}: table \"{table}\" is owned by {owner_sql}; run `outbox-relay init` as {owner_sql} (or a superuser)")]
    NotOwner {
        table: TableName,
        owner_sql: String,
        role_sql: String,
        what: String,
    },
    #[error("the {what} polling needs is missing on table \"{table}\" and the relay never alters the table itself; run `outbox-relay init` (--dry-run prints the SQL), or as the table's owner: {sql};")]
    Missing {
        table: TableName,
        what: String,
        sql: String,
    },
    /// Another instance polls this table: stand by.
    #[error("another instance polls table \"{table}\" (it holds the leader lock{})", .pid.map(|p| format!(", backend pid {p}")).unwrap_or_default())]
    LockHeld { table: TableName, pid: Option<i32> },
    #[error("{source}; it has {column} = {value}: it and every row after it stay in the table; fix or delete the row (or set outbox.on_invalid = \"dead_letter\") and start again")]
    BadRow {
        column: String,
        value: i64,
        source: MappingError,
    },
}

impl PollError {
    /// The `kind` label of `outbox_relay_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            PollError::LockHeld { .. } => "lock_held",
            PollError::BadRow { .. } => "invalid_row",
            _ => "setup",
        }
    }
}

/// Type OIDs of the integer types an order column may have.
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
/// Type OIDs a sent column may have.
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;

/// The outbox table as polling sees it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    /// The owner's name as SQL.
    pub owner_sql: String,
    /// The connected role is (a member of) the owner, or a superuser.
    pub owned: bool,
    /// Every column, in `attnum` order (dropped ones left out).
    pub columns: Vec<Column>,
    pub select: bool,
    pub delete: bool,
    pub update: bool,
    /// The order column's sequence (identity or serial) as SQL, and its CACHE.
    pub sequence: Option<(String, i64)>,
    /// Valid btree indexes whose only key column is the order column.
    pub indexes: Vec<IndexInfo>,
    /// The NOTIFY trigger `init` creates exists on the table.
    pub trigger: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexInfo {
    pub unique: bool,
    /// A partial index.
    pub partial: bool,
    /// Its predicate is `<poll.sent_column> IS NULL` (the unsent rows).
    pub on_unsent: bool,
}

/// The trigger `init` creates for `poll.notify`.
pub const TRIGGER: &str = "outbox_relay_poll_notify";

impl TableInfo {
    /// `None` when the table does not exist.
    pub async fn read(client: &Client, cfg: &Config) -> Result<Option<TableInfo>, SetupError> {
        let table = cfg.table().clone();
        let p = &cfg.poll;
        let Some(row) = client
            .query_opt(
                "SELECT c.oid, quote_ident(pg_get_userbyid(c.relowner)),
                        pg_has_role(c.relowner, 'USAGE')
                          OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                        has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'DELETE'),
                        has_table_privilege(c.oid, 'UPDATE'),
                        EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = $2),
                        CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                                            AND a.attname = $3 AND NOT a.attisdropped)
                             THEN pg_get_serial_sequence($1, $3) END
                 FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&table.quoted(), &TRIGGER, &p.order_column],
            )
            .await
            .map_err(q("looking up the outbox table"))?
        else {
            return Ok(None);
        };
        let oid: u32 = row.get(0);
        let columns = crate::setup::table_columns(client, oid).await?;
        let sequence = match row.get::<_, Option<String>>(7) {
            Some(seq) => {
                let cache: i64 = client
                    .query_one(
                        "SELECT seqcache FROM pg_sequence WHERE seqrelid = $1::text::regclass",
                        &[&seq],
                    )
                    .await
                    .map_err(q("reading the order column's sequence"))?
                    .get(0);
                Some((seq, cache))
            }
            None => None,
        };
        let indexes = client
            .query(
                "SELECT i.indisunique, i.indpred IS NOT NULL,
                        COALESCE(pg_get_expr(i.indpred, i.indrelid) = '(' || quote_ident($3) || ' IS NULL)', false)
                 FROM pg_index i
                 JOIN pg_class ic ON ic.oid = i.indexrelid
                 JOIN pg_am am ON am.oid = ic.relam
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = $1 AND i.indisvalid AND am.amname = 'btree'
                   AND i.indnkeyatts = 1 AND a.attname = $2",
                &[&oid, &p.order_column, &p.sent_column],
            )
            .await
            .map_err(q("reading the outbox table's indexes"))?
            .iter()
            .map(|r| IndexInfo {
                unique: r.get(0),
                partial: r.get(1),
                on_unsent: r.get(2),
            })
            .collect();
        Ok(Some(TableInfo {
            oid,
            owner_sql: row.get(1),
            owned: row.get(2),
            select: row.get(3),
            delete: row.get(4),
            update: row.get(5),
            trigger: row.get(6),
            sequence,
            indexes,
            columns,
        }))
    }

    /// The table as a `Relation`, so rows map exactly as in the WAL mode.
    pub fn relation(&self, table: &TableName) -> Relation {
        Relation {
            id: self.oid,
            namespace: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: b'd',
            columns: self.columns.clone(),
        }
    }

    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The index name `init` gives: `<table>_<order column>_poll`, at most 63 bytes.
fn index_name(table: &TableName, p: &PollConfig) -> String {
    let suffix = format!("_{}_poll", p.order_column);
    let mut name = table.name.clone();
    while name.len() + suffix.len() > 63 {
        name.pop();
    }
    name + &suffix
}

/// `CREATE UNIQUE INDEX` on the order column (partial on the unsent rows with `mark`).
pub fn create_index_sql(table: &TableName, p: &PollConfig) -> String {
    let mut sql = format!(
        "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})",
        quote_ident(&index_name(table, p)),
        table.quoted(),
        quote_ident(&p.order_column)
    );
    if p.after_send == AfterSend::Mark {
        sql.push_str(&format!(" WHERE {} IS NULL", quote_ident(&p.sent_column)));
    }
    sql
}

pub fn add_order_column_sql(table: &TableName, p: &PollConfig) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} bigint GENERATED ALWAYS AS IDENTITY",
        table.quoted(),
        quote_ident(&p.order_column)
    )
}

pub fn add_sent_column_sql(table: &TableName, p: &PollConfig) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} timestamptz",
        table.quoted(),
        quote_ident(&p.sent_column)
    )
}

/// The NOTIFY function (in the table's schema) and the statement trigger, one statement each.
pub fn notify_sql(table: &TableName) -> Vec<String> {
    let function = format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident("outbox_relay_poll_notify")
    );
    vec![
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $f$BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END$f$"
        ),
        format!(
            "CREATE OR REPLACE TRIGGER {} AFTER INSERT ON {} FOR EACH STATEMENT EXECUTE FUNCTION {function}({})",
            quote_ident(TRIGGER),
            table.quoted(),
            quote_literal(&PollConfig::channel(table))
        ),
    ]
}

/// One check's outcome.
#[derive(Debug)]
pub enum Check {
    /// Fine; the text says what was found.
    Ok(String),
    /// Missing; these statements (one line each, no `;`) create it.
    Create(Vec<String>),
    /// Works, with a caveat the text names.
    Warn(String),
    /// The user must change something first.
    Problem(PollError),
}

/// The checks of polling `table` as `role_sql`, labelled. `info` is `None`
/// when the table does not exist yet (`init` creates it from the shipped
/// SQL with `columns`).
pub fn checks(info: Option<&TableInfo>, cfg: &Config, role_sql: &str) -> Vec<(String, Check)> {
    let table = cfg.table().clone();
    let p = &cfg.poll;
    let mut out = Vec::new();
    let label = |what: &str, name: &str| format!("{what} {name}");
    let Some(info) = info else {
        // A table init creates gets every column below.
        out.push((
            label("order column", &p.order_column),
            Check::Create(vec![add_order_column_sql(&table, p)]),
        ));
        if p.after_send == AfterSend::Mark {
            out.push((
                label("sent column", &p.sent_column),
                Check::Create(vec![add_sent_column_sql(&table, p)]),
            ));
        }
        out.push((
            "index".into(),
            Check::Create(vec![create_index_sql(&table, p)]),
        ));
        if p.notify {
            out.push(("notify trigger".into(), Check::Create(notify_sql(&table))));
        }
        return out;
    };
    let not_owner = |what: &str| {
        Check::Problem(PollError::NotOwner {
            table: table.clone(),
            owner_sql: info.owner_sql.clone(),
            role_sql: role_sql.to_string(),
            what: what.to_string(),
        })
    };
    let (privilege, granted) = match p.after_send {
        AfterSend::Delete => ("DELETE", info.delete),
        AfterSend::Mark => ("UPDATE", info.update),
    };
    out.push((
        "privileges".into(),
        if info.select && granted {
            Check::Ok(format!("SELECT, {privilege}"))
        } else {
            Check::Problem(PollError::NoPrivilege {
                table: table.clone(),
                privileges: format!("SELECT, {privilege}"),
                role_sql: role_sql.to_string(),
            })
        },
    ));
    let order = info.column(&p.order_column);
    out.push((
        label("order column", &p.order_column),
        match order {
            None if info.owned => Check::Create(vec![add_order_column_sql(&table, p)]),
            None => not_owner("add the order column"),
            Some(c) if ![INT2, INT4, INT8].contains(&c.type_oid) => {
                Check::Problem(PollError::OrderColumnType {
                    table: table.clone(),
                    column: c.name.clone(),
                })
            }
            Some(_) => match &info.sequence {
                Some((_, 1)) => Check::Ok("from a sequence with CACHE 1".into()),
                Some((seq, cache)) => Check::Problem(PollError::SequenceCache {
                    sequence: seq.clone(),
                    cache: *cache,
                }),
                None => Check::Warn(format!(
                    "no sequence behind it: the application must assign increasing values at insert (per-key order relies on it; see docs/polling.md); an identity column is safer: {}",
                    add_order_column_sql(&table, p)
                )),
            },
        },
    ));
    if p.after_send == AfterSend::Mark {
        out.push((
            label("sent column", &p.sent_column),
            match info.column(&p.sent_column) {
                None if info.owned => Check::Create(vec![add_sent_column_sql(&table, p)]),
                None => not_owner("add the sent column"),
                Some(c) if ![TIMESTAMP, TIMESTAMPTZ].contains(&c.type_oid) => {
                    Check::Problem(PollError::SentColumnType {
                        table: table.clone(),
                        column: c.name.clone(),
                    })
                }
                Some(_) => Check::Ok("timestamptz".into()),
            },
        ));
    }
    let mark = p.after_send == AfterSend::Mark;
    // The poll's scan: on all rows (delete), or on the unsent ones (mark).
    let scan = info
        .indexes
        .iter()
        .find(|i| if mark { i.on_unsent } else { !i.partial });
    // No two rows (two unsent rows, with mark) share an order value.
    let unique = info
        .indexes
        .iter()
        .any(|i| i.unique && (!i.partial || (mark && i.on_unsent)));
    out.push((
        "index".into(),
        match (scan, unique) {
            (Some(_), true) if mark => Check::Ok(format!(
                "on {} of the unsent rows ({} IS NULL), unique",
                p.order_column, p.sent_column
            )),
            (Some(_), true) => Check::Ok(format!("unique, on {}", p.order_column)),
            (Some(_), false) => Check::Problem(PollError::NotUnique {
                table: table.clone(),
                column: p.order_column.clone(),
                sql: create_index_sql(&table, p),
            }),
            (None, _) if info.owned || order.is_none() => {
                Check::Create(vec![create_index_sql(&table, p)])
            }
            (None, _) => not_owner("create the index"),
        },
    ));
    if p.notify {
        out.push((
            "notify trigger".into(),
            match info.trigger {
                true => Check::Ok(format!(
                    "{TRIGGER} notifies {}",
                    PollConfig::channel(&table)
                )),
                false if info.owned => Check::Create(notify_sql(&table)),
                false => not_owner("create the NOTIFY trigger"),
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests;
