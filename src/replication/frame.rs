//! Wire-protocol framing: tag + length frames read from a socket, CopyData
//! payloads (XLogData, keepalive) and ErrorResponse fields.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{get_lsn, ReplicationError};
use crate::lsn::Lsn;

/// Largest frame accepted (PostgreSQL's own limit for a message is 1 GiB).
const MAX_FRAME: usize = 1 << 30;

/// Reads whole backend messages from a socket, as `(tag, body)`.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        FrameReader {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    pub fn with_buffer(io: R, buf: BytesMut) -> Self {
        FrameReader { io, buf }
    }

    pub fn into_parts(self) -> (BytesMut, R) {
        (self.buf, self.io)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// The next message if it is already buffered completely (no I/O).
    pub fn buffered(&mut self) -> Result<Option<(u8, Bytes)>, ReplicationError> {
        split_frame(&mut self.buf)
    }

    /// The next message. Cancel-safe: partial frames stay buffered.
    pub async fn next(&mut self, context: &'static str) -> Result<(u8, Bytes), ReplicationError> {
        loop {
            if let Some(frame) = split_frame(&mut self.buf)? {
                return Ok(frame);
            }
            if self.buf.capacity() - self.buf.len() < 8 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| ReplicationError::Io { context, source })?;
            if n == 0 {
                return Err(ReplicationError::Closed { context });
            }
        }
    }
}

/// Splits one complete frame off the front of `buf`, if there is one.
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, ReplicationError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| (4..=MAX_FRAME).contains(l))
        .ok_or_else(|| {
            ReplicationError::Protocol(format!(
                "invalid frame length {len} for message {:?}",
                tag as char
            ))
        })?;
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(1 + len).freeze();
    frame.advance(5);
    Ok(Some((tag, frame)))
}

/// A CopyData payload of the replication protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyData {
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        reply: bool,
    },
}

/// Parses a CopyData payload: `w` XLogData or `k` primary keepalive.
pub fn parse_copy_data(mut body: Bytes) -> Result<CopyData, ReplicationError> {
    let short = |what: &str| ReplicationError::Protocol(format!("truncated {what} message"));
    match body.first() {
        Some(b'w') => {
            if body.len() < 25 {
                return Err(short("XLogData"));
            }
            body.advance(1);
            let start = get_lsn(&mut body);
            let wal_end = get_lsn(&mut body);
            let _send_time = body.get_i64();
            Ok(CopyData::XLogData {
                start,
                wal_end,
                data: body,
            })
        }
        Some(b'k') => {
            if body.len() < 18 {
                return Err(short("keepalive"));
            }
            body.advance(1);
            let wal_end = get_lsn(&mut body);
            let _send_time = body.get_i64();
            Ok(CopyData::Keepalive {
                wal_end,
                reply: body.get_u8() == 1,
            })
        }
        Some(other) => Err(ReplicationError::Protocol(format!(
            "unknown CopyData kind {:?}",
            *other as char
        ))),
        None => Err(ReplicationError::Protocol("empty CopyData message".into())),
    }
}

/// Turns an ErrorResponse (or NoticeResponse) body into an error with its SQLSTATE.
pub fn error_response(body: &[u8]) -> ReplicationError {
    let (mut severity, mut code, mut message, mut detail, mut hint) = (
        String::from("ERROR"),
        String::new(),
        String::new(),
        None,
        None,
    );
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'V' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    // An invalidated slot (55000, "... has been invalidated because it exceeded
    // the maximum reserved size"): say that events may be missing and what to do.
    let invalidated = |s: &str| s.contains("invalidated");
    if code == "55000" && (invalidated(&message) || detail.as_deref().is_some_and(invalidated)) {
        if let Some(slot) = message.split('"').nth(1) {
            hint = Some(crate::setup::lost_slot_advice(slot));
        }
    }
    ReplicationError::Server {
        severity,
        code,
        message,
        detail,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn splits_frames_across_partial_reads() {
        let mut wire = BytesMut::new();
        wire.put_u8(b'd');
        wire.put_i32(4 + 3);
        wire.put_slice(b"abc");
        wire.put_u8(b'Z');
        wire.put_i32(5);
        wire.put_u8(b'I');
        let all = wire.freeze();
        for cut in 0..all.len() {
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = split_frame(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = split_frame(&mut buf).unwrap() {
                got.push(f);
            }
            assert_eq!(
                got,
                vec![
                    (b'd', Bytes::from_static(b"abc")),
                    (b'Z', Bytes::from_static(b"I"))
                ]
            );
        }
    }

    #[test]
    fn rejects_impossible_lengths() {
        for len in [-1i32, 0, 3, i32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_u8(b'd');
            buf.put_i32(len);
            assert!(split_frame(&mut buf).is_err(), "{len}");
        }
    }

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(0x10);
        w.put_u64(0x20);
        w.put_i64(0);
        w.put_slice(b"B...");
        assert_eq!(
            parse_copy_data(w.freeze()).unwrap(),
            CopyData::XLogData {
                start: Lsn(0x10),
                wal_end: Lsn(0x20),
                data: Bytes::from_static(b"B...")
            }
        );
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x30);
        k.put_i64(0);
        k.put_u8(1);
        assert_eq!(
            parse_copy_data(k.freeze()).unwrap(),
            CopyData::Keepalive {
                wal_end: Lsn(0x30),
                reply: true
            }
        );
        for bad in [&b""[..], b"w123", b"k1", b"x"] {
            assert!(parse_copy_data(Bytes::copy_from_slice(bad)).is_err());
        }
    }

    #[test]
    fn an_invalidated_slot_says_events_may_be_missing_and_how_to_recover() {
        let body = b"SERROR\0VERROR\0C55000\0Mcan no longer get changes from replication slot \"s1\"\0DThis slot has been invalidated because it exceeded the maximum reserved size.\0\0";
        let err = error_response(body);
        assert!(err.is_permanent());
        let msg = err.to_string();
        assert!(
            msg.contains("may be missing from Kafka")
                && msg.contains("pg_drop_replication_slot('s1')")
                && msg.contains("outbox-relay init"),
            "{msg}"
        );
        // Other 55000 errors keep their own text.
        let other =
            error_response(b"SERROR\0C55000\0Mlogical decoding requires wal_level >= logical\0\0");
        assert!(!other.to_string().contains("hint"), "{other}");
    }

    #[test]
    fn error_response_keeps_sqlstate_and_hint() {
        let body =
            b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 42\0Hstop it\0\0";
        let err = error_response(body);
        assert!(err.is_slot_in_use());
        assert_eq!(
            err.to_string(),
            "PostgreSQL error 55006: replication slot \"s\" is active for PID 42; hint: stop it"
        );
    }
}
