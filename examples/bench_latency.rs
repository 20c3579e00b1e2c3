//! The consumer cross-check of `bench/run.py`'s live-latency phase: follows
//! one or more topics (`--topic` repeated) from the beginning and, for each
//! record, compares the commit-side time the benchmark writer put in the
//! payload (`{"t": <epoch seconds>}`, `clock_timestamp()` inside the
//! single-row transaction) with
//!
//! - the time this consumer received the record (end to end: commit,
//!   decoding, relay, broker ack, fetch), and
//! - the record's broker timestamp (CreateTime, set by librdkafka when the
//!   relay enqueued the record; millisecond resolution; LogAppendTime if the
//!   topic is configured so).
//!
//! With `--topic-seconds N` the topics are named `<prefix>_<k>` and topic `k`
//! is written from second `k * N` of the Unix clock on (the benchmark's writer
//! moves to a new topic every N seconds): each is assigned 2 s before its
//! interval starts and unassigned 10 s after it ends, so every fetch names only
//! the partitions in use (a fetch's cost grows with the partitions it names).
//!
//! It stops after --count records, or once nothing arrived for --idle-s seconds
//! after the first record, and prints percentiles (nearest rank, ms) as one
//! JSON line on stdout.
//!
//!     cargo run --release --example bench_latency -- \
//!         --brokers 127.0.0.1:9092 --topic outbox.event.live --partitions 3

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

struct Args {
    brokers: String,
    topics: Vec<String>,
    partitions: i32,
    count: usize,
    idle: Duration,
    timeout: Duration,
    fetch_wait_ms: u32,
    topic_seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        brokers: "127.0.0.1:9092".into(),
        topics: Vec::new(),
        partitions: 1,
        count: usize::MAX,
        idle: Duration::from_secs(5),
        timeout: Duration::from_secs(600),
        fetch_wait_ms: 10,
        topic_seconds: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let bad = |e: std::num::ParseIntError| format!("{flag}: {e}");
        match flag.as_str() {
            "--brokers" => a.brokers = value()?,
            "--topic" => a.topics.push(value()?),
            "--partitions" => a.partitions = value()?.parse().map_err(bad)?,
            "--count" => a.count = value()?.parse().map_err(bad)?,
            "--idle-s" => a.idle = Duration::from_secs(value()?.parse().map_err(bad)?),
            "--timeout-s" => a.timeout = Duration::from_secs(value()?.parse().map_err(bad)?),
            "--fetch-wait-ms" => a.fetch_wait_ms = value()?.parse().map_err(bad)?,
            "--topic-seconds" => a.topic_seconds = value()?.parse().map_err(bad)?,
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    if a.topics.is_empty() {
        return Err("--topic is required".into());
    }
    if a.topic_seconds > 0 {
        if let Some(t) = a.topics.iter().find(|t| interval_of(t).is_none()) {
            return Err(format!(
                "--topic-seconds: topic {t:?} does not end in _<number>"
            ));
        }
    }
    Ok(a)
}

/// `k` of a topic named `<prefix>_<k>`.
fn interval_of(topic: &str) -> Option<u64> {
    topic.rsplit('_').next()?.parse().ok()
}

/// Whether topic `k` of `n`-second intervals is in use at Unix time `now` (seconds).
fn in_use(k: u64, n: u64, now: u64) -> bool {
    k * n <= now + 2 && now < (k + 1) * n + 10
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) this process used, from /proc/self/stat (USER_HZ = 100).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Nearest-rank percentiles of `v` (sorted in place), in the unit of `v`.
fn summary(v: &mut [f64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    serde_json::json!({
        "n": v.len(),
        "min": v[0],
        "p50": at(0.50),
        "p90": at(0.90),
        "p99": at(0.99),
        "p99_9": at(0.999),
        "max": v[v.len() - 1],
        "mean": v.iter().sum::<f64>() / v.len() as f64,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("bench_latency: {e}");
        std::process::exit(2);
    });
    // The topics may not exist yet (the relay creates them on their first record):
    // create them with the relay's partition count so both agree.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()
        .expect("admin client");
    let new: Vec<NewTopic> = args
        .topics
        .iter()
        .map(|t| NewTopic::new(t, args.partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    match admin.create_topics(&new, &opts).await {
        Ok(rs) => {
            for r in rs {
                if let Err((_, code)) = r {
                    if code != RDKafkaErrorCode::TopicAlreadyExists {
                        eprintln!("bench_latency: cannot create topic: {code}");
                        std::process::exit(1);
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("bench_latency: cannot create topic: {e}");
            std::process::exit(1);
        }
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "outbox-relay-bench-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", args.fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .create()
        .expect("consumer");
    let deadline = Instant::now() + args.timeout;
    let mut partitions = Vec::new();
    for topic in &args.topics {
        let parts = loop {
            let n = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .map(|md| md.topics()[0].partitions().len())
                .unwrap_or(0);
            if n > 0 {
                break n as i32;
            }
            if Instant::now() > deadline {
                eprintln!("bench_latency: topic {topic:?} has no partitions");
                std::process::exit(1);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        partitions.push(parts);
    }
    let list = |indexes: &[usize]| {
        let mut tpl = TopicPartitionList::new();
        for &i in indexes {
            for p in 0..partitions[i] {
                tpl.add_partition_offset(&args.topics[i], p, Offset::Beginning)
                    .unwrap();
            }
        }
        tpl
    };
    let all: Vec<usize> = (0..args.topics.len()).collect();
    // Indexes of the topics assigned now (all of them without --topic-seconds).
    let mut assigned: Vec<usize> = Vec::new();
    let reassign = |assigned: &mut Vec<usize>| {
        let wanted: Vec<usize> = if args.topic_seconds == 0 {
            all.clone()
        } else {
            let now = (now_ms() / 1e3) as u64;
            all.iter()
                .copied()
                .filter(|&i| {
                    interval_of(&args.topics[i]).is_some_and(|k| in_use(k, args.topic_seconds, now))
                })
                .collect()
        };
        let added: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|i| !assigned.contains(i))
            .collect();
        let removed: Vec<usize> = assigned
            .iter()
            .copied()
            .filter(|i| !wanted.contains(i))
            .collect();
        if !removed.is_empty() {
            consumer
                .incremental_unassign(&list(&removed))
                .expect("unassign");
        }
        if !added.is_empty() {
            consumer.incremental_assign(&list(&added)).expect("assign");
        }
        *assigned = wanted;
    };
    reassign(&mut assigned);
    let mut checked = Instant::now();
    // Ready: the benchmark waits for this line on stderr before it starts writing.
    eprintln!("bench_latency: ready");

    let mut e2e = Vec::new();
    // (receive time, latency) of every record, for the per-minute tails.
    let mut timeline: Vec<(f64, f64)> = Vec::new();
    let mut broker = Vec::new();
    let mut timestamp_type = "none";
    let mut bad_payloads = 0usize;
    let mut last = None::<Instant>;
    while e2e.len() + bad_payloads < args.count && Instant::now() < deadline {
        if args.topic_seconds > 0 && checked.elapsed() > Duration::from_millis(200) {
            reassign(&mut assigned);
            checked = Instant::now();
        }
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                let received = now_ms();
                last = Some(Instant::now());
                let t = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| v.get("t").and_then(|t| t.as_f64()));
                let Some(t) = t else {
                    bad_payloads += 1;
                    continue;
                };
                let committed = t * 1e3;
                e2e.push(received - committed);
                timeline.push((received, received - committed));
                match m.timestamp() {
                    Timestamp::CreateTime(ms) => {
                        timestamp_type = "CreateTime";
                        broker.push(ms as f64 - committed);
                    }
                    Timestamp::LogAppendTime(ms) => {
                        timestamp_type = "LogAppendTime";
                        broker.push(ms as f64 - committed);
                    }
                    Timestamp::NotAvailable => {}
                }
            }
            Some(Err(e)) => eprintln!("bench_latency: consumer error: {e}"),
            None => {
                if last.is_some_and(|l| l.elapsed() > args.idle) {
                    break;
                }
            }
        }
    }
    // p50 / p99 / max per minute of receive time: does the tail grow over a long run?
    let start = timeline.first().map_or(0.0, |t| t.0);
    let mut minutes: Vec<Vec<f64>> = Vec::new();
    for (at, lat) in &timeline {
        let m = ((at - start) / 60_000.0) as usize;
        if minutes.len() <= m {
            minutes.resize(m + 1, Vec::new());
        }
        minutes[m].push(*lat);
    }
    let by_minute: Vec<serde_json::Value> = minutes.iter_mut().map(|v| summary(v)).collect();
    let line = serde_json::json!({
        "consumer_ms_by_minute": by_minute,
        "records": e2e.len(),
        "bad_payloads": bad_payloads,
        "consumer_ms": summary(&mut e2e),
        "broker_timestamp_type": timestamp_type,
        "broker_timestamp_ms": summary(&mut broker),
        "consumer_cpu_s": cpu_seconds(),
    });
    println!("{line}");
}
