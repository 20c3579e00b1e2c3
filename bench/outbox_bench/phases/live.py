"""Live latency: the relay streaming while pgbench commits single-row transactions at
fixed rates, read from the relay's histogram and cross-checked by a consumer
(examples/bench_latency)."""
from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..context import Bench
from ..cpu import (CpuMeter, cores_between, cpu_by_command, proc_cpu_seconds, proc_status_kb, thread_cpu,
                   tree_cpu_seconds)
from ..database import SlotWatch, create_outbox, create_slot, drop_outbox, drop_slot, wal_end
from ..metrics import latency_percentiles, scrape
from ..processes import BenchError, free_port, log, spawn, stop_process
from ..relay import relay_config, start_relay
from ..report import other_load_note
from ..servers import pg_bin
from ..settings import LATENCY_BIN, RELAY_BIN


@dataclass
class LiveRelay:
    """The relay of one live phase: its own table, publication and slot, running
    through all of the phase's rates."""
    name: str
    table: str
    publication: str
    slot: str
    metrics: str  # http://127.0.0.1:<port>
    proc: subprocess.Popen
    log_path: Path


@dataclass
class RateTopics:
    """Where one rate's rows go: with a window, the writer moves to a new aggregate type
    (so a new topic) every `window` seconds of its clock."""
    atype: str
    window: int
    topics: list[str]
    atype_sql: str  # the aggregate_type expression of the INSERT


@dataclass
class Load:
    """What was measured while pgbench committed at one rate."""
    rate: int
    duration: int
    clients: int
    pgbench_out: str
    pgbench_err: str
    scrapes: list[dict]  # the relay's metrics before the rate and after every minute
    cpu_marks: list[tuple[float, dict]]  # (time, CPU s by command) at the same points
    thread_marks: list[dict]  # the relay's CPU s by thread at the same points
    threads0: dict
    threads1: dict
    relay_cpu: float  # CPU s of the relay during the rate
    broker_cpu: float | None
    load: dict  # CpuMeter


def start_live_relay(b: Bench, name: str, brokers: str, properties: dict[str, str] | None,
                     create_topics: bool, extra: str = "") -> LiveRelay:
    """extra: TOML appended to the relay's config ([sink] and its section for another sink)."""
    db = b.servers.db
    table = f"outbox_{b.run_id}_{name}"
    publication = f"bench_{b.run_id}_{name}"
    slot = f"bench_{b.run_id}_{name}_relay"
    create_outbox(db, table, publication)
    create_slot(db, slot)
    cfg = b.out / f"relay-{name}.toml"
    mport = free_port()
    metrics = f"http://127.0.0.1:{mport}"
    relay_config(cfg, url=b.servers.url, brokers=brokers, slot=slot, publication=publication, table=table,
                 partitions=b.settings.partitions, metrics=f"127.0.0.1:{mport}",
                 create_topics=create_topics, properties={**b.settings.kafka_properties, **(properties or {})},
                 extra=extra)
    log_path = b.logs / f"relay-{name}.log"
    proc = start_relay(RELAY_BIN, cfg, log_path, metrics, timeout=30, interval=0.05)
    return LiveRelay(name=name, table=table, publication=publication, slot=slot, metrics=metrics,
                     proc=proc, log_path=log_path)


def rate_topics(b: Bench, name: str, rate: int, duration: int, window: int) -> RateTopics:
    # With --live-topic-seconds N the writer moves to a new aggregate type (so
    # a new topic) every N seconds of its clock: tansu 0.6's in-memory engine
    # lists every stored batch of a partition on each fetch, so one topic
    # that keeps growing makes the consumer measure tansu (docs/benchmarks.md).
    atype = f"{name}{rate}_{b.run_id}"
    if window:
        first = int(time.time() // window)
        last = int((time.time() + duration + 60) // window)
        topics = [f"outbox.event.{atype}_{k}" for k in range(first, last + 1)]
        atype_sql = f"'{atype}_' || floor(extract(epoch FROM clock_timestamp()) / {window})::bigint"
    else:
        topics = [f"outbox.event.{atype}"]
        atype_sql = f"'{atype}'"
    return RateTopics(atype=atype, window=window, topics=topics, atype_sql=atype_sql)


def start_consumer(b: Bench, brokers: str, t: RateTopics, duration: int) -> subprocess.Popen:
    """examples/bench_latency on the rate's topics, once it says it is ready."""
    topic_args = [a for topic in t.topics for a in ("--topic", topic)] + ["--topic-seconds", t.window]
    consumer = spawn([LATENCY_BIN, "--brokers", brokers, *topic_args,
                      "--partitions", b.settings.partitions, "--idle-s", "4",
                      "--fetch-wait-ms", b.settings.fetch_wait_ms,
                      "--timeout-s", str(duration + 300)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = consumer.stderr.readline().decode()
    if "ready" not in line:
        raise BenchError(f"bench_latency did not start: {line}{consumer.stderr.read().decode()}")
    return consumer


def write_pgbench_script(path: Path, table: str, atype_sql: str, pad: str) -> None:
    path.write_text(
        "\\set k random(0, 999)\n"
        f"INSERT INTO public.{table} (aggregate_type, aggregate_id, event_type, payload) "
        f"VALUES ({atype_sql}, 'agg-' || :k, 'BenchEvent', "
        f"jsonb_build_object('t', extract(epoch FROM clock_timestamp()), 'pad', '{pad}'));\n")


def drive_pgbench(b: Bench, relay: LiveRelay, script: Path, rate: int, duration: int,
                  broker_pid: int | None) -> Load:
    """pgbench -R rate for `duration` s; the relay's metrics and the machine's CPU by
    command are read before, every minute and after. broker_pid: the broker's process,
    counted with everything it started (a server run by a script, like rabbitmq-server)."""
    pid = relay.proc.pid
    before = scrape(relay.metrics)
    cpu0 = proc_cpu_seconds(pid)
    broker_cpu0 = tree_cpu_seconds(broker_pid) if broker_pid else None
    threads0 = thread_cpu(pid)
    meter = CpuMeter()
    clients = 4 if rate <= 1000 else 8
    # pgbench in the background: the relay's histogram is scraped every minute meanwhile.
    # The database is positional: pgbench's "-d" is --debug.
    progress = ["-P", "60"] if duration > 60 else []
    proc = spawn([pg_bin() / "pgbench", "-n", "-M", "prepared", "-f", script, "-c", clients, "-j", "2",
                  "-R", rate, "-T", duration, *progress, b.servers.url],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scrapes = [before]
    cpu_marks = [(time.monotonic(), cpu_by_command())]
    thread_marks = [thread_cpu(pid)]
    next_scrape = time.monotonic() + 60
    give_up = time.monotonic() + duration + 120
    # Sleep between checks (pgbench's little output fits the pipe until the
    # end): a communicate() loop here cost this script a growing share of a core.
    while proc.poll() is None:
        if time.monotonic() > give_up:
            stop_process(proc)
            raise BenchError(f"pgbench did not finish within {duration + 120} s")
        if duration > 60 and time.monotonic() >= next_scrape:
            scrapes.append(scrape(relay.metrics))
            cpu_marks.append((time.monotonic(), cpu_by_command()))
            thread_marks.append(thread_cpu(pid))
            next_scrape += 60
        time.sleep(0.5)
    pg_out, pg_err = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"pgbench exited with {proc.returncode}: {pg_err.strip()[-2000:]}")
    load = meter.stop()
    cpu = proc_cpu_seconds(pid) - cpu0
    threads1 = thread_cpu(pid)
    broker_cpu = tree_cpu_seconds(broker_pid) - broker_cpu0 if broker_pid else None
    return Load(rate=rate, duration=duration, clients=clients, pgbench_out=pg_out, pgbench_err=pg_err,
                scrapes=scrapes, cpu_marks=cpu_marks, thread_marks=thread_marks, threads0=threads0,
                threads1=threads1, relay_cpu=cpu, broker_cpu=broker_cpu, load=load)


def wait_confirmed(b: Bench, relay: LiveRelay) -> None:
    """Until the relay's slot confirms everything written so far."""
    db = b.servers.db
    watch = SlotWatch(db, relay.slot, wal_end(db))
    deadline = time.monotonic() + 120
    while not watch.poll():
        if relay.proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"relay did not confirm the live load; see {relay.log_path}")
        time.sleep(0.05)


def consumer_result(consumer: subprocess.Popen | None) -> dict:
    """bench_latency's summary once it has read everything (idle 4 s)."""
    if consumer is None:
        return {"records": None, "consumer_ms": None, "broker_timestamp_ms": None, "consumer_ms_by_minute": []}
    out, err = consumer.communicate(timeout=600)
    if consumer.returncode != 0:
        raise BenchError(f"bench_latency failed: {err.decode()}")
    return json.loads(out.decode().strip().splitlines()[-1])


def summarize(ld: Load, after: dict, cons: dict, *, rows: int, topics_written: int, window: int) -> dict:
    """One rate's result (results.json "live")."""
    before, duration = ld.scrapes[0], ld.duration
    pg_lat = re.search(r"latency average = ([\d.]+) ms", ld.pgbench_out)
    lag = re.search(r"rate limit schedule lag: avg ([\d.]+)", ld.pgbench_out)
    hist = latency_percentiles(before, after)
    scrapes = ld.scrapes + [after]
    hist_by_minute = [latency_percentiles(a, b) for a, b in zip(scrapes, scrapes[1:])] if len(scrapes) > 2 else []
    # The interval after the last full minute is only the tail of the run:
    # left out when it holds less than half a minute's events.
    if len(hist_by_minute) > 1 and (hist_by_minute[-1].get("n") or 0) < 0.5 * (hist_by_minute[-2].get("n") or 0):
        hist_by_minute.pop()
    # pgbench's own commit latency per minute (-P 60), to tell the database's
    # commit path from the relay when the relay's histogram moves.
    # Under -R, "lat" counts from the scheduled start: it includes "lag", the
    # time a transaction waited for a pgbench client. Both are kept.
    pg_minutes = [float(m) for m in re.findall(r"progress: [\d.]+ s, [\d.]+ tps, lat ([\d.]+) ms", ld.pgbench_err)]
    pg_lag_minutes = [float(m) for m in re.findall(r"progress: [\d.]+ s, .*? lag ([\d.]+) ms", ld.pgbench_err)]
    # Cores used per command name per minute: what takes more CPU as a run goes on?
    cores_by_minute = [cores_between(a, b, t1 - t0, 0.01)
                       for (t0, a), (t1, b) in zip(ld.cpu_marks, ld.cpu_marks[1:])]
    relay_threads_by_minute = [
        cores_between(a, b, t1 - t0, 0.005)
        for (t0, _), (t1, _), a, b in zip(ld.cpu_marks, ld.cpu_marks[1:], ld.thread_marks, ld.thread_marks[1:])]
    return {
        "cores_by_command_by_minute": cores_by_minute,
        "relay_cores_by_thread_by_minute": relay_threads_by_minute,
        "relay_in_flight_by_minute": [sc.get("outbox_relay_records_in_flight") for sc in scrapes[1:]],
        "relay_producer_queue_by_minute": [sc.get("outbox_relay_producer_queue_depth") for sc in scrapes[1:]],
        "relay_histogram_by_minute": hist_by_minute,
        "pgbench_latency_by_minute_ms": pg_minutes,
        "pgbench_schedule_lag_by_minute_ms": pg_lag_minutes,
        "relay_lag_bytes_by_minute": [sc.get("outbox_relay_replication_lag_bytes") for sc in scrapes[1:]],
        "target_rate": ld.rate,
        "topic_seconds": window or None,
        "topics_written": topics_written,
        "seconds": duration,
        "events": rows,
        "achieved_rate": rows / duration,
        "pgbench_clients": ld.clients,
        "pgbench_commit_latency_avg_ms": float(pg_lat.group(1)) if pg_lat else None,
        "pgbench_schedule_lag_avg_ms": float(lag.group(1)) if lag else None,
        "relay_histogram": hist,
        "consumer": cons,
        "relay_cpu_s_per_million_events": ld.relay_cpu / rows * 1e6 if rows else None,
        "relay_cores": ld.relay_cpu / duration,
        "broker_cores": ld.broker_cpu / duration if ld.broker_cpu is not None else None,
        # The relay's own view of the broker (librdkafka statistics, last 10 s).
        "broker_rtt_gauge": {k: v for k, v in after.items() if k.startswith("outbox_relay_broker_rtt_seconds")},
        "consumer_missed_records": rows - cons["records"] if cons["records"] is not None else None,
        "relay_cores_by_thread": cores_between(ld.threads0, ld.threads1, duration),
        **ld.load,
    }


def log_rate(res: dict, *, consumed: bool) -> None:
    rate, duration, rows, cons = res["target_rate"], res["seconds"], res["events"], res["consumer"]
    for i, cores in enumerate(res["cores_by_command_by_minute"]):
        log(f"live {rate:,}/s: minute {i + 1} cores by command: "
            + ", ".join(f"{k} {v:.2f}" for k, v in list(cores.items())[:6]))
    for i, cores in enumerate(res["relay_cores_by_thread_by_minute"]):
        log(f"live {rate:,}/s: minute {i + 1} relay cores by thread: "
            + ", ".join(f"{k} {v:.3f}" for k, v in cores.items()))
    hist_by_minute = res["relay_histogram_by_minute"]
    if hist_by_minute:
        log("live {:,}/s: relay histogram p99 by minute (ms): {}; pgbench latency / schedule lag by minute (ms): {}".format(
            rate, ", ".join(f"{h.get('p99_est_ms') or 0:.1f}" for h in hist_by_minute),
            ", ".join(f"{m:.1f} / {g:.1f}" for m, g in zip(res["pgbench_latency_by_minute_ms"],
                                                           res["pgbench_schedule_lag_by_minute_ms"]))))
    if consumed and cons["records"] != rows:
        log(f"warning: the consumer saw {cons['records']} records, the table has {rows}")
    by_minute = [m["p99"] for m in cons.get("consumer_ms_by_minute", []) if m]
    if len(by_minute) > 1:
        log("live {:,}/s: consumer p99 by minute (ms): {}".format(
            rate, ", ".join(f"{p:.1f}" for p in by_minute)))
    c = cons["consumer_ms"]
    seen = (f"consumer p50 {c['p50']:.1f} p99 {c['p99']:.1f} p99.9 {c['p99_9']:.1f} max {c['max']:.1f} ms; "
            if c else "")
    log(f"live {rate:,}/s: achieved {rows / duration:,.0f}/s; {seen}"
        f"histogram p99 ≤ {res['relay_histogram'].get('p99_le_ms')} ms{other_load_note(res)}")


def run_rate(b: Bench, relay: LiveRelay, *, brokers: str, rate: int, duration: int, window: int,
             live_consumer: bool, broker_pid: int | None, pad: str) -> dict:
    """One commit rate: consumer, pgbench, the relay confirming everything, the result."""
    t = rate_topics(b, relay.name, rate, duration, window)
    log(f"live: {rate:,} single-row transactions/s for {duration} s (pgbench -R)"
        + (f", a new topic every {window} s" if window else ""))
    consumer = start_consumer(b, brokers, t, duration) if live_consumer else None
    script = b.out / f"{relay.name}-{rate}.sql"
    write_pgbench_script(script, relay.table, t.atype_sql, pad)
    ld = drive_pgbench(b, relay, script, rate, duration, broker_pid)
    (b.logs / f"pgbench-{relay.name}-{rate}.log").write_text(ld.pgbench_out + ld.pgbench_err)
    wait_confirmed(b, relay)
    after = scrape(relay.metrics)
    cons = consumer_result(consumer)
    rows, topics_written = (int(n) for n in b.servers.db.one(
        f"SELECT count(*), count(DISTINCT aggregate_type) FROM public.{relay.table} "
        f"WHERE aggregate_type = '{t.atype}' OR starts_with(aggregate_type, '{t.atype}_')").split("|"))
    res = summarize(ld, after, cons, rows=rows, topics_written=topics_written, window=window)
    rss = proc_status_kb(relay.proc.pid, "VmRSS")
    res["relay_rss_mb"] = rss / 1024 if rss else None  # at the end of the rate
    log_rate(res, consumed=consumer is not None)
    return res


def run_live(b: Bench, *, name: str = "live", brokers: str | None = None, rates: list[int] | None = None,
             seconds: int | None = None, consumer: bool | None = None, topic_seconds: int | None = None,
             properties: dict[str, str] | None = None, create_topics: bool = True,
             broker_pid: int | None = None, extra: str = "") -> list[dict]:
    """The relay streaming while pgbench commits at each rate. The keyword arguments
    override the command line (the RTT sweep runs it against a mock broker; the sink
    comparison passes another sink's [sink] section as `extra`)."""
    s = b.settings
    brokers = brokers or b.servers.brokers
    rates = rates or s.live_rates
    live_consumer = s.live_consumer if consumer is None else consumer
    broker_pid = broker_pid or (b.servers.tansu.pid if b.servers.tansu else None)
    window = s.live_topic_seconds if topic_seconds is None else topic_seconds
    relay = start_live_relay(b, name, brokers, properties, create_topics, extra)
    duration = seconds or s.live_seconds
    pad = secrets.token_hex(100)[:165]  # the payload renders to ~200 bytes
    results = [run_rate(b, relay, brokers=brokers, rate=rate, duration=duration, window=window,
                        live_consumer=live_consumer, broker_pid=broker_pid, pad=pad) for rate in rates]
    hwm = proc_status_kb(relay.proc.pid, "VmHWM")
    for r in results:
        r["relay_peak_rss_mb_whole_live_run"] = hwm / 1024 if hwm else None
    stop_process(relay.proc, signal.SIGTERM, timeout=60)
    drop_slot(b.servers.db, relay.slot)
    drop_outbox(b.servers.db, relay.table, relay.publication)
    return results
