"""The benchmark's objects in PostgreSQL: outbox tables and publications, the workload
writer, replication slots and how far they confirmed."""
from __future__ import annotations

import time

from .cpu import proc_cpu_seconds
from .processes import BenchError, run
from .servers import Sql, pg_bin
from .settings import KEYS, REPO, Workload


def lsn_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def create_outbox(db: Sql, table: str, publication: str) -> None:
    ddl = (REPO / "sql/001_outbox.sql").read_text().replace("public.outbox", f"public.{table}")
    db.query(ddl)
    db.query(f"CREATE PUBLICATION {publication} FOR TABLE public.{table} WITH (publish = 'insert')")


def write_workload(url: str, table: str, atype: str, w: Workload, events: int) -> float:
    """Commits `events` rows in transactions of w.txn_rows rows. synchronous_commit=off
    for this session only: the WAL written is the same, the load just finishes sooner."""
    txn = w.txn_rows or events
    ntx = events // txn
    # {"t": 1234567890.123456, "pad": "<hex>"} renders to 35 bytes plus the pad.
    half = max(1, (w.payload_bytes - 35) // 2)
    # The pad is hex of random bytes (incompressible like real payloads, so 4 KB rows are
    # TOASTed out of line rather than compressed away); bytea substring is O(1), text
    # substr in UTF8 is not.
    sql = f"""
SET synchronous_commit = off;
DO $bench$
DECLARE
  blob bytea := (SELECT decode(string_agg(md5(random()::text), ''), 'hex') FROM generate_series(1, 2048));
BEGIN
  FOR b IN 0..{ntx - 1} LOOP
    INSERT INTO public.{table} (aggregate_type, aggregate_id, event_type, payload)
    SELECT '{atype}', 'agg-' || (i % {KEYS}), 'BenchEvent',
           jsonb_build_object('t', extract(epoch FROM clock_timestamp()),
                              'pad', encode(substring(blob FROM 1 + (i * 61) % (32768 - {half}) FOR {half}), 'hex'))
    FROM generate_series(b * {txn}, b * {txn} + {txn - 1}) AS i;
    COMMIT;
  END LOOP;
END
$bench$;
"""
    t0 = time.monotonic()
    run([pg_bin() / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url], input=sql, timeout=1800)
    return time.monotonic() - t0


def wait_flushed(db: Sql, lsn: str, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while db.one(f"SELECT pg_current_wal_flush_lsn() >= '{lsn}'::pg_lsn") != "t":
        if time.monotonic() > deadline:
            raise BenchError(f"WAL not flushed up to {lsn}")
        time.sleep(0.05)


class SlotWatch:
    """Polls pg_replication_slots for one slot: active walsender pid (and its CPU) and
    whether confirmed_flush_lsn reached `end`."""

    def __init__(self, db: Sql, slot: str, end: str):
        self.db, self.slot, self.end = db, slot, end
        self.walsender_pid = None
        self.walsender_cpu0 = None
        self.walsender_cpu = None
        self.first_active = None  # time.monotonic() when a walsender first streamed from the slot

    def poll(self) -> bool:
        row = self.db.one(
            f"SELECT coalesce(active_pid, 0), coalesce(confirmed_flush_lsn >= '{self.end}'::pg_lsn, false) "
            f"FROM pg_replication_slots WHERE slot_name = '{self.slot}'")
        if not row:
            raise BenchError(f"slot {self.slot} disappeared")
        pid_s, done = row.split("|")
        pid = int(pid_s)
        if pid and self.first_active is None:
            self.first_active = time.monotonic()
        if pid and pid != self.walsender_pid:
            self.walsender_pid = pid
            self.walsender_cpu0 = proc_cpu_seconds(pid)
        if self.walsender_pid:
            c = proc_cpu_seconds(self.walsender_pid)
            if c is not None:
                self.walsender_cpu = c
        return done == "t"

    def walsender_cpu_seconds(self) -> float | None:
        # A walsender started before our first poll saw it: its startup CPU is negligible.
        if self.walsender_cpu is None or self.walsender_cpu0 is None:
            return None
        return self.walsender_cpu  # whole life of the walsender process


def create_slot(db: Sql, slot: str) -> str:
    """A pgoutput slot; returns its start LSN."""
    return db.one(f"SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'pgoutput')")


def drop_slot(db: Sql, slot: str) -> None:
    db.query(f"SELECT pg_drop_replication_slot('{slot}')")


def drop_outbox(db: Sql, table: str, publication: str) -> None:
    db.query(f"DROP PUBLICATION {publication}")
    db.query(f"DROP TABLE public.{table}")


def wal_end(db: Sql) -> str:
    """The current WAL insert position: the end of what was just written."""
    return db.one("SELECT pg_current_wal_insert_lsn()")
