//! Every row arrives once, in the right topic, with key, value and headers, in
//! commit order per key; the slot follows acknowledgements and idle traffic.

use std::collections::HashMap;

use outbox_relay::lsn::Lsn;

use outbox_relay::metrics::Metrics;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_once_in_commit_order_per_key() {
    every_row_once_in_commit_order_per_key_with_headers(servers()).await;
}

/// 10,000 events in transactions of 1 to 500 rows: each once, in its topic
/// with key, value and headers, in commit order per key; then the slot
/// reaches the last commit. Also run on each version of the matrix.
pub async fn every_row_once_in_commit_order_per_key_with_headers(s: &'static Servers) {
    let tc = TestCase::on(s, "bulk").await;
    let relay = start_relay(tc.config()).await;
    let db = s.sql().await;

    // 10,000 events over 100 aggregates of 2 types, in transactions of 1 to 500 rows.
    let mut written = 0usize;
    let mut sizes = [1usize, 500, 7, 250, 1, 123, 42, 499, 3, 77].iter().cycle();
    let mut last_end = Lsn::ZERO;
    while written < 10_000 {
        let n = (*sizes.next().unwrap()).min(10_000 - written);
        let sql = format!(
            "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
             SELECT CASE WHEN (i % 100) < 50 THEN 'order' ELSE 'customer' END, 'agg-' || (i % 100), 'Seq',
                    jsonb_build_object('seq', i, 'text', 'ünïcødé ✓'), jsonb_build_object('trace', 't' || i, 'n', i)
             FROM generate_series({from}, {to}) i",
            t = tc.table,
            from = written,
            to = written + n - 1
        );
        db.batch_execute(&sql).await.unwrap();
        written += n;
        let lsn: String = db
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        last_end = lsn.parse().unwrap();
    }

    let topics = vec![tc.topic("order"), tc.topic("customer")];
    eventually(120, "all 10,000 acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) >= 10_000
    })
    .await;
    let got = consume_all(&s.brokers, &topics, 10_000);
    assert_eq!(got.len(), 10_000, "exactly 10,000 records in Kafka");

    let mut seen = HashMap::new();
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    let mut partitions_of_key: HashMap<String, std::collections::HashSet<i32>> = HashMap::new();
    for r in &got {
        let v: serde_json::Value = serde_json::from_str(&r.value).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        assert_eq!(v["text"], "ünïcødé ✓");
        assert!(
            seen.insert(seq, r.clone()).is_none(),
            "seq {seq} delivered twice"
        );
        let agg = seq % 100;
        assert_eq!(r.key, format!("agg-{agg}"));
        assert_eq!(
            r.topic,
            tc.topic(if agg < 50 { "order" } else { "customer" })
        );
        assert_eq!(r.header("event_type"), Some("Seq"));
        assert_eq!(r.header("trace"), Some(format!("t{seq}").as_str()));
        assert_eq!(
            r.header("n"),
            Some(seq.to_string().as_str()),
            "non-string header values as JSON text"
        );
        assert_eq!(r.header("id").unwrap().len(), 36, "uuid id header");
        let lsn: Lsn = r.header("lsn").unwrap().parse().unwrap();
        assert!(lsn <= last_end);
        per_key.entry(r.key.clone()).or_default().push(seq);
        partitions_of_key
            .entry(r.key.clone())
            .or_default()
            .insert(r.partition);
    }
    assert_eq!(seen.len(), 10_000);
    for (key, seqs) in &per_key {
        // Within one partition records are in offset order: the order of seq must be the commit order.
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {seqs:?}"
        );
        assert_eq!(
            partitions_of_key[key].len(),
            1,
            "key {key} spread over partitions"
        );
    }

    // Once everything is acknowledged the slot reaches the last commit.
    eventually(20, "slot confirmed past the last commit", || async {
        tc.confirmed().await >= last_end
    })
    .await;
    // Confirmed read first: the relay's own checkpoint writes keep the WAL (and
    // an idle slot's confirmed position) moving, so the order matters.
    let confirmed = tc.confirmed().await;
    let current: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(confirmed <= current.parse().unwrap());
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_other_tables_advance_the_slot_while_the_outbox_is_idle() {
    let tc = TestCase::new("idle").await;
    let s = servers();
    let db = s.sql().await;
    db.batch_execute("CREATE TABLE IF NOT EXISTS idle_other (id serial primary key, v text)")
        .await
        .unwrap();
    let relay = start_relay(tc.config()).await;
    let before = tc.confirmed().await;
    db.batch_execute(
        "INSERT INTO idle_other (v) SELECT repeat('x', 100) FROM generate_series(1, 5000)",
    )
    .await
    .unwrap();
    let after_write: Lsn = wal_insert_lsn(&db).await;
    assert!(
        after_write.bytes_since(before) > 100_000,
        "the write produced WAL"
    );
    eventually(30, "slot to advance past the unrelated writes", || async {
        tc.confirmed().await >= after_write
    })
    .await;
    assert_eq!(Metrics::total(&relay.metrics.events_received), 0);
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_deletes_and_other_tables_produce_nothing() {
    let tc = TestCase::new("ignored").await;
    let s = servers();
    let db = s.sql().await;
    let relay = start_relay(tc.config()).await;
    let t = &tc.table;
    // The publication publishes inserts only; make it publish everything to prove the relay filters.
    db.batch_execute(&format!(
        "ALTER PUBLICATION {n} SET (publish = 'insert, update, delete, truncate');
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('x', '1', 'A', '{{}}');
         UPDATE {t} SET event_type = 'B';
         DELETE FROM {t};
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('x', '2', 'C', '[]');",
        n = tc.name
    ))
    .await
    .unwrap();
    eventually(20, "both inserts acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) == 2
    })
    .await;
    let got = consume_all(&s.brokers, &[tc.topic("x")], 2);
    let types: Vec<_> = got
        .iter()
        .map(|r| r.header("event_type").unwrap().to_string())
        .collect();
    assert_eq!(types.len(), 2);
    assert!(types.contains(&"A".to_string()) && types.contains(&"C".to_string()));
    assert!(Metrics::total(&relay.metrics.changes_ignored) >= 2);
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_pauses_reading_and_loses_nothing() {
    let tc = TestCase::new("backpressure").await;
    let s = servers();
    // A queue of 5 records forces QueueFull on nearly every send.
    let relay = start_relay(tc.config_with(
        &s.brokers,
        "[kafka.properties]\n\"queue.buffering.max.messages\" = 5\n\"linger.ms\" = 20\n",
    ))
    .await;
    let db = s.sql().await;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'bp', 'k' || (i % 7), 'E', jsonb_build_object('seq', i, 'pad', repeat('p', 500)) FROM generate_series(1, 3000) i",
        t = tc.table
    ))
    .await
    .unwrap();
    let end: Lsn = wal_insert_lsn(&db).await;
    eventually(120, "backlog drained and confirmed", || async {
        tc.confirmed().await >= end
    })
    .await;
    let got = consume_all(&s.brokers, &[tc.topic("bp")], 3000);
    assert_eq!(got.len(), 3000);
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for r in &got {
        let v: serde_json::Value = serde_json::from_str(&r.value).unwrap();
        per_key
            .entry(r.key.clone())
            .or_default()
            .push(v["seq"].as_i64().unwrap());
    }
    for (k, seqs) in per_key {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key {k} out of order");
    }
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_added_mid_stream_keeps_flowing_and_bytea_payloads_are_raw() {
    let tc = TestCase::new("altered").await;
    let s = servers();
    let relay = start_relay(tc.config()).await;
    let db = s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('alt', 'a', 'Before', '{{\"n\": 1}}');
         ALTER TABLE {t} ADD COLUMN tenant text;
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, tenant) VALUES ('alt', 'a', 'After', '{{\"n\": 2}}', 'acme');"
    ))
    .await
    .unwrap();
    eventually(30, "both rows acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) == 2
    })
    .await;
    let got = consume_all(&s.brokers, &[tc.topic("alt")], 2);
    let types: Vec<_> = got
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    relay.stop().await.unwrap();

    // A bytea payload column is sent as the raw bytes, not PostgreSQL's hex text.
    db.batch_execute(&format!(
        "ALTER TABLE {t} ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8');
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('alt', 'b', 'Bytes', '\\x00ff41'::bytea);"
    ))
    .await
    .unwrap();
    let relay = start_relay(tc.config()).await;
    eventually(30, "bytea row acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) == 1
    })
    .await;
    relay.stop().await.unwrap();
    let consumer_raw = consume_raw_values(&s.brokers, &tc.topic("alt"), 3);
    assert!(
        consumer_raw.contains(&vec![0x00, 0xff, 0x41]),
        "raw bytea value among {consumer_raw:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_routing_column_or_a_renamed_column_stops_without_confirming_the_row() {
    let tc = TestCase::new("badrow").await;
    let s = servers();
    let db = s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "ALTER TABLE {t} ALTER COLUMN aggregate_id DROP NOT NULL"
    ))
    .await
    .unwrap();
    let relay = start_relay(tc.config()).await;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('bad', 'ok', 'Good', '{{}}');"
    ))
    .await
    .unwrap();
    let good_end: Lsn = wal_insert_lsn(&db).await;
    db.batch_execute(&format!(
        "INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload) VALUES ('00000000-0000-4000-8000-0000000000aa', 'bad', NULL, 'Bad', '{{}}');"
    ))
    .await
    .unwrap();
    let err = relay.join().await.unwrap_err();
    let msg = err.to_string();
    assert!(err.is_fatal());
    assert!(msg.contains("NULL in column \"aggregate_id\""), "{msg}");
    assert!(
        msg.contains("00000000-0000-4000-8000-0000000000aa"),
        "{msg}"
    );
    assert!(msg.contains("nothing past this row is confirmed"), "{msg}");
    let confirmed = tc.confirmed().await;
    assert!(
        confirmed >= good_end,
        "the good row before it was confirmed"
    );
    let bad_commit: Lsn = wal_insert_lsn(&db).await;
    assert!(
        confirmed < bad_commit,
        "slot {confirmed} must stay before the bad row"
    );

    // Restarting hits the same row again: it is never skipped silently.
    let err = spawn_relay(tc.config()).join().await.unwrap_err();
    assert!(err.to_string().contains("NULL in column \"aggregate_id\""));

    // A configured column renamed away is named in the error with the setting to change.
    db.batch_execute(&format!(
        "DELETE FROM {t}; ALTER TABLE {t} RENAME COLUMN event_type TO kind"
    ))
    .await
    .unwrap();
    let tc2 = TestCase {
        name: "badrow2".into(),
        table: tc.table.clone(),
        s,
    };
    let relay = start_relay(tc2.config()).await;
    db.batch_execute(&format!("INSERT INTO {t} (aggregate_type, aggregate_id, kind, payload) VALUES ('bad', 'x', 'K', '{{}}')")).await.unwrap();
    let err = relay.join().await.unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "column \"event_type\" not found in table \"public.{t}\""
        )) && err.to_string().contains("set outbox.columns.event_type"),
        "{err}"
    );
}
