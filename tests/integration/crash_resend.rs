//! How much a crash re-sends: the relay binary killed with SIGKILL while a
//! writer commits steadily. After each restart the relay may send again only
//! what was in flight at the kill (read from its `/metrics` just before) and
//! what was acknowledged shortly before it; nothing is lost.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

    // About 1,000 rows/s in transactions of 1 to 9 rows, until told to stop.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(-1));
    let writer = {
        let (stop, committed, table) = (stop_writing.clone(), committed.clone(), tc.table.clone());
        tokio::spawn(async move {
            let db = servers().sql().await;
            let mut next = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let n = 1 + next % 9;
                insert_rows(&db, &table, "evt", next, n).await;
                next += n;
                committed.store(next - 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            next
        })
    };
    // A reading every few milliseconds, kept per instance.
    let readings: Arc<Mutex<Vec<Reading>>> = Arc::default();
    let stop_reading = Arc::new(AtomicBool::new(false));
    let reader = {
        let (readings, stop, addr) = (readings.clone(), stop_reading.clone(), addr.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = read_metrics(&addr) {
                    readings.lock().unwrap().push(r);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut kills = Vec::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..6 {
        // Each instance first streams and acknowledges for a while.
        let started = Instant::now();
        eventually(60, "the instance acknowledges records", || {
            let addr = addr.clone();
            async move { read_metrics(&addr).is_some_and(|r| r.acked > 0.0) }
        })
        .await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(400 + rng % 600)).await;
        // The last reading, then at once the kill.
        let Some(last) = read_metrics(&addr) else {
            panic!("no metrics from the running relay at {addr}");
        };
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let history: Vec<Reading> = readings
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.at >= started)
            .copied()
            .collect();
        // Rows committed after the kill were never produced by this instance;
        // reading the counter a moment later only widens the seq range.
        tokio::time::sleep(Duration::from_millis(50)).await;
        kills.push(Kill::from_readings(
            &history,
            last,
            committed.load(Ordering::SeqCst),
        ));
        readings.lock().unwrap().clear();
        child = KillOnDrop(spawn_relay_binary(&config, &log));
    }
    stop_writing.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();
    let db = s.sql().await;
    let end = wal_insert_lsn(&db).await;
    eventually(90, "the last instance confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    stop_reading.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    terminate(&mut child.0);

    let got = consume_distinct(&s.brokers, &tc.topic("evt"), total as usize);
    let context = format!("log {}", Path::new(&log).display());
    check_resends("FAULT crash_resend", &seqs(&got), total, &kills, &context);
}
