//! The stdout sink: one JSON line per record, acknowledged once the line is
//! written and flushed (for `tail`, debugging, and runs without a broker).

use std::io::Write;

use tokio::sync::mpsc;

use crate::ack::Seq;
use crate::outbox::Record;

use super::{DeliveryReport, SendError};

/// Writes each record as one JSON line: `topic`, `key`, `value`, `headers`
/// (`[[name, value], ...]` in record order) and `lsn`. Bytes that are not UTF-8
/// are written as hex under `key_hex` / `value_hex` / `[name, {"hex": ..}]`.
pub struct StdoutSink {
    reports: mpsc::UnboundedSender<DeliveryReport>,
}

impl StdoutSink {
    pub(super) fn new(reports: mpsc::UnboundedSender<DeliveryReport>) -> StdoutSink {
        StdoutSink { reports }
    }

    pub(super) fn send(&self, seq: Seq, record: &Record) -> Result<(), SendError> {
        let mut line = json_line(record);
        line.push('\n');
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .map_err(SendError::Output)?;
        let _ = self.reports.send(DeliveryReport {
            seq,
            result: Ok(()),
        });
        Ok(())
    }
}

fn text_or_hex(bytes: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => serde_json::Value::String(s.to_string()),
        Err(_) => serde_json::json!({ "hex": hex(bytes) }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The JSON line for `record` (without the newline).
pub fn json_line(record: &Record) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("topic".into(), record.topic.clone().into());
    put_bytes(&mut obj, "key", &record.key);
    match &record.value {
        Some(value) => put_bytes(&mut obj, "value", value),
        None => {
            obj.insert("value".into(), serde_json::Value::Null);
        }
    }
    if let Some(p) = record.partition {
        obj.insert("partition".into(), p.into());
    }
    if let Some(ms) = record.timestamp_ms {
        obj.insert("timestamp_ms".into(), ms.into());
    }
    let headers: Vec<serde_json::Value> = record
        .headers
        .iter()
        .map(|(k, v)| serde_json::json!([k, text_or_hex(v)]))
        .collect();
    obj.insert("headers".into(), headers.into());
    if let Some(lsn) = record.header("lsn") {
        obj.insert("lsn".into(), text_or_hex(lsn));
    }
    serde_json::Value::Object(obj).to_string()
}

fn put_bytes(obj: &mut serde_json::Map<String, serde_json::Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => {
            obj.insert(name.into(), s.into());
        }
        Err(_) => {
            obj.insert(format!("{name}_hex"), hex(bytes).into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line_with_text_or_hex() {
        let r = Record {
            topic: "outbox.event.order".into(),
            key: bytes::Bytes::from_static(b"o-1"),
            value: Some(bytes::Bytes::from_static(&[0xff, 0x00])),
            headers: vec![
                ("id".into(), bytes::Bytes::from_static(b"e-1")),
                ("lsn".into(), bytes::Bytes::from_static(b"0/16B3748")),
            ],
            ..Record::default()
        };
        let line = json_line(&r);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["topic"], "outbox.event.order");
        assert_eq!(v["key"], "o-1");
        assert_eq!(v["value_hex"], "ff00");
        assert!(v.get("value").is_none());
        assert_eq!(v["headers"][0], serde_json::json!(["id", "e-1"]));
        assert_eq!(v["lsn"], "0/16B3748");
    }
}
