#!/usr/bin/env python3
"""outbox-relay benchmark (docs/benchmarks.md explains what it measures and how to read it).

In one run, for each workload and on the same WAL range:
  1. read limit:  pg_recvlogical (pgoutput) reads the range to /dev/null;
  2. relay:       target/release/outbox-relay catches up the range from its slot until
                  confirmed_flush_lsn reaches the range's end (events/s, CPU, peak RSS);
  3. write limit: examples/bench_producer sends as many records of the same size and
                  keys to the same broker with the relay's producer settings;
then the live latency at fixed commit rates (pgbench, single-row transactions),
read from the relay's histogram and cross-checked by a consumer (examples/bench_latency);
with --rtt-sweep also the live phase against a mock broker with fixed round-trip times
(examples/bench_mock_broker) for several linger.ms values.

Starts its own PostgreSQL cluster and tansu broker on free ports unless --pg-url /
--brokers are given, and stops and removes everything it started, also on failure
or Ctrl-C. Writes results.json and results.md to --out (default target/bench/<time>/).

    bench/run.py                  # default, about 4-5 minutes on 2 cores
    bench/run.py --quick          # about 1 minute (plus the build)
    bench/run.py --profile perf   # also profile two catch-ups (or --profile callgrind)

Python 3.11 standard library only; PostgreSQL client programs through subprocess.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RELAY_BIN = REPO / "target/release/outbox-relay"
PRODUCER_BIN = REPO / "target/release/examples/bench_producer"
LATENCY_BIN = REPO / "target/release/examples/bench_latency"
MOCK_BIN = REPO / "target/release/examples/bench_mock_broker"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEYS = 1000  # distinct aggregate ids (record keys)

# The issue's targets.
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- processes ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the child gets SIGTERM if this script dies, even by SIGKILL.
    _libc.prctl(1, signal.SIGTERM)


class Cleanup:
    """Everything started, stopped in reverse order on exit (normal, error or signal)."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, object]] = []

    def add(self, what: str, fn) -> None:
        self.actions.append((what, fn))

    def run(self) -> None:
        while self.actions:
            what, fn = self.actions.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                log(f"cleanup of {what} failed: {e}")


CLEANUP = Cleanup()


def stop_process(p: subprocess.Popen, sig=signal.SIGTERM, timeout=20.0) -> None:
    if p.poll() is not None:
        return
    p.send_signal(sig)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def spawn(args, *, log_path: Path | None = None, stdout=None, stderr=None, env=None, **kw) -> subprocess.Popen:
    """Starts a child that is stopped at exit; its output goes to log_path unless
    stdout/stderr say otherwise."""
    f = open(log_path, "ab") if log_path is not None else None
    try:
        p = subprocess.Popen([str(a) for a in args], stdout=stdout if stdout is not None else f,
                             stderr=stderr if stderr is not None else f, stdin=subprocess.DEVNULL,
                             env=env, preexec_fn=_die_with_parent, **kw)
    finally:
        if f is not None:
            f.close()  # the child holds its own descriptor
    CLEANUP.add(f"{Path(str(args[0])).name} (pid {p.pid})", lambda: stop_process(p))
    return p


def run(args, *, check=True, env=None, timeout=None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env,
                       timeout=timeout, preexec_fn=_die_with_parent, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))[:200]} exited with {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, what: str, log_path: Path, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen on {port}; see {log_path}")
            time.sleep(0.05)


def proc_stat(proc_dir: Path) -> tuple[str, list[str]] | None:
    """(command name, fields after it) of /proc/<pid>/stat; None once the process is gone.
    Fields: [0] state, [1] ppid, ..., [11] utime, [12] stime, [13] cutime, [14] cstime (ticks)."""
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc/<pid>/stat (all its threads)."""
    st = proc_stat(Path(f"/proc/{pid}"))
    return None if st is None else (int(st[1][11]) + int(st[1][12])) / CLK_TCK


def cpu_by_command() -> dict[str, float]:
    """utime + stime (+ that of waited-for children) of every process, summed by
    command name (postgres backends, pgbench, tansu, outbox-relay, ...). Processes
    that exited between two calls drop out, so compare short intervals."""
    out: dict[str, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = proc_stat(d)
        if st is None:
            continue
        name, f = st
        if name == "postgres":
            # PostgreSQL names its processes in the command line: walsender,
            # autovacuum worker, checkpointer, ...; client backends start with the user.
            try:
                title = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
            except OSError:
                title = []
            kinds = {"postmaster", "walsender", "autovacuum", "checkpointer", "walwriter", "background",
                     "logical", "stats"}
            kind = title[1] if len(title) > 1 and title[0] == "postgres:" else "postmaster"
            name = f"postgres {kind if kind in kinds else 'backend'}"
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / CLK_TCK
    return out


def thread_cpu(pid: int) -> dict[str, float]:
    """utime + stime of a process's threads, summed by thread name (tokio-rt-worker,
    rdk:broker<node id>, rdk:main, ...): which thread of the relay takes the CPU."""
    out: dict[str, float] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for d in tasks:
        st = proc_stat(d)
        if st is not None:
            name, f = st
            out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def cores_between(a: dict[str, float], b: dict[str, float], seconds: float,
                  floor: float = 0.0) -> dict[str, float]:
    """Cores used per name between two CPU-seconds readings, largest first,
    leaving out those below floor."""
    used = {k: (b[k] - a.get(k, 0.0)) / seconds for k in b}
    return {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= floor}


def proc_cpu_split(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of a process in seconds."""
    st = proc_stat(Path(f"/proc/{pid}"))
    return None if st is None else (int(st[1][11]) / CLK_TCK, int(st[1][12]) / CLK_TCK)


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_ctx_switches(pid: int) -> int | None:
    """Voluntary plus involuntary context switches of all live threads of a process."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    except OSError:
        return None
    return total


def system_busy_seconds() -> float:
    """CPU time all CPUs spent running processes since boot (/proc/stat: user, nice, system).
    Interrupt time (irq, softirq: here mostly loopback networking) and steal are left out on
    both sides of the comparison in CpuMeter, as process times do not include them."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (f[0] + f[1] + f[2]) / CLK_TCK


def our_tree_seconds() -> float:
    """CPU time of this script and every process it started (alive, or reaped by one of them)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = proc_stat(d)
        if st is None:
            continue
        f = st[1]
        pid, ppid = int(d.name), int(f[1])
        children.setdefault(ppid, []).append(pid)
        cpu[pid] = sum(int(x) for x in f[11:15]) / CLK_TCK  # utime stime cutime cstime
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


class CpuMeter:
    """How much CPU the rest of the machine (not this benchmark) used during a phase:
    another build or test run on the same cores makes every number here worse."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = system_busy_seconds()
        self.ours0 = our_tree_seconds()

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        busy = system_busy_seconds() - self.busy0
        ours = our_tree_seconds() - self.ours0
        other = max(0.0, busy - ours)
        return {"other_load_cores": other / wall if wall > 0 else 0.0,
                "benchmark_cores": ours / wall if wall > 0 else 0.0}


def http_get(url: str, timeout=5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# --- PostgreSQL --------------------------------------------------------------

def pg_bin() -> Path:
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(p / "bin" for p in Path("/usr/lib/postgresql").glob("*") if (p / "bin/postgres").exists())
    if not found:
        raise BenchError("no PostgreSQL binaries in /usr/lib/postgresql/*/bin: run deploy/dev/install-deps.sh or set PG_BIN")
    return found[-1]


def tansu_bin() -> Path:
    if os.environ.get("TANSU_BIN"):
        return Path(os.environ["TANSU_BIN"])
    cache = Path(os.environ.get("OUTBOX_RELAY_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "outbox-relay")
    p = cache / "tansu-0.6.0/bin/tansu"
    if not p.exists():
        raise BenchError(f"tansu not found at {p}: run deploy/dev/install-deps.sh (or set TANSU_BIN)")
    return p


# Settings of the cluster the benchmark starts (reported in results.json).
PG_SETTINGS = {
    "wal_level": "logical",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_wal_senders": "10",
    "max_replication_slots": "20",
    "logical_decoding_work_mem": "64MB",
    "max_connections": "100",
}


def start_postgres(logs: Path) -> str:
    """initdb (as the postgres user when root, like tests/integration/harness.rs) and start
    under a watchdog shell that stops the server and removes its directory when this
    script exits, however it exits. Returns the superuser URL (trust over TCP)."""
    bin_ = pg_bin()
    ids = None
    if os.getuid() == 0:
        pw = pwd.getpwnam("postgres")
        ids = (pw.pw_uid, pw.pw_gid)
    pgdir = Path(tempfile.mkdtemp(prefix="outbox-relay-bench-pg-"))
    if ids:
        os.chown(pgdir, *ids)
    data = pgdir / "data"
    as_pg = dict(user=ids[0], group=ids[1], extra_groups=[]) if ids else {}
    env = dict(os.environ, HOME="/tmp")
    r = subprocess.run([str(bin_ / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                        "--auth-local=trust", "--auth-host=trust"],
                       capture_output=True, text=True, env=env, **as_pg)
    if r.returncode != 0:
        shutil.rmtree(pgdir, ignore_errors=True)
        raise BenchError(f"initdb failed: {r.stderr}")
    port = free_port()
    args = ["-D", str(data), "-p", str(port), "-k", str(pgdir), "-c", "listen_addresses=127.0.0.1"]
    for k, v in PG_SETTINGS.items():
        args += ["-c", f"{k}={v}"]
    log_path = logs / "postgres.log"
    logf = open(log_path, "ab")
    # The watchdog holds the server; it stops it once its stdin (our pipe) closes.
    script = f'"$@" & pid=$!; read -r _; kill -INT $pid 2>/dev/null; wait $pid; rm -rf \'{pgdir}\''
    wd = subprocess.Popen(["bash", "-c", script, "watchdog", str(bin_ / "postgres"), *args],
                          stdin=subprocess.PIPE, stdout=logf, stderr=logf, env=env, **as_pg)

    def stop():
        try:
            wd.stdin.close()
        except OSError:
            pass
        wd.wait(60)
    CLEANUP.add("postgres", stop)
    wait_port(port, "PostgreSQL", log_path)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 60
    while run([bin_ / "pg_isready", "-d", url], check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise BenchError(f"PostgreSQL not ready; see {log_path}")
        time.sleep(0.1)
    return url


def start_tansu(logs: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = logs / "tansu.log"
    p = spawn([tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"], log_path=log_path)
    wait_port(port, "tansu", log_path)
    return f"127.0.0.1:{port}", p


class Sql:
    """One persistent psql session (cheap polling: no connection per query)."""

    def __init__(self, url: str, logs: Path):
        # stdbuf: psql's stdout is a pipe, make it line-buffered so each answer arrives at once.
        self.p = subprocess.Popen(["stdbuf", "-oL", str(pg_bin() / "psql"), "-X", "-q", "-A", "-t",
                                   "-v", "ON_ERROR_STOP=1", url],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(logs / "psql.log", "ab"), text=True, bufsize=1,
                                  preexec_fn=_die_with_parent)
        CLEANUP.add("psql", lambda: stop_process(self.p))
        self.logs = logs

    def query(self, q: str) -> list[str]:
        """Runs q (one statement) and returns its output lines."""
        self.p.stdin.write(q.rstrip().rstrip(";") + ";\n\\echo __end__\n")
        self.p.stdin.flush()
        lines = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise BenchError(f"psql exited running {q[:200]!r}; see {self.logs / 'psql.log'}")
            line = line.rstrip("\n")
            if line == "__end__":
                return lines
            lines.append(line)

    def one(self, q: str) -> str:
        rows = self.query(q)
        return rows[0] if rows else ""


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


# --- workloads ---------------------------------------------------------------

def create_outbox(db: Sql, table: str, publication: str) -> None:
    ddl = (REPO / "sql/001_outbox.sql").read_text().replace("public.outbox", f"public.{table}")
    db.query(ddl)
    db.query(f"CREATE PUBLICATION {publication} FOR TABLE public.{table} WITH (publish = 'insert')")


def write_workload(url: str, table: str, atype: str, w: Workload, events: int) -> float:
    """Commits `events` rows in transactions of w.txn_rows rows. synchronous_commit=off
    for this session only: the WAL written is the same, the load just finishes sooner."""
    txn = w.txn_rows or events
    ntx = events // txn
    # {"t": 1234567890.123456, "pad": "<hex>"} renders to 35 bytes plus the pad.
    half = max(1, (w.payload_bytes - 35) // 2)
    # The pad is hex of random bytes (incompressible like real payloads, so 4 KB rows are
    # TOASTed out of line rather than compressed away); bytea substring is O(1), text
    # substr in UTF8 is not.
    sql = f"""
SET synchronous_commit = off;
DO $bench$
DECLARE
  blob bytea := (SELECT decode(string_agg(md5(random()::text), ''), 'hex') FROM generate_series(1, 2048));
BEGIN
  FOR b IN 0..{ntx - 1} LOOP
    INSERT INTO public.{table} (aggregate_type, aggregate_id, event_type, payload)
    SELECT '{atype}', 'agg-' || (i % {KEYS}), 'BenchEvent',
           jsonb_build_object('t', extract(epoch FROM clock_timestamp()),
                              'pad', encode(substring(blob FROM 1 + (i * 61) % (32768 - {half}) FOR {half}), 'hex'))
    FROM generate_series(b * {txn}, b * {txn} + {txn - 1}) AS i;
    COMMIT;
  END LOOP;
END
$bench$;
"""
    t0 = time.monotonic()
    run([pg_bin() / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url], input=sql, timeout=1800)
    return time.monotonic() - t0


def wait_flushed(db: Sql, lsn: str, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while db.one(f"SELECT pg_current_wal_flush_lsn() >= '{lsn}'::pg_lsn") != "t":
        if time.monotonic() > deadline:
            raise BenchError(f"WAL not flushed up to {lsn}")
        time.sleep(0.05)


class SlotWatch:
    """Polls pg_replication_slots for one slot: active walsender pid (and its CPU) and
    whether confirmed_flush_lsn reached `end`."""

    def __init__(self, db: Sql, slot: str, end: str):
        self.db, self.slot, self.end = db, slot, end
        self.walsender_pid = None
        self.walsender_cpu0 = None
        self.walsender_cpu = None
        self.first_active = None  # time.monotonic() when a walsender first streamed from the slot

    def poll(self) -> bool:
        row = self.db.one(
            f"SELECT coalesce(active_pid, 0), coalesce(confirmed_flush_lsn >= '{self.end}'::pg_lsn, false) "
            f"FROM pg_replication_slots WHERE slot_name = '{self.slot}'")
        if not row:
            raise BenchError(f"slot {self.slot} disappeared")
        pid_s, done = row.split("|")
        pid = int(pid_s)
        if pid and self.first_active is None:
            self.first_active = time.monotonic()
        if pid and pid != self.walsender_pid:
            self.walsender_pid = pid
            self.walsender_cpu0 = proc_cpu_seconds(pid)
        if self.walsender_pid:
            c = proc_cpu_seconds(self.walsender_pid)
            if c is not None:
                self.walsender_cpu = c
        return done == "t"

    def walsender_cpu_seconds(self) -> float | None:
        # A walsender started before our first poll saw it: its startup CPU is negligible.
        if self.walsender_cpu is None or self.walsender_cpu0 is None:
            return None
        return self.walsender_cpu  # whole life of the walsender process


KAFKA_PROPERTIES: dict[str, str] = {}  # --kafka-property, for the relay and bench_producer alike


def relay_config(path: Path, *, url: str, brokers: str, slot: str, publication: str, table: str,
                 partitions: int, metrics: str, topic: str = "outbox.event.{aggregate_type}",
                 create_topics: bool = True, properties: dict[str, str] | None = None,
                 extra: str = "") -> None:
    """extra: TOML appended as is (tables such as [shard] or [sink])."""
    props = "".join(f'"{k}" = "{v}"\n' for k, v in {**KAFKA_PROPERTIES, **(properties or {})}.items())
    path.write_text(f"""# written by bench/run.py
[postgres]
url = "{url}"
slot = "{slot}"
publication = "{publication}"
# 100 ms (the minimum) so the catch-up end is seen within 0.1 s; default 1000.
status_interval_ms = 100

[outbox]
table = "public.{table}"
topic = "{topic}"

[kafka]
brokers = "{brokers}"
create_topics = {str(create_topics).lower()}
topic_partitions = {partitions}

[kafka.properties]
{props}
[metrics]
listen = "{metrics}"
{extra}""")


def relay_env() -> dict:
    return dict(os.environ, RUST_LOG=os.environ.get("BENCH_RELAY_LOG", "warn"))


# Labels every series of a process carries (which sink, which shard): dropped
# so a series reads by its name and its own labels.
CONST_LABELS = ("sink", "shard")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def without_const_labels(series: str) -> str:
    name, brace, rest = series.partition("{")
    if not brace:
        return series
    kept = [m.group(0) for m in LABEL.finditer(rest) if m.group(1) not in CONST_LABELS]
    return name + ("{" + ",".join(kept) + "}" if kept else "")


def prom_samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        name = without_const_labels(name)
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def prom_sum(samples: dict[str, float], metric: str) -> float:
    return sum(v for k, v in samples.items() if k == metric or k.startswith(metric + "{"))


def histogram(samples: dict[str, float], name: str) -> dict[float, float]:
    buckets = {}
    for k, v in samples.items():
        m = re.fullmatch(re.escape(name) + r'_bucket\{le="([^"]+)"\}', k)
        if m:
            buckets[float(m.group(1))] = v
    return buckets


def histogram_percentiles(before: dict[float, float], after: dict[float, float]) -> dict:
    """Percentiles of the observations between two scrapes of a cumulative histogram:
    the upper bound of the bucket holding each (conservative, `*_le_ms`) and a linear
    interpolation inside that bucket like PromQL's histogram_quantile (`*_est_ms`)."""
    les = sorted(after)
    delta = [(le, after[le] - before.get(le, 0.0)) for le in les]
    total = delta[-1][1] if delta else 0
    out = {"n": int(total),
           "buckets_ms": {("+Inf" if le == float("inf") else f"{le * 1e3:g}"): int(c) for le, c in delta}}
    for name, p in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999), ("max", 1.0)]:
        out[name + "_le_ms"] = out[name + "_est_ms"] = None
        if total == 0:
            continue
        target = p * total
        prev_le, prev_c = 0.0, 0.0
        for le, c in delta:
            if c >= target - 1e-9:
                if le != float("inf"):
                    out[name + "_le_ms"] = le * 1e3
                    frac = (target - prev_c) / (c - prev_c) if c > prev_c else 1.0
                    out[name + "_est_ms"] = (prev_le + (le - prev_le) * frac) * 1e3
                break
            prev_le, prev_c = le, c
    return out


def run_read_limit(ctx, *, slot: str, publication: str, end: str, events: int) -> dict:
    watch = SlotWatch(ctx.db, slot, end)
    meter = CpuMeter()
    t0 = time.monotonic()
    p = spawn([pg_bin() / "pg_recvlogical", "-d", ctx.url, "--slot", slot, "--start",
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


def run_relay_catchup(ctx, *, slot: str, publication: str, table: str, end: str, events: int,
                      name: str, profile: str | None = None,
                      stall: tuple[float, float] | None = None, extra_config: str = "",
                      stdout_sink: bool = False, watch_slot: str | None = None) -> dict:
    """Starts the relay on a slot whose whole range is backlog and waits until the slot's
    confirmed_flush_lsn reaches `end`. profile: None, "perf" or "callgrind".
    Each run writes to topics of its own, like bench_producer.
    stall: (after, seconds): freeze the broker (SIGSTOP to our tansu) `after` seconds after
    the relay started streaming, for `seconds`, to see how much the relay holds while Kafka does not ack.
    extra_config: TOML appended to the relay's config (bench/shards.py: [shard]).
    stdout_sink: [sink] kind = "stdout" with confirm = true instead of Kafka, its output to /dev/null;
    records written (events_produced) are counted instead of broker acknowledgements.
    watch_slot: the slot the relay streams from, when not `slot` itself (a shard's)."""
    cfg = ctx.out / f"relay-{name}.toml"
    mport = free_port()
    relay_config(cfg, url=ctx.url, brokers=ctx.brokers, slot=slot, publication=publication, table=table,
                 partitions=ctx.args.partitions, metrics=f"127.0.0.1:{mport}",
                 topic=f"bench.relay.{{aggregate_type}}.{name}",
                 extra=extra_config + ('[sink]\nkind = "stdout"\nconfirm = true\n' if stdout_sink else ""))
    tansu_cpu0 = proc_cpu_seconds(ctx.tansu.pid) if ctx.tansu else None
    watch = SlotWatch(ctx.db, watch_slot or slot, end)
    cmd = [RELAY_BIN, "run", "--config", cfg]
    if profile == "callgrind":
        # valgrind runs the relay in its own process: same pid.
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={ctx.out / f'callgrind-{name}.out'}", *cmd]
    elif profile == "perf":
        # perf starts the relay itself so every thread is sampled from the first instruction.
        cmd = ["perf", "record", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
               "-o", ctx.out / f"perf-{name}.data", "--", *cmd]
    meter = CpuMeter()
    t0 = time.monotonic()
    p = spawn(cmd, log_path=ctx.logs / f"relay-{name}.log", env=relay_env(),
              stdout=subprocess.DEVNULL if stdout_sink else None)
    pid = p.pid
    if profile == "perf":
        while True:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            if kids:
                pid = int(kids[0])
                break
            if p.poll() is not None:
                raise BenchError(f"perf record failed; see {ctx.logs / f'relay-{name}.log'}")
            time.sleep(0.005)
    deadline = t0 + ctx.args.timeout
    max_in_flight = max_queue = 0.0
    next_scrape = t0
    stall_state = "before"
    if stall and ctx.tansu:
        CLEANUP.add("tansu SIGCONT", lambda: ctx.tansu.poll() is None and ctx.tansu.send_signal(signal.SIGCONT))
    while True:
        if p.poll() is not None:
            raise BenchError(f"relay exited with {p.returncode} during catch-up; see {ctx.logs / f'relay-{name}.log'}")
        if watch.poll():
            break
        if time.monotonic() > deadline:
            raise BenchError(f"relay did not confirm {end} within {ctx.args.timeout} s")
        if stall and ctx.tansu and watch.first_active is not None:
            now = time.monotonic() - watch.first_active
            if stall_state == "before" and now >= stall[0]:
                os.kill(ctx.tansu.pid, signal.SIGSTOP)
                stall_state = "stopped"
            elif stall_state == "stopped" and now >= stall[0] + stall[1]:
                os.kill(ctx.tansu.pid, signal.SIGCONT)
                stall_state = "after"
        if time.monotonic() >= next_scrape:
            # The gauges are refreshed every status interval (100 ms); a scrape every 250 ms is enough.
            next_scrape = time.monotonic() + 0.25
            try:
                g = prom_samples(http_get(f"http://127.0.0.1:{mport}/metrics", timeout=1)[1])
                max_in_flight = max(max_in_flight, g.get("outbox_relay_records_in_flight", 0.0))
                max_queue = max(max_queue, g.get("outbox_relay_producer_queue_depth", 0.0))
            except OSError:
                pass
        time.sleep(0.02)
    secs = time.monotonic() - t0
    if stall_state == "stopped":
        os.kill(ctx.tansu.pid, signal.SIGCONT)
    load = meter.stop()
    user_s, system_s = proc_cpu_split(pid) or (0.0, 0.0)
    cpu = user_s + system_s
    hwm_kb = proc_status_kb(pid, "VmHWM")
    switches = proc_ctx_switches(pid)
    tansu_cpu = proc_cpu_seconds(ctx.tansu.pid) - tansu_cpu0 if ctx.tansu else None
    _, text = http_get(f"http://127.0.0.1:{mport}/metrics")
    samples = prom_samples(text)
    acked = prom_sum(samples, "outbox_relay_events_produced_total" if stdout_sink else "outbox_relay_events_acked_total")
    failed = prom_sum(samples, "outbox_relay_events_failed_total")
    if pid != p.pid:
        os.kill(pid, signal.SIGTERM)  # perf exits after its workload, writing its data
        try:
            p.wait(600)
        except subprocess.TimeoutExpired:
            stop_process(p, signal.SIGINT, timeout=600)
    stop_process(p, signal.SIGTERM, timeout=60)
    if p.returncode != 0:
        log(f"warning: relay exited with {p.returncode} on SIGTERM; see {ctx.logs / f'relay-{name}.log'}")
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
        "acked": int(acked),
        "failed": int(failed),
        **load,
    }


def run_write_limit(ctx, *, topic: str, events: int, payload_bytes: int) -> dict:
    tansu_cpu0 = proc_cpu_seconds(ctx.tansu.pid) if ctx.tansu else None
    meter = CpuMeter()
    r = run([PRODUCER_BIN, "--brokers", ctx.brokers, "--topic", topic, "--count", events,
             "--payload-bytes", payload_bytes, "--keys", KEYS, "--partitions", ctx.args.partitions,
             *[a for k, v in KAFKA_PROPERTIES.items() for a in ("--property", f"{k}={v}")]],
            timeout=ctx.args.timeout)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(meter.stop())
    res["tansu_cpu_s"] = proc_cpu_seconds(ctx.tansu.pid) - tansu_cpu0 if ctx.tansu else None
    return res


def best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])


def run_workload(ctx, w: Workload) -> dict:
    events = w.quick_events if ctx.args.quick else w.events
    if w.txn_rows:
        events -= events % w.txn_rows
    name = w.name.lower()
    table = f"outbox_{ctx.run_id}_{name}"
    publication = f"bench_{ctx.run_id}_{name}"
    atype = f"{w.name}_{ctx.run_id}"
    repeat = ctx.args.repeat
    read_slots = [f"bench_{ctx.run_id}_{name}_read{i}" for i in range(repeat)]
    relay_slots = [f"bench_{ctx.run_id}_{name}_relay{i}" for i in range(repeat)]
    stall_slot = f"bench_{ctx.run_id}_{name}_stall" if w.name == STALL_WORKLOAD and ctx.tansu else None
    db = ctx.db
    log(f"{w.name}: {events:,} events, {w.txn_rows or events:,} rows per transaction, ~{w.payload_bytes} B payload")
    create_outbox(db, table, publication)
    # Every slot exists before the first row is written: all cover the same WAL range.
    start = None
    for slot in read_slots + relay_slots + ([stall_slot] if stall_slot else []):
        lsn = db.one(f"SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')")
        start = start or lsn
    write_s = write_workload(ctx.url, table, atype, w, events)
    end = db.one("SELECT pg_current_wal_insert_lsn()")
    wait_flushed(db, end)
    stats = db.one(f"SELECT count(*), avg(octet_length(payload::text))::int FROM public.{table}").split("|")
    if int(stats[0]) != events:
        raise BenchError(f"{table} has {stats[0]} rows, expected {events}")
    payload_avg = int(stats[1])
    wal_bytes = lsn_int(end) - lsn_int(start)
    log(f"{w.name}: wrote {events:,} rows in {write_s:.1f} s, {wal_bytes / 1e6:.0f} MB of WAL, {start}..{end}")

    reads, relays, writes = [], [], []
    for i in range(repeat):
        r = run_read_limit(ctx, slot=read_slots[i], publication=publication, end=end, events=events)
        db.query(f"SELECT pg_drop_replication_slot('{read_slots[i]}')")
        reads.append(r)
        log(f"{w.name}: read limit {r['events_per_s']:,.0f} events/s ({r['seconds']:.2f} s)"
            f"{other_load_note(r)}")
        r = run_relay_catchup(ctx, slot=relay_slots[i], publication=publication, table=table, end=end,
                              events=events, name=f"{name}-{i}")
        db.query(f"SELECT pg_drop_replication_slot('{relay_slots[i]}')")
        relays.append(r)
        log(f"{w.name}: relay {r['events_per_s']:,.0f} events/s ({r['seconds']:.2f} s), "
            f"{r['cpu_s_per_million_events']:.1f} CPU s per 1M events, peak RSS {r['peak_rss_mb']:.1f} MB"
            f"{other_load_note(r)}")
        r = run_write_limit(ctx, topic=f"bench.write.{atype}.{i}", events=events, payload_bytes=payload_avg)
        writes.append(r)
        log(f"{w.name}: write limit {r['records_per_s']:,.0f} records/s ({r['seconds']:.2f} s)"
            f"{other_load_note(r)}")

    stalled = None
    if stall_slot:
        stalled = run_relay_catchup(ctx, slot=stall_slot, publication=publication, table=table, end=end,
                                    events=events, name=f"{name}-stall", stall=STALL)
        db.query(f"SELECT pg_drop_replication_slot('{stall_slot}')")
        log(f"{w.name}: relay with the broker frozen for {STALL[1]:g} s: {stalled['events_per_s']:,.0f} events/s, "
            f"peak RSS {stalled['peak_rss_mb']:.1f} MB, up to {stalled['max_records_in_flight']:,} records in flight")

    db.query(f"DROP PUBLICATION {publication}")
    db.query(f"DROP TABLE public.{table}")
    read, relay, write = best(reads, "events_per_s"), best(relays, "events_per_s"), best(writes, "records_per_s")
    return {
        "name": w.name,
        "events": events,
        "rows_per_transaction": w.txn_rows or events,
        "payload_bytes_avg": payload_avg,
        "wal_bytes": wal_bytes,
        "wal_range": [start, end],
        "write_seconds": write_s,
        "read_limit": read,
        "write_limit": write,
        "relay": relay,
        "relay_over_read_limit": relay["events_per_s"] / read["events_per_s"],
        "relay_over_write_limit": relay["events_per_s"] / write["records_per_s"],
        "relay_peak_rss_mb_max": max(r["peak_rss_mb"] or 0 for r in relays),
        "relay_broker_stalled": stalled,
        "runs": {"read_limit": reads, "relay": relays, "write_limit": writes},
    }


def other_load_note(r: dict) -> str:
    o = r.get("other_load_cores", 0.0)
    return f" [other processes on the machine: {o:.2f} cores]" if o >= 0.1 else ""


# --- live latency ------------------------------------------------------------

def run_live(ctx, *, name: str = "live", brokers: str | None = None, rates: list[int] | None = None,
             seconds: int | None = None, consumer: bool | None = None, topic_seconds: int | None = None,
             properties: dict[str, str] | None = None, create_topics: bool = True,
             broker_pid: int | None = None) -> list[dict]:
    """The relay streaming while pgbench commits at each rate. The keyword arguments
    override the command line (the RTT sweep runs it against a mock broker)."""
    db = ctx.db
    brokers = brokers or ctx.brokers
    rates = rates or ctx.args.live_rates
    live_consumer = ctx.args.live_consumer if consumer is None else consumer
    broker_pid = broker_pid or (ctx.tansu.pid if ctx.tansu else None)
    table = f"outbox_{ctx.run_id}_{name}"
    publication = f"bench_{ctx.run_id}_{name}"
    slot = f"bench_{ctx.run_id}_{name}_relay"
    create_outbox(db, table, publication)
    db.one(f"SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')")
    cfg = ctx.out / f"relay-{name}.toml"
    mport = free_port()
    metrics = f"http://127.0.0.1:{mport}"
    relay_config(cfg, url=ctx.url, brokers=brokers, slot=slot, publication=publication, table=table,
                 partitions=ctx.args.partitions, metrics=f"127.0.0.1:{mport}",
                 create_topics=create_topics, properties=properties)
    relay = spawn([RELAY_BIN, "run", "--config", cfg], log_path=ctx.logs / f"relay-{name}.log", env=relay_env())
    deadline = time.monotonic() + 30
    while True:
        try:
            code, body = http_get(metrics + "/readyz", timeout=1)
            if code == 200 and body.startswith("ready"):
                break
        except OSError:
            pass
        if relay.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"relay did not become ready; see {ctx.logs / f'relay-{name}.log'}")
        time.sleep(0.05)

    duration = seconds or ctx.args.live_seconds
    results = []
    pad = secrets.token_hex(100)[:165]  # the payload renders to ~200 bytes
    for rate in rates:
        atype = f"{name}{rate}_{ctx.run_id}"
        # With --live-topic-seconds N the writer moves to a new aggregate type (so
        # a new topic) every N seconds of its clock: tansu 0.6's in-memory engine
        # lists every stored batch of a partition on each fetch, so one topic
        # that keeps growing makes the consumer measure tansu (docs/benchmarks.md).
        window = ctx.args.live_topic_seconds if topic_seconds is None else topic_seconds
        if window:
            first = int(time.time() // window)
            last = int((time.time() + duration + 60) // window)
            topics = [f"outbox.event.{atype}_{k}" for k in range(first, last + 1)]
            atype_sql = f"'{atype}_' || floor(extract(epoch FROM clock_timestamp()) / {window})::bigint"
        else:
            topics = [f"outbox.event.{atype}"]
            atype_sql = f"'{atype}'"
        log(f"live: {rate:,} single-row transactions/s for {duration} s (pgbench -R)"
            + (f", a new topic every {window} s" if window else ""))
        consumer = None
        if live_consumer:
            topic_args = [a for t in topics for a in ("--topic", t)] + ["--topic-seconds", window]
            consumer = spawn([LATENCY_BIN, "--brokers", brokers, *topic_args,
                              "--partitions", ctx.args.partitions, "--idle-s", "4",
                              "--fetch-wait-ms", ctx.args.fetch_wait_ms,
                              "--timeout-s", str(duration + 300)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            line = consumer.stderr.readline().decode()
            if "ready" not in line:
                raise BenchError(f"bench_latency did not start: {line}{consumer.stderr.read().decode()}")
        script = ctx.out / f"{name}-{rate}.sql"
        script.write_text(
            "\\set k random(0, 999)\n"
            f"INSERT INTO public.{table} (aggregate_type, aggregate_id, event_type, payload) "
            f"VALUES ({atype_sql}, 'agg-' || :k, 'BenchEvent', "
            f"jsonb_build_object('t', extract(epoch FROM clock_timestamp()), 'pad', '{pad}'));\n")
        before = prom_samples(http_get(metrics + "/metrics")[1])
        cpu0 = proc_cpu_seconds(relay.pid)
        broker_cpu0 = proc_cpu_seconds(broker_pid) if broker_pid else None
        threads0 = thread_cpu(relay.pid)
        meter = CpuMeter()
        clients = 4 if rate <= 1000 else 8
        # pgbench in the background: the relay's histogram is scraped every minute meanwhile.
        # The database is positional: pgbench's "-d" is --debug.
        progress = ["-P", "60"] if duration > 60 else []
        proc = spawn([pg_bin() / "pgbench", "-n", "-M", "prepared", "-f", script, "-c", clients, "-j", "2",
                      "-R", rate, "-T", duration, *progress, ctx.url],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        scrapes = [before]
        cpu_marks = [(time.monotonic(), cpu_by_command())]
        thread_marks = [thread_cpu(relay.pid)]
        next_scrape = time.monotonic() + 60
        give_up = time.monotonic() + duration + 120
        # Sleep between checks (pgbench's little output fits the pipe until the
        # end): a communicate() loop here cost this script a growing share of a core.
        while proc.poll() is None:
            if time.monotonic() > give_up:
                stop_process(proc)
                raise BenchError(f"pgbench did not finish within {duration + 120} s")
            if duration > 60 and time.monotonic() >= next_scrape:
                scrapes.append(prom_samples(http_get(metrics + "/metrics")[1]))
                cpu_marks.append((time.monotonic(), cpu_by_command()))
                thread_marks.append(thread_cpu(relay.pid))
                next_scrape += 60
            time.sleep(0.5)
        pg_out, pg_err = proc.communicate()
        if proc.returncode != 0:
            raise BenchError(f"pgbench exited with {proc.returncode}: {pg_err.strip()[-2000:]}")
        pgb = subprocess.CompletedProcess(proc.args, 0, pg_out, pg_err)
        load = meter.stop()
        cpu = proc_cpu_seconds(relay.pid) - cpu0
        threads1 = thread_cpu(relay.pid)
        broker_cpu = proc_cpu_seconds(broker_pid) - broker_cpu0 if broker_pid else None
        (ctx.logs / f"pgbench-{name}-{rate}.log").write_text(pgb.stdout + pgb.stderr)
        end = db.one("SELECT pg_current_wal_insert_lsn()")
        watch = SlotWatch(db, slot, end)
        deadline = time.monotonic() + 120
        while not watch.poll():
            if relay.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"relay did not confirm the live load; see {ctx.logs / f'relay-{name}.log'}")
            time.sleep(0.05)
        after = prom_samples(http_get(metrics + "/metrics")[1])
        if consumer is not None:
            out, err = consumer.communicate(timeout=600)
            if consumer.returncode != 0:
                raise BenchError(f"bench_latency failed: {err.decode()}")
            cons = json.loads(out.decode().strip().splitlines()[-1])
        else:
            cons = {"records": None, "consumer_ms": None, "broker_timestamp_ms": None,
                    "consumer_ms_by_minute": []}
        rows, topics_written = (int(n) for n in db.one(
            f"SELECT count(*), count(DISTINCT aggregate_type) FROM public.{table} "
            f"WHERE aggregate_type = '{atype}' OR starts_with(aggregate_type, '{atype}_')").split("|"))
        pg_lat = re.search(r"latency average = ([\d.]+) ms", pgb.stdout)
        lag = re.search(r"rate limit schedule lag: avg ([\d.]+)", pgb.stdout)
        hist = histogram_percentiles(histogram(before, "outbox_relay_delivery_latency_seconds"),
                                     histogram(after, "outbox_relay_delivery_latency_seconds"))
        scrapes.append(after)
        hist_by_minute = [
            histogram_percentiles(histogram(a, "outbox_relay_delivery_latency_seconds"),
                                  histogram(b, "outbox_relay_delivery_latency_seconds"))
            for a, b in zip(scrapes, scrapes[1:])] if len(scrapes) > 2 else []
        # The interval after the last full minute is only the tail of the run:
        # left out when it holds less than half a minute's events.
        if len(hist_by_minute) > 1 and (hist_by_minute[-1].get("n") or 0) < 0.5 * (hist_by_minute[-2].get("n") or 0):
            hist_by_minute.pop()
        # pgbench's own commit latency per minute (-P 60), to tell the database's
        # commit path from the relay when the relay's histogram moves.
        # Under -R, "lat" counts from the scheduled start: it includes "lag", the
        # time a transaction waited for a pgbench client. Both are kept.
        pg_minutes = [float(m) for m in re.findall(r"progress: [\d.]+ s, [\d.]+ tps, lat ([\d.]+) ms", pg_err)]
        pg_lag_minutes = [float(m) for m in re.findall(r"progress: [\d.]+ s, .*? lag ([\d.]+) ms", pg_err)]
        # Cores used per command name per minute: what takes more CPU as a run goes on?
        cores_by_minute = [cores_between(a, b, t1 - t0, 0.01)
                           for (t0, a), (t1, b) in zip(cpu_marks, cpu_marks[1:])]
        relay_threads_by_minute = [
            cores_between(a, b, t1 - t0, 0.005)
            for (t0, _), (t1, _), a, b in zip(cpu_marks, cpu_marks[1:], thread_marks, thread_marks[1:])]
        res = {
            "cores_by_command_by_minute": cores_by_minute,
            "relay_cores_by_thread_by_minute": relay_threads_by_minute,
            "relay_in_flight_by_minute": [sc.get("outbox_relay_records_in_flight") for sc in scrapes[1:]],
            "relay_producer_queue_by_minute": [sc.get("outbox_relay_producer_queue_depth") for sc in scrapes[1:]],
            "relay_histogram_by_minute": hist_by_minute,
            "pgbench_latency_by_minute_ms": pg_minutes,
            "pgbench_schedule_lag_by_minute_ms": pg_lag_minutes,
            "relay_lag_bytes_by_minute": [sc.get("outbox_relay_replication_lag_bytes") for sc in scrapes[1:]],
            "target_rate": rate,
            "topic_seconds": window or None,
            "topics_written": topics_written,
            "seconds": duration,
            "events": rows,
            "achieved_rate": rows / duration,
            "pgbench_clients": clients,
            "pgbench_commit_latency_avg_ms": float(pg_lat.group(1)) if pg_lat else None,
            "pgbench_schedule_lag_avg_ms": float(lag.group(1)) if lag else None,
            "relay_histogram": hist,
            "consumer": cons,
            "relay_cpu_s_per_million_events": cpu / rows * 1e6 if rows else None,
            "relay_cores": cpu / duration,
            "broker_cores": broker_cpu / duration if broker_cpu is not None else None,
            # The relay's own view of the broker (librdkafka statistics, last 10 s).
            "broker_rtt_gauge": {k: v for k, v in after.items() if k.startswith("outbox_relay_broker_rtt_seconds")},
            "consumer_missed_records": rows - cons["records"] if cons["records"] is not None else None,
            "relay_cores_by_thread": cores_between(threads0, threads1, duration),
            **load,
        }
        for i, cores in enumerate(cores_by_minute):
            log(f"live {rate:,}/s: minute {i + 1} cores by command: "
                + ", ".join(f"{k} {v:.2f}" for k, v in list(cores.items())[:6]))
        for i, cores in enumerate(relay_threads_by_minute):
            log(f"live {rate:,}/s: minute {i + 1} relay cores by thread: "
                + ", ".join(f"{k} {v:.3f}" for k, v in cores.items()))
        if hist_by_minute:
            log("live {:,}/s: relay histogram p99 by minute (ms): {}; pgbench latency / schedule lag by minute (ms): {}".format(
                rate, ", ".join(f"{h.get('p99_est_ms') or 0:.1f}" for h in hist_by_minute),
                ", ".join(f"{m:.1f} / {g:.1f}" for m, g in zip(pg_minutes, pg_lag_minutes))))
        if consumer is not None and cons["records"] != rows:
            log(f"warning: the consumer saw {cons['records']} records, the table has {rows}")
        by_minute = [m["p99"] for m in cons.get("consumer_ms_by_minute", []) if m]
        if len(by_minute) > 1:
            log("live {:,}/s: consumer p99 by minute (ms): {}".format(
                rate, ", ".join(f"{p:.1f}" for p in by_minute)))
        c = cons["consumer_ms"]
        seen = (f"consumer p50 {c['p50']:.1f} p99 {c['p99']:.1f} p99.9 {c['p99_9']:.1f} max {c['max']:.1f} ms; "
                if c else "")
        log(f"live {rate:,}/s: achieved {rows / duration:,.0f}/s; {seen}"
            f"histogram p99 ≤ {hist.get('p99_le_ms')} ms{other_load_note(res)}")
        results.append(res)
    hwm = proc_status_kb(relay.pid, "VmHWM")
    for r in results:
        r["relay_peak_rss_mb_whole_live_run"] = hwm / 1024 if hwm else None
    stop_process(relay, signal.SIGTERM, timeout=60)
    db.query(f"SELECT pg_drop_replication_slot('{slot}')")
    db.query(f"DROP PUBLICATION {publication}")
    db.query(f"DROP TABLE public.{table}")
    return results


# --- broker round-trip sweep ---------------------------------------------------

STAT_LABEL = re.compile(r'.*stat="(\w+)".*')  # outbox_relay_broker_rtt_seconds{...,stat="p50"} -> p50


def run_rtt_sweep(ctx) -> list[dict]:
    """The live phase (no consumer) against librdkafka's mock broker answering
    after a fixed round-trip time, for each RTT and linger.ms: what a slower
    broker costs the relay in CPU and latency, and which linger suits it. The
    mock holds only the one topic (--partitions) and does no other work."""
    out = []
    for rtt in ctx.args.rtt_ms:
        for linger in ctx.args.rtt_lingers:
            name = f"rtt{rtt}l{linger}"
            # The topic run_live will write, with the partitions of every other run.
            topic = f"outbox.event.{name}{ctx.args.rtt_rate}_{ctx.run_id}"
            mock = spawn([MOCK_BIN, "--rtt-ms", rtt, "--topic", topic, "--partitions", ctx.args.partitions],
                         stdout=subprocess.PIPE, log_path=ctx.logs / f"mock-{name}.log")
            brokers = mock.stdout.readline().decode().strip()
            if not brokers:
                raise BenchError(f"bench_mock_broker did not start; see {ctx.logs / f'mock-{name}.log'}")
            log(f"rtt sweep: broker round trip {rtt} ms, linger.ms {linger}")
            try:
                [r] = run_live(ctx, name=name, brokers=brokers, rates=[ctx.args.rtt_rate],
                               seconds=ctx.args.rtt_seconds, consumer=False, topic_seconds=0,
                               properties={"linger.ms": str(linger)}, create_topics=False, broker_pid=mock.pid)
            finally:
                stop_process(mock)
            r.update(broker_rtt_ms=rtt, linger_ms=linger)
            h = r["relay_histogram"]
            gauge = ", ".join(STAT_LABEL.sub(r"\1", k) + f" {v * 1e3:.1f}"
                              for k, v in sorted(r["broker_rtt_gauge"].items()))
            log(f"rtt {rtt} ms, linger {linger} ms: histogram p50 {h.get('p50_est_ms') or 0:.1f} "
                f"p99 {h.get('p99_est_ms') or 0:.1f} ms; relay's broker_rtt gauge (ms) {gauge or 'none'}; "
                f"relay {r['relay_cores']:.2f} cores "
                f"({', '.join(f'{k} {v:.2f}' for k, v in r['relay_cores_by_thread'].items() if v >= 0.005)})")
            out.append(r)
    return out


# --- profile -----------------------------------------------------------------

PROFILE_WORKLOADS = [
    Workload("tx1_200B", 1, 200, 200_000, 50_000),
    Workload("tx100_200B", 100, 200, 300_000, 100_000),
]


def run_profile(ctx, tool: str) -> list[dict]:
    """Extra catch-ups of the two priority workloads under `perf record` (cpu-clock
    sampling with DWARF call graphs: wall-clock CPU including the kernel) or callgrind
    (user-space instructions). Not part of the measured numbers: both slow the relay."""
    out = []
    for w in PROFILE_WORKLOADS:
        events = w.quick_events if ctx.args.quick else w.events
        if tool == "callgrind":
            events //= 2
        name = f"profile-{tool}-{w.name.lower()}"
        tag = f"{ctx.run_id}_p{w.txn_rows}"
        table, publication, slot = f"outbox_{tag}", f"bench_{tag}", f"bench_{tag}_relay"
        db = ctx.db
        create_outbox(db, table, publication)
        db.one(f"SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')")
        write_workload(ctx.url, table, f"profile_{tag}", w, events)
        end = db.one("SELECT pg_current_wal_insert_lsn()")
        wait_flushed(db, end)
        log(f"profile: catch-up of {events:,} events ({w.name}) under {tool}")
        relay = run_relay_catchup(ctx, slot=slot, publication=publication, table=table, end=end,
                                  events=events, name=name, profile=tool)
        db.query(f"SELECT pg_drop_replication_slot('{slot}')")
        db.query(f"DROP PUBLICATION {publication}")
        db.query(f"DROP TABLE public.{table}")
        reports = {}
        if tool == "perf":
            data = ctx.out / f"perf-{name}.data"
            for key, extra in {
                "by_thread": ["--no-children", "--sort", "comm"],
                "by_dso": ["--no-children", "--sort", "dso"],
                "self_by_symbol": ["--no-children", "--sort", "symbol", "--percent-limit", "0.5"],
                "inclusive_by_symbol": ["--children", "--sort", "symbol", "--percent-limit", "2"],
            }.items():
                r = run(["perf", "report", "-i", data, "--stdio", "-g", "none", *extra], check=False, timeout=1200)
                text = "\n".join(l.rstrip() for l in r.stdout.splitlines() if l.strip() and not l.startswith("#"))
                (ctx.out / f"{name}-{key}.txt").write_text(text + "\n")
                reports[key] = text.splitlines()[:60]
            data.unlink(missing_ok=True)
        else:
            data = ctx.out / f"callgrind-{name}.out"
            for key, extra in {"self": [], "inclusive": ["--inclusive=yes"]}.items():
                r = run(["callgrind_annotate", *extra, data], check=False, timeout=600)
                (ctx.out / f"{name}-{key}.txt").write_text(r.stdout)
                lines = [l for l in r.stdout.splitlines() if re.match(r"^\s*[\d,]+ \(", l)]
                reports[key] = lines[:60]
        out.append({"workload": w.name, "events": events, "tool": tool, "relay_under_profiler": relay,
                    "reports": reports})
    return out


# --- output ------------------------------------------------------------------

def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    mhz = re.search(r"cpu MHz\s*:\s*(.*)", cpuinfo)
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    pgv = run([pg_bin() / "postgres", "--version"], check=False).stdout.strip()
    try:
        tv = run([tansu_bin(), "--version"], check=False).stdout.strip()
    except BenchError:
        tv = None
    return {
        "nproc": os.cpu_count(),
        "memory_gb": round(int(mem.group(1)) / 1024 / 1024, 1) if mem else None,
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpu_mhz": mhz.group(1).strip() if mhz else None,
        "kernel": platform.release(),
        "postgresql": pgv,
        "tansu": tv,
        "rustc": run(["rustc", "--version"], check=False).stdout.strip(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def git_info() -> dict:
    """The commit and the working-tree changes the relay was built from (read-only git calls)."""
    head = run(["git", "-C", REPO, "rev-parse", "HEAD"], check=False).stdout.strip()
    changed = run(["git", "-C", REPO, "--no-optional-locks", "status", "--porcelain", "--", "src", "Cargo.toml",
                   "Cargo.lock"], check=False).stdout.splitlines()
    return {"commit": head or None, "uncommitted_changes": [l[3:] for l in changed]}


def fmt(v, spec=",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"Run {res['started']} ({'quick' if res['quick'] else 'default'} mode, best of {res['settings']['repeat']}, "
        f"{res['total_seconds']:.0f} s): {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gb']} GB, "
        f"{m['postgresql']}, {m['tansu']}, {res['settings']['partitions']} partition(s) per topic.",
        "",
        "| workload | events | WAL MB | read limit (events/s) | write limit (records/s) | relay (events/s) "
        "| relay / read | relay / write | relay CPU s per 1M events | relay peak RSS, max of runs (MB) "
        "| walsender busy: read / relay | other load (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in res["workloads"]:
        r = w["relay"]
        other = max(x.get("other_load_cores", 0) for k in ("read_limit", "relay") for x in w["runs"][k])
        busy = f"{fmt(w['read_limit'].get('walsender_busy'), '.0%')} / {fmt(r.get('walsender_busy'), '.0%')}"
        lines.append(
            f"| {w['name']} ({w['rows_per_transaction']:,} rows/txn, {w['payload_bytes_avg']:,} B) | {w['events']:,} "
            f"| {w['wal_bytes'] / 1e6:,.0f} | {fmt(w['read_limit']['events_per_s'])} "
            f"| {fmt(w['write_limit']['records_per_s'])} | {fmt(r['events_per_s'])} "
            f"| {w['relay_over_read_limit']:.2f} | {w['relay_over_write_limit']:.2f} "
            f"| {r['cpu_s_per_million_events']:.1f} | {fmt(w['relay_peak_rss_mb_max'], '.1f')} | {busy} | {other:.2f} |")
    for w in res["workloads"]:
        st = w.get("relay_broker_stalled")
        if st:
            lines += ["", f"{w['name']} once more with the broker frozen (SIGSTOP) for {STALL[1]:g} s, from "
                          f"{STALL[0]:g} s after the relay started streaming: {st['events_per_s']:,.0f} events/s, peak RSS {st['peak_rss_mb']:.1f} MB, "
                          f"up to {st['max_records_in_flight']:,} records in flight."]
    if res.get("live"):
        lines += [
            "",
            "| live rate (single-row txns, 200 B) | achieved | consumer p50 (ms) | p99 | p99.9 | max "
            "| relay histogram p50 (ms) | p99 | p99.9 | CreateTime − commit p99 (ms) | relay CPU (cores) | other load (cores) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for lv in res["live"]:
            c = lv["consumer"]["consumer_ms"] or {}
            h = lv["relay_histogram"]
            b = lv["consumer"]["broker_timestamp_ms"] or {}

            def hq(p):
                le, est = h.get(p + "_le_ms"), h.get(p + "_est_ms")
                return "> 60000" if le is None else f"{est:.1f} (≤ {le:g})"
            lines.append(
                f"| {lv['target_rate']:,}/s | {lv['achieved_rate']:,.0f}/s | {fmt(c.get('p50'), '.1f')} "
                f"| {fmt(c.get('p99'), '.1f')} | {fmt(c.get('p99_9'), '.1f')} | {fmt(c.get('max'), '.1f')} "
                f"| {hq('p50')} | {hq('p99')} | {hq('p99_9')} "
                f"| {fmt(b.get('p99'), '.0f')} | {lv['relay_cores']:.2f} | {lv['other_load_cores']:.2f} |")
        for lv in res["live"]:
            hm = lv.get("relay_histogram_by_minute") or []
            if hm:
                lines.append("")
                lines.append(
                    f"{lv['target_rate']:,}/s, relay histogram p50 / p99 per minute (ms, interpolated in buckets): "
                    + "; ".join(f"{fmt(h.get('p50_est_ms'), '.1f')} / {fmt(h.get('p99_est_ms'), '.1f')}" for h in hm)
                    + "; pgbench's average latency / schedule lag per minute (ms): "
                    + ", ".join(f"{m:.1f} / {g:.1f}" for m, g in zip(lv.get("pgbench_latency_by_minute_ms", []),
                                                                     lv.get("pgbench_schedule_lag_by_minute_ms", [])))
                    + ".")
        for lv in res["live"]:
            minutes = [m for m in lv["consumer"].get("consumer_ms_by_minute", []) if m]
            if len(minutes) > 1:
                lines.append("")
                lines.append(
                    f"{lv['target_rate']:,}/s, consumer p50 / p99 / max per minute (ms): "
                    + "; ".join(f"{m['p50']:.1f} / {m['p99']:.1f} / {m['max']:.1f}" for m in minutes)
                    + f"; relay peak RSS over the live run {fmt(lv.get('relay_peak_rss_mb_whole_live_run'), '.1f')} MB.")
    if res.get("rtt_sweep"):
        lines += ["", "| broker round trip (mock, ms) | linger.ms | histogram p50 (ms) | p99 | p99.9 | relay (cores) "
                  "| of which librdkafka broker thread | achieved |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["rtt_sweep"]:
            h = r["relay_histogram"]
            broker_thread = sum(v for k, v in r["relay_cores_by_thread"].items() if k.startswith("rdk:broker"))
            lines.append(
                f"| {r['broker_rtt_ms']} | {r['linger_ms']} | {fmt(h.get('p50_est_ms'), '.1f')} "
                f"| {fmt(h.get('p99_est_ms'), '.1f')} (≤ {fmt(h.get('p99_le_ms'), 'g')}) | {fmt(h.get('p99_9_est_ms'), '.1f')} "
                f"| {r['relay_cores']:.2f} | {broker_thread:.2f} | {r['achieved_rate']:,.0f}/s |")
    lines += ["", "| target | result | met |", "| --- | --- | --- |"]
    for row in res["targets"]:
        met = "not measured" if row["met"] is None else "yes" if row["met"] else "**no**"
        lines.append(f"| {row['target']} | {row['result']} | {met} |")
    return "\n".join(lines) + "\n"


def targets(res: dict) -> list[dict]:
    out = []
    for w in res["workloads"]:
        if w["name"] in ("tx1_200B", "tx100_200B"):
            ratio = w["relay_over_read_limit"]
            out.append({"target": f"catch-up ≥ {TARGET_READ_RATIO} × read limit, {w['name']}",
                        "result": f"{ratio:.2f} × ({w['relay']['events_per_s']:,.0f} vs "
                                  f"{w['read_limit']['events_per_s']:,.0f} events/s)",
                        "met": ratio >= TARGET_READ_RATIO})
    for lv in res.get("live", []):
        if lv["target_rate"] == 5000:
            # Commit-to-ack as the issue defines it: the commit timestamp to the
            # delivery report, i.e. the relay's histogram. 99 % of the records in
            # buckets up to 20 ms means p99 ≤ 20 ms exactly. The consumer (ack plus
            # the broker's fetch path) is the cross-check, reported alongside.
            c = (lv["consumer"]["consumer_ms"] or {}).get("p99")
            h = lv["relay_histogram"]["p99_le_ms"]
            missed = lv.get("consumer_missed_records")
            out.append({"target": f"live p99 commit-to-ack ≤ {TARGET_P99_MS:g} ms at 5k events/s",
                        "result": f"relay histogram p99 ≤ {fmt(h, 'g')} ms; cross-check: "
                                  + (f"consumer p99 {c:.1f} ms" if c is not None else "no consumer")
                                  + (f" (consumer missed {missed:,} records: not comparable)" if missed and missed > 0 else "")
                                  + f" (achieved {lv['achieved_rate']:,.0f}/s, {lv['seconds']} s)",
                        # No bound means no samples, or p99 past the last bucket (+Inf).
                        "met": h <= TARGET_P99_MS if h is not None else
                               (False if lv["relay_histogram"].get("n") else None)})
            minutes = [m.get("p99_le_ms") for m in lv.get("relay_histogram_by_minute") or []]
            if minutes:
                out.append({"target": "... in every minute of the run (no growth)",
                            "result": "p99 bucket by minute ≤ " + ", ".join(fmt(m, "g") for m in minutes) + " ms",
                            "met": all(m is not None and m <= TARGET_P99_MS for m in minutes)})
    big = [w for w in res["workloads"] if w["events"] >= 1_000_000]
    if big:
        rss = max(w["relay_peak_rss_mb_max"] for w in big)
        out.append({"target": f"peak RSS ≤ {TARGET_RSS_MB:g} MB catching up a 1M-event backlog",
                    "result": f"{rss:.1f} MB ({', '.join(w['name'] for w in big)})",
                    "met": rss <= TARGET_RSS_MB})
    for w in res["workloads"]:
        st = w.get("relay_broker_stalled")
        if st and w["events"] >= 1_000_000:
            out.append({"target": f"peak RSS ≤ {TARGET_RSS_MB:g} MB catching up a 1M-event backlog, "
                                  f"broker frozen {STALL[1]:g} s",
                        "result": f"{st['peak_rss_mb']:.1f} MB ({st['max_records_in_flight']:,} records in flight)",
                        "met": st["peak_rss_mb"] <= TARGET_RSS_MB})
    if not big and res["workloads"]:
        w = max(res["workloads"], key=lambda w: w["events"])
        out.append({"target": f"peak RSS ≤ {TARGET_RSS_MB:g} MB catching up a 1M-event backlog",
                    "result": f"no 1M-event backlog in this run; {w['relay_peak_rss_mb_max']:.1f} MB "
                              f"for {w['events']:,} events ({w['name']})",
                    "met": None})
    return out


# --- main --------------------------------------------------------------------

class Ctx:
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller workloads, one repetition, 10 s live phases")
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS)
                    + " (or none)")
    ap.add_argument("--repeat", type=int, help="catch-up measurements per workload, best reported (default 3, quick 1)")
    ap.add_argument("--no-live", action="store_true", help="skip the live latency phase")
    ap.add_argument("--live-seconds", type=int, help="duration of each live rate (default 30, quick 10)")
    ap.add_argument("--no-live-consumer", dest="live_consumer", action="store_false",
                    help="no latency consumer in the live phase (only the relay's histogram; the broker serves no fetches)")
    ap.add_argument("--live-rates", type=lambda v: [int(x) for x in v.split(",")], default=LIVE_RATES,
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
    ap.add_argument("--rtt-ms", type=lambda v: [int(x) for x in v.split(",")], default=[0, 5, 10, 20],
                    help="round-trip times of the sweep (default 0,5,10,20)")
    ap.add_argument("--rtt-lingers", type=lambda v: [int(x) for x in v.split(",")], default=[5, 10],
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
    ap.add_argument("--consume-bin", type=Path, default=REPO / "target/release/examples/consume",
                    help="crash loop: the consumer reading ids back (default target/release/examples/consume)")
    ap.add_argument("--relay-setting", action="append", default=[], metavar="SECTION.KEY=TOML",
                    help="crash loop: a relay config line, e.g. postgres.confirm_interval_ms=50; repeatable")
    args = ap.parse_args()
    if args.live_seconds is None:
        args.live_seconds = 10 if args.quick else 30
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    for kv in args.kafka_property:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            ap.error(f"--kafka-property {kv!r}: expected KEY=VALUE")
        KAFKA_PROPERTIES[k] = v
    selected = WORKLOADS
    if args.workloads == "none":
        selected = []
    elif args.workloads:
        names = args.workloads.split(",")
        unknown = set(names) - {w.name for w in WORKLOADS}
        if unknown:
            ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
        selected = [w for w in WORKLOADS if w.name in names]
    if args.profile == "perf" and run(["perf", "record", "-e", "cpu-clock", "-o", "/dev/null", "true"],
                                      check=False).returncode != 0:
        ap.error("perf record does not work here; try --profile callgrind")

    ctx = Ctx()
    ctx.args = args
    ctx.run_id = secrets.token_hex(3)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ctx.out = (args.out or REPO / "target/bench" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    ctx.logs = ctx.out / "logs"
    ctx.logs.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    if not args.skip_build:
        log("cargo build --release (outbox-relay, examples bench_producer, bench_latency, bench_mock_broker)")
        r = subprocess.run(["cargo", "build", "--release", "--bin", "outbox-relay",
                            "--example", "bench_producer", "--example", "bench_latency",
                            "--example", "bench_mock_broker", "--example", "consume"], cwd=REPO)
        if r.returncode != 0:
            raise BenchError("cargo build --release failed")
    whole = CpuMeter()
    if args.pg_url:
        ctx.url = args.pg_url
    else:
        log("starting PostgreSQL")
        ctx.url = start_postgres(ctx.logs)
    ctx.tansu = None
    if args.live_topic_seconds is None:
        args.live_topic_seconds = 0 if args.brokers else 20
    if args.brokers:
        ctx.brokers = args.brokers
    else:
        log("starting tansu")
        ctx.brokers, ctx.tansu = start_tansu(ctx.logs)
    ctx.db = Sql(ctx.url, ctx.logs)
    server_settings = {k: ctx.db.one(f"SHOW {k}") for k in PG_SETTINGS}
    if server_settings["wal_level"] != "logical":
        raise BenchError("wal_level must be logical")

    if args.crash_loop:
        # crashloop imports this file as `run`: the same module, not a second copy.
        sys.modules.setdefault("run", sys.modules[__name__])
        import crashloop
        r = crashloop.run_crash_loop(ctx)
        r.update(started=started, machine=machine(), git=git_info())
        (ctx.out / "crashloop.json").write_text(json.dumps(r, indent=2) + "\n")
        md = crashloop.markdown(r)
        (ctx.out / "crashloop.md").write_text(md)
        print(md)
        log(f"results: {ctx.out / 'crashloop.json'}, {ctx.out / 'crashloop.md'}")
        return 0

    res = {
        "started": started,
        "quick": args.quick,
        "machine": machine(),
        "git": git_info(),
        "settings": {
            "postgresql": server_settings,
            "workload_writer": "PL/pgSQL loop, COMMIT per transaction, synchronous_commit=off for that session only",
            "live_writer": "pgbench -R (Poisson arrivals at the target mean rate), synchronous_commit=on",
            "broker": "tansu, memory storage" if ctx.tansu else ctx.brokers,
            "partitions": args.partitions,
            "kafka_properties": dict(KAFKA_PROPERTIES),
            "keys": KEYS,
            "repeat": args.repeat,
            "consumer_fetch_wait_max_ms": args.fetch_wait_ms,
            "live_topic_seconds": args.live_topic_seconds,
            "relay": {"status_interval_ms": 100, "kafka.create_topics": True,
                      "producer": "relay defaults: linger.ms=10, queue.buffering.max.kbytes=65536, "
                                  "message.timeout.ms=300000, enable.idempotence=true, acks=all"},
        },
        "workloads": [],
    }
    for w in selected:
        res["workloads"].append(run_workload(ctx, w))
    if not args.no_live:
        res["live"] = run_live(ctx)
    res["other_load_cores_whole_run"] = whole.stop()["other_load_cores"]
    if args.rtt_sweep:
        res["rtt_sweep"] = run_rtt_sweep(ctx)
    if args.profile:
        res["profile"] = run_profile(ctx, args.profile)
    res["total_seconds"] = time.monotonic() - t_start
    res["targets"] = targets(res)
    (ctx.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (ctx.out / "results.md").write_text(md)
    print(md)
    log(f"results: {ctx.out / 'results.json'}, {ctx.out / 'results.md'}")
    return 0


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    code = 1
    try:
        code = main()
    except BenchError as e:
        log(f"error: {e}")
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        CLEANUP.run()
    sys.exit(code)
