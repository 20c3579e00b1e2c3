//! The metrics only the polling source has: how often it polls, what it
//! reads and removes, and the backlog of unsent rows. The shared ones
//! (events received, produced, acknowledged, dead-lettered, latency, health)
//! are the WAL mode's, with the same names.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct PollMetrics {
    /// Polls by outcome: `rows` (found unsent rows) or `empty`.
    pub queries: IntCounterVec,
    /// Rows the polls returned, including those skipped as already in flight.
    pub rows_read: IntCounter,
    /// Rows deleted (or marked sent) after the sink acknowledged them.
    pub rows_removed: IntCounter,
    /// Unsent rows: the span of their order values (an upper bound).
    pub backlog_rows: IntGauge,
    /// Age of the oldest unsent row, in seconds (0 when there is none).
    pub oldest_unsent_age: Gauge,
}

impl PollMetrics {
    pub(super) fn new(r: &Registry) -> PollMetrics {
        let queries = IntCounterVec::new(
            Opts::new(
                "outbox_relay_poll_queries_total",
                "Polls of the outbox table (source.kind = poll), by outcome: rows or empty",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let rows_read = IntCounter::new(
            "outbox_relay_poll_rows_read_total",
            "Rows the polls returned, including rows skipped because they were already in flight",
        )
        .expect("valid metric");
        let rows_removed = IntCounter::new(
            "outbox_relay_poll_rows_removed_total",
            "Rows deleted (or marked sent) after the sink acknowledged them and every row sent before",
        )
        .expect("valid metric");
        let backlog_rows = IntGauge::new(
            "outbox_relay_poll_backlog_rows",
            "Unsent outbox rows, as the span of their order values (an upper bound: rolled-back inserts leave gaps); read every 5 s",
        )
        .expect("valid metric");
        let oldest_unsent_age = Gauge::new(
            "outbox_relay_poll_oldest_unsent_age_seconds",
            "Age of the oldest unsent row (from its commit time with track_commit_timestamp, else its created_at), 0 when none; read every 5 s",
        )
        .expect("valid metric");
        for m in [
            Box::new(queries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rows_read.clone()),
            Box::new(rows_removed.clone()),
            Box::new(backlog_rows.clone()),
            Box::new(oldest_unsent_age.clone()),
        ] {
            r.register(m).expect("unique metric");
        }
        PollMetrics {
            queries,
            rows_read,
            rows_removed,
            backlog_rows,
            oldest_unsent_age,
        }
    }
}
