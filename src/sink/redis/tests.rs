//! The Redis sink's commands and error classification, without a server
//! (tests/integration/redis.rs runs it against one).

use super::*;
use bytes::Bytes;

fn settings(mode: RedisMode) -> Settings {
    Settings {
        mode,
        maxlen: Some(1000),
        wait: None,
        max_record_bytes: 100,
        pipeline_records: 10,
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(1),
    }
}

fn record(value: Option<&'static [u8]>) -> Record {
    Record {
        topic: "orders".into(),
        key: Bytes::from_static(b"o-1"),
        value: value.map(Bytes::from_static),
        headers: vec![
            ("id".into(), Bytes::from_static(b"e-1")),
            ("lsn".into(), Bytes::from_static(b"0/16B3748")),
        ],
        partition: None,
        timestamp_ms: Some(1_700_000_000_000),
    }
}

fn args(c: &redis::Cmd) -> Vec<String> {
    c.args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
            _ => "<other>".into(),
        })
        .collect()
}

#[test]
fn a_stream_entry_has_key_headers_timestamp_and_value_fields() {
    let c = command(&settings(RedisMode::Stream), &record(Some(b"{\"a\":1}")));
    assert_eq!(
        args(&c),
        [
            "XADD",
            "orders",
            "MAXLEN",
            "~",
            "1000",
            "*",
            "key",
            "o-1",
            "header:id",
            "e-1",
            "header:lsn",
            "0/16B3748",
            "timestamp_ms",
            "1700000000000",
            "value",
            "{\"a\":1}"
        ]
    );
    // A tombstone has no value field (an empty value has an empty one).
    let c = command(&settings(RedisMode::Stream), &record(None));
    assert!(!args(&c).contains(&"value".to_string()));
}

#[test]
fn a_published_message_is_the_json_line() {
    let c = command(&settings(RedisMode::Pubsub), &record(None));
    let a = args(&c);
    assert_eq!(a[..2], ["PUBLISH", "orders"]);
    let v: serde_json::Value = serde_json::from_str(&a[2]).unwrap();
    assert_eq!(v["key"], "o-1");
    assert!(v["value"].is_null());
    assert_eq!(v["headers"][0], serde_json::json!(["id", "e-1"]));
}

#[test]
fn wrong_type_and_no_permission_refuse_the_record_the_rest_is_retried() {
    let parse = |text: &str| -> ServerError {
        match redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap() {
            Value::ServerError(e) => e,
            other => panic!("{other:?}"),
        }
    };
    let (reason, text) = server_error(
        &parse("WRONGTYPE Operation against a key holding the wrong kind of value"),
        "t",
    );
    assert_eq!(reason, Some("rejected"));
    assert!(
        text.starts_with("WRONGTYPE Operation") && text.contains("rename or delete that key"),
        "{text}"
    );
    assert_eq!(
        server_error(&parse("NOPERM no permissions"), "t").0,
        Some("rejected")
    );
    let (reason, text) = server_error(&parse("OOM command not allowed"), "t");
    assert_eq!(reason, None);
    assert!(text.contains("maxmemory"), "{text}");
    assert_eq!(
        server_error(&parse("ERR something"), "t"),
        (None, "ERR something".into())
    );
}
