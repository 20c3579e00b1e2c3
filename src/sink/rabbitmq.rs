//! The RabbitMQ sink: each record is published to one exchange with its topic
//! as the routing key, persistent (delivery mode 2) and `mandatory`, on one
//! channel in publisher-confirm mode, and reported once the server confirmed
//! it. Not here: what the slot may confirm (`ack`), what a refused record
//! becomes (`relay::session::produce`, `outbox.on_invalid`).
//!
//! Records are published in the order the session sent them, in batches of at
//! most `rabbitmq.max_in_flight`: one batch is unconfirmed at a time, the next
//! one gathers meanwhile. The server confirms a batch's messages, possibly
//! several with one `basic.ack`; an unroutable message comes back as
//! `basic.return` before its ack. lapin hands a return to whichever confirm
//! of that ack it resolves first, so the batch's returns are matched to their
//! records by content once every confirm of the batch is in; a second batch
//! in flight could take a return meant for the first.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind, PublisherConfirm,
};
use tokio::sync::{mpsc, watch};

use super::task::{Item, Reporter, TaskSink};
use super::{DeliveryError, DeliveryReport, Refusal, SendError, SinkSetupError};
use crate::ack::Seq;
use crate::config::{ExchangeType, RabbitMqConfig};
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

const SINK: &str = "RabbitMQ";
/// Records waiting for the task beyond the batch it gathers (the session's backpressure).
const QUEUE: usize = 64;
/// A batch holds at most this much payload (a larger record goes alone).
const MAX_BATCH_BYTES: usize = 32 << 20;
/// How often an idle task looks at its connection.
const LINK_CHECK: Duration = Duration::from_millis(250);
/// AMQP's limit on a short string: routing keys, header names, message ids.
const MAX_SHORT: usize = 255;

/// Where the task's connection stands, for [`RabbitMqSink::ready`].
#[derive(Debug, Clone)]
enum Link {
    Connecting,
    Up,
    Down(String),
}

/// The RabbitMQ sink (see the module comment).
pub struct RabbitMqSink {
    inner: TaskSink,
    link: watch::Receiver<Link>,
    max_message_bytes: usize,
}

/// What the task needs, resolved from `[rabbitmq]`.
struct Settings {
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    exchange: String,
    declare: Option<ExchangeKind>,
    max_in_flight: usize,
    connect_timeout: Duration,
    /// `host:port (vhost "v")`, for messages (never the credentials).
    address: String,
}

impl Settings {
    fn new(cfg: &RabbitMqConfig) -> Result<Settings, SinkSetupError> {
        let uri = cfg.uri.clone().ok_or_else(|| SinkSetupError::Config {
            sink: SINK,
            message:
                "rabbitmq.url is missing; set it, rabbitmq.url_file or OUTBOX_RELAY_RABBITMQ_URL"
                    .into(),
        })?;
        let identity = match (&cfg.tls.cert_pem, &cfg.tls.key_pem) {
            (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: pem.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let declare = cfg.declare.then_some(match cfg.exchange_type {
            ExchangeType::Topic => ExchangeKind::Topic,
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Fanout => ExchangeKind::Fanout,
            ExchangeType::Headers => ExchangeKind::Headers,
        });
        let address = format!(
            "{}:{} (vhost {:?})",
            uri.authority.host, uri.authority.port, uri.vhost
        );
        Ok(Settings {
            uri,
            tls: OwnedTLSConfig {
                identity,
                cert_chain: cfg.tls.ca_pem.clone(),
            },
            exchange: cfg.exchange.clone(),
            declare,
            max_in_flight: cfg.max_in_flight,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            address,
        })
    }
}

impl RabbitMqSink {
    /// Starts the task that connects and publishes; [`RabbitMqSink::ready`]
    /// says whether connecting worked.
    pub fn new(
        cfg: &RabbitMqConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(RabbitMqSink, mpsc::UnboundedReceiver<DeliveryReport>), SinkSetupError> {
        let settings = Settings::new(cfg)?;
        let (link_tx, link) = watch::channel(Link::Connecting);
        let (inner, reports) = TaskSink::spawn(SINK, QUEUE, metrics, move |rx, reporter| {
            run(settings, rx, reporter, link_tx)
        });
        Ok((
            RabbitMqSink {
                inner,
                link,
                max_message_bytes: cfg.max_message_bytes,
            },
            reports,
        ))
    }

    /// Waits until the task connected (or gave up): the session starts only
    /// with a usable connection, and `/readyz` says why not.
    pub async fn ready(&mut self) -> Result<(), SinkSetupError> {
        let connect = |error: String| SinkSetupError::Connect { sink: SINK, error };
        let state = self
            .link
            .wait_for(|l| !matches!(l, Link::Connecting))
            .await
            .map(|l| l.clone());
        match (state, self.inner.fatal_error()) {
            (_, Some(error)) | (Ok(Link::Down(error)), None) => Err(connect(error)),
            (Ok(_), None) => Ok(()),
            (Err(_), None) => Err(connect("the sink's task stopped".into())),
        }
    }

    /// `Unavailable` once the connection is gone (checked on every status tick,
    /// so an idle session ends too and readiness follows the connection).
    pub fn check(&self) -> Result<(), SendError> {
        match self.inner.fatal_error() {
            Some(error) => Err(SendError::Unavailable { sink: SINK, error }),
            None => Ok(()),
        }
    }

    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        if let Some((reason, error)) = refusal(record, self.max_message_bytes) {
            return Err(SendError::Refused {
                sink: SINK,
                topic: record.topic.clone(),
                reason,
                error,
            });
        }
        self.inner.send(seq, commit_time, record)
    }

    pub fn fatal_error(&self) -> Option<String> {
        self.inner.fatal_error()
    }

    pub fn queued(&self) -> i32 {
        self.inner.queued()
    }
}

/// Why RabbitMQ cannot take `record` at all: (dead-letter reason, message).
fn refusal(record: &Record, max_bytes: usize) -> Option<(&'static str, String)> {
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

fn body(record: &Record) -> &[u8] {
    record.value.as_deref().unwrap_or_default()
}

/// One published record and its confirmation.
struct Entry {
    item: Item,
    confirm: PublisherConfirm,
    result: Option<lapin::Result<Confirmation>>,
}

/// The task: connect, then publish batch after batch until the connection fails.
async fn run(
    s: Settings,
    mut rx: mpsc::Receiver<Item>,
    reporter: Reporter,
    link: watch::Sender<Link>,
) -> Result<(), String> {
    let opened = match tokio::time::timeout(s.connect_timeout, open(&s)).await {
        Ok(opened) => opened,
        Err(_) => Err(format!(
            "no answer from {} within {} ms (rabbitmq.connect_timeout_ms); is the server up and the address right?",
            s.address,
            s.connect_timeout.as_millis()
        )),
    };
    let (conn, channel) = match opened {
        Ok(c) => c,
        Err(e) => {
            link.send_replace(Link::Down(e.clone()));
            return Err(e);
        }
    };
    link.send_replace(Link::Up);
    tracing::info!(server = %s.address, exchange = %s.exchange, "connected to RabbitMQ");
    let mut next = Vec::new();
    let result = publish_loop(&s, &conn, &channel, &mut rx, &reporter, &mut next).await;
    if let Err(why) = &result {
        // What the task still holds fails with it, so the session ends at once
        // instead of waiting for reports that cannot come.
        rx.close();
        while let Ok(item) = rx.try_recv() {
            next.push(item);
        }
        fail_all(&reporter, next, why);
    }
    result
}

/// Publishes batch after batch (gathering the next into `next` meanwhile)
/// until the connection fails; a failed batch is reported here.
async fn publish_loop(
    s: &Settings,
    conn: &Connection,
    channel: &Channel,
    rx: &mut mpsc::Receiver<Item>,
    reporter: &Reporter,
    next: &mut Vec<Item>,
) -> Result<(), String> {
    let mut next_bytes = 0usize;
    let mut batch: Vec<Entry> = Vec::new();
    let mut check = tokio::time::interval(LINK_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if batch.is_empty() && !next.is_empty() {
            batch = publish(channel, s, std::mem::take(next), reporter).await?;
            next_bytes = 0;
        }
        let room =
            next.len() < s.max_in_flight && (next.is_empty() || next_bytes < MAX_BATCH_BYTES);
        tokio::select! {
            biased;
            () = confirmed(&mut batch), if !batch.is_empty() => {
                settle(std::mem::take(&mut batch), reporter, s)?;
            }
            item = rx.recv(), if room => match item {
                Some(item) => {
                    next_bytes += body(&item.record).len();
                    next.push(item);
                }
                // The sink was dropped.
                None => return Ok(()),
            },
            _ = check.tick() => {
                if !conn.status().connected() || !channel.status().connected() {
                    let why = format!(
                        "the connection to {} closed (server stopped, restarted or unreachable)",
                        s.address
                    );
                    fail_all(reporter, batch.into_iter().map(|e| e.item), &why);
                    return Err(why);
                }
            }
        }
    }
}

/// Connects, opens the channel in confirm mode and declares or checks the exchange.
async fn open(s: &Settings) -> Result<(Connection, Channel), String> {
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let props = ConnectionProperties::default().with_connection_name("outbox-relay".into());
    let conn = Connection::connect_uri_with_config(s.uri.clone(), props, s.tls.clone(), runtime)
        .await
        .map_err(|e| format!("{}: {e}{}", s.address, connect_hint(&e)))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel on {}: {e}", s.address))?;
    if !s.exchange.is_empty() {
        let name = ShortString::from(s.exchange.clone());
        let (kind, options) = match &s.declare {
            Some(kind) => (
                kind.clone(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
            ),
            // Passive: only whether it exists (the type is not compared).
            None => (
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
            ),
        };
        channel
            .exchange_declare(name, kind, options, FieldTable::default())
            .await
            .map_err(|e| {
                let fix = if s.declare.is_some() {
                    "; the exchange exists with other settings, or the user may not configure it"
                } else {
                    "; declare it (durable), or set rabbitmq.declare = true"
                };
                format!("exchange {:?} on {}: {e}{fix}", s.exchange, s.address)
            })?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("cannot turn on publisher confirms on {}: {e}", s.address))?;
    Ok((conn, channel))
}

fn connect_hint(e: &lapin::Error) -> &'static str {
    if e.to_string().contains("certificate verify failed") {
        return "; the server's certificate does not chain to a CA in rabbitmq.tls_ca_file (or the system's) or does not name the URL's host";
    }
    match e.kind() {
        ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "; is the server running and rabbitmq.url's port right?"
        }
        ErrorKind::ProtocolError(_) => "; check the user, password and vhost in rabbitmq.url",
        _ => "",
    }
}

/// Publishes `items` in order; a failure reports every item and ends the task.
async fn publish(
    channel: &Channel,
    s: &Settings,
    items: Vec<Item>,
    reporter: &Reporter,
) -> Result<Vec<Entry>, String> {
    let mut batch = Vec::with_capacity(items.len());
    let mut items = items.into_iter();
    while let Some(item) = items.next() {
        let routing_key = match ShortString::try_new(item.record.topic.clone()) {
            Ok(k) => k,
            // `send` refuses these; never publish a truncated key.
            Err(e) => {
                let why = format!("{e}");
                fail_all(reporter, batch.into_iter().map(|e: Entry| e.item), &why);
                fail_all(reporter, std::iter::once(item).chain(items), &why);
                return Err(why);
            }
        };
        let published = channel
            .basic_publish(
                ShortString::from(s.exchange.clone()),
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body(&item.record),
                properties(&item.record),
            )
            .await;
        match published {
            Ok(confirm) => batch.push(Entry {
                item,
                confirm,
                result: None,
            }),
            Err(e) => {
                let why = format!("publishing to {} failed: {e}", s.address);
                fail_all(reporter, batch.into_iter().map(|e| e.item), &why);
                fail_all(reporter, std::iter::once(item).chain(items), &why);
                return Err(why);
            }
        }
    }
    Ok(batch)
}

/// Resolves when every confirm of `batch` is in (each kept as it arrives, so
/// this can be dropped and called again).
async fn confirmed(batch: &mut [Entry]) {
    for e in batch.iter_mut() {
        if e.result.is_none() {
            e.result = Some((&mut e.confirm).await);
        }
    }
}

/// Reports a confirmed batch in order. A nack or a lost channel ends the task
/// (the session stops, the slot stays, a new sink streams again from it).
fn settle(batch: Vec<Entry>, reporter: &Reporter, s: &Settings) -> Result<(), String> {
    let mut results = Vec::with_capacity(batch.len());
    let mut returns = Vec::new();
    let mut items = Vec::with_capacity(batch.len());
    for e in batch {
        let result = match e.result {
            Some(Ok(Confirmation::Ack(ret))) => {
                returns.extend(ret);
                Ok(true)
            }
            Some(Ok(Confirmation::Nack(ret))) => {
                returns.extend(ret);
                Ok(false)
            }
            Some(Ok(Confirmation::NotRequested)) => {
                Err("the channel is not in confirm mode".to_string())
            }
            Some(Err(err)) => Err(format!("the channel to {} closed: {err}", s.address)),
            None => Err("a confirm is missing".to_string()),
        };
        results.push(result);
        items.push(e.item);
    }
    let mut returned: Vec<Option<BasicReturnMessage>> = items.iter().map(|_| None).collect();
    for msg in returns {
        let d = &msg.delivery;
        let records: Vec<&Record> = items.iter().map(|i| &i.record).collect();
        let taken: Vec<bool> = returned.iter().map(Option::is_some).collect();
        let id = d.properties.message_id().as_ref().map(|m| m.as_str());
        match returned_record(&records, &taken, d.routing_key.as_str(), id, &d.data) {
            Some(i) => returned[i] = Some(msg),
            None => {
                let why = format!(
                    "RabbitMQ returned a message for routing key {:?} that matches no record in flight",
                    d.routing_key.as_str()
                );
                fail_all(reporter, items, &why);
                return Err(why);
            }
        }
    }
    let mut rest = items.into_iter().zip(results).zip(returned);
    while let Some(((item, result), ret)) = rest.next() {
        match (ret, result) {
            (Some(msg), _) => {
                let error = format!(
                    "unroutable: exchange {:?} has no queue bound for routing key {:?} ({} {}); bind a queue for it",
                    s.exchange,
                    item.record.topic,
                    msg.reply_code,
                    msg.reply_text.as_str()
                );
                reporter.failed(
                    item.seq,
                    DeliveryError {
                        sink: SINK,
                        topic: item.record.topic.clone(),
                        error,
                        refused: Some(Refusal {
                            reason: "unroutable",
                            original: Box::new(item.record),
                        }),
                    },
                );
            }
            (None, Ok(true)) => reporter.acked(&item),
            (None, Ok(false)) => {
                let why = format!(
                    "nacked by {}: the server could not take the message (a queue with overflow = reject-publish is full, or an internal error)",
                    s.address
                );
                fail_all(
                    reporter,
                    std::iter::once(item).chain(rest.map(|((i, _), _)| i)),
                    &why,
                );
                return Err(why);
            }
            (None, Err(why)) => {
                fail_all(
                    reporter,
                    std::iter::once(item).chain(rest.map(|((i, _), _)| i)),
                    &why,
                );
                return Err(why);
            }
        }
    }
    Ok(())
}

/// The record a returned message belongs to: the first of `records` not yet
/// `taken` that was published with its routing key, message id and body.
/// (Records equal in all three are interchangeable: they go the same way.)
fn returned_record(
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

fn fail_all(reporter: &Reporter, items: impl IntoIterator<Item = Item>, why: &str) {
    for item in items {
        reporter.failed(
            item.seq,
            DeliveryError {
                sink: SINK,
                topic: item.record.topic.clone(),
                error: why.to_string(),
                refused: None,
            },
        );
    }
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
