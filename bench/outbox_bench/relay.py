"""The relay under test: its configuration file, environment and start-up."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .processes import spawn, wait_ready


def relay_config(path: Path, *, url: str, brokers: str, slot: str, publication: str, table: str,
                 partitions: int, metrics: str, topic: str = "outbox.event.{aggregate_type}",
                 create_topics: bool = True, properties: dict[str, str] | None = None,
                 extra: str = "") -> None:
    """properties: [kafka.properties] (the run's --kafka-property merged with the phase's own).
    extra: TOML appended as is (tables such as [shard] or [sink])."""
    props = "".join(f'"{k}" = "{v}"\n' for k, v in (properties or {}).items())
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


def start_relay(relay_bin: Path, cfg: Path, log_path: Path, metrics_url: str, *,
                timeout: float, interval: float) -> subprocess.Popen:
    """`relay_bin run --config cfg`, once it answers "ready" on metrics_url/readyz."""
    p = spawn([relay_bin, "run", "--config", cfg], log_path=log_path, env=relay_env())
    wait_ready(p, metrics_url, log_path, timeout=timeout, interval=interval)
    return p
