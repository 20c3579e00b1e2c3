//! The Redis sink: `XADD` to a stream named by the record's topic, or
//! `PUBLISH` to a channel of that name (`redis.mode = "pubsub"`), on one
//! connection.
//!
//! One task owns the connection ([`TaskSink`]). It takes what waits in the
//! queue (up to `redis.pipeline_records`), sends it as one pipeline, followed
//! by `WAIT` when `redis.wait_replicas` is set, and reports each record once
//! its reply (and WAIT's) arrived. One pipeline is in flight at a time and the
//! next one forms meanwhile, so records reach the server in the order the
//! session sent them, for every key. A lost connection fails what was taken,
//! so the session ends at once and streams again from the slot with a new sink.
//!
//! The layout of an entry is documented in `docs/sinks/redis.md`. Not here:
//! which positions are confirmed (`ack`), the dead-letter policy (`relay`).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, ServerError, Value};
use tokio::sync::{mpsc, watch};

use super::task::{Item, Reporter, TaskSink};
use super::{json_line, DeliveryError, DeliveryReport, Refusal, SendError, SinkSetupError};
use crate::ack::Seq;
use crate::config::{RedisConfig, RedisMode};
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

const NAME: &str = "Redis";
/// Records waiting for the task; past this the session gets `QueueFull`.
const QUEUE: usize = 4096;
/// A pipeline stops growing past this many bytes of records (it holds at least one).
const PIPELINE_BYTES: u64 = 16 << 20;
/// With nothing to send for this long the task pings the server, so a dead
/// connection is noticed (and `/readyz` says so) while the outbox is quiet.
const IDLE_PING: Duration = Duration::from_secs(1);

/// Stream entry field of the record's key.
pub const FIELD_KEY: &str = "key";
/// Stream entry field of the record's value (absent for a tombstone).
pub const FIELD_VALUE: &str = "value";
/// Stream entry field of the record's timestamp, when the outbox has one.
pub const FIELD_TIMESTAMP: &str = "timestamp_ms";
/// Each header is a field of this prefix and its name.
pub const HEADER_PREFIX: &str = "header:";

/// The connection as the session's [`RedisSink::ready`] sees it.
#[derive(Debug, Clone)]
enum Conn {
    Connecting,
    Up,
    /// Why it failed; `config`: the user must change the configuration.
    Failed {
        why: String,
        config: bool,
    },
}

/// What the task needs from `[redis]`.
#[derive(Debug, Clone)]
struct Settings {
    mode: RedisMode,
    maxlen: Option<u64>,
    /// (replicas, timeout in ms) for `WAIT`.
    wait: Option<(u32, u64)>,
    max_record_bytes: u64,
    pipeline_records: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
}

pub struct RedisSink {
    inner: TaskSink,
    conn: watch::Receiver<Conn>,
}

impl RedisSink {
    /// Starts connecting in the background ([`RedisSink::ready`] waits for it).
    pub fn new(
        cfg: &RedisConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(RedisSink, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        let client = client(cfg)?;
        let settings = Settings {
            mode: cfg.mode,
            maxlen: cfg.maxlen,
            wait: (cfg.wait_replicas > 0).then_some((cfg.wait_replicas, cfg.wait_timeout_ms)),
            max_record_bytes: cfg.max_record_bytes,
            pipeline_records: cfg.pipeline_records,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            response_timeout: Duration::from_millis(cfg.response_timeout_ms),
        };
        let (state, conn) = watch::channel(Conn::Connecting);
        let (inner, reports) = TaskSink::spawn(NAME, QUEUE, metrics, move |items, reporter| {
            run(client, settings, items, reporter, state)
        });
        Ok((RedisSink { inner, conn }, reports))
    }

    /// Waits until the connection is up: an unreachable server is a
    /// `Connect` error (retried), an unusable configuration (credentials, a
    /// server without streams) a `Config` error (the relay stops).
    pub async fn ready(&self) -> Result<(), SinkSetupError> {
        let mut conn = self.conn.clone();
        let state = conn
            .wait_for(|c| !matches!(c, Conn::Connecting))
            .await
            .map(|c| c.clone());
        match (state, self.fatal_error()) {
            (Ok(Conn::Failed { why, config: true }), _) => Err(SinkSetupError::Config {
                sink: NAME,
                message: why,
            }),
            (Ok(Conn::Failed { why, .. }), _) | (_, Some(why)) => Err(SinkSetupError::Connect {
                sink: NAME,
                error: why,
            }),
            (Ok(_), None) => Ok(()),
            (Err(_), None) => Err(SinkSetupError::Connect {
                sink: NAME,
                error: "the sink's task stopped".into(),
            }),
        }
    }

    /// `Unavailable` once the connection is gone.
    pub fn check(&self) -> Result<(), SendError> {
        match self.inner.fatal_error() {
            Some(error) => Err(SendError::Unavailable { sink: NAME, error }),
            None => Ok(()),
        }
    }

    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        self.inner.send(seq, commit_time, record)
    }

    /// Why the connection is unusable, when a new one may do better: not for
    /// a configuration error (a new connection would fail the same way, and
    /// the relay stops with the error `ready` returned).
    pub fn fatal_error(&self) -> Option<String> {
        if matches!(*self.conn.borrow(), Conn::Failed { config: true, .. }) {
            return None;
        }
        self.inner.fatal_error()
    }

    pub fn queued(&self) -> i32 {
        self.inner.queued()
    }
}

fn config_error(message: String) -> SinkSetupError {
    SinkSetupError::Config {
        sink: NAME,
        message,
    }
}

/// The client for `redis.url` and the TLS files. Errors never contain the URL.
fn client(cfg: &RedisConfig) -> Result<Client, SinkSetupError> {
    let url = cfg
        .url
        .as_deref()
        .ok_or_else(|| config_error("redis.url is missing".into()))?;
    let tls = cfg.tls().clone();
    let client = if tls.ca.is_some() || tls.client.is_some() {
        Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: tls
                    .client
                    .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                root_cert: tls.ca,
            },
        )
    } else {
        Client::open(url)
    };
    client.map_err(|e| config_error(format!("redis.url or its TLS files: {e}")))
}

/// The task: connects, then publishes pipelines until the connection fails.
async fn run(
    client: Client,
    s: Settings,
    mut items: mpsc::Receiver<Item>,
    reporter: Reporter,
    state: watch::Sender<Conn>,
) -> Result<(), String> {
    let mut conn = match connect(&client, &s).await {
        Ok(conn) => conn,
        Err(failed) => {
            let why = match &failed {
                Conn::Failed { why, .. } => why.clone(),
                _ => unreachable!("connect fails with Failed"),
            };
            state.send_replace(failed);
            return Err(why);
        }
    };
    state.send_replace(Conn::Up);
    let mut batch: Vec<Item> = Vec::with_capacity(s.pipeline_records);
    let why = loop {
        let first = tokio::select! {
            item = items.recv() => match item {
                Some(item) => item,
                None => return Ok(()), // the sink was dropped
            },
            _ = tokio::time::sleep(IDLE_PING) => {
                match redis::cmd("PING").query_async::<Value>(&mut conn).await {
                    Ok(_) => continue,
                    Err(e) => break lost(&e, &s),
                }
            }
        };
        let mut bytes = record_size(&first.record);
        batch.push(first);
        while batch.len() < s.pipeline_records && bytes < PIPELINE_BYTES {
            match items.try_recv() {
                Ok(item) => {
                    bytes += record_size(&item.record);
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        if let Err(why) = publish(&mut conn, &s, &mut batch, &reporter).await {
            break why;
        }
    };
    // Every record taken and not reported fails now, so the session ends at
    // once (instead of waiting for reports that never come) and streams
    // again from the slot with a new sink.
    state.send_replace(Conn::Failed {
        why: why.clone(),
        config: false,
    });
    items.close();
    while let Ok(item) = items.try_recv() {
        batch.push(item);
    }
    for item in batch {
        reporter.failed(item.seq, retry(&item.record, why.clone()));
    }
    Err(why)
}

/// Connects and looks at the server: streams need Redis 5; without an
/// append-only file an acknowledged record is not on disk yet (warned).
async fn connect(client: &Client, s: &Settings) -> Result<MultiplexedConnection, Conn> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(s.connect_timeout))
        .set_response_timeout(Some(s.response_timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| {
            let config = e.kind() == ErrorKind::AuthenticationFailed;
            let hint = if config {
                "; check the user and password in redis.url"
            } else if e.is_timeout() {
                "; no answer within redis.connect_timeout_ms"
            } else if e.to_string().contains("certificate verify failed") {
                "; the server's certificate is not signed by redis.tls_ca_file (or, without it, a system CA), or does not name the host in redis.url"
            } else {
                ""
            };
            Conn::Failed {
                why: format!("{e}{hint}"),
                config,
            }
        })?;
    // INFO may be forbidden (ACL, renamed command): then nothing is checked.
    let info = match redis::cmd("INFO").query_async::<String>(&mut conn).await {
        Ok(info) => info,
        Err(e) if e.code() == Some("NOAUTH") => return Err(Conn::Failed {
            why: "the server requires a password (NOAUTH); put the user and password in redis.url"
                .into(),
            config: true,
        }),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the Redis server's INFO");
            return Ok(conn);
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let version = field("redis_version").unwrap_or("?");
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if s.mode == RedisMode::Stream && (1..5).contains(&major) {
        return Err(Conn::Failed {
            why: format!("the server runs Redis {version}, which has no streams (5.0 and later); upgrade it or set redis.mode = \"pubsub\""),
            config: true,
        });
    }
    if s.mode == RedisMode::Stream && field("aof_enabled") == Some("0") {
        tracing::warn!(
            version,
            "the Redis server runs without appendonly: a record it acknowledged is in memory only until its next snapshot, and a crash loses it; set appendonly yes and appendfsync always (docs/sinks/redis.md)"
        );
    }
    tracing::info!(version, mode = ?s.mode, "connected to Redis");
    Ok(conn)
}

/// Key, value and headers: what must fit in `redis.max_record_bytes`.
fn record_size(r: &Record) -> u64 {
    let headers: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (r.key.len() + r.value.as_ref().map_or(0, |v| v.len()) + headers) as u64
}

/// The command that writes `record`.
fn command(s: &Settings, record: &Record) -> redis::Cmd {
    match s.mode {
        RedisMode::Stream => {
            let mut c = redis::cmd("XADD");
            c.arg(&record.topic);
            if let Some(n) = s.maxlen {
                c.arg("MAXLEN").arg("~").arg(n);
            }
            c.arg("*").arg(FIELD_KEY).arg(&record.key[..]);
            for (name, value) in &record.headers {
                c.arg(format!("{HEADER_PREFIX}{name}")).arg(&value[..]);
            }
            if let Some(ms) = record.timestamp_ms {
                c.arg(FIELD_TIMESTAMP).arg(ms);
            }
            if let Some(value) = &record.value {
                c.arg(FIELD_VALUE).arg(&value[..]);
            }
            c
        }
        RedisMode::Pubsub => {
            let mut c = redis::cmd("PUBLISH");
            c.arg(&record.topic).arg(json_line(record));
            c
        }
    }
}

/// Sends `batch` as one pipeline and reports every record in it. An error
/// means the connection is unusable; `batch` is then left as it was.
async fn publish(
    conn: &mut MultiplexedConnection,
    s: &Settings,
    batch: &mut Vec<Item>,
    reporter: &Reporter,
) -> Result<(), String> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut sent = 0;
    for item in batch.iter() {
        if record_size(&item.record) <= s.max_record_bytes {
            pipe.add_command(command(s, &item.record));
            sent += 1;
        }
    }
    if let (Some((replicas, timeout_ms)), true) = (s.wait, sent > 0) {
        pipe.cmd("WAIT").arg(replicas).arg(timeout_ms);
    }
    let mut replies = if sent > 0 {
        pipe.query_async::<Vec<Value>>(conn)
            .await
            .map_err(|e| lost(&e, s))?
    } else {
        Vec::new()
    };
    // WAIT's answer holds back every record of the pipeline.
    let short = match s.wait {
        Some((want, timeout_ms)) if sent > 0 => match replies.pop() {
            Some(Value::Int(got)) if got >= i64::from(want) => None,
            Some(Value::Int(got)) => Some(format!(
                "WAIT: {got} of the {want} replicas (redis.wait_replicas) had the records within {timeout_ms} ms (redis.wait_timeout_ms)"
            )),
            other => Some(format!("unexpected reply to WAIT: {other:?}")),
        },
        _ => None,
    };
    if replies.len() != sent {
        return Err(format!(
            "{} replies to a pipeline of {sent} commands",
            replies.len()
        ));
    }
    let mut replies = replies.into_iter();
    for item in batch.drain(..) {
        let size = record_size(&item.record);
        if size > s.max_record_bytes {
            let error = format!(
                "the record has {size} bytes, more than redis.max_record_bytes ({}); raise it (and the server's proto-max-bulk-len) or shrink the payload",
                s.max_record_bytes
            );
            reporter.failed(item.seq, refused(item.record, "too_large", error));
            continue;
        }
        match (replies.next(), &short) {
            (Some(Value::ServerError(e)), _) => {
                let (reason, error) = server_error(&e, &item.record.topic);
                reporter.failed(
                    item.seq,
                    match reason {
                        Some(reason) => refused(item.record, reason, error),
                        None => retry(&item.record, error),
                    },
                );
            }
            (_, Some(why)) => reporter.failed(item.seq, retry(&item.record, why.clone())),
            (Some(_), None) => reporter.acked(&item),
            (None, None) => unreachable!("one reply per command, checked above"),
        }
    }
    Ok(())
}

/// Why a connection is unusable.
fn lost(e: &RedisError, s: &Settings) -> String {
    if e.is_timeout() {
        format!(
            "no reply within redis.response_timeout_ms ({} ms); the connection is dropped",
            s.response_timeout.as_millis()
        )
    } else {
        format!("connection lost: {e}")
    }
}

/// A failure retrying may fix: the session streams the record again.
fn retry(record: &Record, error: String) -> DeliveryError {
    DeliveryError {
        sink: NAME,
        topic: record.topic.clone(),
        error,
        refused: None,
    }
}

/// A record refused for good: `outbox.on_invalid` decides.
fn refused(record: Record, reason: &'static str, error: String) -> DeliveryError {
    DeliveryError {
        sink: NAME,
        topic: record.topic.clone(),
        error,
        refused: Some(Refusal {
            reason,
            original: Box::new(record),
        }),
    }
}

/// The server's error for one command: the dead-letter reason when it
/// refuses this record for good (None: retried), and the text with a hint.
fn server_error(e: &ServerError, topic: &str) -> (Option<&'static str>, String) {
    let code = e.code();
    let text = match e.details() {
        Some(d) => format!("{code} {d}"),
        None => code.to_string(),
    };
    let (reason, hint) = match code {
        "WRONGTYPE" => (
            Some("rejected"),
            format!("the key {topic:?} holds another type than a stream; rename or delete that key, or change outbox.topic"),
        ),
        "NOPERM" => (
            Some("rejected"),
            format!("the relay's Redis user may not write {topic:?}; grant it (ACL SETUSER <user> +xadd +publish ~{topic} &{topic})"),
        ),
        "OOM" => (
            None,
            "the server reached maxmemory; raise it, trim the streams (redis.maxlen) or let consumers catch up".into(),
        ),
        "READONLY" => (
            None,
            "redis.url points at a replica; point it at the primary".into(),
        ),
        "MOVED" | "ASK" | "CROSSSLOT" | "CLUSTERDOWN" => (
            None,
            "Redis Cluster is not supported; point redis.url at a standalone server".into(),
        ),
        _ => (None, String::new()),
    };
    if hint.is_empty() {
        (reason, text)
    } else {
        (reason, format!("{text}; {hint}"))
    }
}

#[cfg(test)]
mod tests;
