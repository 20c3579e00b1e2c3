//! outbox-relay: streams transactional outbox rows from PostgreSQL logical
//! replication (pgoutput), or by polling the table, to Kafka, Redis, NATS
//! JetStream or RabbitMQ, and confirms the replication slot (or deletes the
//! rows) only after the sink has acknowledged every record up to that position.
//!
//! Layout:
//! - [`lsn`]: the `Lsn` type.
//! - [`pgoutput`]: pure decoder of pgoutput messages and the relation cache.
//! - [`transport`]: the stream to PostgreSQL for both connections: socket, `sslmode`, TLS.
//! - [`replication`]: the replication connection (startup, auth, CopyBoth, status updates).
//! - [`outbox`]: a decoded outbox row to a record (topic, key, value, headers).
//! - [`sink`]: where records go and how their acknowledgements come back: `sink::kafka` (the producer and its delivery reports), `sink::redis` (Redis Streams or pub/sub), `sink::nats` (NATS JetStream), `sink::rabbitmq` (RabbitMQ with publisher confirms), stdout for `tail` and debugging.
//! - [`ack`]: which LSN may be confirmed.
//! - [`setup`]: preflight checks, publication and slot management over plain SQL; `setup::server`: the server's version, primary or standby, and the settings failover depends on.
//! - [`shard`]: which rows belong to a shard (row filter), shard slot and publication names.
//! - [`state`]: the relay's own tables: the checkpoint and replay requests.
//! - [`admin`]: the `init`, `status` and `replay` commands: checks, what they create, print and exit with.
//! - [`metrics`]: Prometheus metrics and the health state.
//! - [`http`]: the `/metrics`, `/healthz` and `/readyz` listener.
//! - [`relay`]: the run loop and the source seam, reconnects, standby and shutdown; the WAL session, and `relay::poll`, the polling source (unsent rows read over SQL, deleted or marked once acknowledged; its table checks are `setup::poll`, its `init`/`status` output `admin::poll`).
//! - [`config`]: the TOML configuration, one file per section, resolved once.
//! - [`cli`]: command-line parsing and exit codes.

pub mod ack;
pub mod admin;
pub mod cli;
pub mod config;
pub mod http;
pub mod lsn;
pub mod metrics;
pub mod outbox;
pub mod pgoutput;
pub mod relay;
pub mod replication;
pub mod setup;
pub mod shard;
pub mod sink;
pub mod state;
pub mod transport;
