//! A `pg_logical_emit_message` event as an outbox row.
//!
//! The message content is a JSON object whose fields are named like the outbox
//! table's columns (`outbox.columns.*`, `outbox.key`, the topic template's
//! columns). It is turned into a one-row relation so that the row mapping, its
//! errors and the dead-letter policy apply unchanged. Which messages are
//! events (transactional, with the configured prefix) is decided by the session.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::fields::oid;
use super::{DeadLetter, MappingError, OutboxTable, Record};
use crate::lsn::Lsn;
use crate::pgoutput::{Column, LogicalMessage, Relation, Tuple, Value};

/// The `namespace` of the relation a message is read as (its name is the prefix).
pub const MESSAGE_NAMESPACE: &str = "pg_logical_emit_message";

/// The message's JSON fields as a relation (one column per field, in name
/// order) and its row. JSON strings are their text, `null` is NULL, other
/// values are their JSON text exactly as written. The `optional` fields a
/// message omits are NULL.
fn as_row(
    m: &LogicalMessage,
    commit_lsn: Lsn,
    optional: &[&str],
) -> Result<(Relation, Tuple), MappingError> {
    let bad = |problem: String| MappingError::BadMessage {
        prefix: m.prefix.clone(),
        lsn: commit_lsn,
        problem,
    };
    let mut fields: BTreeMap<String, &RawValue> =
        serde_json::from_slice(&m.content).map_err(|e| {
            bad(format!(
                "is not a JSON object ({e}); emit pg_logical_emit_message(true, '{}', json_build_object(...)::text)",
                m.prefix
            ))
        })?;
    let null: &RawValue = serde_json::from_str("null").expect("null is JSON");
    for name in optional {
        fields.entry(name.to_string()).or_insert(null);
    }
    let mut columns = Vec::with_capacity(fields.len());
    let mut values = Vec::with_capacity(fields.len());
    for (name, raw) in fields {
        let text = raw.get();
        let (type_oid, value) = match text.as_bytes()[0] {
            b'"' => {
                let s: String = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
                (oid::UNKNOWN, Value::Text(Bytes::from(s)))
            }
            b'n' => (oid::UNKNOWN, Value::Null),
            b'{' | b'[' => (oid::JSONB, Value::Text(Bytes::from(text.to_string()))),
            b't' | b'f' => (16, Value::Text(Bytes::from(text.to_string()))),
            _ if text.parse::<i64>().is_ok() => {
                (oid::INT8, Value::Text(Bytes::from(text.to_string())))
            }
            _ => (1700, Value::Text(Bytes::from(text.to_string()))),
        };
        columns.push(Column {
            is_key: false,
            name,
            type_oid,
            type_modifier: -1,
        });
        values.push(value);
    }
    let rel = Relation {
        id: 0,
        namespace: MESSAGE_NAMESPACE.into(),
        name: m.prefix.clone(),
        replica_identity: b'n',
        columns,
    };
    Ok((rel, Tuple(values)))
}

impl OutboxTable {
    /// Fields a message may leave out: the headers object, the timestamp,
    /// the trace context and the placed columns.
    fn optional_fields(&self) -> Vec<&str> {
        let o = &self.opts;
        let mut names: Vec<&str> = o
            .additional_placement
            .iter()
            .map(|p| p.column.as_str())
            .collect();
        names.extend(
            o.timestamp_column
                .iter()
                .chain(&o.trace_column)
                .map(|c| c.name.as_str()),
        );
        if !self.columns.headers.is_empty() {
            names.push(&self.columns.headers);
        }
        names
    }

    /// The record of a logical message of the transaction committed at `commit_lsn`.
    pub fn message_record(
        &self,
        m: &LogicalMessage,
        commit_lsn: Lsn,
        lsn_text: &Bytes,
    ) -> Result<Record, MappingError> {
        let (rel, row) = as_row(m, commit_lsn, &self.optional_fields())?;
        let mapping = self.mapping(&rel).map_err(|e| match e {
            MappingError::MissingColumn {
                column,
                available,
                setting,
                ..
            } => MappingError::BadMessage {
                prefix: m.prefix.clone(),
                lsn: commit_lsn,
                problem: format!(
                    "has no field {column:?} (fields: {available}); add it to the message or set {setting}"
                ),
            },
            other => other,
        })?;
        mapping.record_at(&row, commit_lsn, lsn_text, &rel)
    }

    /// The dead-letter record of a message that could not be mapped: like a
    /// row's (key, `id` where the message has them), with the whole message
    /// content as the value.
    pub fn message_dead_letter(
        &self,
        m: &LogicalMessage,
        commit_lsn: Lsn,
        topic: &str,
        why: DeadLetter<'_>,
    ) -> Record {
        let (rel, row) = as_row(m, commit_lsn, &[]).unwrap_or_else(|_| {
            let rel = Relation {
                id: 0,
                namespace: MESSAGE_NAMESPACE.into(),
                name: m.prefix.clone(),
                replica_identity: b'n',
                columns: Vec::new(),
            };
            (rel, Tuple(Vec::new()))
        });
        let mut record = self.dead_letter(&row, &rel, commit_lsn, topic, why);
        record.value = Some(m.content.clone());
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> OutboxTable {
        crate::outbox::tests::table(&format!("[outbox]\nmessages_prefix = \"outbox\"\n{extra}"))
    }

    fn message(content: &str) -> LogicalMessage {
        LogicalMessage {
            transactional: true,
            lsn: Lsn(0x10),
            prefix: "outbox".into(),
            content: Bytes::from(content.to_string()),
        }
    }

    #[test]
    fn a_message_maps_like_a_row() {
        let m = message(
            r#"{"id": "e-1", "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "OrderPlaced",
                "payload": {"total": 3, "items": [1, 2]}, "headers": {"traceparent": "00-ab-cd-01"}}"#,
        );
        let r = table("")
            .message_record(&m, Lsn(0x20), &Bytes::from_static(b"0/20"))
            .unwrap();
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(&r.key[..], b"o-1");
        assert_eq!(
            r.value.as_deref(),
            Some(&br#"{"total": 3, "items": [1, 2]}"#[..])
        );
        let h: Vec<_> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_ref(), std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            h,
            [
                ("traceparent", "00-ab-cd-01"),
                ("id", "e-1"),
                ("event_type", "OrderPlaced"),
                ("lsn", "0/20")
            ]
        );
        // A payload given as a JSON string is sent as that string's text.
        let m = message(
            r#"{"id": "e-2", "aggregate_type": "order", "aggregate_id": "o-1", "event_type": "E", "payload": "plain"}"#,
        );
        let r = table("")
            .message_record(&m, Lsn(0x20), &Bytes::new())
            .unwrap();
        assert_eq!(r.value.as_deref(), Some(&b"plain"[..]));
    }

    #[test]
    fn bad_messages_are_invalid_rows_with_one_line_errors() {
        let t = table("");
        let err = t
            .message_record(&message("not json"), Lsn(0x20), &Bytes::new())
            .unwrap_err();
        assert_eq!(err.kind(), "bad_message");
        assert!(
            err.to_string().starts_with(
                "logical message at LSN 0/20 with prefix \"outbox\" is not a JSON object"
            ),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));
        let err = t
            .message_record(
                &message(r#"{"id": "e", "aggregate_type": "x"}"#),
                Lsn(0x20),
                &Bytes::new(),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("has no field \"aggregate_id\" (fields: aggregate_type, headers, id); add it to the message or set outbox.columns.aggregate_id"),
            "{err}"
        );
        let err = t
            .message_record(
                &message(r#"{"id": "e", "aggregate_type": null, "aggregate_id": "a", "event_type": "E", "payload": {}}"#),
                Lsn(0x20),
                &Bytes::new(),
            )
            .unwrap_err();
        assert_eq!(err.kind(), "null_column");

        let why = DeadLetter {
            reason: "bad_message",
            error: "x".into(),
            original_topic: None,
        };
        let dl = t.message_dead_letter(&message("not json"), Lsn(0x20), "dlq", why);
        assert_eq!(dl.value.as_deref(), Some(&b"not json"[..]));
        assert_eq!(
            dl.header("table").map(|v| &v[..]),
            Some(&b"pg_logical_emit_message.outbox"[..])
        );
    }
}
