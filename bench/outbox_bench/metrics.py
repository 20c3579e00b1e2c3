"""The relay's Prometheus metrics: samples by series, sums, histograms and their percentiles."""
from __future__ import annotations

import re

from .processes import http_get


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


# outbox_relay_broker_rtt_seconds{...,stat="p50"} -> p50
STAT_LABEL = re.compile(r'.*stat="(\w+)".*')
LATENCY = "outbox_relay_delivery_latency_seconds"  # the relay's commit-to-ack histogram


def scrape(base_url: str, timeout=5.0) -> dict[str, float]:
    """The samples of base_url/metrics (OSError if it does not answer)."""
    return prom_samples(http_get(base_url + "/metrics", timeout=timeout)[1])


def latency_percentiles(before: dict[str, float], after: dict[str, float]) -> dict:
    """histogram_percentiles of the relay's latency histogram between two scrapes."""
    return histogram_percentiles(histogram(before, LATENCY), histogram(after, LATENCY))
