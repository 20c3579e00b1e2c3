"""CPU, memory and context switches of processes and threads, from /proc; CpuMeter,
the CPU the rest of the machine used during a phase."""
from __future__ import annotations

import os
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def proc_table() -> tuple[dict[int, list[int]], dict[int, float]]:
    """(child pids by parent pid, CPU s by pid) of every process; CPU s = utime + stime +
    cutime + cstime, so children that exited and were reaped still count for their parent."""
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
    return children, cpu


def process_tree(children: dict[int, list[int]], root: int) -> list[int]:
    """root and every descendant of it in `children` (child pids by parent pid)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float | None:
    """CPU time of a process and everything it started (a server that runs as a script
    and its children, like rabbitmq-server); None once it is gone."""
    children, cpu = proc_table()
    if root not in cpu:
        return None
    return sum(cpu.get(pid, 0.0) for pid in process_tree(children, root))


def descendants(root: int) -> list[int]:
    """The pids below root (not root itself)."""
    return process_tree(proc_table()[0], root)[1:]


def our_tree_seconds() -> float:
    """CPU time of this script and every process it started (alive, or reaped by one of them)."""
    children, cpu = proc_table()
    return sum(cpu.get(pid, 0.0) for pid in process_tree(children, os.getpid()))


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
