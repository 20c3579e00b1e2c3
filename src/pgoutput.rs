//! Pure decoder for the `pgoutput` logical replication protocol (version 1).
//!
//! Bytes in, typed [`Message`]s out: no I/O, no knowledge of the outbox or of
//! Kafka. Column values are zero-copy slices of the received buffer. The
//! [`RelationCache`] keeps the latest `Relation` message per relation id, so a
//! relation re-sent after `ALTER TABLE` replaces the old description.

use std::collections::HashMap;

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A commit timestamp, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn from_pg_micros(v: i64) -> Self {
        Timestamp(v.saturating_add(PG_EPOCH_OFFSET_MICROS))
    }

    pub fn unix_micros(self) -> i64 {
        self.0
    }
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: Tuple,
    },
    Update {
        relation_id: u32,
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation_id: u32,
        old: Tuple,
    },
    Truncate {
        options: u8,
        relation_ids: Vec<u32>,
    },
    Message(LogicalMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the commit record (what pgoutput calls the final LSN).
    pub final_lsn: Lsn,
    pub commit_time: Timestamp,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm for this transaction.
    pub end_lsn: Lsn,
    pub commit_time: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

impl Relation {
    /// `namespace.name`, as users write it in the config.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A row image: one value per column of the relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value (only in UPDATE).
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Why a pgoutput message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message is truncated: needed {needed} more bytes while reading {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown pgoutput message tag {tag:?}")]
    UnknownTag { tag: char },
    #[error("unknown tuple column kind {kind:?} in pgoutput message")]
    UnknownColumnKind { kind: char },
    #[error("unexpected tuple marker {marker:?} in pgoutput {message} message")]
    UnexpectedTupleMarker { message: &'static str, marker: char },
    #[error("pgoutput string is not NUL-terminated or not UTF-8 while reading {what}")]
    BadString { what: &'static str },
    #[error("negative length {len} in pgoutput message while reading {what}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("{extra} trailing bytes after pgoutput {message} message")]
    Trailing { message: &'static str, extra: usize },
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n - self.buf.remaining(),
            });
        }
        Ok(())
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_i32())
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.buf.get_i64())
    }
    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.need(8, what)?;
        Ok(Lsn(self.buf.get_u64()))
    }
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::BadString { what })?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| DecodeError::BadString { what })?
            .to_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }
    fn bytes(&mut self, len: i32, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })?;
        self.need(len, what)?;
        Ok(self.buf.split_to(len))
    }
    fn finish(self, message: &'static str) -> Result<(), DecodeError> {
        match self.buf.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { message, extra }),
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.u16("tuple column count")?;
        let mut values = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let kind = self.u8("tuple column kind")?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.i32("text value length")?;
                    Value::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.i32("binary value length")?;
                    Value::Binary(self.bytes(len, "binary value")?)
                }
                other => {
                    return Err(DecodeError::UnknownColumnKind {
                        kind: other as char,
                    })
                }
            });
        }
        Ok(Tuple(values))
    }
}

/// Decodes one pgoutput message (the payload of an XLogData frame).
pub fn decode(buf: Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { buf };
    let tag = r.u8("message tag")?;
    let (msg, name) = match tag {
        b'B' => {
            let final_lsn = r.lsn("begin final LSN")?;
            let commit_time = Timestamp::from_pg_micros(r.i64("begin commit time")?);
            let xid = r.u32("begin xid")?;
            (
                Message::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                }),
                "Begin",
            )
        }
        b'C' => {
            let flags = r.u8("commit flags")?;
            let commit_lsn = r.lsn("commit LSN")?;
            let end_lsn = r.lsn("commit end LSN")?;
            let commit_time = Timestamp::from_pg_micros(r.i64("commit time")?);
            (
                Message::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                }),
                "Commit",
            )
        }
        b'O' => {
            let commit_lsn = r.lsn("origin commit LSN")?;
            let name = r.string("origin name")?;
            (Message::Origin { commit_lsn, name }, "Origin")
        }
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.string("relation namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("relation replica identity")?;
            let n = r.u16("relation column count")?;
            let mut columns = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.string("column name")?;
                let type_oid = r.u32("column type oid")?;
                let type_modifier = r.i32("column type modifier")?;
                columns.push(Column {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            (
                Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                }),
                "Relation",
            )
        }
        b'Y' => {
            let oid = r.u32("type oid")?;
            let namespace = r.string("type namespace")?;
            let name = r.string("type name")?;
            (
                Message::Type {
                    oid,
                    namespace,
                    name,
                },
                "Type",
            )
        }
        b'I' => {
            let relation_id = r.u32("insert relation id")?;
            match r.u8("insert tuple marker")? {
                b'N' => {}
                m => {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        message: "Insert",
                        marker: m as char,
                    })
                }
            }
            (
                Message::Insert {
                    relation_id,
                    new: r.tuple()?,
                },
                "Insert",
            )
        }
        b'U' => {
            let relation_id = r.u32("update relation id")?;
            let mut old = None;
            let mut marker = r.u8("update tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("update new tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedTupleMarker {
                    message: "Update",
                    marker: marker as char,
                });
            }
            (
                Message::Update {
                    relation_id,
                    old,
                    new: r.tuple()?,
                },
                "Update",
            )
        }
        b'D' => {
            let relation_id = r.u32("delete relation id")?;
            match r.u8("delete tuple marker")? {
                b'K' | b'O' => {}
                m => {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        message: "Delete",
                        marker: m as char,
                    })
                }
            }
            (
                Message::Delete {
                    relation_id,
                    old: r.tuple()?,
                },
                "Delete",
            )
        }
        b'T' => {
            let n = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let mut relation_ids = Vec::with_capacity((n as usize).min(r.buf.remaining() / 4));
            for _ in 0..n {
                relation_ids.push(r.u32("truncate relation id")?);
            }
            (
                Message::Truncate {
                    options,
                    relation_ids,
                },
                "Truncate",
            )
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.string("message prefix")?;
            let len = r.i32("message length")?;
            let content = r.bytes(len, "message content")?;
            (
                Message::Message(LogicalMessage {
                    transactional: flags & 1 == 1,
                    lsn,
                    prefix,
                    content,
                }),
                "Message",
            )
        }
        other => return Err(DecodeError::UnknownTag { tag: other as char }),
    };
    r.finish(name)?;
    Ok(msg)
}

/// The latest description of every relation seen on the stream.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

impl RelationCache {
    /// Stores a relation, replacing an earlier description with the same id.
    pub fn insert(&mut self, rel: Relation) {
        self.relations.insert(rel.id, rel);
    }

    pub fn get(&self, id: u32) -> Option<&Relation> {
        self.relations.get(&id)
    }

    pub fn clear(&mut self) {
        self.relations.clear();
    }
}

#[cfg(test)]
mod tests;
