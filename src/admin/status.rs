//! `status`: the slot's progress (from [`setup::slot_report`]), the
//! publication and the reason to exit 1, as aligned text or one JSON object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio_postgres::Client;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::setup::server::Server;
use crate::setup::{self, q, SetupError, SlotReport, SlotState};
use crate::state::{Checkpoint, StateStore};

/// What `status` shows.
#[derive(Debug, Clone)]
pub(super) struct Status {
    pub(super) slot: String,
    pub(super) report: Option<SlotReport>,
    /// Plugin and database of the slot, if it exists.
    pub(super) kind: Option<(String, String)>,
    pub(super) database: String,
    pub(super) current_wal: Lsn,
    pub(super) publication: String,
    pub(super) publication_tables: Option<Vec<String>>,
    /// The relay's stored position (None: no state tables or nothing stored yet).
    pub(super) checkpoint: Option<Checkpoint>,
    pub(super) server: Server,
    /// The slot's failover and invalidation columns, if it exists.
    pub(super) slot_state: Option<SlotState>,
    /// Whether a failover keeps the slot (`Err`: why not, and the fix).
    pub(super) failover: Result<String, String>,
    /// The state tables exist (else `checkpoint` is None for that reason).
    pub(super) state_tables: bool,
    /// What the instance holding the slot has acknowledged (maybe not stored
    /// yet), from its `/metrics`, and the address it was read from.
    pub(super) live_acked: Option<(Lsn, String)>,
}

/// `status --json`: one flat object; LSNs as `X/X`, byte counts as numbers.
#[derive(Debug, serde::Serialize)]
pub(super) struct StatusJson<'a> {
    slot: &'a str,
    slot_exists: bool,
    active: Option<bool>,
    active_pid: Option<i32>,
    confirmed_flush_lsn: Option<Lsn>,
    restart_lsn: Option<Lsn>,
    retained_wal_bytes: Option<u64>,
    wal_status: Option<&'a str>,
    server_version_num: i32,
    in_recovery: bool,
    failover_slot: Option<bool>,
    synced: Option<bool>,
    invalidation: Option<String>,
    inactive_since: Option<&'a str>,
    failover_safe: bool,
    failover: &'a str,
    current_wal_lsn: Lsn,
    lag_bytes: Option<u64>,
    publication: &'a str,
    publication_exists: bool,
    publication_tables: &'a [String],
    checkpoint_lsn: Option<Lsn>,
    checkpoint_age_seconds: Option<u64>,
    checkpoint_age_ms: Option<u64>,
    live_acked_lsn: Option<Lsn>,
    earliest_replayable_lsn: Option<Lsn>,
    replay_window_bytes: Option<u64>,
    replay_window_age_seconds: Option<u64>,
}

pub(super) async fn read(client: &Client, cfg: &Config) -> Result<Status, SetupError> {
    let slot = &cfg.postgres.slot;
    let report = setup::slot_report(client, slot).await?;
    let server = Server::read(client).await?;
    let found = setup::slot_state(client, Some(&server), slot).await?;
    let failover = server.failover_safety(
        slot,
        found
            .as_ref()
            .is_some_and(|(s, _, _)| s.failover == Some(true)),
    );
    let (slot_state, kind) = match found {
        Some((state, plugin, db)) => (Some(state), Some((plugin, db))),
        None => (None, None),
    };
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(q("reading the database name"))?
        .get(0);
    let current_wal = match &report {
        Some(r) => r.current_wal,
        None => setup::current_wal(client).await?,
    };
    let state_tables = crate::state::exists(client, &cfg.checkpoint.schema).await?;
    let checkpoint = if state_tables {
        StateStore::new(client, cfg).load().await?
    } else {
        None
    };
    let live_acked = match &report {
        Some(r) if r.active => {
            live_acked(
                &cfg.metrics.listen,
                cfg.shard.shard().is_sharded().then_some(cfg.shard.index),
            )
            .await
        }
        _ => None,
    };
    Ok(Status {
        server,
        slot_state,
        failover,
        checkpoint,
        state_tables,
        live_acked,
        slot: slot.clone(),
        report,
        kind,
        database,
        current_wal,
        publication: cfg.postgres.publication.clone(),
        publication_tables: setup::publication_tables(client, &cfg.postgres.publication).await?,
    })
}

impl Status {
    /// Why `status` exits 1, if it does.
    pub(super) fn problem(&self, config_path: &Path) -> Option<String> {
        let Some(report) = &self.report else {
            return Some(format!(
                "replication slot {:?} does not exist; create it with: outbox-relay init --config {}",
                self.slot,
                config_path.display()
            ));
        };
        if let Some((plugin, db)) = &self.kind {
            if plugin != "pgoutput" || *db != self.database {
                return Some(
                    SetupError::WrongSlot {
                        name: self.slot.clone(),
                        plugin: plugin.clone(),
                        database: db.clone(),
                        expected_db: self.database.clone(),
                    }
                    .to_string(),
                );
            }
        }
        if let Some(reason) = self.slot_state.as_ref().and_then(SlotState::invalidated) {
            return Some(
                SetupError::SlotInvalidated {
                    name: self.slot.clone(),
                    reason,
                }
                .to_string(),
            );
        }
        if report.wal_status.as_deref() == Some("lost") {
            return Some(
                SetupError::SlotLost {
                    name: self.slot.clone(),
                }
                .to_string(),
            );
        }
        None
    }

    pub(super) fn json(&self) -> StatusJson<'_> {
        let r = self.report.as_ref();
        StatusJson {
            slot: &self.slot,
            slot_exists: r.is_some(),
            active: r.map(|r| r.active),
            active_pid: r.and_then(|r| r.active_pid),
            confirmed_flush_lsn: r.map(|r| r.confirmed_flush),
            restart_lsn: r.map(|r| r.restart_lsn),
            retained_wal_bytes: r.map(|r| r.retained_wal_bytes),
            wal_status: r.and_then(|r| r.wal_status.as_deref()),
            server_version_num: self.server.version_num,
            in_recovery: self.server.in_recovery,
            failover_slot: self.slot_state.as_ref().and_then(|s| s.failover),
            synced: self.slot_state.as_ref().and_then(|s| s.synced),
            invalidation: self.slot_state.as_ref().and_then(SlotState::invalidated),
            inactive_since: self
                .slot_state
                .as_ref()
                .and_then(|s| s.inactive_since.as_deref()),
            failover_safe: self.failover.is_ok(),
            failover: match &self.failover {
                Ok(t) | Err(t) => t,
            },
            current_wal_lsn: self.current_wal,
            lag_bytes: r.map(SlotReport::lag_bytes),
            publication: &self.publication,
            publication_exists: self.publication_tables.is_some(),
            publication_tables: self.publication_tables.as_deref().unwrap_or_default(),
            checkpoint_lsn: self.checkpoint.as_ref().map(|c| c.acked),
            checkpoint_age_seconds: self.checkpoint.as_ref().map(|c| age(c.acked_at) / 1000),
            checkpoint_age_ms: self.checkpoint.as_ref().map(|c| age(c.acked_at)),
            live_acked_lsn: self.live_acked.as_ref().map(|(l, _)| *l),
            earliest_replayable_lsn: r.map(|r| r.confirmed_flush),
            replay_window_bytes: self.window_bytes(),
            replay_window_age_seconds: self.window_age(),
        }
    }

    /// Replayable WAL: from the slot's confirmed position to the checkpoint.
    fn window_bytes(&self) -> Option<u64> {
        let (r, c) = (self.report.as_ref()?, self.checkpoint.as_ref()?);
        Some(c.acked.0.saturating_sub(r.confirmed_flush.0))
    }

    /// How long ago the replay window's start was acknowledged (a relay with `[replay] window`).
    fn window_age(&self) -> Option<u64> {
        self.checkpoint
            .as_ref()?
            .window_start
            .map(|(_, t)| age(t) / 1000)
    }

    /// Aligned `key  value` lines; keys are the JSON field names.
    pub(super) fn text(&self) -> String {
        let mut rows: Vec<(&str, String)> = Vec::new();
        match &self.report {
            None => rows.push(("slot", format!("{} (missing)", self.slot))),
            Some(r) => {
                rows.push(("slot", self.slot.clone()));
                rows.push(("active", if r.active { "yes" } else { "no" }.into()));
                rows.push((
                    "active_pid",
                    r.active_pid.map_or("-".into(), |p| p.to_string()),
                ));
                rows.push(("confirmed_flush_lsn", r.confirmed_flush.to_string()));
                rows.push(("restart_lsn", r.restart_lsn.to_string()));
                rows.push(("retained_wal_bytes", bytes(r.retained_wal_bytes)));
                rows.push(("wal_status", r.wal_status.clone().unwrap_or("-".into())));
            }
        }
        rows.push(("current_wal_lsn", self.current_wal.to_string()));
        if let Some(r) = &self.report {
            rows.push(("lag_bytes", bytes(r.lag_bytes())));
        }
        rows.push((
            "publication",
            match &self.publication_tables {
                None => format!("{} (missing)", self.publication),
                Some(_) => self.publication.clone(),
            },
        ));
        if let Some(tables) = &self.publication_tables {
            let list = if tables.is_empty() {
                "(none)".into()
            } else {
                tables.join(", ")
            };
            rows.push(("publication_tables", list));
        }
        let lsn = |l: Option<Lsn>| l.map_or("-".into(), |l| l.to_string());
        rows.push((
            "checkpoint_lsn",
            match &self.checkpoint {
                Some(c) => format!("{} (stored {} ms ago)", c.acked, age(c.acked_at)),
                None if !self.state_tables => {
                    "- (no state tables; `outbox-relay init` creates them)".into()
                }
                None => "- (no checkpoint yet: none stored for this slot)".into(),
            },
        ));
        rows.push((
            "live_acked_lsn",
            match &self.live_acked {
                Some((l, from)) => format!("{l} (from {from})"),
                None => "-".into(),
            },
        ));
        rows.push((
            "earliest_replayable_lsn",
            lsn(self.report.as_ref().map(|r| r.confirmed_flush)),
        ));
        rows.push((
            "replay_window_bytes",
            self.window_bytes().map_or("-".into(), bytes),
        ));
        rows.push((
            "replay_window_age_seconds",
            self.window_age().map_or("-".into(), |a| a.to_string()),
        ));
        let server = &self.server;
        rows.push((
            "server",
            format!(
                "PostgreSQL {}, {}",
                server.version(),
                if server.in_recovery {
                    "standby (in recovery)"
                } else {
                    "primary"
                }
            ),
        ));
        if let Some(st) = &self.slot_state {
            let yes_no = |b: Option<bool>| match b {
                Some(true) => "yes".to_string(),
                Some(false) => "no".to_string(),
                None => format!("- (PostgreSQL {})", server.major()),
            };
            rows.push(("failover_slot", yes_no(st.failover)));
            if server.in_recovery {
                rows.push(("synced", yes_no(st.synced)));
            }
            if let Some(i) = st.invalidated() {
                rows.push(("invalidation", i));
            }
            if let Some(t) = &st.inactive_since {
                rows.push(("inactive_since", t.clone()));
            }
        }
        rows.push((
            "failover",
            match &self.failover {
                Ok(t) => format!("ok ({t})"),
                Err(t) => format!("unsafe: {t}"),
            },
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// Whole milliseconds from `t` to now (0 for a time in the future).
fn age(t: SystemTime) -> u64 {
    SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long `status` waits for the relay's `/metrics`.
const METRICS_TIMEOUT: Duration = Duration::from_millis(500);

/// `outbox_relay_acked_lsn` of the instance at `metrics.listen`, if one
/// answers there and streams (a wildcard listen address is asked on
/// loopback). None when `status` runs on another host than the relay.
async fn live_acked(listen: &str, shard: Option<u32>) -> Option<(Lsn, String)> {
    let addr: SocketAddr = listen.parse().ok()?;
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    let body = tokio::time::timeout(METRICS_TIMEOUT, async {
        let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
        conn.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await.ok()?;
        Some(body)
    })
    .await
    .ok()??;
    // `name value`, or `name{labels} value` (a sharded instance labels every
    // series with its shard, which must be this config's).
    let value = |name: &str| {
        body.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, r) = r.split_once('}')?;
                    if shard.is_some_and(|i| !labels.contains(&format!("shard=\"{i}\""))) {
                        return None;
                    }
                    r
                }
                None => rest,
            };
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
    };
    if value("outbox_relay_active") != Some(1.0) {
        return None;
    }
    let acked = value("outbox_relay_acked_lsn").filter(|v| *v > 0.0)?;
    Some((Lsn(acked as u64), format!("http://{addr}/metrics")))
}

/// `1234567 (1.2 MiB)`; small counts stay plain.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{n} ({v:.1} {})", UNITS[unit])
}
