//! Test harness: real servers started by the tests themselves, and helpers.
//! Each test uses its own table, slot, publication and topic names.
//!
//! Layout:
//! - `process`: free ports, the `postgres` user, watchdog-supervised processes
//! - `postgres`: the PostgreSQL launcher for any major version (binaries, initdb, settings, readiness)
//! - `servers`: the servers a test binary shares (one PostgreSQL per major, one tansu)
//! - `cluster`: `PgCluster`, a PostgreSQL of a test's own (restart, crash, promote)
//! - `standby`: physical standbys of a `PgCluster`, replay positions, multi-host URLs
//! - `tansu`: the broker, shared or of a test's own
//! - `rabbitmq`: RabbitMQ servers (shared or of a test's own) and reading messages back
//! - `case`: `TestCase`, one test's names and config on one server
//! - `relay`: the relay in process and as a binary
//! - `kafka`: reading records back
//! - `poll`: configs for the polling mode, `init` in process
//! - `scrape`: readings of a relay binary's `/metrics` over time (what a kill re-sends)
//! - `redis`: the Redis server (shared, or of a test's own) and reading streams back
//! - `nats`: nats-server with JetStream (shared, or of a test's own), streams read back
//! - here: polling, writing rows, HTTP and Prometheus text

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use outbox_relay::lsn::Lsn;

mod case;
mod cluster;
mod kafka;
pub mod nats;
mod poll;
mod postgres;
mod process;
pub mod rabbitmq;
pub mod redis;
mod relay;
mod scrape;
mod servers;
mod standby;
mod tansu;

// The harness's API: not every item is used by the tests of every build.
#[allow(unused_imports)]
pub use case::{create_outbox_table, TestCase};
#[allow(unused_imports)]
pub use cluster::{ClusterOptions, PgCluster};
#[allow(unused_imports)]
pub use kafka::{consume_all, consume_distinct, consume_raw_values, consume_until, seqs, Consumed};
#[allow(unused_imports)]
pub use poll::{init_poll, parse_config};
#[allow(unused_imports)]
pub use postgres::{connect, npm_versions, PgInstall, PASSWORD};
#[allow(unused_imports)]
pub use process::free_addr;
#[allow(unused_imports)]
pub use relay::{
    config_file, relay_cli, spawn_relay, spawn_relay_binary, start_relay, terminate, KillOnDrop,
    Output, RunningRelay,
};
#[allow(unused_imports)]
pub use scrape::{check_resends, read_metrics, Kill, KillLoop, Reading, ACKED_WINDOW};
#[allow(unused_imports)]
pub use servers::{create_role, servers, servers_on, Servers};
#[allow(unused_imports)]
pub use standby::{multi_host_url, StandbyOptions};
#[allow(unused_imports)]
pub use tansu::{shared_brokers, tansu_bin, Tansu};

/// Polls `f` until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split(' ').nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Value of one sample in Prometheus text format: `name{labels}` as rendered,
/// without the labels every series of the process carries (`sink`, `shard`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (without_const_labels(name) == series).then(|| value.trim().parse().unwrap())
    })
}

fn without_const_labels(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_string();
    };
    let kept: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty() && !l.starts_with("sink=\"") && !l.starts_with("shard=\""))
        .collect();
    if kept.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", kept.join(","))
    }
}

/// A writer task committing rows `0..total` of aggregate type `evt` into
/// `table` on `s`, `per_tx` rows per transaction, pausing `pause` after each.
pub fn paced_writer(
    s: &'static Servers,
    table: &str,
    total: i64,
    per_tx: i64,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let table = table.to_string();
    tokio::spawn(async move {
        let db = s.sql().await;
        for i in (0..total).step_by(per_tx as usize) {
            insert_rows(&db, &table, "evt", i, per_tx).await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// Inserts `n` rows with seq `from..from+n` in one transaction; returns the WAL insert position after it.
pub async fn insert_rows(
    db: &tokio_postgres::Client,
    table: &str,
    aggregate_type: &str,
    from: i64,
    n: i64,
) -> Lsn {
    db.batch_execute(&format!(
        "INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)
         SELECT '{aggregate_type}', 'k' || (i % 10), 'E', jsonb_build_object('seq', i) FROM generate_series({from}, {to}) i",
        to = from + n - 1
    ))
    .await
    .unwrap();
    wal_insert_lsn(db).await
}

/// The server's WAL insert position: at or after the end of every commit so far.
pub async fn wal_insert_lsn(db: &tokio_postgres::Client) -> Lsn {
    db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get::<_, String>(0)
        .parse()
        .unwrap()
}
