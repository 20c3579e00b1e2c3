//! Faults on the PostgreSQL side: the server restarted (fast and immediate),
//! the walsender killed in the middle of a large transaction, the relay killed
//! with SIGKILL again and again, and the slot dropped or invalidated
//! (`max_slot_wal_keep_size`) under a running relay. Every committed row
//! reaches Kafka at least once; duplicates are counted.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::Metrics;
use outbox_relay::relay::RelayError;
use outbox_relay::setup::SetupError;

use crate::harness::*;

/// Whether a walsender that started at or after `since` streams from `slot`.
async fn streaming_since(db: &tokio_postgres::Client, slot: &str, since: SystemTime) -> bool {
    db.query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots r JOIN pg_stat_activity a ON a.pid = r.active_pid
             WHERE r.slot_name = $1 AND a.backend_start >= $2)",
            &[&slot, &since],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every row in the table is in `got`; returns the number of duplicates.
fn assert_all_delivered(committed: &HashSet<i64>, got: &[Consumed]) -> usize {
    let all = seqs(got);
    let distinct: HashSet<i64> = all.iter().copied().collect();
    let mut missing: Vec<_> = committed.difference(&distinct).copied().collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "committed rows never delivered: {missing:?}"
    );
    all.len() - distinct.len()
}

async fn committed_seqs(db: &tokio_postgres::Client, table: &str) -> HashSet<i64> {
    db.query(
        &format!("SELECT (payload->>'seq')::bigint FROM {table}"),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, i64>(0))
    .collect()
}

/// A relay on an own cluster: its outbox table (`sql/001_outbox.sql`), a
/// connection, a MockCluster with the `evt` topic (no topic creation), and the
/// config for slot `name` (`kafka_extra` appended), as text and parsed.
struct OwnClusterRelay {
    tc: TestCase,
    db: tokio_postgres::Client,
    mock: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    text: String,
    cfg: Config,
}

async fn own_cluster_relay(pg: &PgCluster, name: &str, kafka_extra: &str) -> OwnClusterRelay {
    let tc = TestCase {
        name: name.into(),
        table: "outbox".into(),
        s: servers(),
    };
    let db = pg.sql().await;
    db.batch_execute(include_str!("../../sql/001_outbox.sql"))
        .await
        .unwrap();
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic(&tc.topic("evt"), 1, 1).unwrap();
    let text = tc
        .config_text(&mock.bootstrap_servers(), kafka_extra)
        .replace("create_topics = true", "create_topics = false")
        .replace(&servers().url(), &pg.url());
    let cfg = Config::from_toml(&text, Path::new("t"), |_| None).unwrap();
    OwnClusterRelay {
        tc,
        db,
        mock,
        text,
        cfg,
    }
}

/// The confirmed position of slot `slot` on the server of `db`.
async fn slot_confirmed(db: &tokio_postgres::Client, slot: &str) -> Lsn {
    db.query_one(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .get::<_, String>(0)
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate_lose_nothing() {
    let pg = PgCluster::start();
    let s = servers();
    let tc = TestCase {
        name: "pgrestart".into(),
        table: "outbox".into(),
        s: servers(),
    };
    let db = pg.sql().await;
    db.batch_execute(include_str!("../../sql/001_outbox.sql"))
        .await
        .unwrap();
    let text = tc.config_text(&s.brokers, "").replace(&s.url(), &pg.url());
    let cfg = Config::from_toml(&text, Path::new("t"), |_| None).unwrap();
    let relay = start_relay(cfg).await;

    let mut next = 0i64;
    let started = Instant::now();
    let mut max_recovery = Duration::ZERO;
    for mode in ["fast", "immediate"] {
        let db = pg.sql().await;
        for _ in 0..10 {
            insert_rows(&db, "outbox", "evt", next, 10).await;
            next += 10;
        }
        // A large transaction (well over logical_decoding_work_mem = 64kB) right before the stop.
        db.batch_execute(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             SELECT 'evt', 'k' || (i % 10), 'E', jsonb_build_object('seq', i, 'pad', repeat('x', 100)) FROM generate_series({next}, {}) i",
            next + 999
        ))
        .await
        .unwrap();
        next += 1000;
        drop(db);
        pg.stop(mode);
        tokio::time::sleep(Duration::from_millis(500)).await;
        pg.start_again();
        let restarted = Instant::now();
        // The relay reconnects on its own with backoff.
        eventually(60, "relay streaming again", || async {
            relay.metrics.is_active()
        })
        .await;
        max_recovery = max_recovery.max(restarted.elapsed());
    }
    let db = pg.sql().await;
    let end = insert_rows(&db, "outbox", "evt", next, 10).await;
    eventually(90, "everything confirmed after the restarts", || async {
        let c = db.query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgrestart'", &[]).await.unwrap();
        c.get::<_, String>(0).parse::<Lsn>().unwrap() >= end
    })
    .await;
    let committed = committed_seqs(&db, "outbox").await;
    assert!(committed.len() >= 2200, "the writes committed");
    let got = consume_until(&s.brokers, &[tc.topic("evt")], |g| {
        seqs(g).into_iter().collect::<HashSet<_>>().len() >= committed.len()
    });
    let duplicates = assert_all_delivered(&committed, &got);
    eprintln!(
        "FAULT pg_restarts: written={} delivered={} duplicates={duplicates} restarts=2 reconnects={} max_recovery_ms={} total_ms={}",
        committed.len(),
        got.len(),
        relay.metrics.reconnects.get(),
        max_recovery.as_millis(),
        started.elapsed().as_millis()
    );
    assert!(relay.metrics.reconnects.get() >= 2);
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walsender_killed_mid_large_transaction_delivers_it_whole() {
    let tc = TestCase::new("cutconn").await;
    let s = servers();
    let relay = start_relay(tc.config()).await;
    let db = s.sql().await;
    // 2,000 rows with padding (0.25 MB, 4 times logical_decoding_work_mem), streamed by the walsender after commit.
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'evt', 'k' || (i % 10), 'E', jsonb_build_object('seq', i, 'pad', repeat('x', 100)) FROM generate_series(0, 1999) i",
        t = tc.table
    ))
    .await
    .unwrap();
    let end = wal_insert_lsn(&db).await;
    let t0 = std::time::Instant::now();
    // Cut the replication connection while the transaction is in flight.
    eventually(30, "first records of the transaction", || async {
        Metrics::total(&relay.metrics.events_received) > 0
    })
    .await;
    let received_at_cut = Metrics::total(&relay.metrics.events_received);
    db.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&tc.name],
    )
    .await
    .unwrap();
    eventually(60, "transaction confirmed after reconnecting", || async {
        tc.confirmed().await >= end
    })
    .await;
    let recovery = t0.elapsed();
    let committed: HashSet<i64> = (0..2000).collect();
    let got = consume_until(&s.brokers, &[tc.topic("evt")], |g| {
        seqs(g).into_iter().collect::<HashSet<_>>().len() >= 2000
    });
    let duplicates = assert_all_delivered(&committed, &got);
    eprintln!(
        "FAULT walsender_cut: written=2000 delivered={} duplicates={duplicates} cut_after_received={received_at_cut} acked={} failed={} reconnects={} recovery_ms={}",
        got.len(),
        Metrics::total(&relay.metrics.events_acked),
        Metrics::total(&relay.metrics.events_failed),
        relay.metrics.reconnects.get(),
        recovery.as_millis()
    );
    assert!(
        duplicates <= 2000,
        "at most the interrupted transaction is sent again"
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_a_running_relay_is_fatal_and_never_recreated() {
    let tc = TestCase::new("dropslot").await;
    let s = servers();
    let relay = start_relay(tc.config()).await;
    let db = s.sql().await;
    // Kill the walsender and drop the slot before the relay reconnects.
    db.batch_execute(&format!(
        "DO $$ DECLARE p int; BEGIN
           SELECT active_pid INTO p FROM pg_replication_slots WHERE slot_name = '{n}';
           PERFORM pg_terminate_backend(p);
           PERFORM pg_sleep(0.05);
           PERFORM pg_drop_replication_slot('{n}');
         END $$;",
        n = tc.name
    ))
    .await
    .unwrap();
    let dropped = Instant::now();
    let err = relay.join().await.unwrap_err();
    let fatal_after = dropped.elapsed();
    assert!(
        matches!(&err, RelayError::Setup(e) if matches!(**e, SetupError::SlotMissing { .. })),
        "{err:?}"
    );
    assert!(err.is_fatal());
    let msg = err.to_string();
    assert!(
        msg.contains("may be missing from Kafka") && msg.contains("outbox-relay init"),
        "{msg}"
    );
    assert!(
        !tc.slot_exists(false).await,
        "the relay must not recreate the slot silently"
    );

    // A fresh start sees the publication without its slot: the same error, still no slot.
    let err = spawn_relay(tc.config()).join().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("is missing but its publication exists"),
        "{err}"
    );
    assert!(!tc.slot_exists(false).await);

    // Opting in recreates it.
    let text = tc
        .config_text(&s.brokers, "")
        .replace("[postgres]\n", "[postgres]\nrecreate_missing_slot = true\n");
    let relay = start_relay(Config::from_toml(&text, Path::new("t"), |_| None).unwrap()).await;
    assert!(tc.slot_exists(false).await);
    relay.stop().await.unwrap();
    eprintln!(
        "FAULT slot_dropped: fatal_after_ms={} recreated_only_with_opt_in=true",
        fatal_after.as_millis()
    );
}

/// The slot's `wal_status` on `db`, `None` if the slot does not exist.
async fn wal_status(db: &tokio_postgres::Client, slot: &str) -> Option<Option<String>> {
    db.query_opt(
        "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_under_a_running_relay_is_fatal_and_never_recreated() {
    // A server that keeps no WAL for a slot beyond the current segment: the
    // first checkpoint after a segment switch invalidates a slot left behind.
    let pg = PgCluster::start_with(ClusterOptions {
        settings: vec![
            "max_slot_wal_keep_size=1MB".into(),
            "wal_keep_size=0".into(),
            "min_wal_size=32MB".into(),
            "max_wal_size=64MB".into(),
        ],
        ..Default::default()
    });
    // Kafka that can go away: the slot then stays where the last acknowledged record was.
    let OwnClusterRelay {
        tc,
        db,
        mock,
        text,
        cfg,
    } = own_cluster_relay(
        &pg,
        "lostslot",
        "[kafka.properties]\n\"message.timeout.ms\" = 300000\n",
    )
    .await;
    db.batch_execute("CREATE TABLE scratch (pad text)")
        .await
        .unwrap();
    let relay = start_relay(cfg.clone()).await;
    let confirmed = || slot_confirmed(&db, "lostslot");
    let first = insert_rows(&db, "outbox", "evt", 0, 5).await;
    eventually(30, "first rows confirmed", || async {
        confirmed().await >= first
    })
    .await;

    mock.broker_down(1).unwrap();
    let held = insert_rows(&db, "outbox", "evt", 5, 5).await;
    // WAL moves on while the slot waits for Kafka; checkpoints remove what it still needs.
    let started = Instant::now();
    let mut switches = 0;
    while wal_status(&db, &tc.name).await != Some(Some("lost".into())) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "slot not invalidated after {switches} WAL switches: {:?}",
            wal_status(&db, &tc.name).await
        );
        db.batch_execute(
            "INSERT INTO scratch SELECT repeat('x', 100) FROM generate_series(1, 1000);
             SELECT pg_switch_wal();
             CHECKPOINT;",
        )
        .await
        .unwrap();
        switches += 1;
    }
    let lost_after = started.elapsed();
    assert!(
        confirmed().await < held,
        "the unacknowledged rows were never confirmed"
    );

    // The relay notices (its walsender was terminated, it reconnects and finds
    // the slot lost) and stops for good instead of retrying.
    let err = relay.join().await.unwrap_err();
    let stopped_after = started.elapsed();
    assert!(err.is_fatal(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("may be missing from Kafka")
            && msg.contains("pg_drop_replication_slot('lostslot')")
            && msg.contains("outbox-relay init"),
        "the error must say events may be missing and how to recover: {msg}"
    );
    assert_eq!(
        wal_status(&db, &tc.name).await,
        Some(Some("lost".into())),
        "the lost slot is left as it is, not dropped or recreated"
    );

    // Starting the binary again refuses as well (exit 2, one line), even with
    // recreate_missing_slot: the slot is not missing, and a new one would skip
    // the lost events silently.
    let config =
        config_file(&text.replace("[postgres]\n", "[postgres]\nrecreate_missing_slot = true\n"));
    let out = relay_cli(&["run"], config.path()).await;
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("outbox-relay: "))
        .collect();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        errors.len() == 1
            && errors[0].contains("replication slot \"lostslot\" is lost (wal_status = lost)")
            && errors[0].contains("may be missing from Kafka"),
        "{out}"
    );
    assert_eq!(wal_status(&db, &tc.name).await, Some(Some("lost".into())));
    eprintln!(
        "FAULT slot_invalidated: written=10 acked_before_outage=5 wal_switches={switches} lost_after_ms={} fatal_after_ms={}",
        lost_after.as_millis(),
        stopped_after.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing_and_keeps_per_key_order() {
    sigkill_loop_loses_nothing_and_keeps_per_key_order(servers()).await;
}

/// Also run on each version of the matrix.
pub async fn sigkill_loop_loses_nothing_and_keeps_per_key_order(s: &'static Servers) {
    let tc = TestCase::on(s, "sigkill").await;
    let dir = tempfile::tempdir().unwrap();
    let (config, log, mut child) = tc.start_binary(dir.path()).await;

    const TOTAL: i64 = 6000;
    let writer = paced_writer(s, &tc.table, TOTAL, 6, Duration::from_millis(2));
    // Deterministic pseudo-random kill points. Recovery: from a restart until
    // the new instance streams, if that happens before the next kill.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut kills = 0;
    let mut recoveries = Vec::new();
    let mut respawned = None;
    let probe = s.sql().await;
    while !writer.is_finished() && kills < 12 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let kill_at = Instant::now() + Duration::from_millis(150 + state % 500);
        if let Some(at) = respawned.take() {
            while Instant::now() < kill_at {
                if streaming_since(&probe, &tc.name, at).await {
                    recoveries.push(at.elapsed().unwrap());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        tokio::time::sleep_until(kill_at.into()).await;
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        respawned = Some(SystemTime::now());
        child = spawn_relay_binary(&config, &log);
    }
    if let Some(at) = respawned {
        eventually(60, "the last instance streams", || {
            streaming_since(&probe, &tc.name, at)
        })
        .await;
        recoveries.push(at.elapsed().unwrap());
    }
    writer.await.unwrap();
    let db = s.sql().await;
    let end = wal_insert_lsn(&db).await;
    let written_at = Instant::now();
    eventually(90, "last instance confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    let catch_up = written_at.elapsed();
    terminate(&mut child);

    let got = consume_distinct(&s.brokers, &tc.topic("evt"), TOTAL as usize);
    let committed: HashSet<i64> = (0..TOTAL).collect();
    let duplicates = assert_all_delivered(&committed, &got);
    // Per key, first occurrences in partition order follow commit order (seq order per key).
    let mut seen = HashSet::new();
    let mut firsts: HashMap<String, Vec<i64>> = HashMap::new();
    for (r, seq) in got.iter().zip(seqs(&got)) {
        if seen.insert(seq) {
            firsts.entry(r.key.clone()).or_default().push(seq);
        }
    }
    for (k, v) in firsts {
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "first occurrences of key {k} out of commit order"
        );
    }
    eprintln!(
        "FAULT sigkill: written={TOTAL} delivered={} duplicates={duplicates} kills={kills} recovered_before_next_kill={} max_recovery_ms={} catch_up_ms={}",
        got.len(),
        recoveries.len(),
        recoveries.iter().max().unwrap_or(&Duration::ZERO).as_millis(),
        catch_up.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_with_every_replication_slot_taken_waits_and_creates_its_slot() {
    // One replication slot, held by something else: the relay's first start
    // creates the publication, fails to create its slot (53400), and must
    // create it on a later attempt once a slot is free, not call it lost.
    let pg = PgCluster::start_with(ClusterOptions {
        settings: vec!["max_replication_slots=1".into()],
        ..Default::default()
    });
    let OwnClusterRelay {
        db,
        mock: _mock,
        cfg,
        ..
    } = own_cluster_relay(&pg, "slotsfull", "").await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')")
        .await
        .unwrap();
    let relay = spawn_relay(cfg);
    eventually(30, "a failed slot creation", || async {
        Metrics::total(&relay.metrics.errors) > 0
    })
    .await;
    assert!(
        !relay.is_finished(),
        "the relay gave up: {:?}",
        relay.join().await
    );
    db.batch_execute("SELECT pg_drop_replication_slot('someone_else')")
        .await
        .unwrap();
    eventually(30, "the relay streaming from its own slot", || async {
        relay.metrics.is_active()
    })
    .await;
    let end = insert_rows(&db, "outbox", "evt", 0, 5).await;
    eventually(30, "the rows confirmed", || async {
        slot_confirmed(&db, "slotsfull").await >= end
    })
    .await;
    relay.stop().await.unwrap();
}
