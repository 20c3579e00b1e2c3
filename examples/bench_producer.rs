//! The "write limit" of `bench/run.py`: a plain idempotent producer with the
//! relay's producer settings (`outbox_relay::sink::kafka::client_config`, plus
//! `enable.idempotence=true` and `acks=all` like `kafka::Producer`) that sends
//! COUNT records shaped like the relay's (key `agg-{i % KEYS}`, a payload of
//! PAYLOAD_BYTES, headers `id`, `event_type`, `lsn`) as fast as librdkafka
//! takes them, and reports records/s from the first send to the last delivery
//! report as one JSON line on stdout.
//!
//!     cargo run --release --example bench_producer -- \
//!         --brokers 127.0.0.1:9092 --topic bench.write --count 100000 \
//!         --payload-bytes 200 --keys 1000 --partitions 3

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};

use outbox_relay::config::KafkaConfig;

struct Args {
    brokers: String,
    topic: String,
    count: u64,
    payload_bytes: usize,
    keys: u64,
    partitions: i32,
    /// Extra librdkafka properties (`--property KEY=VALUE`), like the relay's [kafka.properties].
    properties: Vec<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        brokers: "127.0.0.1:9092".into(),
        topic: "bench.write".into(),
        count: 100_000,
        payload_bytes: 200,
        keys: 1000,
        partitions: 1,
        properties: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let bad = |e: std::num::ParseIntError| format!("{flag}: {e}");
        match flag.as_str() {
            "--brokers" => a.brokers = value()?,
            "--topic" => a.topic = value()?,
            "--count" => a.count = value()?.parse().map_err(bad)?,
            "--payload-bytes" => a.payload_bytes = value()?.parse().map_err(bad)?,
            "--keys" => a.keys = value()?.parse().map_err(bad)?,
            "--partitions" => a.partitions = value()?.parse().map_err(bad)?,
            "--property" => {
                let kv = value()?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or(format!("--property {kv:?}: expected KEY=VALUE"))?;
                a.properties.push((k.to_string(), v.to_string()));
            }
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    if a.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    Ok(a)
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    last_report: Mutex<Option<Instant>>,
}

struct Context(Arc<Counters>);

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                self.0
                    .first_error
                    .lock()
                    .unwrap()
                    .get_or_insert(e.to_string());
                self.0.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        *self.0.last_report.lock().unwrap() = Some(Instant::now());
    }
}

/// VmHWM of this process, in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Printable, incompressible-looking filler (xorshift hex), like the benchmark's md5 text.
fn filler(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"0123456789abcdef"[(x & 15) as usize]
        })
        .collect()
}

async fn create_topic(cc: &ClientConfig, topic: &str, partitions: i32) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = cc.create().map_err(|e| e.to_string())?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| e.to_string())?
    {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("cannot create topic {topic:?}: {code}")),
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("bench_producer: {e}");
        std::process::exit(2);
    });
    let mut kafka = KafkaConfig::default();
    kafka.brokers = args.brokers.clone();
    kafka.properties = args
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), toml::Value::String(v.clone())))
        .collect();
    kafka.validate().unwrap_or_else(|e| {
        eprintln!("bench_producer: {e}");
        std::process::exit(2);
    });
    // The relay's defaults (linger.ms, queue bound, message timeout), then what
    // kafka::Producer::new adds.
    let mut cc = outbox_relay::sink::kafka::client_config(&kafka);
    create_topic(&cc, &args.topic, args.partitions)
        .await
        .unwrap_or_else(|e| {
            eprintln!("bench_producer: {e}");
            std::process::exit(1);
        });
    // No statistics: this context does not read them.
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("statistics.interval.ms", "0");
    let counters = Arc::new(Counters::default());
    let producer: ThreadedProducer<Context> = cc
        .create_with_context(Context(counters.clone()))
        .expect("producer");
    // Wait for the topic's metadata so the clock does not include topic creation.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let parts = producer
            .client()
            .fetch_metadata(Some(&args.topic), Duration::from_secs(5))
            .map(|md| md.topics()[0].partitions().len())
            .unwrap_or(0);
        if parts > 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // 64 KiB of filler; each record takes a different window of it.
    let pool = filler(65536 + args.payload_bytes, 0x9e37_79b9_7f4a_7c15);
    let event_type = b"BenchEvent";
    let started = Instant::now();
    let mut queue_full_waits = 0u64;
    for i in 0..args.count {
        let key = format!("agg-{}", i % args.keys);
        let at = (i as usize * 61) % 65536;
        let payload = &pool[at..at + args.payload_bytes];
        // Same header names and value sizes as the relay's records (uuid, type, X/X LSN).
        let id = format!("00000000-0000-4000-8000-{i:012x}");
        let lsn = format!("1/{:08X}", i * 400);
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "id",
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(&event_type[..]),
            })
            .insert(Header {
                key: "lsn",
                value: Some(lsn.as_bytes()),
            });
        let mut rec = BaseRecord::to(&args.topic)
            .key(key.as_bytes())
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The relay backs off 2 ms on a full queue; 1 ms here.
                    queue_full_waits += 1;
                    rec = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    eprintln!("bench_producer: cannot enqueue: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    let enqueued = started.elapsed();
    let _ = producer.flush(Duration::from_secs(300));
    let acked = counters.acked.load(Ordering::Relaxed);
    let failed = counters.failed.load(Ordering::Relaxed);
    let last = counters
        .last_report
        .lock()
        .unwrap()
        .unwrap_or_else(Instant::now);
    let secs = last.duration_since(started).as_secs_f64();
    let line = serde_json::json!({
        "records": args.count,
        "acked": acked,
        "failed": failed,
        "first_error": *counters.first_error.lock().unwrap(),
        "seconds": secs,
        "records_per_s": acked as f64 / secs,
        "enqueue_seconds": enqueued.as_secs_f64(),
        "queue_full_waits": queue_full_waits,
        "payload_bytes": args.payload_bytes,
        "partitions": args.partitions,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{line}");
    if acked != args.count {
        std::process::exit(1);
    }
}
