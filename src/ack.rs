//! Which LSN may be confirmed to PostgreSQL.
//!
//! A pure state machine: the relay tells it about every record handed to the
//! producer (in WAL order, numbered by a sequence), every transaction end and
//! every delivery report; it answers with the highest commit end LSN below
//! which every record has been acknowledged. Delivery reports may arrive in any
//! order (different partitions); a record that is never acknowledged holds the
//! position back forever. It does no I/O and knows nothing about Kafka.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// A record's position in the stream, in the order the relay produced it.
pub type Seq = u64;

#[derive(Debug)]
pub struct AckTracker {
    /// Sequence of the oldest record not yet acknowledged.
    base: Seq,
    /// Delivery flags of records `base..next`; the front is always `false`.
    acked: VecDeque<bool>,
    /// Committed transactions not yet confirmable: (end LSN, first seq after the transaction).
    commits: VecDeque<(Lsn, Seq)>,
    in_transaction: bool,
    confirmed: Lsn,
    /// Records registered and not yet acknowledged.
    unacked: usize,
}

impl AckTracker {
    /// Starts from `confirmed`, the slot's position (or zero when unknown).
    pub fn new(confirmed: Lsn) -> Self {
        AckTracker {
            base: 0,
            acked: VecDeque::new(),
            commits: VecDeque::new(),
            in_transaction: false,
            confirmed,
            unacked: 0,
        }
    }

    /// Like [`AckTracker::new`], numbering records from `first_seq`: reports of
    /// records numbered below it (an earlier session's) are ignored.
    pub fn starting_at(confirmed: Lsn, first_seq: Seq) -> Self {
        AckTracker {
            base: first_seq,
            ..AckTracker::new(confirmed)
        }
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> Seq {
        self.base + self.acked.len() as Seq
    }

    /// The highest LSN it is safe to confirm. Never decreases.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Records handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked
    }

    /// Records between the oldest unacknowledged one and the newest (a bound on memory held).
    pub fn window(&self) -> usize {
        self.acked.len()
    }

    pub fn begin(&mut self) {
        self.in_transaction = true;
    }

    /// Registers the next record and returns its sequence number.
    pub fn record(&mut self) -> Seq {
        let seq = self.base + self.acked.len() as Seq;
        self.acked.push_back(false);
        self.unacked += 1;
        seq
    }

    /// The transaction ending at `end_lsn` is complete: all its records were
    /// registered. Returns how many transactions became confirmable.
    pub fn commit(&mut self, end_lsn: Lsn) -> usize {
        self.in_transaction = false;
        let next = self.base + self.acked.len() as Seq;
        self.commits.push_back((end_lsn, next));
        self.advance()
    }

    /// A delivery report said `seq` is stored by the broker. Returns how many
    /// transactions became confirmable.
    pub fn ack(&mut self, seq: Seq) -> usize {
        let Some(offset) = seq.checked_sub(self.base) else {
            return 0;
        };
        match self.acked.get_mut(offset as usize) {
            Some(flag) if !*flag => {
                *flag = true;
                self.unacked -= 1;
            }
            _ => return 0,
        }
        while self.acked.front() == Some(&true) {
            self.acked.pop_front();
            self.base += 1;
        }
        self.advance()
    }

    /// A keepalive from the server: when no transaction is open and nothing is
    /// pending, everything up to `wal_end` has been seen and can be confirmed,
    /// so the slot advances while the outbox is idle.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if !self.in_transaction && self.commits.is_empty() && self.acked.is_empty() {
            self.confirmed = self.confirmed.max(wal_end);
        }
    }

    fn advance(&mut self) -> usize {
        let mut n = 0;
        while let Some(&(end, next)) = self.commits.front() {
            if next > self.base {
                break;
            }
            self.confirmed = self.confirmed.max(end);
            self.commits.pop_front();
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_a_transaction_only_when_all_its_records_are_acked() {
        let mut t = AckTracker::new(Lsn(10));
        t.begin();
        let a = t.record();
        let b = t.record();
        t.commit(Lsn(100));
        assert_eq!(t.confirmed(), Lsn(10));
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.ack(b), 0);
        assert_eq!(t.confirmed(), Lsn(10), "b acked before a: still held back");
        assert_eq!(t.ack(b), 0, "a repeated report changes nothing");
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.ack(a), 1);
        assert_eq!(t.confirmed(), Lsn(100));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_later_transaction_acked_first_waits_for_earlier_ones() {
        let mut t = AckTracker::new(Lsn::ZERO);
        t.begin();
        let a = t.record();
        t.commit(Lsn(100));
        t.begin();
        let b = t.record();
        t.commit(Lsn(200));
        t.ack(b);
        assert_eq!(t.confirmed(), Lsn::ZERO);
        t.ack(a);
        assert_eq!(t.confirmed(), Lsn(200));
    }

    #[test]
    fn a_failed_record_holds_the_position_forever() {
        let mut t = AckTracker::new(Lsn::ZERO);
        t.begin();
        let a = t.record();
        t.commit(Lsn(100));
        t.begin();
        let _lost = t.record();
        t.commit(Lsn(200));
        t.begin();
        let c = t.record();
        t.commit(Lsn(300));
        t.ack(a);
        t.ack(c);
        t.keepalive(Lsn(400));
        assert_eq!(t.confirmed(), Lsn(100));
    }

    #[test]
    fn empty_transactions_and_keepalives_advance_when_idle() {
        let mut t = AckTracker::new(Lsn(5));
        t.begin();
        t.commit(Lsn(50));
        assert_eq!(t.confirmed(), Lsn(50), "a transaction without outbox rows");
        t.keepalive(Lsn(80));
        assert_eq!(t.confirmed(), Lsn(80));
        t.begin();
        t.keepalive(Lsn(90));
        assert_eq!(t.confirmed(), Lsn(80), "not inside an open transaction");
        let a = t.record();
        t.commit(Lsn(120));
        t.keepalive(Lsn(130));
        assert_eq!(t.confirmed(), Lsn(80), "not while a record is in flight");
        t.ack(a);
        assert_eq!(t.confirmed(), Lsn(120));
        t.keepalive(Lsn(130));
        assert_eq!(t.confirmed(), Lsn(130));
    }

    #[test]
    fn reports_of_an_earlier_session_are_ignored() {
        let mut t = AckTracker::starting_at(Lsn(10), 100);
        t.begin();
        let a = t.record();
        assert_eq!(a, 100);
        t.commit(Lsn(50));
        assert_eq!(t.ack(7), 0, "seq 7 belongs to an earlier session");
        assert_eq!(t.confirmed(), Lsn(10));
        assert_eq!(t.ack(a), 1);
        assert_eq!(t.confirmed(), Lsn(50));
        assert_eq!(t.next_seq(), 101);
    }

    #[test]
    fn never_moves_backwards() {
        let mut t = AckTracker::new(Lsn(500));
        t.begin();
        let a = t.record();
        t.commit(Lsn(100));
        t.ack(a);
        t.keepalive(Lsn(50));
        assert_eq!(t.confirmed(), Lsn(500));
        t.ack(a);
        t.ack(9999);
        assert_eq!(t.confirmed(), Lsn(500));
    }

    #[test]
    fn random_ack_orders_confirm_exactly_the_contiguous_prefix() {
        // Deterministic pseudo-random permutations of acks over many transactions.
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50 {
            let mut t = AckTracker::new(Lsn::ZERO);
            let mut txs = Vec::new(); // (end lsn, seqs)
            for i in 0..40u64 {
                t.begin();
                let seqs: Vec<Seq> = (0..rnd() % 4).map(|_| t.record()).collect();
                let end = Lsn((i + 1) * 100);
                t.commit(end);
                txs.push((end, seqs));
            }
            let mut all: Vec<Seq> = txs.iter().flat_map(|(_, s)| s.clone()).collect();
            for i in (1..all.len()).rev() {
                all.swap(i, (rnd() % (i as u64 + 1)) as usize);
            }
            let mut acked = std::collections::HashSet::new();
            for s in all {
                t.ack(s);
                acked.insert(s);
                let expected = txs
                    .iter()
                    .take_while(|(_, seqs)| seqs.iter().all(|s| acked.contains(s)))
                    .map(|(end, _)| *end)
                    .last()
                    .unwrap_or(Lsn::ZERO);
                assert_eq!(t.confirmed(), expected);
            }
            assert_eq!(t.confirmed(), Lsn(4000));
        }
    }
}
