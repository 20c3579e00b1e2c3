//! The NATS JetStream sink: each record is published to the subject named by
//! its topic, with its headers as NATS headers, its key in the `key` header and
//! its event id as `Nats-Msg-Id` (JetStream drops a copy re-sent within the
//! stream's `duplicate_window`). A record counts as delivered only once its
//! PubAck arrived, i.e. once the stream stored it.
//!
//! Publishing is pipelined on one connection: records leave in the order the
//! session sent them, up to `nats.max_outstanding` wait for their PubAck, and
//! they are reported in that order. The connection is never re-established:
//! what the client had written when a connection broke may be lost while what
//! it sent after reconnecting would be stored, a later record of a key ahead
//! of an earlier one. So a lost connection, a PubAck timeout or a stream
//! error ends the sink ([`TaskSink`]): the run loop makes a new one and
//! streams again from the slot, and `Nats-Msg-Id` drops what had been stored.
//!
//! Not here: which subjects exist (streams are the user's, unless
//! `nats.create_stream`), and what is confirmed (`ack`).

use std::collections::{HashSet, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, stream, ErrorCode};
use async_nats::{ConnectErrorKind, Event};
use tokio::sync::{mpsc, watch};

use super::task::{Item, Reporter, TaskSink};
use super::{DeliveryError, DeliveryReport, Refusal, SendError, SinkSetupError};
use crate::ack::Seq;
use crate::config::NatsConfig;
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

const SINK: &str = "NATS";
/// The header carrying the record's key (NATS messages have no key).
pub const KEY_HEADER: &str = "key";
/// The header carrying the record's timestamp (milliseconds since the epoch),
/// when the outbox has a timestamp column.
pub const TIMESTAMP_HEADER: &str = "timestamp_ms";
/// The server's `max_payload` until it told its own (its default, 1 MiB).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Where the connection stands, as `ensure_topic` sees it.
#[derive(Clone)]
enum Conn {
    Connecting,
    Up(jetstream::Context),
    /// Why connecting failed, and whether the user must fix it (credentials, TLS).
    Failed {
        error: String,
        config: bool,
    },
}

/// `nats.create_stream`: the stream that captures every subject published to.
struct StreamSettings {
    name: String,
    duplicate_window: Duration,
}

pub struct NatsSink {
    task: TaskSink,
    conn: watch::Receiver<Conn>,
    max_payload: Arc<AtomicUsize>,
    create: Option<StreamSettings>,
    /// Subjects `ensure_topic` has seen (and, with `create`, made sure a stream captures).
    ensured: HashSet<String>,
}

/// What the connection's event callback tells the publishing task.
#[derive(Default)]
struct Events {
    /// Set once the connection broke.
    lost: watch::Sender<bool>,
    /// The server's last `-ERR` (a permissions violation names the subject).
    last_server_error: Mutex<Option<String>>,
}

impl NatsSink {
    pub fn new(
        cfg: &NatsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(NatsSink, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        let servers = cfg.servers().map_err(|message| SinkSetupError::Config {
            sink: SINK,
            message: format!("nats.url: {message}"),
        })?;
        let (conn_tx, conn) = watch::channel(Conn::Connecting);
        let max_payload = Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD));
        let publisher = Publisher {
            cfg: cfg.clone(),
            servers,
            conn: conn_tx,
            max_payload: max_payload.clone(),
            metrics: metrics.clone(),
        };
        let (task, reports) =
            TaskSink::spawn(SINK, cfg.max_outstanding, metrics, |rx, reporter| {
                publisher.run(rx, reporter)
            });
        let create = cfg.create_stream.then(|| StreamSettings {
            name: cfg.stream.clone(),
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        });
        Ok((
            NatsSink {
                task,
                conn,
                max_payload,
                create,
                ensured: HashSet::new(),
            },
            reports,
        ))
    }

    /// With `nats.create_stream`, makes sure the stream captures `topic`
    /// (once per subject); waits for the connection first.
    pub async fn ensure_topic(&mut self, topic: &str) -> Result<(), SinkSetupError> {
        if self.ensured.contains(topic) {
            return Ok(());
        }
        let ctx = self.connected().await?;
        if let Some(s) = &self.create {
            ensure_stream(&ctx, s, topic)
                .await
                .map_err(|error| SinkSetupError::CreateTopic {
                    topic: topic.to_string(),
                    error,
                })?;
        }
        self.ensured.insert(topic.to_string());
        Ok(())
    }

    /// Waits until the first connection is up, or says why it failed:
    /// `Config` for what the user must fix (credentials, TLS), else `Connect`.
    pub async fn ready(&mut self) -> Result<(), SinkSetupError> {
        self.connected().await.map(|_| ())
    }

    async fn connected(&mut self) -> Result<jetstream::Context, SinkSetupError> {
        let conn = match self.conn.wait_for(|c| !matches!(c, Conn::Connecting)).await {
            Ok(c) => c.clone(),
            Err(_) => Conn::Failed {
                error: self
                    .task
                    .fatal_error()
                    .unwrap_or_else(|| "the connection task stopped".into()),
                config: false,
            },
        };
        match conn {
            Conn::Up(ctx) => Ok(ctx),
            Conn::Failed {
                error,
                config: true,
            } => Err(SinkSetupError::Config {
                sink: SINK,
                message: error,
            }),
            Conn::Failed { error, .. } => Err(SinkSetupError::Connect { sink: SINK, error }),
            Conn::Connecting => Err(SinkSetupError::Connect {
                sink: SINK,
                error: "still connecting".into(),
            }),
        }
    }

    /// Takes a record, or refuses one JetStream could never store (too large
    /// for the server, an invalid subject or header).
    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        let refused = |reason: &'static str, error: String| SendError::Refused {
            sink: SINK,
            topic: record.topic.clone(),
            reason,
            error,
        };
        if !valid_subject(&record.topic) {
            return Err(refused(
                "rejected",
                "not a valid NATS subject (an empty token between dots); change outbox.topic"
                    .into(),
            ));
        }
        let headers = headers(record).map_err(|e| refused("rejected", e))?;
        let size = message_size(&headers, record);
        let max = self.max_payload.load(Ordering::Relaxed);
        if size > max {
            return Err(refused(
                "too_large",
                format!("the message is {size} bytes with its headers, above the server's max_payload of {max}; raise max_payload in the server's configuration or shrink the payload"),
            ));
        }
        self.task.send(seq, commit_time, record)
    }

    pub fn fatal_error(&self) -> Option<String> {
        self.task.fatal_error()
    }

    pub fn queued(&self) -> i32 {
        self.task.queued()
    }
}

/// A subject the server accepts for a publish: no empty token (the relay's
/// topics never hold spaces or wildcards).
fn valid_subject(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(|t| !t.is_empty())
}

/// The record's headers, then `key`, `timestamp_ms` and `Nats-Msg-Id` (the last `id` header).
fn headers(record: &Record) -> Result<HeaderMap, String> {
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
fn message_size(headers: &HeaderMap, record: &Record) -> usize {
    let mut size = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        for v in values {
            size += AsRef::<str>::as_ref(name).len() + 2 + v.as_str().len() + 2;
        }
    }
    size + record.value.as_ref().map_or(0, |v| v.len())
}

/// Whether the stream subject `pattern` captures `subject`.
fn captures(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// `nats.create_stream`: creates the stream with `subject`, or adds `subject`
/// to it unless one of its subjects captures it already.
async fn ensure_stream(
    ctx: &jetstream::Context,
    s: &StreamSettings,
    subject: &str,
) -> Result<(), String> {
    let wanted = stream::Config {
        name: s.name.clone(),
        subjects: vec![subject.to_string()],
        storage: stream::StorageType::File,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    };
    let mut stream = ctx
        .get_or_create_stream(wanted)
        .await
        .map_err(|e| format!("cannot create or read stream {:?}: {e}", s.name))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("cannot read stream {:?}: {e}", s.name))?;
    if info.config.subjects.iter().any(|p| captures(p, subject)) {
        return Ok(());
    }
    let mut config = info.config.clone();
    config.subjects.push(subject.to_string());
    ctx.update_stream(config)
        .await
        .map_err(|e| format!("cannot add subject {subject:?} to stream {:?}: {e} (another stream may capture it: then set nats.create_stream = false)", s.name))?;
    tracing::info!(stream = %s.name, subject, "added subject to stream (nats.create_stream)");
    Ok(())
}

/// User name and password, or a token, from the URL (`user:pass@` or `token@`).
#[derive(Clone, Default)]
struct Credentials {
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

fn credentials(servers: &[async_nats::ServerAddr]) -> Credentials {
    let Some(s) = servers.iter().find(|s| s.username().is_some()) else {
        return Credentials::default();
    };
    let user = s.username().map(percent_decode);
    match s.password() {
        Some(p) => Credentials {
            user,
            password: Some(percent_decode(p)),
            token: None,
        },
        None => Credentials {
            token: user,
            ..Credentials::default()
        },
    }
}

/// Decodes `%XX` escapes of a URL's user-info part.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The task's side: connects, publishes, reports.
struct Publisher {
    cfg: NatsConfig,
    servers: Vec<async_nats::ServerAddr>,
    conn: watch::Sender<Conn>,
    max_payload: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

type AckFuture = Pin<Box<dyn Future<Output = Result<PublishAck, PublishError>> + Send>>;

impl Publisher {
    async fn connect(&self, events: Arc<Events>) -> Result<async_nats::Client, Conn> {
        let creds = credentials(&self.servers);
        // Credentials for the first connection only: a reconnect is refused
        // (see the module comment), and after as many attempts as there are
        // servers the client gives up and the task ends.
        let established = Arc::new(AtomicBool::new(false));
        let once = established.clone();
        let metrics = self.metrics.clone();
        let mut opts = async_nats::ConnectOptions::with_auth_callback(move |_nonce| {
            let (creds, once) = (creds.clone(), once.clone());
            async move {
                if once.load(Ordering::SeqCst) {
                    return Err(async_nats::AuthError::new(
                        "the relay does not reuse a broken connection",
                    ));
                }
                let mut auth = async_nats::Auth::new();
                auth.username = creds.user;
                auth.password = creds.password;
                auth.token = creds.token;
                Ok(auth)
            }
        })
        .name("outbox-relay")
        .connection_timeout(self.cfg.connect_timeout())
        .ignore_discovered_servers()
        .max_reconnects(self.servers.len())
        .require_tls(self.cfg.tls_required)
        .event_callback(move |event| {
            let (events, metrics) = (events.clone(), metrics.clone());
            async move {
                match event {
                    Event::Disconnected | Event::Closed => {
                        events.lost.send_replace(true);
                    }
                    Event::ServerError(e) => {
                        metrics.error("nats_client");
                        tracing::warn!(error = %e, "NATS server error");
                        *events
                            .last_server_error
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    }
                    Event::ClientError(e) => {
                        metrics.error("nats_client");
                        tracing::debug!(error = %e, "NATS client error");
                    }
                    _ => {}
                }
            }
        });
        if let Some(ca) = &self.cfg.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.cfg.tls_cert_file, &self.cfg.tls_key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let client = opts
            .connect(self.servers.clone())
            .await
            .map_err(|e| {
                let (config, hint) = match e.kind() {
                    ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                        (true, "; check the credentials in nats.url (nats://user:password@host or nats://token@host)")
                    }
                    ConnectErrorKind::Tls => (
                        true,
                        "; check nats.tls_ca_file, nats.tls_cert_file and nats.tls_key_file and the server's certificate",
                    ),
                    ConnectErrorKind::TimedOut => (false, "; raise nats.connect_timeout_ms or check the network"),
                    _ => (false, "; is the server running and nats.url right?"),
                };
                Conn::Failed {
                    error: format!("{e}{hint}"),
                    config,
                }
            })?;
        established.store(true, Ordering::SeqCst);
        Ok(client)
    }

    /// The task: returns only when the sink can no longer be used.
    async fn run(self, mut rx: mpsc::Receiver<Item>, reporter: Reporter) -> Result<(), String> {
        let events = Arc::new(Events::default());
        let mut lost = events.lost.subscribe();
        let client = match self.connect(events.clone()).await {
            Ok(c) => c,
            Err(failed) => {
                let (why, config) = match &failed {
                    Conn::Failed { error, config } => (error.clone(), *config),
                    Conn::Connecting | Conn::Up(_) => (String::new(), false),
                };
                self.conn.send_replace(failed);
                if config {
                    // Credentials or TLS the user must fix: `ready` says so and
                    // the relay stops (exit 2). A task that ended would make the
                    // run loop take the sink for broken and retry instead.
                    std::future::pending::<()>().await;
                }
                return Err(format!("cannot connect to NATS: {why}"));
            }
        };
        let info = client.server_info();
        self.max_payload.store(info.max_payload, Ordering::Relaxed);
        tracing::info!(server = %info.server_name, version = %info.version, max_payload = info.max_payload, "connected to NATS");
        let max = self.cfg.max_outstanding;
        let ctx = jetstream::ContextBuilder::new()
            .timeout(self.cfg.ack_timeout())
            .max_ack_inflight(max)
            .backpressure_on_inflight(true)
            .build(client);
        self.conn.send_replace(Conn::Up(ctx.clone()));
        let mut inflight: VecDeque<(Item, AckFuture)> = VecDeque::with_capacity(max);
        loop {
            let waiting = !inflight.is_empty();
            let room = inflight.len() < max;
            tokio::select! {
                biased;
                _ = async { lost.wait_for(|l| *l).await.map(|_| ()) } => {
                    return Err("the connection to NATS was lost; the records not acknowledged are sent again from the slot".into());
                }
                res = async { (&mut inflight.front_mut().expect("waiting").1).await }, if waiting => {
                    let (item, _) = inflight.pop_front().expect("waiting");
                    match res {
                        Ok(_) => reporter.acked(&item),
                        Err(e) => {
                            let last = events.last_server_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            let (error, permanent) = classify(&e, &item.record.topic, &self.cfg, last);
                            let topic = item.record.topic.clone();
                            let refused = permanent.map(|reason| Refusal { reason, original: Box::new(item.record) });
                            let stop = refused.is_none();
                            reporter.failed(item.seq, DeliveryError { sink: SINK, topic, error: error.clone(), refused });
                            if stop {
                                return Err(error);
                            }
                        }
                    }
                }
                item = rx.recv(), if room => {
                    let Some(item) = item else { return Ok(()) };
                    // Checked in `send`: cannot fail here.
                    let headers = headers(&item.record).unwrap_or_default();
                    let payload = item.record.value.clone().unwrap_or_default();
                    let subject = item.record.topic.clone();
                    match ctx.publish_with_headers(subject, headers, payload).await {
                        Ok(ack) => inflight.push_back((item, Box::pin(ack.into_future()))),
                        Err(e) => return Err(format!("cannot publish to {:?}: {e}", item.record.topic)),
                    }
                }
            }
        }
    }
}

/// What a failed publish means: the error text, and the dead-letter reason
/// when JetStream refuses this record for good (retrying cannot help).
fn classify(
    e: &PublishError,
    subject: &str,
    cfg: &NatsConfig,
    last_server_error: Option<String>,
) -> (String, Option<&'static str>) {
    match e.kind() {
        PublishErrorKind::StreamNotFound => (
            format!("no JetStream stream captures subject {subject:?} (no responders); create a stream whose subjects include it (e.g. nats stream add OUTBOX --subjects '{subject}') or set nats.create_stream = true"),
            None,
        ),
        PublishErrorKind::TimedOut => {
            let server = last_server_error
                .map(|e| format!(" (the server's last error: {e})"))
                .unwrap_or_default();
            (
                format!("no PubAck within nats.ack_timeout_ms ({} ms){server}", cfg.ack_timeout_ms),
                None,
            )
        }
        _ => {
            let js = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>());
            match js.map(|j| j.error_code()) {
                Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => (
                    format!("{e}: {}; raise the stream's max_msg_size or shrink the payload", js.map(ToString::to_string).unwrap_or_default()),
                    Some("too_large"),
                ),
                _ => (
                    match js {
                        Some(j) => format!("{e}: {j}"),
                        None => e.to_string(),
                    },
                    None,
                ),
            }
        }
    }
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
    fn subjects_and_stream_patterns() {
        assert!(valid_subject("outbox.event.order"));
        assert!(!valid_subject("outbox..order"));
        assert!(!valid_subject(".order"));
        assert!(!valid_subject("order."));
        assert!(captures("outbox.>", "outbox.event.order"));
        assert!(captures("outbox.*.order", "outbox.event.order"));
        assert!(captures("outbox.event.order", "outbox.event.order"));
        assert!(!captures("outbox.*", "outbox.event.order"));
        assert!(!captures("outbox.event.order", "outbox.event"));
        assert!(!captures("outbox.>", "outbox"));
    }

    #[test]
    fn credentials_come_from_the_url() {
        let servers = |u: &str| vec![u.parse::<async_nats::ServerAddr>().unwrap()];
        let c = credentials(&servers("nats://relay:p%40ss@h:4222"));
        assert_eq!(c.user.as_deref(), Some("relay"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert!(c.token.is_none());
        let c = credentials(&servers("tls://s3cret@h:4222"));
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert!(c.user.is_none());
        assert!(credentials(&servers("nats://h")).user.is_none());
    }
}
