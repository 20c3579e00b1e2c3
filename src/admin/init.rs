//! `init`: reads what exists on the server ([`inspect`]), decides per item
//! whether it is fine, missing or a problem ([`plan`], pure), and creates what
//! is missing only when no check failed.

use std::io::Write;

use tokio_postgres::Client;

use crate::config::{Config, SourceKind, TableName};
use crate::outbox::OutboxTable;
use crate::pgoutput::{Column, Relation};
use crate::setup::server::Server;
use crate::setup::{self, q, OtherShardSlot, Role, SetupError};

mod inspect;

pub use inspect::{inspect, Facts, PublicationFacts, SlotFacts, StateFacts, TableFacts};

/// One line of `init`'s output.
#[derive(Debug)]
pub struct Item {
    pub label: String,
    pub state: ItemState,
}

#[derive(Debug)]
pub enum ItemState {
    /// Fine as it is; the text says what was found.
    Ok(String),
    /// Missing; this statement (one line, no `;`) creates it.
    Create(String),
    /// Works, but is not safe in a case the text names (a failover).
    Warn(String),
    /// The user must change something first.
    Problem(SetupError),
}

/// Decides, per item, whether it is fine, to be created, or a problem (and which).
pub fn plan(f: &Facts, cfg: &Config) -> Vec<Item> {
    use ItemState::{Create, Problem};
    let table = cfg.table().clone();
    let role = &f.role;
    let item = |label: String, state| Item { label, state };
    let mut items = Vec::new();
    let server = &f.server;
    items.push(item(
        "server".into(),
        match server.check(cfg) {
            Err(e) => Problem(e),
            Ok(()) => ItemState::Ok(format!(
                "PostgreSQL {}, {}",
                server.version(),
                if server.in_recovery {
                    "standby"
                } else {
                    "primary"
                }
            )),
        },
    ));
    // Only meaningful once the version is supported.
    let failover = server
        .failover_slot(cfg.postgres.failover_slot)
        .unwrap_or(false);

    items.push(item(
        "wal_level".into(),
        match setup::wal_level_ok(f.wal_level.clone()) {
            Ok(()) => ItemState::Ok(f.wal_level.clone()),
            Err(e) => Problem(e),
        },
    ));
    // An existing slot already counts as used; an active one already has its walsender.
    let capacity = |setting: &'static str, max: i64, in_use: i64, need: i64| {
        if max <= 0 || in_use + need > max {
            Problem(SetupError::NoCapacity {
                setting,
                max,
                in_use,
            })
        } else {
            ItemState::Ok(format!("{max}, {in_use} in use"))
        }
    };
    items.push(item(
        "max_replication_slots".into(),
        capacity(
            "max_replication_slots",
            f.max_replication_slots,
            f.slots_in_use,
            i64::from(f.slot.is_none()),
        ),
    ));
    items.push(item(
        "max_wal_senders".into(),
        capacity(
            "max_wal_senders",
            f.max_wal_senders,
            f.wal_senders_in_use,
            i64::from(!f.slot.as_ref().is_some_and(|s| s.active)),
        ),
    ));
    items.push(item(
        format!("role {}", role.name),
        match role.check_replication() {
            Err(e) => Problem(e),
            Ok(()) if role.superuser => ItemState::Ok("superuser".into()),
            Ok(()) => ItemState::Ok("REPLICATION".into()),
        },
    ));

    let partitioned = matches!(
        f.table,
        TableFacts::Exists {
            partitioned: true,
            ..
        }
    );
    let (table_state, columns) = match &f.table {
        TableFacts::Exists {
            select, columns, ..
        } => {
            let state = if *select {
                ItemState::Ok(
                    if partitioned {
                        "exists, partitioned"
                    } else {
                        "exists"
                    }
                    .into(),
                )
            } else {
                Problem(SetupError::NoSelect {
                    role: role.name.clone(),
                    role_sql: role.name_sql.clone(),
                    table: table.clone(),
                })
            };
            (state, columns.clone())
        }
        TableFacts::Missing {
            schema_exists,
            create_on_schema,
        } => {
            let state = if !schema_exists {
                Problem(SetupError::NoSchema {
                    table: table.clone(),
                })
            } else if server.in_recovery {
                // Read-only: the table comes from the primary.
                Problem(SetupError::NoTable {
                    table: table.clone(),
                })
            } else if !create_on_schema && !role.superuser {
                Problem(SetupError::NoCreateOnSchema {
                    role: role.name.clone(),
                    role_sql: role.name_sql.clone(),
                    table: table.clone(),
                })
            } else {
                Create(setup::create_table_sql(&table))
            };
            let shipped = setup::outbox_sql_columns()
                .into_iter()
                .map(|name| Column {
                    is_key: false,
                    name,
                    type_oid: 0,
                    type_modifier: -1,
                })
                .collect();
            (state, shipped)
        }
    };
    items.push(item(format!("table {table}"), table_state));
    items.push(item("columns".into(), check_columns(cfg, &table, columns)));

    let publication = &cfg.postgres.publication;
    items.push(item(
        format!("publication {publication}"),
        match (&f.publication, &f.table) {
            (Some(p), _) if partitioned && !p.via_root => Problem(SetupError::NotViaRoot {
                name: publication.clone(),
                table: table.clone(),
            }),
            (Some(p), _) if !p.includes_table => Problem(SetupError::PublicationMissesTable {
                name: publication.clone(),
                table: table.clone(),
            }),
            (Some(p), _) if !p.publishes_insert => Problem(SetupError::PublicationNoInsert {
                name: publication.clone(),
            }),
            (Some(_), _) if partitioned => ItemState::Ok(format!(
                "publishes inserts of {table} and its partitions as {table}"
            )),
            (Some(_), _) => ItemState::Ok(format!("publishes inserts of {table}")),
            (None, _) if server.in_recovery => Problem(SetupError::NoPublicationOnStandby {
                name: publication.clone(),
                table: table.clone(),
                partitioned,
            }),
            (None, _) if !role.create_on_database && !role.superuser => {
                Problem(SetupError::NoCreateOnDatabase {
                    role: role.name.clone(),
                    role_sql: role.name_sql.clone(),
                    database: role.database.clone(),
                    database_sql: role.database_sql.clone(),
                    publication: publication.clone(),
                })
            }
            (
                None,
                TableFacts::Exists {
                    owned: false,
                    owner_sql,
                    ..
                },
            ) => Problem(SetupError::NotTableOwner {
                role_sql: role.name_sql.clone(),
                table: table.clone(),
                owner_sql: owner_sql.clone(),
                publication: publication.clone(),
            }),
            (None, _) => Create(setup::create_publication_sql(
                publication,
                &table,
                partitioned,
                setup::row_filter(cfg).as_deref(),
            )),
        },
    ));

    let slot = &cfg.postgres.slot;
    items.push(item(
        format!("slot {slot}"),
        match &f.slot {
            Some(s) if s.plugin != "pgoutput" || s.database != role.database => {
                Problem(SetupError::WrongSlot {
                    name: slot.clone(),
                    plugin: s.plugin.clone(),
                    database: s.database.clone(),
                    expected_db: role.database.clone(),
                })
            }
            Some(s) if s.wal_status.as_deref() == Some("lost") => {
                Problem(SetupError::SlotLost { name: slot.clone() })
            }
            Some(s) if s.invalidated.is_some() => Problem(SetupError::SlotInvalidated {
                name: slot.clone(),
                reason: s.invalidated.clone().unwrap_or_default(),
            }),
            Some(s) => ItemState::Ok(format!(
                "pgoutput, {}{}",
                if s.active { "active" } else { "inactive" },
                match (s.failover, s.synced) {
                    (_, Some(true)) => ", synchronized from the primary",
                    (Some(true), _) => ", failover",
                    (Some(false), _) if failover =>
                        ", not a failover slot yet (the relay switches it on start)",
                    _ => "",
                }
            )),
            None => Create(setup::create_slot_sql(slot, failover)),
        },
    ));
    if !server.in_recovery {
        let slot_failover = f.slot.as_ref().and_then(|s| s.failover).unwrap_or(failover);
        items.push(item(
            "failover".into(),
            match server.failover_safety(slot, slot_failover || failover) {
                Ok(text) => ItemState::Ok(text),
                Err(text) => ItemState::Warn(text),
            },
        ));
    }

    if !f.other_layouts.is_empty() {
        items.push(item(
            "shard layout".into(),
            ItemState::Warn(format!(
                "slots of another shard count exist ({}); a missing slot of the {}-shard set is created beside them. {}",
                f.other_layouts
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                cfg.shard.count,
                setup::reshard_procedure(cfg.shard.count, &f.other_layouts)
            )),
        ));
    }
    let schema = &cfg.checkpoint.schema;
    items.push(item(
        format!("state tables {schema}"),
        if f.state.exists && (f.state.usable || role.superuser) {
            ItemState::Ok("checkpoint, replay_request".into())
        } else if server.in_recovery {
            ItemState::Ok("not used when decoding on a standby (read-only)".into())
        } else if f.state.exists {
            Problem(SetupError::NoStatePrivileges {
                schema: schema.clone(),
                role_sql: role.name_sql.clone(),
            })
        } else if !f.state.may_create && !role.superuser {
            Problem(SetupError::NoCreateState {
                schema: schema.clone(),
            })
        } else {
            Create(crate::state::state_sql_to_create(schema, f.state.schema_exists).join(";\n"))
        },
    ));
    items
}

/// The configured columns, resolved exactly as the relay resolves a Relation message.
fn check_columns(cfg: &Config, table: &TableName, columns: Vec<Column>) -> ItemState {
    let rel = Relation {
        id: 0,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: b'd',
        columns,
    };
    match OutboxTable::from_config(cfg).mapping(&rel) {
        Ok(_) => ItemState::Ok("the configured columns exist".into()),
        Err(e) => ItemState::Problem(SetupError::Columns(e)),
    }
}

/// `init`: prints one line per item, then creates what is missing unless
/// `dry_run` or a check failed. Returns the failure exit code, if any.
pub(super) async fn run(
    client: &Client,
    cfg: &Config,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<Option<u8>, SetupError> {
    let (items, in_recovery) = match cfg.source.kind {
        SourceKind::Wal => {
            let facts = inspect(client, cfg).await?;
            (plan(&facts, cfg), facts.server.in_recovery)
        }
        SourceKind::Poll => (crate::admin::poll::init_items(client, cfg).await?, false),
    };
    let width = items.iter().map(|i| i.label.len()).max().unwrap_or(0);
    let problems = items
        .iter()
        .filter(|i| matches!(i.state, ItemState::Problem(_)))
        .count();
    let line = |out: &mut dyn Write, label: &str, text: &str| {
        let _ = writeln!(out, "{label:<width$}  {text}");
        let _ = out.flush();
    };

    if dry_run || problems > 0 {
        let mut statements = Vec::new();
        for i in &items {
            let text = match &i.state {
                ItemState::Ok(detail) => format!("ok ({detail})"),
                ItemState::Create(sql) => {
                    statements.push(sql);
                    "would create".into()
                }
                ItemState::Problem(e) => format!("error: {e}"),
                ItemState::Warn(w) => format!("warning: {w}"),
            };
            line(out, &i.label, &text);
        }
        if dry_run && !statements.is_empty() {
            let _ = writeln!(out, "\n-- SQL that init would run:");
            for sql in statements {
                let _ = writeln!(out, "{sql};");
            }
        }
        if problems > 0 {
            eprintln!(
                "outbox-relay: {problems} check{} failed; nothing was changed: fix {} and run init again",
                if problems == 1 { "" } else { "s" },
                if problems == 1 { "it" } else { "them" },
            );
            return Ok(Some(2));
        }
        return Ok(None);
    }

    for i in items {
        match i.state {
            ItemState::Ok(detail) => line(out, &i.label, &format!("ok ({detail})")),
            ItemState::Warn(w) => line(out, &i.label, &format!("warning: {w}")),
            ItemState::Problem(_) => unreachable!("no problems left"),
            ItemState::Create(sql) => {
                if in_recovery && i.label.starts_with("slot ") {
                    line(out, &i.label, "creating on a standby: waits for a running-transactions record from the primary; run SELECT pg_log_standby_snapshot(); on the primary to end the wait");
                }
                match client.batch_execute(&sql).await {
                    Ok(()) => line(out, &i.label, "created"),
                    // Created concurrently (a relay starting with create_missing, another init).
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) =>
                    {
                        line(out, &i.label, "ok (created concurrently)")
                    }
                    Err(source) => {
                        let e = SetupError::Query {
                            context: "creating it",
                            source,
                        };
                        line(out, &i.label, &format!("error: {e}"));
                        return Ok(Some(e.disposition().exit_code()));
                    }
                }
            }
        }
    }
    Ok(None)
}

/// After `init` created slots beside those of another shard count: the LSN
/// the old relays must confirm before they are stopped (the highest start of
/// the new set), and where each old slot is now.
pub(super) async fn report_cut_over(
    client: &Client,
    cfg: &Config,
    out: &mut impl Write,
) -> Result<(), SetupError> {
    let others = setup::other_layouts(client, cfg).await?;
    if others.is_empty() {
        return Ok(());
    }
    let mut start = crate::lsn::Lsn::ZERO;
    for shard in cfg.shard.shard().all() {
        let c = cfg.for_shard(shard);
        if let Some((s, _, _)) = setup::slot_state(client, None, &c.postgres.slot).await? {
            start = start.max(s.confirmed_flush);
        }
    }
    let _ = writeln!(
        out,
        "\ncut-over: the {}-shard set starts at or before {start}; keep the old relays running until each of their slots below has confirmed at or after {start}, then stop them and drop their slots and publications before starting the new relays",
        cfg.shard.count
    );
    for o in others {
        let _ = writeln!(
            out,
            "  {}  confirmed_flush_lsn {}{}",
            o.name,
            o.confirmed,
            if o.active { " (streaming)" } else { "" }
        );
    }
    Ok(())
}
