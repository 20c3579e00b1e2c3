//! The record path of a session: handing records to the sink, retrying a full
//! queue, delivery reports into the ack tracker, and the dead-letter policy.

use tokio::sync::mpsc;

use super::{Session, Stream, BATCH};
use crate::ack::Seq;
use crate::config::OnInvalid;
use crate::outbox::{dead_letter_from_record, DeadLetter, Record};
use crate::relay::RelayError;
use crate::sink::{DeliveryError, DeliveryReport, Refusal, SendError, Sink};

/// `events_received_total` and `events_produced_total` of one topic.
pub(super) struct TopicCounters {
    pub(super) received: prometheus::IntCounter,
    pub(super) produced: prometheus::IntCounter,
}

impl Session<'_> {
    /// `first` and whatever else already arrived, up to [`BATCH`].
    pub(super) fn on_reports(
        &self,
        s: &mut Stream,
        producer: &Sink,
        reports: &mut mpsc::UnboundedReceiver<DeliveryReport>,
        first: DeliveryReport,
    ) -> Result<(), RelayError> {
        self.on_report(s, producer, first)?;
        for _ in 1..BATCH {
            match reports.try_recv() {
                Ok(report) => self.on_report(s, producer, report)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    pub(super) fn on_report(
        &self,
        s: &mut Stream,
        producer: &Sink,
        report: DeliveryReport,
    ) -> Result<(), RelayError> {
        if report.seq < self.first_seq {
            // A record of an earlier session: this session sends it again anyway.
            return Ok(());
        }
        match report.result {
            Ok(()) => {
                let confirmed = s.tracker.ack(report.seq);
                self.metrics.transactions_confirmed.inc_by(confirmed as u64);
                s.acked_since_publish = true;
                Ok(())
            }
            // The broker refused the record for good: dead-letter it under the same
            // sequence number, so the position waits for the dead-letter record's ack.
            Err(DeliveryError {
                refused: Some(Refusal { reason, original }),
                error,
                ..
            }) if self.dead_letter() && original.topic != self.dlq() => {
                let why = DeadLetter {
                    reason,
                    error,
                    original_topic: None,
                };
                self.send_dead_letter(
                    s,
                    producer,
                    report.seq,
                    dead_letter_from_record(&original, self.dlq(), why),
                )
            }
            // Refused for good under the stop policy (or the dead-letter record
            // itself refused): stop, naming the event.
            Err(DeliveryError {
                refused: Some(Refusal { original, .. }),
                sink,
                error,
                ..
            }) => {
                s.refused += 1;
                Err(refused(&original, sink, error))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn counters<'s>(&self, s: &'s mut Stream, topic: &str) -> &'s TopicCounters {
        if !s.topic_counters.contains_key(topic) {
            let m = self.metrics;
            let c = TopicCounters {
                received: m.events_received.with_label_values(&[topic]),
                produced: m.events_produced.with_label_values(&[topic]),
            };
            s.topic_counters.insert(topic.to_string(), c);
        }
        &s.topic_counters[topic]
    }

    pub(super) fn dead_letter(&self) -> bool {
        self.cfg.outbox.on_invalid == OnInvalid::DeadLetter
    }

    pub(super) fn dlq(&self) -> &str {
        &self.cfg.outbox.dead_letter_topic
    }

    pub(super) fn send_dead_letter(
        &self,
        s: &mut Stream,
        producer: &Sink,
        seq: Seq,
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
        if s.pending.is_empty() {
            self.enqueue(s, producer, seq, record)
        } else {
            s.pending.push_back((seq, record));
            Ok(())
        }
    }

    pub(super) fn retry_pending(&self, s: &mut Stream, producer: &Sink) -> Result<(), RelayError> {
        while let Some((seq, record)) = s.pending.pop_front() {
            self.enqueue(s, producer, seq, record)?;
            if !s.pending.is_empty() && s.pending.front().map(|p| p.0) == Some(seq) {
                break; // still full: the record went back to the front
            }
        }
        Ok(())
    }

    pub(super) fn enqueue(
        &self,
        s: &mut Stream,
        producer: &Sink,
        seq: Seq,
        record: Record,
    ) -> Result<(), RelayError> {
        match producer.send(seq, s.commit_time, &record) {
            Ok(()) => {
                self.counters(s, &record.topic).produced.inc();
                Ok(())
            }
            Err(SendError::QueueFull) => {
                s.pending.push_front((seq, record));
                Ok(())
            }
            Err(SendError::Refused { reason, error, .. })
                if self.dead_letter() && record.topic != self.dlq() =>
            {
                let why = DeadLetter {
                    reason,
                    error,
                    original_topic: None,
                };
                self.send_dead_letter(
                    s,
                    producer,
                    seq,
                    dead_letter_from_record(&record, self.dlq(), why),
                )
            }
            Err(SendError::Refused { sink, error, .. }) => {
                s.refused += 1;
                Err(refused(&record, sink, error))
            }
            Err(e) => Err(RelayError::Send(e)),
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
