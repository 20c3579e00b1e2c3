//! The replication slot over SQL: its state in `pg_replication_slots` (with
//! the columns this server version has), creating it when that is safe, and
//! what to say when it is gone.

use tokio_postgres::Client;

use super::{check_layout, parse_lsn, q, SetupError};
use crate::config::{quote_ident, quote_literal, Config};
use crate::lsn::Lsn;
use crate::setup::server::Server;

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
pub(super) fn missing_slot_advice(at_risk: &Option<AtRisk>) -> String {
    let recover = "create a new slot with `outbox-relay init` (or set postgres.recreate_missing_slot = true to let the relay do it), then send the rows at risk again (README, \"Failover\": re-insert them in one transaction; consumers deduplicate on the id header)";
    match at_risk {
        Some(r) => format!(
            "events committed after LSN {} (the relay's last checkpoint, acknowledged at {}) up to {} may be missing from Kafka: rows with created_at at or after {}; {recover}",
            r.acked, r.acked_at, r.current, r.acked_at
        ),
        None => format!("events committed since its last confirmed position may be missing from Kafka (the relay stored no checkpoint to narrow that down); check the outbox table against Kafka, then {recover}"),
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

/// The arguments of `pg_create_logical_replication_slot` after the name: a
/// failover slot when `failover` (the five-argument form exists from 17 on).
fn slot_args(failover: bool) -> &'static str {
    if failover {
        "'pgoutput', false, false, true"
    } else {
        "'pgoutput'"
    }
}

/// Creates the pgoutput slot, without `;` (what `init` prints and runs).
pub fn create_slot_sql(slot: &str, failover: bool) -> String {
    format!(
        "SELECT pg_create_logical_replication_slot({}, {})",
        quote_literal(slot),
        slot_args(failover)
    )
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
                server.map_or(crate::setup::server::NO_SLOT_COLUMNS, Server::slot_columns)
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
pub(super) async fn at_risk(client: &Client, cfg: &Config) -> Option<AtRisk> {
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

pub(super) async fn ensure_slot(
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
        if server.in_recovery {
            return Err(SetupError::NoSlotOnStandby { name: name.clone() });
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
        let sql = format!(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, {})",
            slot_args(failover)
        );
        match client.query_one(&sql, &[name]).await {
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
pub(super) const CURRENT_WAL_SQL: &str = "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text";

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
