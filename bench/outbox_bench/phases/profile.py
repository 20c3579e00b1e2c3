"""--profile: extra catch-ups of two workloads under perf or callgrind, with their reports."""
from __future__ import annotations

import re
from pathlib import Path

from ..context import Bench
from ..database import create_outbox, create_slot, drop_outbox, drop_slot, wait_flushed, wal_end, write_workload
from ..processes import log, run
from ..settings import Workload
from .catchup import run_relay_catchup

PROFILE_WORKLOADS = [
    Workload("tx1_200B", 1, 200, 200_000, 50_000),
    Workload("tx100_200B", 100, 200, 300_000, 100_000),
]


def perf_reports(out: Path, name: str) -> dict[str, list[str]]:
    """perf report by thread, by library, by symbol (self and inclusive); the data is removed."""
    reports = {}
    data = out / f"perf-{name}.data"
    for key, extra in {
        "by_thread": ["--no-children", "--sort", "comm"],
        "by_dso": ["--no-children", "--sort", "dso"],
        "self_by_symbol": ["--no-children", "--sort", "symbol", "--percent-limit", "0.5"],
        "inclusive_by_symbol": ["--children", "--sort", "symbol", "--percent-limit", "2"],
    }.items():
        r = run(["perf", "report", "-i", data, "--stdio", "-g", "none", *extra], check=False, timeout=1200)
        text = "\n".join(l.rstrip() for l in r.stdout.splitlines() if l.strip() and not l.startswith("#"))
        (out / f"{name}-{key}.txt").write_text(text + "\n")
        reports[key] = text.splitlines()[:60]
    data.unlink(missing_ok=True)
    return reports


def callgrind_reports(out: Path, name: str) -> dict[str, list[str]]:
    """callgrind_annotate, self and inclusive."""
    reports = {}
    data = out / f"callgrind-{name}.out"
    for key, extra in {"self": [], "inclusive": ["--inclusive=yes"]}.items():
        r = run(["callgrind_annotate", *extra, data], check=False, timeout=600)
        (out / f"{name}-{key}.txt").write_text(r.stdout)
        lines = [l for l in r.stdout.splitlines() if re.match(r"^\s*[\d,]+ \(", l)]
        reports[key] = lines[:60]
    return reports


def run_profile(b: Bench, tool: str) -> list[dict]:
    """Extra catch-ups of the two priority workloads under `perf record` (cpu-clock
    sampling with DWARF call graphs: wall-clock CPU including the kernel) or callgrind
    (user-space instructions). Not part of the measured numbers: both slow the relay."""
    out = []
    db = b.servers.db
    for w in PROFILE_WORKLOADS:
        events = w.quick_events if b.settings.quick else w.events
        if tool == "callgrind":
            events //= 2
        name = f"profile-{tool}-{w.name.lower()}"
        tag = f"{b.run_id}_p{w.txn_rows}"
        table, publication, slot = f"outbox_{tag}", f"bench_{tag}", f"bench_{tag}_relay"
        create_outbox(db, table, publication)
        create_slot(db, slot)
        write_workload(b.servers.url, table, f"profile_{tag}", w, events)
        end = wal_end(db)
        wait_flushed(db, end)
        log(f"profile: catch-up of {events:,} events ({w.name}) under {tool}")
        relay = run_relay_catchup(b, slot=slot, publication=publication, table=table, end=end,
                                  events=events, name=name, profile=tool)
        drop_slot(db, slot)
        drop_outbox(db, table, publication)
        reports = perf_reports(b.out, name) if tool == "perf" else callgrind_reports(b.out, name)
        out.append({"workload": w.name, "events": events, "tool": tool, "relay_under_profiler": relay,
                    "reports": reports})
    return out
