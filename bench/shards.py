#!/usr/bin/env python3
"""outbox-relay sharding benchmark (issue 17; docs/benchmarks.md, "Sharding").

One WAL range (single-row inserts into one outbox table) read, in every round, by:
  1. the single-slot read limit:  pg_recvlogical on an unfiltered slot;
  2. one filtered slot alone:     pg_recvlogical on shard 0 of 2, and shard 0 of 4
                                  (fits the model: decode share vs output share);
  3. N parallel pg_recvlogical readers of the N filtered publications (N >= 2);
  4. N relays (shard.index = 0..N-1, stdout sink with confirm = true, output to
     /dev/null) catching up in parallel until every shard slot's confirmed_flush_lsn
     reaches the range's end; with --tansu also N relays producing to tansu.
Every slot is created (`outbox-relay init --all-shards` for the relays' slots and
publications) before the first row is written, so all read the same WAL.
Aggregate events/s = all events / wall time until the last reader or relay is done.

    bench/shards.py                          # 500,000 events, N = 1,2,4, 2 rounds
    bench/shards.py --events 200000 --rounds 3 --tansu

Reuses bench/run.py's package bench/outbox_bench (servers, workload writer, read limit
and relay catch-up measurements, CPU and RSS readers); Python 3.11 standard library only.
"""
from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

from dataclasses import replace

from outbox_bench.context import Bench, output_dirs
from outbox_bench.cpu import CpuMeter
from outbox_bench.database import create_outbox, lsn_int, wait_flushed, write_workload
from outbox_bench.phases.catchup import run_read_limit, run_relay_catchup
from outbox_bench.processes import BenchError, cargo_build, log, run, run_main
from outbox_bench.relay import relay_config, relay_env
from outbox_bench.report import fmt, git_info, machine
from outbox_bench.servers import PG_SETTINGS, Servers, Sql, server_settings, start_postgres, start_tansu
from outbox_bench.settings import KEYS, RELAY_BIN, REPO, Settings, Workload

WORKLOAD = Workload("tx1_200B", 1, 200, 500_000, 100_000)


def parallel(sessions: list[Bench], fn, jobs: list[dict]) -> tuple[list[dict], float, dict]:
    """Runs fn(sessions[i], **job) for every job at once, each in a thread with its own psql
    session; returns the results, the wall time from the common start until the last
    job's own end (its start offset plus its `seconds`) and the machine load meanwhile."""
    results: list[dict | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    meter = CpuMeter()
    t0 = time.monotonic()

    def work(i: int, job: dict) -> None:
        try:
            offset = time.monotonic() - t0
            r = fn(sessions[i], **job)
            r["start_offset_s"] = offset
            results[i] = r
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, j), daemon=True) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    timeout = sessions[0].settings.timeout
    deadline = t0 + timeout + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise BenchError(f"a parallel {fn.__name__} did not finish within {timeout} s")
    if errors:
        raise errors[0]
    load = meter.stop() | {"phase_seconds": time.monotonic() - t0}
    wall = max(r["start_offset_s"] + r["seconds"] for r in results)
    return results, wall, load


def aggregate(results: list[dict], wall: float, load: dict, events: int) -> dict:
    ws = [r["walsender_cpu_s"] for r in results]
    ws_total = sum(ws) if None not in ws else None
    out = {
        "seconds": wall,
        "events_per_s": events / wall,
        "walsender_cpu_s": ws_total,
        "walsender_cpu_s_per_million_events": ws_total / events * 1e6 if ws_total is not None else None,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        **load,
        "shards": results,
    }
    if "cpu_s" in results[0]:
        out["relay_cpu_s_total"] = sum(r["cpu_s"] for r in results)
        out["relay_cpu_s_per_million_events"] = out["relay_cpu_s_total"] / events * 1e6
        out["relay_peak_rss_mb_max"] = max(r["peak_rss_mb"] or 0 for r in results)
    return out


def shard_config(count: int, index: int) -> str:
    return f"[shard]\ncount = {count}\nindex = {index}\n"


def init_shards(b: Bench, table: str, *, slot: str, publication: str, count: int) -> None:
    """`outbox-relay init --all-shards`: every shard's publication (row filter) and slot."""
    cfg = b.out / f"init-{slot}.toml"
    relay_config(cfg, url=b.servers.url, brokers="127.0.0.1:9", slot=slot, publication=publication,
                 table=table, partitions=1, metrics="", extra=shard_config(count, 0))
    r = run([RELAY_BIN, "init", "--all-shards", "--config", cfg], env=relay_env())
    (b.logs / f"init-{slot}.log").write_text(r.stdout + r.stderr)


def fit(c1: float, cf: float, f: float) -> tuple[float, float]:
    """(decode, output) with c1 = decode + output (everything) and cf = decode + f * output."""
    output = (c1 - cf) / (1 - f)
    return c1 - output, output


def median_of(xs: list):
    """The element-wise median of values of the same shape (dicts, lists, numbers); the
    first value for anything else. A round made of the median of every measurement."""
    x0 = xs[0]
    if isinstance(x0, dict):
        return {k: median_of([x[k] for x in xs]) for k in x0 if all(k in x for x in xs)}
    if isinstance(x0, list) and all(isinstance(x, list) and len(x) == len(x0) for x in xs):
        return [median_of([x[i] for x in xs]) for i in range(len(x0))]
    if isinstance(x0, (int, float)) and not isinstance(x0, bool) and all(isinstance(x, (int, float)) for x in xs):
        return statistics.median(xs)
    return x0


def model(res: dict) -> dict:
    """Decode share (every walsender decodes the whole WAL) and output share (divided
    among the shards), fitted per round from the unfiltered slot and shard 0 of 2 read
    alone, checked against shard 0 of 4 alone, then the aggregate each N should reach:
    the slowest walsender alone (wall-time fit; for relays also the slowest relay, at the
    N = 1 relay's CPU per event), or all the CPU the phase needs (walsenders N x decode +
    output from the CPU fit, the clients' CPU per event as at N = 1) on the cores the
    other processes on the machine left during the phase, whichever is longer."""
    events, nproc = res["events"], res["machine"]["nproc"]
    out = []
    for rnd in [*res["rounds"], median_of(res["rounds"]) | {"round": "median"}]:
        one, half, quarter = rnd["read_limit"], rnd["alone"]["0of2"], rnd["alone"].get("0of4")
        m = {"round": rnd["round"]}
        for key, unit in [("seconds", "wall_s"), ("walsender_cpu_s", "cpu_s")]:
            d, o = fit(one[key], half[key], half["fraction"])
            m[f"decode_{unit}_per_million"] = d / events * 1e6
            m[f"output_{unit}_per_million"] = o / events * 1e6
            m[f"decode_share_{unit}"] = d / (d + o)
            if quarter:
                m[f"shard_0of4_{unit}_predicted"] = d + o * quarter["fraction"]
                m[f"shard_0of4_{unit}_measured"] = quarter[key]
                # The line through the two filtered slots alone instead (no unfiltered point).
                of = (half[key] - quarter[key]) / (half["fraction"] - quarter["fraction"])
                df = quarter[key] - of * quarter["fraction"]
                m[f"filtered_line_decode_{unit}_per_million"] = df / events * 1e6
                m[f"filtered_line_output_{unit}_per_million"] = of / events * 1e6
                m[f"filtered_line_unfiltered_{unit}_predicted"] = df + of
                m[f"filtered_line_decode_share_{unit}"] = df / (df + of)
        m["decode_rate_events_per_s"] = events / (m["decode_wall_s_per_million"] * events / 1e6)
        # Everything but the walsenders (pg_recvlogical or relays, this script, psql) at N = 1.
        base = {"recvlogical": rnd["read_limit"], "relay": rnd["relay"]["1"]}
        clients = {k: max(0.0, b["benchmark_cores"] * b.get("phase_seconds", b["seconds"]) - b["walsender_cpu_s"])
                   for k, b in base.items()}
        m["clients_cpu_s_per_million_at_n1"] = {k: c / events * 1e6 for k, c in clients.items()}
        relay_cpu1 = rnd["relay"]["1"]["shards"][0]["cpu_s"]
        dw, ow = m["decode_wall_s_per_million"] * events / 1e6, m["output_wall_s_per_million"] * events / 1e6
        dc, oc = m["decode_cpu_s_per_million"] * events / 1e6, m["output_cpu_s_per_million"] * events / 1e6
        pred = {}
        for kind in ("recvlogical", "relay"):
            for n, ph in rnd[kind].items():
                fr = res["shard_fractions"][n]
                serial = max(dw + ow * f for f in fr)
                if kind == "relay":  # a relay runs beside its walsender: the slower of the two
                    serial = max(serial, max(relay_cpu1 * f for f in fr))
                ws_cpu = int(n) * dc + oc
                cores = max(0.5, nproc - ph["other_load_cores"])
                wall = max(serial, (ws_cpu + clients[kind]) / cores)
                pred[f"{kind}_{n}"] = {
                    "predicted_events_per_s": events / wall,
                    "measured_events_per_s": ph["events_per_s"],
                    "bound": "one walsender (or relay)" if serial >= (ws_cpu + clients[kind]) / cores else "cores",
                    "walsender_cpu_s_per_million_predicted": ws_cpu / events * 1e6,
                    "walsender_cpu_s_per_million_measured": ph["walsender_cpu_s_per_million_events"],
                    "cores_left_by_other_processes": cores,
                }
        m["predictions"] = pred
        out.append(m)
    return {"rounds": out}


def markdown(res: dict) -> str:
    m = res["machine"]
    rows = []  # one per round, N and sink
    for rnd in res["rounds"]:
        lim = rnd["read_limit"]
        for sink, key in [("stdout", "relay"), ("tansu", "relay_tansu")]:
            for n, ph in rnd.get(key, {}).items():
                rec = lim if n == "1" else rnd["recvlogical"][n]
                rows.append({
                    "round": rnd["round"], "n": n, "sink": sink, "relays": ph["events_per_s"],
                    "readers": rec["events_per_s"], "relays_ratio": ph["events_per_s"] / lim["events_per_s"],
                    "readers_ratio": rec["events_per_s"] / lim["events_per_s"],
                    "ws_relays": ph["walsender_cpu_s_per_million_events"],
                    "ws_readers": rec["walsender_cpu_s_per_million_events"],
                    "relay_cpu": [s["cpu_s"] for s in ph["shards"]],
                    "relay_cpu_per_million": ph["relay_cpu_s_per_million_events"],
                    "switches": sum(s["context_switches_per_event"] * s["events_per_s"] * s["seconds"]
                                    for s in ph["shards"]) / res["events"],
                    "rss": [s["peak_rss_mb"] or 0.0 for s in ph["shards"]],
                    "load": ph["other_load_cores"], "load_readers": rec["other_load_cores"],
                    "cores": ph["benchmark_cores"]})
    m = res["machine"]
    lines = [f"Run {res['started']} ({res['total_seconds']:.0f} s): {m['nproc']} CPUs ({m['cpu_model']}), "
             f"{m['postgresql']}; {res['events']:,} single-row inserts, {KEYS} keys, "
             f"{res['wal_bytes'] / 1e6:.0f} MB of WAL; rows per shard: "
             + "; ".join(f"N={n}: {', '.join(f'{c:,}' for c in cs)}" for n, cs in res["shard_events"].items()) + ".",
             "", f"Median [lowest-highest] of {len(res['rounds'])} rounds:", "",
             "| N | sink | relays (events/s) | pg_recvlogical ×N (events/s) | relays / read limit "
             "| pg_recvlogical / read limit | walsender CPU s per 1M events: relays; pg_recvlogical "
             "| relay CPU s, slowest shard | relay CPU s per 1M events, all shards | relay context switches per event "
             "| relay peak RSS, largest shard (MB) | other load (cores): relays; readers "
             "| cores the benchmark used, relay phase |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]

    def mr(vals, spec):
        vals = [v for v in vals if v is not None]
        return (f"{format(statistics.median(vals), spec)} [{format(min(vals), spec)}-{format(max(vals), spec)}]"
                if vals else "n/a")
    for n, sink in dict.fromkeys((r["n"], r["sink"]) for r in rows):
        g = [r for r in rows if r["n"] == n and r["sink"] == sink]

        def col(k, spec):
            return mr([r[k] for r in g], spec)
        lines.append(f"| {n} | {sink} | {col('relays', ',.0f')} | {col('readers', ',.0f')} | {col('relays_ratio', '.2f')} "
                     f"| {col('readers_ratio', '.2f')} | {col('ws_relays', '.1f')}; {col('ws_readers', '.1f')} "
                     f"| {mr([max(r['relay_cpu']) for r in g], '.2f')} | {col('relay_cpu_per_million', '.1f')} "
                     f"| {col('switches', '.2f')} | {mr([max(r['rss']) for r in g], '.1f')} "
                     f"| {col('load', '.2f')}; {col('load_readers', '.2f')} | {col('cores', '.2f')} |")
    lines += ["", "Every round:", "",
              "| round | N | sink | relays (events/s) | pg_recvlogical ×N (events/s) | relays / read limit "
              "| pg_recvlogical / read limit | walsender CPU s per 1M events: relays; pg_recvlogical "
              "| relay CPU s per shard | relay CPU s per 1M events, all shards | relay context switches per event "
              "| relay peak RSS per shard (MB) | other load (cores): relays; readers |",
              "| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['n']} | {r['sink']} | {r['relays']:,.0f} | {r['readers']:,.0f} "
            f"| {r['relays_ratio']:.2f} | {r['readers_ratio']:.2f} "
            f"| {fmt(r['ws_relays'], '.1f')}; {fmt(r['ws_readers'], '.1f')} "
            f"| {', '.join(format(c, '.2f') for c in r['relay_cpu'])} | {r['relay_cpu_per_million']:.1f} "
            f"| {r['switches']:.2f} | {', '.join(format(x, '.1f') for x in r['rss'])} "
            f"| {r['load']:.2f}; {r['load_readers']:.2f} |")
    lines += ["", "| round | slot read alone | events | seconds | events/s | walsender CPU s | other load (cores) |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for rnd in res["rounds"]:
        for what, x in [("1 slot, unfiltered (read limit)", rnd["read_limit"]),
                        *[(f"shard {k.replace('of', ' of ')}", a) for k, a in rnd["alone"].items()]]:
            lines.append(f"| {rnd['round']} | {what} | {round(x['events_per_s'] * x['seconds']):,} | {x['seconds']:.2f} "
                         f"| {x['events_per_s']:,.0f} | {fmt(x['walsender_cpu_s'], '.2f')} | {x['other_load_cores']:.2f} |")
    if not res.get("model"):
        return "\n".join(lines) + "\n"
    lines += ["", "| round | decode / output, wall s per 1M | decode share (wall; CPU) | decode rate (events/s) "
                  "| shard 0 of 4 alone: predicted / measured (s) | decode share, line through the filtered slots "
                  "alone (wall; CPU) | N: predicted / measured events/s (bound) |",
              "| ---: | --- | --- | ---: | --- | --- | --- |"]
    for mr in res["model"]["rounds"]:
        preds = "; ".join(f"{k.replace('recvlogical', 'pg_recvlogical')}: {p['predicted_events_per_s']:,.0f} / "
                          f"{p['measured_events_per_s']:,.0f} ({p['bound']})" for k, p in mr["predictions"].items())
        lines.append(f"| {mr['round']} | {mr['decode_wall_s_per_million']:.2f} / {mr['output_wall_s_per_million']:.2f} "
                     f"| {mr['decode_share_wall_s']:.0%}; {mr['decode_share_cpu_s']:.0%} "
                     f"| {mr['decode_rate_events_per_s']:,.0f} "
                     f"| {fmt(mr.get('shard_0of4_wall_s_predicted'), '.2f')} / "
                     f"{fmt(mr.get('shard_0of4_wall_s_measured'), '.2f')} "
                     f"| {fmt(mr.get('filtered_line_decode_share_wall_s'), '.0%')}; "
                     f"{fmt(mr.get('filtered_line_decode_share_cpu_s'), '.0%')} | {preds} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 4],
                    help="shard counts (default 1,2,4)")
    ap.add_argument("--events", type=int, default=WORKLOAD.events, help="single-row inserts (default 500000)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the same WAL range (default 2)")
    ap.add_argument("--tansu", type=lambda v: [int(x) for x in v.split(",")], nargs="?", const=[1, 2], default=[],
                    help="also N relays producing to the benchmark's own tansu for these counts (default 1,2)")
    ap.add_argument("--out", type=Path, help="output directory (default target/bench/shards-<time>)")
    ap.add_argument("--skip-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed for one catch-up (default 600)")
    args = ap.parse_args()
    # The relays' topics (--tansu) have one partition.
    settings = Settings(partitions=1, timeout=args.timeout, out=args.out, skip_build=args.skip_build)
    run_id = secrets.token_hex(3)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out, logs = output_dirs(args.out, "shards-%Y%m%d-%H%M%S")
    t_start = time.monotonic()
    if not args.skip_build:
        log("cargo build --release --bin outbox-relay")
        cargo_build(REPO, ["--bin", "outbox-relay"])
    counts = sorted(set(args.counts) | {1})
    per_round = 1 + sum(1 + n for n in counts if n > 1) + sum(counts) + sum(args.tansu)
    pg_settings = dict(PG_SETTINGS, max_replication_slots=str(per_round * args.rounds + 4),
                       max_wal_senders=str(2 * max(counts) + 4))
    log("starting PostgreSQL")
    url = start_postgres(logs, pg_settings)
    tansu_brokers = None
    if args.tansu:
        log("starting tansu")
        tansu_brokers, _ = start_tansu(logs)
    # stdout sink: no broker
    ctx = Bench(settings=settings, run_id=run_id, out=out, logs=logs,
                servers=Servers(url=url, brokers="127.0.0.1:9", tansu=None, db=Sql(url, logs)))
    # One psql session per parallel reader or relay, each with servers of its own.
    sessions = [replace(ctx, servers=replace(ctx.servers, db=Sql(url, logs))) for _ in range(max(counts))]
    db = ctx.servers.db
    table = f"outbox_{run_id}"
    pub = f"bench_{run_id}"
    create_outbox(db, table, pub)

    # Every slot before the first row: the same WAL range for all.
    def slot(name: str) -> str:
        """Creates a pgoutput slot; returns its name."""
        lsn = db.one(f"SELECT lsn FROM pg_create_logical_replication_slot('{name}', 'pgoutput')")
        res.setdefault("start", lsn)
        return name

    res: dict = {}
    rounds_slots = []
    for r in range(args.rounds):
        s = {"read": slot(f"b{run_id}_read{r}"), "alone": {}, "recv": {}, "relay": {}, "tansu": {}}
        for n in counts:
            base_pub = pub if n == 1 else f"{pub}_n{n}"
            # init creates the shards' publications (first round) and the relays' slots.
            init_shards(ctx, table, slot=f"b{run_id}_relay{r}_n{n}", publication=base_pub, count=n)
            s["relay"][n] = (f"b{run_id}_relay{r}_n{n}", base_pub)
            if n in args.tansu:
                init_shards(ctx, table, slot=f"b{run_id}_tansu{r}_n{n}", publication=base_pub, count=n)
                s["tansu"][n] = (f"b{run_id}_tansu{r}_n{n}", base_pub)
            if n > 1:
                s["alone"][n] = slot(f"b{run_id}_alone{r}_n{n}")
                s["recv"][n] = [slot(f"b{run_id}_recv{r}_n{n}_s{i}") for i in range(n)]
        rounds_slots.append(s)
    start = res.pop("start")
    filters = {}
    shard_events = {}
    for n in counts:
        if n == 1:
            shard_events["1"] = [args.events]
            continue
        filters[str(n)] = [db.one(f"SELECT rowfilter FROM pg_publication_tables WHERE pubname = '{pub}_n{n}_shard{i}of{n}'")
                           for i in range(n)]

    w = Workload(WORKLOAD.name, WORKLOAD.txn_rows, WORKLOAD.payload_bytes, args.events, args.events)
    log(f"writing {args.events:,} single-row inserts")
    write_s = write_workload(url, table, f"shards_{run_id}", w, args.events)
    end = db.one("SELECT pg_current_wal_insert_lsn()")
    wait_flushed(db, end)
    for n, fl in filters.items():
        shard_events[n] = [int(db.one(f"SELECT count(*) FROM public.{table} WHERE {f}")) for f in fl]
        if sum(shard_events[n]) != args.events:
            raise BenchError(f"the {n} shards' filters pass {sum(shard_events[n])} of {args.events} rows")
    wal_bytes = lsn_int(end) - lsn_int(start)
    log(f"wrote {args.events:,} rows in {write_s:.1f} s, {wal_bytes / 1e6:.0f} MB of WAL; rows per shard {shard_events}")

    res |= {"started": started, "machine": machine(), "git": git_info(),
           "command": " ".join(["bench/shards.py", *sys.argv[1:]]),
           "settings": {"postgresql": server_settings(db, pg_settings), "keys": KEYS,
                        "relay": "stdout sink, confirm = true, stdout to /dev/null; status_interval_ms = 100",
                        "tansu_counts": args.tansu, "row_filters": filters},
           "events": args.events, "write_seconds": write_s, "wal_bytes": wal_bytes, "wal_range": [start, end],
           "shard_events": shard_events,
           "shard_fractions": {n: [c / args.events for c in cs] for n, cs in shard_events.items()},
           "rounds": []}

    def note(what: str, r: dict) -> None:
        log(f"round {len(res['rounds'])}: {what}: {r['events_per_s']:,.0f} events/s ({r['seconds']:.2f} s), "
               f"walsender CPU {fmt(r.get('walsender_cpu_s'), '.2f')} s, other load {r['other_load_cores']:.2f} cores")

    for r, s in enumerate(rounds_slots):
        rnd = {"round": r, "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
               "alone": {}, "recvlogical": {}, "relay": {}}
        rnd["read_limit"] = run_read_limit(ctx, slot=s["read"], publication=pub, end=end, events=args.events)
        note("read limit, 1 slot", rnd["read_limit"])
        for n, sl in s["alone"].items():
            a = run_read_limit(ctx, slot=sl, publication=f"{pub}_n{n}_shard0of{n}", end=end,
                                  events=shard_events[str(n)][0])
            a["fraction"] = shard_events[str(n)][0] / args.events
            rnd["alone"][f"0of{n}"] = a
            note(f"shard 0 of {n} alone ({shard_events[str(n)][0]:,} events)", a)
        for n, slots in s["recv"].items():
            results, wall, load = parallel(sessions, run_read_limit, [
                {"slot": sl, "publication": f"{pub}_n{n}_shard{i}of{n}", "end": end, "events": shard_events[str(n)][i]}
                for i, sl in enumerate(slots)])
            rnd["recvlogical"][str(n)] = aggregate(results, wall, load, args.events)
            note(f"{n} pg_recvlogical in parallel", rnd["recvlogical"][str(n)])
        for key, sink in [("relay", True), ("tansu", False)]:
            for n, (base, base_pub) in s[key].items():
                def job(i: int) -> dict:
                    return {"slot": base, "publication": base_pub, "table": table, "end": end,
                            "events": shard_events[str(n)][i], "name": f"{key}{r}-n{n}-s{i}",
                            "extra_config": shard_config(n, i), "stdout_sink": sink,
                            "watch_slot": f"{base}_shard{i}of{n}" if n > 1 else None}
                if not sink:
                    for c in sessions:
                        c.servers.brokers, c.servers.tansu = tansu_brokers, None
                try:
                    results, wall, load = parallel(sessions, run_relay_catchup, [job(i) for i in range(n)])
                except BenchError as e:
                    if sink:
                        raise
                    log(f"round {r}: {n} relays with tansu failed: {e}")  # tansu 0.6 at volume: not fatal
                    rnd.setdefault("relay_tansu_errors", {})[str(n)] = str(e)
                    continue
                finally:
                    for c in sessions:
                        c.servers.brokers = ctx.servers.brokers
                rnd.setdefault("relay" if sink else "relay_tansu", {})[str(n)] = agg = aggregate(results, wall, load, args.events)
                note(f"{n} relays in parallel ({'stdout' if sink else 'tansu'})", agg)
                log(f"  relay CPU s per shard {[round(x['cpu_s'], 2) for x in results]}, "
                       f"peak RSS MB {[round(x['peak_rss_mb'] or 0, 1) for x in results]}")
        res["rounds"].append(rnd)
        (ctx.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")  # partial results
    # The model needs shard 0 of 2 read alone (N = 2 among --counts).
    res["model"] = model(res) if all("0of2" in rnd["alone"] for rnd in res["rounds"]) else None
    res["total_seconds"] = time.monotonic() - t_start
    (ctx.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (ctx.out / "results.md").write_text(md)
    print(md)
    log(f"results: {ctx.out / 'results.json'}, {ctx.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
