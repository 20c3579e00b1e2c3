//! Integration tests against a real PostgreSQL and a real tansu broker (started
//! by `harness`), plus librdkafka's MockCluster for broker fault injection.
//! One test binary so that all tests share one PostgreSQL and one broker.

#![allow(dead_code)]

mod harness;

mod admin;
mod auth;
mod bad_input;
mod dead_letter;
mod debezium;
mod delivery;
mod failover;
mod faults;
mod ha;
mod logical_messages;
mod metrics;
mod mock_broker;
mod partitioned;
mod replay;
mod shutdown;
mod standby;
mod standby_decoding;
mod tls;
