//! The task that owns the connection: connects (declaring or checking the
//! exchange), publishes in the order the session sent, in batches of at most
//! `rabbitmq.max_in_flight`, and reports each record once its batch is
//! confirmed.
//!
//! One batch is unconfirmed at a time, the next one gathers meanwhile. The
//! server may confirm several messages with one `basic.ack`; an unroutable
//! message comes back as `basic.return` before its ack, and lapin hands the
//! return to whichever confirm of that ack it resolves first. So the batch's
//! returns are matched to their records by content once every confirm of the
//! batch is in (`message::returned_record`); a second batch in flight could
//! take a return meant for the first.

use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, ExchangeKind,
    PublisherConfirm,
};
use tokio::sync::{mpsc, watch};

use super::message::{body, properties, returned_record};
use super::{Link, Settings, SINK};
use crate::outbox::Record;
use crate::sink::task::{Item, Reporter};
use crate::sink::{DeliveryError, Refusal};

/// A batch holds at most this much payload (a larger record goes alone).
const MAX_BATCH_BYTES: usize = 32 << 20;

/// How often an idle task looks at its connection.
const LINK_CHECK: Duration = Duration::from_millis(250);

/// One published record and its confirmation.
struct Entry {
    item: Item,
    confirm: PublisherConfirm,
    result: Option<lapin::Result<Confirmation>>,
}

/// The task: connect, then publish batch after batch until the connection fails.
pub(super) async fn run(
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
