//! The two sources of events in a transaction, in WAL order: inserted outbox
//! rows and transactional `pg_logical_emit_message` messages with the
//! configured prefix. Both are mapped by `outbox` and go the same way: the
//! replay filter, then the sink, or the `on_invalid` policy when they cannot
//! become a record.

use super::{Session, Stream};
use crate::outbox::{DeadLetter, MappingError, Record};
use crate::pgoutput::{LogicalMessage, Tuple};
use crate::relay::plan::TxClass;
use crate::relay::RelayError;
use crate::sink::Sink;

impl Session<'_> {
    pub(super) async fn on_insert(
        &mut self,
        s: &mut Stream,
        producer: &mut Sink,
        relation_id: u32,
        new: Tuple,
    ) -> Result<(), RelayError> {
        let Some(mapping) = s.mappings.get(&relation_id) else {
            if s.relations.get(relation_id).is_none() {
                return Err(RelayError::UnknownRelation(relation_id));
            }
            return self.ignore("insert_other_table", relation_id, s);
        };
        if s.tx.class == TxClass::Skip {
            self.metrics.events_skipped.inc();
            return Ok(());
        }
        let rel = s
            .relations
            .get(relation_id)
            .ok_or(RelayError::UnknownRelation(relation_id))?;
        let mapped = match mapping {
            Ok(m) => m.record_at(&new, s.tx.commit_lsn, &s.tx.lsn_text, rel),
            Err(e) => Err(e.clone()),
        };
        match mapped {
            Ok(record) => self.produce(s, producer, record).await,
            Err(e) => match s.records.dead_letter_topic() {
                Some(dlq) => {
                    let record = self
                        .outbox
                        .dead_letter(&new, rel, s.tx.commit_lsn, dlq, why(&e));
                    self.produce_dead_letter(s, producer, record)
                }
                None => Err(e.into()),
            },
        }
    }

    /// A logical message: an event when it is transactional and has the
    /// configured prefix (a rolled-back transaction's messages never arrive);
    /// anything else is ignored.
    pub(super) async fn on_logical_message(
        &mut self,
        s: &mut Stream,
        producer: &mut Sink,
        m: LogicalMessage,
    ) -> Result<(), RelayError> {
        if !m.transactional || self.outbox.messages_prefix() != Some(m.prefix.as_str()) {
            return self.ignore("message", 0, s);
        }
        if s.tx.class == TxClass::Skip {
            self.metrics.events_skipped.inc();
            return Ok(());
        }
        match self
            .outbox
            .message_record(&m, s.tx.commit_lsn, &s.tx.lsn_text)
        {
            Ok(record) => self.produce(s, producer, record).await,
            Err(e) => match s.records.dead_letter_topic() {
                Some(dlq) => {
                    let record = self
                        .outbox
                        .message_dead_letter(&m, s.tx.commit_lsn, dlq, why(&e));
                    self.produce_dead_letter(s, producer, record)
                }
                None => Err(e.into()),
            },
        }
    }

    fn produce_dead_letter(
        &self,
        s: &mut Stream,
        producer: &Sink,
        record: Record,
    ) -> Result<(), RelayError> {
        s.records.received(&record.topic);
        let seq = s.tracker.record();
        s.records
            .send_dead_letter(producer, seq, s.tx.commit_time, record)
    }

    /// A mapped record: filtered and marked for a running replay, then enqueued.
    async fn produce(
        &self,
        s: &mut Stream,
        producer: &mut Sink,
        mut record: Record,
    ) -> Result<(), RelayError> {
        if let (TxClass::Replay, Some(p)) = (s.tx.class, s.plan.job.as_mut()) {
            if p.job
                .only_topic
                .as_ref()
                .is_some_and(|t| *t != record.topic)
            {
                return Ok(());
            }
            if let Some(suffix) = &p.job.topic_suffix {
                record.topic.push_str(suffix);
            }
            record
                .headers
                .push(("replayed".into(), s.replay_header.clone()));
            p.events += 1;
            self.metrics.events_replayed.inc();
        }
        s.records.received(&record.topic);
        producer.ensure_topic(&record.topic).await?;
        let seq = s.tracker.record();
        s.records.send(producer, seq, s.tx.commit_time, record)
    }
}

fn why(e: &MappingError) -> DeadLetter<'static> {
    DeadLetter {
        reason: e.kind(),
        error: e.to_string(),
        original_topic: None,
    }
}
