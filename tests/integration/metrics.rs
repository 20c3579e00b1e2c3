//! The metrics endpoint: valid Prometheus text (promtool) whose values match
//! a known workload, and health endpoints that follow the relay's state.

use std::process::{Command, Stdio};

use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::Metrics;

use crate::harness::*;

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: run deploy/dev/install-deps.sh (Debian package prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The body of `/metrics` at `addr`.
async fn scrape(addr: String) -> String {
    tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .unwrap()
        .unwrap()
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_known_workload_and_pass_promtool() {
    let tc = TestCase::new("metrics").await;
    let s = servers();
    let mut cfg = tc.config();
    // Statistics every 200 ms instead of 10 s, for the broker round-trip gauge.
    cfg.kafka
        .properties
        .insert("statistics.interval.ms".into(), "200".into());
    let relay = start_relay(cfg).await;
    let listener = outbox_relay::http::bind("127.0.0.1:0").await.unwrap();
    let addr = outbox_relay::http::local_addr(&listener)
        .unwrap()
        .to_string();
    tokio::spawn(outbox_relay::http::serve(listener, relay.metrics.clone()));

    let db = s.sql().await;
    db.batch_execute(&format!(
        "ALTER PUBLICATION {n} SET (publish = 'insert, update')",
        n = tc.name
    ))
    .await
    .unwrap();
    let mut end = Lsn::ZERO;
    for i in 0..5 {
        end = insert_rows(&db, &tc.table, "m", i * 10, 10).await;
    }
    db.batch_execute(&format!(
        "UPDATE {t} SET event_type = 'U' WHERE aggregate_id = 'k1'",
        t = tc.table
    ))
    .await
    .unwrap();
    eventually(30, "50 acked and confirmed", || async {
        Metrics::total(&relay.metrics.events_acked) == 50 && tc.confirmed().await >= end
    })
    .await;
    // Let one status interval pass so gauges reflect the confirmation.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let a = addr.clone();
    let (code, text) = tokio::task::spawn_blocking(move || http_get(&a, "/metrics"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 200);
    promtool_check(&text);
    let topic = tc.topic("m");
    let v = |series: &str| {
        sample(&text, series).unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    assert_eq!(
        v(&format!(
            "outbox_relay_events_received_total{{topic=\"{topic}\"}}"
        )),
        50.0
    );
    assert_eq!(
        v(&format!(
            "outbox_relay_events_produced_total{{topic=\"{topic}\"}}"
        )),
        50.0
    );
    assert_eq!(
        v(&format!(
            "outbox_relay_events_acked_total{{topic=\"{topic}\"}}"
        )),
        50.0
    );
    assert_eq!(
        v("outbox_relay_changes_ignored_total{kind=\"update\"}"),
        5.0,
        "5 rows have aggregate_id k1"
    );
    assert!(v("outbox_relay_transactions_received_total") >= 6.0);
    assert!(v("outbox_relay_transactions_confirmed_total") >= 6.0);
    assert_eq!(v("outbox_relay_delivery_latency_seconds_count"), 50.0);
    assert!(v("outbox_relay_delivery_latency_seconds_sum") > 0.0);
    assert!(v("outbox_relay_confirmed_lsn") >= end.0 as f64);
    assert!(v("outbox_relay_server_wal_end_lsn") >= v("outbox_relay_confirmed_lsn"));
    assert!(v("outbox_relay_received_lsn") > 0.0);
    assert_eq!(v("outbox_relay_records_in_flight"), 0.0);
    assert_eq!(v("outbox_relay_active"), 1.0);
    assert!(text.contains("outbox_relay_build_info{version=\""));
    assert!(!text.contains("k1"), "keys must never be labels");

    // The slot poller reads pg_replication_slots every few seconds.
    eventually(15, "slot gauges", || {
        let a = addr.clone();
        async move {
            let text = scrape(a).await;
            sample(&text, "outbox_relay_slot_active") == Some(1.0)
                && sample(&text, "outbox_relay_slot_wal_status{status=\"reserved\"}") == Some(1.0)
                && sample(&text, "outbox_relay_slot_retained_wal_bytes").is_some_and(|b| b > 0.0)
        }
    })
    .await;

    // librdkafka's statistics: the request round trip to the one broker, in
    // seconds (a loopback broker answers well within 0.5 s). The gauge only
    // holds brokers that answered in the last interval, so keep producing.
    let rtt = format!(
        "outbox_relay_broker_rtt_seconds{{broker=\"{}\",stat=\"p99\"}}",
        s.brokers
    );
    let next = std::sync::atomic::AtomicI64::new(1000);
    eventually(15, "broker round-trip gauge", || {
        let (a, rtt, db, next, table) = (addr.clone(), rtt.clone(), &db, &next, &tc.table);
        async move {
            let first = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            insert_rows(db, table, "m", first, 1).await;
            let text = scrape(a).await;
            sample(&text, &rtt).is_some_and(|v| v > 0.0 && v < 0.5)
        }
    })
    .await;

    let a = addr.clone();
    let (code, body) = tokio::task::spawn_blocking(move || http_get(&a, "/readyz"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "ready: streaming from the slot\n")
    );
    relay.stop().await.unwrap();
    let a = addr.clone();
    let (code, body) = tokio::task::spawn_blocking(move || http_get(&a, "/readyz"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 503, "{body}");
    let a = addr.clone();
    let (code, _) = tokio::task::spawn_blocking(move || http_get(&a, "/healthz"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, 200);
}
