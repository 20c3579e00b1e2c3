//! Column values turned into record parts beyond topic and payload: key and
//! value encodings, timestamps, partitions and W3C trace context.
//!
//! Pure functions over PostgreSQL's text output; which column feeds which part
//! is decided by the mapping in `outbox`.

use bytes::Bytes;

use super::HeaderName;
use crate::config::{KeyFormat, ValueFormat};

/// Type OIDs the mapping looks at.
pub(super) mod oid {
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    /// `unknown`: the type given to the string fields of a logical message.
    pub const UNKNOWN: u32 = 705;
    pub const VARCHAR: u32 = 1043;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// A readable name for the types users are likely to put in an outbox table.
pub(super) fn type_name(type_oid: u32) -> String {
    let name = match type_oid {
        oid::BYTEA => "bytea",
        oid::INT8 => "bigint",
        oid::INT2 => "smallint",
        oid::INT4 => "integer",
        oid::TEXT => "text",
        oid::JSON => "json",
        oid::UNKNOWN => "a JSON string",
        oid::VARCHAR => "character varying",
        oid::TIMESTAMP => "timestamp",
        oid::TIMESTAMPTZ => "timestamptz",
        oid::UUID => "uuid",
        oid::JSONB => "jsonb",
        1082 => "date",
        16 => "boolean",
        _ => return format!("of type oid {type_oid}"),
    };
    name.to_string()
}

/// How a timestamp column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimeKind {
    /// `timestamptz` (with offset), `timestamp` (UTC) or a message's ISO 8601 string.
    Text,
    /// An integer of milliseconds since the Unix epoch.
    EpochMillis,
}

impl TimeKind {
    pub(super) fn of(type_oid: u32) -> Option<TimeKind> {
        match type_oid {
            oid::TIMESTAMPTZ | oid::TIMESTAMP | oid::UNKNOWN => Some(TimeKind::Text),
            oid::INT8 | oid::INT4 | oid::INT2 => Some(TimeKind::EpochMillis),
            _ => None,
        }
    }

    /// Milliseconds since the Unix epoch, or None if `text` is not such a value.
    pub(super) fn millis(self, text: &[u8]) -> Option<i64> {
        let text = std::str::from_utf8(text).ok()?.trim();
        match self {
            TimeKind::EpochMillis => text.parse().ok(),
            TimeKind::Text => parse_timestamp_ms(text),
        }
    }
}

/// `YYYY-MM-DD[ T]HH:MM:SS[.f][Z|±HH[:MM[:SS]]]` (PostgreSQL's ISO output, or
/// RFC 3339) to milliseconds since the Unix epoch; no offset means UTC.
pub(super) fn parse_timestamp_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        (!part.is_empty() && part.bytes().all(|c| c.is_ascii_digit()))
            .then(|| part.parse().ok())
            .flatten()
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        millis = frac.parse::<i64>().ok()? * 10_i64.pow(3 - frac.len() as u32);
    }
    let offset_secs = match b.get(i) {
        None => 0,
        Some(b'Z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let rest: Vec<&str> = s[i + 1..].split(':').collect();
            if rest.is_empty() || rest.len() > 3 || rest.iter().any(|p| p.len() != 2) {
                return None;
            }
            let mut secs = 0;
            for (p, unit) in rest.iter().zip([3600, 60, 1]) {
                secs += p.parse::<i64>().ok()? * unit;
            }
            if sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        Some(_) => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 86_400 + h * 3600 + mi * 60 + sec) - offset_secs) * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 in UTC with milliseconds (`ce_time`).
pub(super) fn rfc3339_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

/// A partition number from a column's text.
pub(super) fn partition(text: &[u8]) -> Option<i32> {
    std::str::from_utf8(text)
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p >= 0)
}

/// `traceparent` and `tracestate` headers from a trace column: a bare
/// `traceparent`, or Java properties text (Debezium's `tracingspancontext`:
/// `key=value` lines, `#` comments) holding those keys. Values are carried
/// unchanged.
pub(super) fn trace_headers(text: &[u8], out: &mut Vec<(HeaderName, Bytes)>) {
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    if text.is_empty() {
        return;
    }
    if !text.contains(['=', '\n']) {
        out.push(("traceparent".into(), Bytes::from(text.to_string())));
        return;
    }
    for name in ["traceparent", "tracestate"] {
        let value = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with(['#', '!']))
            .filter_map(|l| l.split_once(['=', ':']))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim());
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            out.push((name.into(), Bytes::from(v.to_string())));
        }
    }
}

/// Key bytes in the configured format.
pub(super) fn encode_key(key: &Bytes, format: KeyFormat) -> Bytes {
    match format {
        KeyFormat::Raw => key.clone(),
        KeyFormat::JsonString => json_string(key),
    }
}

/// Value bytes in the configured format. `json_expanded` keeps a payload that
/// does not start with `{` or `[` or does not parse as a JSON string, as
/// Debezium's router does.
pub(super) fn encode_value(payload: Bytes, format: ValueFormat) -> Bytes {
    match format {
        ValueFormat::Raw => payload,
        ValueFormat::JsonString => json_string(&payload),
        ValueFormat::JsonExpanded => {
            if payload.starts_with(b"{") || payload.starts_with(b"[") {
                if let Some(compact) = minify_json(&payload) {
                    return compact;
                }
            }
            tracing::warn!("value_format = \"json_expanded\": payload is not a JSON object or array; sent as a JSON string");
            json_string(&payload)
        }
    }
}

fn json_string(b: &[u8]) -> Bytes {
    Bytes::from(serde_json::Value::String(String::from_utf8_lossy(b).into_owned()).to_string())
}

/// JSON without insignificant whitespace, keys and numbers exactly as written,
/// or None if `text` is not JSON.
fn minify_json(text: &[u8]) -> Option<Bytes> {
    serde_json::from_slice::<serde::de::IgnoredAny>(text).ok()?;
    let mut out = Vec::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for &c in text {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
            in_string = c == b'"';
            out.push(c);
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_as_postgresql_prints_them() {
        assert_eq!(parse_timestamp_ms("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(
            parse_timestamp_ms("2019-05-03 13:31:34.344+00"),
            Some(1_556_890_294_344)
        );
        assert_eq!(
            parse_timestamp_ms("2019-05-03 15:31:34.344567+02"),
            Some(1_556_890_294_344)
        );
        assert_eq!(
            parse_timestamp_ms("2019-05-03T09:01:34.344-04:30"),
            Some(1_556_890_294_344)
        );
        assert_eq!(
            parse_timestamp_ms("2019-05-03 13:31:34.3"),
            Some(1_556_890_294_300)
        );
        assert_eq!(
            parse_timestamp_ms("2019-05-03T13:31:34Z"),
            Some(1_556_890_294_000)
        );
        assert_eq!(parse_timestamp_ms("1969-12-31 23:59:59+00"), Some(-1000));
        for bad in [
            "",
            "infinity",
            "2019-13-01 00:00:00",
            "2019-05-03 13:31",
            "2019-05-03 13:31:34 BC",
            "2019-05-03 13:31:34+5",
        ] {
            assert_eq!(parse_timestamp_ms(bad), None, "{bad:?}");
        }
        assert_eq!(rfc3339_ms(1_556_890_294_344), "2019-05-03T13:31:34.344Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn trace_context_from_a_column() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = Vec::new();
        trace_headers(tp.as_bytes(), &mut h);
        assert_eq!(h, [("traceparent".into(), Bytes::from(tp))]);

        let props = format!("#Fri May 03 13:31:34 UTC 2019\ntraceparent={tp}\ntracestate=congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\n");
        let mut h = Vec::new();
        trace_headers(props.as_bytes(), &mut h);
        assert_eq!(
            h,
            [
                ("traceparent".into(), Bytes::from(tp)),
                (
                    "tracestate".into(),
                    Bytes::from("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
                )
            ]
        );
        let mut h = Vec::new();
        trace_headers(b"uber-trace-id=abc:def:0:1\n", &mut h);
        assert!(h.is_empty(), "no W3C keys, no headers");
    }

    #[test]
    fn value_formats_match_debeziums_converters() {
        let p =
            Bytes::from_static(br#"{"id": 1, "lineItems": [{"item": "a \"b\" c", "n": 2.50}]}"#);
        assert_eq!(encode_value(p.clone(), ValueFormat::Raw), p);
        assert_eq!(
            &encode_value(p.clone(), ValueFormat::JsonString)[..],
            br#""{\"id\": 1, \"lineItems\": [{\"item\": \"a \\\"b\\\" c\", \"n\": 2.50}]}""#
        );
        assert_eq!(
            &encode_value(p, ValueFormat::JsonExpanded)[..],
            br#"{"id":1,"lineItems":[{"item":"a \"b\" c","n":2.50}]}"#
        );
        assert_eq!(
            &encode_value(Bytes::from_static(b"plain text"), ValueFormat::JsonExpanded)[..],
            br#""plain text""#
        );
        assert_eq!(
            &encode_key(&Bytes::from_static(b"1"), KeyFormat::JsonString)[..],
            br#""1""#
        );
        assert_eq!(partition(b"2"), Some(2));
        assert_eq!(partition(b"-1"), None);
        assert_eq!(partition(b"x"), None);
    }
}
