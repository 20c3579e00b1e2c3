//! A record as an AMQP message: routing key, body and properties (headers,
//! `message_id`, persistence), what AMQP cannot carry, and which record of a
//! batch a message RabbitMQ returned was. Pure: no I/O.

use std::time::SystemTime;

use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::outbox::Record;

/// AMQP's limit on a short string: routing keys, header names, message ids.
const MAX_SHORT: usize = 255;

/// Why RabbitMQ cannot take `record` at all: (dead-letter reason, message).
pub(super) fn refusal(record: &Record, max_bytes: usize) -> Option<(&'static str, String)> {
    let size = record.value.as_ref().map_or(0, |v| v.len());
    if size > max_bytes {
        return Some((
            "too_large",
            format!("the body is {size} bytes, more than rabbitmq.max_message_bytes ({max_bytes}); raise it together with the server's max_message_size, or shrink the payload"),
        ));
    }
    if record.topic.len() > MAX_SHORT {
        return Some((
            "rejected",
            format!(
                "the routing key (the topic) is {} bytes, AMQP allows {MAX_SHORT}",
                record.topic.len()
            ),
        ));
    }
    if let Some((name, _)) = record.headers.iter().find(|(n, _)| n.len() > MAX_SHORT) {
        return Some((
            "rejected",
            format!(
                "header name {:?}... is {} bytes, AMQP allows {MAX_SHORT}",
                name.chars().take(32).collect::<String>(),
                name.len()
            ),
        ));
    }
    None
}

/// Text header values as AMQP long strings (`S`), other bytes as byte arrays
/// (`x`, RabbitMQ's type for binary), so clients decoding `S` as text see text.
fn header_value(v: &[u8]) -> AMQPValue {
    match std::str::from_utf8(v) {
        Ok(_) => AMQPValue::LongString(LongString::from(v.to_vec())),
        Err(_) => AMQPValue::ByteArray(ByteArray::from(v)),
    }
}

fn short(s: &[u8]) -> Option<ShortString> {
    ShortString::try_new(std::str::from_utf8(s).ok()?.to_string()).ok()
}

/// The AMQP properties of `record`: persistent, `message_id` = the `id`
/// header, `timestamp` (seconds), `content_type` from a `content-type` header,
/// and the headers as a field table: the record's headers (the last of equal
/// names wins, as a Kafka consumer's "last header" does), then `key`.
pub fn properties(record: &Record) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &record.headers {
        if let Ok(name) = ShortString::try_new(name.to_string()) {
            headers.insert(name, header_value(value));
        }
    }
    headers.insert("key".into(), header_value(&record.key));
    let seconds = match record.timestamp_ms {
        Some(ms) => (ms.max(0) / 1000) as u64,
        None => SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(seconds)
        .with_headers(headers);
    if let Some(id) = message_id(record) {
        props = props.with_message_id(id);
    }
    if let Some(ct) = record.header("content-type").and_then(|v| short(v)) {
        props = props.with_content_type(ct);
    }
    props
}

/// `message_id`: the last `id` header, when it fits an AMQP short string.
fn message_id(record: &Record) -> Option<ShortString> {
    record.header("id").and_then(|v| short(v))
}

pub(super) fn body(record: &Record) -> &[u8] {
    record.value.as_deref().unwrap_or_default()
}

/// The record a returned message belongs to: the first of `records` not yet
/// `taken` that was published with its routing key, message id and body.
/// (Records equal in all three are interchangeable: they go the same way.)
pub(super) fn returned_record(
    records: &[&Record],
    taken: &[bool],
    routing_key: &str,
    message_id: Option<&str>,
    data: &[u8],
) -> Option<usize> {
    records.iter().zip(taken).position(|(r, taken)| {
        !taken
            && r.topic == routing_key
            && body(r) == data
            && self::message_id(r).as_ref().map(ShortString::as_str) == message_id
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record() -> Record {
        Record {
            topic: "outbox.event.order".into(),
            key: Bytes::from_static(b"o-1"),
            value: Some(Bytes::from_static(b"{\"total\": 42}")),
            headers: vec![
                ("id".into(), Bytes::from_static(b"e-1")),
                ("bin".into(), Bytes::from_static(&[0xff, 0x00])),
                ("id".into(), Bytes::from_static(b"e-2")),
                (
                    "content-type".into(),
                    Bytes::from_static(b"application/json"),
                ),
            ],
            partition: None,
            timestamp_ms: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn a_record_becomes_a_persistent_message_with_its_headers() {
        let p = properties(&record());
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("e-2"));
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("id"),
            Some(&AMQPValue::LongString(b"e-2".to_vec().into())),
            "the last of equal names wins"
        );
        assert_eq!(
            h.get("key"),
            Some(&AMQPValue::LongString(b"o-1".to_vec().into()))
        );
        assert_eq!(
            h.get("bin"),
            Some(&AMQPValue::ByteArray(vec![0xff, 0x00].into()))
        );
    }

    #[test]
    fn a_return_goes_to_its_own_record_whichever_confirm_carried_it() {
        let mut a = record();
        a.headers = vec![("id".into(), Bytes::from_static(b"e-a"))];
        let mut b = a.clone();
        b.headers = vec![("id".into(), Bytes::from_static(b"e-b"))];
        let other = Record {
            topic: "outbox.event.invoice".into(),
            ..b.clone()
        };
        let records = [&a, &b, &other];
        let body = br#"{"total": 42}"#;
        let find = |taken: &[bool], rk: &str, id: Option<&str>| {
            returned_record(&records, taken, rk, id, body)
        };
        let none = [false; 3];
        assert_eq!(find(&none, "outbox.event.order", Some("e-b")), Some(1));
        assert_eq!(find(&none, "outbox.event.invoice", Some("e-b")), Some(2));
        assert_eq!(find(&none, "outbox.event.order", Some("e-c")), None);
        assert_eq!(
            returned_record(&records, &none, "outbox.event.order", Some("e-a"), b"{}"),
            None,
            "the body must match too"
        );
        // Equal records: each return takes the next one.
        let twins = [&a, &a];
        let first = returned_record(&twins, &[false, false], &a.topic, Some("e-a"), body);
        let second = returned_record(&twins, &[true, false], &a.topic, Some("e-a"), body);
        assert_eq!((first, second), (Some(0), Some(1)));
        // An id that is no AMQP short string is sent (and matched) without message_id.
        let mut long_id = a.clone();
        long_id.headers = vec![("id".into(), Bytes::from("x".repeat(300)))];
        assert_eq!(
            returned_record(&[&long_id], &[false], &a.topic, None, body),
            Some(0)
        );
    }

    #[test]
    fn records_amqp_cannot_carry_are_refused_with_a_reason() {
        let mut r = record();
        assert!(refusal(&r, 100).is_none());
        assert_eq!(refusal(&r, 5).unwrap().0, "too_large");
        r.topic = "t".repeat(256);
        assert_eq!(refusal(&r, 100).unwrap().0, "rejected");
        let mut r = record();
        r.headers.push(("h".repeat(300).into(), Bytes::new()));
        let (reason, error) = refusal(&r, 100).unwrap();
        assert_eq!(reason, "rejected");
        assert!(error.contains("300 bytes"), "{error}");
    }
}
