//! Unit tests of the row mapping.
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

/// The mapping of the config `[postgres]` plus `extra`.
pub(super) fn table(extra: &str) -> OutboxTable {
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
    assert_eq!(r.value.as_deref().unwrap(), br#"{"total": 3}"#);
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
        r.value.as_deref().unwrap(),
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
    assert_eq!(dl.value.as_deref().unwrap(), br#"{"total": 3}"#);
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
    assert!(dl.value.as_deref() == Some(&b""[..]));
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

/// Debezium's documented outbox table, plus `timestamp` (bigint, epoch ms),
/// `tracingspancontext` and a `tenant` column.
fn debezium_relation() -> Relation {
    relation(&[
        ("id", 2950),
        ("aggregatetype", 1043),
        ("aggregateid", 1043),
        ("type", 1043),
        ("payload", 3802),
        ("timestamp", 20),
        ("tracingspancontext", 1043),
        ("tenant", 25),
        ("shard", 23),
    ])
}

fn debezium_row(payload: Value) -> Tuple {
    Tuple(vec![
        t("406c07f3-26f0-4eea-a50c-109940064b8f"),
        t("Order"),
        t("1"),
        t("OrderCreated"),
        payload,
        t("1556890294344"),
        t("#Fri May 03 13:31:34 UTC 2019\ntraceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n"),
        t("acme"),
        t("2"),
    ])
}

fn header_list(r: &Record) -> Vec<(&str, &str)> {
    r.headers
        .iter()
        .map(|(k, v)| (k.as_ref(), std::str::from_utf8(v).unwrap()))
        .collect()
}

#[test]
fn the_debezium_preset_routes_like_the_outbox_event_router() {
    let rel = debezium_relation();
    let tbl = table("[outbox]\npreset = \"debezium\"\nadditional_placement = [\"type:header:eventType\", \"tenant:header\", \"shard:partition\"]\n");
    let m = tbl.mapping(&rel).unwrap();
    let r = m
        .record(
            &debezium_row(t(r#"{"id": 1, "customerId": 123}"#)),
            Lsn(0x20),
            &rel,
        )
        .unwrap();
    assert_eq!(r.topic, "outbox.event.Order");
    assert_eq!(&r.key[..], b"1");
    assert_eq!(
        r.value.as_deref(),
        Some(&br#"{"id": 1, "customerId": 123}"#[..])
    );
    assert_eq!(r.timestamp_ms, Some(1_556_890_294_344));
    assert_eq!(r.partition, Some(2));
    assert_eq!(
        header_list(&r),
        [
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ),
            ("id", "406c07f3-26f0-4eea-a50c-109940064b8f"),
            ("eventType", "OrderCreated"),
            ("tenant", "acme"),
            ("lsn", "0/20"),
        ]
    );
    // NULL and empty payloads are tombstones under the preset.
    for p in [Value::Null, t(""), t("  ")] {
        let r = m.record(&debezium_row(p), Lsn(0x20), &rel).unwrap();
        assert_eq!(r.value, None);
    }
}

#[test]
fn the_preset_reads_a_table_without_the_optional_columns() {
    let rel = relation(&[
        ("id", 2950),
        ("aggregatetype", 1043),
        ("aggregateid", 1043),
        ("type", 1043),
        ("payload", 3802),
    ]);
    let tbl = table("[outbox]\npreset = \"debezium\"\nvalue_format = \"json_string\"\nkey_format = \"json_string\"\n");
    let row = Tuple(vec![
        t("e-1"),
        t("customer"),
        t("7"),
        t("X"),
        t(r#"{"a": "b"}"#),
    ]);
    let r = tbl
        .mapping(&rel)
        .unwrap()
        .record(&row, Lsn(1), &rel)
        .unwrap();
    assert_eq!(r.topic, "outbox.event.customer");
    assert_eq!(&r.key[..], br#""7""#);
    assert_eq!(r.value.as_deref(), Some(&br#""{\"a\": \"b\"}""#[..]));
    assert_eq!(r.timestamp_ms, None);
    assert_eq!(header_list(&r), [("id", "e-1"), ("lsn", "0/1")]);
}

#[test]
fn a_null_payload_without_tombstones_is_an_invalid_row() {
    let rel = default_relation();
    let mut r = row(Value::Null);
    r.0[4] = Value::Null;
    let err = table("")
        .mapping(&rel)
        .unwrap()
        .record(&r, Lsn(1), &rel)
        .unwrap_err();
    assert_eq!(err.kind(), "null_column");
    let ok = table("[outbox]\ntombstone_on_empty_payload = true\n")
        .mapping(&rel)
        .unwrap()
        .record(&r, Lsn(1), &rel)
        .unwrap();
    assert_eq!(ok.value, None);
}

#[test]
fn bad_timestamp_and_placement_columns_name_the_setting() {
    let rel = default_relation();
    let err = table("[outbox]\ntimestamp_column = \"event_type\"\n")
        .mapping(&rel)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "column \"event_type\" of table \"public.outbox\" is text; outbox.timestamp_column needs timestamptz, timestamp or an integer of epoch milliseconds"
    );
    let err = table("[outbox]\ntimestamp_column = \"created\"\n")
        .mapping(&rel)
        .unwrap_err();
    assert!(
        err.to_string().contains("set outbox.timestamp_column"),
        "{err}"
    );
    let err = table("[outbox]\nadditional_placement = [\"tenant:header\"]\n")
        .mapping(&rel)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("column \"tenant\" not found in table \"public.outbox\"")
            && err
                .to_string()
                .ends_with("set outbox.additional_placement in the config"),
        "{err}"
    );
    // A value that is not a partition number is an invalid row.
    let err = table("[outbox]\nadditional_placement = [\"event_type:partition\"]\n")
        .mapping(&rel)
        .unwrap()
        .record(&row(Value::Null), Lsn(1), &rel)
        .unwrap_err();
    assert_eq!(err.kind(), "bad_value");
    assert!(
        err.to_string().contains(
            "has \"OrderPlaced\" in column \"event_type\", which is not a partition number"
        ),
        "{err}"
    );
}

#[test]
fn created_at_as_timestamp_and_cloudevents_headers() {
    let rel = default_relation();
    let r = table("[outbox]\ntimestamp_column = \"created_at\"\nformat = \"cloudevents\"\ncloudevents_source = \"/orders\"\n")
        .mapping(&rel)
        .unwrap()
        .record(&row(Value::Null), Lsn(1), &rel)
        .unwrap();
    assert_eq!(r.timestamp_ms, Some(1_795_600_800_000));
    assert_eq!(
        header_list(&r),
        [
            ("id", "6f1e0f8e-0000-4000-8000-000000000001"),
            ("ce_specversion", "1.0"),
            ("ce_id", "6f1e0f8e-0000-4000-8000-000000000001"),
            ("ce_source", "/orders"),
            ("ce_type", "OrderPlaced"),
            ("ce_time", "2026-11-25T10:00:00.000Z"),
            ("content-type", "application/json"),
            ("event_type", "OrderPlaced"),
            ("lsn", "0/1"),
        ]
    );
}
