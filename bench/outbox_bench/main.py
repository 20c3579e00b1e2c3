"""bench/run.py's main: settings, build, servers, then the phases in order, then the results."""
from __future__ import annotations

import secrets
import time

from .context import Bench, output_dirs
from .cpu import CpuMeter
from .phases.live import run_live
from .phases.profile import run_profile
from .phases.rtt import run_rtt_sweep
from .phases.sinks import run_sinks
from .phases.workload import run_workload
from .processes import BenchError, cargo_build, log, run_main
from .report import git_info, machine, markdown, sinks_markdown, targets, write_results
from .servers import server_settings, start_servers
from .sink_servers import start_sink_servers
from .settings import KEYS, REPO, Settings, parse_args


def build() -> None:
    log("cargo build --release (outbox-relay, examples bench_producer, bench_latency, bench_mock_broker)")
    cargo_build(REPO, ["--bin", "outbox-relay", "--example", "bench_producer", "--example", "bench_latency",
                       "--example", "bench_mock_broker", "--example", "consume"])


def crash_loop(b: Bench, started: str) -> None:
    """--crash-loop: bench/crashloop.py only (beside this package, on sys.path through bench/run.py)."""
    import crashloop
    r = crashloop.run_crash_loop(b)
    r.update(started=started, machine=machine(), git=git_info())
    write_results(b.out, "crashloop", r, crashloop.markdown)


def sink_comparison(b: Bench, started: str, pg: dict[str, str], t_start: float) -> None:
    """--sinks: the sink comparison only (phases/sinks.py), results.json and results.md."""
    s = b.settings
    whole = CpuMeter()
    mach = machine()
    servers = start_sink_servers(s.sinks, b.logs, brokers=b.servers.brokers, tansu=b.servers.tansu,
                                 tansu_version=mach.get("tansu"))
    res = results_header(b, started, pg)
    del res["workloads"]
    res["mode"] = "sinks"
    res["settings"]["sinks"] = s.sinks
    res["settings"]["live_seconds"] = s.live_seconds
    res["settings"]["live_rates"] = s.live_rates
    res["settings"]["live_consumer"] = False
    res["settings"]["live_topic_seconds"] = 0
    res["sink_servers"] = {k: {"url": v.url, "durability": v.durability, "version": v.version,
                               "relay_config": v.config("<run>")} for k, v in servers.items()}
    res.update(run_sinks(b, servers))
    res["other_load_cores_whole_run"] = whole.stop()["other_load_cores"]
    res["total_seconds"] = time.monotonic() - t_start
    write_results(b.out, "results", res, sinks_markdown)


def results_header(b: Bench, started: str, pg: dict[str, str]) -> dict:
    """results.json before the measurements: machine, commit and settings."""
    s = b.settings
    return {
        "started": started,
        "quick": s.quick,
        "machine": machine(),
        "git": git_info(),
        "settings": {
            "postgresql": pg,
            "workload_writer": "PL/pgSQL loop, COMMIT per transaction, synchronous_commit=off for that session only",
            "live_writer": "pgbench -R (Poisson arrivals at the target mean rate), synchronous_commit=on",
            "broker": "tansu, memory storage" if b.servers.tansu else b.servers.brokers,
            "partitions": s.partitions,
            "kafka_properties": dict(s.kafka_properties),
            "keys": KEYS,
            "repeat": s.repeat,
            "consumer_fetch_wait_max_ms": s.fetch_wait_ms,
            "live_topic_seconds": s.live_topic_seconds,
            "relay": {"status_interval_ms": 100, "kafka.create_topics": True,
                      "producer": "relay defaults: linger.ms=10, queue.buffering.max.kbytes=65536, "
                                  "message.timeout.ms=300000, enable.idempotence=true, acks=all"},
        },
        "workloads": [],
    }


def main(argv: list[str] | None = None) -> int:
    s: Settings = parse_args(argv)
    run_id = secrets.token_hex(3)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out, logs = output_dirs(s.out, "%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    if not s.skip_build:
        build()
    whole = CpuMeter()
    b = Bench(settings=s, run_id=run_id, out=out, logs=logs, servers=start_servers(s, logs))
    pg = server_settings(b.servers.db)
    if pg["wal_level"] != "logical":
        raise BenchError("wal_level must be logical")
    if s.crash_loop:
        crash_loop(b, started)
        return 0
    if s.sinks:
        sink_comparison(b, started, pg, t_start)
        return 0

    res = results_header(b, started, pg)
    for w in s.workloads:
        res["workloads"].append(run_workload(b, w))
    if s.live:
        res["live"] = run_live(b)
    res["other_load_cores_whole_run"] = whole.stop()["other_load_cores"]
    if s.rtt_sweep:
        res["rtt_sweep"] = run_rtt_sweep(b)
    if s.profile:
        res["profile"] = run_profile(b, s.profile)
    res["total_seconds"] = time.monotonic() - t_start
    res["targets"] = targets(res)
    write_results(b.out, "results", res, markdown)
    return 0


def entry() -> int:
    """main() with signal handling and cleanup; the process's exit code."""
    return run_main(main)
