-- Runs once when the compose PostgreSQL initialises its data directory, after
-- ../../sql/001_outbox.sql. A least-privilege role for the relay (see
-- deploy/README.md, "A least-privilege role"): it may log in, use replication and
-- read the outbox table. The publication is created here by the table owner, so
-- the relay never needs ownership; the relay creates the slot itself (any
-- REPLICATION role may). The password is for this local stack only.
CREATE ROLE relay LOGIN REPLICATION PASSWORD 'relay';
GRANT SELECT ON public.outbox TO relay;
CREATE PUBLICATION outbox_relay FOR TABLE public.outbox WITH (publish = 'insert');
