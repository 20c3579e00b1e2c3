//! A primary failover with real processes: a primary, a physical streaming
//! standby made from it, the relay on a multi-host URL with
//! `target_session_attrs=read-write`, a writer committing outbox rows, the
//! primary SIGKILLed and the standby promoted.
//!
//! - PostgreSQL 17: the relay's failover slot is synchronized to the standby
//!   (`sync_replication_slots`, `synchronized_standby_slots`): after the
//!   promotion the relay reconnects, streams from the synced slot, and every
//!   row the new primary holds reaches the broker, in order per key.
//! - PostgreSQL 16: no slot survives; the relay stops with the LSN range at
//!   risk and creates nothing.
//!
//! Also what `status` says about a primary whose failover is not safe.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// A test's names and config on a primary/standby pair of its own (the
/// broker is the shared one): the config of a [`TestCase`] with the
/// multi-host URL instead of the shared server's.
struct Pair {
    tc: TestCase,
    primary: PgCluster,
    standby: PgCluster,
    url: String,
}

impl Pair {
    /// A primary of `major` with the test's outbox table and a hot standby
    /// streaming through the physical slot `standby_slot`.
    async fn start(major: u32, name: &str, sync_slots: bool) -> Pair {
        let tc = TestCase::new(name).await;
        let primary = PgCluster::start_version(major);
        create_outbox_table(&primary.sql().await, &tc.table).await;
        let standby = primary
            .start_standby(StandbyOptions {
                slot: Some("standby_slot".into()),
                sync_replication_slots: sync_slots,
                ..Default::default()
            })
            .await;
        let url = multi_host_url(&[&primary, &standby]);
        Pair {
            tc,
            primary,
            standby,
            url,
        }
    }

    fn config(&self, dir: &Path) -> std::path::PathBuf {
        let text = self
            .tc
            .config_text(&self.tc.s.brokers, "")
            .replace(&self.tc.s.url(), &self.url);
        let path = dir.join("relay.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn relay(&self, dir: &Path) -> (std::path::PathBuf, Child) {
        let log = dir.join("relay.log");
        (log.clone(), spawn_relay_binary(&self.config(dir), &log))
    }
}

/// Commits 3-row transactions through the multi-host URL until `stop`,
/// reconnecting after the primary goes away; returns the `seq`s of the rows
/// whose commit was acknowledged.
async fn write_until(url: String, table: String, stop: Arc<AtomicBool>) -> Vec<i64> {
    let mut committed = Vec::new();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut seq = 0i64;
    while !stop.load(Ordering::Relaxed) {
        if client.as_ref().map_or(true, |c| c.is_closed()) {
            client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    Some(c)
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
        }
        let c = client.as_ref().unwrap();
        let sql = format!(
            "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'fo', 'k' || (i % 7), 'E', jsonb_build_object('seq', i) FROM generate_series({seq}, {}) i",
            seq + 2
        );
        if c.batch_execute(&sql).await.is_ok() {
            committed.extend(seq..seq + 3);
        }
        // A failed commit may or may not have happened: its numbers are not reused.
        seq += 3;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    committed
}

fn occurrences(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

async fn status_text(config: &Path) -> String {
    relay_cli(&["status"], config).await.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_17_loses_nothing_through_the_synced_failover_slot() {
    let pair = Pair::start(17, "failover17", true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = pair.config(dir.path());

    // Without synchronized_standby_slots a failover is not safe, and status says so.
    let init = relay_cli(&["init"], &config).await;
    assert_eq!(init.code, Some(0), "{init}");
    assert!(
        init.item("failover")
            .starts_with("warning: synchronized_standby_slots is empty"),
        "{init}"
    );
    let status = status_text(&config).await;
    assert!(
        status.contains("failover_slot              yes"),
        "{status}"
    );
    assert!(
        status.contains("unsafe: synchronized_standby_slots is empty")
            && status.contains("ALTER SYSTEM SET synchronized_standby_slots = 'standby_slot'"),
        "{status}"
    );
    let db = pair.primary.sql().await;
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby_slot'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    drop(db);
    eventually(10, "status says the failover is safe", || async {
        status_text(&config)
            .await
            .contains("ok (failover slot; synchronized_standby_slots = standby_slot)")
    })
    .await;

    let (log, mut relay) = pair.relay(dir.path());
    eventually(60, "relay streaming", || async {
        occurrences(&log, "streaming from slot") >= 1
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(
        pair.url.clone(),
        pair.tc.table.clone(),
        stop.clone(),
    ));
    // The standby's copy of the slot is usable after a promotion only once it
    // is persistent (sync-ready): the primary's slot has moved past what the
    // standby had reserved.
    let standby_db = pair.standby.sql().await;
    let slot = pair.tc.name.clone();
    eventually(120, "the standby's copy of the slot is sync-ready", || async {
        standby_db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced AND NOT temporary",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // On the standby, status shows the synced copy.
    let standby_config = dir.path().join("standby.toml");
    std::fs::write(
        &standby_config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&pair.url, &pair.standby.url()),
    )
    .unwrap();
    let on_standby = status_text(&standby_config).await;
    assert!(
        on_standby.contains("standby (in recovery)") && on_standby.contains("synced"),
        "{on_standby}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    pair.primary.kill();
    let killed = Instant::now();
    pair.standby.promote();
    eventually(60, "relay streaming from the promoted standby", || async {
        occurrences(&log, "streaming from slot") >= 2
    })
    .await;
    let reconnected = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.unwrap();

    // Every row the new primary holds, including those committed on the old
    // one before it died, reaches the broker.
    let db = pair.standby.sql().await;
    let held: HashSet<i64> = db
        .query(
            &format!("SELECT (payload->>'seq')::int8 FROM {}", pair.tc.table),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked_lost: Vec<_> = committed.iter().filter(|s| !held.contains(s)).collect();
    assert!(
        acked_lost.is_empty(),
        "the writer's acknowledged commits missing on the new primary (asynchronous standby): {acked_lost:?}"
    );
    let topic = pair.tc.topic("fo");
    let got = tokio::task::spawn_blocking({
        let (brokers, held) = (pair.tc.s.brokers.clone(), held.clone());
        move || {
            consume_until(&brokers, &[topic], |got| {
                let seen: HashSet<i64> = seqs(got).into_iter().collect();
                held.iter().all(|s| seen.contains(s))
            })
        }
    })
    .await
    .unwrap();
    let delivered = seqs(&got);
    let distinct: HashSet<i64> = delivered.iter().copied().collect();
    let missing: Vec<_> = held.iter().filter(|s| !distinct.contains(s)).collect();
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    // Per key, first occurrences in commit order (seq grows with commits).
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for (r, s) in got.iter().zip(&delivered) {
        if seen.insert(*s) {
            let prev = last.insert(r.key.clone(), *s);
            assert!(prev.map_or(true, |p| p < *s), "key {} out of order", r.key);
        }
    }
    println!(
        "FAULT failover pg17: written {} held by the new primary {} delivered {} re-sent {} primary kill -> streaming again {} ms",
        committed.len(),
        held.len(),
        distinct.len(),
        delivered.len() - distinct.len(),
        reconnected.as_millis()
    );
    let _ = relay.kill();
    let _ = relay.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_16_stops_with_the_range_at_risk_and_creates_no_slot() {
    let pair = Pair::start(16, "failover16", false).await;
    let dir = tempfile::tempdir().unwrap();
    let (log, mut relay) = pair.relay(dir.path());
    eventually(60, "relay streaming", || async {
        occurrences(&log, "streaming from slot") >= 1
    })
    .await;
    let db = pair.primary.sql().await;
    insert_rows(&db, &pair.tc.table, "fo", 0, 30).await;
    // A checkpoint is stored (and reaches the standby) before the crash.
    let ckpt = format!(
        "SELECT 1 FROM outbox_relay.checkpoint WHERE slot_name = '{}'",
        pair.tc.name
    );
    eventually(30, "checkpoint stored", || async {
        db.query_opt(&ckpt, &[]).await.unwrap().is_some()
    })
    .await;
    // The insert position: the checkpoint is written with synchronous_commit =
    // off, so its commit may not be flushed (pg_current_wal_lsn) yet.
    pair.standby.wait_replayed(wal_insert_lsn(&db).await).await;
    drop(db);
    pair.primary.kill();
    pair.standby.promote();
    let status = tokio::task::spawn_blocking(move || relay.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("promoted from a standby that had no copy of it")
            && text.contains("may be missing from Kafka: rows with created_at at or after")
            && text.contains("events committed after LSN"),
        "{text}"
    );
    let slots: i64 = pair
        .standby
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the relay created no slot on the new primary");
}
