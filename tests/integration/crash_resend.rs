//! How much a crash re-sends: the relay binary killed with SIGKILL while a
//! writer commits steadily. After each restart the relay may send again only
//! what was in flight at the kill (read from its `/metrics` just before) and
//! what was acknowledged shortly before it; nothing is lost.

use std::path::Path;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_resends_only_what_was_in_flight_or_just_acknowledged() {
    let tc = TestCase::new("crash_resend").await;
    let s = servers();
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    // The defaults users run with: status updates on a 1 s timer.
    let text = tc
        .config_text(&s.brokers, "")
        .replace("status_interval_ms = 200", "status_interval_ms = 1000")
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = KillOnDrop(spawn_relay_binary(&config, &log));
    eventually(60, "relay streaming from its slot", || tc.slot_exists(true)).await;

    let mut lp = KillLoop::start(&tc.table, &addr);
    let mut kills = Vec::new();
    for _ in 0..6 {
        kills.push(lp.kill(&mut child.0, 400, 600).await);
        child = KillOnDrop(spawn_relay_binary(&config, &log));
    }
    let total = lp.stop_writing().await;
    let db = s.sql().await;
    let end = wal_insert_lsn(&db).await;
    eventually(90, "the last instance confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    lp.stop_reading();
    terminate(&mut child.0);

    let got = consume_distinct(&s.brokers, &tc.topic("evt"), total as usize);
    let context = format!("log {}", Path::new(&log).display());
    check_resends("FAULT crash_resend", &seqs(&got), total, &kills, &context);
}
