//! The relay under test: in this process (`spawn_relay`, `start_relay`) or as
//! the binary (`spawn_relay_binary`, `relay_cli`), and what a run printed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::metrics::Metrics;
use outbox_relay::relay::{self, RelayError};
use tokio::sync::watch;

use super::postgres::PASSWORD;

/// A relay running in this process.
pub struct RunningRelay {
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<(), RelayError>>,
}

pub fn spawn_relay(cfg: Config) -> RunningRelay {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let metrics = Arc::new(Metrics::new());
    let (stop, rx) = watch::channel(false);
    let handle = tokio::spawn(relay::run(cfg, metrics.clone(), rx));
    RunningRelay {
        metrics,
        stop,
        handle,
    }
}

/// Spawns a relay and waits until it streams from its slot (so later inserts are captured).
pub async fn start_relay(cfg: Config) -> RunningRelay {
    let relay = spawn_relay(cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.metrics.is_active() {
        assert!(
            !relay.is_finished(),
            "relay stopped before streaming: {:?}",
            relay.join().await
        );
        assert!(
            Instant::now() < deadline,
            "relay did not start streaming within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay
}

impl RunningRelay {
    pub async fn stop(self) -> Result<(), RelayError> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("relay did not stop in 30 s")
            .unwrap()
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub async fn join(self) -> Result<(), RelayError> {
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("relay did not stop")
            .unwrap()
    }
}

/// Starts the `outbox-relay` binary (`run --config`), its stderr appended to `log`.
pub fn spawn_relay_binary(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

/// A relay binary killed when the test ends, also when it fails half-way.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops a relay binary with SIGTERM and asserts it exits 0.
pub fn terminate(child: &mut Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

/// Output of one run of the binary.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Output {
    /// The status text of the line labelled `label` (`label  text`).
    pub fn item(&self, label: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| {
                l.strip_prefix(label)
                    .filter(|rest| rest.starts_with("  "))
                    .map(str::trim)
            })
            .unwrap_or_else(|| panic!("no line {label:?} in\n{self}"))
    }

    pub fn assert_no_secret(&self, secrets: &[&str]) {
        for s in secrets.iter().chain([&PASSWORD, &"postgresql://"]) {
            assert!(
                !self.stdout.contains(s) && !self.stderr.contains(s),
                "output leaks {s:?}:\n{self}"
            );
        }
    }
}

pub async fn relay_cli(args: &[&str], config: &Path) -> Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("OUTBOX_RELAY_POSTGRES_URL")
        .env_remove("RUST_LOG")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("outbox-relay did not finish within 60 s")
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}
