//! Which sent rows may be removed from the table: a pure state machine, the
//! polling mode's counterpart of `ack`.
//!
//! Rows are registered in the order they are handed to the sink; a row
//! becomes removable once it and every row sent before it were acknowledged
//! (so a failed record leaves every later row in the table too, and the next
//! session sends them again in the same order, as the WAL mode does). Rows
//! stay "outstanding" until their removal committed: the next poll skips them.
//! It does no I/O.

use std::collections::{HashSet, VecDeque};

use crate::ack::Seq;

#[derive(Debug, Default)]
pub struct RowTracker {
    /// Sequence number of the front of `sent`.
    base: Seq,
    /// Order values and acknowledgement flags of rows `base..`, in send order;
    /// the front is never acknowledged.
    sent: VecDeque<(i64, bool)>,
    /// Rows sent and not yet removed (acknowledged or not).
    outstanding: HashSet<i64>,
    /// Acknowledged prefix, waiting for its DELETE (or UPDATE).
    removable: Vec<i64>,
    /// Rows in `sent` not acknowledged.
    unacked: usize,
}

impl RowTracker {
    /// Numbers records from `first_seq`: reports of lower numbers belong to an earlier session.
    pub fn starting_at(first_seq: Seq) -> RowTracker {
        RowTracker {
            base: first_seq,
            ..RowTracker::default()
        }
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> Seq {
        self.base + self.sent.len() as Seq
    }

    /// Registers the row with order value `value`, handed to the sink next.
    pub fn send(&mut self, value: i64) -> Seq {
        let seq = self.next_seq();
        self.sent.push_back((value, false));
        self.outstanding.insert(value);
        self.unacked += 1;
        seq
    }

    /// The sink acknowledged record `seq`. Returns how many rows became removable.
    pub fn ack(&mut self, seq: Seq) -> usize {
        let Some(offset) = seq.checked_sub(self.base) else {
            return 0;
        };
        match self.sent.get_mut(offset as usize) {
            Some((_, flag)) if !*flag => {
                *flag = true;
                self.unacked -= 1;
            }
            _ => return 0,
        }
        let before = self.removable.len();
        while let Some((value, true)) = self.sent.front().copied() {
            self.sent.pop_front();
            self.base += 1;
            self.removable.push(value);
        }
        self.removable.len() - before
    }

    /// Whether a poll must skip this row: sent, and not removed yet.
    pub fn is_outstanding(&self, value: i64) -> bool {
        self.outstanding.contains(&value)
    }

    /// Rows sent and not removed yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Records handed to the sink and not acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked
    }

    pub fn has_removable(&self) -> bool {
        !self.removable.is_empty()
    }

    /// The rows to remove now; call [`RowTracker::removed`] once that committed.
    pub fn take_removable(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.removable)
    }

    /// The removal of `values` committed: later polls no longer see them.
    pub fn removed(&mut self, values: &[i64]) {
        for v in values {
            self.outstanding.remove(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_an_acknowledged_prefix_is_removable() {
        let mut t = RowTracker::starting_at(10);
        let a = t.send(7);
        let b = t.send(3);
        let c = t.send(9);
        assert_eq!((a, b, c), (10, 11, 12));
        assert_eq!(t.ack(b), 0, "the first row is still in flight");
        assert_eq!(t.ack(5), 0, "an earlier session's report");
        assert_eq!(t.ack(a), 2);
        assert_eq!(t.ack(a), 0, "a second report changes nothing");
        assert_eq!(t.take_removable(), vec![7, 3]);
        assert!(
            t.is_outstanding(7),
            "outstanding until the removal committed"
        );
        t.removed(&[7, 3]);
        assert!(!t.is_outstanding(7) && t.is_outstanding(9));
        assert_eq!((t.in_flight(), t.outstanding()), (1, 1));
        assert_eq!(t.ack(c), 1);
        assert_eq!(t.next_seq(), 13);
    }

    proptest! {
        /// Against a model: removable rows are exactly the longest fully
        /// acknowledged prefix of the send order, each handed out once.
        #[test]
        fn removes_the_acknowledged_prefix_in_send_order(
            n in 1usize..60,
            acks in proptest::collection::vec(0usize..80, 0..120),
        ) {
            let mut t = RowTracker::starting_at(100);
            let values: Vec<i64> = (0..n as i64).map(|i| i * 7 % 61).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            for v in &values {
                t.send(*v);
            }
            let mut acked = vec![false; values.len()];
            let mut handed = Vec::new();
            for a in acks {
                if a < values.len() {
                    acked[a] = true;
                }
                t.ack(100 + a as u64);
                handed.extend(t.take_removable());
                let prefix = acked.iter().take_while(|x| **x).count();
                prop_assert_eq!(&handed[..], &values[..prefix]);
                prop_assert_eq!(t.in_flight(), acked.iter().filter(|x| !**x).count());
            }
        }
    }
}
