//! Hot standby through the slot: two relay processes with one config; only one
//! streams, the other stands by and takes over when the first is SIGKILLed.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::harness::*;

async fn readyz(addr: &str) -> Option<(u16, String)> {
    let a = addr.to_string();
    tokio::task::spawn_blocking(move || http_get(&a, "/readyz"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_the_active_instance_is_killed() {
    standby_instance_takes_over_after_sigkill(servers()).await;
}

/// Also run on each version of the matrix.
pub async fn standby_instance_takes_over_after_sigkill(s: &'static Servers) {
    let tc = TestCase::on(s, "ha").await;
    let dir = tempfile::tempdir().unwrap();
    let (addr_a, addr_b) = (free_addr(), free_addr());
    let extra = "standby_retry_ms = 200\n";
    for (name, addr) in [("a", &addr_a), ("b", &addr_b)] {
        let text = tc
            .config_text(&s.brokers, "")
            .replace("[relay]\n", &format!("[relay]\n{extra}"))
            .replace("listen = \"\"", &format!("listen = \"{addr}\""));
        std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
    }
    let mut a = spawn_relay_binary(&dir.path().join("a.toml"), &dir.path().join("a.log"));
    eventually(30, "instance a streaming", || async {
        readyz(&addr_a)
            .await
            .is_some_and(|(c, b)| c == 200 && b.starts_with("ready"))
    })
    .await;
    let mut b = spawn_relay_binary(&dir.path().join("b.toml"), &dir.path().join("b.log"));
    eventually(30, "instance b standing by", || async {
        readyz(&addr_b)
            .await
            .is_some_and(|(c, b)| c == 200 && b.starts_with("standby"))
    })
    .await;
    let metrics_b = tokio::task::spawn_blocking({
        let a = addr_b.clone();
        move || http_get(&a, "/metrics").unwrap().1
    })
    .await
    .unwrap();
    assert_eq!(sample(&metrics_b, "outbox_relay_active"), Some(0.0));

    const TOTAL: i64 = 2000;
    let writer = paced_writer(s, &tc.table, TOTAL, 5, Duration::from_millis(3));
    let start_lsn = tc.confirmed().await;
    eventually(30, "progress", || async {
        tc.confirmed().await > start_lsn
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let killed = Instant::now();
    eventually(30, "instance b takes over", || async {
        readyz(&addr_b)
            .await
            .is_some_and(|(c, b)| c == 200 && b.starts_with("ready"))
    })
    .await;
    let takeover = killed.elapsed();

    writer.await.unwrap();
    let end = wal_insert_lsn(&s.sql().await).await;
    eventually(60, "instance b confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut b);

    let got = consume_distinct(&s.brokers, &tc.topic("evt"), TOTAL as usize);
    let all = seqs(&got);
    let distinct: HashSet<i64> = all.iter().copied().collect();
    let missing: Vec<i64> = (0..TOTAL).filter(|i| !distinct.contains(i)).collect();
    assert!(missing.is_empty(), "rows lost in the failover: {missing:?}");
    eprintln!(
        "FAULT ha_takeover: written={TOTAL} delivered={} duplicates={} takeover_ms={} (standby_retry_ms = 200)",
        all.len(),
        all.len() - distinct.len(),
        takeover.as_millis()
    );
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
}
