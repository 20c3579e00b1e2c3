"""The RTT sweep: the live phase (no consumer) against librdkafka's mock broker
(examples/bench_mock_broker) answering after a fixed round-trip time, per linger.ms."""
from __future__ import annotations

from ..context import Bench
from ..metrics import STAT_LABEL
from ..processes import log, stop_process
from ..servers import start_mock_broker
from .live import run_live


def log_point(r: dict) -> None:
    h = r["relay_histogram"]
    gauge = ", ".join(STAT_LABEL.sub(r"\1", k) + f" {v * 1e3:.1f}"
                      for k, v in sorted(r["broker_rtt_gauge"].items()))
    log(f"rtt {r['broker_rtt_ms']} ms, linger {r['linger_ms']} ms: histogram p50 {h.get('p50_est_ms') or 0:.1f} "
        f"p99 {h.get('p99_est_ms') or 0:.1f} ms; relay's broker_rtt gauge (ms) {gauge or 'none'}; "
        f"relay {r['relay_cores']:.2f} cores "
        f"({', '.join(f'{k} {v:.2f}' for k, v in r['relay_cores_by_thread'].items() if v >= 0.005)})")


def run_rtt_sweep(b: Bench) -> list[dict]:
    """The live phase (no consumer) against librdkafka's mock broker answering
    after a fixed round-trip time, for each RTT and linger.ms: what a slower
    broker costs the relay in CPU and latency, and which linger suits it. The
    mock holds only the one topic (--partitions) and does no other work."""
    s = b.settings
    out = []
    for rtt in s.rtt_ms:
        for linger in s.rtt_lingers:
            name = f"rtt{rtt}l{linger}"
            # The topic run_live will write, with the partitions of every other run.
            topic = f"outbox.event.{name}{s.rtt_rate}_{b.run_id}"
            brokers, mock = start_mock_broker(b.logs, name=name, rtt_ms=rtt, topic=topic, partitions=s.partitions)
            log(f"rtt sweep: broker round trip {rtt} ms, linger.ms {linger}")
            try:
                [r] = run_live(b, name=name, brokers=brokers, rates=[s.rtt_rate],
                               seconds=s.rtt_seconds, consumer=False, topic_seconds=0,
                               properties={"linger.ms": str(linger)}, create_topics=False, broker_pid=mock.pid)
            finally:
                stop_process(mock)
            r.update(broker_rtt_ms=rtt, linger_ms=linger)
            log_point(r)
            out.append(r)
    return out
