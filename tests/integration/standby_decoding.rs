//! Decoding on a hot standby (PostgreSQL 16+): `postgres.url` names the
//! standby, `init` creates the slot there (waiting for a running-transactions
//! record from the primary), rows committed on the primary reach the broker,
//! and after the standby is promoted the same slot goes on. A standby with
//! `hot_standby_feedback = off` is refused with the fix.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use outbox_relay::metrics::Metrics;
use outbox_relay::replication;
use outbox_relay::transport::PgTarget;

use crate::harness::*;

/// The test's config pointed at `url`.
fn config_at(tc: &TestCase, url: &str, dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = tc.config_text(&tc.s.brokers, "").replace(&tc.s.url(), url);
    std::fs::write(&path, text).unwrap();
    path
}

/// A primary of `major` with the test's outbox table and publication.
async fn primary_with_outbox(major: u32, tc: &TestCase) -> (PgCluster, tokio_postgres::Client) {
    let primary = PgCluster::start_version(major);
    let db = primary.sql().await;
    create_outbox_table(&db, &tc.table).await;
    db.batch_execute(&format!(
        "CREATE PUBLICATION {} FOR TABLE public.{} WITH (publish = 'insert')",
        tc.name, tc.table
    ))
    .await
    .unwrap();
    (primary, db)
}

/// Awaits `task`, which creates a slot on a standby, while the primary writes
/// the running-transactions records that slot creation waits for.
async fn with_snapshots<T>(
    primary: &tokio_postgres::Client,
    task: tokio::task::JoinHandle<T>,
) -> T {
    while !task.is_finished() {
        primary
            .batch_execute("SELECT pg_log_standby_snapshot()")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    task.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoding_on_a_16_standby_delivers_and_survives_its_promotion() {
    let tc = TestCase::new("sbdec16").await;
    let (primary, db) = primary_with_outbox(16, &tc).await;
    let (standby, no_feedback) = tokio::join!(
        primary.start_standby(StandbyOptions::default()),
        primary.start_standby(StandbyOptions {
            settings: vec!["hot_standby_feedback=off".into()],
            ..Default::default()
        })
    );
    standby.wait_replayed(primary.current_lsn().await).await;
    let dir = tempfile::tempdir().unwrap();

    // Without hot_standby_feedback the primary would vacuum away what the slot needs.
    let refused = config_at(&tc, &no_feedback.url(), dir.path(), "no_feedback.toml");
    let run = relay_cli(&["run"], &refused).await;
    assert_eq!(run.code, Some(2), "{run}");
    assert!(
        run.stderr.contains("hot_standby_feedback = off")
            && run
                .stderr
                .contains("ALTER SYSTEM SET hot_standby_feedback = on"),
        "{run}"
    );
    drop(no_feedback);

    // `init` creates the slot on the standby; the primary's snapshot record ends its wait.
    let config = config_at(&tc, &standby.url(), dir.path(), "relay.toml");
    let init = tokio::spawn({
        let config = config.clone();
        async move { relay_cli(&["init"], &config).await }
    });
    let init = with_snapshots(&db, init).await;
    assert_eq!(init.code, Some(0), "{init}");
    assert!(
        init.stdout
            .contains("run SELECT pg_log_standby_snapshot(); on the primary"),
        "{init}"
    );
    assert!(init.item("server").contains("standby"), "{init}");
    let status = relay_cli(&["status"], &config).await;
    assert!(status.stdout.contains("standby (in recovery)"), "{status}");

    // The replication connection tells a standby from a primary by what the
    // server reports at startup (in_hot_standby), like the SQL connection.
    let target = |attrs: &str| {
        PgTarget::parse(&format!("{}?target_session_attrs={attrs}", standby.url())).unwrap()
    };
    match replication::connect(&target("read-write")).await {
        Err(e) => assert!(
            e.to_string().contains("is a standby (in_hot_standby = on)"),
            "{e}"
        ),
        Ok(_) => panic!("read-write accepted a standby"),
    }
    assert!(replication::connect(&target("standby")).await.is_ok());

    let relay = start_relay(outbox_relay::config::Config::load(&config).unwrap()).await;
    insert_rows(&db, &tc.table, "sb", 0, 100).await;
    eventually(60, "100 rows from the standby acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) >= 100
    })
    .await;

    // Promoted, the standby keeps the slot (it is the standby's own), and the
    // relay goes on from it.
    drop(db);
    primary.kill();
    standby.promote();
    let promoted = standby.sql().await;
    insert_rows(&promoted, &tc.table, "sb", 100, 50).await;
    eventually(60, "150 rows acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) >= 150
    })
    .await;
    let got = tokio::task::spawn_blocking({
        let (brokers, topic) = (tc.s.brokers.clone(), tc.topic("sb"));
        move || consume_all(&brokers, &[topic], 150)
    })
    .await
    .unwrap();
    let distinct: HashSet<i64> = seqs(&got).into_iter().collect();
    assert_eq!(distinct, (0..150).collect::<HashSet<i64>>());
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_slot_invalidated_by_a_recovery_conflict_is_reported_never_skipped() {
    let tc = TestCase::new("sbconflict17").await;
    let (primary, db) = primary_with_outbox(17, &tc).await;
    // Without feedback nothing holds the primary's vacuum back for the standby's slot.
    let standby = primary
        .start_standby(StandbyOptions {
            settings: vec!["hot_standby_feedback=off".into()],
            ..Default::default()
        })
        .await;
    standby.wait_replayed(primary.current_lsn().await).await;
    let create = tokio::spawn({
        let (sql, slot) = (standby.sql().await, tc.name.clone());
        async move {
            sql.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
        }
    });
    with_snapshots(&db, create).await;
    // Catalog rows the slot still needs, removed on the primary: the standby
    // invalidates the slot when it replays the removal.
    for sql in [
        "CREATE TABLE conflict_probe (x int)",
        "DROP TABLE conflict_probe",
        "VACUUM pg_class",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    standby.wait_replayed(primary.current_lsn().await).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_at(&tc, &standby.url(), dir.path(), "relay.toml");
    let mut status = relay_cli(&["status"], &config).await;
    for _ in 0..50 {
        if status.stdout.contains("invalidation") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = relay_cli(&["status"], &config).await;
    }
    assert_eq!(status.code, Some(1), "{status}");
    assert!(
        status.stdout.contains("invalidation_reason = rows_removed"),
        "{status}"
    );
    assert!(
        status.stderr.contains("was invalidated")
            && status.stderr.contains("may be missing from Kafka")
            && status.stderr.contains("pg_drop_replication_slot"),
        "{status}"
    );
}
