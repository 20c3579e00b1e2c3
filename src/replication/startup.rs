//! Opening a replication connection: startup message (over the stream from
//! `transport`), authentication, simple queries and `START_REPLICATION`.

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;

use super::frame::{error_response, FrameReader};
use super::{streaming, BoxedTransport, ReplicationError, StatusWriter, StreamReader};
use crate::config::{quote_ident, quote_literal};
use crate::lsn::Lsn;
use crate::transport::{self, HostOutcome, PgTarget, ServerState};

/// An authenticated connection in `replication=database` mode, ready for commands.
pub struct ReplicationConnection {
    frames: FrameReader<BoxedTransport>,
    user: String,
    /// `in_hot_standby` and `default_transaction_read_only` as reported at startup.
    in_hot_standby: Option<String>,
    read_only: Option<String>,
}

fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> ReplicationError {
    move |source| ReplicationError::Io { context, source }
}

/// Connects and authenticates a replication connection to the first host of
/// `target` that is of the kind its `target_session_attrs` asks for.
pub async fn connect(target: &PgTarget) -> Result<ReplicationConnection, ReplicationError> {
    transport::connect_any(target, |io| async move {
        match startup(target, io).await {
            Ok(conn) => {
                let state = ServerState::from_parameters(
                    conn.in_hot_standby.as_deref(),
                    conn.read_only.as_deref(),
                );
                HostOutcome::Connected(conn, state)
            }
            // Starting up, shutting down or in recovery without hot standby,
            // or gone: the next host may serve.
            Err(e) if e.sqlstate() == Some("57P03") || !e.is_permanent() => HostOutcome::Next(e),
            Err(e) => HostOutcome::Fail(e),
        }
    })
    .await
}

async fn startup(
    target: &PgTarget,
    mut io: BoxedTransport,
) -> Result<ReplicationConnection, ReplicationError> {
    let cfg = &target.config;
    let user = cfg.get_user().unwrap_or("postgres").to_string();
    let dbname = cfg.get_dbname().unwrap_or(&user).to_string();
    let mut buf = BytesMut::new();
    let mut params = vec![
        ("user", user.as_str()),
        ("database", dbname.as_str()),
        ("replication", "database"),
    ];
    if let Some(app) = cfg.get_application_name() {
        params.push(("application_name", app));
    }
    frontend::startup_message(params, &mut buf).map_err(io_err("sending the startup message"))?;
    io.write_all(&buf)
        .await
        .map_err(io_err("sending the startup message"))?;
    let mut conn = ReplicationConnection {
        frames: FrameReader::new(io),
        user,
        in_hot_standby: None,
        read_only: None,
    };
    conn.authenticate(cfg.get_password()).await?;
    Ok(conn)
}

impl ReplicationConnection {
    async fn send(
        &mut self,
        buf: &BytesMut,
        context: &'static str,
    ) -> Result<(), ReplicationError> {
        self.frames
            .get_mut()
            .write_all(buf)
            .await
            .map_err(io_err(context))
    }

    fn auth_error(&self, message: impl Into<String>) -> ReplicationError {
        ReplicationError::Auth {
            user: self.user.clone(),
            message: message.into(),
        }
    }

    async fn authenticate(&mut self, password: Option<&[u8]>) -> Result<(), ReplicationError> {
        let need_password = |this: &Self| {
            password.ok_or_else(|| {
                this.auth_error("the server asks for a password and the connection string has none; add it to postgres.url or OUTBOX_RELAY_POSTGRES_URL")
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, mut body) = self.frames.next("authenticating").await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(ReplicationError::Protocol(
                            "truncated authentication request".into(),
                        ));
                    }
                    let mut buf = BytesMut::new();
                    match body.get_i32() {
                        0 => continue,
                        3 => {
                            frontend::password_message(need_password(self)?, &mut buf).map_err(io_err("sending the password"))?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(ReplicationError::Protocol("truncated MD5 salt".into()));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(self.user.as_bytes(), need_password(self)?, salt);
                            frontend::password_message(hash.as_bytes(), &mut buf).map_err(io_err("sending the password"))?;
                        }
                        10 => {
                            let offers_scram = body.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256");
                            if !offers_scram {
                                return Err(self.auth_error("the server offers no SASL mechanism this relay supports (SCRAM-SHA-256)"));
                            }
                            let s = sasl::ScramSha256::new(need_password(self)?, sasl::ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut buf)
                                .map_err(io_err("sending the SASL response"))?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL continue without SASL start".into()))?;
                            s.update(&body).map_err(|e| self.auth_error(format!("SCRAM exchange failed: {e}")))?;
                            frontend::sasl_response(s.message(), &mut buf).map_err(io_err("sending the SASL response"))?;
                        }
                        12 => {
                            let s = scram.as_mut().ok_or_else(|| ReplicationError::Protocol("SASL final without SASL start".into()))?;
                            s.finish(&body).map_err(|e| self.auth_error(format!("server SCRAM signature is invalid: {e}")))?;
                            continue;
                        }
                        other => {
                            return Err(self.auth_error(format!(
                                "the server asks for authentication method {other}, which this relay does not support (use scram-sha-256, md5, password or trust)"
                            )))
                        }
                    }
                    self.send(&buf, "authenticating").await?;
                }
                b'E' => {
                    let err = error_response(&body);
                    return Err(match err.sqlstate() {
                        Some(c) if c.starts_with("28") => {
                            let mut message = err.to_string();
                            if let ReplicationError::Server {
                                code, message: m, ..
                            } = &err
                            {
                                if let Some(hint) = transport::refusal_hint(code, m) {
                                    message = format!("{message}; {hint}");
                                }
                            }
                            self.auth_error(message)
                        }
                        _ => err,
                    });
                }
                b'S' => {
                    let mut fields = body.split(|b| *b == 0);
                    let name = fields.next().unwrap_or_default();
                    let value = fields
                        .next()
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    match name {
                        b"in_hot_standby" => self.in_hot_standby = value,
                        b"default_transaction_read_only" => self.read_only = value,
                        _ => {}
                    }
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        other as char
                    )))
                }
            }
        }
    }

    /// Runs a replication command or query; returns the rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(io_err("sending a query"))?;
        self.send(&buf, "sending a query").await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = self.frames.next("reading a query result").await?;
            match tag {
                b'D' => rows.push(parse_data_row(&body)?),
                b'E' => error = Some(error_response(&body)),
                b'Z' => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    /// Creates a pgoutput slot that PostgreSQL drops when this connection ends.
    pub async fn create_temporary_slot(&mut self, slot: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        ))
        .await
        .map(drop)
    }

    /// The slot's `confirmed_flush_lsn` on this server (`0/0` if it has none
    /// yet); `None` if the slot does not exist here.
    pub async fn confirmed_flush(&mut self, slot: &str) -> Result<Option<Lsn>, ReplicationError> {
        let rows = self
            .simple_query(&format!(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ))
            .await?;
        Ok(rows.first().map(|row| {
            row.first()
                .cloned()
                .flatten()
                .and_then(|l| l.parse().ok())
                .unwrap_or(Lsn::ZERO)
        }))
    }

    /// Makes a slot a failover slot or an ordinary one (PostgreSQL 17+).
    pub async fn set_failover(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER {failover})",
            quote_ident(slot)
        ))
        .await
        .map(drop)
    }

    /// `START_REPLICATION SLOT .. LOGICAL ..` with pgoutput protocol version 1.
    /// Returns the two halves of the stream once the server is in CopyBoth mode.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<(StreamReader, StatusWriter), ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf).map_err(io_err("starting replication"))?;
        self.send(&buf, "starting replication").await?;
        loop {
            let (tag, body) = self.frames.next("starting replication").await?;
            match tag {
                b'W' => return Ok(streaming(self.frames)),
                b'E' => return Err(error_response(&body)),
                b'N' => tracing::info!(notice = %error_response(&body), "notice from PostgreSQL"),
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
    }
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplicationError> {
    let bad = || ReplicationError::Protocol("malformed DataRow".into());
    let mut b = body;
    if b.len() < 2 {
        return Err(bad());
    }
    let n = b.get_i16();
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return Err(bad());
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return Err(bad());
        }
        out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b.advance(len);
    }
    Ok(out)
}
