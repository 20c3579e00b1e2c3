//! Decoder tests on messages captured from PostgreSQL 15 by
//! `tests/fixtures/pgoutput/capture.sh`.

use super::*;

fn fixture(text: &str) -> Vec<Bytes> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let l = l.trim();
            Bytes::from(
                (0..l.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

fn decode_all(text: &str) -> Vec<Message> {
    fixture(text)
        .into_iter()
        .map(|b| decode(b).unwrap())
        .collect()
}

fn text(v: &Value) -> &str {
    match v {
        Value::Text(b) => std::str::from_utf8(b).unwrap(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[test]
fn insert_with_null_and_unicode() {
    let msgs = decode_all(include_str!(
        "../../tests/fixtures/pgoutput/insert_null_unicode.hex"
    ));
    let Message::Begin(begin) = &msgs[0] else {
        panic!("{:?}", msgs[0])
    };
    let Message::Relation(rel) = &msgs[1] else {
        panic!("{:?}", msgs[1])
    };
    let Message::Insert { relation_id, new } = &msgs[2] else {
        panic!("{:?}", msgs[2])
    };
    let Message::Commit(commit) = &msgs[3] else {
        panic!("{:?}", msgs[3])
    };

    assert_eq!(rel.qualified_name(), "public.fixture_outbox");
    let names: Vec<_> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "created_at"
        ]
    );
    assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
    assert_eq!(rel.columns[4].type_oid, 3802, "payload is jsonb");
    assert_eq!(*relation_id, rel.id);

    assert_eq!(text(&new.0[0]), "11111111-2222-3333-4444-555555555555");
    assert_eq!(text(&new.0[2]), "ørder-ü-42 ✓");
    assert_eq!(
        text(&new.0[4]),
        r#"{"note": "naïve café ☕", "total": 12.5}"#
    );
    assert_eq!(new.0[5], Value::Null);

    assert_eq!(begin.final_lsn, commit.commit_lsn);
    assert!(commit.end_lsn > commit.commit_lsn);
    assert_eq!(begin.commit_time, commit.commit_time);
    // Captured in 2026: a sane Unix time in microseconds.
    assert!(commit.commit_time.unix_micros() > 1_700_000_000_000_000);
}

#[test]
fn toasted_jsonb_arrives_whole_on_insert() {
    let msgs = decode_all(include_str!(
        "../../tests/fixtures/pgoutput/insert_toast.hex"
    ));
    let Message::Insert { new, .. } = &msgs[2] else {
        panic!("{:?}", msgs[2])
    };
    let payload: serde_json::Value = serde_json::from_str(text(&new.0[4])).unwrap();
    assert_eq!(payload["data"].as_str().unwrap().len(), 400 * 32);
    assert_eq!(text(&new.0[5]), r#"{"n": 7, "trace": "abc"}"#);
}

#[test]
fn update_delete_truncate_and_logical_message() {
    let msgs = decode_all(include_str!("../../tests/fixtures/pgoutput/mixed_tx.hex"));
    let kinds: Vec<&str> = msgs
        .iter()
        .map(|m| match m {
            Message::Begin(_) => "B",
            Message::Relation(_) => "R",
            Message::Insert { .. } => "I",
            Message::Update { .. } => "U",
            Message::Delete { .. } => "D",
            Message::Message(_) => "M",
            Message::Truncate { .. } => "T",
            Message::Commit(_) => "C",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["B", "R", "I", "U", "D", "M", "R", "T", "C"]);
    let Message::Update { old, new, .. } = &msgs[3] else {
        unreachable!()
    };
    assert!(old.is_none());
    assert_eq!(text(&new.0[1]), "uno");
    let Message::Delete { old, .. } = &msgs[4] else {
        unreachable!()
    };
    assert_eq!(text(&old.0[0]), "1");
    assert_eq!(
        old.0[1],
        Value::Null,
        "only the key is sent for a default replica identity"
    );
    let Message::Message(m) = &msgs[5] else {
        unreachable!()
    };
    assert!(m.transactional);
    assert_eq!(m.prefix, "relay");
    assert_eq!(&m.content[..], b"hello");
    let Message::Truncate { relation_ids, .. } = &msgs[7] else {
        unreachable!()
    };
    let Message::Relation(rel) = &msgs[1] else {
        unreachable!()
    };
    assert_eq!(relation_ids, &[rel.id]);
}

#[test]
fn column_added_mid_stream_replaces_cached_relation() {
    let msgs = decode_all(include_str!(
        "../../tests/fixtures/pgoutput/column_added.hex"
    ));
    let mut cache = RelationCache::default();
    let mut widths = Vec::new();
    for m in msgs {
        match m {
            Message::Relation(r) => cache.insert(r),
            Message::Insert { relation_id, new } => {
                let rel = cache
                    .get(relation_id)
                    .expect("relation sent before its rows");
                assert_eq!(rel.columns.len(), new.0.len());
                widths.push(new.0.len());
                if let Some(i) = rel.column_index("tenant") {
                    assert_eq!(text(&new.0[i]), "t1");
                }
            }
            _ => {}
        }
    }
    assert_eq!(widths, [7, 8]);
}

#[test]
fn every_truncation_of_real_messages_is_an_error_not_a_panic() {
    for file in [
        include_str!("../../tests/fixtures/pgoutput/insert_null_unicode.hex"),
        include_str!("../../tests/fixtures/pgoutput/mixed_tx.hex"),
        include_str!("../../tests/fixtures/pgoutput/column_added.hex"),
    ] {
        for msg in fixture(file) {
            for cut in 0..msg.len() {
                assert!(
                    decode(msg.slice(..cut)).is_err(),
                    "prefix of {cut} bytes decoded"
                );
            }
            let mut longer = msg.to_vec();
            longer.push(0);
            assert!(matches!(
                decode(Bytes::from(longer)),
                Err(DecodeError::Trailing { extra: 1, .. })
            ));
        }
    }
}

#[test]
fn hostile_lengths_and_tags_are_rejected() {
    assert_eq!(
        decode(Bytes::from_static(b"Z")),
        Err(DecodeError::UnknownTag { tag: 'Z' })
    );
    // Insert with one text column claiming a negative length.
    let bad = Bytes::from_static(&[b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        decode(bad),
        Err(DecodeError::NegativeLength { .. })
    ));
    // Truncate claiming 4 billion relations in a few bytes.
    let bad = Bytes::from_static(&[b'T', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1]);
    assert!(matches!(decode(bad), Err(DecodeError::Truncated { .. })));
}
