//! Reading records back from the broker.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, TopicPartitionList};

/// A record read back from the broker.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: String,
    /// A tombstone: no value at all (not an empty one).
    pub null_value: bool,
    /// The record's create time, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, String)>,
}

impl Consumed {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads `topics` (all partitions, from the beginning) until at least
/// `expected` records were read, then until nothing more arrives for a second.
pub fn consume_all(brokers: &str, topics: &[String], expected: usize) -> Vec<Consumed> {
    consume_until(brokers, topics, |got| got.len() >= expected)
}

/// Reads `topics` (all partitions, from the beginning) until `complete` holds
/// for what was read, then until nothing more arrives for a second; 150 s at most (tansu reads large batches slowly).
/// Offsets are not assumed dense (tansu's are not), so watermarks are not used.
pub fn consume_until(
    brokers: &str,
    topics: &[String],
    complete: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-tests")
        .set("enable.auto.commit", "false")
        // tansu answers a fetch with about one batch: ask again at once.
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        // Metadata of a just-created topic can briefly show no partitions.
        let parts = loop {
            let n = consumer
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .ok()
                .map(|md| md.topics()[0].partitions().len())
                .unwrap_or(0);
            if n > 0 {
                break n;
            }
            assert!(Instant::now() < deadline, "topic {t} has no partitions");
            std::thread::sleep(Duration::from_millis(200));
        };
        for p in 0..parts as i32 {
            tpl.add_partition_offset(t, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut completed = false;
    let mut last_record = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), text(h.value)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: text(m.key()),
                    value: text(m.payload()),
                    null_value: m.payload().is_none(),
                    timestamp_ms: m.timestamp().to_millis(),
                    headers,
                });
                last_record = Instant::now();
                completed = completed || complete(&out);
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {
                if completed && last_record.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
        }
    }
    assert!(
        completed,
        "gave up after 150 s with {} records read from {topics:?}",
        out.len()
    );
    out.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
    out
}

/// Raw values of a topic in partition/offset order.
pub fn consume_raw_values(brokers: &str, topic: &str, expected: usize) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-tests")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            out.push((
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out.sort();
    out.into_iter().map(|(_, _, v)| v).collect()
}

/// Reads `topic` until `total` distinct seqs (`0..total`, duplicates allowed) arrived.
pub fn consume_distinct(brokers: &str, topic: &str, total: usize) -> Vec<Consumed> {
    consume_until(brokers, &[topic.to_string()], |got| {
        seqs(got)
            .into_iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= total
    })
}

/// Sequence numbers (`payload.seq`) of consumed records.
pub fn seqs(got: &[Consumed]) -> Vec<i64> {
    got.iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.value).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect()
}
