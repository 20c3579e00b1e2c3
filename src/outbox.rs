//! Turns a decoded outbox row (or logical message) into a Kafka record.
//!
//! Knows the outbox table's columns, the topic template and the header rules.
//! It does not talk to Kafka or PostgreSQL: a [`Mapping`] is built from a
//! `Relation` message and applied to each inserted tuple.
//!
//! Submodules: `fields` (key and value encodings, timestamps, partitions, trace
//! context), `message` (a `pg_logical_emit_message` event as a row).

use bytes::Bytes;

use crate::config::{
    valid_topic, Config, Format, OptionalColumn, PlacementKind, RelayHeader, TableName,
    TemplatePart,
};
use crate::lsn::Lsn;
use crate::pgoutput::{Relation, Tuple, Value};

mod dead_letter;
mod error;
mod fields;
pub mod message;

pub use dead_letter::{dead_letter_from_record, DeadLetter};
pub use error::MappingError;

use fields::{oid, TimeKind};

/// One Kafka record derived from one outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub topic: String,
    pub key: Bytes,
    /// None: a tombstone (a record with a null value).
    pub value: Option<Bytes>,
    /// In order: the row's (headers column, trace context), `id`, placed
    /// columns, then the relay's `event_type` and `lsn`. A placement may not be
    /// named like a relay header, so a consumer's "last header named X" is
    /// always the relay's.
    pub headers: Vec<(HeaderName, Bytes)>,
    /// The partition a `partition` placement chose; None: the partitioner's choice.
    pub partition: Option<i32>,
    /// Milliseconds since the Unix epoch from the timestamp column; None: the producer's time.
    pub timestamp_ms: Option<i64>,
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
    /// Only when a header needs it.
    event_type: Option<usize>,
    key: usize,
    payload: usize,
    payload_is_bytea: bool,
    payload_is_json: bool,
    headers: Option<usize>,
    timestamp: Option<(usize, TimeKind)>,
    trace: Option<usize>,
    placements: Vec<(usize, PlacementKind)>,
    topic: Vec<Part>,
    columns: usize,
    opts: std::sync::Arc<crate::config::OutboxConfig>,
}

/// The configured outbox table: decides whether a relation is it and maps its rows.
#[derive(Debug, Clone)]
pub struct OutboxTable {
    pub table: TableName,
    template: Vec<TemplatePart>,
    key: String,
    columns: crate::config::Columns,
    opts: std::sync::Arc<crate::config::OutboxConfig>,
}

impl OutboxTable {
    pub fn from_config(cfg: &Config) -> Self {
        OutboxTable {
            table: cfg.table().clone(),
            template: cfg.topic_template().to_vec(),
            key: cfg.outbox.key.clone(),
            columns: cfg.outbox.columns.clone(),
            opts: std::sync::Arc::new(cfg.outbox.clone()),
        }
    }

    /// The prefix of logical messages relayed as events, if any.
    pub fn messages_prefix(&self) -> Option<&str> {
        Some(self.opts.messages_prefix.as_str()).filter(|p| !p.is_empty())
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
        let o = &self.opts;
        let needs_type =
            o.relay_headers.contains(&RelayHeader::EventType) || o.format == Format::Cloudevents;
        let optional = |col: &Option<OptionalColumn>, setting: &str| match col {
            Some(c) if c.required => find(&c.name, setting).map(Some),
            Some(c) => Ok(rel.column_index(&c.name)),
            None => Ok(None),
        };
        let timestamp = match optional(&o.timestamp_column, "outbox.timestamp_column")? {
            Some(i) => {
                let col = &rel.columns[i];
                let kind = TimeKind::of(col.type_oid).ok_or_else(|| MappingError::ColumnType {
                    table: table.clone(),
                    column: col.name.clone(),
                    type_name: fields::type_name(col.type_oid),
                    setting: "outbox.timestamp_column",
                    expected: "timestamptz, timestamp or an integer of epoch milliseconds",
                })?;
                Some((i, kind))
            }
            None => None,
        };
        let mut placements = Vec::with_capacity(o.additional_placement.len());
        for p in &o.additional_placement {
            placements.push((
                find(&p.column, "outbox.additional_placement")?,
                p.kind.clone(),
            ));
        }
        let payload_type = rel.columns[payload].type_oid;
        Ok(Mapping {
            id: find(&c.id, "outbox.columns.id")?,
            event_type: match needs_type {
                true => Some(find(&c.event_type, "outbox.columns.event_type")?),
                false => None,
            },
            key: find(&self.key, "outbox.key")?,
            payload,
            payload_is_bytea: payload_type == oid::BYTEA,
            payload_is_json: matches!(payload_type, oid::JSON | oid::JSONB),
            headers: if c.headers.is_empty() {
                None
            } else {
                Some(find(&c.headers, "outbox.columns.headers")?)
            },
            timestamp,
            trace: optional(&o.trace_column, "outbox.trace_column")?,
            placements,
            topic,
            columns: rel.columns.len(),
            table,
            opts: o.clone(),
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
        let o = &*self.opts;
        let key = fields::encode_key(required(self.key)?, o.key_format);
        let id = required(self.id)?.clone();
        let event_type = self.event_type.map(required).transpose()?;
        let payload = match get(self.payload)? {
            Some(raw) if self.payload_is_bytea => {
                Some(decode_bytea_hex(raw).ok_or_else(|| MappingError::BadBytea {
                    table: self.table.clone(),
                    column: rel.columns[self.payload].name.clone(),
                    lsn: commit_lsn,
                    id: id_text(),
                })?)
            }
            other => other.cloned(),
        };
        let value = match payload {
            Some(p) if o.tombstone_on_empty_payload && p.trim_ascii().is_empty() => None,
            None if o.tombstone_on_empty_payload => None,
            None => {
                return Err(MappingError::NullColumn {
                    table: self.table.clone(),
                    column: rel.columns[self.payload].name.clone(),
                    lsn: commit_lsn,
                    id: id_text(),
                })
            }
            Some(p) => Some(fields::encode_value(p, o.value_format)),
        };
        let bad_value = |i: usize, expected, text: &Bytes| MappingError::BadValue {
            table: self.table.clone(),
            column: rel.columns[i].name.clone(),
            lsn: commit_lsn,
            id: id_text(),
            value: String::from_utf8_lossy(text).into_owned(),
            expected,
        };
        let timestamp_ms = match self.timestamp {
            Some((i, kind)) => match get(i)? {
                Some(text) => Some(kind.millis(text).ok_or_else(|| {
                    bad_value(
                        i,
                        "a timestamp; fix the row or outbox.timestamp_column",
                        text,
                    )
                })?),
                None => None,
            },
            None => None,
        };

        let mut headers = Vec::with_capacity(3 + self.placements.len());
        if let Some(h) = self.headers {
            if let Some(text) = get(h)? {
                append_json_headers(text, &mut headers);
            }
        }
        if let Some(text) = self.trace.map(get).transpose()?.flatten() {
            fields::trace_headers(text, &mut headers);
        }
        if o.relay_headers.contains(&RelayHeader::Id) {
            headers.push(("id".into(), id.clone()));
        }
        let mut partition = None;
        for (i, kind) in &self.placements {
            let Some(text) = get(*i)? else { continue };
            match kind {
                PlacementKind::Header(name) => headers.push((name.clone().into(), text.clone())),
                PlacementKind::Partition => {
                    partition = Some(fields::partition(text).ok_or_else(|| {
                        bad_value(
                            *i,
                            "a partition number (0 or more); fix the row or outbox.additional_placement",
                            text,
                        )
                    })?);
                }
            }
        }
        if o.format == Format::Cloudevents {
            headers.push(("ce_specversion".into(), Bytes::from_static(b"1.0")));
            headers.push(("ce_id".into(), id));
            headers.push((
                "ce_source".into(),
                Bytes::from(o.cloudevents_source.clone()),
            ));
            headers.push(("ce_type".into(), event_type.cloned().unwrap_or_default()));
            if let Some(ms) = timestamp_ms {
                headers.push(("ce_time".into(), Bytes::from(fields::rfc3339_ms(ms))));
            }
            if self.payload_is_json && value.is_some() {
                headers.push((
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ));
            }
        }
        for h in &o.relay_headers {
            match h {
                RelayHeader::Id => {}
                RelayHeader::EventType => {
                    headers.push(("event_type".into(), event_type.cloned().unwrap_or_default()))
                }
                RelayHeader::Lsn => headers.push(("lsn".into(), lsn_text.clone())),
            }
        }
        Ok(Record {
            topic,
            key,
            value,
            headers,
            partition,
            timestamp_ms,
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

#[cfg(test)]
mod tests;
