//! The record path, whatever feeds it: records handed to the sink in order, a
//! full queue retried with the same record first, delivery reports turned
//! into acknowledged sequence numbers, and the dead-letter policy
//! (`outbox.on_invalid`) for records the sink refuses for good. A session of
//! the WAL stream owns one; so does any other source of records.
//!
//! It never decides positions: the caller's ack tracker does, from the
//! sequence numbers [`Records::on_report`] returns.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::RelayError;
use crate::ack::Seq;
use crate::config::{OnInvalid, OutboxConfig};
use crate::metrics::Metrics;
use crate::outbox::{dead_letter_from_record, DeadLetter, Record};
use crate::pgoutput::Timestamp;
use crate::sink::{DeliveryError, DeliveryReport, Refusal, SendError, Sink};

/// Most delivery reports handled per wake-up before the loop looks at its
/// other inputs again.
pub(super) const REPORT_BATCH: usize = 256;

/// `events_received_total` and `events_produced_total` of one topic.
struct TopicCounters {
    received: prometheus::IntCounter,
    produced: prometheus::IntCounter,
}

/// A record the sink's full queue did not take yet.
struct Pending {
    seq: Seq,
    commit_time: Timestamp,
    record: Record,
}

pub struct Records {
    metrics: Arc<Metrics>,
    /// `Some(topic)` when refused records go to the dead-letter topic.
    dead_letter_topic: Option<String>,
    /// Reports of sequence numbers below this belong to an earlier session
    /// (that one's records are sent again anyway) and are ignored.
    first_seq: Seq,
    /// Per-topic counters, looked up once per topic instead of once per record.
    topics: HashMap<String, TopicCounters>,
    /// Records the sink's full queue did not take yet, in order; the caller
    /// stops reading until they are all taken.
    pending: VecDeque<Pending>,
    /// Records refused for good: never acknowledged, so draining does not wait for them.
    refused: usize,
}

impl Records {
    pub fn new(outbox: &OutboxConfig, metrics: Arc<Metrics>, first_seq: Seq) -> Records {
        Records {
            metrics,
            dead_letter_topic: (outbox.on_invalid == OnInvalid::DeadLetter)
                .then(|| outbox.dead_letter_topic.clone()),
            first_seq,
            topics: HashMap::new(),
            pending: VecDeque::new(),
            refused: 0,
        }
    }

    /// The dead-letter topic, when `outbox.on_invalid = "dead_letter"`.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter_topic.as_deref()
    }

    /// Records waiting for room in the sink's queue: read nothing new meanwhile.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Records taken by this path that will never be acknowledged (refused
    /// for good, or still waiting for the queue): what draining need not wait for.
    pub fn unacknowledgeable(&self) -> usize {
        self.refused + self.pending.len()
    }

    /// Counts a record as received (it will be sent, or dead-lettered).
    pub fn received(&mut self, topic: &str) {
        self.counters(topic).received.inc();
    }

    fn counters(&mut self, topic: &str) -> &TopicCounters {
        if !self.topics.contains_key(topic) {
            let m = &self.metrics;
            let c = TopicCounters {
                received: m.events_received.with_label_values(&[topic]),
                produced: m.events_produced.with_label_values(&[topic]),
            };
            self.topics.insert(topic.to_string(), c);
        }
        &self.topics[topic]
    }

    /// Hands `record` to the sink, or keeps it for [`Records::retry_pending`]
    /// when the queue is full; a record refused at once follows the dead-letter policy.
    pub fn send(
        &mut self,
        sink: &Sink,
        seq: Seq,
        commit_time: Timestamp,
        record: Record,
    ) -> Result<(), RelayError> {
        match sink.send(seq, commit_time, &record) {
            Ok(()) => {
                self.counters(&record.topic).produced.inc();
                Ok(())
            }
            Err(SendError::QueueFull) => {
                self.pending.push_front(Pending {
                    seq,
                    commit_time,
                    record,
                });
                Ok(())
            }
            Err(SendError::Refused {
                sink: name,
                reason,
                error,
                ..
            }) => self.refuse(sink, seq, commit_time, record, name, reason, error),
            Err(e) => Err(RelayError::Send(e)),
        }
    }

    /// A record that could not be mapped (or was refused) goes to the
    /// dead-letter topic under the same sequence number, so the position
    /// waits for the dead-letter record's acknowledgement.
    pub fn send_dead_letter(
        &mut self,
        sink: &Sink,
        seq: Seq,
        commit_time: Timestamp,
        record: Record,
    ) -> Result<(), RelayError> {
        let text = |k: &str| {
            record
                .header(k)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let reason = text("reason").unwrap_or_else(|| "unknown".into());
        self.metrics
            .events_dead_lettered
            .with_label_values(&[&reason])
            .inc();
        let id = text("id");
        tracing::warn!(reason, id = ?id, topic = %record.topic, "sending row to the dead-letter topic");
        if self.pending.is_empty() {
            self.send(sink, seq, commit_time, record)
        } else {
            self.pending.push_back(Pending {
                seq,
                commit_time,
                record,
            });
            Ok(())
        }
    }

    /// Offers the waiting records again, in order, until the queue is full again.
    pub fn retry_pending(&mut self, sink: &Sink) -> Result<(), RelayError> {
        while let Some(p) = self.pending.pop_front() {
            let seq = p.seq;
            self.send(sink, seq, p.commit_time, p.record)?;
            if self.pending.front().map(|p| p.seq) == Some(seq) {
                break; // still full: the record went back to the front
            }
        }
        Ok(())
    }

    /// `first` and whatever else already arrived, up to [`REPORT_BATCH`]:
    /// `acked` is called with each acknowledged sequence number.
    pub fn on_reports(
        &mut self,
        sink: &Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        first: DeliveryReport,
        mut acked: impl FnMut(Seq),
    ) -> Result<(), RelayError> {
        if let Some(seq) = self.on_report(sink, first)? {
            acked(seq);
        }
        for _ in 1..REPORT_BATCH {
            match reports.try_recv() {
                Ok(report) => {
                    if let Some(seq) = self.on_report(sink, report)? {
                        acked(seq);
                    }
                }
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// The sequence number the sink acknowledged, if the report says so (and
    /// it belongs to this path); a record refused for good follows the
    /// dead-letter policy; any other failure is the error the caller ends with.
    pub fn on_report(
        &mut self,
        sink: &Sink,
        report: DeliveryReport,
    ) -> Result<Option<Seq>, RelayError> {
        if report.seq < self.first_seq {
            return Ok(None);
        }
        match report.result {
            Ok(()) => Ok(Some(report.seq)),
            Err(DeliveryError {
                refused: Some(Refusal { reason, original }),
                sink: name,
                error,
                ..
            }) => {
                // The report does not carry the transaction's commit time: the
                // dead-letter record's latency counts from now.
                let commit_time = Timestamp(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as i64),
                );
                self.refuse(
                    sink,
                    report.seq,
                    commit_time,
                    *original,
                    name,
                    reason,
                    error,
                )
                .map(|()| None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A record the sink refused for good: to the dead-letter topic (unless it
    /// was the dead-letter record itself), or the error that stops the relay.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &mut self,
        sink: &Sink,
        seq: Seq,
        commit_time: Timestamp,
        record: Record,
        name: &'static str,
        reason: &'static str,
        error: String,
    ) -> Result<(), RelayError> {
        match &self.dead_letter_topic {
            Some(dlq) if record.topic != *dlq => {
                let why = DeadLetter {
                    reason,
                    error,
                    original_topic: None,
                };
                let dead = dead_letter_from_record(&record, dlq, why);
                self.send_dead_letter(sink, seq, commit_time, dead)
            }
            _ => {
                self.refused += 1;
                Err(refused(&record, name, error))
            }
        }
    }
}

/// The fatal error for a record the sink refused for good, naming its event.
fn refused(record: &Record, sink: &'static str, error: String) -> RelayError {
    let header = |k: &str| {
        record
            .header(k)
            .map_or_else(|| "?".into(), |v| String::from_utf8_lossy(v).into_owned())
    };
    RelayError::Refused {
        sink,
        topic: record.topic.clone(),
        id: header("id"),
        lsn: header("lsn"),
        error,
    }
}
