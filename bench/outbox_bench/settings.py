"""The benchmark's constants and its command line, parsed once into `Settings`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from . import __doc__ as DESCRIPTION
from .processes import run
from .sink_servers import sink_list

REPO = Path(__file__).resolve().parent.parent.parent
RELAY_BIN = REPO / "target/release/outbox-relay"
PRODUCER_BIN = REPO / "target/release/examples/bench_producer"
LATENCY_BIN = REPO / "target/release/examples/bench_latency"
MOCK_BIN = REPO / "target/release/examples/bench_mock_broker"
CONSUME_BIN = REPO / "target/release/examples/consume"
KEYS = 1000  # distinct aggregate ids (record keys)

# The targets.
TARGET_READ_RATIO = 0.9
TARGET_P99_MS = 20.0
TARGET_RSS_MB = 64.0


@dataclass
class Workload:
    name: str
    txn_rows: int  # rows per transaction; 0 = all events in one transaction
    payload_bytes: int  # rendered jsonb payload size (approximately)
    events: int
    quick_events: int


WORKLOADS = [
    Workload("tx1_200B", 1, 200, 200_000, 40_000),
    Workload("tx100_200B", 100, 200, 1_000_000, 100_000),
    Workload("tx100_4KB", 100, 4096, 60_000, 15_000),
    Workload("tx1M_200B", 0, 200, 1_000_000, 200_000),
]
LIVE_RATES = [1000, 5000]
# One extra catch-up of this workload with the broker frozen (SIGSTOP) for STALL[1] seconds,
# STALL[0] seconds in: the relay's memory while Kafka does not acknowledge (own tansu only).
STALL_WORKLOAD = "tx100_200B"
STALL = (0.1, 3.0)  # seconds after the relay starts streaming, seconds frozen
# The sink comparison's backlog unless --workloads says otherwise.
SINK_WORKLOADS = ["tx100_200B"]


@dataclass
class Settings:
    """Everything the command line decides, defaults filled in. The defaults are those of
    a default run, so bench/shards.py builds one with only the fields it needs."""
    quick: bool = False
    workloads: list[Workload] = field(default_factory=lambda: list(WORKLOADS))  # selected
    repeat: int = 3
    live: bool = True
    live_seconds: int = 30
    live_consumer: bool = True
    live_rates: list[int] = field(default_factory=lambda: list(LIVE_RATES))
    live_topic_seconds: int = 20
    fetch_wait_ms: int = 1
    rtt_sweep: bool = False
    rtt_ms: list[int] = field(default_factory=lambda: [0, 5, 10, 20])
    rtt_lingers: list[int] = field(default_factory=lambda: [5, 10])
    rtt_rate: int = 5000
    rtt_seconds: int = 20
    profile: str | None = None  # "perf" or "callgrind"
    partitions: int = 3
    # --kafka-property, for the relay ([kafka.properties]) and bench_producer alike
    kafka_properties: dict[str, str] = field(default_factory=dict)
    pg_url: str | None = None
    brokers: str | None = None
    out: Path | None = None
    skip_build: bool = False
    timeout: int = 600  # seconds allowed for one catch-up
    crash_loop: bool = False
    crash_rate: int = 3000
    crash_seconds: int = 30
    crash_kills: int = 8
    crash_seed: int = 12
    relay_bin: Path = RELAY_BIN
    consume_bin: Path = CONSUME_BIN
    relay_setting: list[str] = field(default_factory=list)
    sinks: list[str] = field(default_factory=list)  # --sinks: only the sink comparison


def int_list(v: str) -> list[int]:
    return [int(x) for x in v.split(",")]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads, one repetition, 10 s live phases")
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS)
                    + " (or none)")
    ap.add_argument("--repeat", type=int, help="catch-up measurements per workload, best reported (default 3, quick 1)")
    ap.add_argument("--no-live", action="store_true", help="skip the live latency phase")
    ap.add_argument("--live-seconds", type=int, help="duration of each live rate (default 30, quick 10)")
    ap.add_argument("--no-live-consumer", dest="live_consumer", action="store_false",
                    help="no latency consumer in the live phase (only the relay's histogram; the broker serves no fetches)")
    ap.add_argument("--live-rates", type=int_list, default=LIVE_RATES,
                    help="comma-separated commit rates of the live phase (default 1000,5000)")
    ap.add_argument("--live-topic-seconds", type=int,
                    help="live phase: a new topic every N seconds (default 20 with the benchmark's own tansu, "
                         "whose in-memory engine reads a growing partition slower on every fetch; "
                         "0 = one topic, the default with --brokers)")
    ap.add_argument("--fetch-wait-ms", type=int, default=1,
                    help="fetch.wait.max.ms of the latency consumer (default 1: tansu waits that long per fetch)")
    ap.add_argument("--rtt-sweep", action="store_true",
                    help="also run the live phase against librdkafka's mock broker with fixed round-trip "
                         "times (--rtt-ms) for each --rtt-lingers value (about 25 s per pair)")
    ap.add_argument("--rtt-ms", type=int_list, default=[0, 5, 10, 20],
                    help="round-trip times of the sweep (default 0,5,10,20)")
    ap.add_argument("--rtt-lingers", type=int_list, default=[5, 10],
                    help="linger.ms values of the sweep (default 5,10)")
    ap.add_argument("--rtt-rate", type=int, default=5000, help="commit rate of the sweep (default 5000)")
    ap.add_argument("--rtt-seconds", type=int, default=20, help="seconds per sweep point (default 20)")
    ap.add_argument("--profile", choices=["perf", "callgrind"],
                    help="also profile catch-ups of tx1_200B and tx100_200B with this tool (extra 1-3 minutes)")
    ap.add_argument("--partitions", type=int, default=3, help="partitions of every topic (default 3)")
    ap.add_argument("--kafka-property", action="append", default=[], metavar="KEY=VALUE",
                    help="librdkafka property for the relay ([kafka.properties]) and bench_producer alike; "
                         "repeatable (e.g. queue.buffering.max.kbytes=16384)")
    ap.add_argument("--pg-url", help="use this PostgreSQL (superuser, wal_level=logical) instead of starting one")
    ap.add_argument("--brokers", help="use this Kafka broker instead of starting tansu")
    ap.add_argument("--out", type=Path, help="output directory (default target/bench/<time>)")
    ap.add_argument("--skip-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed for one catch-up (default 600)")
    ap.add_argument("--crash-loop", action="store_true",
                    help="run only the crash loop (bench/crashloop.py): a steady writer, SIGKILLs, restarts; "
                         "re-sent and lost records per kill")
    ap.add_argument("--crash-rate", type=int, default=3000, help="crash loop: rows/s (default 3000)")
    ap.add_argument("--crash-seconds", type=int, default=30, help="crash loop: seconds of writing (default 30)")
    ap.add_argument("--crash-kills", type=int, default=8,
                    help="crash loop: SIGKILLs, 1-4 s apart (default 8; 0 = a steady run, for CPU)")
    ap.add_argument("--crash-seed", type=int, default=12, help="crash loop: seed of the kill times (default 12)")
    ap.add_argument("--relay-bin", type=Path, default=RELAY_BIN,
                    help="crash loop: the relay binary (default target/release/outbox-relay; e.g. a build of an older commit)")
    ap.add_argument("--consume-bin", type=Path, default=CONSUME_BIN,
                    help="crash loop: the consumer reading ids back (default target/release/examples/consume)")
    ap.add_argument("--relay-setting", action="append", default=[], metavar="SECTION.KEY=TOML",
                    help="crash loop: a relay config line, e.g. postgres.confirm_interval_ms=50; repeatable")
    ap.add_argument("--sinks", metavar="SINK,...",
                    help="run only the sink comparison for these sinks (kafka,redis,nats,rabbitmq): one backlog "
                         "(default tx100_200B) caught up by each beside the read limit, then the live phase per "
                         "sink without a consumer; --repeat defaults to 1")
    return ap


def parse_args(argv: list[str] | None = None) -> Settings:
    """The command line as Settings; exits with a usage error like argparse on a bad value."""
    ap = build_parser()
    a = ap.parse_args(argv)
    properties: dict[str, str] = {}
    for kv in a.kafka_property:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            ap.error(f"--kafka-property {kv!r}: expected KEY=VALUE")
        properties[k] = v
    sinks: list[str] = []
    if a.sinks is not None:
        try:
            sinks = sink_list(a.sinks)
        except ValueError as e:
            ap.error(f"--sinks: {e}")
        if a.crash_loop:
            ap.error("--sinks and --crash-loop are separate runs")
    selected = WORKLOADS
    if sinks and a.workloads is None:
        selected = [w for w in WORKLOADS if w.name in SINK_WORKLOADS]
    elif a.workloads == "none":
        selected = []
    elif a.workloads:
        names = a.workloads.split(",")
        unknown = set(names) - {w.name for w in WORKLOADS}
        if unknown:
            ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
        selected = [w for w in WORKLOADS if w.name in names]
    if a.profile == "perf" and run(["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "true"],
                                   check=False).returncode != 0:
        ap.error("perf record does not work here; try --profile callgrind")
    return Settings(
        quick=a.quick,
        workloads=list(selected),
        repeat=a.repeat if a.repeat is not None else 1 if a.quick or sinks else 3,
        live=not a.no_live,
        live_seconds=a.live_seconds if a.live_seconds is not None else 10 if a.quick else 30,
        live_consumer=a.live_consumer,
        live_rates=a.live_rates,
        # 0 with --brokers: one topic for the whole phase.
        live_topic_seconds=a.live_topic_seconds if a.live_topic_seconds is not None else 0 if a.brokers else 20,
        fetch_wait_ms=a.fetch_wait_ms,
        rtt_sweep=a.rtt_sweep,
        rtt_ms=a.rtt_ms,
        rtt_lingers=a.rtt_lingers,
        rtt_rate=a.rtt_rate,
        rtt_seconds=a.rtt_seconds,
        profile=a.profile,
        partitions=a.partitions,
        kafka_properties=properties,
        pg_url=a.pg_url,
        brokers=a.brokers,
        out=a.out,
        skip_build=a.skip_build,
        timeout=a.timeout,
        crash_loop=a.crash_loop,
        crash_rate=a.crash_rate,
        crash_seconds=a.crash_seconds,
        crash_kills=a.crash_kills,
        crash_seed=a.crash_seed,
        relay_bin=a.relay_bin,
        consume_bin=a.consume_bin,
        relay_setting=a.relay_setting,
        sinks=sinks,
    )
