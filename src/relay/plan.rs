//! What a session does with each transaction: produce it (live), produce it
//! again for a replay request, or skip it because it was acknowledged before.
//!
//! Pure. Decided at `Begin` from the commit LSN (the `lsn` header of every
//! record of the transaction): a transaction ends at or before an LSN that is
//! a transaction boundary exactly when its commit record starts before it.

use crate::lsn::Lsn;
use crate::state::ReplayJob;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxClass {
    Live,
    Replay,
    Skip,
}

/// A replay request being executed, with its counts.
#[derive(Debug, Clone)]
pub struct JobProgress {
    pub job: ReplayJob,
    /// Transactions of the range that produced at least one event.
    pub transactions: u64,
    pub events: u64,
    /// `events` when the transaction being received began.
    pub events_at_begin: u64,
}

impl JobProgress {
    /// A replayed transaction begins.
    pub fn begin(&mut self) {
        self.events_at_begin = self.events;
    }

    /// A replayed transaction commits. Counted only if it produced events:
    /// PostgreSQL 14's pgoutput also sends the empty BEGIN/COMMIT of
    /// transactions that touched no published table.
    pub fn commit(&mut self) {
        if self.events > self.events_at_begin {
            self.transactions += 1;
        }
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Transactions ending at or before this were acknowledged earlier (the
    /// checkpoint): not produced again.
    pub skip_through: Lsn,
    /// Produce transactions after `skip_through` (false while `replay` runs
    /// without a live relay: those belong to the relay's next run).
    pub live: bool,
    pub job: Option<JobProgress>,
    /// Everything up to here is known to be acknowledged: the stored
    /// checkpoint, or what this process saw acknowledged since (not stored
    /// yet). A replay request's range ends here at the latest.
    pub acknowledged: Lsn,
}

impl Plan {
    pub fn classify(&self, commit_lsn: Lsn) -> TxClass {
        if let Some(p) = &self.job {
            // In (from, to] by end LSN: the commit record starts at or after
            // `from` and before `to`.
            if commit_lsn >= p.job.from && commit_lsn < p.job.to {
                return TxClass::Replay;
            }
        }
        if commit_lsn < self.skip_through || !self.live {
            TxClass::Skip
        } else {
            TxClass::Live
        }
    }

    /// The job is complete once everything up to its end is acknowledged.
    pub fn job_done(&self, acked: Lsn) -> bool {
        self.job.as_ref().is_some_and(|p| acked >= p.job.to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(from: u64, to: u64) -> JobProgress {
        JobProgress {
            job: ReplayJob {
                id: 1,
                from: Lsn(from),
                to: Lsn(to),
                only_topic: None,
                topic_suffix: None,
            },
            transactions: 0,
            events: 0,
            events_at_begin: 0,
        }
    }

    #[test]
    fn a_replayed_transaction_counts_only_if_it_produced_events() {
        let mut p = job(0, 100);
        // An empty transaction (PostgreSQL 14 sends those of other tables).
        p.begin();
        p.commit();
        assert_eq!(p.transactions, 0);
        p.begin();
        p.events += 3;
        p.commit();
        assert_eq!((p.transactions, p.events), (1, 3));
    }

    #[test]
    fn acknowledged_transactions_are_skipped_later_ones_are_live() {
        // Transactions: commit records at 100..110 (end 110) and 110..120 (end 120).
        let plan = Plan {
            skip_through: Lsn(110),
            live: true,
            job: None,
            acknowledged: Lsn(110),
        };
        assert_eq!(plan.classify(Lsn(100)), TxClass::Skip);
        assert_eq!(plan.classify(Lsn(110)), TxClass::Live);
    }

    #[test]
    fn a_replay_range_is_replayed_between_skipped_transactions() {
        // Checkpoint 400; replay (200, 300]: commits at 150 (end 200), 200 (end 250),
        // 250 (end 300), 300 (end 350), 400 (end 450).
        let plan = Plan {
            skip_through: Lsn(400),
            live: true,
            job: Some(job(200, 300)),
            acknowledged: Lsn(400),
        };
        let classes: Vec<_> = [150, 200, 250, 300, 400]
            .map(|c| plan.classify(Lsn(c)))
            .into();
        assert_eq!(
            classes,
            vec![
                TxClass::Skip,
                TxClass::Replay,
                TxClass::Replay,
                TxClass::Skip,
                TxClass::Live
            ]
        );
        assert!(!plan.job_done(Lsn(250)));
        assert!(plan.job_done(Lsn(300)));
    }

    #[test]
    fn without_live_output_nothing_outside_the_range_is_produced() {
        let plan = Plan {
            skip_through: Lsn(10),
            live: false,
            job: Some(job(20, 30)),
            acknowledged: Lsn(10),
        };
        assert_eq!(plan.classify(Lsn(25)), TxClass::Replay);
        assert_eq!(plan.classify(Lsn(40)), TxClass::Skip);
    }
}
