//! The NATS message of a record: which subjects a publish may name, the
//! headers (the record's, then `key`, `timestamp_ms` and `Nats-Msg-Id`), and
//! the size the server counts against its `max_payload`.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};

use crate::outbox::Record;

/// The header carrying the record's key (NATS messages have no key).
pub const KEY_HEADER: &str = "key";
/// The header carrying the record's timestamp (milliseconds since the epoch),
/// when the outbox has a timestamp column.
pub const TIMESTAMP_HEADER: &str = "timestamp_ms";

/// A subject the server accepts for a publish: no empty token (the relay's
/// topics never hold spaces or wildcards).
pub(super) fn valid_subject(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|t| !t.is_empty())
}

/// The record's headers, then `key`, `timestamp_ms` and `Nats-Msg-Id` (the last `id` header).
pub(super) fn headers(record: &Record) -> Result<HeaderMap, String> {
    let text = |what: &str, v: &[u8]| -> Result<String, String> {
        let s = std::str::from_utf8(v)
            .map_err(|_| format!("{what} is not UTF-8, which NATS headers must be"))?;
        if s.contains(['\r', '\n']) {
            return Err(format!(
                "{what} contains a line break, which NATS headers cannot carry"
            ));
        }
        Ok(s.to_string())
    };
    let mut map = HeaderMap::new();
    for (k, v) in &record.headers {
        let name: HeaderName = k.parse().map_err(|_| {
            format!(
                "header name {k:?} is not valid in NATS (printable ASCII without ':' or spaces)"
            )
        })?;
        let value = text(&format!("the value of header {k:?}"), v)?;
        map.append(name, HeaderValue::from(value));
    }
    map.append(KEY_HEADER, text("the key", &record.key)?);
    if let Some(ms) = record.timestamp_ms {
        map.append(TIMESTAMP_HEADER, ms.to_string());
    }
    if let Some(id) = record.header("id") {
        map.insert(NATS_MESSAGE_ID, text("the id header", id)?);
    }
    Ok(map)
}

/// Bytes the server counts against `max_payload`: the header block
/// (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`) and the payload.
pub(super) fn message_size(headers: &HeaderMap, record: &Record) -> usize {
    let mut size = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        for v in values {
            size += AsRef::<str>::as_ref(name).len() + 2 + v.as_str().len() + 2;
        }
    }
    size + record.value.as_ref().map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            topic: "outbox.event.order".into(),
            key: bytes::Bytes::from_static(b"order-1"),
            value: Some(bytes::Bytes::from_static(b"{\"total\": 42}")),
            headers: vec![
                (
                    "traceparent".into(),
                    bytes::Bytes::from_static(b"00-ab-cd-01"),
                ),
                ("id".into(), bytes::Bytes::from_static(b"e-1")),
                ("lsn".into(), bytes::Bytes::from_static(b"0/16B3748")),
            ],
            timestamp_ms: Some(1_700_000_000_000),
            ..Record::default()
        }
    }

    #[test]
    fn headers_carry_the_record_key_timestamp_and_message_id() {
        let h = headers(&record()).unwrap();
        assert_eq!(h.get("traceparent").unwrap().as_str(), "00-ab-cd-01");
        assert_eq!(h.get("id").unwrap().as_str(), "e-1");
        assert_eq!(h.get(KEY_HEADER).unwrap().as_str(), "order-1");
        assert_eq!(h.get(TIMESTAMP_HEADER).unwrap().as_str(), "1700000000000");
        assert_eq!(h.get(NATS_MESSAGE_ID).unwrap().as_str(), "e-1");
        // Without an id (a logical message without one): no Nats-Msg-Id.
        let mut r = record();
        r.headers.retain(|(k, _)| k != "id");
        assert!(headers(&r).unwrap().get(NATS_MESSAGE_ID).is_none());
        // Header block + payload, as the server counts it.
        let size = message_size(&headers(&record()).unwrap(), &record());
        let block = "NATS/1.0\r\ntraceparent: 00-ab-cd-01\r\nid: e-1\r\nlsn: 0/16B3748\r\nkey: order-1\r\ntimestamp_ms: 1700000000000\r\nNats-Msg-Id: e-1\r\n\r\n";
        assert_eq!(size, block.len() + 13);
    }

    #[test]
    fn headers_nats_cannot_carry_are_named() {
        let mut r = record();
        r.headers
            .push(("bad name".into(), bytes::Bytes::from_static(b"x")));
        assert!(headers(&r).unwrap_err().contains("\"bad name\""));
        let mut r = record();
        r.headers
            .push(("note".into(), bytes::Bytes::from_static(b"a\nb")));
        assert!(headers(&r).unwrap_err().contains("line break"));
        let mut r = record();
        r.key = bytes::Bytes::from_static(&[0xff]);
        assert!(headers(&r).unwrap_err().contains("the key is not UTF-8"));
    }

    #[test]
    fn subjects_need_every_token() {
        assert!(valid_subject("outbox.event.order"));
        assert!(!valid_subject("outbox..order"));
        assert!(!valid_subject(".order"));
        assert!(!valid_subject("order."));
    }
}
