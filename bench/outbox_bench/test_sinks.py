"""Unit tests of the sink comparison's pure functions: python3 -m unittest discover -s bench -t bench"""
import json
import tomllib
import unittest
from pathlib import Path

from .cpu import process_tree
from .phases.sinks import catchup_slots, round_order
from .report import sinks_markdown
from .settings import parse_args
from .sink_servers import (SINKS, count_aof_rewrites, nats_stream, parse_jsz_messages, rabbitmq_definitions, rabbitmq_env, redis_args, sink_config,
                           sink_list, watchdog_script)

BASE = '[postgres]\nurl = "postgresql://u@h/d"\n[kafka]\nbrokers = "h:9092"\n'


class SinkListTest(unittest.TestCase):
    def test_order_kept_duplicates_dropped(self):
        self.assertEqual(sink_list("redis, kafka,redis"), ["redis", "kafka"])
        self.assertEqual(sink_list(",".join(SINKS)), list(SINKS))

    def test_refused(self):
        with self.assertRaisesRegex(ValueError, "unknown sink.*: pulsar"):
            sink_list("kafka,pulsar")
        with self.assertRaisesRegex(ValueError, "no sink"):
            sink_list(" , ")


class SettingsTest(unittest.TestCase):
    def test_sinks_defaults(self):
        s = parse_args(["--sinks", "kafka,redis"])
        self.assertEqual(s.sinks, ["kafka", "redis"])
        self.assertEqual([w.name for w in s.workloads], ["tx100_200B"])
        self.assertEqual(s.repeat, 1)

    def test_sinks_explicit(self):
        s = parse_args(["--sinks", "nats", "--workloads", "tx1_200B,tx100_200B", "--repeat", "2"])
        self.assertEqual([w.name for w in s.workloads], ["tx1_200B", "tx100_200B"])
        self.assertEqual(s.repeat, 2)
        self.assertEqual(parse_args([]).sinks, [])

    def test_sinks_errors(self):
        for argv in (["--sinks", "kafka,mqtt"], ["--sinks", "kafka", "--crash-loop"]):
            with self.assertRaises(SystemExit), open("/dev/null", "w") as devnull:
                import contextlib
                with contextlib.redirect_stderr(devnull):
                    parse_args(argv)


class SinkConfigTest(unittest.TestCase):
    def test_each_sink_is_valid_toml_after_the_base(self):
        self.assertEqual(sink_config("kafka", "h:9092"), "")
        for kind, url in (("redis", "redis://127.0.0.1:1"), ("nats", "nats://127.0.0.1:2"),
                          ("rabbitmq", "amqp://guest:guest@127.0.0.1:3/%2f")):
            doc = tomllib.loads(BASE + sink_config(kind, url))
            self.assertEqual(doc["sink"], {"kind": kind})
            self.assertEqual(doc[kind]["url"], url)
        self.assertEqual(tomllib.loads(sink_config("nats", "u"))["nats"]["create_stream"], True)
        # A stream per relay run: JetStream would drop a round's repeats of the same event ids.
        self.assertEqual(tomllib.loads(sink_config("nats", "u", "tx100_200b-nats-1"))["nats"]["stream"],
                         "BENCH_tx100_200b-nats-1")
        self.assertEqual(nats_stream("a.b c*>"), "BENCH_a_b_c__")
        self.assertEqual(tomllib.loads(sink_config("rabbitmq", "u"))["rabbitmq"],
                         {"url": "u", "exchange": "outbox", "declare": True})
        with self.assertRaises(ValueError):
            sink_config("pulsar", "u")

    def test_redis_args_durable(self):
        a = redis_args(6390, Path("/tmp/r"))
        self.assertEqual(a[a.index("--appendfsync") + 1], "always")
        self.assertEqual(a[a.index("--appendonly") + 1], "yes")
        self.assertEqual(a[a.index("--save") + 1], "")
        self.assertEqual(a[a.index("--bind") + 1], "127.0.0.1")

    def test_rabbitmq_env_inside_its_directory(self):
        e = rabbitmq_env(port=5673, dist_port=25673, epmd_port=4370, data=Path("/tmp/q"))
        self.assertEqual(e["RABBITMQ_NODENAME"], "rabbit-5673@localhost")
        self.assertEqual((e["RABBITMQ_NODE_PORT"], e["RABBITMQ_DIST_PORT"], e["ERL_EPMD_PORT"]),
                         ("5673", "25673", "4370"))
        for k, v in e.items():
            if k.endswith(("_BASE", "_FILE")) or k == "HOME":
                self.assertTrue(v.startswith("/tmp/q/"), k)

    def test_rabbitmq_definitions_route_everything(self):
        d = json.loads(json.dumps(rabbitmq_definitions("outbox", "bench")))
        self.assertEqual(d["exchanges"][0]["type"], "topic")
        self.assertTrue(d["exchanges"][0]["durable"] and d["queues"][0]["durable"])
        self.assertEqual(d["bindings"][0]["routing_key"], "#")
        self.assertEqual((d["bindings"][0]["source"], d["bindings"][0]["destination"]), ("outbox", "bench"))

    def test_watchdog_script(self):
        self.assertTrue(watchdog_script(Path("/tmp/x")).endswith("wait $pid; rm -rf '/tmp/x'"))
        self.assertNotIn("rm -rf", watchdog_script(None))
        self.assertIn("kill -CONT 0", watchdog_script(None))

    def test_count_aof_rewrites(self):
        log = ("1:M 01 Dec 2026 22:57:07.151 * Starting automatic rewriting of AOF on 100% growth\n"
               "1:M 01 Dec 2026 22:57:07.160 * Background append only file rewriting started by pid 17836\n"
               "1:M 01 Dec 2026 22:57:13.064 * Background append only file rewriting started by pid 18030\n")
        self.assertEqual(count_aof_rewrites(log), 2)
        self.assertEqual(count_aof_rewrites(""), 0)

    def test_parse_jsz(self):
        body = json.dumps({"account_details": [{"stream_detail": [
            {"name": "OTHER", "state": {"messages": 5}}, {"name": "BENCH_x-0", "state": {"messages": 1234}},
            {"name": "BENCH_live", "state": {"messages": 6}}, {"name": "BENCHMARK", "state": {"messages": 7}}]}]})
        self.assertEqual(parse_jsz_messages(body, "BENCH"), 1240)
        self.assertEqual(parse_jsz_messages(json.dumps({"streams": 0}), "BENCH"), 0)


class PhaseHelpersTest(unittest.TestCase):
    def test_round_order(self):
        k = ["kafka", "redis", "nats"]
        self.assertEqual(round_order(k, 0), k)
        self.assertEqual(round_order(k, 1), ["redis", "nats", "kafka"])
        self.assertEqual(round_order(k, 4), ["redis", "nats", "kafka"])
        self.assertEqual(round_order([], 3), [])

    def test_catchup_slots(self):
        reads, relays = catchup_slots("p", ["kafka", "redis"], 2)
        self.assertEqual(reads, ["p_read0", "p_read1"])
        self.assertEqual(relays, {("kafka", 0): "p_kafka0", ("redis", 0): "p_redis0",
                                  ("kafka", 1): "p_kafka1", ("redis", 1): "p_redis1"})

    def test_process_tree(self):
        children = {1: [10, 11], 10: [100], 11: [], 100: [1000], 2: [20]}
        self.assertEqual(sorted(process_tree(children, 1)), [1, 10, 11, 100, 1000])
        self.assertEqual(process_tree(children, 20), [20])


def hist(n, p50, le50, p99, le99):
    return {"n": n, "p50_est_ms": p50, "p50_le_ms": le50, "p99_est_ms": p99, "p99_le_ms": le99}


def sink_results() -> dict:
    def relay(eps, **kw):
        return {"events_per_s": eps, "cpu_s_per_million_events": 4.25, "sink_server_cpu_s_per_million_events": 8.0,
                "stored_by_sink": 100_000, **kw}

    def live(rate, h, **kw):
        return {"target_rate": rate, "achieved_rate": rate * 0.999, "seconds": 20, "relay_histogram": h,
                "relay_cpu_s_per_million_events": 60.0, "relay_cores": 0.06, "relay_rss_mb": 18.25,
                "sink_server_cores": 0.123, "other_load_cores": 0.01, "pgbench_commit_latency_avg_ms": 1.25, **kw}
    return {
        "started": "2026-12-01T23:00:00+0000", "total_seconds": 300.4,
        "machine": {"nproc": 2, "cpu_model": "Test CPU", "memory_gb": 7.8, "postgresql": "postgres 15.1"},
        "settings": {"repeat": 1},
        "sink_servers": {"kafka": {"version": "tansu 0.6.0", "durability": "memory"},
                         "redis": {"version": "v=7.0.15", "durability": "appendfsync always"}},
        "catchup": [{"name": "tx100_200B", "events": 100_000, "rows_per_transaction": 100, "payload_bytes_avg": 199,
                     "wal_bytes": 42_000_000, "read_limit": {"events_per_s": 100_000.0},
                     "sinks": {"kafka": {"relay": relay(150_000.0, sink_server_cpu_s_per_million_events=None,
                                                       stored_by_sink=None, sink_server_counters={}),
                                         "relay_over_read_limit": 1.5, "relay_peak_rss_mb_max": 30.0,
                                         "other_load_cores_max": 0.0},
                               "redis": {"relay": relay(50_000.0, sink_server_counters={"aof_rewrites": 5}),
                                         "relay_over_read_limit": 0.5,
                                         "relay_peak_rss_mb_max": 20.04, "other_load_cores_max": 0.31}}}],
        "live": {"kafka": [live(1000, hist(20_000, 8.0, 10.0, 14.9, 15.0))],
                 "redis": [live(1000, hist(0, None, None, None, None),
                                sink_server_counters_whole_live_run={"aof_rewrites": 1})]},
    }


class SinksMarkdownTest(unittest.TestCase):
    def test_tables(self):
        md = sinks_markdown(sink_results()).splitlines()
        self.assertEqual(md[0], "Sink comparison, run 2026-12-01T23:00:00+0000 (300 s, best of 1 round(s)): 2 CPUs "
                                "(Test CPU), 7.8 GB, postgres 15.1; kafka: tansu 0.6.0, redis: v=7.0.15.")
        self.assertIn("Catch-up of tx100_200B (100,000 events, 100 rows/txn, 199 B, 42 MB of WAL); read limit "
                      "(pg_recvlogical, same WAL range) 100,000 events/s.", md)
        self.assertIn("| kafka | 150,000 | 1.50 | 4.2 | 30.0 | n/a | n/a | 0.00 |", md)
        self.assertIn("| redis | 50,000 | 0.50 | 4.2 | 20.0 | 8.0 | 100,000 | 0.31 |", md)
        self.assertIn("During the catch-up (best run): redis: 5 aof rewrites.", md)
        self.assertIn("| kafka | 1,000/s | 999/s | 8.0 (≤ 10) | 14.9 (≤ 15) | 60.0 | 0.060 | 18.2 | 0.123 | 1.2 "
                      "| 0.01 |", md)
        self.assertIn("| redis | 1,000/s | 999/s | n/a | n/a | 60.0 | 0.060 | 18.2 | 0.123 | 1.2 | 0.01 |", md)
        self.assertIn("During the live phase (all rates): redis: 1 aof rewrites.", md)
        self.assertEqual(md[-2:], ["- kafka: memory", "- redis: appendfsync always"])

    def test_without_live(self):
        res = sink_results()
        del res["live"]
        self.assertNotIn("Live:", sinks_markdown(res))


if __name__ == "__main__":
    unittest.main()
