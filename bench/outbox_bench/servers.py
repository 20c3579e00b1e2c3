"""The servers the benchmark talks to: its own PostgreSQL cluster (or --pg-url), its own
tansu (or --brokers), librdkafka's mock broker for the RTT sweep, and psql sessions."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .processes import CLEANUP, BenchError, die_with_parent, free_port, log, run, spawn, stop_process, wait_port
from .settings import MOCK_BIN, Settings


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


def start_postgres(logs: Path, pg_settings: dict[str, str] | None = None) -> str:
    """initdb (as the postgres user when root, like tests/integration/harness.rs) and start
    under a watchdog shell that stops the server and removes its directory when this
    script exits, however it exits. pg_settings: instead of PG_SETTINGS.
    Returns the superuser URL (trust over TCP)."""
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
    for k, v in (pg_settings or PG_SETTINGS).items():
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
                                  preexec_fn=die_with_parent)
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


def start_mock_broker(logs: Path, *, name: str, rtt_ms: int, topic: str,
                      partitions: int) -> tuple[str, subprocess.Popen]:
    """examples/bench_mock_broker answering every request after rtt_ms, holding `topic`
    only; returns its bootstrap address and the process."""
    mock = spawn([MOCK_BIN, "--rtt-ms", rtt_ms, "--topic", topic, "--partitions", partitions],
                 stdout=subprocess.PIPE, log_path=logs / f"mock-{name}.log")
    brokers = mock.stdout.readline().decode().strip()
    if not brokers:
        raise BenchError(f"bench_mock_broker did not start; see {logs / f'mock-{name}.log'}")
    return brokers, mock


@dataclass
class Servers:
    """The servers of a run and the psql session the phases share."""
    url: str  # PostgreSQL superuser URL
    brokers: str  # Kafka bootstrap address
    tansu: subprocess.Popen | None  # the benchmark's own tansu (None with --brokers)
    db: Sql


def start_servers(s: Settings, logs: Path) -> Servers:
    """PostgreSQL and tansu, unless --pg-url / --brokers name existing ones."""
    if s.pg_url:
        url = s.pg_url
    else:
        log("starting PostgreSQL")
        url = start_postgres(logs)
    tansu = None
    if s.brokers:
        brokers = s.brokers
    else:
        log("starting tansu")
        brokers, tansu = start_tansu(logs)
    return Servers(url=url, brokers=brokers, tansu=tansu, db=Sql(url, logs))


def server_settings(db: Sql, names=PG_SETTINGS) -> dict[str, str]:
    """The server's values of the settings in PG_SETTINGS (reported in results.json)."""
    return {k: db.one(f"SHOW {k}") for k in names}
