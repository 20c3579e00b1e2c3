//! `outbox.on_invalid = "dead_letter"`: rows that cannot be delivered go to the
//! dead-letter topic with headers saying why, and the stream goes on.

use std::path::Path;

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::Metrics;

use crate::harness::*;

fn dead_letter_config(tc: &TestCase, extra_kafka: &str) -> Config {
    let text = tc.config_text(&servers().brokers, extra_kafka).replace(
        "[outbox]\n",
        &format!(
            "[outbox]\non_invalid = \"dead_letter\"\ndead_letter_topic = \"{}.dlq\"\n",
            tc.name
        ),
    );
    Config::from_toml(&text, Path::new("t"), |_| None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_routing_column_and_oversized_record_are_dead_lettered_and_the_stream_goes_on() {
    let tc = TestCase::new("dlq").await;
    let s = servers();
    let db = s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "ALTER TABLE {t} ALTER COLUMN aggregate_id DROP NOT NULL"
    ))
    .await
    .unwrap();
    // librdkafka refuses records over message.max.bytes locally, as a broker would.
    let relay = start_relay(dead_letter_config(
        &tc,
        "[kafka.properties]\n\"message.max.bytes\" = 20000\n",
    ))
    .await;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'Before', '{{\"seq\": 1}}');
         INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
           VALUES ('00000000-0000-4000-8000-00000000d1a0', 'ok', NULL, 'NoKey', '{{\"seq\": 2}}');
         INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
           VALUES ('00000000-0000-4000-8000-00000000b16b', 'ok', 'b', 'Huge', jsonb_build_object('seq', 3, 'pad', repeat('x', 50000)));
         INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'After', '{{\"seq\": 4}}');"
    ))
    .await
    .unwrap();
    let end: Lsn = wal_insert_lsn(&db).await;
    eventually(30, "everything confirmed past the bad rows", || async {
        tc.confirmed().await >= end
    })
    .await;
    assert!(!relay.is_finished(), "the relay keeps running");

    let good = consume_all(&s.brokers, &[tc.topic("ok")], 2);
    let types: Vec<_> = good
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);

    let dead = consume_all(&s.brokers, &[format!("{}.dlq", tc.name)], 2);
    assert_eq!(dead.len(), 2, "{dead:?}");
    let no_key = dead
        .iter()
        .find(|r| r.header("id") == Some("00000000-0000-4000-8000-00000000d1a0"))
        .unwrap();
    assert_eq!(no_key.header("reason"), Some("null_column"));
    assert!(no_key
        .header("error")
        .unwrap()
        .contains("NULL in column \"aggregate_id\""));
    assert!(no_key.header("lsn").unwrap().contains('/'));
    assert_eq!(
        no_key.value, "{\"seq\": 2}",
        "the payload is kept for a mapping error"
    );
    let huge = dead
        .iter()
        .find(|r| r.header("id") == Some("00000000-0000-4000-8000-00000000b16b"))
        .unwrap();
    assert_eq!(huge.header("reason"), Some("too_large"));
    assert_eq!(huge.header("original_topic"), Some(tc.topic("ok").as_str()));
    assert_eq!(huge.key, "b");
    assert!(huge.value.is_empty(), "the refused value is not sent again");
    assert!(
        huge.header("original_size")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 50000
    );
    assert_eq!(Metrics::total(&relay.metrics.events_dead_lettered), 2);
    relay.stop().await.unwrap();
}
