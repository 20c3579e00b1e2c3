#!/usr/bin/env python3
"""outbox-relay polling benchmark (issue 15; docs/benchmarks.md, "Polling").

The WAL mode and the polling mode (`[source] kind = "poll"`) on the same PostgreSQL
and the same tansu, in one run:
  1. catch-up: the same backlog (transactions of 100 rows of ~200 bytes) written first,
     then the relay started; events/s until the slot confirmed its end (WAL) or the
     table is empty (poll, after_send = delete and mark);
  2. live: pgbench -R single-row transactions at each rate (1,000 and 5,000/s), commit
     to consumer p50/p99 (examples/bench_latency: from the row's clock_timestamp() to
     the consumer) and commit to broker acknowledgement (the relay's histogram;
     track_commit_timestamp = on, so both modes count from the commit), for the WAL
     mode and for polling at each interval (10, 100, 1000 ms) without and with NOTIFY;
  3. PostgreSQL CPU per 1,000 events in both phases: the backend serving the polling
     relay (the holder of its leader lock) against the walsender (and the WAL relay's
     SQL backends: checkpoint writes, slot gauges), from /proc/<pid>/stat, plus
     autovacuum and all of PostgreSQL;
  4. the outbox table after N minutes of polling with deletes at a steady rate: size,
     index size, live and dead tuples, autovacuum runs, sampled every 30 s.

    bench/poll.py                        # catch-up 100,000 rows, 20 s per live point, 3 min of deletes
    bench/poll.py --bloat-minutes 10 --live-seconds 30

Reuses bench/run.py's package bench/outbox_bench (servers, workload writer, pgbench
driver, latency consumer, metrics and CPU readers); Python 3.11 standard library only.
"""
from __future__ import annotations

import argparse
import json
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from outbox_bench.context import Bench, output_dirs
from outbox_bench.cpu import CpuMeter, cpu_by_command, proc_cpu_seconds
from outbox_bench.database import SlotWatch, create_outbox, create_slot, wait_flushed, wal_end, write_workload
from outbox_bench.metrics import latency_percentiles, prom_sum, scrape
from outbox_bench.phases.live import (LiveRelay, consumer_result, drive_pgbench, rate_topics, start_consumer,
                                      write_pgbench_script)
from outbox_bench.processes import BenchError, cargo_build, free_port, log, run, run_main, spawn, stop_process
from outbox_bench.relay import relay_config, start_relay
from outbox_bench.report import git_info, machine
from outbox_bench.servers import PG_SETTINGS, Servers, Sql, pg_bin, server_settings, start_postgres, start_tansu
from outbox_bench.settings import REPO, RELAY_BIN, Settings, Workload

# Commit timestamps, so the polling relay's histogram counts from the commit as the WAL mode's does.
POLL_PG_SETTINGS = {**PG_SETTINGS, "track_commit_timestamp": "on"}
LOCK_CLASS = 0x6F627872  # the polling leader lock's first key (src/poll/query.rs)


@dataclass
class Mode:
    """One relay configuration."""
    name: str
    poll: bool
    interval_ms: int = 100
    notify: bool = False
    after_send: str = "delete"
    batch: int = 5000

    def label(self) -> str:
        if not self.poll:
            return "WAL"
        return f"poll {self.interval_ms} ms" + (" + NOTIFY" if self.notify else "") + (
            f" ({self.after_send})" if self.after_send != "delete" else "") + (
            f", batch {self.batch}" if self.batch != 5000 else "")

    def extra(self) -> str:
        if not self.poll:
            return ""
        return (f'\n[source]\nkind = "poll"\n\n[poll]\ninterval_ms = {self.interval_ms}\n'
                f"max_interval_ms = {max(2000, self.interval_ms)}\nnotify = {str(self.notify).lower()}\n"
                f'after_send = "{self.after_send}"\nbatch_size = {self.batch}\n')


@dataclass
class Started:
    mode: Mode
    table: str
    slot: str
    publication: str
    cfg: Path
    relay: LiveRelay | None = None


def prepare(b: Bench, mode: Mode, tag: str) -> Started:
    """The mode's table (with a publication and a slot for the WAL mode, or `init` for
    polling) and its relay config; the relay is not started yet."""
    db = b.servers.db
    table = f"poll_{b.run_id}_{tag}"
    publication = f"bench_{b.run_id}_{tag}"
    slot = f"bench_{b.run_id}_{tag}"
    cfg = b.out / f"relay-{tag}.toml"
    mport = free_port()
    relay_config(cfg, url=b.servers.url, brokers=b.servers.brokers, slot=slot, publication=publication,
                 table=table, partitions=b.settings.partitions, metrics=f"127.0.0.1:{mport}",
                 extra=mode.extra())
    if mode.poll:
        db.query((REPO / "sql/001_outbox.sql").read_text().replace("public.outbox", f"public.{table}"))
        run([RELAY_BIN, "init", "--config", cfg])
    else:
        create_outbox(db, table, publication)
        create_slot(db, slot)
    return Started(mode=mode, table=table, slot=slot, publication=publication, cfg=cfg)


def launch(b: Bench, st: Started, tag: str) -> LiveRelay:
    metrics = "http://" + st.cfg.read_text().split('listen = "')[1].split('"')[0]
    log_path = b.logs / f"relay-{tag}.log"
    proc = start_relay(RELAY_BIN, st.cfg, log_path, metrics, timeout=60, interval=0.02)
    st.relay = LiveRelay(name=tag, table=st.table, publication=st.publication, slot=st.slot,
                         metrics=metrics, proc=proc, log_path=log_path)
    return st.relay


def serving_pids(db: Sql, st: Started) -> dict[str, int]:
    """PostgreSQL processes serving the relay: the polling connection (the leader lock's
    holder), or the walsender and the relay's SQL backends."""
    if st.mode.poll:
        pid = db.one(f"SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = {LOCK_CLASS} "
                     f"AND objid = 'public.{st.table}'::regclass::oid AND granted")
        return {"poll backend": int(pid)} if pid else {}
    out = {}
    ws = db.one(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{st.slot}'")
    if ws:
        out["walsender"] = int(ws)
    for i, pid in enumerate(db.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'outbox-relay' "
                                     "AND backend_type = 'client backend' ORDER BY pid")):
        out[f"relay SQL backend {i}"] = int(pid)
    return out


class PgCpu:
    """CPU seconds of the serving processes and of PostgreSQL by kind, from a start.
    `sample` keeps each process's latest reading, so one that exits (a session's
    connection closed) still counts what it used."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.p0 = {k: proc_cpu_seconds(p) or 0.0 for k, p in pids.items()}
        self.last = dict(self.p0)
        self.c0 = cpu_by_command()

    def sample(self) -> None:
        for k, p in self.pids.items():
            c = proc_cpu_seconds(p)
            if c is not None:
                self.last[k] = c

    def stop(self, events: int) -> dict:
        per_k = lambda s: round(s / events * 1000, 4) if events else None  # noqa: E731
        self.sample()
        serving = {k: self.last[k] - self.p0[k] for k in self.pids}
        c1 = cpu_by_command()
        kinds = {k: c1[k] - self.c0.get(k, 0.0) for k in c1 if k.startswith("postgres")}
        # An exited backend's CPU moves to the postmaster's children's time: the sum
        # over every kind is what PostgreSQL used (with the benchmark's own psql).
        total = sum(kinds.values())
        return {
            "postgres_cpu_ms_per_1000_events": per_k(total * 1000),
            "serving_cpu_s": {k: round(v, 3) for k, v in serving.items()},
            "serving_cpu_ms_per_1000_events": {k: per_k(v * 1000) for k, v in serving.items()},
            "postgres_cpu_ms_per_1000_events_by_kind": {k: per_k(v * 1000) for k, v in kinds.items() if v > 0.005},
        }


def drop(db: Sql, st: Started) -> None:
    """The mode's table (and slot, publication): no vacuum of it, no WAL kept for it, in
    the measurements that follow."""
    if not st.mode.poll:
        db.query(f"SELECT pg_drop_replication_slot('{st.slot}')")
        db.query(f"DROP PUBLICATION {st.publication}")
    db.query(f"DROP TABLE public.{st.table}")


def done(db: Sql, st: Started, end: str | None) -> bool:
    if not st.mode.poll:
        return SlotWatch(db, st.slot, end).poll()
    unsent = " WHERE sent_at IS NULL" if st.mode.after_send == "mark" else ""
    return db.one(f"SELECT NOT EXISTS (SELECT 1 FROM public.{st.table}{unsent})") == "t"


def catchup(b: Bench, mode: Mode, events: int) -> dict:
    tag = f"catchup_{mode.name}"
    st = prepare(b, mode, tag)
    db = b.servers.db
    w = Workload("tx100_200B", 100, 200, events, events)
    log(f"catch-up {mode.label()}: writing {events:,} rows")
    write_workload(b.servers.url, st.table, "c" + b.run_id, w, events)
    end = wal_end(db)
    wait_flushed(db, end)
    meter = CpuMeter()
    t0 = time.monotonic()
    relay = launch(b, st, tag)
    pg = PgCpu(serving_pids(db, st))
    cpu0 = proc_cpu_seconds(relay.proc.pid) or 0.0
    while not done(db, st, end):
        if relay.proc.poll() is not None or time.monotonic() - t0 > b.settings.timeout:
            raise BenchError(f"{mode.label()} did not catch up; see {relay.log_path}")
        pg.sample()
        time.sleep(0.05)
    secs = time.monotonic() - t0
    relay_cpu = (proc_cpu_seconds(relay.proc.pid) or 0.0) - cpu0
    after = scrape(relay.metrics)
    pg_cpu = pg.stop(events)
    stop_process(relay.proc, signal.SIGTERM, timeout=60)
    drop(db, st)
    r = {"mode": mode.label(), "events": events, "seconds": round(secs, 2), "events_per_s": round(events / secs),
         "relay_cpu_ms_per_1000_events": round(relay_cpu / events * 1e6, 2),
         "polls": prom_sum(after, "outbox_relay_poll_queries_total"),
         "rows_read": prom_sum(after, "outbox_relay_poll_rows_read_total"),
         **pg_cpu, **meter.stop()}
    log(f"catch-up {mode.label()}: {r['events_per_s']:,} events/s; serving CPU ms/1000: "
        f"{r['serving_cpu_ms_per_1000_events']}; other load {r['other_load_cores']:.2f} cores")
    return r


def live(b: Bench, mode: Mode, rates: list[int], seconds: int) -> list[dict]:
    tag = f"live_{mode.name}"
    st = prepare(b, mode, tag)
    relay = launch(b, st, tag)
    db = b.servers.db
    pad = secrets.token_hex(100)[:165]
    out = []
    for rate in rates:
        t = rate_topics(b, tag, rate, seconds, b.settings.live_topic_seconds)
        consumer = start_consumer(b, b.servers.brokers, t, seconds)
        script = b.out / f"{tag}-{rate}.sql"
        write_pgbench_script(script, st.table, t.atype_sql, pad)
        before = scrape(relay.metrics)
        pg = PgCpu(serving_pids(db, st))
        ld = drive_pgbench(b, relay, script, rate, seconds, b.servers.tansu.pid if b.servers.tansu else None)
        end = wal_end(db)
        deadline = time.monotonic() + 120
        while not done(db, st, end):
            if time.monotonic() > deadline:
                raise BenchError(f"{mode.label()} did not deliver the live load; see {relay.log_path}")
            pg.sample()
            time.sleep(0.05)
        after = scrape(relay.metrics)
        rows = int(prom_sum(after, "outbox_relay_events_acked_total") - prom_sum(before, "outbox_relay_events_acked_total"))
        cons = consumer_result(consumer)
        hist = latency_percentiles(before, after)
        c = cons["consumer_ms"] or {}
        polls = prom_sum(after, "outbox_relay_poll_queries_total") - prom_sum(before, "outbox_relay_poll_queries_total")
        pg_lat = re.search(r"latency average = ([\d.]+) ms", ld.pgbench_out)
        r = {"mode": mode.label(), "rate": rate, "seconds": seconds, "events": rows,
             "pgbench_commit_latency_avg_ms": float(pg_lat.group(1)) if pg_lat else None,
             "achieved_rate": round(rows / seconds), "consumer_records": cons["records"],
             "consumer_p50_ms": c.get("p50"), "consumer_p99_ms": c.get("p99"),
             "ack_p50_ms": hist.get("p50_est_ms"), "ack_p99_ms": hist.get("p99_est_ms"),
             "ack_p99_le_ms": hist.get("p99_le_ms"),
             "polls_per_s": round(polls / seconds, 1) if mode.poll else None,
             "relay_cpu_ms_per_1000_events": round(ld.relay_cpu / rows * 1e6, 2) if rows else None,
             **pg.stop(rows), **ld.load}
        log(f"live {mode.label()} {rate:,}/s: consumer p50 {r['consumer_p50_ms']} p99 {r['consumer_p99_ms']} ms; "
            f"ack p50 {r['ack_p50_ms']} p99 {r['ack_p99_ms']} ms; serving CPU ms/1000 "
            f"{r['serving_cpu_ms_per_1000_events']}; other load {r['other_load_cores']:.2f}")
        out.append(r)
    stop_process(relay.proc, signal.SIGTERM, timeout=60)
    drop(db, st)
    return out


def bloat(b: Bench, minutes: float, rate: int) -> dict:
    """Polling with deletes under a steady writer: the table every 30 s."""
    mode = Mode("bloat", poll=True, interval_ms=100)
    st = prepare(b, mode, "bloat")
    relay = launch(b, st, "bloat")
    db = b.servers.db
    script = b.out / "bloat.sql"
    write_pgbench_script(script, st.table, f"'b{b.run_id}'", secrets.token_hex(100)[:165])
    seconds = int(minutes * 60)
    log(f"table after deletes: {rate:,} rows/s for {seconds} s")
    pgb = spawn([pg_bin() / "pgbench", "-n", "-M", "prepared", "-f", script, "-c", "4", "-j", "2",
                 "-R", rate, "-T", seconds, b.servers.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    samples = []

    def sample() -> None:
        row = db.one(f"SELECT pg_total_relation_size('public.{st.table}'), pg_relation_size('public.{st.table}'), "
                     f"pg_indexes_size('public.{st.table}'), n_live_tup, n_dead_tup, autovacuum_count, "
                     f"(SELECT count(*) FROM public.{st.table}) FROM pg_stat_user_tables "
                     f"WHERE relid = 'public.{st.table}'::regclass")
        total, heap, idx, live_t, dead, av, rows = (int(x) for x in row.split("|"))
        by_index = dict(line.split("|") for line in db.query(
            f"SELECT c.relname, pg_relation_size(i.indexrelid) FROM pg_index i JOIN pg_class c "
            f"ON c.oid = i.indexrelid WHERE i.indrelid = 'public.{st.table}'::regclass"))
        samples.append({"t_s": round(time.monotonic() - t0), "total_bytes": total, "heap_bytes": heap,
                        "index_bytes": idx, "n_live_tup": live_t, "n_dead_tup": dead, "autovacuum_count": av,
                        "rows_in_table": rows,
                        "index_bytes_by_index": {k.replace(st.table, "<table>"): int(v) for k, v in by_index.items()}})

    next_sample = t0
    while pgb.poll() is None:
        if time.monotonic() >= next_sample:
            sample()
            next_sample += 30
        time.sleep(0.5)
    pgb.communicate()
    while not done(db, st, None):
        time.sleep(0.1)
    sample()
    after = scrape(relay.metrics)
    stop_process(relay.proc, signal.SIGTERM, timeout=60)
    r = {"minutes": minutes, "rate": rate, "rows_removed": prom_sum(after, "outbox_relay_poll_rows_removed_total"),
         "samples": samples}
    last = samples[-1]
    log(f"after {seconds} s of deletes: table {last['total_bytes'] / 1024:.0f} KiB (heap {last['heap_bytes'] / 1024:.0f}, "
        f"indexes {last['index_bytes'] / 1024:.0f}), dead tuples {last['n_dead_tup']}, autovacuum runs {last['autovacuum_count']}")
    return r


def markdown(res: dict) -> str:
    lines = ["| catch-up | events/s | relay CPU ms / 1,000 | PostgreSQL serving CPU ms / 1,000 | all PostgreSQL CPU ms / 1,000 |",
             "| --- | ---: | ---: | --- | ---: |"]
    for r in res["catchup"]:
        serving = ", ".join(f"{k} {v}" for k, v in r["serving_cpu_ms_per_1000_events"].items())
        lines.append(f"| {r['mode']} | {r['events_per_s']:,} | {r['relay_cpu_ms_per_1000_events']} | {serving} | "
                     f"{r['postgres_cpu_ms_per_1000_events']} |")
    lines += ["", "| live | target rate/s | achieved rows/s | consumer p50 / p99 ms | ack p50 / p99 ms | polls/s | "
              "serving CPU ms / 1,000 | pgbench commit ms | other load (cores) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in res["live"]:
        serving = ", ".join(f"{k} {v}" for k, v in r["serving_cpu_ms_per_1000_events"].items())
        lines.append(f"| {r['mode']} | {r['rate']:,} | {r['achieved_rate']:,} | "
                     f"{f(r['consumer_p50_ms'])} / {f(r['consumer_p99_ms'])} | "
                     f"{f(r['ack_p50_ms'])} / {f(r['ack_p99_ms'])} | {f(r['polls_per_s'])} | {serving} | "
                     f"{f(r['pgbench_commit_latency_avg_ms'])} | {r['other_load_cores']:.2f} |")
    if res.get("bloat"):
        names = sorted(res["bloat"]["samples"][-1]["index_bytes_by_index"])
        lines += ["", "| after s | rows in table | table KiB | heap KiB | " + " | ".join(f"{n} KiB" for n in names)
                  + " | live tuples | dead tuples | autovacuum runs |",
                  "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: |"]
        for s in res["bloat"]["samples"]:
            idx = " | ".join(str(s["index_bytes_by_index"].get(n, 0) // 1024) for n in names)
            lines.append(f"| {s['t_s']} | {s['rows_in_table']} | {s['total_bytes'] // 1024} | {s['heap_bytes'] // 1024} | "
                         f"{idx} | {s['n_live_tup']} | {s['n_dead_tup']} | {s['autovacuum_count']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catchup-events", type=int, default=100_000)
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--intervals", default="10,100,1000")
    ap.add_argument("--live-seconds", type=int, default=20)
    ap.add_argument("--bloat-minutes", type=float, default=3)
    ap.add_argument("--bloat-rate", type=int, default=1000)
    ap.add_argument("--phases", default="catchup,live,bloat")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    phases = a.phases.split(",")
    rates = [int(x) for x in a.rates.split(",")]
    intervals = [int(x) for x in a.intervals.split(",")]
    if not a.skip_build:
        log("cargo build --release (outbox-relay, example bench_latency)")
        cargo_build(REPO, ["--bin", "outbox-relay", "--example", "bench_latency"])
    out, logs = output_dirs(a.out, "poll-%Y%m%d-%H%M%S")
    s = Settings(live_seconds=a.live_seconds, timeout=900)
    log("starting PostgreSQL (track_commit_timestamp = on) and tansu")
    url = start_postgres(logs, POLL_PG_SETTINGS)
    brokers, tansu = start_tansu(logs)
    b = Bench(settings=s, run_id=secrets.token_hex(3), out=out, logs=logs,
              servers=Servers(url=url, brokers=brokers, tansu=tansu, db=Sql(url, logs)))
    whole = CpuMeter()
    res = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "git": git_info(),
           "postgresql": server_settings(b.servers.db, POLL_PG_SETTINGS), "catchup": [], "live": []}
    if "catchup" in phases:
        for mode in [Mode("wal", poll=False), Mode("poll", poll=True, interval_ms=100),
                     Mode("poll1k", poll=True, interval_ms=100, batch=1000),
                     Mode("pollmark", poll=True, interval_ms=100, after_send="mark")]:
            res["catchup"].append(catchup(b, mode, a.catchup_events))
    if "live" in phases:
        modes = [Mode("wal", poll=False)] + [Mode(f"p{i}{'n' if n else ''}", poll=True, interval_ms=i, notify=n)
                                              for i in intervals for n in (False, True)]
        for mode in modes:
            res["live"].extend(live(b, mode, rates, a.live_seconds))
    if "bloat" in phases:
        res["bloat"] = bloat(b, a.bloat_minutes, a.bloat_rate)
    res["machine_load"] = whole.stop()
    (out / "results-poll.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "results-poll.md").write_text(md)
    print(md)
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
