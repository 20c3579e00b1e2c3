-- outbox-relay's own state: the acknowledged position per slot and replay
-- requests. `outbox-relay init` creates these (under [checkpoint] schema); to do
-- it by hand, as a role with CREATE on the database:
--   psql "$DATABASE_URL" -f sql/002_relay_state.sql
-- and grant the relay's role USAGE on the schema and SELECT, INSERT, UPDATE on
-- both tables (plus USAGE on the id sequence). None of these tables may be in
-- the relay's publication.
CREATE SCHEMA IF NOT EXISTS outbox_relay;

-- One row per slot, written every [checkpoint] interval_ms and on shutdown.
-- acked_lsn never moves backwards and is never ahead of what Kafka acknowledged;
-- window_start_lsn is the slot position the relay keeps for [replay] window, and
-- window_samples ([[unix ms, "X/X"], ...]) the acknowledged positions over time
-- that the window moves along, so that it keeps moving across restarts.
CREATE TABLE IF NOT EXISTS outbox_relay.checkpoint (
    slot_name        text        PRIMARY KEY,
    acked_lsn        pg_lsn      NOT NULL,
    acked_at         timestamptz NOT NULL,
    window_start_lsn pg_lsn,
    window_start_at  timestamptz,
    window_samples   jsonb,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Written by `outbox-relay replay`, executed by the instance holding the slot.
CREATE TABLE IF NOT EXISTS outbox_relay.replay_request (
    id           bigserial   PRIMARY KEY,
    slot_name    text        NOT NULL,
    from_lsn     pg_lsn      NOT NULL,
    to_lsn       pg_lsn      NOT NULL,
    only_topic   text,
    topic_suffix text,
    state        text        NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'running', 'done', 'failed', 'cancelled')),
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    attempts     int         NOT NULL DEFAULT 0,
    transactions bigint,
    events       bigint,
    error        text
);
