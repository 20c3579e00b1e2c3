//! The binary stops cleanly on SIGTERM mid-stream and a restart delivers every
//! row; the only duplicates are records the slot had not confirmed at the stop.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use outbox_relay::lsn::Lsn;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_then_restart_delivers_every_row() {
    sigterm_then_restart_repeats_only_unconfirmed_rows(servers()).await;
}

/// Also run on each version of the matrix.
pub async fn sigterm_then_restart_repeats_only_unconfirmed_rows(s: &'static Servers) {
    let tc = TestCase::on(s, "sigterm").await;
    let dir = tempfile::tempdir().unwrap();
    let (config, log, mut child) = tc.start_binary(dir.path()).await;

    const TOTAL: i64 = 4000;
    let writer = paced_writer(s, &tc.table, TOTAL, 5, Duration::from_millis(4));

    // Stop while the writer is still writing and the relay has made progress.
    let start = tc.confirmed().await;
    eventually(60, "relay progress", || async {
        tc.confirmed().await > start
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "the writer should still be running at the stop"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM:\n{stderr}");
    assert!(stderr.contains("stopped streaming"), "{stderr}");
    let confirmed_at_stop = tc.confirmed().await;

    let mut child = spawn_relay_binary(&config, &log);
    writer.await.unwrap();
    let end = wal_insert_lsn(&s.sql().await).await;
    eventually(60, "restarted relay confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let distinct = |got: &[Consumed]| {
        got.iter()
            .map(|r| {
                serde_json::from_str::<serde_json::Value>(&r.value).unwrap()["seq"]
                    .as_i64()
                    .unwrap()
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let got = consume_until(&s.brokers, &[tc.topic("evt")], |got| {
        distinct(got) >= TOTAL as usize
    });
    let mut count: HashMap<i64, usize> = HashMap::new();
    let mut duplicates = 0;
    let mut first_seen: HashMap<String, Vec<i64>> = HashMap::new();
    for r in &got {
        let v: serde_json::Value = serde_json::from_str(&r.value).unwrap();
        let seq = v["seq"].as_i64().unwrap();
        let n = count.entry(seq).or_default();
        *n += 1;
        if *n > 1 {
            duplicates += 1;
            let lsn: Lsn = r.header("lsn").unwrap().parse().unwrap();
            assert!(
                lsn >= confirmed_at_stop,
                "row {seq} (commit {lsn}) was confirmed at {confirmed_at_stop} yet sent again"
            );
        } else {
            first_seen.entry(r.key.clone()).or_default().push(seq);
        }
    }
    let missing: Vec<i64> = (0..TOTAL).filter(|i| !count.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "rows never delivered: {missing:?} ({} records read)",
        got.len()
    );
    for (k, seqs) in first_seen {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "first occurrences of key {k} out of commit order"
        );
    }
    eprintln!("sigterm test: {TOTAL} rows, {} records, {duplicates} duplicates, confirmed at stop {confirmed_at_stop}", got.len());
}
