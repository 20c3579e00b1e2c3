"""The three catch-up measurements of one WAL range: the read limit (pg_recvlogical), the
relay catching up from its slot, and the write limit (examples/bench_producer)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from ..context import Bench
from ..cpu import CpuMeter, proc_cpu_seconds, proc_cpu_split, proc_ctx_switches, proc_status_kb
from ..database import SlotWatch
from ..metrics import prom_samples, prom_sum, scrape
from ..processes import CLEANUP, BenchError, free_port, http_get, log, run, spawn, stop_process
from ..relay import relay_config, relay_env
from ..servers import pg_bin
from ..settings import KEYS, PRODUCER_BIN, RELAY_BIN


def run_read_limit(b: Bench, *, slot: str, publication: str, end: str, events: int) -> dict:
    watch = SlotWatch(b.servers.db, slot, end)
    meter = CpuMeter()
    t0 = time.monotonic()
    p = spawn([pg_bin() / "pg_recvlogical", "-d", b.servers.url, "--slot", slot, "--start",
               "-o", "proto_version=1", "-o", f"publication_names={publication}",
               "-f", "/dev/null", "--endpos", end, "--no-loop"],
              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while p.poll() is None:
        watch.poll()
        time.sleep(0.02)
    secs = time.monotonic() - t0
    if p.returncode != 0:
        raise BenchError(f"pg_recvlogical failed: {p.stderr.read().decode()}")
    ws = watch.walsender_cpu_seconds()
    return {"seconds": secs, "events_per_s": events / secs, "walsender_cpu_s": ws,
            "walsender_cpu_s_per_million_events": ws / events * 1e6 if ws is not None else None,
            "walsender_busy": ws / secs if ws is not None else None,
            "startup_s": watch.first_active - t0 if watch.first_active else None, **meter.stop()}


def _relay_command(b: Bench, cfg: Path, name: str, profile: str | None) -> list:
    cmd = [RELAY_BIN, "run", "--config", cfg]
    if profile == "callgrind":
        # valgrind runs the relay in its own process: same pid.
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={b.out / f'callgrind-{name}.out'}", *cmd]
    elif profile == "perf":
        # perf starts the relay itself so every thread is sampled from the first instruction.
        cmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
               "-o", b.out / f"perf-{name}.data", "--", *cmd]
    return cmd


def _perf_child(p: subprocess.Popen, log_path: Path) -> int:
    """The pid of the relay perf record started."""
    while True:
        kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        if p.poll() is not None:
            raise BenchError(f"perf record failed; see {log_path}")
        time.sleep(0.005)


class BrokerStall:
    """Freezes our tansu (SIGSTOP) `after` seconds after the relay started streaming, for
    `seconds`; a no-op without a stall or without our own tansu."""

    def __init__(self, tansu: subprocess.Popen | None, stall: tuple[float, float] | None):
        self.tansu = tansu if stall else None
        self.stall = stall
        self.state = "before"
        if self.tansu:
            t = self.tansu
            CLEANUP.add("tansu SIGCONT", lambda: t.poll() is None and t.send_signal(signal.SIGCONT))

    def step(self, first_active: float | None) -> None:
        if not self.tansu or first_active is None:
            return
        now = time.monotonic() - first_active
        if self.state == "before" and now >= self.stall[0]:
            os.kill(self.tansu.pid, signal.SIGSTOP)
            self.state = "stopped"
        elif self.state == "stopped" and now >= self.stall[0] + self.stall[1]:
            os.kill(self.tansu.pid, signal.SIGCONT)
            self.state = "after"

    def end(self) -> None:
        if self.state == "stopped":
            os.kill(self.tansu.pid, signal.SIGCONT)


def _follow_catchup(b: Bench, p: subprocess.Popen, watch: SlotWatch, stall: BrokerStall, *,
                    t0: float, end: str, metrics_url: str, log_path: Path) -> tuple[float, float]:
    """Waits until the slot confirms `end`, driving the stall; returns the largest
    records-in-flight and producer-queue gauges seen."""
    deadline = t0 + b.settings.timeout
    max_in_flight = max_queue = 0.0
    next_scrape = t0
    while True:
        if p.poll() is not None:
            raise BenchError(f"relay exited with {p.returncode} during catch-up; see {log_path}")
        if watch.poll():
            break
        if time.monotonic() > deadline:
            raise BenchError(f"relay did not confirm {end} within {b.settings.timeout} s")
        stall.step(watch.first_active)
        if time.monotonic() >= next_scrape:
            # The gauges are refreshed every status interval (100 ms); a scrape every 250 ms is enough.
            next_scrape = time.monotonic() + 0.25
            try:
                g = scrape(metrics_url, timeout=1)
                max_in_flight = max(max_in_flight, g.get("outbox_relay_records_in_flight", 0.0))
                max_queue = max(max_queue, g.get("outbox_relay_producer_queue_depth", 0.0))
            except OSError:
                pass
        time.sleep(0.02)
    return max_in_flight, max_queue


def _stop_relay(p: subprocess.Popen, pid: int, log_path: Path) -> None:
    if pid != p.pid:
        os.kill(pid, signal.SIGTERM)  # perf exits after its workload, writing its data
        try:
            p.wait(600)
        except subprocess.TimeoutExpired:
            stop_process(p, signal.SIGINT, timeout=600)
    stop_process(p, signal.SIGTERM, timeout=60)
    if p.returncode != 0:
        log(f"warning: relay exited with {p.returncode} on SIGTERM; see {log_path}")


def run_relay_catchup(b: Bench, *, slot: str, publication: str, table: str, end: str, events: int,
                      name: str, profile: str | None = None,
                      stall: tuple[float, float] | None = None, extra_config: str = "",
                      stdout_sink: bool = False, watch_slot: str | None = None,
                      sink_cpu: Callable[[], float | None] | None = None) -> dict:
    """Starts the relay on a slot whose whole range is backlog and waits until the slot's
    confirmed_flush_lsn reaches `end`. profile: None, "perf" or "callgrind".
    Each run writes to topics of its own, like bench_producer.
    stall: (after, seconds): freeze the broker (SIGSTOP to our tansu) `after` seconds after
    the relay started streaming, for `seconds`, to see how much the relay holds while Kafka does not ack.
    extra_config: TOML appended to the relay's config (bench/shards.py: [shard]).
    stdout_sink: [sink] kind = "stdout" with confirm = true instead of Kafka, its output to /dev/null;
    records written (events_produced) are counted instead of broker acknowledgements.
    watch_slot: the slot the relay streams from, when not `slot` itself (a shard's).
    sink_cpu: the sink server's CPU seconds so far (the sink comparison), read before and
    after the catch-up."""
    srv = b.servers
    cfg = b.out / f"relay-{name}.toml"
    log_path = b.logs / f"relay-{name}.log"
    mport = free_port()
    metrics_url = f"http://127.0.0.1:{mport}"
    relay_config(cfg, url=srv.url, brokers=srv.brokers, slot=slot, publication=publication, table=table,
                 partitions=b.settings.partitions, metrics=f"127.0.0.1:{mport}",
                 topic=f"bench.relay.{{aggregate_type}}.{name}", properties=b.settings.kafka_properties,
                 extra=extra_config + ('[sink]\nkind = "stdout"\nconfirm = true\n' if stdout_sink else ""))
    tansu = srv.tansu
    tansu_cpu0 = proc_cpu_seconds(tansu.pid) if tansu else None
    sink_cpu0 = sink_cpu() if sink_cpu else None
    watch = SlotWatch(srv.db, watch_slot or slot, end)
    cmd = _relay_command(b, cfg, name, profile)
    meter = CpuMeter()
    t0 = time.monotonic()
    p = spawn(cmd, log_path=log_path, env=relay_env(), stdout=subprocess.DEVNULL if stdout_sink else None)
    pid = _perf_child(p, log_path) if profile == "perf" else p.pid
    broker_stall = BrokerStall(tansu, stall)
    max_in_flight, max_queue = _follow_catchup(b, p, watch, broker_stall, t0=t0, end=end,
                                               metrics_url=metrics_url, log_path=log_path)
    secs = time.monotonic() - t0
    broker_stall.end()
    load = meter.stop()
    user_s, system_s = proc_cpu_split(pid) or (0.0, 0.0)
    cpu = user_s + system_s
    hwm_kb = proc_status_kb(pid, "VmHWM")
    switches = proc_ctx_switches(pid)
    tansu_cpu = proc_cpu_seconds(tansu.pid) - tansu_cpu0 if tansu else None
    sink_cpu1 = sink_cpu() if sink_cpu else None
    sink_server_cpu = sink_cpu1 - sink_cpu0 if sink_cpu0 is not None and sink_cpu1 is not None else None
    _, text = http_get(f"{metrics_url}/metrics")
    samples = prom_samples(text)
    acked = prom_sum(samples, "outbox_relay_events_produced_total" if stdout_sink else "outbox_relay_events_acked_total")
    failed = prom_sum(samples, "outbox_relay_events_failed_total")
    _stop_relay(p, pid, log_path)
    if acked < events:
        raise BenchError(f"slot confirmed {end} but only {acked:.0f} of {events} records were acknowledged")
    ws = watch.walsender_cpu_seconds()
    return {
        "seconds": secs,
        "events_per_s": events / secs,
        "startup_s": watch.first_active - t0 if watch.first_active else None,
        "cpu_s": cpu,
        "cpu_s_per_million_events": cpu / events * 1e6,
        "user_s": user_s,
        "system_s": system_s,
        "peak_rss_mb": hwm_kb / 1024 if hwm_kb else None,
        "context_switches_per_event": switches / events if switches is not None else None,
        "max_records_in_flight": int(max_in_flight),
        "max_producer_queue_depth": int(max_queue),
        "walsender_cpu_s": ws,
        "walsender_cpu_s_per_million_events": ws / events * 1e6 if ws is not None else None,
        "walsender_busy": ws / secs if ws is not None else None,
        "tansu_cpu_s": tansu_cpu,
        "sink_server_cpu_s": sink_server_cpu,
        "acked": int(acked),
        "failed": int(failed),
        **load,
    }


def run_write_limit(b: Bench, *, topic: str, events: int, payload_bytes: int) -> dict:
    tansu = b.servers.tansu
    tansu_cpu0 = proc_cpu_seconds(tansu.pid) if tansu else None
    meter = CpuMeter()
    r = run([PRODUCER_BIN, "--brokers", b.servers.brokers, "--topic", topic, "--count", events,
             "--payload-bytes", payload_bytes, "--keys", KEYS, "--partitions", b.settings.partitions,
             *[a for k, v in b.settings.kafka_properties.items() for a in ("--property", f"{k}={v}")]],
            timeout=b.settings.timeout)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(meter.stop())
    res["tansu_cpu_s"] = proc_cpu_seconds(tansu.pid) - tansu_cpu0 if tansu else None
    return res


def best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])
