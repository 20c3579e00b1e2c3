//! Integration tests against a real PostgreSQL and a real tansu broker (started
//! by `harness`), plus librdkafka's MockCluster for broker fault injection.
//! One test binary so that all tests share one PostgreSQL and one broker.

#![allow(dead_code)]

mod harness;

mod admin;
mod auth;
mod bad_input;
mod checkpoint;
mod crash_resend;
mod dead_letter;
mod delivery;
mod faults;
mod ha;
mod metrics;
mod mock_broker;
mod replay;
mod shutdown;
mod tls;
