"""What every phase is given: the settings, this run's id and directories, the servers."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .servers import Servers
from .settings import REPO, Settings


@dataclass
class Bench:
    settings: Settings
    run_id: str  # in the names of every table, publication, slot and topic of the run
    out: Path  # results, relay configs, pgbench scripts
    logs: Path  # out/logs: every process's output
    servers: Servers


def output_dirs(out: Path | None, pattern: str) -> tuple[Path, Path]:
    """The output directory (--out, or target/bench/<time as pattern>) and its logs/,
    created."""
    out = (out or REPO / "target/bench" / time.strftime(pattern)).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return out, logs
