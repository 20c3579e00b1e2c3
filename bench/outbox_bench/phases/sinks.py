"""The sink comparison (--sinks kafka,redis,nats,rabbitmq): for each sink, in one run,
the relay catching up the same backlog (beside the read limit, pg_recvlogical, on that
same WAL range) and the live phase at each rate with the relay's commit-to-ack histogram,
the relay's CPU and memory and the sink server's CPU. Only the sink under measurement
runs: the others are paused (SIGSTOP)."""
from __future__ import annotations

from ..context import Bench
from ..database import drop_outbox, drop_slot
from ..processes import log
from ..report import other_load_note
from ..sink_servers import SinkServer
from .catchup import best, run_read_limit, run_relay_catchup
from .live import run_live
from .workload import workload_events, write_backlog


def activate(servers: dict[str, SinkServer], kind: str | None) -> None:
    """Resumes `kind`'s server and pauses every other one (None: resumes them all)."""
    for k, srv in servers.items():
        if k != kind:
            srv.pause()
    if kind is not None:
        servers[kind].resume()


def round_order(kinds: list[str], i: int) -> list[str]:
    """The sinks of round i, rotated by i so that none is always first after the read limit."""
    if not kinds:
        return []
    i %= len(kinds)
    return kinds[i:] + kinds[:i]


def catchup_slots(prefix: str, kinds: list[str], repeat: int) -> tuple[list[str], dict[tuple[str, int], str]]:
    """The read-limit slot of each round and the relay slot of each sink and round."""
    reads = [f"{prefix}_read{i}" for i in range(repeat)]
    relays = {(k, i): f"{prefix}_{k}{i}" for i in range(repeat) for k in kinds}
    return reads, relays


def sink_catchup(b: Bench, w, servers: dict[str, SinkServer]) -> dict:
    """One backlog of workload w, every slot created before its first row; per round the
    read limit, then each sink's relay catching up from its own slot."""
    kinds = list(servers)
    events = workload_events(b, w)
    repeat = b.settings.repeat
    reads_slots, relay_slots = catchup_slots(f"bench_{b.run_id}_{w.name.lower()}", kinds, repeat)
    bl = write_backlog(b, w, events, reads_slots + list(relay_slots.values()))
    db = b.servers.db
    reads: list[dict] = []
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(repeat):
        for srv in servers.values():
            srv.pause()  # the read limit runs alone
        read = run_read_limit(b, slot=reads_slots[i], publication=bl.publication, end=bl.end, events=events)
        drop_slot(db, reads_slots[i])
        reads.append(read)
        log(f"{w.name} round {i + 1}: read limit {read['events_per_s']:,.0f} events/s ({read['seconds']:.2f} s)"
            f"{other_load_note(read)}")
        for k in round_order(kinds, i):
            srv = servers[k]
            activate(servers, k)
            before, counters0 = srv.count(), srv.counters()
            name = f"{w.name.lower()}-{k}-{i}"
            r = run_relay_catchup(b, slot=relay_slots[(k, i)], publication=bl.publication, table=bl.table,
                                  end=bl.end, events=events, name=name, extra_config=srv.config(name),
                                  sink_cpu=srv.cpu_seconds)
            drop_slot(db, relay_slots[(k, i)])
            after, counters1 = srv.count(), srv.counters()
            r["stored_by_sink"] = after - before if before is not None and after is not None else None
            r["sink_server_counters"] = {c: v - counters0.get(c, 0) for c, v in counters1.items()}
            if srv.reset:
                srv.reset()
            r["read_limit_same_round"] = read["events_per_s"]
            r["over_read_limit_same_round"] = r["events_per_s"] / read["events_per_s"]
            sc = r.get("sink_server_cpu_s")
            r["sink_server_cpu_s_per_million_events"] = sc / events * 1e6 if sc is not None else None
            runs[k].append(r)
            stored = f", {r['stored_by_sink']:,} stored" if r["stored_by_sink"] is not None else ""
            stored += "".join(f", {v} {c}" for c, v in r["sink_server_counters"].items())
            log(f"{w.name} round {i + 1}: {k}: {r['events_per_s']:,.0f} events/s "
                f"({r['over_read_limit_same_round']:.2f} × read limit), {r['cpu_s_per_million_events']:.1f} relay "
                f"CPU s per 1M events, peak RSS {r['peak_rss_mb']:.1f} MB{stored}{other_load_note(r)}")
    activate(servers, None)
    drop_outbox(db, bl.table, bl.publication)
    read = best(reads, "events_per_s")
    per_sink = {}
    for k in kinds:
        r = best(runs[k], "events_per_s")
        per_sink[k] = {
            "relay": r,
            "relay_over_read_limit": r["events_per_s"] / read["events_per_s"],
            "relay_peak_rss_mb_max": max(x["peak_rss_mb"] or 0 for x in runs[k]),
            "other_load_cores_max": max(x.get("other_load_cores", 0.0) for x in runs[k] + reads),
            "runs": runs[k],
        }
    return {
        "name": w.name,
        "events": events,
        "rows_per_transaction": w.txn_rows or events,
        "payload_bytes_avg": bl.payload_avg,
        "wal_bytes": bl.wal_bytes,
        "wal_range": [bl.start, bl.end],
        "write_seconds": bl.write_s,
        "read_limit": read,
        "read_limit_runs": reads,
        "sinks": per_sink,
    }


def sink_live(b: Bench, servers: dict[str, SinkServer]) -> dict[str, list[dict]]:
    """The live phase per sink, each rate of --live-rates, no consumer (the relay's
    histogram is commit-to-ack), one topic per rate for every sink."""
    out = {}
    for k, srv in servers.items():
        activate(servers, k)
        log(f"live: {k}")
        counters0 = srv.counters()
        res = run_live(b, name=f"live_{k}", consumer=False, topic_seconds=0, extra=srv.config(f"live_{k}"),
                       broker_pid=srv.pid)
        counters = {c: v - counters0.get(c, 0) for c, v in srv.counters().items()}
        for r in res:
            r["sink_server_counters_whole_live_run"] = counters
            bc = r.get("broker_cores")
            r["sink_server_cores"] = bc
            h = r["relay_histogram"]
            log(f"live {r['target_rate']:,}/s {k}: commit-to-ack p50 {h.get('p50_est_ms') or 0:.1f} "
                f"p99 {h.get('p99_est_ms') or 0:.1f} ms (p99 ≤ {h.get('p99_le_ms')} ms), relay "
                f"{r['relay_cores']:.3f} cores, sink server {bc if bc is None else round(bc, 3)} cores")
        out[k] = res
    activate(servers, None)
    return out


def run_sinks(b: Bench, servers: dict[str, SinkServer]) -> dict:
    s = b.settings
    res = {"catchup": [sink_catchup(b, w, servers) for w in s.workloads]}
    if s.live:
        res["live"] = sink_live(b, servers)
    return res
