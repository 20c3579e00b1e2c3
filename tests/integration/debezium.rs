//! Debezium compatibility: rows of Debezium's documented outbox table become
//! the records its Outbox Event Router documents (topic, key, value, headers,
//! timestamp, tombstones), and keys land in the partition the Java client's
//! murmur2 partitioner gives them.

use outbox_relay::metrics::Metrics;

use crate::harness::*;

/// Kafka's `Utils.murmur2` (the Java client's default partitioner), written
/// from its definition: seed 0x9747b28c, m 0x5bd1e995, r 24, little-endian words.
fn java_murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// `Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions`.
fn java_partition(key: &str, partitions: i32) -> i32 {
    (java_murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

#[test]
fn the_reference_murmur2_matches_kafkas_own_test_vectors() {
    // From Kafka's UtilsTest.testMurmur2.
    for (key, hash) in [
        ("21", -973_932_308),
        ("foobar", -790_332_482),
        ("a-little-bit-long-string", -985_981_536),
        ("a-little-bit-longer-string", -1_486_304_829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        ("abc", 479_470_107),
    ] {
        assert_eq!(java_murmur2(key.as_bytes()), hash, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_outbox_rows_become_the_records_the_router_documents() {
    let tc = TestCase::new("dbz").await;
    let s = servers();
    let db = s.sql().await;
    let table = format!("dbz_{}", tc.name);
    // Debezium's documented outbox table, with its optional timestamp and
    // tracing columns.
    db.batch_execute(&format!(
        "DROP TABLE IF EXISTS public.{table};
         CREATE TABLE public.{table} (
             id uuid NOT NULL PRIMARY KEY,
             aggregatetype varchar(255) NOT NULL,
             aggregateid varchar(255) NOT NULL,
             type varchar(255) NOT NULL,
             payload jsonb,
             timestamp bigint,
             tracingspancontext varchar(512))"
    ))
    .await
    .unwrap();
    // The preset's topic is `outbox.event.<aggregatetype>`: a type of this test's own.
    let aggregate = format!("Order_{}", tc.name);
    let topic = format!("outbox.event.{aggregate}");
    let cfg = tc.config_with_outbox(
        &format!(
            "preset = \"debezium\"\ntable = \"public.{table}\"\nadditional_placement = [\"type:header:eventType\"]\n"
        ),
    );
    let relay = start_relay(cfg).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let payload = r#"{"id": 1, "lineItems": [{"id": 1, "item": "Debezium in Action", "status": "ENTERED", "quantity": 2, "totalPrice": 39.98}, {"id": 2, "item": "Debezium for Dummies", "status": "ENTERED", "quantity": 1, "totalPrice": 29.99}], "orderDate": "2019-01-31T12:13:01", "customerId": 123}"#;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    db.batch_execute(&format!(
        "BEGIN;
         INSERT INTO public.{table} VALUES ('4d47e190-0402-4048-bc2c-89dd54343cdc', '{aggregate}', '1', 'OrderCreated', '{payload}', 1556890294484,
             E'#Fri May 03 13:31:34 UTC 2019\\ntraceparent={traceparent}\\ntracestate=rojo=00f067aa0ba902b7\\n');
         INSERT INTO public.{table} (id, aggregatetype, aggregateid, type, payload) VALUES ('4d47e190-0402-4048-bc2c-89dd54343cdd', '{aggregate}', '1', 'OrderDeleted', NULL);
         INSERT INTO public.{table} (id, aggregatetype, aggregateid, type, payload) VALUES ('4d47e190-0402-4048-bc2c-89dd54343cde', '{aggregate}', '2', 'OrderCreated', '{{\"id\": 2}}');
         COMMIT;"
    ))
    .await
    .unwrap();
    let rendered: String = db
        .query_one(
            &format!("SELECT payload::text FROM public.{table} WHERE aggregateid = '1' AND payload IS NOT NULL"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eventually(30, "three records acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) == 3
    })
    .await;
    let got = consume_all(&s.brokers, std::slice::from_ref(&topic), 3);
    assert_eq!(got.len(), 3, "{got:?}");
    let by_id = |id: &str| {
        got.iter()
            .find(|r| r.header("id") == Some(id))
            .unwrap_or_else(|| panic!("no record with id {id}: {got:?}"))
    };
    let lsn = got[0].header("lsn").unwrap().to_string();

    // The router's documented example, field by field.
    let created = by_id("4d47e190-0402-4048-bc2c-89dd54343cdc");
    assert_eq!(created.topic, topic);
    assert_eq!(created.key, "1");
    assert_eq!(
        created.value, rendered,
        "the payload as PostgreSQL renders it"
    );
    assert!(!created.null_value);
    assert_eq!(
        created.timestamp_ms,
        Some(1_556_890_294_484),
        "timestamp column"
    );
    assert_eq!(created.partition, java_partition("1", 3));
    let headers: Vec<(&str, &str)> = created
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        headers,
        [
            ("traceparent", traceparent),
            ("tracestate", "rojo=00f067aa0ba902b7"),
            ("id", "4d47e190-0402-4048-bc2c-89dd54343cdc"),
            ("eventType", "OrderCreated"),
            ("lsn", lsn.as_str()),
        ]
    );

    // A NULL payload is a tombstone with the same key, hence the same partition, after it.
    let deleted = by_id("4d47e190-0402-4048-bc2c-89dd54343cdd");
    assert!(deleted.null_value, "tombstone: {deleted:?}");
    assert_eq!(deleted.key, "1");
    assert_eq!(deleted.partition, created.partition);
    assert!(deleted.offset > created.offset);
    let ts = deleted.timestamp_ms.unwrap();
    assert!(
        ts >= before - 5_000,
        "no timestamp column value: the producer's time ({ts})"
    );
    assert_eq!(
        deleted
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["id", "eventType", "lsn"]
    );

    let other = by_id("4d47e190-0402-4048-bc2c-89dd54343cde");
    assert_eq!(
        (other.key.as_str(), other.value.as_str()),
        ("2", r#"{"id": 2}"#)
    );
    assert_eq!(other.partition, java_partition("2", 3));
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_in_the_partition_the_java_client_chooses() {
    // The relay's default config: murmur2 is the default partitioner, not only the preset's.
    let tc = TestCase::new("murmur2").await;
    let s = servers();
    let db = s.sql().await;
    let relay = start_relay(tc.config()).await;
    let keys = [
        "",
        "1",
        "2",
        "21",
        "foobar",
        "order-1",
        "order-2",
        "customer-42",
        "ключ",
        "a b c",
        "0af7651916cd43dd",
        "x",
    ];
    for round in 0..2 {
        for (i, key) in keys.iter().enumerate() {
            db.execute(
                &format!(
                    "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload) VALUES ('p', $1, 'E', jsonb_build_object('seq', {}::int))",
                    tc.table,
                    round * 100 + i
                ),
                &[key],
            )
            .await
            .unwrap();
        }
    }
    let n = keys.len() * 2;
    eventually(30, "every record acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) == n as u64
    })
    .await;
    let got = consume_all(&s.brokers, &[tc.topic("p")], n);
    assert_eq!(got.len(), n);
    let mut partitions = std::collections::HashSet::new();
    for r in &got {
        assert_eq!(
            r.partition,
            java_partition(&r.key, 3),
            "key {:?} is in partition {}, the Java client puts it in {}",
            r.key,
            r.partition,
            java_partition(&r.key, 3)
        );
        partitions.insert(r.partition);
    }
    assert!(partitions.len() > 1, "keys spread over the partitions");
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_column_of_the_wrong_type_or_a_missing_placed_column_stops_naming_the_setting()
{
    let tc = TestCase::new("dbz_bad_columns").await;
    let s = servers();
    let db = s.sql().await;
    let relay = start_relay(tc.config_with_outbox(
        &format!(
            "table = \"public.{}\"\ntopic = \"{}.{{aggregate_type}}\"\ntimestamp_column = \"event_type\"\n",
            tc.table, tc.name
        ),
    ))
    .await;
    insert_rows(&db, &tc.table, "x", 1, 1).await;
    let err = relay.join().await.unwrap_err();
    assert!(err.is_fatal());
    assert!(
        err.to_string().contains(&format!(
            "column \"event_type\" of table \"public.{}\" is text; outbox.timestamp_column needs timestamptz, timestamp or an integer of epoch milliseconds",
            tc.table
        )),
        "{err}"
    );
    let relay = spawn_relay(tc.config_with_outbox(
        &format!(
            "table = \"public.{}\"\ntopic = \"{}.{{aggregate_type}}\"\nadditional_placement = [\"tenant:header\"]\n",
            tc.table, tc.name
        ),
    ));
    let err = relay.join().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("column \"tenant\" not found in table")
            && err.to_string().contains("set outbox.additional_placement"),
        "{err}"
    );
}
