//! A librdkafka mock broker with a fixed round-trip time, for `bench/run.py
//! --rtt-sweep`: how the relay's CPU and latency depend on how long the broker
//! takes to answer (a Kafka cluster across a network, or one under load), which
//! tansu on loopback cannot show. The mock answers every request after
//! `--rtt-ms`; it stores records in memory and does no other work.
//!
//! Prints the bootstrap address on stdout, then serves until it is killed.
//!
//!     cargo run --release --example bench_mock_broker -- \
//!         --rtt-ms 10 --topic outbox.event.live --partitions 3

use std::io::Write;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

fn main() {
    let mut rtt_ms = 0u64;
    let mut partitions = 1i32;
    let mut topics = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--rtt-ms" => {
                rtt_ms = value
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("--rtt-ms: {e}")))
            }
            "--partitions" => {
                partitions = value
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("--partitions: {e}")))
            }
            "--topic" => topics.push(value),
            _ => fail(&format!("unknown option {flag:?}")),
        }
    }
    let cluster = MockCluster::new(1).unwrap_or_else(|e| fail(&format!("mock cluster: {e}")));
    // Created here: the mock's CreateTopics does not answer the admin API.
    for topic in &topics {
        cluster
            .create_topic(topic, partitions, 1)
            .unwrap_or_else(|e| fail(&format!("topic {topic}: {e}")));
    }
    cluster
        .broker_round_trip_time(-1, Duration::from_millis(rtt_ms))
        .unwrap_or_else(|e| fail(&format!("round-trip time: {e}")));
    println!("{}", cluster.bootstrap_servers());
    let _ = std::io::stdout().flush();
    // The mock broker runs on librdkafka's threads; serve until killed.
    loop {
        std::thread::park();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("bench_mock_broker: {msg}");
    std::process::exit(2);
}
