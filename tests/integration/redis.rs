//! The Redis sink against a real `redis-server` (append-only file fsynced on
//! every write) started by the harness: a mixed-size backlog and a live
//! stream arrive once with their exact key, value and headers in commit order
//! per key; SIGTERM and SIGKILL restarts lose nothing; the server killed and
//! started again mid-stream loses nothing while the slot holds; WAIT with
//! too few replicas holds the slot; refused records follow
//! `outbox.on_invalid`; pub/sub subscribers get the JSON line; `check-config`
//! refuses a Redis sink without a URL.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::{Health, Metrics};
use outbox_relay::relay::RelayError;

use crate::harness::redis::{read_stream, redis_conn, shared_redis, Entry, RedisServer};
use crate::harness::*;

/// This test's config with `[sink] kind = "redis"`; `redis` goes into `[redis]`.
fn config_text(tc: &TestCase, url: &str, redis: &str) -> String {
    format!(
        "{}\n[sink]\nkind = \"redis\"\n\n[redis]\nurl = \"{url}\"\n{redis}",
        tc.config_text(&tc.s.brokers, "")
    )
}

fn config(text: &str) -> Config {
    Config::from_toml(text, Path::new("redis-test.toml"), |_| None).unwrap()
}

/// `[outbox]` with `keys` added.
fn with_outbox(text: &str, keys: &str) -> String {
    text.replace("[outbox]\n", &format!("[outbox]\n{keys}"))
}

/// Writes the binary's config into `dir`, starts it and waits until it streams.
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

/// The seqs of `entries` in stream order.
fn seqs_of(entries: &[Entry]) -> Vec<i64> {
    entries.iter().map(Entry::seq).collect()
}

/// Every seq of `0..total` is there; per key, first occurrences follow commit
/// order (seq order). Returns the number of repeated entries.
fn assert_all_once_in_order_per_key(entries: &[Entry], total: i64) -> usize {
    let mut seen = HashSet::new();
    let mut firsts: HashMap<String, Vec<i64>> = HashMap::new();
    for e in entries {
        let seq = e.seq();
        if seen.insert(seq) {
            firsts.entry(e.text("key").unwrap()).or_default().push(seq);
        }
    }
    let missing: Vec<i64> = (0..total).filter(|s| !seen.contains(s)).collect();
    assert!(missing.is_empty(), "rows never delivered: {missing:?}");
    for (k, v) in firsts {
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "first occurrences of key {k} out of commit order: {v:?}"
        );
    }
    entries.len() - seen.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backlog_and_live_rows_arrive_once_with_exact_key_value_and_headers() {
    let tc = TestCase::new("redis_bulk").await;
    let url = shared_redis();
    let db = tc.s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "ALTER TABLE {t} ALTER COLUMN payload DROP NOT NULL"
    ))
    .await
    .unwrap();
    let text = with_outbox(
        &config_text(&tc, url, ""),
        "tombstone_on_empty_payload = true\n",
    );
    // The first run creates the slot; the backlog is then written with no relay running.
    start_relay(config(&text)).await.stop().await.unwrap();
    let insert = |from: i64, to: i64, pad: i64| {
        format!(
            "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
             SELECT 'evt', 'k' || (i % 7), 'E' || i, jsonb_build_object('seq', i, 'pad', repeat('x', {pad})),
                    jsonb_build_object('trace', 't' || i)
             FROM generate_series({from}, {to}) i"
        )
    };
    // Backlog: 1,500 small rows in transactions of 1 to 250, ten of 100 kB,
    // two of 1 MB, and a tombstone (NULL payload).
    let mut next = 0i64;
    for n in [1i64, 250, 7, 250, 42, 250, 199, 250, 1, 250]
        .iter()
        .cycle()
        .take(10)
    {
        db.batch_execute(&insert(next, next + n - 1, 10))
            .await
            .unwrap();
        next += n;
    }
    db.batch_execute(&insert(next, next + 9, 100 * 1024))
        .await
        .unwrap();
    next += 10;
    db.batch_execute(&insert(next, next + 1, 1024 * 1024))
        .await
        .unwrap();
    next += 2;
    db.batch_execute(&format!(
        "INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
         VALUES ('00000000-0000-4000-8000-0000000000dd', 'evt', 'k0', 'Deleted', NULL)"
    ))
    .await
    .unwrap();
    let backlog = next;

    let relay = start_relay(config(&text)).await;
    // Live: 1,000 more rows in transactions of 1 to 9 while the relay streams.
    while next < backlog + 1000 {
        let n = (1 + next % 9).min(backlog + 1000 - next);
        db.batch_execute(&insert(next, next + n - 1, 10))
            .await
            .unwrap();
        next += n;
    }
    let total = next;
    let end = wal_insert_lsn(&db).await;
    eventually(120, "everything confirmed", || async {
        tc.confirmed().await >= end
    })
    .await;
    assert_eq!(
        Metrics::total(&relay.metrics.events_acked),
        total as u64 + 1
    );
    relay.stop().await.unwrap();

    let entries = read_stream(url, &tc.topic("evt")).await;
    assert_eq!(entries.len(), total as usize + 1, "every row exactly once");
    // Exact content, against the table.
    let rows = db
        .query(
            &format!("SELECT id::text, aggregate_id, event_type, payload::text, headers->>'trace' FROM {t}"),
            &[],
        )
        .await
        .unwrap();
    let by_id: HashMap<String, &tokio_postgres::Row> =
        rows.iter().map(|r| (r.get::<_, String>(0), r)).collect();
    let mut ids = HashSet::new();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    let mut sizes = Vec::new();
    for e in &entries {
        assert_eq!(e.fields[0].0, "key", "the key comes first: {:?}", e.id);
        let id = e.text("header:id").expect("an id header");
        assert!(ids.insert(id.clone()), "event {id} twice");
        let row = by_id[&id];
        assert_eq!(e.text("key"), Some(row.get::<_, String>(1)));
        assert_eq!(e.text("header:event_type"), Some(row.get::<_, String>(2)));
        assert_eq!(e.text("header:trace"), row.get::<_, Option<String>>(4));
        let lsn: Lsn = e.text("header:lsn").unwrap().parse().unwrap();
        assert!(lsn <= end);
        match row.get::<_, Option<String>>(3) {
            Some(payload) => {
                assert_eq!(e.field("value"), Some(payload.as_bytes()), "value of {id}");
                sizes.push(payload.len());
                per_key
                    .entry(e.text("key").unwrap())
                    .or_default()
                    .push(e.seq());
            }
            None => assert_eq!(e.field("value"), None, "a tombstone has no value field"),
        }
    }
    for (k, v) in &per_key {
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of commit order: {v:?}"
        );
    }
    assert_eq!(sizes.iter().filter(|s| **s > 1024 * 1024).count(), 2);
    assert_eq!(
        sizes
            .iter()
            .filter(|s| (100 * 1024..1024 * 1024).contains(*s))
            .count(),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigterm_then_restart_repeats_no_confirmed_row() {
    let tc = TestCase::new("redis_sigterm").await;
    let url = shared_redis();
    let dir = tempfile::tempdir().unwrap();
    let (config, log, mut child) = start_binary(&tc, dir.path(), &config_text(&tc, url, "")).await;

    const TOTAL: i64 = 2000;
    let writer = paced_writer(servers(), &tc.table, TOTAL, 5, Duration::from_millis(4));
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
    let end = wal_insert_lsn(&tc.s.sql().await).await;
    eventually(60, "the restarted relay confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut child.0);

    let entries = read_stream(url, &tc.topic("evt")).await;
    let duplicates = assert_all_once_in_order_per_key(&entries, TOTAL);
    let mut seen = HashSet::new();
    for e in &entries {
        if !seen.insert(e.seq()) {
            let lsn: Lsn = e.text("header:lsn").unwrap().parse().unwrap();
            assert!(
                lsn >= confirmed_at_stop,
                "row {} (commit {lsn}) was confirmed at {confirmed_at_stop} yet sent again",
                e.seq()
            );
        }
    }
    eprintln!("REDIS sigterm: written={TOTAL} entries={} duplicates={duplicates} (all unconfirmed at the stop)", entries.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkill_loop_loses_nothing_and_keeps_per_key_order() {
    let tc = TestCase::new("redis_sigkill").await;
    let url = shared_redis();
    let dir = tempfile::tempdir().unwrap();
    let (config, log, mut child) = start_binary(&tc, dir.path(), &config_text(&tc, url, "")).await;

    const TOTAL: i64 = 3000;
    let writer = paced_writer(servers(), &tc.table, TOTAL, 6, Duration::from_millis(2));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut kills = 0;
    while !writer.is_finished() && kills < 8 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        tokio::time::sleep(Duration::from_millis(150 + state % 400)).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        kills += 1;
        child = KillOnDrop(spawn_relay_binary(&config, &log));
    }
    writer.await.unwrap();
    let end = wal_insert_lsn(&tc.s.sql().await).await;
    eventually(90, "the last instance confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut child.0);

    let entries = read_stream(url, &tc.topic("evt")).await;
    let duplicates = assert_all_once_in_order_per_key(&entries, TOTAL);
    eprintln!(
        "REDIS sigkill: written={TOTAL} entries={} duplicates={duplicates} kills={kills}",
        entries.len()
    );
    assert!(
        kills >= 3,
        "the writer finished before the relay was killed often: {kills}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_stream_loses_nothing_and_the_slot_holds() {
    let tc = TestCase::new("redis_down").await;
    let mut server = RedisServer::start();
    let url = server.url();
    let relay = start_relay(config(&config_text(&tc, &url, ""))).await;
    let db = tc.s.sql().await;

    let first = insert_rows(&db, &tc.table, "evt", 0, 50).await;
    eventually(30, "the first rows confirmed", || async {
        tc.confirmed().await >= first
    })
    .await;

    // SIGKILL: what the server acknowledged is in its fsynced append-only file.
    server.kill();
    let down = Instant::now();
    // Nothing is being sent: the idle connection's ping notices, and readiness says so.
    eventually(10, "readiness down while the outbox is idle", || async {
        matches!(relay.metrics.health(), Health::Down(w) if w.contains("Redis"))
    })
    .await;
    let noticed = down.elapsed();
    let mut next = 50;
    for _ in 0..10 {
        insert_rows(&db, &tc.table, "evt", next, 10).await;
        next += 10;
    }
    let outage_end = wal_insert_lsn(&db).await;
    // For a while the slot must stay before the rows nobody acknowledged, and
    // readiness must say why.
    let mut health = None;
    for _ in 0..20 {
        let c = tc.confirmed().await;
        assert!(
            c < outage_end,
            "slot confirmed {c} past unacknowledged rows ending at {outage_end}"
        );
        if let Health::Down(why) = relay.metrics.health() {
            health = Some(why);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = health.expect("readiness reports the sink down during the outage");
    assert!(why.contains("Redis"), "{why}");
    assert!(!relay.is_finished(), "the relay keeps retrying");

    server.start_again();
    let up = Instant::now();
    for _ in 0..5 {
        insert_rows(&db, &tc.table, "evt", next, 10).await;
        next += 10;
    }
    let end = wal_insert_lsn(&db).await;
    eventually(60, "everything confirmed after the restart", || async {
        tc.confirmed().await >= end
    })
    .await;
    let recovery = up.elapsed();
    relay.stop().await.unwrap();

    let entries = read_stream(&url, &tc.topic("evt")).await;
    let duplicates = assert_all_once_in_order_per_key(&entries, next);
    eprintln!(
        "REDIS server_killed: written={next} entries={} duplicates={duplicates} idle_loss_noticed_ms={} outage_ms={} recovery_ms={} health_during_outage={why:?}",
        entries.len(),
        noticed.as_millis(),
        (up - down).as_millis(),
        recovery.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wait_without_enough_replicas_holds_the_slot_until_one_has_the_records() {
    let tc = TestCase::new("redis_wait").await;
    let primary = RedisServer::start();
    let url = primary.url();
    let relay = start_relay(config(&config_text(
        &tc,
        &url,
        "wait_replicas = 1\nwait_timeout_ms = 200\n",
    )))
    .await;
    let db = tc.s.sql().await;
    let end = insert_rows(&db, &tc.table, "evt", 0, 20).await;
    // No replica: WAIT answers 0 and nothing is acknowledged.
    let started = Instant::now();
    let mut why = None;
    while started.elapsed() < Duration::from_secs(2) {
        let c = tc.confirmed().await;
        assert!(c < end, "slot confirmed {c} without a replica");
        if let Health::Down(w) = relay.metrics.health() {
            why = Some(w);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 0);
    let why = why.expect("a failed WAIT ends the session");
    assert!(why.contains("WAIT: 0 of the 1 replicas"), "{why}");

    let _replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    eventually(60, "confirmed once a replica has the records", || async {
        tc.confirmed().await >= end
    })
    .await;
    relay.stop().await.unwrap();
    let entries = read_stream(&url, &tc.topic("evt")).await;
    let duplicates = assert_all_once_in_order_per_key(&entries, 20);
    eprintln!(
        "REDIS wait: written=20 entries={} duplicates={duplicates}",
        entries.len()
    );
}

/// Rows of one transaction: one for `ok`, one for the stream `bad` (a key of
/// another type), a payload over `redis.max_record_bytes`, one more for `ok`.
async fn write_refusable_rows(tc: &TestCase) -> Lsn {
    let db = tc.s.sql().await;
    let mut conn = redis_conn(shared_redis()).await;
    ::redis::cmd("SET")
        .arg(tc.topic("bad"))
        .arg("not a stream")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let t = &tc.table;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'Before', '{{\"seq\": 1}}');
         INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
           VALUES ('00000000-0000-4000-8000-0000000000b1', 'bad', 'a', 'WrongType', '{{\"seq\": 2}}');
         INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
           VALUES ('00000000-0000-4000-8000-0000000000b2', 'ok', 'b', 'Huge', jsonb_build_object('seq', 3, 'pad', repeat('x', 50000)));
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'After', '{{\"seq\": 4}}');"
    ))
    .await
    .unwrap();
    wal_insert_lsn(&db).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refused_record_under_stop_ends_the_relay_naming_the_event() {
    let tc = TestCase::new("redis_refuse_stop").await;
    let relay = start_relay(config(&config_text(&tc, shared_redis(), ""))).await;
    let before = tc.confirmed().await;
    let end = write_refusable_rows(&tc).await;
    let err = relay.join().await.unwrap_err();
    assert!(err.is_fatal(), "{err:?}");
    assert!(matches!(err, RelayError::Refused { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("Redis refused the record of event 00000000-0000-4000-8000-0000000000b1")
            && msg.contains("WRONGTYPE")
            && msg.contains("on_invalid = \"dead_letter\""),
        "{msg}"
    );
    let c = tc.confirmed().await;
    assert!(
        c >= before && c < end,
        "the slot stays before the refused row: {c} vs {end}"
    );

    // The binary streams the row again from the slot and exits 1 naming it.
    let f = config_file(&config_text(&tc, shared_redis(), ""));
    let out = relay_cli(&["run"], f.path()).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("event 00000000-0000-4000-8000-0000000000b1")
            && out.stderr.contains("WRONGTYPE"),
        "{out}"
    );
    assert!(tc.confirmed().await < end, "still not past the refused row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refused_records_are_dead_lettered_and_the_stream_goes_on() {
    let tc = TestCase::new("redis_dlq").await;
    let url = shared_redis();
    let text = with_outbox(
        &config_text(&tc, url, "max_record_bytes = 20000\n"),
        &format!(
            "on_invalid = \"dead_letter\"\ndead_letter_topic = \"{}.dlq\"\n",
            tc.name
        ),
    );
    let relay = start_relay(config(&text)).await;
    let end = write_refusable_rows(&tc).await;
    eventually(30, "everything confirmed past the refused rows", || async {
        tc.confirmed().await >= end
    })
    .await;
    assert!(!relay.is_finished(), "the relay keeps running");
    assert_eq!(Metrics::total(&relay.metrics.events_dead_lettered), 2);
    relay.stop().await.unwrap();

    let ok = read_stream(url, &tc.topic("ok")).await;
    let types: Vec<_> = ok
        .iter()
        .map(|e| e.text("header:event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    let dead = read_stream(url, &format!("{}.dlq", tc.name)).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let by_id = |id: &str| {
        dead.iter()
            .find(|e| e.text("header:id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no dead letter for {id}: {dead:?}"))
    };
    let wrong = by_id("00000000-0000-4000-8000-0000000000b1");
    assert_eq!(wrong.text("header:reason").as_deref(), Some("rejected"));
    assert!(wrong.text("header:error").unwrap().contains("WRONGTYPE"));
    assert_eq!(wrong.text("header:original_topic"), Some(tc.topic("bad")));
    assert_eq!(wrong.text("key").as_deref(), Some("a"));
    assert!(wrong.text("header:lsn").unwrap().contains('/'));
    let huge = by_id("00000000-0000-4000-8000-0000000000b2");
    assert_eq!(huge.text("header:reason").as_deref(), Some("too_large"));
    assert!(huge
        .text("header:error")
        .unwrap()
        .contains("redis.max_record_bytes"));
    assert_eq!(huge.text("header:original_topic"), Some(tc.topic("ok")));
    assert_eq!(
        huge.field("value"),
        Some(&b""[..]),
        "the refused value is not sent again"
    );
    assert!(
        huge.text("header:original_size")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 50000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pubsub_subscribers_get_each_record_as_a_json_line_in_order() {
    let tc = TestCase::new("redis_pubsub").await;
    let url = shared_redis();
    let mut sub = ::redis::Client::open(url)
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe(tc.topic("evt")).await.unwrap();
    let relay = start_relay(config(&config_text(&tc, url, "mode = \"pubsub\"\n"))).await;
    let db = tc.s.sql().await;
    for i in (0..100).step_by(10) {
        insert_rows(&db, &tc.table, "evt", i, 10).await;
    }
    let mut stream = sub.on_message();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 100 {
        use futures_util::StreamExt;
        let msg = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .expect("100 messages within 30 s")
            .unwrap();
        assert_eq!(msg.get_channel_name(), tc.topic("evt"));
        let line: serde_json::Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
        got.push(line);
    }
    relay.stop().await.unwrap();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for v in &got {
        assert_eq!(v["topic"], tc.topic("evt"));
        let value: serde_json::Value = serde_json::from_str(v["value"].as_str().unwrap()).unwrap();
        let seq = value["seq"].as_i64().unwrap();
        assert_eq!(v["key"], format!("k{}", seq % 10));
        assert!(v["lsn"].as_str().unwrap().contains('/'));
        assert!(v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "id"));
        per_key
            .entry(v["key"].as_str().unwrap().into())
            .or_default()
            .push(seq);
    }
    let all: HashSet<i64> = per_key.values().flatten().copied().collect();
    assert_eq!(all.len(), 100, "each row once");
    for (k, v) in per_key {
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {v:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_maxlen_trims_each_stream_approximately_keeping_the_newest() {
    let tc = TestCase::new("redis_maxlen").await;
    let url = shared_redis();
    let relay = start_relay(config(&config_text(&tc, url, "maxlen = 10\n"))).await;
    let db = tc.s.sql().await;
    for i in (0..1000).step_by(100) {
        insert_rows(&db, &tc.table, "evt", i, 100).await;
    }
    let end = wal_insert_lsn(&db).await;
    eventually(30, "everything confirmed", || async {
        tc.confirmed().await >= end
    })
    .await;
    relay.stop().await.unwrap();
    let entries = read_stream(url, &tc.topic("evt")).await;
    // `MAXLEN ~` removes whole internal nodes (100 entries by default) only.
    assert!(
        (10..1000).contains(&entries.len()),
        "{} entries left of 1000 with maxlen 10",
        entries.len()
    );
    let seqs = seqs_of(&entries);
    assert_eq!(seqs.last(), Some(&999), "the newest entry stays");
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "what is left is in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_is_retried_and_readiness_says_why() {
    let tc = TestCase::new("redis_unreachable").await;
    let port = free_addr().rsplit(':').next().unwrap().to_string();
    let text = config_text(&tc, &format!("redis://127.0.0.1:{port}"), "");
    let relay = spawn_relay(config(&text));
    let mut why = None;
    let started = Instant::now();
    while why.is_none() && started.elapsed() < Duration::from_secs(20) {
        if let Health::Down(w) = relay.metrics.health() {
            if w.contains("cannot connect to Redis") {
                why = Some(w);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let why = why.expect("readiness names the unreachable Redis");
    assert!(why.contains("refused"), "{why}");
    assert!(!relay.is_finished(), "an unreachable server is retried");
    assert!(
        !tc.slot_exists(true).await,
        "the slot is not streamed while the sink is down"
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wrong_or_missing_password_stops_the_relay_and_the_right_one_delivers() {
    let tc = TestCase::new("redis_auth").await;
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let port = server.port;
    for (url, expected) in [
        (
            format!("redis://:wrong@127.0.0.1:{port}"),
            "check the user and password in redis.url",
        ),
        (
            format!("redis://127.0.0.1:{port}"),
            "the server requires a password (NOAUTH)",
        ),
    ] {
        let relay = spawn_relay(config(&config_text(&tc, &url, "")));
        let err = relay.join().await.unwrap_err();
        assert!(err.is_fatal(), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("invalid Redis configuration") && msg.contains(expected),
            "{msg}"
        );
        assert!(
            !msg.contains("wrong") && !msg.contains("s3cret"),
            "the password leaks: {msg}"
        );
    }
    let url = format!("redis://:s3cret@127.0.0.1:{port}");
    let relay = start_relay(config(&config_text(&tc, &url, ""))).await;
    let end = insert_rows(&tc.s.sql().await, &tc.table, "evt", 0, 10).await;
    eventually(30, "delivered with the right password", || async {
        tc.confirmed().await >= end
    })
    .await;
    relay.stop().await.unwrap();
    let entries = read_stream(&url, &tc.topic("evt")).await;
    assert_eq!(assert_all_once_in_order_per_key(&entries, 10), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_delivers_with_the_servers_ca_and_refuses_another_ca() {
    use crate::tls::{cert, key};
    let tc = TestCase::new("redis_tls").await;
    let dir = tempfile::tempdir().unwrap();
    let ca_key = key();
    let ca = cert("outbox-relay test CA", &ca_key, None);
    let server_key = key();
    let server_cert = cert("localhost", &server_key, Some((&ca, &ca_key)));
    let write = |name: &str, pem: Vec<u8>| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let ca_file = write("ca.pem", ca.to_pem().unwrap());
    let other_ca = write(
        "other-ca.pem",
        cert("unrelated CA", &key(), None).to_pem().unwrap(),
    );
    let server = RedisServer::start_tls(
        &write("server.crt", server_cert.to_pem().unwrap()),
        &write("server.key", server_key.private_key_to_pem_pkcs8().unwrap()),
    );
    let url = format!("rediss://localhost:{}", server.port);

    // A CA that did not sign the server's certificate: no connection, retried, readiness says why.
    let relay = spawn_relay(config(&config_text(
        &tc,
        &url,
        &format!("tls_ca_file = {other_ca:?}\n"),
    )));
    eventually(20, "readiness names the TLS failure", || async {
        matches!(relay.metrics.health(), Health::Down(w) if w.contains("cannot connect to Redis") && w.contains("certificate"))
    })
    .await;
    assert!(!relay.is_finished(), "retried");
    assert!(!tc.slot_exists(true).await);
    relay.stop().await.unwrap();

    let relay = start_relay(config(&config_text(
        &tc,
        &url,
        &format!("tls_ca_file = {ca_file:?}\n"),
    )))
    .await;
    let end = insert_rows(&tc.s.sql().await, &tc.table, "evt", 0, 10).await;
    eventually(30, "delivered over TLS", || async {
        tc.confirmed().await >= end
    })
    .await;
    relay.stop().await.unwrap();

    let mut conn = ::redis::Client::build_with_tls(
        url.as_str(),
        ::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&ca_file).unwrap()),
        },
    )
    .unwrap()
    .get_multiplexed_async_connection()
    .await
    .unwrap();
    let n: usize = ::redis::cmd("XLEN")
        .arg(tc.topic("evt"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_a_redis_sink_without_a_url_and_accepts_one_with_it() {
    let tc = TestCase::new("redis_checkconfig").await;
    let good = config_text(&tc, "redis://u:hunter2@127.0.0.1:6379/0", "");
    let f = config_file(&good);
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(0), "{out}");
    let f = config_file(&good.replace("url = \"redis://u:hunter2@127.0.0.1:6379/0\"\n", ""));
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains("redis.url is missing")
            && out.stderr.contains("OUTBOX_RELAY_REDIS_URL"),
        "{out}"
    );
    let f = config_file(&good.replace("redis://", "http://"));
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("must start with redis://"), "{out}");
    out.assert_no_secret(&["hunter2"]);
}
