//! `init` and `status` with `source.kind = "poll"`: the items `init` prints
//! and creates (the table, the order column, its index, the sent column, the
//! NOTIFY trigger; no publication, slot or state tables), and the backlog
//! `status` shows (unsent rows, the oldest one's age, the leader).

use std::io::Write;
use std::path::Path;

use tokio_postgres::Client;

use super::{Item, ItemState};
use crate::config::{quote_ident, AfterSend, Config, PollConfig};
use crate::outbox::OutboxTable;
use crate::pgoutput::{Column, Relation};
use crate::relay::poll::query::{self, unsent_filter};
use crate::setup::poll::{self as table, Check, PollError, TableInfo};
use crate::setup::server::Server;
use crate::setup::{self, q, SetupError};

/// What `init` checks and creates in poll mode, one item per line.
pub async fn init_items(client: &Client, cfg: &Config) -> Result<Vec<Item>, SetupError> {
    let t = cfg.table().clone();
    let p = &cfg.poll;
    let server = Server::read(client).await?;
    let role = setup::read_role(client).await?;
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(q("reading wal_level"))?
        .get(0);
    let commit_ts = query::track_commit_timestamp(client).await?;
    let info = TableInfo::read(client, cfg).await?;
    let item = |label: String, state| Item { label, state };
    let mut items = vec![item(
        "server".into(),
        match server.check_supported() {
            Err(e) => ItemState::Problem(e),
            Ok(()) if server.in_recovery => {
                ItemState::Problem(SetupError::Poll(Box::new(PollError::NotPrimary)))
            }
            Ok(()) => ItemState::Ok(format!("PostgreSQL {}, primary", server.version())),
        },
    )];
    items.push(item(
        "wal_level".into(),
        ItemState::Ok(format!("{wal_level} (polling needs no logical decoding)")),
    ));
    items.push(item(
        format!("role {}", role.name),
        ItemState::Ok("no REPLICATION needed".into()),
    ));
    let columns = match &info {
        Some(i) => {
            items.push(item(format!("table {t}"), ItemState::Ok("exists".into())));
            i.columns.clone()
        }
        None => {
            items.push(item(
                format!("table {t}"),
                ItemState::Create(setup::create_table_sql(&t)),
            ));
            let mut names = setup::outbox_sql_columns();
            names.push(p.order_column.clone());
            if p.after_send == AfterSend::Mark {
                names.push(p.sent_column.clone());
            }
            names
                .into_iter()
                .map(|name| Column {
                    is_key: false,
                    name,
                    type_oid: 0,
                    type_modifier: -1,
                })
                .collect()
        }
    };
    let rel = Relation {
        id: 0,
        namespace: t.schema.clone(),
        name: t.name.clone(),
        replica_identity: b'd',
        columns,
    };
    items.push(item(
        "columns".into(),
        match OutboxTable::from_config(cfg).mapping(&rel) {
            Ok(_) => ItemState::Ok("the configured columns exist".into()),
            Err(e) => ItemState::Problem(SetupError::Columns(e)),
        },
    ));
    for (label, check) in table::checks(info.as_ref(), cfg, &role.name_sql) {
        items.push(item(
            label,
            match check {
                Check::Ok(text) => ItemState::Ok(text),
                Check::Create(sql) => ItemState::Create(sql.join(";\n")),
                Check::Warn(text) => ItemState::Warn(text),
                Check::Problem(e) => ItemState::Problem(SetupError::Poll(Box::new(e))),
            },
        ));
    }
    items.push(item(
        "track_commit_timestamp".into(),
        ItemState::Ok(if commit_ts {
            "on: delivery latency and the oldest unsent age count from each row's commit".into()
        } else {
            "off: delivery latency counts from the poll that read a row, the oldest unsent age from created_at; ALTER SYSTEM SET track_commit_timestamp = on and a restart count both from the commit".into()
        }),
    ));
    Ok(items)
}

/// `status --json` in poll mode.
#[derive(Debug, serde::Serialize)]
struct PollStatus {
    source: &'static str,
    table: String,
    table_exists: bool,
    after_send: &'static str,
    order_column: String,
    unsent_rows: Option<i64>,
    oldest_unsent_age_seconds: Option<f64>,
    /// What the age counts from: `commit` or `created_at`.
    oldest_unsent_age_from: Option<&'static str>,
    leader_pid: Option<i32>,
    notify: bool,
    server_version_num: i32,
    /// `PostgreSQL 15.4`.
    server: String,
    in_recovery: bool,
    /// The checks `run` makes that fail (empty when it can poll).
    problems: Vec<String>,
}

/// `outbox-relay status` in poll mode; `Some(1)` when `run` could not poll.
pub async fn status(
    client: &Client,
    cfg: &Config,
    config_path: &Path,
    json: bool,
) -> Result<Option<u8>, SetupError> {
    let t = cfg.table().clone();
    let p = &cfg.poll;
    let server = Server::read(client).await?;
    let role = setup::read_role(client).await?;
    let info = TableInfo::read(client, cfg).await?;
    let mut problems = Vec::new();
    if server.in_recovery {
        problems.push(PollError::NotPrimary.to_string());
    }
    let mut st = PollStatus {
        source: "poll",
        table: t.to_string(),
        table_exists: info.is_some(),
        after_send: match p.after_send {
            AfterSend::Delete => "delete",
            AfterSend::Mark => "mark",
        },
        order_column: p.order_column.clone(),
        unsent_rows: None,
        oldest_unsent_age_seconds: None,
        oldest_unsent_age_from: None,
        leader_pid: None,
        notify: p.notify,
        server_version_num: server.version_num,
        server: format!("PostgreSQL {}", server.version()),
        in_recovery: server.in_recovery,
        problems: Vec::new(),
    };
    match &info {
        None => problems.push(format!(
            "table \"{t}\" does not exist; create it with: outbox-relay init --config {}",
            config_path.display()
        )),
        Some(info) => {
            for (what, check) in table::checks(Some(info), cfg, &role.name_sql) {
                match check {
                    Check::Problem(e) => problems.push(e.to_string()),
                    Check::Create(_) => problems.push(format!(
                        "the {what} polling needs is missing; create it with: outbox-relay init --config {}",
                        config_path.display()
                    )),
                    Check::Ok(_) | Check::Warn(_) => {}
                }
            }
            st.leader_pid = query::holder(client, info.oid).await?;
            if info.columns.iter().any(|c| c.name == p.order_column) {
                let commit_ts = query::track_commit_timestamp(client).await?;
                let age = query::age_expr(commit_ts, &info.columns);
                let (count, oldest) = unsent(client, cfg, age.as_deref()).await?;
                st.unsent_rows = Some(count);
                st.oldest_unsent_age_seconds = oldest;
                st.oldest_unsent_age_from =
                    age.map(|_| if commit_ts { "commit" } else { "created_at" });
            }
        }
    }
    st.problems = problems;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(&st).expect("serializable"));
    } else {
        let _ = out.write_all(text(&st).as_bytes());
    }
    for reason in &st.problems {
        eprintln!("outbox-relay: {reason}");
    }
    Ok((!st.problems.is_empty()).then_some(1))
}

/// The exact count of unsent rows and the oldest one's age in seconds.
async fn unsent(
    client: &Client,
    cfg: &Config,
    age_expr: Option<&str>,
) -> Result<(i64, Option<f64>), SetupError> {
    let p: &PollConfig = &cfg.poll;
    let table = cfg.table().quoted();
    let filter = unsent_filter(p);
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}{filter}"), &[])
        .await
        .map_err(q("counting the unsent rows"))?
        .get(0);
    let age = match age_expr {
        Some(expr) if count > 0 => client
            .query_opt(
                &format!(
                    "SELECT extract(epoch FROM now() - {expr})::float8 FROM {table}{filter} ORDER BY {} LIMIT 1",
                    quote_ident(&p.order_column)
                ),
                &[],
            )
            .await
            .map_err(q("reading the oldest unsent row"))?
            .and_then(|r| r.get::<_, Option<f64>>(0)),
        _ => None,
    };
    Ok((count, age))
}

/// Aligned `key  value` lines; keys are the JSON field names.
fn text(st: &PollStatus) -> String {
    let dash = || "-".to_string();
    let rows: Vec<(&str, String)> = vec![
        ("source", "poll".into()),
        (
            "table",
            if st.table_exists {
                st.table.clone()
            } else {
                format!("{} (missing)", st.table)
            },
        ),
        ("after_send", st.after_send.into()),
        ("order_column", st.order_column.clone()),
        (
            "unsent_rows",
            st.unsent_rows.map_or_else(dash, |n| n.to_string()),
        ),
        (
            "oldest_unsent_age_seconds",
            match (st.oldest_unsent_age_seconds, st.oldest_unsent_age_from) {
                (Some(a), Some(from)) => format!("{a:.1} (from {from})"),
                (None, None) if st.unsent_rows.is_some_and(|n| n > 0) => {
                    "- (no created_at column; track_commit_timestamp = on measures it)".into()
                }
                _ => dash(),
            },
        ),
        (
            "leader_pid",
            st.leader_pid
                .map_or_else(|| "- (no instance polls)".into(), |p| p.to_string()),
        ),
        ("notify", if st.notify { "on" } else { "off" }.into()),
        (
            "server",
            format!(
                "{}, {}",
                st.server,
                if st.in_recovery {
                    "standby (in recovery)"
                } else {
                    "primary"
                }
            ),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}
