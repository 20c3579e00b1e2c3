"""Unit tests of the report and the settings: python3 -m unittest discover -s bench"""
import copy
import unittest
from pathlib import Path

from .report import fmt, markdown, other_load_note, targets
from .settings import RELAY_BIN, WORKLOADS, Settings, build_parser, parse_args


def hist(p50, p99, le99, n=1000) -> dict:
    """histogram_percentiles' shape; n = 0: no bounds."""
    return {"n": n, "p50_est_ms": p50, "p50_le_ms": 5.0 if n else None, "p90_est_ms": None, "p90_le_ms": None,
            "p99_est_ms": p99, "p99_le_ms": le99, "p99_9_est_ms": 30.0 if n else None,
            "p99_9_le_ms": 50.0 if n else None, "max_est_ms": None, "max_le_ms": None}


def catchup(eps, **kw) -> dict:
    return {"events_per_s": eps, "records_per_s": eps, "seconds": 1.0, "walsender_busy": 0.5,
            "cpu_s_per_million_events": 2.5, "peak_rss_mb": 20.0, "max_records_in_flight": 1234,
            "other_load_cores": 0.0, **kw}


def sample_results() -> dict:
    """A results.json of a run with every section."""
    w1 = {"name": "tx1_200B", "events": 200_000, "rows_per_transaction": 1, "payload_bytes_avg": 201,
          "wal_bytes": 123_000_000, "read_limit": catchup(100_000.0), "write_limit": catchup(300_000.0),
          "relay": catchup(95_000.0), "relay_over_read_limit": 0.95, "relay_over_write_limit": 95 / 300,
          "relay_peak_rss_mb_max": 21.5, "relay_broker_stalled": None,
          "runs": {"read_limit": [catchup(100_000.0, other_load_cores=0.3)], "relay": [catchup(95_000.0)],
                   "write_limit": [catchup(300_000.0)]}}
    w2 = copy.deepcopy(w1) | {"name": "tx100_200B", "events": 1_000_000, "rows_per_transaction": 100,
                              "relay_over_read_limit": 0.85, "relay_peak_rss_mb_max": 70.0,
                              "relay_broker_stalled": catchup(50_000.0, peak_rss_mb=40.0)}
    w2["read_limit"]["walsender_busy"] = None
    live = {"target_rate": 5000, "achieved_rate": 4990.0, "seconds": 30, "relay_cores": 0.21,
            "other_load_cores": 0.02, "relay_histogram": hist(3.0, 12.0, 20.0),
            "relay_histogram_by_minute": [hist(3.0, 12.0, 20.0), hist(3.5, 14.0, 50.0)],
            "pgbench_latency_by_minute_ms": [1.5, 1.6], "pgbench_schedule_lag_by_minute_ms": [0.1, 0.2],
            "consumer": {"records": 149_700,
                         "consumer_ms": {"p50": 4.0, "p99": 15.0, "p99_9": 25.0, "max": 40.0},
                         "broker_timestamp_ms": {"p99": 2.0},
                         "consumer_ms_by_minute": [{"p50": 4.0, "p99": 15.0, "max": 40.0},
                                                   {"p50": 4.1, "p99": 16.0, "max": 41.0}]},
            "consumer_missed_records": 0, "relay_peak_rss_mb_whole_live_run": 25.0}
    slow = copy.deepcopy(live) | {"target_rate": 1000, "achieved_rate": 1001.0,
                                  "relay_histogram": hist(None, None, None, n=0),
                                  "relay_histogram_by_minute": [],
                                  "consumer": {"records": None, "consumer_ms": None, "broker_timestamp_ms": None,
                                               "consumer_ms_by_minute": []}}
    rtt = {"broker_rtt_ms": 10, "linger_ms": 5, "relay_histogram": hist(12.0, 25.0, 50.0), "relay_cores": 0.3,
           "relay_cores_by_thread": {"rdk:broker1": 0.1, "rdk:broker2": 0.05, "tokio-rt-worker": 0.1},
           "achieved_rate": 4999.0}
    return {"started": "2025-01-01T00:00:00+0000", "quick": True, "total_seconds": 61.4,
            "machine": {"nproc": 2, "cpu_model": "Test CPU", "memory_gb": 7.8, "postgresql": "postgres (PostgreSQL) 15.1",
                        "tansu": "tansu 0.6.0"},
            "settings": {"repeat": 1, "partitions": 3},
            "workloads": [w1, w2], "live": [slow, live], "rtt_sweep": [rtt]}


class ReportTest(unittest.TestCase):
    def test_fmt(self):
        self.assertEqual(fmt(None), "n/a")
        self.assertEqual(fmt(1234567.8), "1,234,568")
        self.assertEqual(fmt(0.256, ".0%"), "26%")

    def test_other_load_note(self):
        self.assertEqual(other_load_note({"other_load_cores": 0.05}), "")
        self.assertEqual(other_load_note({}), "")
        self.assertEqual(other_load_note({"other_load_cores": 0.25}), " [other processes on the machine: 0.25 cores]")

    def test_targets(self):
        t = targets(sample_results())
        self.assertEqual([r["met"] for r in t], [True, False, True, False, False, True])
        self.assertEqual(t[0]["target"], "catch-up ≥ 0.9 × read limit, tx1_200B")
        self.assertEqual(t[0]["result"], "0.95 × (95,000 vs 100,000 events/s)")
        self.assertEqual(t[2]["result"], "relay histogram p99 ≤ 20 ms; cross-check: consumer p99 15.0 ms "
                                         "(achieved 4,990/s, 30 s)")
        self.assertEqual(t[3]["result"], "p99 bucket by minute ≤ 20, 50 ms")
        self.assertEqual(t[4]["result"], "70.0 MB (tx100_200B)")
        self.assertEqual(t[5]["target"], "peak RSS ≤ 64 MB catching up a 1M-event backlog, broker frozen 3 s")

    def test_targets_without_big_backlog(self):
        res = sample_results()
        res["workloads"] = res["workloads"][:1]
        res["live"] = []
        t = targets(res)
        self.assertEqual(t[-1]["met"], None)
        self.assertEqual(t[-1]["result"], "no 1M-event backlog in this run; 21.5 MB for 200,000 events (tx1_200B)")

    def test_markdown(self):
        res = sample_results()
        res["targets"] = targets(res)
        md = markdown(res).splitlines()
        self.assertEqual(md[0], "Run 2025-01-01T00:00:00+0000 (quick mode, best of 1, 61 s): 2 CPUs (Test CPU), "
                                "7.8 GB, postgres (PostgreSQL) 15.1, tansu 0.6.0, 3 partition(s) per topic.")
        self.assertIn("| tx1_200B (1 rows/txn, 201 B) | 200,000 | 123 | 100,000 | 300,000 | 95,000 | 0.95 | 0.32 "
                      "| 2.5 | 21.5 | 50% / 50% | 0.30 |", md)
        self.assertIn("| tx100_200B (100 rows/txn, 201 B) | 1,000,000 | 123 | 100,000 | 300,000 | 95,000 | 0.85 "
                      "| 0.32 | 2.5 | 70.0 | n/a / 50% | 0.30 |", md)
        self.assertIn("tx100_200B once more with the broker frozen (SIGSTOP) for 3 s, from 0.1 s after the relay "
                      "started streaming: 50,000 events/s, peak RSS 40.0 MB, up to 1,234 records in flight.", md)
        self.assertIn("| 1,000/s | 1,001/s | n/a | n/a | n/a | n/a | > 60000 | > 60000 | > 60000 | n/a "
                      "| 0.21 | 0.02 |", md)
        self.assertIn("| 5,000/s | 4,990/s | 4.0 | 15.0 | 25.0 | 40.0 | 3.0 (≤ 5) | 12.0 (≤ 20) | 30.0 (≤ 50) "
                      "| 2 | 0.21 | 0.02 |", md)
        self.assertIn("5,000/s, relay histogram p50 / p99 per minute (ms, interpolated in buckets): 3.0 / 12.0; "
                      "3.5 / 14.0; pgbench's average latency / schedule lag per minute (ms): 1.5 / 0.1, 1.6 / 0.2.", md)
        self.assertIn("5,000/s, consumer p50 / p99 / max per minute (ms): 4.0 / 15.0 / 40.0; 4.1 / 16.0 / 41.0; "
                      "relay peak RSS over the live run 25.0 MB.", md)
        self.assertIn("| 10 | 5 | 12.0 | 25.0 (≤ 50) | 30.0 | 0.30 | 0.15 | 4,999/s |", md)
        self.assertEqual(md[-6:], [
            "| catch-up ≥ 0.9 × read limit, tx1_200B | 0.95 × (95,000 vs 100,000 events/s) | yes |",
            "| catch-up ≥ 0.9 × read limit, tx100_200B | 0.85 × (95,000 vs 100,000 events/s) | **no** |",
            "| live p99 commit-to-ack ≤ 20 ms at 5k events/s | relay histogram p99 ≤ 20 ms; cross-check: consumer "
            "p99 15.0 ms (achieved 4,990/s, 30 s) | yes |",
            "| ... in every minute of the run (no growth) | p99 bucket by minute ≤ 20, 50 ms | **no** |",
            "| peak RSS ≤ 64 MB catching up a 1M-event backlog | 70.0 MB (tx100_200B) | **no** |",
            "| peak RSS ≤ 64 MB catching up a 1M-event backlog, broker frozen 3 s | 40.0 MB (1,234 records in flight) "
            "| yes |"])


class SettingsTest(unittest.TestCase):
    def test_defaults(self):
        s = parse_args([])
        self.assertEqual(s, Settings())
        self.assertEqual((s.repeat, s.live_seconds, s.live_topic_seconds), (3, 30, 20))
        self.assertEqual([w.name for w in s.workloads], [w.name for w in WORKLOADS])
        self.assertEqual(s.relay_bin, RELAY_BIN)
        self.assertTrue(s.live and s.live_consumer)

    def test_quick_and_overrides(self):
        s = parse_args(["--quick", "--workloads", "tx1M_200B,tx1_200B", "--no-live", "--brokers", "h:9092",
                        "--kafka-property", "linger.ms=1", "--kafka-property", "a=b=c", "--rtt-lingers", "5,10,20",
                        "--relay-setting", "postgres.x=1", "--relay-setting", "kafka.y=2", "--out", "o",
                        "--no-live-consumer"])
        self.assertEqual((s.repeat, s.live_seconds, s.live_topic_seconds), (1, 10, 0))
        self.assertEqual([w.name for w in s.workloads], ["tx1_200B", "tx1M_200B"])  # in WORKLOADS' order
        self.assertFalse(s.live)
        self.assertFalse(s.live_consumer)
        self.assertEqual(s.kafka_properties, {"linger.ms": "1", "a": "b=c"})
        self.assertEqual(s.rtt_lingers, [5, 10, 20])
        self.assertEqual(s.relay_setting, ["postgres.x=1", "kafka.y=2"])
        self.assertEqual(s.out, Path("o"))

    def test_explicit_values_win(self):
        s = parse_args(["--quick", "--repeat", "2", "--live-seconds", "5", "--live-topic-seconds", "0",
                        "--workloads", "none"])
        self.assertEqual((s.repeat, s.live_seconds, s.live_topic_seconds, s.workloads), (2, 5, 0, []))

    def test_every_option_is_a_field(self):
        fields = set(Settings.__dataclass_fields__)
        renamed = {"no_live": "live", "kafka_property": "kafka_properties"}
        for a in build_parser()._actions:
            if a.dest != "help":
                self.assertIn(renamed.get(a.dest, a.dest), fields)


if __name__ == "__main__":
    unittest.main()
