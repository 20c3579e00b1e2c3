//! Prints every record of a topic as one JSON line (key, headers, value), from
//! the beginning, and keeps following it. A stand-in for `kcat -C` that works
//! with any broker librdkafka 2.x speaks to (the Debian kcat cannot talk to tansu).
//!
//!     cargo run --example consume -- 127.0.0.1:9092 outbox.event.order

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        eprintln!("usage: consume BROKERS TOPIC");
        std::process::exit(2);
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outbox-relay-consume-example")
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
    }
    if tpl.count() == 0 {
        return Err(format!("topic {topic:?} does not exist (yet)").into());
    }
    consumer.assign(&tpl)?;
    loop {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg?;
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        let headers: serde_json::Map<String, serde_json::Value> = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), text(h.value).into()))
                    .collect()
            })
            .unwrap_or_default();
        let line = serde_json::json!({
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": text(msg.key()),
            "headers": headers,
            "value": text(msg.payload()),
        });
        println!("{line}");
    }
}
