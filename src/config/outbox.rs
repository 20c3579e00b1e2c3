//! The `[outbox]` section: which table (and which logical messages) hold the
//! events, and how an event becomes a Kafka record.
//!
//! Parsed from a raw form in which every key is optional; an unset key takes
//! the preset's value (`preset = "debezium"`), else the relay's default, so any
//! preset value can be overridden by the usual key. Placements are parsed here
//! once; whether the named columns exist is only known from the table (see
//! `outbox`).

use serde::Deserialize;

/// The resolved `[outbox]` section (see [`RawOutbox`] for the keys and defaults).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawOutbox")]
pub struct OutboxConfig {
    /// The preset the unset keys came from.
    pub preset: Option<Preset>,
    pub table: String,
    pub topic: String,
    pub key: String,
    pub columns: Columns,
    pub on_invalid: OnInvalid,
    pub dead_letter_topic: String,
    /// Column holding the record's timestamp.
    pub timestamp_column: Option<OptionalColumn>,
    /// Column holding the W3C trace context (`traceparent`, or Debezium's
    /// `tracingspancontext` properties text).
    pub trace_column: Option<OptionalColumn>,
    /// Further columns placed as headers or as the partition.
    pub additional_placement: Vec<Placement>,
    /// A NULL or empty (whitespace only) payload becomes a tombstone (null value).
    pub tombstone_on_empty_payload: bool,
    pub key_format: KeyFormat,
    pub value_format: ValueFormat,
    /// The relay's own headers, in this order, after the row's.
    pub relay_headers: Vec<RelayHeader>,
    /// Prefix of the `pg_logical_emit_message` messages relayed as events; "" for none.
    pub messages_prefix: String,
    pub format: Format,
    /// `ce_source` of CloudEvents records.
    pub cloudevents_source: String,
}

/// What a user may write under `[outbox]`; unset keys come from the preset, else the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    /// `"debezium"`: Debezium's outbox table and Outbox Event Router defaults
    /// (columns `id`, `aggregatetype`, `aggregateid`, `type`, `payload`, optional
    /// `timestamp` and `tracingspancontext`; topic `outbox.event.{aggregatetype}`,
    /// key `aggregateid`, tombstones on empty payloads, headers `id` and `lsn`).
    /// Default: none (the relay's own table, `sql/001_outbox.sql`).
    preset: Option<Preset>,
    /// Outbox table, `schema.table` (schema defaults to `public`). Default `public.outbox`.
    table: Option<String>,
    /// Topic template; `{column}` is replaced by that column's value. Default
    /// `outbox.event.{aggregate_type}` (preset: `outbox.event.{aggregatetype}`).
    topic: Option<String>,
    /// Column whose value is the record key. Default `aggregate_id` (preset: `aggregateid`).
    key: Option<String>,
    /// Column names of the outbox table.
    #[serde(default)]
    columns: RawColumns,
    /// What to do with a row that cannot be delivered as a record (NULL routing
    /// column, invalid topic, a record the broker rejects as too large or not
    /// allowed): `stop` (default; nothing past it is confirmed) or `dead_letter`.
    #[serde(default)]
    on_invalid: OnInvalid,
    /// Topic of dead-lettered rows. Default `outbox.dead_letter`.
    dead_letter_topic: Option<String>,
    /// Column holding the record timestamp (`timestamptz`, `timestamp` as UTC,
    /// or an integer of epoch milliseconds); NULL leaves the producer's time.
    /// Debezium's `table.field.event.timestamp`. Default none, "" disables
    /// (preset: `timestamp` when the table has it).
    timestamp_column: Option<String>,
    /// Column holding a W3C `traceparent`, or Java properties text with
    /// `traceparent` and `tracestate` keys (Debezium's `tracingspancontext`);
    /// carried unchanged as headers. Default none, "" disables (preset:
    /// `tracingspancontext` when the table has it).
    trace_column: Option<String>,
    /// Further columns as `column:header[:alias]` or `column:partition`
    /// (Debezium's `table.fields.additional.placement`). Default none.
    additional_placement: Option<Vec<String>>,
    /// A NULL or empty payload is sent as a tombstone (null value) instead of
    /// being an invalid row (Debezium's `route.tombstone.on.empty.payload`).
    /// Default `false` (preset: `true`).
    tombstone_on_empty_payload: Option<bool>,
    /// Key bytes: `raw` (the column's text) or `json_string` (a JSON string, as
    /// Kafka Connect's JsonConverter writes it). Default `raw`.
    key_format: Option<KeyFormat>,
    /// Value bytes: `raw` (the payload as PostgreSQL renders it), `json_string`
    /// (the payload as a JSON string: Debezium with `table.expand.json.payload =
    /// false` and JsonConverter) or `json_expanded` (compact JSON: Debezium with
    /// `table.expand.json.payload = true` and JsonConverter). Default `raw`.
    value_format: Option<ValueFormat>,
    /// The relay's own headers, after the row's: any of `id`, `event_type`,
    /// `lsn`. Default `["id", "event_type", "lsn"]` (preset: `["id", "lsn"]`).
    relay_headers: Option<Vec<RelayHeader>>,
    /// Relay transactional `pg_logical_emit_message(true, prefix, json)`
    /// messages with this prefix as events (fields named like the columns).
    /// Default "" (none).
    messages_prefix: Option<String>,
    /// `plain` (default) or `cloudevents` (binary content mode: `ce_*` headers, value unchanged).
    #[serde(default)]
    format: Format,
    /// `ce_source` header of `cloudevents` records. Default `/outbox-relay/{table}`.
    cloudevents_source: Option<String>,
}

/// Column names under `[outbox.columns]`; unset ones come from the preset, else the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumns {
    /// Event id, sent as header `id`. Default `id`.
    id: Option<String>,
    /// Default `aggregate_type` (preset: `aggregatetype`).
    aggregate_type: Option<String>,
    /// Default `aggregate_id` (preset: `aggregateid`).
    aggregate_id: Option<String>,
    /// Sent as header `event_type`. Default `event_type` (preset: `type`).
    event_type: Option<String>,
    /// The record value (jsonb/json/text as rendered by PostgreSQL, bytea as raw bytes). Default `payload`.
    payload: Option<String>,
    /// Optional jsonb object whose top-level keys become headers. Default `headers` (preset: ""); "" disables.
    headers: Option<String>,
}

/// A set of defaults for the `[outbox]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// Debezium's outbox table and Outbox Event Router.
    Debezium,
}

/// The resolved column names.
#[derive(Debug, Clone)]
pub struct Columns {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    /// "" when disabled.
    pub headers: String,
}

impl Default for Columns {
    fn default() -> Self {
        OutboxConfig::default().columns
    }
}

/// A column that may be missing from the table when it came from a preset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionalColumn {
    pub name: String,
    /// Set by the user: a missing column is an error.
    pub required: bool,
}

/// The policy for rows that cannot become records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnInvalid {
    /// Stop with an error naming the row; confirm nothing past it.
    #[default]
    Stop,
    /// Send the row to `dead_letter_topic` with headers saying why, and go on.
    DeadLetter,
}

/// How the key column becomes key bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyFormat {
    #[default]
    Raw,
    JsonString,
}

/// How the payload becomes value bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    #[default]
    Raw,
    JsonString,
    JsonExpanded,
}

/// The record layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Plain,
    /// CloudEvents binary content mode.
    Cloudevents,
}

/// One of the relay's own headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayHeader {
    Id,
    EventType,
    Lsn,
}

impl RelayHeader {
    pub fn name(self) -> &'static str {
        match self {
            RelayHeader::Id => "id",
            RelayHeader::EventType => "event_type",
            RelayHeader::Lsn => "lsn",
        }
    }
}

/// One `additional_placement` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub column: String,
    pub kind: PlacementKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementKind {
    /// A header with this name.
    Header(String),
    /// The record's partition (an integer column).
    Partition,
}

/// Parses `column:header[:alias]` or `column:partition`.
fn parse_placement(spec: &str) -> Result<Placement, String> {
    let parts: Vec<&str> = spec.split(':').map(str::trim).collect();
    let bad = || {
        format!(
            "{spec:?} is not \"column:header\", \"column:header:alias\" or \"column:partition\""
        )
    };
    let column = match parts.first() {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => return Err(bad()),
    };
    let kind = match (parts.get(1).copied(), parts.get(2).copied(), parts.len()) {
        (Some("header"), None, 2) => PlacementKind::Header(column.clone()),
        (Some("header"), Some(alias), 3) if !alias.is_empty() => PlacementKind::Header(alias.to_string()),
        (Some("partition"), _, 2 | 3) => PlacementKind::Partition,
        (Some("envelope"), _, _) => {
            return Err(format!(
                "{spec:?}: the envelope placement needs Kafka Connect's value struct, which the relay does not build; place the column as a header"
            ))
        }
        _ => return Err(bad()),
    };
    Ok(Placement { column, kind })
}

fn optional(v: Option<String>, preset: Option<&str>) -> Option<OptionalColumn> {
    match v {
        Some(name) if name.is_empty() => None,
        Some(name) => Some(OptionalColumn {
            name,
            required: true,
        }),
        None => preset.map(|name| OptionalColumn {
            name: name.into(),
            required: false,
        }),
    }
}

impl TryFrom<RawOutbox> for OutboxConfig {
    type Error = String;

    fn try_from(raw: RawOutbox) -> Result<Self, String> {
        let dbz = raw.preset == Some(Preset::Debezium);
        // (relay default, Debezium preset)
        let pick = |v: Option<String>, ours: &str, theirs: &str| {
            v.unwrap_or_else(|| if dbz { theirs } else { ours }.to_string())
        };
        let c = raw.columns;
        let columns = Columns {
            id: pick(c.id, "id", "id"),
            aggregate_type: pick(c.aggregate_type, "aggregate_type", "aggregatetype"),
            aggregate_id: pick(c.aggregate_id, "aggregate_id", "aggregateid"),
            event_type: pick(c.event_type, "event_type", "type"),
            payload: pick(c.payload, "payload", "payload"),
            headers: pick(c.headers, "headers", ""),
        };
        let mut additional_placement = Vec::new();
        for spec in raw.additional_placement.unwrap_or_default() {
            additional_placement.push(
                parse_placement(&spec)
                    .map_err(|m| format!("invalid outbox.additional_placement: {m}"))?,
            );
        }
        let relay_headers = raw.relay_headers.unwrap_or_else(|| {
            if dbz {
                vec![RelayHeader::Id, RelayHeader::Lsn]
            } else {
                vec![RelayHeader::Id, RelayHeader::EventType, RelayHeader::Lsn]
            }
        });
        let partitions = additional_placement
            .iter()
            .filter(|p| p.kind == PlacementKind::Partition)
            .count();
        if partitions > 1 {
            return Err("invalid outbox.additional_placement: more than one column is placed as the partition; keep one".into());
        }
        for p in &additional_placement {
            if let PlacementKind::Header(alias) = &p.kind {
                if let Some(h) = relay_headers.iter().find(|h| h.name() == alias) {
                    return Err(format!(
                        "invalid outbox.additional_placement: header {alias:?} of column {:?} is also the relay's {:?} header; choose another alias or remove {:?} from outbox.relay_headers",
                        p.column,
                        h.name(),
                        h.name()
                    ));
                }
            }
        }
        let table = raw.table.unwrap_or_else(|| "public.outbox".into());
        Ok(OutboxConfig {
            preset: raw.preset,
            cloudevents_source: raw
                .cloudevents_source
                .unwrap_or_else(|| format!("/outbox-relay/{table}")),
            table,
            topic: pick(
                raw.topic,
                "outbox.event.{aggregate_type}",
                "outbox.event.{aggregatetype}",
            ),
            key: pick(raw.key, "aggregate_id", "aggregateid"),
            columns,
            on_invalid: raw.on_invalid,
            dead_letter_topic: raw
                .dead_letter_topic
                .unwrap_or_else(|| "outbox.dead_letter".into()),
            timestamp_column: optional(raw.timestamp_column, dbz.then_some("timestamp")),
            trace_column: optional(raw.trace_column, dbz.then_some("tracingspancontext")),
            additional_placement,
            tombstone_on_empty_payload: raw.tombstone_on_empty_payload.unwrap_or(dbz),
            key_format: raw.key_format.unwrap_or_default(),
            value_format: raw.value_format.unwrap_or_default(),
            relay_headers,
            messages_prefix: raw.messages_prefix.unwrap_or_default(),
            format: raw.format,
        })
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig::try_from(RawOutbox::default()).expect("the defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OutboxConfig, String> {
        toml::from_str::<OutboxConfig>(text).map_err(|e| e.to_string().replace('\n', " "))
    }

    #[test]
    fn defaults_are_the_relays_table() {
        let c = OutboxConfig::default();
        assert_eq!(c.topic, "outbox.event.{aggregate_type}");
        assert_eq!(c.columns.headers, "headers");
        assert_eq!(c.timestamp_column, None);
        assert!(!c.tombstone_on_empty_payload);
        assert_eq!(
            c.relay_headers,
            [RelayHeader::Id, RelayHeader::EventType, RelayHeader::Lsn]
        );
        assert_eq!(c.messages_prefix, "");
    }

    #[test]
    fn the_debezium_preset_and_its_overrides() {
        let c = parse("preset = \"debezium\"\n").unwrap();
        assert_eq!(c.topic, "outbox.event.{aggregatetype}");
        assert_eq!(c.key, "aggregateid");
        assert_eq!(c.columns.aggregate_type, "aggregatetype");
        assert_eq!(c.columns.event_type, "type");
        assert_eq!(c.columns.headers, "");
        assert!(c.tombstone_on_empty_payload);
        assert_eq!(c.relay_headers, [RelayHeader::Id, RelayHeader::Lsn]);
        let ts = c.timestamp_column.unwrap();
        assert_eq!((ts.name.as_str(), ts.required), ("timestamp", false));
        assert_eq!(c.trace_column.unwrap().name, "tracingspancontext");

        let c = parse(
            "preset = \"debezium\"\ntopic = \"events.{aggregatetype}\"\nkey = \"id\"\ntimestamp_column = \"\"\ntombstone_on_empty_payload = false\n[columns]\npayload = \"body\"\n",
        )
        .unwrap();
        assert_eq!(c.topic, "events.{aggregatetype}");
        assert_eq!(c.key, "id");
        assert_eq!(c.columns.payload, "body");
        assert_eq!(c.columns.aggregate_id, "aggregateid");
        assert_eq!(c.timestamp_column, None);
        assert!(!c.tombstone_on_empty_payload);
    }

    #[test]
    fn placements() {
        let c = parse(
            "additional_placement = [\"type:header:eventType\", \"tenant:header\", \"shard:partition\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.additional_placement,
            [
                Placement {
                    column: "type".into(),
                    kind: PlacementKind::Header("eventType".into())
                },
                Placement {
                    column: "tenant".into(),
                    kind: PlacementKind::Header("tenant".into())
                },
                Placement {
                    column: "shard".into(),
                    kind: PlacementKind::Partition
                },
            ]
        );
    }

    #[test]
    fn bad_outbox_sections_say_what_to_change() {
        for (text, expected) in [
            (
                "preset = \"debezum\"\n",
                "unknown variant `debezum`, expected `debezium`",
            ),
            (
                "additional_placement = [\"type:envelope\"]\n",
                "place the column as a header",
            ),
            (
                "additional_placement = [\"type\"]\n",
                "is not \"column:header\"",
            ),
            (
                "additional_placement = [\"a:partition\", \"b:partition\"]\n",
                "keep one",
            ),
            (
                "additional_placement = [\"x:header:lsn\"]\n",
                "remove \"lsn\" from outbox.relay_headers",
            ),
            (
                "value_format = \"expanded\"\n",
                "unknown variant `expanded`",
            ),
            ("relay_headers = [\"trace\"]\n", "unknown variant `trace`"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
