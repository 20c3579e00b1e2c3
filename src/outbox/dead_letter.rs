//! Dead-letter records: what `on_invalid = "dead_letter"` sends instead of a
//! row that could not be mapped, or of a record the broker refused for good.

use bytes::Bytes;

use super::{HeaderName, OutboxTable, Record};
use crate::lsn::Lsn;
use crate::pgoutput::{Relation, Tuple, Value};

/// Why a row goes to the dead-letter topic, for its headers.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// `null_column`, `bad_topic`, `too_large`, `rejected`, ...
    pub reason: &'static str,
    /// The full error message.
    pub error: String,
    /// The topic the row was meant for, when known.
    pub original_topic: Option<&'a str>,
}

/// The dead-letter record for `original`: same key and relay headers, no value
/// (the value may be what the broker refused), plus `error`, `reason`,
/// `original_topic` and `original_size` headers.
pub fn dead_letter_from_record(original: &Record, topic: &str, why: DeadLetter<'_>) -> Record {
    let mut headers = original.headers.clone();
    headers.push((
        "original_size".into(),
        Bytes::from(original.value.as_ref().map_or(0, Bytes::len).to_string()),
    ));
    push_reason(&mut headers, &why, Some(&original.topic));
    Record {
        topic: topic.to_string(),
        key: original.key.clone(),
        value: Some(Bytes::new()),
        headers,
        ..Record::default()
    }
}

fn push_reason(headers: &mut Vec<(HeaderName, Bytes)>, why: &DeadLetter<'_>, topic: Option<&str>) {
    headers.push(("error".into(), Bytes::from(why.error.clone())));
    headers.push(("reason".into(), Bytes::from_static(why.reason.as_bytes())));
    if let Some(t) = why.original_topic.or(topic) {
        headers.push(("original_topic".into(), Bytes::from(t.to_string())));
    }
}

impl OutboxTable {
    /// The dead-letter record of a row that could not be mapped: key and value
    /// from the configured columns where they exist and are not NULL, headers
    /// `id`, `lsn`, `table`, `error`, `reason`.
    pub fn dead_letter(
        &self,
        row: &Tuple,
        rel: &Relation,
        commit_lsn: Lsn,
        topic: &str,
        why: DeadLetter<'_>,
    ) -> Record {
        let value_of = |col: &str| -> Option<Bytes> {
            match row.0.get(rel.column_index(col)?)? {
                Value::Text(b) | Value::Binary(b) => Some(b.clone()),
                _ => None,
            }
        };
        let mut headers = Vec::with_capacity(6);
        if let Some(id) = value_of(&self.columns.id) {
            headers.push(("id".into(), id));
        }
        headers.push(("lsn".into(), Bytes::from(commit_lsn.to_string())));
        headers.push(("table".into(), Bytes::from(rel.qualified_name())));
        push_reason(&mut headers, &why, None);
        Record {
            topic: topic.to_string(),
            key: value_of(&self.key).unwrap_or_default(),
            value: Some(value_of(&self.columns.payload).unwrap_or_default()),
            headers,
            ..Record::default()
        }
    }
}
