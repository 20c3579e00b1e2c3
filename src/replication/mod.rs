//! The replication connection: a stream from `transport` (TCP, TLS or Unix
//! socket) speaking the PostgreSQL wire protocol in `replication=database` mode.
//!
//! Responsible for the startup message, authentication (trust, cleartext, MD5,
//! SCRAM-SHA-256; over TLS too, without channel binding), simple queries on the
//! replication connection, `START_REPLICATION ... LOGICAL`, CopyBoth framing, XLogData and
//! keepalive parsing, and standby status updates. It does not decode pgoutput
//! (see `pgoutput`) nor decide which LSN to confirm (see `ack`).

mod frame;
mod startup;

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

use crate::lsn::Lsn;

pub use frame::{parse_copy_data, split_frame, CopyData, FrameReader};
pub use startup::connect;

pub use crate::transport::BoxedTransport;

/// An error on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(transparent)]
    Connect(#[from] crate::transport::ConnectError),
    #[error("replication connection failed while {context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
    #[error("PostgreSQL closed the replication connection while {context}")]
    Closed { context: &'static str },
    #[error("{}", server_message(.severity, .code, .message, .detail, .hint))]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("authentication for user {user:?} failed: {message}")]
    Auth { user: String, message: String },
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// The replication connection reached another host of a multi-host URL
    /// than the SQL connection, one without the slot: retried.
    #[error("the replication connection reached a server without slot {slot:?} (the SQL connection found it on another host of postgres.url, e.g. during a failover); retrying")]
    NoSlotHere { slot: String },
}

fn server_message(
    severity: &str,
    code: &str,
    message: &str,
    detail: &Option<String>,
    hint: &Option<String>,
) -> String {
    let mut s = format!("PostgreSQL {} {code}: {message}", severity.to_lowercase());
    if let Some(d) = detail {
        s.push_str(&format!(" ({d})"));
    }
    if let Some(h) = hint {
        s.push_str(&format!("; hint: {h}"));
    }
    s
}

impl ReplicationError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// SQLSTATE 55000 "cannot use replication slot ... for logical decoding"
    /// with the detail "This replication slot is being synchronized from the
    /// primary server." (PostgreSQL 17+, `slot.c`): the host is a standby
    /// holding a failover slot's copy. The detail is the only distinction from
    /// an invalidated slot (same SQLSTATE); servers with translated messages
    /// are caught earlier by `setup`'s check of `pg_replication_slots.synced`.
    pub fn is_synced_slot(&self) -> bool {
        matches!(self, ReplicationError::Server { code, detail: Some(d), .. }
            if code == "55000" && d.contains("being synchronized from the primary"))
    }

    /// Another connection is streaming from the slot (SQLSTATE 55006).
    pub fn is_slot_in_use(&self) -> bool {
        self.sqlstate() == Some("55006")
    }

    /// Errors that will not go away by reconnecting: bad credentials, missing
    /// privileges, a missing or invalid slot or publication.
    pub fn is_permanent(&self) -> bool {
        match self {
            ReplicationError::Auth { .. } => true,
            ReplicationError::Connect(e) => e.is_permanent(),
            // A failover slot's copy on a standby that is not promoted yet:
            // the next attempt may reach the new primary.
            _ if self.is_synced_slot() => false,
            ReplicationError::Server { code, .. } => {
                // 28xxx auth, 42xxx (undefined object, privileges), 3D000 no database,
                // 55000 object not in prerequisite state (e.g. invalidated slot).
                code.starts_with("28")
                    || code.starts_with("42")
                    || code == "3D000"
                    || code == "55000"
            }
            _ => false,
        }
    }
}

/// One event on the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// WAL data: one pgoutput message starting at `start`.
    XLogData {
        start: Lsn,
        wal_end: Lsn,
        data: Bytes,
    },
    /// Primary keepalive: the server's WAL end; `reply` asks for a status update now.
    Keepalive { wal_end: Lsn, reply: bool },
}

/// The read side of a streaming replication connection.
pub struct StreamReader {
    frames: FrameReader<ReadHalf<BoxedTransport>>,
}

/// The write side: standby status updates and the end of the stream.
pub struct StatusWriter {
    io: WriteHalf<BoxedTransport>,
    buf: BytesMut,
    last_sent: Lsn,
}

/// Splits an authenticated connection that has entered CopyBoth mode.
pub(crate) fn streaming(frames: FrameReader<BoxedTransport>) -> (StreamReader, StatusWriter) {
    let (buffered, io) = frames.into_parts();
    let (r, w) = tokio::io::split(io);
    let reader = StreamReader {
        frames: FrameReader::with_buffer(r, buffered),
    };
    (
        reader,
        StatusWriter {
            io: w,
            buf: BytesMut::with_capacity(64),
            last_sent: Lsn::ZERO,
        },
    )
}

impl StreamReader {
    /// Next event of the stream; `None` when the server ended the copy stream.
    /// Cancel-safe: no data is lost if the future is dropped before completing.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, ReplicationError> {
        loop {
            let (tag, body) = self.frames.next("streaming").await?;
            if let Some(event) = event_of(tag, body) {
                return event;
            }
        }
    }

    /// Like [`StreamReader::next`] for an event that is already buffered
    /// completely: `None` when reading it would have to wait for the socket.
    /// Lets the caller handle everything one read brought in a single wake-up.
    pub fn next_buffered(&mut self) -> Option<Result<Option<StreamEvent>, ReplicationError>> {
        loop {
            match self.frames.buffered() {
                Err(e) => return Some(Err(e)),
                Ok(None) => return None,
                Ok(Some((tag, body))) => {
                    if let Some(event) = event_of(tag, body) {
                        return Some(event);
                    }
                }
            }
        }
    }
}

/// The event a streaming frame carries; `None` for a frame to skip (a notice).
fn event_of(tag: u8, body: Bytes) -> Option<Result<Option<StreamEvent>, ReplicationError>> {
    match tag {
        b'd' => Some(parse_copy_data(body).map(|c| Some(c.into_event()))),
        b'c' | b'C' | b'Z' => Some(Ok(None)),
        b'E' => Some(Err(frame::error_response(&body))),
        b'N' => {
            tracing::info!(notice = %frame::error_response(&body), "notice from PostgreSQL");
            None
        }
        other => Some(Err(ReplicationError::Protocol(format!(
            "unexpected message {:?} while streaming",
            other as char
        )))),
    }
}

impl CopyData {
    fn into_event(self) -> StreamEvent {
        match self {
            CopyData::XLogData {
                start,
                wal_end,
                data,
            } => StreamEvent::XLogData {
                start,
                wal_end,
                data,
            },
            CopyData::Keepalive { wal_end, reply } => StreamEvent::Keepalive { wal_end, reply },
        }
    }
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
fn pg_now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - 946_684_800_000_000
}

impl StatusWriter {
    /// The last position reported to the server.
    pub fn last_sent(&self) -> Lsn {
        self.last_sent
    }

    /// Never report less than `lsn` from now on (the slot's confirmed position).
    pub fn raise_floor(&mut self, lsn: Lsn) {
        self.last_sent = self.last_sent.max(lsn);
    }

    /// Sends a standby status update with `lsn` as written, flushed and applied
    /// position. A position lower than one sent before is raised to it: the
    /// server must never see the confirmed position go backwards.
    pub async fn send_status(
        &mut self,
        lsn: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let lsn = lsn.max(self.last_sent);
        self.buf.clear();
        self.buf.put_u8(b'd');
        self.buf.put_i32(4 + 1 + 8 * 4 + 1);
        self.buf.put_u8(b'r');
        for _ in 0..3 {
            self.buf.put_u64(lsn.0);
        }
        self.buf.put_i64(pg_now());
        self.buf.put_u8(u8::from(reply_requested));
        self.write_buf("sending a status update").await?;
        self.last_sent = lsn;
        Ok(())
    }

    /// Writes and flushes `self.buf`.
    async fn write_buf(&mut self, context: &'static str) -> Result<(), ReplicationError> {
        let io_err = |source| ReplicationError::Io { context, source };
        self.io.write_all(&self.buf).await.map_err(io_err)?;
        self.io.flush().await.map_err(io_err)
    }

    /// Ends the copy stream (CopyDone) so the server closes it cleanly.
    pub async fn copy_done(&mut self) -> Result<(), ReplicationError> {
        self.buf.clear();
        postgres_protocol::message::frontend::copy_done(&mut self.buf);
        self.write_buf("ending the stream").await
    }

    /// Says goodbye (Terminate) and closes the socket.
    pub async fn terminate(mut self) {
        self.buf.clear();
        postgres_protocol::message::frontend::terminate(&mut self.buf);
        let _ = self.io.write_all(&self.buf).await;
        let _ = self.io.shutdown().await;
    }
}

/// Reads the next `u64` LSN of a buffer (helper for frame parsing).
fn get_lsn(b: &mut Bytes) -> Lsn {
    Lsn(b.get_u64())
}
