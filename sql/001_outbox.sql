-- The outbox table outbox-relay reads by default. Apply once per database:
--   psql "$DATABASE_URL" -f sql/001_outbox.sql
-- Applications insert one row per event in the same transaction as their
-- business change; the relay publishes it to Kafka from the WAL. Rows are never
-- read back by the relay, so they may be deleted at any time after commit
-- (for example by a periodic `DELETE FROM outbox WHERE created_at < now() - interval '1 day'`).
CREATE TABLE IF NOT EXISTS public.outbox (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);
