//! Prometheus metrics and the relay's health state.
//!
//! One [`Metrics`] per process, shared by the streaming loop, the producer's
//! delivery callback, the slot poller and the HTTP endpoint. Labels stay
//! low-cardinality: topic and error kind, never keys or event ids. It does not
//! serve HTTP (see `http`).

use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::lsn::Lsn;

mod poll;
pub use poll::PollMetrics;

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not connected yet, or between sessions; the reason says why.
    Down(String),
    /// Another instance streams from the slot (or holds the polling leader
    /// lock); this one waits to take over.
    Standby,
    /// Streaming from the slot, or polling the table as the leader.
    Streaming,
}

pub struct Metrics {
    registry: Registry,
    pub events_received: IntCounterVec,
    pub events_produced: IntCounterVec,
    pub events_acked: IntCounterVec,
    pub events_failed: IntCounterVec,
    pub changes_ignored: IntCounterVec,
    pub events_dead_lettered: IntCounterVec,
    pub transactions_received: IntCounter,
    pub transactions_confirmed: IntCounter,
    pub delivery_latency: Histogram,
    pub received_lsn: Gauge,
    pub confirmed_lsn: Gauge,
    pub acked_lsn: Gauge,
    pub server_wal_end_lsn: Gauge,
    pub replication_lag_bytes: Gauge,
    pub slot_retained_wal_bytes: Gauge,
    pub slot_active: IntGauge,
    pub slot_wal_status: IntGaugeVec,
    pub records_in_flight: IntGauge,
    pub producer_queue_depth: IntGauge,
    pub broker_rtt: GaugeVec,
    pub reconnects: IntCounter,
    pub errors: IntCounterVec,
    pub active: IntGauge,
    pub checkpoint_lsn: Gauge,
    pub transactions_skipped: IntCounter,
    pub events_skipped: IntCounter,
    pub events_replayed: IntCounter,
    pub replay_window_start_lsn: Gauge,
    pub replay_window_bytes: Gauge,
    pub replay_window_age_seconds: Gauge,
    /// Only the polling source sets these.
    pub poll: PollMetrics,
    health: Mutex<Health>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(format!("outbox_relay_{name}"), help), labels)
        .expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let m = IntCounter::new(format!("outbox_relay_{name}"), help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    let m = Gauge::new(format!("outbox_relay_{name}"), help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(format!("outbox_relay_{name}"), help), labels)
        .expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(format!("outbox_relay_{name}"), help).expect("valid metric");
    r.register(Box::new(m.clone())).expect("unique metric");
    m
}

/// Latency buckets from 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0,
    5.0, 10.0, 30.0, 60.0,
];

/// WAL statuses of `pg_replication_slots.wal_status`.
pub const WAL_STATUSES: &[&str] = &["reserved", "extended", "unreserved", "lost"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::labelled(crate::shard::Shard::SINGLE, "kafka")
    }

    /// Every series carries `sink="<kind>"` (`kafka`, `stdout`, ...), and
    /// `shard="<index>"` when the outbox is sharded (one scrape target per
    /// shard instance).
    pub fn labelled(shard: crate::shard::Shard, sink: &str) -> Metrics {
        let mut labels = std::collections::HashMap::from([("sink".to_string(), sink.to_string())]);
        if shard.is_sharded() {
            labels.insert("shard".to_string(), shard.index.to_string());
        }
        let r = Registry::new_custom(None, Some(labels)).expect("valid const labels");
        let build = IntGaugeVec::new(
            Opts::new("outbox_relay_build_info", "Build information; always 1"),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build)).expect("unique metric");
        let slot_wal_status = IntGaugeVec::new(
            Opts::new(
                "outbox_relay_slot_wal_status",
                "1 for the slot's current wal_status (pg_replication_slots)",
            ),
            &["status"],
        )
        .expect("valid metric");
        r.register(Box::new(slot_wal_status.clone()))
            .expect("unique metric");
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_relay_delivery_latency_seconds",
                "Seconds from the transaction's commit timestamp to the broker's acknowledgement of each record",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(delivery_latency.clone()))
            .expect("unique metric");
        Metrics {
            events_received: counter_vec(&r, "events_received_total", "Outbox rows decoded from the WAL", &["topic"]),
            events_produced: counter_vec(&r, "events_produced_total", "Records handed to the producer", &["topic"]),
            events_acked: counter_vec(&r, "events_acked_total", "Records acknowledged by the broker", &["topic"]),
            events_failed: counter_vec(
                &r,
                "events_failed_total",
                "Records whose delivery finally failed (the relay then streams again from the slot)",
                &["topic"],
            ),
            changes_ignored: counter_vec(
                &r,
                "changes_ignored_total",
                "Changes that are not outbox inserts (other tables, updates, deletes, truncates)",
                &["kind"],
            ),
            events_dead_lettered: counter_vec(
                &r,
                "events_dead_lettered_total",
                "Rows sent to the dead-letter topic (outbox.on_invalid = dead_letter), by reason",
                &["reason"],
            ),
            transactions_received: counter(&r, "transactions_received_total", "Transactions received"),
            transactions_confirmed: counter(
                &r,
                "transactions_confirmed_total",
                "Transactions whose records are all acknowledged",
            ),
            delivery_latency,
            received_lsn: gauge(&r, "received_lsn", "Last WAL position received, in bytes"),
            confirmed_lsn: gauge(&r, "confirmed_lsn", "Last position confirmed to PostgreSQL, in bytes"),
            acked_lsn: gauge(
                &r,
                "acked_lsn",
                "Highest commit end (or idle keepalive) position below which Kafka acknowledged every record, in bytes; confirmed_lsn and checkpoint_lsn follow it",
            ),
            server_wal_end_lsn: gauge(&r, "server_wal_end_lsn", "Server WAL end from the last message, in bytes"),
            replication_lag_bytes: gauge(&r, "replication_lag_bytes", "Server WAL end minus confirmed position"),
            slot_retained_wal_bytes: gauge(
                &r,
                "slot_retained_wal_bytes",
                "WAL the slot keeps on the server: pg_current_wal_lsn() - restart_lsn",
            ),
            slot_active: int_gauge(&r, "slot_active", "1 if some connection streams from the slot"),
            slot_wal_status,
            records_in_flight: int_gauge(&r, "records_in_flight", "Records produced and not yet acknowledged"),
            producer_queue_depth: int_gauge(&r, "producer_queue_depth", "Messages queued or in flight in librdkafka"),
            broker_rtt: gauge_vec(
                &r,
                "broker_rtt_seconds",
                "Request round-trip time per broker (mostly produce requests, including the broker's wait for acks=all) over the last librdkafka statistics interval",
                &["broker", "stat"],
            ),
            reconnects: counter(&r, "reconnects_total", "Sessions restarted after an error"),
            errors: counter_vec(&r, "errors_total", "Errors by kind", &["kind"]),
            active: int_gauge(&r, "active", "1 while this instance streams from the slot, 0 while standing by"),
            checkpoint_lsn: gauge(&r, "checkpoint_lsn", "Acknowledged position stored in the checkpoint table, in bytes"),
            transactions_skipped: counter(
                &r,
                "transactions_skipped_total",
                "Transactions not produced again because the checkpoint shows them acknowledged",
            ),
            events_skipped: counter(&r, "events_skipped_total", "Outbox rows in skipped transactions"),
            events_replayed: counter(&r, "events_replayed_total", "Records produced again for replay requests"),
            replay_window_start_lsn: gauge(
                &r,
                "replay_window_start_lsn",
                "Oldest replayable position (the slot position kept for [replay] window), in bytes",
            ),
            replay_window_bytes: gauge(
                &r,
                "replay_window_bytes",
                "WAL between the replay window's start and the acknowledged position",
            ),
            replay_window_age_seconds: gauge(
                &r,
                "replay_window_age_seconds",
                "Seconds since the replay window's start was acknowledged",
            ),
            poll: PollMetrics::new(&r),
            health: Mutex::new(Health::Down("starting".into())),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode metrics");
        buf
    }

    pub fn set_health(&self, h: Health) {
        self.active.set(i64::from(h == Health::Streaming));
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_active(&self) -> bool {
        self.active.get() == 1
    }

    /// Sum of a counter over all label values.
    pub fn total(c: &IntCounterVec) -> u64 {
        prometheus::core::Collector::collect(c)
            .iter()
            .flat_map(|mf| {
                mf.get_metric()
                    .iter()
                    .map(|m| m.get_counter().get_value() as u64)
            })
            .sum()
    }

    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed_lsn.get() as u64)
    }

    pub fn set_confirmed(&self, lsn: Lsn) {
        self.confirmed_lsn.set(lsn.0 as f64);
        self.update_lag();
    }

    pub fn set_server_wal_end(&self, lsn: Lsn) {
        if lsn.0 as f64 > self.server_wal_end_lsn.get() {
            self.server_wal_end_lsn.set(lsn.0 as f64);
            self.update_lag();
        }
    }

    fn update_lag(&self) {
        let lag = (self.server_wal_end_lsn.get() - self.confirmed_lsn.get()).max(0.0);
        self.replication_lag_bytes.set(lag);
    }

    /// The replay window: its start, the acknowledged position and the start's age.
    pub fn set_replay_window(&self, start: Lsn, acked: Lsn, age: std::time::Duration) {
        self.replay_window_start_lsn.set(start.0 as f64);
        self.replay_window_bytes
            .set(acked.0.saturating_sub(start.0) as f64);
        self.replay_window_age_seconds.set(age.as_secs_f64());
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    pub fn set_slot_wal_status(&self, status: Option<&str>) {
        for s in WAL_STATUSES {
            self.slot_wal_status
                .with_label_values(&[s])
                .set(i64::from(Some(*s) == status));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics_with_build_info() {
        let m = Metrics::new();
        m.events_acked.with_label_values(&["t1"]).inc_by(3);
        m.events_acked.with_label_values(&["t2"]).inc();
        m.set_server_wal_end(Lsn(1000));
        m.set_confirmed(Lsn(400));
        m.delivery_latency.observe(0.004);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("outbox_relay_events_acked_total{topic=\"t1\",sink=\"kafka\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_replication_lag_bytes{sink=\"kafka\"} 600"),
            "{text}"
        );
        assert!(
            text.contains("outbox_relay_build_info{version=\""),
            "{text}"
        );
        assert!(
            text.contains(
                "outbox_relay_delivery_latency_seconds_bucket{sink=\"kafka\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert_eq!(Metrics::total(&m.events_acked), 4);
    }

    #[test]
    fn health_drives_the_active_gauge() {
        let m = Metrics::new();
        assert_eq!(m.active.get(), 0);
        m.set_health(Health::Streaming);
        assert!(m.is_active());
        m.set_health(Health::Standby);
        assert!(!m.is_active());
    }
}
