//! Sharded layouts on the server: a shard's publication row filter checked
//! against what `shard` says it must be, and slots left by another shard count
//! (a change of `shard.count` refused, waited for, or let through).

use tokio_postgres::Client;

use super::slot::at_risk;
use super::{parse_lsn, q, SetupError, SlotState};
use crate::config::{quote_ident, Config, TableName};
use crate::lsn::Lsn;
use crate::shard::Shard;

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

pub(super) fn others_layouts(others: &[OtherShardSlot]) -> String {
    let mut counts: Vec<u32> = others.iter().map(|o| o.count).collect();
    counts.sort_unstable();
    counts.dedup();
    let counts: Vec<String> = counts.iter().map(|n| format!("{n}-shard")).collect();
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
/// where the new one starts. A slot with a stored checkpoint has streamed
/// already: the change of layout is over for it, and old slots are only left over.
pub(super) async fn check_layout(
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
    tracing::warn!(slots = ?others.iter().map(|o| &o.name).collect::<Vec<_>>(), "slots of another shard count exist beside this layout's: while a change of shard.count is under way follow its procedure (README, \"Sharding\"); once it is done drop the old layout's slots and publications, or they keep WAL on the server");
    Ok(())
}

/// This instance's row filter (`None` when not sharded).
pub fn row_filter(cfg: &Config) -> Option<String> {
    cfg.shard.shard().row_filter(&quote_ident(&cfg.outbox.key))
}

/// A publication's row filter must be exactly what this shard needs: none
/// without sharding (a filter would drop rows silently), the shard's otherwise.
/// The server prints the filter in its own form: it is recognised by the
/// hash, the count and the index.
pub(super) fn check_row_filter(
    cfg: &Config,
    table: &TableName,
    found: Option<String>,
) -> Result<(), SetupError> {
    let shard = cfg.shard.shard();
    let wanted = row_filter(cfg);
    let fits = match (&found, &wanted) {
        (None, None) => true,
        (Some(f), Some(_)) => {
            f.contains("hashtext")
                && f.contains(cfg.outbox.key.as_str())
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
        wanted,
        shard,
    })))
}
