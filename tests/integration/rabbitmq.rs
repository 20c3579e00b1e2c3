//! The RabbitMQ sink against a real server (`harness::rabbitmq`): every row
//! once, in commit order per key, with exact key, body and headers; restarts
//! and crashes of the relay; the server stopped and started again; records
//! the server cannot route, stopped on or dead-lettered; `check-config`.
//! Each test has its own exchange (named like its slot) and queues.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::{Health, Metrics};

use crate::harness::rabbitmq::*;
use crate::harness::*;

/// This test's config text with the RabbitMQ sink publishing to exchange
/// `<name>` (declared by the relay); `extra` goes into `[rabbitmq]`.
fn config_text(tc: &TestCase, url: &str, extra: &str) -> String {
    format!(
        "{}\n[sink]\nkind = \"rabbitmq\"\n\n[rabbitmq]\nurl = \"{url}\"\nexchange = \"{}\"\ndeclare = true\n{extra}",
        tc.config_text(&tc.s.brokers, ""),
        tc.name
    )
}

fn config(tc: &TestCase, url: &str) -> Config {
    Config::from_toml(&config_text(tc, url, ""), Path::new("t.toml"), |_| None).unwrap()
}

/// A queue `<name>.q` bound to every topic of the test (`<name>.#`).
async fn queue_for_all(tc: &TestCase, url: &str) -> String {
    let queue = format!("{}.q", tc.name);
    bind_queue(url, &tc.name, &queue, &format!("{}.#", tc.name)).await;
    queue
}

/// Inserts rows `from..from+n` of aggregate type `evt` in transactions of 1 to 9 rows.
async fn write_rows(db: &tokio_postgres::Client, table: &str, from: i64, n: i64) -> Lsn {
    let mut next = from;
    let mut end = Lsn::ZERO;
    while next < from + n {
        let k = (1 + next % 9).min(from + n - next);
        end = insert_rows(db, table, "evt", next, k).await;
        next += k;
    }
    end
}

/// Every seq of `0..total` arrived; returns the number of extra copies.
fn assert_nothing_lost(got: &[Got], total: i64) -> usize {
    let seqs: Vec<i64> = got.iter().map(Got::seq).collect();
    let distinct: HashSet<i64> = seqs.iter().copied().collect();
    let lost: Vec<i64> = (0..total).filter(|s| !distinct.contains(s)).collect();
    assert!(lost.is_empty(), "committed rows never delivered: {lost:?}");
    seqs.len() - distinct.len()
}

fn distinct_seqs(got: &[Got]) -> usize {
    got.iter().map(Got::seq).collect::<HashSet<_>>().len()
}

/// First occurrences per key come in commit (seq) order.
fn assert_order_per_key(got: &[Got]) {
    let mut seen = HashSet::new();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for g in got {
        if seen.insert(g.seq()) {
            per_key
                .entry(g.key().to_string())
                .or_default()
                .push(g.seq());
        }
    }
    for (k, seqs) in per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of commit order: {seqs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_backlog_of_mixed_sizes_and_live_rows_arrive_once_in_order_with_exact_content() {
    let mq = shared_rabbitmq();
    let tc = TestCase::new("rmq_deliver").await;
    let queue = queue_for_all(&tc, &mq.url()).await;
    let cfg = config(&tc, &mq.url());
    // The slot exists once a relay streamed: rows committed while none runs are a backlog.
    start_relay(cfg.clone()).await.stop().await.unwrap();
    let db = tc.s.sql().await;
    let t = &tc.table;
    // 200 rows over 2 types and 10 keys: mostly small, eight of 100 KB, one of 1 MB.
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
         SELECT CASE WHEN i % 2 = 0 THEN 'order' ELSE 'customer' END, 'k' || (i % 10), 'Backlog',
                jsonb_build_object('seq', i, 'text', 'ünïcødé ✓', 'pad', repeat('x',
                  CASE WHEN i = 150 THEN 1048576 WHEN i % 25 = 7 THEN 102400 ELSE i END)),
                jsonb_build_object('trace', 't' || i, 'n', i)
         FROM generate_series(0, 199) i"
    ))
    .await
    .unwrap();
    let relay = start_relay(cfg).await;
    // 300 live rows in transactions of 1 to 9 rows.
    let mut next = 200;
    while next < 500 {
        let n = (1 + next % 9).min(500 - next);
        db.batch_execute(&format!(
            "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
             SELECT CASE WHEN i % 2 = 0 THEN 'order' ELSE 'customer' END, 'k' || (i % 10), 'Live',
                    jsonb_build_object('seq', i, 'text', 'ünïcødé ✓'), jsonb_build_object('trace', 't' || i, 'n', i)
             FROM generate_series({next}, {}) i",
            next + n - 1
        ))
        .await
        .unwrap();
        next += n;
    }
    let end = wal_insert_lsn(&db).await;
    eventually(120, "every row confirmed", || async {
        tc.confirmed().await >= end
    })
    .await;
    let got = consume_n(&mq.url(), &queue, 500).await;
    assert_eq!(got.len(), 500, "each row exactly once");
    assert_order_per_key(&got);

    // Exact content, against the table.
    let rows = db
        .query(
            &format!(
                "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, (payload->>'seq')::bigint FROM {t}"
            ),
            &[],
        )
        .await
        .unwrap();
    let by_id: HashMap<String, &tokio_postgres::Row> =
        rows.iter().map(|r| (r.get::<_, String>(0), r)).collect();
    let mut sizes = Vec::new();
    for g in &got {
        let id = g.message_id.as_deref().expect("message_id = the event id");
        let row = by_id[id];
        let seq: i64 = row.get(5);
        assert_eq!(g.routing_key, tc.topic(row.get::<_, &str>(1)), "seq {seq}");
        assert_eq!(g.key(), row.get::<_, &str>(2));
        assert_eq!(g.body, row.get::<_, &str>(4).as_bytes(), "seq {seq}: body");
        assert_eq!(g.delivery_mode, Some(2), "persistent");
        let lsn = g.header("lsn").unwrap();
        lsn.parse::<Lsn>()
            .unwrap_or_else(|e| panic!("lsn header {lsn:?}: {e}"));
        let mut names: Vec<&str> = g.headers.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["event_type", "id", "key", "lsn", "n", "trace"]);
        assert_eq!(g.header("id"), Some(id));
        assert_eq!(g.header("event_type"), Some(row.get::<_, &str>(3)));
        assert_eq!(g.header("trace"), Some(format!("t{seq}").as_str()));
        assert_eq!(g.header("n"), Some(seq.to_string().as_str()));
        sizes.push(g.body.len());
    }
    assert!(sizes.iter().any(|&s| s > 1 << 20), "the 1 MB row arrived");
    assert_eq!(sizes.iter().filter(|&&s| s > 100 << 10).count(), 9);
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 500);
    relay.stop().await.unwrap();
}

/// Starts the relay binary on `text` and waits until it streams from its slot.
async fn start_binary(
    tc: &TestCase,
    dir: &Path,
    text: &str,
) -> (std::path::PathBuf, std::path::PathBuf, KillOnDrop) {
    let config = dir.join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.join("relay.log");
    let child = KillOnDrop(spawn_relay_binary(&config, &log));
    eventually(60, "relay streaming from its slot", || tc.slot_exists(true)).await;
    (config, log, child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_sigterm_mid_stream_then_restart_repeats_no_confirmed_row() {
    let mq = shared_rabbitmq();
    let tc = TestCase::new("rmq_sigterm").await;
    let queue = queue_for_all(&tc, &mq.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&tc, &mq.url(), "");
    let (config, log, mut child) = start_binary(&tc, dir.path(), &text).await;

    const TOTAL: i64 = 3000;
    let writer = paced_writer(servers(), &tc.table, TOTAL, 5, Duration::from_millis(3));
    let start = tc.confirmed().await;
    eventually(60, "relay progress", || async {
        tc.confirmed().await > start
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "the writer still writes at the stop");
    terminate(&mut child.0);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(stderr.contains("stopped streaming"), "{stderr}");
    let confirmed_at_stop = tc.confirmed().await;

    let mut child = KillOnDrop(spawn_relay_binary(&config, &log));
    writer.await.unwrap();
    let end = wal_insert_lsn(&servers().sql().await).await;
    eventually(60, "the restarted relay confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut child.0);

    let got = consume_queue(&mq.url(), &queue, |g| distinct_seqs(g) >= TOTAL as usize).await;
    let duplicates = assert_nothing_lost(&got, TOTAL);
    let mut seen = HashSet::new();
    for g in &got {
        if !seen.insert(g.seq()) {
            let lsn: Lsn = g.header("lsn").unwrap().parse().unwrap();
            assert!(
                lsn >= confirmed_at_stop,
                "row {} (commit {lsn}) was confirmed at {confirmed_at_stop} before the stop yet sent again",
                g.seq()
            );
        }
    }
    assert_order_per_key(&got);
    eprintln!("rabbitmq sigterm: {TOTAL} rows, {} messages, {duplicates} duplicates (unconfirmed at the stop), confirmed at stop {confirmed_at_stop}", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_sigkill_loop_loses_nothing() {
    let mq = shared_rabbitmq();
    let tc = TestCase::new("rmq_sigkill").await;
    let queue = queue_for_all(&tc, &mq.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&tc, &mq.url(), "");
    let (config, log, mut child) = start_binary(&tc, dir.path(), &text).await;

    // About 1,000 rows/s in transactions of 1 to 9 rows until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(0));
    let writer = {
        let (stop, written, table) = (stop.clone(), written.clone(), tc.table.clone());
        tokio::spawn(async move {
            let db = servers().sql().await;
            let mut next = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let n = 1 + next % 9;
                insert_rows(&db, &table, "evt", next, n).await;
                next += n;
                written.store(next, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            next
        })
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for kill in 0..4 {
        let before = tc.confirmed().await;
        eventually(60, "the instance confirms rows", || async {
            tc.confirmed().await > before
        })
        .await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(200 + rng % 500)).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        eprintln!(
            "rabbitmq sigkill {kill}: killed with {} rows written",
            written.load(Ordering::SeqCst)
        );
        child = KillOnDrop(spawn_relay_binary(&config, &log));
    }
    stop.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();
    let end = wal_insert_lsn(&servers().sql().await).await;
    eventually(90, "the last instance confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut child.0);
    let got = consume_queue(&mq.url(), &queue, |g| distinct_seqs(g) >= total as usize).await;
    let duplicates = assert_nothing_lost(&got, total);
    eprintln!(
        "FAULT rabbitmq_sigkill: written={total} delivered={} duplicates={duplicates} kills=4",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_server_stopped_mid_stream_holds_the_slot_and_loses_nothing() {
    let mut mq = tokio::task::block_in_place(RabbitMq::start);
    let tc = TestCase::new("rmq_restart").await;
    let queue = queue_for_all(&tc, &mq.url()).await;
    let relay = start_relay(config(&tc, &mq.url())).await;
    let db = tc.s.sql().await;
    let first = write_rows(&db, &tc.table, 0, 100).await;
    eventually(60, "the first rows confirmed", || async {
        tc.confirmed().await >= first
    })
    .await;

    // A connection lost while idle ends the session too (nothing to send).
    let reconnects = relay.metrics.reconnects.get();
    tokio::task::block_in_place(|| mq.ctl(&["close_all_connections", "test"]));
    eventually(30, "the idle session noticed and reconnected", || async {
        relay.metrics.reconnects.get() > reconnects && relay.metrics.is_active()
    })
    .await;

    // A steady writer across the stop and the start.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(100));
    let writer = {
        let (stop, written, table) = (stop.clone(), written.clone(), tc.table.clone());
        tokio::spawn(async move {
            let db = servers().sql().await;
            let mut next = 100i64;
            while !stop.load(Ordering::Relaxed) {
                let n = 1 + next % 9;
                insert_rows(&db, &table, "evt", next, n).await;
                next += n;
                written.store(next, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            next
        })
    };
    let before = tc.confirmed().await;
    eventually(30, "progress with the writer", || async {
        tc.confirmed().await > before
    })
    .await;
    tokio::task::block_in_place(|| mq.stop());
    let stopped = Instant::now();
    // Rows from here on (past the transaction of up to 9 rows the writer may
    // be committing) are committed after the stop: RabbitMQ never confirmed them.
    let after_stop = written.load(Ordering::SeqCst) + 9;
    eventually(30, "readiness names RabbitMQ", || async {
        matches!(relay.metrics.health(), Health::Down(why) if why.contains("RabbitMQ"))
    })
    .await;
    let Health::Down(why) = relay.metrics.health() else {
        unreachable!()
    };
    // Reconnect attempts (backoff up to 1 s) fail meanwhile; the slot stays.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let confirmed_while_down = tc.confirmed().await;
    assert!(
        written.load(Ordering::SeqCst) > after_stop,
        "rows were committed while the server was down"
    );
    assert!(!relay.is_finished(), "the relay keeps retrying");

    tokio::task::block_in_place(|| mq.start_again());
    let down_for = stopped.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();
    let end = wal_insert_lsn(&db).await;
    eventually(90, "everything confirmed after the restart", || async {
        tc.confirmed().await >= end
    })
    .await;
    let got = consume_queue(&mq.url(), &queue, |g| distinct_seqs(g) >= total as usize).await;
    let duplicates = assert_nothing_lost(&got, total);
    assert_order_per_key(&got);
    // The commit LSN of the first row committed after the stop: the slot stayed before it.
    let first_unconfirmable = got
        .iter()
        .filter(|g| g.seq() >= after_stop)
        .map(|g| g.header("lsn").unwrap().parse::<Lsn>().unwrap())
        .min()
        .unwrap();
    assert!(
        confirmed_while_down <= first_unconfirmable,
        "while RabbitMQ was down the slot moved to {confirmed_while_down}, past the commit of a row written after the stop ({first_unconfirmable})"
    );
    eprintln!(
        "FAULT rabbitmq_restart: written={total} delivered={} duplicates={duplicates} reconnects={} down_for_ms={} readiness while down: {why:?}",
        got.len(),
        relay.metrics.reconnects.get(),
        down_for.as_millis()
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_nack_holds_the_slot_until_the_server_takes_the_record() {
    let mq = shared_rabbitmq();
    let tc = TestCase::new("rmq_nack").await;
    // A queue of 5 that nacks what does not fit (reject-publish).
    let queue = format!("{}.q", tc.name);
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(5),
    );
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    bind_queue_with(&mq.url(), &tc.name, &queue, &format!("{}.#", tc.name), args).await;
    let relay = start_relay(config(&tc, &mq.url())).await;
    let db = tc.s.sql().await;
    // One row per transaction: the slot may pass the first five, not the sixth.
    let mut ends = Vec::new();
    for i in 0..8 {
        ends.push(insert_rows(&db, &tc.table, "evt", i, 1).await);
    }
    eventually(30, "readiness names the nack", || async {
        matches!(relay.metrics.health(), Health::Down(why) if why.contains("nacked"))
    })
    .await;
    eventually(30, "the five taken rows confirmed", || async {
        tc.confirmed().await >= ends[4]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = tc.confirmed().await;
    assert!(!relay.is_finished(), "a nack is retried");
    // Reading makes room: the retries get through, nothing is lost.
    let got = consume_queue(&mq.url(), &queue, |g| distinct_seqs(g) >= 8).await;
    let duplicates = assert_nothing_lost(&got, 8);
    assert_order_per_key(&got);
    let nacked: Lsn = got
        .iter()
        .find(|g| g.seq() == 5)
        .unwrap()
        .header("lsn")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        held <= nacked,
        "the slot moved to {held}, past the nacked row (commit {nacked})"
    );
    eventually(30, "everything confirmed", || async {
        tc.confirmed().await >= ends[7]
    })
    .await;
    eprintln!(
        "rabbitmq nack: 8 rows, {} messages, {duplicates} duplicates, {} reconnects",
        got.len(),
        relay.metrics.reconnects.get()
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_unroutable_record_stops_the_relay_naming_the_event() {
    let mq = shared_rabbitmq();
    let tc = TestCase::new("rmq_unroutable").await;
    // Only the `ok` topic has a queue.
    let queue = format!("{}.q", tc.name);
    bind_queue(&mq.url(), &tc.name, &queue, &tc.topic("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&tc, &mq.url(), "");
    let (_, log, mut child) = start_binary(&tc, dir.path(), &text).await;
    let db = tc.s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'Before', '{{\"seq\": 0}}')"
    ))
    .await
    .unwrap();
    let before = wal_insert_lsn(&db).await;
    db.batch_execute(&format!(
        "INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
           VALUES ('00000000-0000-4000-8000-0000000000aa', 'nowhere', 'a', 'Lost', '{{\"seq\": 1}}');
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'After', '{{\"seq\": 2}}')"
    ))
    .await
    .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.0.wait()),
    )
    .await
    .expect("the relay stops")
    .unwrap()
    .unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "exit 1 for a refused record:\n{stderr}"
    );
    assert!(
        stderr.contains("00000000-0000-4000-8000-0000000000aa")
            && stderr.contains("unroutable")
            && stderr.contains("on_invalid"),
        "the error names the event, why and what to do:\n{stderr}"
    );
    let commit: Lsn = stderr
        .split("(commit LSN ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the error names the commit LSN")
        .parse()
        .unwrap();
    assert!(
        before < commit && tc.confirmed().await <= commit,
        "the slot passed the refused row (commit {commit})"
    );
    let got = consume_n(&mq.url(), &queue, 1).await;
    assert_eq!(got[0].header("event_type"), Some("Before"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_unroutable_record_is_dead_lettered_and_the_stream_goes_on() {
    let mq = shared_rabbitmq();
    let tc = TestCase::new("rmq_dlq").await;
    let (queue, dlq) = (format!("{}.q", tc.name), format!("{}.dlq.q", tc.name));
    bind_queue(&mq.url(), &tc.name, &queue, &tc.topic("ok")).await;
    bind_queue(&mq.url(), &tc.name, &dlq, &format!("{}.dlq", tc.name)).await;
    let text = config_text(&tc, &mq.url(), "").replace(
        "[outbox]\n",
        &format!(
            "[outbox]\non_invalid = \"dead_letter\"\ndead_letter_topic = \"{}.dlq\"\n",
            tc.name
        ),
    );
    let cfg = Config::from_toml(&text, Path::new("t.toml"), |_| None).unwrap();
    let relay = start_relay(cfg).await;
    let db = tc.s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'Before', '{{\"seq\": 0}}');
         INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
           VALUES ('00000000-0000-4000-8000-0000000000bb', 'nowhere', 'b', 'Lost', '{{\"seq\": 1}}');
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'After', '{{\"seq\": 2}}')"
    ))
    .await
    .unwrap();
    let end = wal_insert_lsn(&db).await;
    eventually(
        30,
        "everything confirmed past the unroutable row",
        || async { tc.confirmed().await >= end },
    )
    .await;
    assert!(!relay.is_finished(), "the relay keeps running");
    let good = consume_n(&mq.url(), &queue, 2).await;
    let types: Vec<_> = good
        .iter()
        .map(|g| g.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    let dead = consume_n(&mq.url(), &dlq, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.routing_key, format!("{}.dlq", tc.name));
    assert_eq!(d.header("id"), Some("00000000-0000-4000-8000-0000000000bb"));
    assert_eq!(d.header("reason"), Some("unroutable"));
    assert_eq!(
        d.header("original_topic"),
        Some(tc.topic("nowhere").as_str())
    );
    assert!(
        d.header("error").unwrap().contains("no queue bound"),
        "{d:?}"
    );
    assert_eq!(d.header("original_size"), Some("10"));
    assert_eq!(d.key(), "b");
    assert!(d.body.is_empty(), "the refused body is not sent again");
    assert_eq!(Metrics::total(&relay.metrics.events_dead_lettered), 1);
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_check_config_refuses_a_missing_url_and_an_unreachable_server_keeps_it_unready() {
    let tc = TestCase::new("rmq_config").await;
    let text = config_text(&tc, "amqp://x", "");
    let without_url = text.replace("url = \"amqp://x\"\n", "");
    let f = config_file(&without_url);
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains("rabbitmq.url is missing")
            && out.stderr.contains("OUTBOX_RELAY_RABBITMQ_URL"),
        "{out}"
    );
    let f = config_file(&text);
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(0), "{out}");

    // Nothing listens there: the relay stays unready, says why, and retries.
    let closed = format!("amqp://guest:guest@{}/%2f", free_addr());
    let cfg = Config::from_toml(&config_text(&tc, &closed, ""), Path::new("t"), |_| None).unwrap();
    let relay = spawn_relay(cfg);
    eventually(30, "readiness names the unreachable server", || async {
        matches!(relay.metrics.health(), Health::Down(why) if why.contains("cannot connect to RabbitMQ"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!relay.is_finished(), "an unreachable server is retried");
    assert!(
        !tc.slot_exists(true).await,
        "no session holds the slot without the sink"
    );
    assert!(relay.metrics.reconnects.get() >= 1);
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_over_tls_trusts_the_configured_ca_only() {
    use crate::tls::{cert, key};
    let ca_key = key();
    let ca = cert("outbox-relay test CA", &ca_key, None);
    let server_key = key();
    let server = cert("localhost", &server_key, Some((&ca, &ca_key)));
    let other_ca = cert("unrelated CA", &key(), None);
    let tls_port = free_low_port();
    let conf = format!(
        "listeners.ssl.1 = 127.0.0.1:{tls_port}\n\
         ssl_options.cacertfile = {{dir}}/ca.pem\n\
         ssl_options.certfile = {{dir}}/server.pem\n\
         ssl_options.keyfile = {{dir}}/server.key\n\
         ssl_options.verify = verify_none\n\
         ssl_options.fail_if_no_peer_cert = false\n"
    );
    let (ca_pem, server_pem) = (ca.to_pem().unwrap(), server.to_pem().unwrap());
    let server_key_pem = server_key.private_key_to_pem_pkcs8().unwrap();
    let mq = tokio::task::block_in_place(|| {
        RabbitMq::start_with(
            &conf,
            &[
                ("ca.pem", &ca_pem),
                ("server.pem", &server_pem),
                ("server.key", &server_key_pem),
            ],
        )
    });
    eventually(30, "the TLS listener", || async {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&good, &ca_pem).unwrap();
    std::fs::write(&bad, other_ca.to_pem().unwrap()).unwrap();
    let tc = TestCase::new("rmq_tls").await;
    let queue = queue_for_all(&tc, &mq.url()).await;
    let url = format!("amqps://guest:guest@localhost:{tls_port}/%2f");
    let with_ca = |ca: &Path| {
        let extra = format!("tls_ca_file = {:?}\n", ca.display().to_string());
        Config::from_toml(&config_text(&tc, &url, &extra), Path::new("t"), |_| None).unwrap()
    };

    // A certificate from a CA it was not told to trust: refused, said, retried.
    let relay = spawn_relay(with_ca(&bad));
    eventually(30, "readiness names the certificate check", || async {
        matches!(relay.metrics.health(), Health::Down(why) if why.contains("cannot connect to RabbitMQ") && why.contains("certificate verify failed"))
    })
    .await;
    relay.stop().await.unwrap();

    let relay = start_relay(with_ca(&good)).await;
    let db = tc.s.sql().await;
    let end = write_rows(&db, &tc.table, 0, 20).await;
    eventually(30, "rows confirmed over TLS", || async {
        tc.confirmed().await >= end
    })
    .await;
    let got = consume_n(&mq.url(), &queue, 20).await;
    assert_eq!(assert_nothing_lost(&got, 20), 0);
    relay.stop().await.unwrap();
}
