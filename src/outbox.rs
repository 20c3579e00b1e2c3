//! Turns a decoded outbox row into a Kafka record.
//!
//! Knows the outbox table's columns, the topic template and the header rules.
//! It does not talk to Kafka or PostgreSQL: a [`Mapping`] is built from a
//! `Relation` message and applied to each inserted tuple.

use bytes::Bytes;

use crate::config::{Config, TableName, TemplatePart};
use crate::lsn::Lsn;
use crate::pgoutput::{Relation, Tuple, Value};

/// PostgreSQL type OID of `bytea`.
const BYTEA_OID: u32 = 17;

/// One Kafka record derived from one outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: Bytes,
    pub value: Bytes,
    /// In order; relay headers (`id`, `event_type`, `lsn`) come last so that a
    /// consumer's "last header named X" is always the relay's.
    pub headers: Vec<(HeaderName, Bytes)>,
}

/// A header name: the relay's own are static, users' (from the headers column) owned.
pub type HeaderName = std::borrow::Cow<'static, str>;

impl Record {
    /// The last header named `name` (the one a consumer's "last header" sees).
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// Why a row cannot become a record.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MappingError {
    #[error("column {column:?} not found in table \"{table}\" (columns: {available}); set {setting} in the config")]
    MissingColumn {
        table: String,
        column: String,
        available: String,
        setting: String,
    },
    #[error("row of \"{table}\" at LSN {lsn} (id {id}) has NULL in column {column:?}, which routes the event; make the column NOT NULL")]
    NullColumn {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
    },
    #[error("row of \"{table}\" at LSN {lsn} (id {id}) has an unchanged-TOAST value in column {column:?}, which an insert never has")]
    UnexpectedToast {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
    },
    #[error("row of \"{table}\" at LSN {lsn} (id {id}) has {got} columns but the relation has {expected}")]
    ColumnCount {
        table: String,
        lsn: Lsn,
        id: String,
        got: usize,
        expected: usize,
    },
    #[error(
        "row of \"{table}\" at LSN {lsn} (id {id}): column {column:?} is not valid bytea hex text"
    )]
    BadBytea {
        table: String,
        column: String,
        lsn: Lsn,
        id: String,
    },
    #[error("row of \"{table}\" at LSN {lsn} (id {id}) routes to topic {topic:?}, which is not a valid Kafka topic name (1-249 of a-z A-Z 0-9 . _ -); fix the row or outbox.topic")]
    BadTopic {
        table: String,
        topic: String,
        lsn: Lsn,
        id: String,
    },
}

impl MappingError {
    /// Short machine-readable reason (metric label and dead-letter header).
    pub fn kind(&self) -> &'static str {
        match self {
            MappingError::MissingColumn { .. } => "missing_column",
            MappingError::NullColumn { .. } => "null_column",
            MappingError::UnexpectedToast { .. } => "unexpected_toast",
            MappingError::ColumnCount { .. } => "column_count",
            MappingError::BadBytea { .. } => "bad_bytea",
            MappingError::BadTopic { .. } => "bad_topic",
        }
    }
}

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
        Bytes::from(original.value.len().to_string()),
    ));
    push_reason(&mut headers, &why, Some(&original.topic));
    Record {
        topic: topic.to_string(),
        key: original.key.clone(),
        value: Bytes::new(),
        headers,
    }
}

fn push_reason(headers: &mut Vec<(HeaderName, Bytes)>, why: &DeadLetter<'_>, topic: Option<&str>) {
    headers.push(("error".into(), Bytes::from(why.error.clone())));
    headers.push(("reason".into(), Bytes::from_static(why.reason.as_bytes())));
    if let Some(t) = why.original_topic.or(topic) {
        headers.push(("original_topic".into(), Bytes::from(t.to_string())));
    }
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Column(usize),
}

/// Column positions of the outbox table, resolved from a `Relation` message.
#[derive(Debug, Clone)]
pub struct Mapping {
    table: String,
    id: usize,
    event_type: usize,
    key: usize,
    payload: usize,
    payload_is_bytea: bool,
    headers: Option<usize>,
    topic: Vec<Part>,
    columns: usize,
}

/// The configured outbox table: decides whether a relation is it and maps its rows.
#[derive(Debug, Clone)]
pub struct OutboxTable {
    pub table: TableName,
    template: Vec<TemplatePart>,
    key: String,
    columns: crate::config::Columns,
}

impl OutboxTable {
    pub fn from_config(cfg: &Config) -> Self {
        OutboxTable {
            table: cfg.table().expect("validated"),
            template: cfg.topic_template(),
            key: cfg.outbox.key.clone(),
            columns: cfg.outbox.columns.clone(),
        }
    }

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
            value: value_of(&self.columns.payload).unwrap_or_default(),
            headers,
        }
    }

    pub fn matches(&self, rel: &Relation) -> bool {
        rel.namespace == self.table.schema && rel.name == self.table.name
    }

    /// Resolves the configured columns against the relation's current columns.
    pub fn mapping(&self, rel: &Relation) -> Result<Mapping, MappingError> {
        let table = rel.qualified_name();
        let find = |column: &str, setting: &str| {
            rel.column_index(column)
                .ok_or_else(|| MappingError::MissingColumn {
                    table: table.clone(),
                    column: column.to_string(),
                    available: rel
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    setting: setting.to_string(),
                })
        };
        let c = &self.columns;
        find(&c.aggregate_type, "outbox.columns.aggregate_type")?;
        find(&c.aggregate_id, "outbox.columns.aggregate_id")?;
        let mut topic = Vec::with_capacity(self.template.len());
        for part in &self.template {
            topic.push(match part {
                TemplatePart::Literal(s) => Part::Literal(s.clone()),
                TemplatePart::Column(col) => Part::Column(find(col, "outbox.topic")?),
            });
        }
        let payload = find(&c.payload, "outbox.columns.payload")?;
        Ok(Mapping {
            id: find(&c.id, "outbox.columns.id")?,
            event_type: find(&c.event_type, "outbox.columns.event_type")?,
            key: find(&self.key, "outbox.key")?,
            payload,
            payload_is_bytea: rel.columns[payload].type_oid == BYTEA_OID,
            headers: if c.headers.is_empty() {
                None
            } else {
                Some(find(&c.headers, "outbox.columns.headers")?)
            },
            topic,
            columns: rel.columns.len(),
            table,
        })
    }
}

impl Mapping {
    /// Builds the record for one inserted row of the transaction committed at `commit_lsn`.
    pub fn record(
        &self,
        row: &Tuple,
        commit_lsn: Lsn,
        rel: &Relation,
    ) -> Result<Record, MappingError> {
        self.record_at(row, commit_lsn, &lsn_header(commit_lsn), rel)
    }

    /// [`Mapping::record`] with the `lsn` header value made once per transaction.
    pub fn record_at(
        &self,
        row: &Tuple,
        commit_lsn: Lsn,
        lsn_text: &Bytes,
        rel: &Relation,
    ) -> Result<Record, MappingError> {
        let id_text = || match row.0.get(self.id) {
            Some(Value::Text(b)) | Some(Value::Binary(b)) => {
                String::from_utf8_lossy(b).into_owned()
            }
            _ => "NULL".to_string(),
        };
        if row.0.len() != self.columns {
            return Err(MappingError::ColumnCount {
                table: self.table.clone(),
                lsn: commit_lsn,
                id: id_text(),
                got: row.0.len(),
                expected: self.columns,
            });
        }
        let get = |i: usize| -> Result<Option<&Bytes>, MappingError> {
            match &row.0[i] {
                Value::Text(b) | Value::Binary(b) => Ok(Some(b)),
                Value::Null => Ok(None),
                Value::UnchangedToast => Err(MappingError::UnexpectedToast {
                    table: self.table.clone(),
                    column: rel.columns[i].name.clone(),
                    lsn: commit_lsn,
                    id: id_text(),
                }),
            }
        };
        let required = |i: usize| -> Result<&Bytes, MappingError> {
            get(i)?.ok_or_else(|| MappingError::NullColumn {
                table: self.table.clone(),
                column: rel.columns[i].name.clone(),
                lsn: commit_lsn,
                id: id_text(),
            })
        };

        let mut topic = String::new();
        for part in &self.topic {
            match part {
                Part::Literal(s) => topic.push_str(s),
                Part::Column(i) => topic.push_str(&String::from_utf8_lossy(required(*i)?)),
            }
        }
        if !valid_topic(&topic) {
            return Err(MappingError::BadTopic {
                table: self.table.clone(),
                topic,
                lsn: commit_lsn,
                id: id_text(),
            });
        }
        let key = required(self.key)?.clone();
        let id = required(self.id)?.clone();
        let event_type = required(self.event_type)?.clone();
        let raw_payload = required(self.payload)?;
        let value = if self.payload_is_bytea {
            decode_bytea_hex(raw_payload).ok_or_else(|| MappingError::BadBytea {
                table: self.table.clone(),
                column: rel.columns[self.payload].name.clone(),
                lsn: commit_lsn,
                id: id_text(),
            })?
        } else {
            raw_payload.clone()
        };

        let mut headers = Vec::with_capacity(3);
        if let Some(h) = self.headers {
            if let Some(text) = get(h)? {
                append_json_headers(text, &mut headers);
            }
        }
        headers.push(("id".into(), id));
        headers.push(("event_type".into(), event_type));
        headers.push(("lsn".into(), lsn_text.clone()));
        Ok(Record {
            topic,
            key,
            value,
            headers,
        })
    }
}

/// The `lsn` header value of a transaction committed at `commit_lsn`.
pub fn lsn_header(commit_lsn: Lsn) -> Bytes {
    Bytes::from(commit_lsn.to_string())
}

/// Top-level keys of a JSON object as headers: strings as-is, other values as JSON text.
/// Anything but an object (or invalid JSON) becomes a single `headers` header with the raw text.
fn append_json_headers(text: &Bytes, out: &mut Vec<(HeaderName, Bytes)>) {
    match serde_json::from_slice::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => {
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::String(s) => Bytes::from(s),
                    other => Bytes::from(other.to_string()),
                };
                out.push((k.into(), v));
            }
        }
        Ok(serde_json::Value::Null) => {}
        _ => out.push(("headers".into(), text.clone())),
    }
}

/// Decodes PostgreSQL's text form of bytea (`\x0a0b...`).
fn decode_bytea_hex(text: &[u8]) -> Option<Bytes> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        out.push(nib(pair[0])? << 4 | nib(pair[1])?);
    }
    Some(Bytes::from(out))
}

/// Kafka's topic name rule: 1 to 249 characters of `[a-zA-Z0-9._-]`, not "." or "..".
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::Column;
    use std::path::Path;

    fn relation(cols: &[(&str, u32)]) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: cols
                .iter()
                .map(|(n, oid)| Column {
                    is_key: *n == "id",
                    name: n.to_string(),
                    type_oid: *oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn default_relation() -> Relation {
        relation(&[
            ("id", 2950),
            ("aggregate_type", 25),
            ("aggregate_id", 25),
            ("event_type", 25),
            ("payload", 3802),
            ("headers", 3802),
            ("created_at", 1184),
        ])
    }

    fn table(extra: &str) -> OutboxTable {
        let cfg = Config::from_toml(
            &format!("[postgres]\nurl = \"postgresql://a@b/c\"\n{extra}"),
            Path::new("t"),
            |_| None,
        )
        .unwrap();
        OutboxTable::from_config(&cfg)
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::from(s.to_string()))
    }

    fn row(headers: Value) -> Tuple {
        Tuple(vec![
            t("6f1e0f8e-0000-4000-8000-000000000001"),
            t("order"),
            t("order-7"),
            t("OrderPlaced"),
            t(r#"{"total": 3}"#),
            headers,
            t("2026-11-25 10:00:00+00"),
        ])
    }

    #[test]
    fn maps_a_row_to_topic_key_value_and_headers() {
        let rel = default_relation();
        let m = table("").mapping(&rel).unwrap();
        let r = m
            .record(
                &row(t(r#"{"trace": "t-1", "attempt": 2, "tags": ["a"]}"#)),
                Lsn(0x1_0000_00A0),
                &rel,
            )
            .unwrap();
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(&r.key[..], b"order-7");
        assert_eq!(&r.value[..], br#"{"total": 3}"#);
        let h: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_ref(), std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(
            h,
            [
                ("attempt", "2"),
                ("tags", "[\"a\"]"),
                ("trace", "t-1"),
                ("id", "6f1e0f8e-0000-4000-8000-000000000001"),
                ("event_type", "OrderPlaced"),
                ("lsn", "1/A0"),
            ]
        );
    }

    #[test]
    fn null_headers_column_adds_only_relay_headers() {
        let rel = default_relation();
        let r = table("")
            .mapping(&rel)
            .unwrap()
            .record(&row(Value::Null), Lsn(1), &rel)
            .unwrap();
        assert_eq!(r.headers.len(), 3);
    }

    #[test]
    fn configured_columns_template_and_key() {
        let rel = relation(&[
            ("event_id", 2950),
            ("kind", 25),
            ("tenant", 25),
            ("entity", 25),
            ("body", 17),
        ]);
        let tbl = table(
            "[outbox]\ntopic = \"{tenant}.{kind}.events\"\nkey = \"entity\"\n[outbox.columns]\nid = \"event_id\"\naggregate_type = \"kind\"\naggregate_id = \"entity\"\nevent_type = \"kind\"\npayload = \"body\"\nheaders = \"\"\n",
        );
        let m = tbl.mapping(&rel).unwrap();
        let r = m
            .record(
                &Tuple(vec![
                    t("e1"),
                    t("invoice"),
                    t("acme"),
                    t("inv-1"),
                    t("\\x00ff10"),
                ]),
                Lsn(2),
                &rel,
            )
            .unwrap();
        assert_eq!(r.topic, "acme.invoice.events");
        assert_eq!(&r.key[..], b"inv-1");
        assert_eq!(
            &r.value[..],
            &[0x00, 0xff, 0x10],
            "bytea payload is sent as raw bytes"
        );
    }

    #[test]
    fn missing_column_names_the_setting() {
        let rel = relation(&[("id", 2950), ("type", 25), ("payload", 3802)]);
        let err = table("").mapping(&rel).unwrap_err().to_string();
        assert_eq!(
            err,
            "column \"aggregate_type\" not found in table \"public.outbox\" (columns: id, type, payload); set outbox.columns.aggregate_type in the config"
        );
    }

    #[test]
    fn null_routing_column_is_an_error_naming_row_and_lsn() {
        let rel = default_relation();
        let m = table("").mapping(&rel).unwrap();
        let mut r = row(Value::Null);
        r.0[2] = Value::Null;
        let err = m
            .record(&r, "0/16B3748".parse().unwrap(), &rel)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"aggregate_id\""), "{err}");
        assert!(err.contains("0/16B3748"), "{err}");
        assert!(
            err.contains("6f1e0f8e-0000-4000-8000-000000000001"),
            "{err}"
        );
    }

    #[test]
    fn invalid_topic_is_an_error() {
        let rel = default_relation();
        let m = table("").mapping(&rel).unwrap();
        let mut r = row(Value::Null);
        r.0[1] = t("order items/ü");
        assert!(matches!(
            m.record(&r, Lsn(1), &rel),
            Err(MappingError::BadTopic { .. })
        ));
    }

    #[test]
    fn dead_letter_records_say_why_and_keep_what_is_known() {
        let rel = default_relation();
        let tbl = table("");
        let mut r = row(Value::Null);
        r.0[1] = Value::Null;
        let err = tbl
            .mapping(&rel)
            .unwrap()
            .record(&r, Lsn(0x10), &rel)
            .unwrap_err();
        let why = DeadLetter {
            reason: err.kind(),
            error: err.to_string(),
            original_topic: None,
        };
        let dl = tbl.dead_letter(&r, &rel, Lsn(0x10), "dlq", why);
        assert_eq!(dl.topic, "dlq");
        assert_eq!(&dl.key[..], b"order-7");
        assert_eq!(&dl.value[..], br#"{"total": 3}"#);
        let h: std::collections::HashMap<_, _> = dl
            .headers
            .iter()
            .map(|(k, v)| (k.as_ref(), std::str::from_utf8(v).unwrap()))
            .collect();
        assert_eq!(h["reason"], "null_column");
        assert_eq!(h["lsn"], "0/10");
        assert_eq!(h["table"], "public.outbox");
        assert_eq!(h["id"], "6f1e0f8e-0000-4000-8000-000000000001");
        assert!(h["error"].contains("NULL in column \"aggregate_type\""));

        let ok = tbl
            .mapping(&rel)
            .unwrap()
            .record(&row(Value::Null), Lsn(1), &rel)
            .unwrap();
        let why = DeadLetter {
            reason: "too_large",
            error: "too big".into(),
            original_topic: None,
        };
        let dl = dead_letter_from_record(&ok, "dlq", why);
        assert!(dl.value.is_empty());
        assert!(dl
            .headers
            .contains(&("original_topic".into(), Bytes::from("outbox.event.order"))));
        assert!(dl
            .headers
            .contains(&("original_size".into(), Bytes::from("12"))));
    }

    #[test]
    fn topic_names() {
        assert!(valid_topic("outbox.event.order_v2-x"));
        assert!(!valid_topic(""));
        assert!(!valid_topic(".."));
        assert!(!valid_topic("a b"));
        assert!(!valid_topic(&"a".repeat(250)));
    }
}
