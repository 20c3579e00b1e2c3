//! A partitioned outbox table (teams partition by time and drop old
//! partitions instead of deleting rows): published through its root, rows of
//! every partition arrive as rows of the table, also from a partition
//! attached while the relay streams, and detaching and dropping a partition
//! does not disturb the stream.

use std::collections::HashSet;

use outbox_relay::metrics::Metrics;
use outbox_relay::relay::RelayError;
use outbox_relay::setup::SetupError;

use crate::harness::*;

fn partition_sql(table: &str, year: i32) -> String {
    format!(
        "CREATE TABLE public.{table}_{year} PARTITION OF public.{table}
         FOR VALUES FROM ('{year}-01-01') TO ('{}-01-01')",
        year + 1
    )
}

async fn insert_in(db: &tokio_postgres::Client, table: &str, year: i32, from: i64, n: i64) {
    db.batch_execute(&format!(
        "INSERT INTO public.{table} (aggregate_type, aggregate_id, event_type, payload, created_at)
         SELECT 'p', 'k' || (i % 5), 'E', jsonb_build_object('seq', i), '{year}-06-01'::timestamptz
         FROM generate_series({from}, {}) i",
        from + n - 1
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_streams_through_its_root_while_partitions_come_and_go() {
    let tc = TestCase::new("partitioned").await;
    let s = servers();
    let db = s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "DROP TABLE public.{t};
         CREATE TABLE public.{t} (
             id uuid NOT NULL DEFAULT gen_random_uuid(),
             aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,
             payload jsonb NOT NULL, headers jsonb,
             created_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (id, created_at)
         ) PARTITION BY RANGE (created_at);
         {}; {};",
        partition_sql(t, 2024),
        partition_sql(t, 2025)
    ))
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, tc.config_text(&s.brokers, "")).unwrap();
    let dry = relay_cli(&["init", "--dry-run"], &config).await;
    assert_eq!(dry.code, Some(0), "{dry}");
    assert!(
        dry.item(&format!("table public.{t}"))
            .contains("partitioned"),
        "{dry}"
    );
    assert!(
        dry.stdout
            .contains("WITH (publish = 'insert', publish_via_partition_root = true);"),
        "{dry}"
    );

    // A publication that lists the partitions under their own names is refused with the fix.
    db.batch_execute(&format!(
        "CREATE PUBLICATION {n} FOR TABLE public.{t} WITH (publish = 'insert')",
        n = tc.name
    ))
    .await
    .unwrap();
    let err = spawn_relay(tc.config()).join().await.unwrap_err();
    assert!(
        matches!(&err, RelayError::Setup(e) if matches!(**e, SetupError::NotViaRoot { .. })),
        "{err}"
    );
    assert!(err.to_string().contains(&format!(
        "run ALTER PUBLICATION \"{}\" SET (publish_via_partition_root = true);",
        tc.name
    )));
    db.batch_execute(&format!("DROP PUBLICATION {}", tc.name))
        .await
        .unwrap();

    let relay = start_relay(tc.config()).await;
    insert_in(&db, t, 2024, 0, 50).await;
    insert_in(&db, t, 2025, 50, 50).await;
    // A partition attached while the relay streams is part of the publication at once.
    db.batch_execute(&partition_sql(t, 2026)).await.unwrap();
    insert_in(&db, t, 2026, 100, 50).await;
    // The oldest partition detached and dropped: the stream goes on.
    db.batch_execute(&format!(
        "ALTER TABLE public.{t} DETACH PARTITION public.{t}_2024; DROP TABLE public.{t}_2024;"
    ))
    .await
    .unwrap();
    insert_in(&db, t, 2025, 150, 25).await;
    insert_in(&db, t, 2026, 175, 25).await;

    eventually(60, "all 200 acknowledged", || async {
        Metrics::total(&relay.metrics.events_acked) >= 200
    })
    .await;
    let got = tokio::task::spawn_blocking({
        let (brokers, topic) = (s.brokers.clone(), tc.topic("p"));
        move || consume_all(&brokers, &[topic], 200)
    })
    .await
    .unwrap();
    let seqs = seqs(&got);
    let distinct: HashSet<i64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), 200, "each row once");
    assert_eq!(distinct, (0..200).collect::<HashSet<i64>>());
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 200);
    relay.stop().await.unwrap();
}
