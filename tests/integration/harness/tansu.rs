//! The tansu Kafka-protocol broker: the one the tests share, and brokers of a
//! test's own that it stops and starts again.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::process::{cache_dir, free_port, supervise, wait_port, Watchdog};

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let p = cache_dir().join("tansu-0.6.0/bin/tansu");
    assert!(
        p.exists(),
        "tansu not found at {}: run deploy/dev/install-deps.sh (or set TANSU_BIN)",
        p.display()
    );
    p
}

/// Starts tansu (in-memory storage) on `port` under a watchdog.
fn start_tansu(port: u16) -> Watchdog {
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("outbox-relay-tansu-{port}.log"));
    let tansu = supervise(
        &tansu_bin(),
        &[
            "broker".into(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            url,
            "--storage-engine".into(),
            "memory://tansu/".into(),
        ],
        "TERM",
        &format!("rm -f '{}'", log.display()),
        None,
        &log,
    );
    wait_port(port, "tansu", &log);
    tansu
}

/// The broker every test of this binary shares (all PostgreSQL versions):
/// bootstrap servers. Started on first use, stopped when the process exits.
pub fn shared_brokers() -> &'static str {
    static SHARED: OnceLock<(String, Mutex<Watchdog>)> = OnceLock::new();
    &SHARED
        .get_or_init(|| {
            let port = free_port();
            (format!("127.0.0.1:{port}"), Mutex::new(start_tansu(port)))
        })
        .0
}

/// A tansu broker of its own, for tests that stop and restart the broker.
/// Its storage is in memory: a restart loses every topic and record.
pub struct Tansu {
    pub port: u16,
    watchdog: Option<Watchdog>,
}

impl Tansu {
    pub fn start() -> Tansu {
        let port = free_port();
        Tansu {
            port,
            watchdog: Some(start_tansu(port)),
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn start_again(&mut self) {
        self.stop();
        self.watchdog = Some(start_tansu(self.port));
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}
