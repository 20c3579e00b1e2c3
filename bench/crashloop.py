"""Crash loop (bench/run.py --crash-loop): how much the relay sends again after SIGKILL.

A steady writer (pgbench -R, transactions of 1 to 50 rows, on average --crash-rate
rows/s) commits for --crash-seconds while the relay is SIGKILLed --crash-kills times at
random points (1 to 4 s apart) and restarted each time. Per kill it reports:

  in_flight   outbox_relay_records_in_flight from the relay's /metrics, read just
              before the kill (the kill follows that reading at once);
  acked_50ms  records acknowledged in the 50 ms before that reading
              (outbox_relay_events_acked_total, read every 10 ms);
  gap         records produced in the 10 ms before that reading, an allowance for
              what the relay produced between the reading and the kill (< 1 ms);
  resent      records that reached the topic more than once, by outbox `id`,
              attributed to this kill by their `lsn` header: the next instance
              starts at R = max(slot confirmed_flush_lsn, stored checkpoint), both
              read after the kill, and sends again exactly what commits at or
              after R; a copy belongs to the kill with the largest R at or below
              its commit LSN;
  restart_lag_bytes  the live acknowledged position (outbox_relay_acked_lsn,
              read before the kill) minus R.

Lost (ids written but never read back) must be 0. The records are read back by
examples/consume from the topic; the relay's own counters (sum of
events_produced_total over the instances minus rows written) are reported beside
as a cross-check. Keep the run modest: tansu 0.6.0 loses 0.3-0.6 % of acknowledged
records in bursts of 200,000 (docs/benchmarks.md), far above what is read here.

--crash-kills 0 makes it a steady run of the same writer, for the relay's and the
walsender's CPU (the cost of faster status updates and checkpoint writes).
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from outbox_bench.context import Bench
from outbox_bench.cpu import proc_cpu_seconds
from outbox_bench.database import SlotWatch, create_outbox, lsn_int
from outbox_bench.metrics import prom_samples, prom_sum
from outbox_bench.processes import BenchError, free_port, http_get, log, spawn, stop_process
from outbox_bench.relay import start_relay as start_relay_process
from outbox_bench.servers import pg_bin


def relay_config_text(ctx: Bench, *, slot: str, publication: str, table: str, metrics: str) -> str:
    """The relay's defaults (1 s status timer, checkpoint) plus --relay-setting lines."""
    sections: dict[str, list[str]] = {
        "postgres": [f'url = "{ctx.servers.url}"', f'slot = "{slot}"', f'publication = "{publication}"'],
        "outbox": [f'table = "public.{table}"', 'topic = "outbox.event.{aggregate_type}"'],
        "kafka": [f'brokers = "{ctx.servers.brokers}"', "create_topics = true",
                  f"topic_partitions = {ctx.settings.partitions}"],
        "metrics": [f'listen = "{metrics}"'],
    }
    for kv in ctx.settings.relay_setting:
        key, _, value = kv.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, []).append(f"{name} = {value}")
    return "# written by bench/crashloop.py\n" + "".join(
        f"\n[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())


def scrape(url: str) -> dict | None:
    try:
        code, body = http_get(url + "/metrics", timeout=1)
    except OSError:
        return None
    if code != 200:
        return None
    s = prom_samples(body)
    return {
        "t": time.monotonic(),
        "acked": prom_sum(s, "outbox_relay_events_acked_total"),
        "produced": prom_sum(s, "outbox_relay_events_produced_total"),
        "in_flight": s.get("outbox_relay_records_in_flight"),
        "acked_lsn": s.get("outbox_relay_acked_lsn"),
        "confirmed_lsn": s.get("outbox_relay_confirmed_lsn"),
    }


class Scraper(threading.Thread):
    """Reads the running instance's /metrics every 10 ms."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.readings, self.stopped = url, [], False
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped:
            r = scrape(self.url)
            if r:
                with self.lock:
                    self.readings.append(r)
            time.sleep(0.01)

    def take(self) -> list[dict]:
        with self.lock:
            out, self.readings = self.readings, []
        return out


def before(history: list[dict], last: dict, seconds: float, key: str) -> float:
    """`key` of the newest reading at least `seconds` older than `last` (0: a new instance)."""
    for r in reversed(history):
        if r["t"] + seconds <= last["t"]:
            return r[key]
    return 0.0


def read_back(ctx: Bench, topic: str, rows: int, logs: Path) -> list[dict]:
    """Every record of `topic` (examples/consume), until all `rows` ids were seen and
    nothing more came for 5 s (or 120 s in all)."""
    p = spawn([ctx.settings.consume_bin, ctx.servers.brokers, topic], stdout=subprocess.PIPE,
              log_path=logs / "consume.log")
    records, ids = [], set()
    last, deadline = time.monotonic(), time.monotonic() + 120
    done = threading.Event()

    def reader():
        nonlocal last
        for line in p.stdout:
            rec = json.loads(line)
            records.append(rec)
            ids.add(rec["headers"].get("id"))
            last = time.monotonic()
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    while time.monotonic() < deadline and not done.is_set():
        if len(ids) >= rows and time.monotonic() - last > 5:
            break
        time.sleep(0.2)
    stop_process(p)
    return records


def run_crash_loop(ctx: Bench) -> dict:
    a = ctx.settings
    db = ctx.servers.db
    rid = ctx.run_id
    table, publication, slot = f"outbox_{rid}_crash", f"bench_{rid}_crash", f"bench_{rid}_crash_relay"
    atype = f"crash_{rid}"
    topic = f"outbox.event.{atype}"
    create_outbox(db, table, publication)
    db.one(f"SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    mport = free_port()
    url = f"http://127.0.0.1:{mport}"
    cfg = ctx.out / "relay-crash.toml"
    cfg.write_text(relay_config_text(ctx, slot=slot, publication=publication, table=table,
                                     metrics=f"127.0.0.1:{mport}"))
    log_path = ctx.logs / "relay-crash.log"

    def start_relay() -> subprocess.Popen:
        return start_relay_process(a.relay_bin, cfg, log_path, url, timeout=60, interval=0.02)

    relay = start_relay()
    scraper = Scraper(url)
    scraper.start()
    # Transactions of 1 to 50 rows (25.5 on average) at --crash-rate rows/s.
    script = ctx.out / "crash.sql"
    script.write_text(
        "\\set n random(1, 50)\n"
        f"INSERT INTO public.{table} (aggregate_type, aggregate_id, event_type, payload) "
        f"SELECT '{atype}', 'agg-' || (random() * 999)::int, 'CrashEvent', "
        "jsonb_build_object('i', g, 'pad', repeat('x', 150)) FROM generate_series(1, :n) g;\n")
    tx_rate = a.crash_rate / 25.5
    log(f"crash loop: {a.crash_rate:,} rows/s in transactions of 1-50 rows for {a.crash_seconds} s, "
        f"{a.crash_kills} SIGKILLs 1-4 s apart, relay {a.relay_bin}")
    cpu0 = proc_cpu_seconds(relay.pid) or 0.0
    relay_cpu = 0.0
    walsender_pid = db.one(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'")
    walsender_cpu = 0.0
    ws0 = proc_cpu_seconds(int(walsender_pid)) if walsender_pid else None
    writes0 = int(db.one(f"SELECT n_tup_upd + n_tup_ins FROM pg_stat_all_tables "
                         f"WHERE schemaname = 'outbox_relay' AND relname = 'checkpoint'") or 0)
    t0 = time.monotonic()
    pgbench = spawn([pg_bin() / "pgbench", "-n", "-M", "prepared", "-f", script, "-c", 2, "-j", 2,
                     "-R", f"{tx_rate:.2f}", "-T", a.crash_seconds, ctx.servers.url],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rng = random.Random(a.crash_seed)
    kills, produced_total = [], 0.0
    next_kill = time.monotonic() + rng.uniform(1, 4)
    while pgbench.poll() is None:
        if len(kills) >= a.crash_kills or time.monotonic() < next_kill:
            time.sleep(0.005)
            continue
        history = scraper.take()
        # CPU first (a reaped process has none to read), then the last reading and the kill.
        relay_cpu += (proc_cpu_seconds(relay.pid) or cpu0) - cpu0
        if ws0 is not None:
            walsender_cpu += (proc_cpu_seconds(int(walsender_pid)) or ws0) - ws0
        last = scrape(url)
        relay.send_signal(signal.SIGKILL)
        relay.wait()
        if last is None:
            raise BenchError("no /metrics reading right before the kill")
        # The restart point: what the next instance starts from and skips through.
        row = db.one(
            f"SELECT confirmed_flush_lsn, (SELECT acked_lsn FROM outbox_relay.checkpoint "
            f"WHERE slot_name = '{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'")
        confirmed, stored = (row.split("|") + [""])[:2]
        restart = max(lsn_int(confirmed), lsn_int(stored) if stored else 0)
        kills.append({
            "at_s": round(last["t"] - t0, 2),
            "in_flight": last["in_flight"],
            "acked_50ms": last["acked"] - before(history, last, 0.05, "acked"),
            "gap": last["produced"] - before(history, last, 0.01, "produced"),
            "restart_lsn": restart,
            "restart_lag_bytes": (last["acked_lsn"] - restart) if last["acked_lsn"] else None,
            "produced_by_instance": last["produced"],
        })
        produced_total += last["produced"]
        relay = start_relay()
        cpu0 = proc_cpu_seconds(relay.pid) or 0.0
        walsender_pid = db.one(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{slot}'")
        ws0 = proc_cpu_seconds(int(walsender_pid)) if walsender_pid else None
        next_kill = time.monotonic() + rng.uniform(1, 4)
    out, err = pgbench.communicate()
    elapsed = time.monotonic() - t0
    end = db.one("SELECT pg_current_wal_lsn()")
    watch = SlotWatch(db, slot, end)
    deadline = time.monotonic() + 120
    while not watch.poll():
        if time.monotonic() > deadline:
            raise BenchError("the relay did not confirm the end of the run within 120 s")
        time.sleep(0.1)
    relay_cpu += (proc_cpu_seconds(relay.pid) or cpu0) - cpu0
    if ws0 is not None:
        walsender_cpu += (proc_cpu_seconds(int(walsender_pid)) or ws0) - ws0
    # The backend serving the last instance's checkpoint writes (it lives as
    # long as that instance: with --crash-kills 0, the whole run).
    cp_pid = db.one("SELECT pid FROM pg_stat_activity WHERE query LIKE 'INSERT INTO %.checkpoint AS c%' "
                    "OR query LIKE '%AND state = ''pending'')%' ORDER BY backend_start DESC LIMIT 1")
    cp_cpu = proc_cpu_seconds(int(cp_pid)) if cp_pid else None
    final = scrape(url)
    produced_total += final["produced"] if final else 0.0
    scraper.stopped = True
    stop_process(relay)
    rows = int(db.one(f"SELECT count(*) FROM public.{table}"))
    checkpoint_writes = int(db.one(f"SELECT n_tup_upd + n_tup_ins FROM pg_stat_all_tables "
                                   f"WHERE schemaname = 'outbox_relay' AND relname = 'checkpoint'") or 0) - writes0
    written_ids = set(db.query(f"SELECT id FROM public.{table}"))

    log(f"crash loop: reading {rows:,} rows back from {topic}")
    records = read_back(ctx, topic, rows, ctx.logs)
    copies: dict[str, int] = {}
    lsn_of: dict[str, int] = {}
    for r in records:
        i = r["headers"].get("id")
        copies[i] = copies.get(i, 0) + 1
        lsn_of[i] = lsn_int(r["headers"]["lsn"])
    lost = len(written_ids - set(copies))
    for k in kills:
        k["resent"] = 0
    for i, n in copies.items():
        if n < 2:
            continue
        owner = None
        for k in kills:
            if k["restart_lsn"] <= lsn_of[i]:
                owner = k
        if owner is None:
            raise BenchError(f"id {i} arrived {n} times but commits before the first restart point")
        owner["resent"] += n - 1
    for k in kills:
        allowed = k["in_flight"] + k["acked_50ms"] + k["gap"]
        k["bound"] = allowed
        k["within_bound"] = k["resent"] <= allowed
    resent = sum(k["resent"] for k in kills)
    res = {
        "relay_bin": str(a.relay_bin),
        "relay_settings": list(a.relay_setting),
        "rate_rows_per_s": a.crash_rate,
        "seconds": a.crash_seconds,
        "elapsed_s": round(elapsed, 1),
        "rows_written": rows,
        "records_read": len(records),
        "distinct_ids_read": len(copies),
        "lost": lost,
        "resent_by_id": resent,
        "resent_pct": round(100.0 * resent / rows, 2) if rows else None,
        "resent_by_relay_counters": int(produced_total - rows),
        "kills": kills,
        "kills_within_bound": sum(k["within_bound"] for k in kills),
        "relay_cores": round(relay_cpu / elapsed, 3),
        "walsender_cores": round(walsender_cpu / elapsed, 3),
        "checkpoint_writes_per_s": round(checkpoint_writes / elapsed, 1),
        "checkpoint_backend_cores": round(cp_cpu / elapsed, 4) if cp_cpu is not None and not kills else None,
        "pgbench": out.strip().splitlines()[-6:] if out else err.strip().splitlines()[-3:],
    }
    (ctx.out / "crashloop.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def markdown(res: dict) -> str:
    lines = [
        f"### Crash loop: {res['rate_rows_per_s']:,} rows/s for {res['seconds']} s, "
        f"{len(res['kills'])} SIGKILLs ({res['relay_bin']}{' ' + ' '.join(res['relay_settings']) if res['relay_settings'] else ''})",
        "",
        f"rows written {res['rows_written']:,}, lost {res['lost']}, re-sent (by id) {res['resent_by_id']:,} "
        f"= {res['resent_pct']} % (relay counters: {res['resent_by_relay_counters']:,}); "
        f"kills within in_flight + acked_50ms + gap: {res['kills_within_bound']}/{len(res['kills'])}; "
        f"relay {res['relay_cores']} core, walsender {res['walsender_cores']} core, "
        f"checkpoint writes {res['checkpoint_writes_per_s']}/s"
        + (f" (their backend {res['checkpoint_backend_cores']} core)" if res.get("checkpoint_backend_cores") is not None else ""),
        "",
        "| kill at (s) | in flight | acked in last 50 ms | gap | re-sent | bound | restart point behind live ack (bytes) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in res["kills"]:
        lag = k["restart_lag_bytes"]
        lines.append(f"| {k['at_s']} | {k['in_flight']:.0f} | {k['acked_50ms']:.0f} | {k['gap']:.0f} | "
                     f"{k['resent']} | {k['bound']:.0f}{'' if k['within_bound'] else ' **exceeded**'} | "
                     f"{'-' if lag is None else f'{lag:,.0f}'} |")
    return "\n".join(lines) + "\n"
