"""One workload: its backlog written once, then --repeat rounds of read limit, relay
catch-up and write limit on that same WAL range (and the broker-stall catch-up)."""
from __future__ import annotations

from dataclasses import dataclass

from ..context import Bench
from ..database import create_outbox, create_slot, drop_outbox, drop_slot, lsn_int, wait_flushed, wal_end, write_workload
from ..processes import BenchError, log
from ..report import other_load_note
from ..settings import STALL, STALL_WORKLOAD, Workload
from .catchup import best, run_read_limit, run_relay_catchup, run_write_limit


@dataclass
class Backlog:
    """A workload's rows, written once: the WAL range every catch-up of it reads."""
    table: str
    publication: str
    atype: str  # aggregate_type of its rows (and so its topics)
    events: int
    start: str  # LSN of the first slot, created before the first row
    end: str
    write_s: float
    payload_avg: int

    @property
    def wal_bytes(self) -> int:
        return lsn_int(self.end) - lsn_int(self.start)


def workload_events(b: Bench, w: Workload) -> int:
    events = w.quick_events if b.settings.quick else w.events
    if w.txn_rows:
        events -= events % w.txn_rows
    return events


def write_backlog(b: Bench, w: Workload, events: int, slots: list[str]) -> Backlog:
    """Creates the outbox table and every slot in `slots` (all before the first row is
    written, so all cover the same WAL range), then writes the workload."""
    name = w.name.lower()
    table = f"outbox_{b.run_id}_{name}"
    publication = f"bench_{b.run_id}_{name}"
    atype = f"{w.name}_{b.run_id}"
    db = b.servers.db
    log(f"{w.name}: {events:,} events, {w.txn_rows or events:,} rows per transaction, ~{w.payload_bytes} B payload")
    create_outbox(db, table, publication)
    start = None
    for slot in slots:
        lsn = create_slot(db, slot)
        start = start or lsn
    write_s = write_workload(b.servers.url, table, atype, w, events)
    end = wal_end(db)
    wait_flushed(db, end)
    stats = db.one(f"SELECT count(*), avg(octet_length(payload::text))::int FROM public.{table}").split("|")
    if int(stats[0]) != events:
        raise BenchError(f"{table} has {stats[0]} rows, expected {events}")
    bl = Backlog(table=table, publication=publication, atype=atype, events=events, start=start, end=end,
                 write_s=write_s, payload_avg=int(stats[1]))
    log(f"{w.name}: wrote {events:,} rows in {write_s:.1f} s, {bl.wal_bytes / 1e6:.0f} MB of WAL, {start}..{end}")
    return bl


def measure_once(b: Bench, w: Workload, bl: Backlog, i: int, *, read_slot: str,
                 relay_slot: str) -> tuple[dict, dict, dict]:
    """Repetition i: the read limit, the relay and the write limit, each slot dropped once read."""
    db = b.servers.db
    read = run_read_limit(b, slot=read_slot, publication=bl.publication, end=bl.end, events=bl.events)
    drop_slot(db, read_slot)
    log(f"{w.name}: read limit {read['events_per_s']:,.0f} events/s ({read['seconds']:.2f} s)"
        f"{other_load_note(read)}")
    relay = run_relay_catchup(b, slot=relay_slot, publication=bl.publication, table=bl.table, end=bl.end,
                              events=bl.events, name=f"{w.name.lower()}-{i}")
    drop_slot(db, relay_slot)
    log(f"{w.name}: relay {relay['events_per_s']:,.0f} events/s ({relay['seconds']:.2f} s), "
        f"{relay['cpu_s_per_million_events']:.1f} CPU s per 1M events, peak RSS {relay['peak_rss_mb']:.1f} MB"
        f"{other_load_note(relay)}")
    write = run_write_limit(b, topic=f"bench.write.{bl.atype}.{i}", events=bl.events, payload_bytes=bl.payload_avg)
    log(f"{w.name}: write limit {write['records_per_s']:,.0f} records/s ({write['seconds']:.2f} s)"
        f"{other_load_note(write)}")
    return read, relay, write


def measure_stalled(b: Bench, w: Workload, bl: Backlog, slot: str) -> dict:
    """The relay catching up once more with the broker frozen for STALL[1] s."""
    stalled = run_relay_catchup(b, slot=slot, publication=bl.publication, table=bl.table, end=bl.end,
                                events=bl.events, name=f"{w.name.lower()}-stall", stall=STALL)
    drop_slot(b.servers.db, slot)
    log(f"{w.name}: relay with the broker frozen for {STALL[1]:g} s: {stalled['events_per_s']:,.0f} events/s, "
        f"peak RSS {stalled['peak_rss_mb']:.1f} MB, up to {stalled['max_records_in_flight']:,} records in flight")
    return stalled


def run_workload(b: Bench, w: Workload) -> dict:
    events = workload_events(b, w)
    prefix = f"bench_{b.run_id}_{w.name.lower()}"
    repeat = b.settings.repeat
    read_slots = [f"{prefix}_read{i}" for i in range(repeat)]
    relay_slots = [f"{prefix}_relay{i}" for i in range(repeat)]
    stall_slot = f"{prefix}_stall" if w.name == STALL_WORKLOAD and b.servers.tansu else None
    bl = write_backlog(b, w, events, read_slots + relay_slots + ([stall_slot] if stall_slot else []))

    reads, relays, writes = [], [], []
    for i in range(repeat):
        read, relay, write = measure_once(b, w, bl, i, read_slot=read_slots[i], relay_slot=relay_slots[i])
        reads.append(read)
        relays.append(relay)
        writes.append(write)
    stalled = measure_stalled(b, w, bl, stall_slot) if stall_slot else None

    drop_outbox(b.servers.db, bl.table, bl.publication)
    read, relay, write = best(reads, "events_per_s"), best(relays, "events_per_s"), best(writes, "records_per_s")
    return {
        "name": w.name,
        "events": events,
        "rows_per_transaction": w.txn_rows or events,
        "payload_bytes_avg": bl.payload_avg,
        "wal_bytes": bl.wal_bytes,
        "wal_range": [bl.start, bl.end],
        "write_seconds": bl.write_s,
        "read_limit": read,
        "write_limit": write,
        "relay": relay,
        "relay_over_read_limit": relay["events_per_s"] / read["events_per_s"],
        "relay_over_write_limit": relay["events_per_s"] / write["records_per_s"],
        "relay_peak_rss_mb_max": max(r["peak_rss_mb"] or 0 for r in relays),
        "relay_broker_stalled": stalled,
        "runs": {"read_limit": reads, "relay": relays, "write_limit": writes},
    }
