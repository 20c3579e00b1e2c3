"""The servers of the sink comparison (--sinks): Redis, NATS JetStream and RabbitMQ, each a
child process on free ports with its data in a temporary directory, never a system
service. Each runs under a watchdog shell (like PostgreSQL in servers.py) that stops it
and removes its directory once this script exits, however it exits. Kafka is the
benchmark's own tansu (or --brokers).

Every server is started with durable acknowledgements where the server offers them,
as the relay's tests run them; `SinkServer.durability` says what that means for each
(it goes into results.json)."""
from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cpu import descendants, tree_cpu_seconds
from .processes import CLEANUP, BenchError, free_port, http_get, log, run, wait_port

SINKS = ("kafka", "redis", "nats", "rabbitmq")

REDIS_BIN = os.environ.get("REDIS_SERVER_BIN", "/usr/bin/redis-server")
REDIS_CLI = "/usr/bin/redis-cli"
NATS_BIN = os.environ.get("NATS_SERVER_BIN", "/usr/sbin/nats-server")
RABBITMQ_DIR = Path("/usr/lib/rabbitmq")
EPMD_BIN = "/usr/bin/epmd"

NATS_STREAM = "BENCH"
RABBITMQ_EXCHANGE = "outbox"
RABBITMQ_QUEUE = "bench"

DURABILITY = {
    "kafka": "tansu 0.6.0, in-memory storage engine (no broker-side fsync); relay: enable.idempotence, acks=all",
    "redis": "appendonly yes, appendfsync always (each XADD pipeline is in the fsynced AOF before the reply); "
             "no RDB snapshots; auto AOF rewrite at Redis's defaults (100 %, 64 MB)",
    "nats": "JetStream file storage, one replica (nats.create_stream); nats-server 2.9 acknowledges once the "
            "message is written to its store file and fsyncs every 2 minutes (no sync_interval option before 2.10)",
    "rabbitmq": "durable topic exchange (rabbitmq.declare), one durable classic queue bound with '#', persistent "
                "messages (delivery_mode 2), publisher confirms: acked once the queue has the message on disk",
}


def sink_list(v: str) -> list[str]:
    """--sinks: a comma list of SINKS, in the given order, each once."""
    names = [x.strip() for x in v.split(",") if x.strip()]
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise ValueError(f"unknown sink(s): {', '.join(unknown)} (choose from {', '.join(SINKS)})")
    if not names:
        raise ValueError("no sink given")
    return list(dict.fromkeys(names))


def nats_stream(run: str) -> str:
    """The JetStream stream of one relay run: a stream of its own, because JetStream drops a
    message whose Nats-Msg-Id (the event id) it stored within the duplicate window (2 min),
    and every round of a catch-up sends the same events."""
    return NATS_STREAM + ("_" + re.sub(r"[^A-Za-z0-9_-]", "_", run) if run else "")


def sink_config(kind: str, url: str, run: str = "") -> str:
    """The relay's [sink] and sink sections (TOML appended to its config) for a server at
    url; run: the relay run's name (NATS: its own stream)."""
    if kind == "kafka":
        return ""  # the default sink; [kafka] is in every config the benchmark writes
    if kind == "redis":
        return f'\n[sink]\nkind = "redis"\n\n[redis]\nurl = "{url}"\n'
    if kind == "nats":
        return (f'\n[sink]\nkind = "nats"\n\n[nats]\nurl = "{url}"\n'
                f'create_stream = true\nstream = "{nats_stream(run)}"\n')
    if kind == "rabbitmq":
        return (f'\n[sink]\nkind = "rabbitmq"\n\n[rabbitmq]\nurl = "{url}"\n'
                f'exchange = "{RABBITMQ_EXCHANGE}"\ndeclare = true\n')
    raise ValueError(kind)


def redis_args(port: int, data: Path) -> list[str]:
    return ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--protected-mode", "no", "--daemonize", "no",
            "--logfile", ""]


def nats_args(port: int, monitor_port: int, data: Path) -> list[str]:
    """-m: the monitoring endpoint, for the stream's message count (/jsz)."""
    return ["-js", "-sd", str(data), "-p", str(port), "-a", "127.0.0.1", "-m", str(monitor_port)]


def rabbitmq_env(*, port: int, dist_port: int, epmd_port: int, data: Path) -> dict[str, str]:
    """Everything rabbitmq-server reads, all inside `data`, so nothing touches the system's
    service, its epmd on 4369, /etc/rabbitmq or /var/lib/rabbitmq."""
    return {
        "HOME": str(data / "home"),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": f"rabbit-{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(data / "mnesia"),
        "RABBITMQ_LOG_BASE": str(data / "log"),
        "RABBITMQ_LOGS": "-",
        "RABBITMQ_FEATURE_FLAGS_FILE": str(data / "feature_flags"),
        "RABBITMQ_PID_FILE": str(data / "pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(data / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(data / "env.conf"),
        "RABBITMQ_CONFIG_FILE": str(data / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(data / "advanced.config"),
    }


def rabbitmq_definitions(exchange: str, queue: str) -> dict:
    """The exchange as the relay declares it (durable topic), a durable classic queue and a
    binding of every routing key to it (rabbitmqctl import_definitions)."""
    return {
        "exchanges": [{"name": exchange, "vhost": "/", "type": "topic", "durable": True, "auto_delete": False,
                       "internal": False, "arguments": {}}],
        "queues": [{"name": queue, "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}],
        "bindings": [{"source": exchange, "vhost": "/", "destination": queue, "destination_type": "queue",
                      "routing_key": "#", "arguments": {}}],
    }


def watchdog_script(remove: Path | None) -> str:
    """bash -c script: runs "$@" and, once its stdin (our pipe) closes, wakes the process
    group (the server may be paused), stops the server with SIGTERM, waits for it and
    removes `remove`."""
    rm = f"; rm -rf '{remove}'" if remove else ""
    return f'"$@" & pid=$!; read -r _; kill -CONT 0 2>/dev/null; kill -TERM $pid 2>/dev/null; wait $pid{rm}'


def count_aof_rewrites(log_text: str) -> int:
    """Background AOF rewrites redis-server started, from its log."""
    return log_text.count("Background append only file rewriting started")


def parse_jsz_messages(body: str, prefix: str) -> int:
    """Messages stored in the streams named `prefix` or `prefix_*`, from nats-server's
    /jsz?streams=true answer."""
    doc = json.loads(body)
    return sum(int(st.get("state", {}).get("messages", 0))
               for acc in doc.get("account_details") or [] for st in acc.get("stream_detail") or []
               if st.get("name") == prefix or str(st.get("name", "")).startswith(prefix + "_"))


@dataclass
class SinkServer:
    kind: str
    url: str  # what the relay connects to
    pid: int | None  # the process tree whose CPU is the server's (None: not ours)
    log_path: Path | None
    durability: str
    version: str | None = None
    # Messages the server holds for the benchmark (a cross-check of the relay's acks).
    count: Callable[[], int | None] = field(default=lambda: None)
    # After each catch-up: drop what the run stored (RabbitMQ's queue), None if not needed.
    reset: Callable[[], None] | None = None
    # Counters of the server's own background work, compared before and after a catch-up
    # (Redis: AOF rewrites, from its log).
    counters: Callable[[], dict[str, int]] = field(default=lambda: {})
    pausable: bool = False
    paused: bool = False

    def config(self, run: str) -> str:
        """TOML appended to the config of the relay run `run`."""
        return sink_config(self.kind, self.url, run)

    def cpu_seconds(self) -> float | None:
        return tree_cpu_seconds(self.pid) if self.pid else None

    def _signal(self, sig) -> None:
        for pid in descendants(self.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP while another sink is measured: an idle server (Erlang's schedulers
        spin after work) takes nothing from the two cores."""
        if self.pausable and not self.paused:
            self._signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False
            time.sleep(0.2)


def _as_user(name: str) -> tuple[int, int] | None:
    if os.getuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise BenchError(f"running as root needs the '{name}' user (the server's Debian package)") from None
    return pw.pw_uid, pw.pw_gid


def start_watched(name: str, cmd: list, *, log_path: Path, env: dict | None = None,
                  ids: tuple[int, int] | None = None, remove: Path | None = None,
                  cwd: Path | None = None) -> subprocess.Popen:
    """cmd under a watchdog shell in a process group of its own (see watchdog_script);
    registered with CLEANUP. Returns the watchdog, whose process tree is the server."""
    logf = open(log_path, "ab")
    as_user = dict(user=ids[0], group=ids[1], extra_groups=[]) if ids else {}
    wd = subprocess.Popen(["bash", "-c", watchdog_script(remove), "watchdog", *[str(a) for a in cmd]],
                          stdin=subprocess.PIPE, stdout=logf, stderr=logf, env=env, cwd=cwd,
                          start_new_session=True, **as_user)
    logf.close()

    def stop():
        try:
            wd.stdin.close()
        except OSError:
            pass
        try:
            wd.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(wd.pid, signal.SIGKILL)
            wd.wait()
    CLEANUP.add(name, stop)
    return wd


def _tempdir(kind: str, ids: tuple[int, int] | None = None) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"outbox-relay-bench-{kind}-"))
    if ids:
        os.chown(d, *ids)
    return d


def _version(cmd: list[str], pattern: str) -> str | None:
    try:
        out = run(cmd, check=False).stdout
    except OSError:
        return None
    m = re.search(pattern, out)
    return m.group(0) if m else out.strip()[:80] or None


def start_redis(logs: Path) -> SinkServer:
    d = _tempdir("redis")
    port = free_port()
    log_path = logs / "redis.log"
    wd = start_watched("redis-server", [REDIS_BIN, *redis_args(port, d)], log_path=log_path, remove=d)
    wait_port(port, "redis-server", log_path)
    url = f"redis://127.0.0.1:{port}"

    def count() -> int | None:
        keys = run([REDIS_CLI, "-p", port, "--scan"], check=False).stdout.split()
        return sum(int(run([REDIS_CLI, "-p", port, "XLEN", k], check=False).stdout.strip() or 0) for k in keys)
    return SinkServer(kind="redis", url=url, pid=wd.pid, log_path=log_path,
                      durability=DURABILITY["redis"], version=_version([REDIS_BIN, "--version"], r"v=\S+"),
                      count=count, pausable=True,
                      counters=lambda: {"aof_rewrites": count_aof_rewrites(log_path.read_text(errors="replace"))})


def start_nats(logs: Path) -> SinkServer:
    d = _tempdir("nats")
    port, mport = free_port(), free_port()
    log_path = logs / "nats.log"
    wd = start_watched("nats-server", [NATS_BIN, *nats_args(port, mport, d)], log_path=log_path, remove=d)
    wait_port(port, "nats-server", log_path)
    url = f"nats://127.0.0.1:{port}"

    def count() -> int | None:
        try:
            _, body = http_get(f"http://127.0.0.1:{mport}/jsz?streams=true", timeout=5)
            return parse_jsz_messages(body, NATS_STREAM)
        except (OSError, ValueError):
            return None
    return SinkServer(kind="nats", url=url, pid=wd.pid, log_path=log_path,
                      durability=DURABILITY["nats"], version=_version([NATS_BIN, "--version"], r"v\d\S*"),
                      count=count, pausable=True)


def _rabbitmq_server_dir() -> Path:
    found = sorted(RABBITMQ_DIR.glob("lib/rabbitmq_server-*"))
    if not (RABBITMQ_DIR / "bin/rabbitmq-server").exists() or not found:
        raise BenchError(f"{RABBITMQ_DIR}/bin/rabbitmq-server not found: run deploy/dev/install-deps.sh "
                         "(Debian's rabbitmq-server)")
    return found[-1]


def start_rabbitmq(logs: Path) -> SinkServer:
    """rabbitmq-server (as the `rabbitmq` user when root) with its own epmd on a free port,
    then the exchange, the queue and its binding (import_definitions)."""
    version = _rabbitmq_server_dir().name.removeprefix("rabbitmq_server-")
    ids = _as_user("rabbitmq")
    d = _tempdir("rabbitmq", ids)
    for sub in ("mnesia", "log", "home"):
        (d / sub).mkdir()
    (d / "enabled_plugins").write_text("[].\n")
    defs = d / "definitions.json"
    defs.write_text(json.dumps(rabbitmq_definitions(RABBITMQ_EXCHANGE, RABBITMQ_QUEUE)))
    if ids:
        for p in [d, *d.iterdir()]:
            os.chown(p, *ids)
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    env = {**os.environ, **rabbitmq_env(port=port, dist_port=dist_port, epmd_port=epmd_port, data=d)}
    # epmd first (stopped last, removing the directory): the server registers with it.
    start_watched("epmd", [EPMD_BIN, "-port", epmd_port], log_path=logs / "epmd.log", env=env, ids=ids,
                  remove=d, cwd=d)
    wait_port(epmd_port, "epmd", logs / "epmd.log")
    log_path = logs / "rabbitmq.log"
    t0 = time.monotonic()
    wd = start_watched("rabbitmq-server", [RABBITMQ_DIR / "bin/rabbitmq-server"], log_path=log_path, env=env,
                       ids=ids, cwd=d)
    wait_port(port, "RabbitMQ", log_path, timeout=120)
    log(f"RabbitMQ {version} took {time.monotonic() - t0:.1f} s to start")

    def ctl(*args) -> str:
        r = subprocess.run([str(RABBITMQ_DIR / "bin/rabbitmqctl"), "-n", f"rabbit-{port}@localhost", *args],
                           capture_output=True, text=True, env=env, cwd=d, timeout=120,
                           **(dict(user=ids[0], group=ids[1], extra_groups=[]) if ids else {}))
        if r.returncode != 0:
            raise BenchError(f"rabbitmqctl {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    ctl("import_definitions", str(defs))

    def count() -> int | None:
        for line in ctl("list_queues", "-q", "--no-table-headers", "name", "messages").splitlines():
            f = line.split()
            if len(f) == 2 and f[0] == RABBITMQ_QUEUE:
                return int(f[1])
        return None

    url = f"amqp://guest:guest@127.0.0.1:{port}/%2f"
    return SinkServer(kind="rabbitmq", url=url, pid=wd.pid,
                      log_path=log_path, durability=DURABILITY["rabbitmq"], version=f"RabbitMQ {version}",
                      count=count, reset=lambda: ctl("purge_queue", RABBITMQ_QUEUE) and None, pausable=True)


def kafka_server(brokers: str, tansu: subprocess.Popen | None, version: str | None) -> SinkServer:
    return SinkServer(kind="kafka", url=brokers, pid=tansu.pid if tansu else None, log_path=None,
                      durability=DURABILITY["kafka"] if tansu else f"--brokers {brokers}", version=version)


def start_sink_servers(kinds: list[str], logs: Path, *, brokers: str, tansu: subprocess.Popen | None,
                       tansu_version: str | None) -> dict[str, SinkServer]:
    out = {}
    for kind in kinds:
        if kind == "kafka":
            out[kind] = kafka_server(brokers, tansu, tansu_version)
            continue
        log(f"starting {kind}")
        out[kind] = {"redis": start_redis, "nats": start_nats, "rabbitmq": start_rabbitmq}[kind](logs)
    return out
