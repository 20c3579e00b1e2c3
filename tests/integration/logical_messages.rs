//! `pg_logical_emit_message` as a second source of events: transactional
//! messages with the configured prefix become records by the same rules as
//! rows, in WAL order with the rows of their transaction; rolled-back,
//! non-transactional and other-prefix messages send nothing; a message that is
//! not JSON stops the relay like an invalid row.

use outbox_relay::metrics::Metrics;

use outbox_relay::lsn::Lsn;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitted_messages_are_events_in_wal_order_and_rolled_back_ones_never_sent() {
    let tc = TestCase::new("emit").await;
    let s = servers();
    let db = s.sql().await;
    // Messages are database-wide: a prefix of this test's own.
    let prefix = format!("outbox_{}", tc.name);
    let relay = start_relay(tc.config_with_outbox(&format!(
        "table = \"public.{}\"\ntopic = \"{}.{{aggregate_type}}\"\nmessages_prefix = \"{prefix}\"\n",
        tc.table, tc.name
    )))
    .await;
    let t = &tc.table;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let content = |seq: i32| {
        format!(
            "json_build_object('id', gen_random_uuid(), 'aggregate_type', 'm', 'aggregate_id', 'k', 'event_type', 'Emitted',
                'payload', json_build_object('seq', {seq}), 'headers', json_build_object('traceparent', '{traceparent}'))::text"
        )
    };
    let row = |seq: i32| {
        format!("INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('m', 'k', 'Row', '{{\"seq\": {seq}}}');")
    };
    db.batch_execute(&format!(
        "BEGIN; {} SELECT pg_logical_emit_message(true, '{prefix}', {}); {} COMMIT;",
        row(1),
        content(2),
        row(3)
    ))
    .await
    .unwrap();
    db.batch_execute(&format!(
        "BEGIN; SELECT pg_logical_emit_message(true, '{prefix}', {}); {} ROLLBACK;",
        content(99),
        row(99)
    ))
    .await
    .unwrap();
    db.batch_execute(&format!(
        "SELECT pg_logical_emit_message(false, '{prefix}', {});
         SELECT pg_logical_emit_message(true, 'not_{prefix}', {});
         SELECT pg_logical_emit_message(true, '{prefix}', {});",
        content(98),
        content(97),
        content(4)
    ))
    .await
    .unwrap();
    let end = wal_insert_lsn(&db).await;
    eventually(
        30,
        "four events acknowledged and the slot past them",
        || async {
            Metrics::total(&relay.metrics.events_acked) == 4 && tc.confirmed().await >= end
        },
    )
    .await;
    let got = consume_all(&s.brokers, &[tc.topic("m")], 4);
    // One key, one partition: offset order is WAL order.
    assert_eq!(seqs(&got), [1, 2, 3, 4], "{got:?}");
    let types: Vec<_> = got
        .iter()
        .map(|r| r.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Row", "Emitted", "Row", "Emitted"]);
    let emitted = &got[1];
    assert_eq!(emitted.key, "k");
    assert_eq!(
        emitted.value, r#"{"seq" : 2}"#,
        "the payload as the message wrote it"
    );
    assert_eq!(emitted.header("traceparent"), Some(traceparent));
    assert_eq!(emitted.header("id").unwrap().len(), 36);
    assert_eq!(
        emitted.header("lsn"),
        got[0].header("lsn"),
        "same transaction"
    );
    assert_eq!(got[2].header("lsn"), got[0].header("lsn"));
    assert_ne!(got[3].header("lsn"), got[0].header("lsn"));
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 4);

    // A message that is not JSON is an invalid row: the relay stops naming it and does not confirm it.
    let bad: String = db
        .query_one(
            &format!("SELECT pg_logical_emit_message(true, '{prefix}', 'order 7 placed')::text"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let bad: Lsn = bad.parse().unwrap();
    let err = relay.join().await.unwrap_err();
    assert!(err.is_fatal());
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("with prefix \"{prefix}\" is not a JSON object")),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    // The message's own LSN: the slot stays before its transaction's commit.
    let confirmed = tc.confirmed().await;
    assert!(
        confirmed <= bad,
        "the bad message at {bad} is not confirmed (slot at {confirmed})"
    );
}
