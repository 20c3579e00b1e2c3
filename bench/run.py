#!/usr/bin/env python3
"""outbox-relay benchmark: the entry point of the bench/outbox_bench package
(docs/benchmarks.md; `bench/run.py --help` for the options)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from outbox_bench.main import entry  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry())
