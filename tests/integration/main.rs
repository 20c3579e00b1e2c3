//! Integration tests against a real PostgreSQL and a real tansu broker (started
//! by `harness`), plus librdkafka's MockCluster for broker fault injection, and
//! the other sinks against real servers the harness starts too (Redis, NATS
//! with JetStream, RabbitMQ).
//! One test binary so that all tests share one PostgreSQL per major version
//! (the default one for the full suite, 14/16/17/18 for `matrix`) and one broker.

#![allow(dead_code)]

mod harness;

mod admin;
mod auth;
mod bad_input;
mod checkpoint;
mod crash_resend;
mod dead_letter;
mod debezium;
mod delivery;
mod failover;
mod faults;
mod ha;
mod logical_messages;
mod matrix;
mod metrics;
mod mock_broker;
mod nats;
mod partitioned;
mod poll;
mod rabbitmq;
mod redis;
mod replay;
mod sharding;
mod shutdown;
mod standby;
mod standby_decoding;
mod tls;
