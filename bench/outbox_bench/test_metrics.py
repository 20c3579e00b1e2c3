"""Unit tests of the pure helpers: python3 -m unittest discover -s bench"""
import unittest

from .cpu import cores_between
from .database import lsn_int
from .metrics import histogram, histogram_percentiles, latency_percentiles, prom_samples, prom_sum, without_const_labels

METRICS = """\
# HELP outbox_relay_events_acked_total Records the broker acknowledged.
# TYPE outbox_relay_events_acked_total counter
outbox_relay_events_acked_total{sink="kafka",topic="a"} 10
outbox_relay_events_acked_total{sink="kafka",topic="b"} 5
outbox_relay_events_acked_totally_other{sink="kafka"} 100
outbox_relay_records_in_flight{sink="kafka",shard="0of2"} 7
outbox_relay_acked_lsn 123456
outbox_relay_broker_rtt_seconds{sink="kafka",broker="1",stat="p50"} 0.004
outbox_relay_delivery_latency_seconds_bucket{sink="kafka",le="0.001"} 2
outbox_relay_delivery_latency_seconds_bucket{sink="kafka",le="0.01"} 8
outbox_relay_delivery_latency_seconds_bucket{sink="kafka",le="+Inf"} 10
outbox_relay_delivery_latency_seconds_sum{sink="kafka"} 0.05
not_a_number{sink="kafka"} NaNx

"""


class PromSamplesTest(unittest.TestCase):
    def test_drops_constant_labels(self):
        s = prom_samples(METRICS)
        self.assertEqual(s["outbox_relay_records_in_flight"], 7.0)
        self.assertEqual(s['outbox_relay_events_acked_total{topic="a"}'], 10.0)
        self.assertEqual(s["outbox_relay_acked_lsn"], 123456.0)
        self.assertEqual(s['outbox_relay_broker_rtt_seconds{broker="1",stat="p50"}'], 0.004)
        self.assertNotIn("not_a_number", s)
        self.assertFalse(any("sink=" in k or "shard=" in k for k in s))

    def test_without_const_labels(self):
        self.assertEqual(without_const_labels("m"), "m")
        self.assertEqual(without_const_labels('m{sink="x"}'), "m")
        self.assertEqual(without_const_labels('m{a="1",sink="x",b="q\\"z"}'), 'm{a="1",b="q\\"z"}')

    def test_prom_sum(self):
        s = prom_samples(METRICS)
        self.assertEqual(prom_sum(s, "outbox_relay_events_acked_total"), 15.0)
        self.assertEqual(prom_sum(s, "outbox_relay_records_in_flight"), 7.0)
        self.assertEqual(prom_sum(s, "missing"), 0)


class HistogramTest(unittest.TestCase):
    def test_buckets(self):
        h = histogram(prom_samples(METRICS), "outbox_relay_delivery_latency_seconds")
        self.assertEqual(h, {0.001: 2.0, 0.01: 8.0, float("inf"): 10.0})

    def test_percentiles_between_scrapes(self):
        before = {0.001: 1.0, 0.01: 1.0, 0.1: 1.0, float("inf"): 1.0}
        after = {0.001: 11.0, 0.01: 91.0, 0.1: 100.0, float("inf"): 101.0}
        p = histogram_percentiles(before, after)
        self.assertEqual(p["n"], 100)
        self.assertEqual(p["buckets_ms"], {"1": 10, "10": 90, "100": 99, "+Inf": 100})
        self.assertEqual(p["p50_le_ms"], 10.0)
        self.assertAlmostEqual(p["p50_est_ms"], 1 + 9 * (50 - 10) / 80)
        self.assertEqual(p["p90_le_ms"], 10.0)
        self.assertEqual(p["p99_le_ms"], 100.0)
        self.assertAlmostEqual(p["p99_est_ms"], 10 + 90 * (99 - 90) / 9)
        # The last observation is past the last finite bucket: no bound.
        self.assertIsNone(p["max_le_ms"])
        self.assertIsNone(p["max_est_ms"])

    def test_no_observations(self):
        p = histogram_percentiles({0.001: 5.0}, {0.001: 5.0})
        self.assertEqual(p["n"], 0)
        self.assertIsNone(p["p99_le_ms"])
        self.assertEqual(histogram_percentiles({}, {})["n"], 0)

    def test_latency_percentiles(self):
        s = prom_samples(METRICS)
        p = latency_percentiles({}, s)
        self.assertEqual(p["n"], 10)
        self.assertEqual(p["p50_le_ms"], 10.0)


class PureHelpersTest(unittest.TestCase):
    def test_lsn_int(self):
        self.assertEqual(lsn_int("0/0"), 0)
        self.assertEqual(lsn_int("1/A"), (1 << 32) + 10)
        self.assertEqual(lsn_int("16/B374D848") - lsn_int("16/B374D800"), 0x48)

    def test_cores_between(self):
        a = {"x": 1.0, "y": 2.0}
        b = {"x": 3.0, "y": 2.1, "z": 0.5}
        self.assertEqual(cores_between(a, b, 2.0), {"x": 1.0, "z": 0.25, "y": 0.05})
        self.assertEqual(cores_between(a, b, 2.0, floor=0.1), {"x": 1.0, "z": 0.25})


if __name__ == "__main__":
    unittest.main()
