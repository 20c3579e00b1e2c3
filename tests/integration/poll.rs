//! The polling mode (`[source] kind = "poll"`) against the real PostgreSQL
//! and broker: a backlog and live rows exactly once in per-key order (delete
//! and mark), transactions committing against the order of their ids and one
//! held open across many polls, writers serialized per aggregate whose xids
//! run against their commit order, a SIGKILL loop, two instances with one
//! leader, a bad row under both `on_invalid` policies, a server with
//! `wal_level = replica` and a role without REPLICATION, NOTIFY waking an
//! idle poller, and `run` before `init`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_relay::metrics::Metrics;
use outbox_relay::relay::{Disposition, RelayError};

use crate::harness::*;

/// `payload.<field>` of a consumed record.
fn field(r: &Consumed, name: &str) -> i64 {
    serde_json::from_str::<serde_json::Value>(&r.value).unwrap()[name]
        .as_i64()
        .unwrap_or_else(|| panic!("no {name} in {}", r.value))
}

/// Every seq of `0..total` exactly once.
fn assert_exactly_once(got: &[Consumed], total: i64) {
    let all = seqs(got);
    let distinct: HashSet<i64> = all.iter().copied().collect();
    let missing: Vec<i64> = (0..total).filter(|s| !distinct.contains(s)).collect();
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    assert_eq!(all.len(), distinct.len(), "rows delivered twice");
}

/// Per key, `payload.<by>` increases along the partition (the records come
/// sorted by topic, partition, offset).
fn assert_key_order(got: &[Consumed], by: &str) {
    let mut last: HashMap<(&str, &str), i64> = HashMap::new();
    for r in got {
        let v = field(r, by);
        if let Some(prev) = last.insert((&r.topic, &r.key), v) {
            assert!(
                prev < v,
                "key {} of {}: {by} {v} arrived after {prev}",
                r.key,
                r.topic
            );
        }
    }
}

async fn acked(relay: &RunningRelay) -> u64 {
    Metrics::total(&relay.metrics.events_acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_and_live_rows_arrive_once_in_key_order_and_are_deleted() {
    backlog_and_live("poll_delete", "", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_and_live_rows_arrive_once_in_key_order_and_are_marked() {
    backlog_and_live(
        "poll_mark",
        "after_send = \"mark\"\nnotify = true\n",
        "WHERE sent_at IS NULL",
    )
    .await;
}

async fn backlog_and_live(name: &str, poll: &str, unsent: &str) {
    let tc = TestCase::new(name).await;
    let s = servers();
    let cfg = tc.poll_config(poll);
    init_poll(&cfg).await;
    let db = s.sql().await;
    const BACKLOG: i64 = 600;
    const LIVE: i64 = 600;
    for from in (0..BACKLOG).step_by(100) {
        insert_rows(&db, &tc.table, "evt", from, 100).await;
    }
    let relay = start_relay(cfg).await;
    // One writer, transactions of 1 to 9 rows: per key, commit order is seq order.
    let mut next = BACKLOG;
    while next < BACKLOG + LIVE {
        let n = (1 + next % 9).min(BACKLOG + LIVE - next);
        insert_rows(&db, &tc.table, "evt", next, n).await;
        next += n;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let total = BACKLOG + LIVE;
    eventually(60, "every row acknowledged and removed", || async {
        acked(&relay).await >= total as u64 && tc.rows_left(unsent).await == 0
    })
    .await;
    let m = relay.metrics.clone();
    relay.stop().await.unwrap();
    assert_eq!(m.poll.rows_removed.get(), total as u64);
    assert!(m.poll.queries.with_label_values(&["rows"]).get() > 0);
    if !unsent.is_empty() {
        // Marked, not deleted: every row is still there, with its time.
        assert_eq!(tc.rows_left("WHERE sent_at IS NOT NULL").await, total);
    }
    let got = consume_all(&s.brokers, &[tc.topic("evt")], total as usize);
    assert_exactly_once(&got, total);
    assert_key_order(&got, "seq");
    let r = &got[0];
    assert!(r.header("id").is_some(), "{:?}", r.headers);
    assert_eq!(r.header("event_type"), Some("E"));
    assert_eq!(r.header("lsn"), None, "polling knows no commit LSN");
}

/// Writers of one aggregate serialized by a row lock taken before the
/// insert, as docs/polling.md requires for per-key order: each takes its
/// xid first, so xid order and commit order differ.
async fn serialized_write(
    db: &tokio_postgres::Client,
    table: &str,
    agg: &str,
    key: &str,
    seq: i64,
    hold: Duration,
) -> (i64, i64) {
    db.batch_execute("BEGIN").await.unwrap();
    let xid: i64 = db
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis((seq * 7 % 3) as u64)).await;
    let v: i32 = db
        .query_one(
            &format!("UPDATE {agg} SET v = v + 1 WHERE k = $1 RETURNING v"),
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('agg', '{key}', 'E', jsonb_build_object('seq', {seq}, 'v', {v}))"
    ))
    .await
    .unwrap();
    tokio::time::sleep(hold).await;
    db.batch_execute("COMMIT").await.unwrap();
    (xid, i64::from(v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_against_id_order_and_a_held_transaction_lose_nothing_and_keep_key_order() {
    let tc = TestCase::new("poll_order").await;
    let s = servers();
    let cfg = tc.poll_config("");
    init_poll(&cfg).await;
    let db = s.sql().await;
    let agg = format!("agg_{}", tc.name);
    db.batch_execute(&format!(
        "CREATE TABLE {agg} (k text PRIMARY KEY, v int NOT NULL);
         INSERT INTO {agg} SELECT 'a' || i, 0 FROM generate_series(0, 3) i"
    ))
    .await
    .unwrap();
    let relay = start_relay(cfg).await;
    let table = format!("public.{}", tc.table);
    let seq = Arc::new(AtomicI64::new(0));
    let next = || seq.fetch_add(1, Ordering::SeqCst);

    // A transaction takes the lowest id and stays open across many polls.
    let held = s.sql().await;
    held.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         VALUES ('rev', 'held', 'E', jsonb_build_object('seq', {}))",
        next()
    ))
    .await
    .unwrap();

    // Rounds of five transactions committing in the reverse order of their ids.
    let mut writers = Vec::new();
    for _ in 0..5 {
        writers.push(s.sql().await);
    }
    const ROUNDS: i64 = 20;
    for round in 0..ROUNDS {
        for (i, w) in writers.iter().enumerate() {
            w.batch_execute(&format!(
                "BEGIN; INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('rev', 'r{round}_{i}', 'E', jsonb_build_object('seq', {}))",
                next()
            ))
            .await
            .unwrap();
        }
        for w in writers.iter().rev() {
            w.batch_execute("COMMIT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    }
    // Everything committed so far passes the open transaction's lower id.
    let reversed = (ROUNDS * 5) as u64;
    eventually(
        30,
        "the reversed rows delivered past the held one",
        || async { acked(&relay).await >= reversed },
    )
    .await;
    let polls_before = relay
        .metrics
        .poll
        .queries
        .with_label_values(&["empty"])
        .get()
        + relay
            .metrics
            .poll
            .queries
            .with_label_values(&["rows"])
            .get();

    // Aggregate a0, scripted: `late` takes its xid first, then waits for the
    // row lock `early` holds; `early` commits first with the higher xid.
    let (early, late) = (s.sql().await, s.sql().await);
    late.batch_execute("BEGIN").await.unwrap();
    let late_xid: i64 = late
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    early.batch_execute("BEGIN").await.unwrap();
    let early_xid: i64 = early
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    let early_v: i32 = early
        .query_one(
            &format!("UPDATE {agg} SET v = v + 1 WHERE k = 'a0' RETURNING v"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    early
        .batch_execute(&format!(
            "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
             VALUES ('agg', 'a0', 'E', jsonb_build_object('seq', {}, 'v', {early_v}))",
            next()
        ))
        .await
        .unwrap();
    let late_task = {
        let (table, agg, seq) = (table.clone(), agg.clone(), next());
        tokio::spawn(async move {
            let v: i32 = late
                .query_one(
                    &format!("UPDATE {agg} SET v = v + 1 WHERE k = 'a0' RETURNING v"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            late.batch_execute(&format!(
                "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('agg', 'a0', 'E', jsonb_build_object('seq', {seq}, 'v', {v}));
                 COMMIT"
            ))
            .await
            .unwrap();
            i64::from(v)
        })
    };
    // `late` waits for the row lock (or takes it after the commit: either
    // way its higher version comes with the lower xid); polls run meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    early.batch_execute("COMMIT").await.unwrap();
    let early_v = i64::from(early_v);
    let late_v = late_task.await.unwrap();
    assert!(
        late_xid < early_xid && late_v > early_v,
        "the script must make xid order and commit order differ: late xid {late_xid} v {late_v}, early xid {early_xid} v {early_v}"
    );

    // Aggregates a1..a3: four writers at once, each taking its xid before the lock.
    let inversions = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let (table, agg, seq, inv) =
                (table.clone(), agg.clone(), seq.clone(), inversions.clone());
            tokio::spawn(async move {
                let db = servers().sql().await;
                for i in 0..25 {
                    let key = format!("a{}", 1 + (w + i) % 3);
                    let n = seq.fetch_add(1, Ordering::SeqCst);
                    let hold = Duration::from_millis((n % 4) as u64);
                    let (xid, v) = serialized_write(&db, &table, &agg, &key, n, hold).await;
                    inv.lock().unwrap().push((key, xid, v));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let polls_during_hold = relay
        .metrics
        .poll
        .queries
        .with_label_values(&["empty"])
        .get()
        + relay
            .metrics
            .poll
            .queries
            .with_label_values(&["rows"])
            .get()
        - polls_before;
    assert!(
        polls_during_hold >= 5,
        "the held transaction stayed open across only {polls_during_hold} polls"
    );
    held.batch_execute("COMMIT").await.unwrap();

    let total = seq.load(Ordering::SeqCst);
    eventually(60, "every row acknowledged and deleted", || async {
        acked(&relay).await >= total as u64 && tc.rows_left("").await == 0
    })
    .await;
    relay.stop().await.unwrap();

    let got = consume_all(
        &s.brokers,
        &[tc.topic("rev"), tc.topic("agg")],
        total as usize,
    );
    assert_exactly_once(&got, total);
    let per_agg: Vec<Consumed> = got
        .iter()
        .filter(|r| r.topic == tc.topic("agg"))
        .cloned()
        .collect();
    assert_key_order(&per_agg, "v");
    // Per aggregate, versions 1..n all arrived (the lock made them dense).
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for r in &per_agg {
        versions
            .entry(r.key.clone())
            .or_default()
            .push(field(r, "v"));
    }
    for (k, vs) in &versions {
        assert_eq!(
            *vs,
            (1..=vs.len() as i64).collect::<Vec<_>>(),
            "versions of {k}"
        );
    }
    // The concurrent writers also produced xid inversions within a key.
    let mut by_key: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for (k, xid, v) in inversions.lock().unwrap().iter() {
        by_key.entry(k.clone()).or_default().push((*v, *xid));
    }
    let inverted: usize = by_key
        .values_mut()
        .map(|rows| {
            rows.sort();
            rows.windows(2).filter(|w| w[1].1 < w[0].1).count()
        })
        .sum();
    eprintln!(
        "POLL order: rows={total} held across {polls_during_hold} polls; same-key pairs committed against xid order: 1 scripted + {inverted} concurrent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_loop_loses_nothing_and_resends_only_the_in_flight_tail() {
    let tc = TestCase::new("poll_crash").await;
    let s = servers();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let text = tc
        .poll_config_text("")
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    init_poll(&parse_config(&text)).await;
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, &text).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = KillOnDrop(spawn_relay_binary(&config, &log));

    let mut lp = KillLoop::start(&tc.table, &addr);
    let mut kills = Vec::new();
    for _ in 0..5 {
        kills.push(lp.kill(&mut child.0, 300, 500).await);
        child = KillOnDrop(spawn_relay_binary(&config, &log));
    }
    let total = lp.stop_writing().await;
    eventually(
        90,
        "the last instance sends and deletes every row",
        || async { tc.rows_left("").await == 0 },
    )
    .await;
    lp.stop_reading();
    terminate(&mut child.0);

    let got = consume_distinct(&s.brokers, &tc.topic("evt"), total as usize);
    check_resends("POLL crash", &seqs(&got), total, &kills, "");
}

async fn get(addr: &str, path: &'static str) -> Option<(u16, String)> {
    let a = addr.to_string();
    tokio::task::spawn_blocking(move || http_get(&a, path))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_leader_the_standby_takes_over_after_a_sigkill() {
    let tc = TestCase::new("poll_ha").await;
    let s = servers();
    let dir = tempfile::tempdir().unwrap();
    let (addr_a, addr_b) = (free_addr(), free_addr());
    for (name, addr) in [("a", &addr_a), ("b", &addr_b)] {
        let text = tc
            .poll_config_text("")
            .replace("[relay]\n", "[relay]\nstandby_retry_ms = 200\n")
            .replace("listen = \"\"", &format!("listen = \"{addr}\""));
        if name == "a" {
            init_poll(&parse_config(&text)).await;
        }
        std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
    }
    let mut a = KillOnDrop(spawn_relay_binary(
        &dir.path().join("a.toml"),
        &dir.path().join("a.log"),
    ));
    eventually(30, "instance a polling", || async {
        get(&addr_a, "/readyz")
            .await
            .is_some_and(|(c, b)| c == 200 && b.starts_with("ready"))
    })
    .await;
    let mut b = KillOnDrop(spawn_relay_binary(
        &dir.path().join("b.toml"),
        &dir.path().join("b.log"),
    ));
    eventually(30, "instance b standing by", || async {
        get(&addr_b, "/readyz")
            .await
            .is_some_and(|(c, b)| c == 200 && b.starts_with("standby"))
    })
    .await;

    const TOTAL: i64 = 2000;
    let committed = Arc::new(AtomicI64::new(-1));
    let writer = {
        let (table, committed) = (tc.table.clone(), committed.clone());
        tokio::spawn(async move {
            let db = servers().sql().await;
            for i in (0..TOTAL).step_by(5) {
                insert_rows(&db, &table, "evt", i, 5).await;
                committed.store(i + 4, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    // While a leads, b sends nothing and only a holds the lock.
    let mut history = Vec::new();
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        if let Some(r) = read_metrics(&addr_a) {
            history.push(r);
        }
        let rb = read_metrics(&addr_b).expect("metrics of b");
        assert_eq!(
            rb.produced, 0.0,
            "the standby produced while the leader ran"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let holders: i64 = s
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1::text::regclass::oid",
            &[&format!("public.{}", tc.table)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 1, "one leader lock");
    let last = read_metrics(&addr_a).expect("metrics of a");
    let before_kill_b = read_metrics(&addr_b).expect("metrics of b");
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let killed = Instant::now();
    let kill = Kill::from_readings(&history, last, committed.load(Ordering::SeqCst));
    assert_eq!(before_kill_b.produced, 0.0);
    eventually(30, "instance b takes over", || async {
        get(&addr_b, "/readyz")
            .await
            .is_some_and(|(c, b)| c == 200 && b.starts_with("ready"))
    })
    .await;
    let takeover = killed.elapsed();
    writer.await.unwrap();
    eventually(60, "instance b sends and deletes every row", || async {
        tc.rows_left("").await == 0
    })
    .await;
    terminate(&mut b.0);

    let got = consume_distinct(&s.brokers, &tc.topic("evt"), TOTAL as usize);
    let all = seqs(&got);
    let distinct: HashSet<i64> = all.iter().copied().collect();
    let missing: Vec<i64> = (0..TOTAL).filter(|i| !distinct.contains(i)).collect();
    assert!(missing.is_empty(), "rows lost in the takeover: {missing:?}");
    let duplicates = all.len() - distinct.len();
    eprintln!(
        "POLL ha: written={TOTAL} delivered={} duplicates={duplicates} allowed={} (in_flight={} acked_{}ms={} slack={}) takeover_ms={}",
        all.len(),
        kill.allowance(),
        kill.in_flight,
        ACKED_WINDOW.as_millis(),
        kill.acked_in_window,
        kill.produced_slack,
        takeover.as_millis()
    );
    assert!(
        duplicates <= kill.allowance(),
        "{duplicates} rows sent by both instances, more than a's in-flight tail at the kill ({kill:?})"
    );
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
}

/// Rows 0..10, a row whose topic is invalid (seq 10), rows 11..21.
async fn rows_around_a_bad_one(tc: &TestCase) -> String {
    let db = tc.s.sql().await;
    insert_rows(&db, &tc.table, "evt", 0, 10).await;
    let bad_id: String = db
        .query_one(
            &format!(
                "INSERT INTO public.{} (aggregate_type, aggregate_id, event_type, payload)
                 VALUES ('bad topic', 'k0', 'E', '{{\"seq\": 10}}') RETURNING id::text",
                tc.table
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    insert_rows(&db, &tc.table, "evt", 11, 10).await;
    bad_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_stops_the_relay_naming_it_and_nothing_past_it_is_deleted() {
    let tc = TestCase::new("poll_bad_stop").await;
    let cfg = tc.poll_config("");
    init_poll(&cfg).await;
    let bad_id = rows_around_a_bad_one(&tc).await;
    let relay = spawn_relay(cfg);
    let m = relay.metrics.clone();
    let err = relay
        .join()
        .await
        .expect_err("the relay stops at the bad row");
    let text = err.to_string();
    assert!(matches!(err, RelayError::Poll(_)), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Stop { exit: 1 }, "{text}");
    for needle in [
        bad_id.as_str(),
        "bad topic\"",
        "relay_seq = 11",
        "on_invalid = \"dead_letter\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
    assert!(!text.contains("LSN"), "polling knows no LSN: {text}");
    // The ten rows before it were delivered and deleted; it and all after it stay.
    assert_eq!(Metrics::total(&m.events_acked), 10);
    let db = tc.s.sql().await;
    let left: Vec<String> = db
        .query(
            &format!(
                "SELECT id::text FROM public.{} ORDER BY relay_seq",
                tc.table
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left.len(), 11, "the bad row and the ten after it");
    assert_eq!(left[0], bad_id);
    let got = consume_all(&tc.s.brokers, &[tc.topic("evt")], 10);
    assert_eq!(
        seqs(&got).into_iter().collect::<HashSet<_>>(),
        (0..10).collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_goes_to_the_dead_letter_topic_and_polling_goes_on() {
    let tc = TestCase::new("poll_bad_dlq").await;
    let dlq = format!("{}.dlq", tc.name);
    let text = tc.poll_config_text("").replace(
        "[outbox]\n",
        &format!("[outbox]\non_invalid = \"dead_letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let cfg = parse_config(&text);
    init_poll(&cfg).await;
    let bad_id = rows_around_a_bad_one(&tc).await;
    let relay = start_relay(cfg).await;
    eventually(30, "every row sent and deleted", || async {
        tc.rows_left("").await == 0
    })
    .await;
    let m = relay.metrics.clone();
    relay.stop().await.unwrap();
    assert_eq!(Metrics::total(&m.events_dead_lettered), 1);
    let good = consume_all(&tc.s.brokers, &[tc.topic("evt")], 20);
    assert_eq!(
        seqs(&good).into_iter().collect::<HashSet<_>>(),
        (0..21).filter(|s| *s != 10).collect()
    );
    let dead = consume_all(&tc.s.brokers, &[dlq], 1);
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.header("id"), Some(bad_id.as_str()));
    assert_eq!(d.header("reason"), Some("bad_topic"));
    assert_eq!(d.header("table").unwrap(), format!("public.{}", tc.table));
    assert_eq!(d.header("lsn"), None);
    assert_eq!(d.key, "k0");
    assert!(d.value.contains("\"seq\": 10"), "{}", d.value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_works_with_wal_level_replica_and_a_role_without_replication() {
    // No logical decoding, no walsenders, no slots: the WAL mode cannot run here.
    let pg = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(ClusterOptions {
            settings: vec![
                "wal_level=replica".into(),
                "max_wal_senders=0".into(),
                "max_replication_slots=0".into(),
            ],
            ..Default::default()
        })
    })
    .await
    .unwrap();
    let tc = TestCase::new("poll_replica").await;
    let admin_db = pg.sql().await;
    create_outbox_table(&admin_db, &tc.table).await;
    admin_db
        .batch_execute(&format!(
            "CREATE ROLE poller LOGIN NOREPLICATION PASSWORD 'poller-pw';
             GRANT SELECT, DELETE ON public.{} TO poller",
            tc.table
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let as_owner = dir.path().join("owner.toml");
    let owner_text = tc.poll_config_text("").replace(&tc.s.url(), &pg.url());
    std::fs::write(&as_owner, &owner_text).unwrap();

    // The WAL mode's init refuses this server; the polling mode's prints what it needs.
    let wal = dir.path().join("wal.toml");
    std::fs::write(
        &wal,
        owner_text.replace("kind = \"poll\"", "kind = \"wal\""),
    )
    .unwrap();
    let refused = relay_cli(&["init", "--dry-run"], &wal).await;
    assert_eq!(refused.code, Some(2), "{refused}");
    assert!(refused.item("wal_level").contains("replica"), "{refused}");
    let dry = relay_cli(&["init", "--dry-run"], &as_owner).await;
    assert_eq!(dry.code, Some(0), "{dry}");
    assert!(dry.item("wal_level").starts_with("ok (replica"), "{dry}");
    assert_eq!(dry.item("order column relay_seq"), "would create");
    assert_eq!(dry.item("index"), "would create");
    for sql in [
        format!("ALTER TABLE \"public\".\"{}\" ADD COLUMN IF NOT EXISTS \"relay_seq\" bigint GENERATED ALWAYS AS IDENTITY;", tc.table),
        format!("CREATE UNIQUE INDEX IF NOT EXISTS \"{}_relay_seq_poll\" ON \"public\".\"{}\" (\"relay_seq\");", tc.table, tc.table),
    ] {
        assert!(dry.stdout.contains(&sql), "{sql} missing:\n{dry}");
    }
    assert!(
        !dry.stdout.contains("PUBLICATION") && !dry.stdout.contains("slot"),
        "{dry}"
    );
    let init = relay_cli(&["init"], &as_owner).await;
    assert_eq!(init.code, Some(0), "{init}");
    assert_eq!(init.item("index"), "created");

    let db = pg.sql().await;
    insert_rows(&db, &tc.table, "evt", 0, 300).await;
    let as_poller = dir.path().join("poller.toml");
    let poller_text = owner_text.replace(
        &pg.url(),
        &pg.url()
            .replace("postgres:", "poller:")
            .replace(PASSWORD, "poller-pw"),
    );
    assert!(poller_text.contains("poller:poller-pw@"), "{poller_text}");
    std::fs::write(&as_poller, &poller_text).unwrap();
    let status = relay_cli(&["status"], &as_poller).await;
    assert_eq!(status.code, Some(0), "{status}");
    assert_eq!(status.item("unsent_rows"), "300");
    assert!(
        status
            .item("oldest_unsent_age_seconds")
            .ends_with("(from created_at)"),
        "{status}"
    );
    assert_eq!(status.item("leader_pid"), "- (no instance polls)");
    status.assert_no_secret(&["poller-pw"]);

    let relay = start_relay(parse_config(&poller_text)).await;
    eventually(30, "every row sent and deleted", || async {
        db.query_one(&format!("SELECT count(*) FROM public.{}", tc.table), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
    let json = relay_cli(&["status", "--json"], &as_poller).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["unsent_rows"], 0, "{json}");
    assert!(v["leader_pid"].as_i64().is_some(), "{json}");
    relay.stop().await.unwrap();
    let got = consume_all(&tc.s.brokers, &[tc.topic("evt")], 300);
    assert_exactly_once(&got, 300);
    assert_key_order(&got, "seq");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_poller_long_before_its_interval() {
    let tc = TestCase::new("poll_notify").await;
    // Without NOTIFY the next poll after an empty one is 20 s away.
    let cfg = tc.poll_config("interval_ms = 20000\nmax_interval_ms = 60000\nnotify = true\n");
    init_poll(&cfg).await;
    let relay = start_relay(cfg).await;
    eventually(10, "the first (empty) poll", || async {
        relay
            .metrics
            .poll
            .queries
            .with_label_values(&["empty"])
            .get()
            >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let db = tc.s.sql().await;
    let t0 = Instant::now();
    insert_rows(&db, &tc.table, "evt", 0, 1).await;
    eventually(10, "the row acknowledged", || async {
        acked(&relay).await == 1
    })
    .await;
    let woke = t0.elapsed();
    eprintln!(
        "POLL notify: insert to acknowledgement {} ms with interval_ms = 20000",
        woke.as_millis()
    );
    assert!(woke < Duration::from_secs(5), "took {woke:?}");
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_before_init_says_what_to_create() {
    let tc = TestCase::new("poll_no_init").await;
    let err = spawn_relay(tc.poll_config(""))
        .join()
        .await
        .expect_err("no order column yet");
    let text = err.to_string();
    assert_eq!(err.disposition(), Disposition::Stop { exit: 2 }, "{text}");
    assert!(text.contains("run `outbox-relay init`"), "{text}");
    assert!(
        text.contains("ADD COLUMN IF NOT EXISTS \"relay_seq\" bigint GENERATED ALWAYS AS IDENTITY"),
        "{text}"
    );
}
