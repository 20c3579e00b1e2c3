//! Readings of a relay binary's `/metrics` over time, and what they allow a
//! SIGKILL to re-send: the records in flight at the kill, those acknowledged
//! just before it (their position or removal was not stored yet), and those
//! produced between the last reading and the kill.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{http_get, sample};

/// Acknowledged records counted in the allowance: those acknowledged in this
/// window before the kill. The relay stores an advance within 20 ms
/// (`postgres.confirm_interval_ms`, `checkpoint.write_interval_ms`,
/// `poll.after_send_interval_ms`); the benchmark checks 50 ms. The tests
/// allow more so that a slow, shared CI machine does not make them flaky; the
/// 1 s of the timer-only design (what the tests catch) re-sends several times
/// this on average.
pub const ACKED_WINDOW: Duration = Duration::from_millis(250);

/// One `/metrics` reading of the running instance.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub at: Instant,
    pub acked: f64,
    pub produced: f64,
    pub in_flight: f64,
}

pub fn read_metrics(addr: &str) -> Option<Reading> {
    let (code, body) = http_get(addr, "/metrics")?;
    if code != 200 {
        return None;
    }
    let sum = |metric: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some(Reading {
        at: Instant::now(),
        acked: sum("outbox_relay_events_acked_total{"),
        produced: sum("outbox_relay_events_produced_total{"),
        in_flight: sample(&body, "outbox_relay_records_in_flight")?,
    })
}

/// What the re-sent count after one kill may be.
#[derive(Debug)]
pub struct Kill {
    pub in_flight: f64,
    pub acked_in_window: f64,
    /// Records produced in the 50 ms before the last reading: a generous bound
    /// on what the relay produced between that reading and the kill (well
    /// under a millisecond on an idle machine).
    pub produced_slack: f64,
    /// Highest seq committed when the instance died: what it can have produced.
    pub max_seq: i64,
}

impl Kill {
    /// From the instance's readings (`history`, oldest first) and the last
    /// one, taken right before the kill.
    pub fn from_readings(history: &[Reading], last: Reading, max_seq: i64) -> Kill {
        let before = |d: Duration| history.iter().rev().find(|r| r.at + d <= last.at).copied();
        let acked_before = before(ACKED_WINDOW).map_or(0.0, |r| r.acked);
        let produced_before = before(Duration::from_millis(50)).map_or(0.0, |r| r.produced);
        Kill {
            in_flight: last.in_flight,
            acked_in_window: last.acked - acked_before,
            produced_slack: last.produced - produced_before,
            max_seq,
        }
    }

    pub fn allowance(&self) -> usize {
        (self.in_flight + self.acked_in_window + self.produced_slack).ceil() as usize
    }
}

/// Asserts that `got` (every copy read back, by `seq`) holds each of the
/// `total` rows, and that the copies re-sent after each kill stay within what
/// that kill's readings allow; prints `label` with the counts. `context` is
/// added to a failure (a log path).
pub fn check_resends(label: &str, got: &[i64], total: i64, kills: &[Kill], context: &str) {
    use std::collections::HashMap;
    let mut copies: HashMap<i64, usize> = HashMap::new();
    for seq in got {
        *copies.entry(*seq).or_default() += 1;
    }
    let lost: Vec<i64> = (0..total).filter(|s| !copies.contains_key(s)).collect();
    assert!(lost.is_empty(), "committed rows never delivered: {lost:?}");
    // Each extra copy belongs to the first kill after which its row could
    // have been produced: the first instance that produced it died there.
    let mut resent = vec![0usize; kills.len()];
    for (seq, n) in &copies {
        if *n > 1 {
            let k = kills
                .iter()
                .position(|k| *seq <= k.max_seq)
                .unwrap_or_else(|| panic!("seq {seq} sent {n} times, none of them before a kill"));
            resent[k] += n - 1;
        }
    }
    let report: Vec<String> = kills
        .iter()
        .zip(&resent)
        .map(|(k, r)| {
            format!(
                "in_flight={} acked_{}ms={} slack={} resent={r} allowed={}",
                k.in_flight,
                ACKED_WINDOW.as_millis(),
                k.acked_in_window,
                k.produced_slack,
                k.allowance()
            )
        })
        .collect();
    eprintln!(
        "{label}: written={total} delivered={} duplicates={} kills: {}",
        got.len(),
        resent.iter().sum::<usize>(),
        report.join("; ")
    );
    for (i, (k, r)) in kills.iter().zip(&resent).enumerate() {
        assert!(
            *r <= k.allowance(),
            "kill {i}: {r} records re-sent, more than the {} in flight plus {} acknowledged in the {} ms before it (+{} produced meanwhile); all kills: {report:#?}; {context}",
            k.in_flight,
            k.acked_in_window,
            ACKED_WINDOW.as_millis(),
            k.produced_slack,
        );
    }
}

/// The scaffold of a SIGKILL loop against a relay binary: a writer committing
/// about 1,000 rows/s (transactions of 1 to 9 rows, `seq` from 0) into
/// `table`, a thread reading `/metrics` every 5 ms, and [`KillLoop::kill`]
/// that waits for the instance to acknowledge, lets it run a random while,
/// reads it a last time, kills it and returns what that kill may re-send.
pub struct KillLoop {
    addr: String,
    stop_writing: Arc<AtomicBool>,
    committed: Arc<AtomicI64>,
    writer: tokio::task::JoinHandle<i64>,
    readings: Arc<Mutex<Vec<Reading>>>,
    stop_reading: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<()>,
    rng: u64,
}

impl KillLoop {
    pub fn start(table: &str, addr: &str) -> KillLoop {
        let stop_writing = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicI64::new(-1));
        let writer = {
            let (stop, committed, table) =
                (stop_writing.clone(), committed.clone(), table.to_string());
            tokio::spawn(async move {
                let db = super::servers().sql().await;
                let mut next = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let n = 1 + next % 9;
                    super::insert_rows(&db, &table, "evt", next, n).await;
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
            let (readings, stop, addr) = (readings.clone(), stop_reading.clone(), addr.to_string());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = read_metrics(&addr) {
                        readings.lock().unwrap().push(r);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        KillLoop {
            addr: addr.to_string(),
            stop_writing,
            committed,
            writer,
            readings,
            stop_reading,
            reader,
            rng: 0x2545_F491_4F6C_DD1D,
        }
    }

    /// Waits until the instance acknowledges records, lets it run for
    /// `min_ms` plus a random part of `spread_ms`, then SIGKILLs `child`.
    pub async fn kill(
        &mut self,
        child: &mut std::process::Child,
        min_ms: u64,
        spread_ms: u64,
    ) -> Kill {
        // Each instance first streams and acknowledges for a while.
        let started = Instant::now();
        let addr = self.addr.clone();
        super::eventually(60, "the instance acknowledges records", || {
            let addr = addr.clone();
            async move { read_metrics(&addr).is_some_and(|r| r.acked > 0.0) }
        })
        .await;
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        tokio::time::sleep(Duration::from_millis(min_ms + self.rng % spread_ms)).await;
        // The last reading, then at once the kill.
        let Some(last) = read_metrics(&addr) else {
            panic!("no metrics from the running relay at {addr}");
        };
        child.kill().unwrap();
        child.wait().unwrap();
        let history: Vec<Reading> = self
            .readings
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.at >= started)
            .copied()
            .collect();
        // Rows committed after the kill were never produced by this instance;
        // reading the counter a moment later only widens the seq range.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let kill = Kill::from_readings(&history, last, self.committed.load(Ordering::SeqCst));
        self.readings.lock().unwrap().clear();
        kill
    }

    /// Stops the writer; the number of rows it committed.
    pub async fn stop_writing(&mut self) -> i64 {
        self.stop_writing.store(true, Ordering::Relaxed);
        (&mut self.writer).await.unwrap()
    }

    /// Stops the metrics reader.
    pub fn stop_reading(self) {
        self.stop_reading.store(true, Ordering::Relaxed);
        self.reader.join().unwrap();
    }
}
