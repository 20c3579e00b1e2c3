//! The replay window: which position to confirm to the slot so PostgreSQL keeps
//! `[replay] window` worth of WAL decodable behind the acknowledged position.
//!
//! Pure: fed (time, acknowledged position) samples, it answers with the newest
//! sample that is at least the window behind. Confirming a sample's position
//! (a commit end or a keepalive position) keeps every transaction after it
//! replayable.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::config::Window;
use crate::lsn::Lsn;

/// Samples kept at most; older ones are thinned out evenly beyond this.
const MAX_SAMPLES: usize = 8192;

#[derive(Debug)]
pub struct WindowKeeper {
    window: Window,
    /// Acknowledged positions over time, oldest first, both increasing.
    samples: VecDeque<(SystemTime, Lsn)>,
    spacing: Duration,
}

impl WindowKeeper {
    /// A keeper for `window`, starting from `seed` samples (for example the
    /// stored window start and checkpoint), which may be in any order.
    pub fn new(window: Window, seed: &[(SystemTime, Lsn)]) -> WindowKeeper {
        let spacing = match window {
            Window::Age(d) => (d / MAX_SAMPLES as u32 * 2).max(Duration::from_secs(1)),
            Window::Bytes(_) => Duration::from_secs(1),
        };
        let mut k = WindowKeeper {
            window,
            samples: VecDeque::new(),
            spacing,
        };
        let mut seed = seed.to_vec();
        seed.sort();
        for (t, lsn) in seed {
            k.push(t, lsn);
        }
        k
    }

    fn push(&mut self, t: SystemTime, lsn: Lsn) {
        match self.samples.back() {
            Some(&(bt, bl)) if lsn <= bl || t < bt => return,
            _ => {}
        }
        self.samples.push_back((t, lsn));
        if self.samples.len() > MAX_SAMPLES {
            // Keep the oldest and every other sample: resolution halves, the span stays.
            let kept: VecDeque<_> = self.samples.iter().copied().step_by(2).collect();
            self.samples = kept;
        }
    }

    /// At most `max` samples, spread evenly from the oldest to the newest, to
    /// store with the checkpoint: a restarted relay moves the window on from them.
    pub fn snapshot(&self, max: usize) -> Vec<(SystemTime, Lsn)> {
        let n = self.samples.len();
        if n <= max || max < 2 {
            return self.samples.iter().copied().collect();
        }
        (0..max)
            .map(|i| self.samples[i * (n - 1) / (max - 1)])
            .collect()
    }

    /// Everything up to `acked` was acknowledged at `now`.
    pub fn observe(&mut self, now: SystemTime, acked: Lsn) {
        let due = match self.samples.back() {
            Some(&(t, lsn)) => {
                acked > lsn && now.duration_since(t).unwrap_or_default() >= self.spacing
            }
            None => true,
        };
        if due {
            self.push(now, acked);
        }
    }

    /// The position to confirm at `now` and since when it is acknowledged:
    /// the newest sample at least the window behind, or `None` while no sample
    /// is old (or far behind) enough. Older samples are dropped.
    pub fn target(&mut self, now: SystemTime) -> Option<(Lsn, SystemTime)> {
        let newest = self.samples.back()?.1;
        let behind = |&(t, lsn): &(SystemTime, Lsn)| match self.window {
            Window::Age(d) => now.duration_since(t).unwrap_or_default() >= d,
            Window::Bytes(n) => newest.0.saturating_sub(lsn.0) >= n,
        };
        let count = self.samples.iter().take_while(|s| behind(s)).count();
        if count == 0 {
            return None;
        }
        self.samples.drain(..count - 1);
        self.samples.front().map(|&(t, lsn)| (lsn, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn an_age_window_confirms_what_was_acknowledged_that_long_ago() {
        let mut k = WindowKeeper::new(Window::Age(Duration::from_secs(60)), &[]);
        for s in 0..=120 {
            k.observe(at(s), Lsn(1000 + s * 10));
            if s < 60 {
                assert_eq!(k.target(at(s)), None, "nothing is a minute old at {s}s");
            }
        }
        assert_eq!(k.target(at(120)), Some((Lsn(1000 + 60 * 10), at(60))));
        // Later calls never go backwards and drop what is no longer needed.
        assert_eq!(k.target(at(130)), Some((Lsn(1000 + 70 * 10), at(70))));
        assert!(k.samples.len() <= 52, "{}", k.samples.len());
    }

    #[test]
    fn a_byte_window_stays_that_many_bytes_behind_the_newest_position() {
        let mut k = WindowKeeper::new(Window::Bytes(1000), &[]);
        k.observe(at(0), Lsn(100));
        k.observe(at(1), Lsn(600));
        assert_eq!(k.target(at(1)), None, "only 500 bytes acknowledged");
        k.observe(at(2), Lsn(1100));
        assert_eq!(k.target(at(2)), Some((Lsn(100), at(0))));
        k.observe(at(3), Lsn(1700));
        assert_eq!(k.target(at(3)), Some((Lsn(600), at(1))));
    }

    #[test]
    fn observations_closer_than_the_spacing_or_not_ahead_are_not_kept() {
        let mut k = WindowKeeper::new(Window::Bytes(1), &[]);
        k.observe(at(0), Lsn(10));
        k.observe(at(0), Lsn(20)); // same second
        k.observe(at(5), Lsn(10)); // not ahead
        assert_eq!(k.samples.len(), 1);
    }

    #[test]
    fn seeds_from_the_stored_checkpoint_count_as_samples() {
        let mut k = WindowKeeper::new(
            Window::Age(Duration::from_secs(3600)),
            &[(at(5000), Lsn(900)), (at(0), Lsn(500))],
        );
        assert_eq!(k.target(at(3600)), Some((Lsn(500), at(0))));
        assert_eq!(k.target(at(8600)), Some((Lsn(900), at(5000))));
    }

    #[test]
    fn a_snapshot_keeps_the_oldest_and_the_newest_and_seeds_a_keeper() {
        let mut k = WindowKeeper::new(Window::Age(Duration::from_secs(100)), &[]);
        for s in 0..50 {
            k.observe(at(s * 10), Lsn(s + 1));
        }
        let snap = k.snapshot(8);
        assert_eq!(snap.len(), 8);
        assert_eq!(snap[0], (at(0), Lsn(1)));
        assert_eq!(snap[7], (at(490), Lsn(50)));
        // A keeper restarted from the snapshot moves on as the first one would.
        let mut again = WindowKeeper::new(Window::Age(Duration::from_secs(100)), &snap);
        let (lsn, _) = again.target(at(500)).unwrap();
        assert!(lsn >= Lsn(30) && lsn <= Lsn(41), "{lsn}");
    }

    #[test]
    fn memory_stays_bounded_by_thinning() {
        let mut k = WindowKeeper::new(Window::Bytes(u64::MAX), &[]);
        for s in 0..(3 * MAX_SAMPLES as u64) {
            k.observe(at(s), Lsn(s + 1));
        }
        assert!(k.samples.len() <= MAX_SAMPLES);
        assert_eq!(
            k.samples.front(),
            Some(&(at(0), Lsn(1))),
            "the oldest stays"
        );
    }
}
