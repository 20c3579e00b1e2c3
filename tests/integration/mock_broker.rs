//! Broker faults, on top of the real PostgreSQL: injected with librdkafka's
//! MockCluster, and a real tansu process stopped and started again. The slot
//! never moves past a record the broker has not acknowledged, and everything
//! arrives once the broker is back.

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::lsn::Lsn;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use outbox_relay::metrics::Metrics;

use crate::harness::*;

async fn insert_tx(tc: &TestCase, from: i64, n: i64) -> Lsn {
    insert_rows(&tc.s.sql().await, &tc.table, "evt", from, n).await
}

fn seqs_by_key(records: &[Consumed]) -> HashMap<String, Vec<i64>> {
    let mut m: HashMap<String, Vec<i64>> = HashMap::new();
    for r in records {
        let v: serde_json::Value = serde_json::from_str(&r.value).unwrap();
        m.entry(r.key.clone())
            .or_default()
            .push(v["seq"].as_i64().unwrap());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_never_passes_unacknowledged_records_while_the_broker_is_down() {
    slot_holds_while_the_broker_is_down(servers()).await;
}

/// Also run on each version of the matrix.
pub async fn slot_holds_while_the_broker_is_down(s: &'static Servers) {
    let tc = TestCase::on(s, "mockdown").await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(&tc.topic("evt"), 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let relay = start_relay(tc.config_precreated_topics(
        &brokers,
        "[kafka.properties]\n\"message.timeout.ms\" = 120000\n",
    ))
    .await;

    let first_end = insert_tx(&tc, 0, 20).await;
    eventually(30, "first transaction confirmed", || async {
        tc.confirmed().await >= first_end
    })
    .await;

    mock.broker_down(1).unwrap();
    let down = std::time::Instant::now();
    let second_end = insert_tx(&tc, 20, 20).await;
    let third_end = insert_tx(&tc, 40, 20).await;
    // For several status intervals the slot must stay before the unacknowledged transactions.
    for _ in 0..30 {
        let c = tc.confirmed().await;
        assert!(
            c < second_end,
            "slot confirmed {c} past unacknowledged transaction ending at {second_end}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 20);
    assert!(
        relay.metrics.is_active(),
        "replication stays connected during the outage"
    );

    let outage = down.elapsed();
    mock.broker_up(1).unwrap();
    let up = std::time::Instant::now();
    eventually(60, "all transactions confirmed after recovery", || async {
        tc.confirmed().await >= third_end
    })
    .await;
    let recovery = up.elapsed();
    let got = consume_all(&brokers, &[tc.topic("evt")], 60);
    let by_key = seqs_by_key(&got);
    let total: usize = by_key.values().map(|v| v.len()).sum();
    assert_eq!(total, 60, "every row exactly once: {by_key:?}");
    eprintln!(
        "FAULT broker_down: written=60 delivered={total} duplicates=0 outage_ms={} recovery_ms={}",
        outage.as_millis(),
        recovery.as_millis()
    );
    for (k, seqs) in by_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {seqs:?}"
        );
    }
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_without_reordering_a_key() {
    let tc = TestCase::new("mockerr").await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(&tc.topic("evt"), 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let relay = start_relay(tc.config_precreated_topics(&brokers, "")).await;
    let warm = insert_tx(&tc, 0, 5).await;
    eventually(30, "warm-up confirmed", || async {
        tc.confirmed().await >= warm
    })
    .await;

    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    let mut last = Lsn::ZERO;
    let started = std::time::Instant::now();
    for i in 0..10 {
        last = insert_tx(&tc, 5 + i * 10, 10).await;
    }
    eventually(60, "all confirmed despite produce errors", || async {
        tc.confirmed().await >= last
    })
    .await;
    let confirmed_after = started.elapsed();
    let got = consume_all(&brokers, &[tc.topic("evt")], 105);
    let by_key = seqs_by_key(&got);
    for (k, seqs) in &by_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {k} reordered or duplicated: {seqs:?}"
        );
    }
    assert_eq!(by_key.values().map(|v| v.len()).sum::<usize>(), 105);
    assert_eq!(Metrics::total(&relay.metrics.events_failed), 0);
    eprintln!(
        "FAULT produce_errors: written=105 delivered={} duplicates=0 injected_errors=5 confirmed_after_ms={}",
        got.len(),
        confirmed_after.as_millis()
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_stops_the_relay_or_is_dead_lettered() {
    use RDKafkaRespErr::*;
    // Policy stop: the relay stops with an error naming the event; the slot stays before it.
    let tc = TestCase::new("mockrefuse").await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(&tc.topic("evt"), 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let relay = start_relay(tc.config_precreated_topics(&brokers, "")).await;
    let warm = insert_tx(&tc, 0, 3).await;
    eventually(30, "warm-up confirmed", || async {
        tc.confirmed().await >= warm
    })
    .await;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let refused_end = insert_tx(&tc, 3, 1).await;
    let refused_at = std::time::Instant::now();
    let err = relay.join().await.unwrap_err();
    let stopped_after = refused_at.elapsed();
    assert!(err.is_fatal());
    let msg = err.to_string();
    assert!(
        msg.contains("Kafka refused the record of event") && msg.contains("on_invalid"),
        "{msg}"
    );
    assert!(
        tc.confirmed().await < refused_end,
        "nothing past the refused record is confirmed"
    );

    // Policy dead_letter: the refused records go to the dead-letter topic and the stream goes on.
    let tc = TestCase::new("mockrefusedlq").await;
    mock.create_topic(&tc.topic("evt"), 1, 1).unwrap();
    mock.create_topic("mockrefusedlq.dlq", 1, 1).unwrap();
    let text = tc
        .config_text(&brokers, "")
        .replace("create_topics = true", "create_topics = false")
        .replace(
            "[outbox]\n",
            "[outbox]\non_invalid = \"dead_letter\"\ndead_letter_topic = \"mockrefusedlq.dlq\"\n",
        );
    let cfg = outbox_relay::config::Config::from_toml(&text, std::path::Path::new("t"), |_| None)
        .unwrap();
    let relay = start_relay(cfg).await;
    let warm = insert_tx(&tc, 0, 3).await;
    eventually(30, "warm-up confirmed", || async {
        tc.confirmed().await >= warm
    })
    .await;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    insert_tx(&tc, 3, 5).await;
    let end = insert_tx(&tc, 8, 2).await;
    eventually(
        30,
        "everything confirmed past the refused batch",
        || async { tc.confirmed().await >= end },
    )
    .await;
    let dead = consume_all(&brokers, &["mockrefusedlq.dlq".to_string()], 1);
    let good = consume_all(&brokers, &[tc.topic("evt")], 10 - dead.len());
    assert!(!dead.is_empty());
    // The broker's MSG_SIZE_TOO_LARGE is named as such, as librdkafka's own size check is.
    assert!(dead.iter().all(|r| r.header("reason") == Some("too_large")
        && r.header("original_topic") == Some(tc.topic("evt").as_str())));
    let mut all: Vec<String> = dead
        .iter()
        .chain(good.iter())
        .map(|r| r.header("id").unwrap().to_string())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "every row either delivered or dead-lettered");
    assert_eq!(
        Metrics::total(&relay.metrics.events_dead_lettered),
        dead.len() as u64
    );
    eprintln!(
        "FAULT broker_refuses: stop_after_ms={} then written=10 delivered={} dead_lettered={}",
        stopped_after.as_millis(),
        good.len(),
        dead.len()
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_bounds_records_in_flight_keeps_the_walsender_and_drains() {
    let tc = TestCase::new("mockslow").await;
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(&tc.topic("evt"), 3, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    // 300 ms per produce round trip and at most 500 records inside librdkafka.
    let relay = start_relay(tc.config_precreated_topics(
        &brokers,
        "[kafka.properties]\n\"queue.buffering.max.messages\" = 500\n",
    ))
    .await;
    mock.broker_round_trip_time(1, Duration::from_millis(300))
        .unwrap();
    let db = servers().sql().await;
    let mut end = Lsn::ZERO;
    for i in 0..20 {
        end = insert_rows(&db, &tc.table, "evt", i * 500, 500).await;
    }
    let mut max_in_flight = 0;
    let drain_started = std::time::Instant::now();
    let deadline = drain_started + Duration::from_secs(120);
    while tc.confirmed().await < end {
        assert!(
            std::time::Instant::now() < deadline,
            "backlog did not drain"
        );
        max_in_flight = max_in_flight.max(relay.metrics.records_in_flight.get());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        relay.metrics.reconnects.get(),
        0,
        "the walsender was never timed out"
    );
    // At most the producer queue plus the one record waiting for room.
    assert!(max_in_flight <= 501, "{max_in_flight} records in flight");
    assert!(max_in_flight > 0);
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 10_000);
    eprintln!(
        "FAULT slow_broker: written=10000 acked=10000 max_in_flight={max_in_flight} reconnects=0 drain_ms={}",
        drain_started.elapsed().as_millis()
    );
    relay.stop().await.unwrap();
}

/// Creates `topic` with 3 partitions on `brokers` (an existing one is fine).
async fn create_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new = NewTopic::new(topic, 3, TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .unwrap()
    {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("cannot create {t}: {e}"),
        }
    }
}

/// A real broker process stopped and started again (tansu; its storage is in
/// memory, so the topic is created again as an operator would restore it).
/// The replication connection stays up, the slot does not pass what the
/// stopped broker did not acknowledge, and every row written while it was down
/// arrives once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tansu_broker_stopped_and_started_again_loses_nothing_written_meanwhile() {
    let tc = TestCase::new("tansu_restart").await;
    let mut tansu = Tansu::start();
    let brokers = tansu.brokers();
    let topic = tc.topic("evt");
    create_topic(&brokers, &topic).await;
    // tansu forgets producer ids when it restarts, and librdkafka's idempotent
    // producer then retries for message.timeout.ms: keep that short here.
    let relay = start_relay(tc.config_precreated_topics(
        &brokers,
        "[kafka.properties]\n\"message.timeout.ms\" = 8000\n",
    ))
    .await;
    let first_end = insert_tx(&tc, 0, 20).await;
    eventually(30, "first transaction confirmed", || async {
        tc.confirmed().await >= first_end
    })
    .await;

    tansu.stop();
    let down = std::time::Instant::now();
    let second_end = insert_tx(&tc, 20, 20).await;
    let third_end = insert_tx(&tc, 40, 20).await;
    for _ in 0..20 {
        let c = tc.confirmed().await;
        assert!(
            c < second_end,
            "slot confirmed {c} past a transaction the stopped broker never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(relay.metrics.is_active(), "replication stays connected");

    tansu.start_again();
    create_topic(&brokers, &topic).await;
    let up = std::time::Instant::now();
    let outage = up.duration_since(down);
    eventually(
        120,
        "all transactions confirmed after the restart",
        || async { tc.confirmed().await >= third_end },
    )
    .await;
    let recovery = up.elapsed();
    let b = brokers.clone();
    let got = tokio::task::spawn_blocking(move || consume_all(&b, &[topic], 40))
        .await
        .unwrap();
    let by_key = seqs_by_key(&got);
    let mut all: Vec<i64> = by_key.values().flatten().copied().collect();
    all.sort_unstable();
    let distinct: std::collections::BTreeSet<i64> = all.iter().copied().collect();
    assert!(
        (20..60).all(|s| distinct.contains(&s)),
        "rows written while the broker was down are missing: {all:?}"
    );
    for (k, seqs) in &by_key {
        let first: Vec<i64> = seqs.iter().copied().filter(|s| *s >= 20).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        sorted.dedup();
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<i64> = first.into_iter().filter(|s| seen.insert(*s)).collect();
        assert_eq!(
            firsts, sorted,
            "key {k}: first occurrences out of commit order"
        );
    }
    eprintln!(
        "FAULT tansu_restart: written_while_down=40 delivered={} duplicates={} outage_ms={} recovery_ms={} reconnects={}",
        all.iter().filter(|s| **s >= 20).count(),
        all.iter().filter(|s| **s >= 20).count() - 40,
        outage.as_millis(),
        recovery.as_millis(),
        relay.metrics.reconnects.get()
    );
    relay.stop().await.unwrap();
}
