//! Physical streaming standbys of a `PgCluster`, for failover tests, without
//! pg_basebackup (the npm builds lack it): an online base backup through SQL
//! (`pg_backup_start`/`pg_backup_stop`, on 14 `pg_start_backup`/`pg_stop_backup`)
//! and a copy of the data directory, streaming through a physical slot on the
//! primary. Also what failover tests wait for and connect with: replay
//! positions and libpq multi-host URLs.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use outbox_relay::lsn::Lsn;

use super::cluster::PgCluster;
use super::eventually;
use super::postgres::{ClusterDir, PASSWORD};
use super::process::{chown, Ids};

/// How a standby is made.
#[derive(Default)]
pub struct StandbyOptions {
    /// The physical slot on the primary it streams from (`primary_slot_name`;
    /// created if missing). Default `standby_<port of the standby>`.
    pub slot: Option<String>,
    /// `sync_replication_slots = on` (PostgreSQL 17+): failover slots of the
    /// primary are copied to the standby.
    pub sync_replication_slots: bool,
    /// More settings (`name=value`), after the standby's own.
    pub settings: Vec<String>,
}

impl PgCluster {
    /// Makes a hot standby of this (running) primary and starts it: a
    /// physical slot on the primary, a base backup copied while the primary
    /// runs, `standby.signal`, `primary_conninfo` over TCP naming `dbname`,
    /// `primary_slot_name`, `hot_standby_feedback = on`. Returns once the
    /// standby streams. It has the default server settings, not the
    /// primary's `ClusterOptions::settings` (e.g. `synchronized_standby_slots`).
    pub async fn start_standby(&self, opts: StandbyOptions) -> PgCluster {
        let c = ClusterDir::empty();
        let mut standby = PgCluster::new(c, self.install.clone(), Vec::new());
        let slot = opts
            .slot
            .clone()
            .unwrap_or_else(|| format!("standby_{}", standby.port));
        let db = self.sql().await;
        db.execute(
            "SELECT pg_create_physical_replication_slot($1, true)
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .unwrap();
        let (start, stop) = if self.major() >= 15 {
            (
                "SELECT pg_backup_start('outbox-relay standby', true)",
                "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)",
            )
        } else {
            (
                "SELECT pg_start_backup('outbox-relay standby', true, false)",
                "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)",
            )
        };
        // A non-exclusive backup lasts as long as this session.
        db.batch_execute(start).await.unwrap();
        let (from, to, ids) = (self.c.data.clone(), standby.c.data.clone(), self.c.ids);
        tokio::task::spawn_blocking(move || copy_data_dir(&from, &to, ids))
            .await
            .unwrap();
        let row = db.query_one(stop, &[]).await.unwrap();
        let data = &standby.c.data;
        let write = |name: &str, text: &str| {
            std::fs::write(data.join(name), text).unwrap();
            chown(&data.join(name), standby.c.ids);
        };
        write("backup_label", row.get::<_, &str>(0));
        if let Some(map) = row.get::<_, Option<&str>>(1).filter(|m| !m.is_empty()) {
            write("tablespace_map", map);
        }
        write("standby.signal", "");

        let mut settings = vec![
            format!(
                "primary_conninfo=host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres application_name={slot}",
                self.port
            ),
            format!("primary_slot_name={slot}"),
            "hot_standby=on".into(),
            "hot_standby_feedback=on".into(),
        ];
        if opts.sync_replication_slots {
            assert!(
                self.major() >= 17,
                "sync_replication_slots needs PostgreSQL 17+, this is {}",
                self.major()
            );
            settings.push("sync_replication_slots=on".into());
        }
        settings.extend(opts.settings);
        standby.settings = settings;
        standby.start_again();
        eventually(60, &format!("standby {slot} streaming"), || async {
            db.query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
        })
        .await;
        standby
    }

    /// Whether the server is a standby (in recovery).
    pub async fn in_recovery(&self) -> bool {
        self.value("SELECT pg_is_in_recovery()").await
    }

    /// The primary's WAL write position (`pg_current_wal_lsn()`).
    pub async fn current_lsn(&self) -> Lsn {
        let lsn: String = self.value("SELECT pg_current_wal_lsn()::text").await;
        lsn.parse().unwrap()
    }

    /// Waits (60 s at most) until this standby has replayed WAL up to `lsn`.
    pub async fn wait_replayed(&self, lsn: Lsn) {
        let db = self.sql().await;
        let what = format!("standby on {} replayed up to {lsn}", self.port);
        eventually(60, &what, || async {
            db.query_one(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                &[&lsn.to_string()],
            )
            .await
            .unwrap()
            .get(0)
        })
        .await;
    }
}

/// A libpq multi-host URL over `hosts` in this order that connects to the
/// first one accepting writes:
/// `postgresql://postgres:PW@127.0.0.1:P1,127.0.0.1:P2/postgres?target_session_attrs=read-write`.
pub fn multi_host_url(hosts: &[&PgCluster]) -> String {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|c| format!("127.0.0.1:{}", c.port))
        .collect();
    format!(
        "postgresql://postgres:{PASSWORD}@{}/postgres?target_session_attrs=read-write",
        hosts.join(",")
    )
}

/// What a base backup leaves out (as pg_basebackup does): server state that
/// is rebuilt or belongs to the running server. pg_wal comes by streaming.
const EMPTIED_DIRS: [&str; 8] = [
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];
const SKIPPED_FILES: [&str; 7] = [
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "standby.signal",
    "recovery.signal",
    "pg_internal.init",
];

/// Copies a running server's data directory `from` into `to` (created),
/// owned by the servers' user. Files that vanish meanwhile are skipped.
fn copy_data_dir(from: &Path, to: &Path, ids: Ids) {
    fn mkdir(dir: &Path, ids: Ids) {
        std::fs::DirBuilder::new().mode(0o700).create(dir).unwrap();
        chown(dir, ids);
    }
    fn copy(from: &Path, to: &Path, top: bool, ids: Ids) {
        mkdir(to, ids);
        let Ok(entries) = std::fs::read_dir(from) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let (src, dst) = (e.path(), to.join(&*name));
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                if top && EMPTIED_DIRS.contains(&&*name) {
                    mkdir(&dst, ids);
                } else {
                    copy(&src, &dst, false, ids);
                }
            } else if !SKIPPED_FILES.contains(&&*name) && !name.starts_with("pgsql_tmp") {
                match std::fs::copy(&src, &dst) {
                    Ok(_) => chown(&dst, ids),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("cannot copy {}: {e}", src.display()),
                }
            }
        }
    }
    copy(from, to, true, ids);
    // WAL archive status lives below pg_wal; the server expects the directory.
    mkdir(&to.join("pg_wal/archive_status"), ids);
}
