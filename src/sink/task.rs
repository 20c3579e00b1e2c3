//! The shape shared by sinks whose client is asynchronous (Redis, NATS,
//! RabbitMQ): `send` puts the record on a bounded queue (full: `QueueFull`,
//! the session offers it again), and one task that owns the connection takes
//! records in order, publishes them, and reports each one through a
//! [`Reporter`] once the destination acknowledged it. When the task ends with
//! an error the sink is broken: `send` says `Unavailable`, `fatal_error` says
//! why, and the run loop makes a new sink and streams again from the slot.

use std::future::Future;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{DeliveryError, DeliveryReport, SendError};
use crate::ack::Seq;
use crate::metrics::Metrics;
use crate::outbox::Record;
use crate::pgoutput::Timestamp;

/// One record on its way to the task.
#[derive(Debug)]
pub struct Item {
    pub seq: Seq,
    pub commit_time: Timestamp,
    pub record: Record,
}

#[derive(Default)]
struct Shared {
    /// Records taken by `send` and not yet reported.
    queued: AtomicI32,
    /// Why the task ended, once it did.
    fatal: Mutex<Option<String>>,
}

/// The sending half: what a task-based sink's `send`, `fatal_error` and
/// `queued` delegate to. Dropping it stops the task.
pub struct TaskSink {
    name: &'static str,
    tx: mpsc::Sender<Item>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// The task's way to report records back, keeping the shared metrics.
pub struct Reporter {
    reports: mpsc::UnboundedSender<DeliveryReport>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl TaskSink {
    /// Starts `run` with the queue's receiving end and a [`Reporter`].
    /// `capacity` bounds the records waiting for the task (the session's
    /// backpressure); `run` returns only when the connection is unusable.
    pub fn spawn<F, Fut>(
        name: &'static str,
        capacity: usize,
        metrics: Arc<Metrics>,
        run: F,
    ) -> (TaskSink, mpsc::UnboundedReceiver<DeliveryReport>)
    where
        F: FnOnce(mpsc::Receiver<Item>, Reporter) -> Fut,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let reporter = Reporter {
            reports: reports_tx,
            shared: shared.clone(),
            metrics,
        };
        let fut = run(rx, reporter);
        let done = shared.clone();
        let task = tokio::spawn(async move {
            let why = match fut.await {
                Ok(()) => "the sink's task stopped".to_string(),
                Err(e) => e,
            };
            tracing::warn!(sink = name, error = %why, "the sink's connection is unusable");
            *done.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        });
        (
            TaskSink {
                name,
                tx,
                shared,
                task,
            },
            reports,
        )
    }

    pub fn send(&self, seq: Seq, commit_time: Timestamp, record: &Record) -> Result<(), SendError> {
        if let Some(error) = self.fatal_error() {
            return Err(SendError::Unavailable {
                sink: self.name,
                error,
            });
        }
        let item = Item {
            seq,
            commit_time,
            record: record.clone(),
        };
        match self.tx.try_send(item) {
            Ok(()) => {
                self.shared.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(SendError::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Unavailable {
                sink: self.name,
                error: self
                    .fatal_error()
                    .unwrap_or_else(|| "the sink's task stopped".into()),
            }),
        }
    }

    /// Why the task ended, if it did.
    pub fn fatal_error(&self) -> Option<String> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records taken and not yet reported.
    pub fn queued(&self) -> i32 {
        self.shared.queued.load(Ordering::Relaxed)
    }
}

impl Drop for TaskSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reporter {
    /// The destination acknowledged `item` durably.
    pub fn acked(&self, item: &Item) {
        let m = &self.metrics;
        m.events_acked
            .with_label_values(&[&item.record.topic])
            .inc();
        m.delivery_latency
            .observe(super::seconds_since(item.commit_time));
        self.report(item.seq, Ok(()));
    }

    /// The destination did not accept `seq` (see [`DeliveryError::refused`]
    /// for a record refused for good).
    pub fn failed(&self, seq: Seq, error: DeliveryError) {
        self.metrics
            .events_failed
            .with_label_values(&[&error.topic])
            .inc();
        self.report(seq, Err(error));
    }

    fn report(&self, seq: Seq, result: Result<(), DeliveryError>) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        // The receiver is gone only when the sink was replaced; its records are re-sent then.
        let _ = self.reports.send(DeliveryReport { seq, result });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str) -> Record {
        Record {
            topic: topic.into(),
            key: "k".into(),
            value: Some("v".into()),
            headers: vec![],
            partition: None,
            timestamp_ms: None,
        }
    }

    #[tokio::test]
    async fn records_come_back_in_order_and_a_full_queue_pushes_back() {
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (sink, mut reports) = TaskSink::spawn(
            "Test",
            2,
            Arc::new(Metrics::new()),
            |mut rx, reporter| async move {
                let _ = go_rx.await;
                while let Some(item) = rx.recv().await {
                    reporter.acked(&item);
                }
                Ok(())
            },
        );
        let t = Timestamp::from_pg_micros(0);
        sink.send(0, t, &record("a")).unwrap();
        sink.send(1, t, &record("a")).unwrap();
        assert!(matches!(
            sink.send(2, t, &record("a")),
            Err(SendError::QueueFull)
        ));
        assert_eq!(sink.queued(), 2);
        go_tx.send(()).unwrap();
        for want in 0..2 {
            let r = reports.recv().await.unwrap();
            assert_eq!(r.seq, want);
            assert!(r.result.is_ok());
        }
        assert_eq!(sink.queued(), 0);
        assert!(sink.fatal_error().is_none());
    }

    #[tokio::test]
    async fn a_failed_task_makes_the_sink_unavailable_with_its_reason() {
        let (sink, _reports) = TaskSink::spawn(
            "Test",
            4,
            Arc::new(Metrics::new()),
            |_rx, _reporter| async { Err("connection reset".to_string()) },
        );
        for _ in 0..100 {
            if sink.fatal_error().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(sink.fatal_error().as_deref(), Some("connection reset"));
        let err = sink
            .send(0, Timestamp::from_pg_micros(0), &record("a"))
            .unwrap_err();
        assert!(
            matches!(&err, SendError::Unavailable { sink: "Test", error } if error == "connection reset"),
            "{err}"
        );
    }
}
