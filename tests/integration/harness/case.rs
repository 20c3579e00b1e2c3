//! One test's names and configuration: its own table, slot, publication and
//! topics (slots are cluster-wide, topics broker-wide) on one of the shared
//! servers, and what the test asks about its slot.

use std::path::{Path, PathBuf};
use std::process::Child;

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;

use super::eventually;
use super::relay::spawn_relay_binary;
use super::servers::{servers, Servers};

/// Names and config for one test: its own table, slot, publication and topics.
pub struct TestCase {
    pub name: String,
    pub table: String,
    /// The server the test runs on (and the broker).
    pub s: &'static Servers,
}

impl TestCase {
    /// On the default server.
    pub async fn new(name: &str) -> TestCase {
        TestCase::on(servers(), name).await
    }

    /// On `s`; on a server of the version matrix the names end in `_pg<major>`
    /// (the broker is shared across versions).
    pub async fn on(s: &'static Servers, name: &str) -> TestCase {
        let name = format!("{name}{}", s.name_suffix);
        let table = format!("outbox_{name}");
        create_outbox_table(&s.sql().await, &table).await;
        TestCase { name, table, s }
    }

    /// Config text for this test; `extra_kafka` goes into `[kafka]`. No metrics
    /// listener: binaries of concurrent tests would fight over the default port
    /// (replace `listen = ""` to get one).
    pub fn config_text(&self, brokers: &str, extra_kafka: &str) -> String {
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{n}\"\npublication = \"{n}\"\nstatus_interval_ms = 200\n\n\
             [outbox]\ntable = \"public.{t}\"\ntopic = \"{n}.{{aggregate_type}}\"\n\n\
             [kafka]\nbrokers = \"{brokers}\"\ncreate_topics = true\ntopic_partitions = 3\n{extra_kafka}\n\
             [relay]\nreconnect_backoff_min_ms = 100\nreconnect_backoff_max_ms = 1000\nshutdown_timeout_ms = 5000\n\n\
             [metrics]\nlisten = \"\"\n",
            url = self.s.url(),
            n = self.name,
            t = self.table,
        )
    }

    /// Config with the `[outbox]` section's keys replaced by `outbox`.
    pub fn config_with_outbox(&self, outbox: &str) -> Config {
        let text = self.config_text(&self.s.brokers, "");
        let start = text.find("[outbox]\n").expect("an [outbox] section");
        let end = start + text[start..].find("\n\n").expect("a blank line after it");
        let text = format!("{}[outbox]\n{outbox}{}", &text[..start], &text[end..]);
        Config::from_toml(&text, Path::new("test.toml"), |_| None).unwrap()
    }

    pub fn config(&self) -> Config {
        self.config_with(&self.s.brokers, "")
    }

    pub fn config_with(&self, brokers: &str, extra_kafka: &str) -> Config {
        Config::from_toml(
            &self.config_text(brokers, extra_kafka),
            Path::new("test.toml"),
            |_| None,
        )
        .unwrap()
    }

    /// Config for a broker whose topics the test creates itself (MockCluster).
    pub fn config_precreated_topics(&self, brokers: &str, extra_kafka: &str) -> Config {
        let text = self
            .config_text(brokers, extra_kafka)
            .replace("create_topics = true", "create_topics = false");
        Config::from_toml(&text, Path::new("test.toml"), |_| None).unwrap()
    }

    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.name)
    }

    /// Whether this test's slot exists (and, with `active`, is streaming to someone).
    pub async fn slot_exists(&self, active: bool) -> bool {
        let sql = if active {
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active"
        } else {
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1"
        };
        self.s
            .sql()
            .await
            .query_opt(sql, &[&self.name])
            .await
            .unwrap()
            .is_some()
    }

    /// Writes this test's config into `dir`, starts the relay binary on it and
    /// waits until it streams from its slot (rows committed before the slot
    /// exists are not part of its stream). Returns (config, log, child).
    pub async fn start_binary(&self, dir: &Path) -> (PathBuf, PathBuf, Child) {
        let config = dir.join("relay.toml");
        std::fs::write(&config, self.config_text(&self.s.brokers, "")).unwrap();
        let log = dir.join("relay.log");
        let child = spawn_relay_binary(&config, &log);
        eventually(60, "relay streaming from its slot", || {
            self.slot_exists(true)
        })
        .await;
        (config, log, child)
    }

    /// The slot's confirmed_flush_lsn.
    pub async fn confirmed(&self) -> Lsn {
        let c = self.s.sql().await;
        let row = c
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.name],
            )
            .await
            .unwrap();
        row.and_then(|r| r.get::<_, Option<String>>(0))
            .map(|s| s.parse().unwrap())
            .unwrap_or(Lsn::ZERO)
    }
}

/// Creates `public.<table>` as `sql/001_outbox.sql` does.
pub async fn create_outbox_table(db: &tokio_postgres::Client, table: &str) {
    let ddl = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/001_outbox.sql"))
        .unwrap()
        .replace("public.outbox", &format!("public.{table}"));
    db.batch_execute(&ddl).await.unwrap();
}
