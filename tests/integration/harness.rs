//! Test harness: a throwaway PostgreSQL 15 cluster and a tansu Kafka-protocol
//! broker on free ports, started once per test binary and shared by its tests.
//! Each test uses its own table, slot, publication and topic names.
//!
//! Both servers run under a small shell watchdog that stops them (and removes
//! the data directory) when the test process exits, however it exits: the
//! watchdog reads its stdin, a pipe whose write end only the test process holds.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::Metrics;
use outbox_relay::relay::{self, RelayError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, TopicPartitionList};
use tokio::sync::watch;

pub const PASSWORD: &str = "s3cret-pw";

pub struct Servers {
    pub pg_port: u16,
    pub pg_socket_dir: PathBuf,
    pub brokers: String,
    watchdogs: Mutex<Vec<(Child, ChildStdin)>>,
}

static SERVERS: OnceLock<Servers> = OnceLock::new();

pub fn servers() -> &'static Servers {
    SERVERS.get_or_init(start_servers)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("postgres").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: run deploy/dev/install-deps.sh")
}

pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("OUTBOX_RELAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
                .join("outbox-relay")
        });
    let p = cache.join("tansu-0.6.0/bin/tansu");
    assert!(
        p.exists(),
        "tansu not found at {}: run deploy/dev/install-deps.sh (or set TANSU_BIN)",
        p.display()
    );
    p
}

/// uid/gid of the `postgres` user when running as root (PostgreSQL refuses root).
fn postgres_ids() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("running as root needs a 'postgres' user")
    };
    Some((id("-u"), id("-g")))
}

fn as_postgres(cmd: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd
}

/// Starts `program args..` under a watchdog shell that stops it with `signal`
/// and runs `cleanup` once our stdin closes.
fn supervise(
    program: &Path,
    args: &[String],
    signal: &str,
    cleanup: &str,
    ids: Option<(u32, u32)>,
    log: &Path,
) -> (Child, ChildStdin) {
    let script = format!(
        r#""$@" & pid=$!; read -r _; kill -{signal} $pid 2>/dev/null; wait $pid; {cleanup}"#
    );
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(program)
        .args(args);
    let log = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    as_postgres(&mut cmd, ids);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            panic!(
                "{what} did not start listening on {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts tansu (in-memory storage) on `port` under a watchdog.
fn start_tansu(port: u16) -> (Child, ChildStdin) {
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

/// A tansu broker of its own, for tests that stop and restart the broker.
/// Its storage is in memory: a restart loses every topic and record.
pub struct Tansu {
    pub port: u16,
    watchdog: Option<(Child, ChildStdin)>,
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

/// A fresh cluster directory: (dir, data dir, server binaries, postgres uid/gid when root).
fn init_cluster() -> (PathBuf, PathBuf, PathBuf, Option<(u32, u32)>) {
    let ids = postgres_ids();
    let dir = tempfile::Builder::new()
        .prefix("outbox-relay-test-")
        .tempdir()
        .unwrap()
        .keep();
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    }
    let bin = pg_bin();
    let data = dir.join("data");
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, PASSWORD).unwrap();
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
    }
    let out = as_postgres(&mut Command::new(bin.join("initdb")), ids)
        .args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // First match wins: per-user methods for the authentication tests, SCRAM for the rest.
    let hba = "local all all trust\n\
               host all trust_user 127.0.0.1/32 trust\n\
               host all md5_user 127.0.0.1/32 md5\n\
               host all plain_user 127.0.0.1/32 password\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
    (dir, data, bin, ids)
}

/// Server options (after `-D data`): logical decoding, short wal_sender_timeout,
/// a small logical_decoding_work_mem so large transactions spill, no fsync.
/// `durable` keeps synchronous commits (a crash then loses no committed row).
fn postgres_options(port: u16, socket_dir: &Path, durable: bool) -> Vec<String> {
    let mut args = vec![
        "-p".to_string(),
        port.to_string(),
        "-k".into(),
        socket_dir.display().to_string(),
    ];
    for setting in [
        "listen_addresses=127.0.0.1",
        "wal_level=logical",
        "max_wal_senders=64",
        "max_replication_slots=64",
        "wal_sender_timeout=10s",
        "fsync=off",
        if durable {
            "synchronous_commit=on"
        } else {
            "synchronous_commit=off"
        },
        "full_page_writes=off",
        "max_connections=200",
        "logical_decoding_work_mem=64kB",
    ] {
        args.push("-c".into());
        args.push(setting.into());
    }
    args
}

fn start_servers() -> Servers {
    let (dir, data, bin, ids) = init_cluster();
    let pg_port = free_port();
    let pg_log = dir.join("postgres.log");
    let mut args = vec!["-D".to_string(), data.display().to_string()];
    args.extend(postgres_options(pg_port, &dir, false));
    let pg = supervise(
        &bin.join("postgres"),
        &args,
        "INT",
        &format!("rm -rf '{}'", dir.display()),
        ids,
        &pg_log,
    );
    wait_port(pg_port, "PostgreSQL", &pg_log);

    let kafka_port = free_port();
    let tansu = start_tansu(kafka_port);
    let s = Servers {
        pg_port,
        pg_socket_dir: dir,
        brokers: format!("127.0.0.1:{kafka_port}"),
        watchdogs: Mutex::new(vec![pg, tansu]),
    };
    // Wait until PostgreSQL accepts queries, not just connections.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = Command::new(bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &pg_port.to_string()])
            .output()
            .map(|o| o.status.success());
        if matches!(ok, Ok(true)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PostgreSQL not ready: {}",
            std::fs::read_to_string(&pg_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

impl Servers {
    /// Superuser connection string (SCRAM over TCP).
    pub fn url(&self) -> String {
        self.url_for("postgres", PASSWORD)
    }

    pub fn url_for(&self, user: &str, password: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/postgres",
            self.pg_port
        )
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to test PostgreSQL");
        tokio::spawn(conn);
        client
    }

    /// Stops the broker (for outage tests that restart it themselves is not supported).
    pub fn kill_all(&self) {
        for (_, stdin) in self.watchdogs.lock().unwrap().iter_mut() {
            let _ = stdin.write_all(b"\n");
        }
    }
}

/// Creates a login role on the shared server unless it exists (`md5` or SCRAM password).
pub async fn create_role(name: &str, password: &str, md5: bool, replication: bool) {
    let db = servers().sql().await;
    let enc = if md5 { "md5" } else { "scram-sha-256" };
    let repl = if replication {
        "REPLICATION"
    } else {
        "NOREPLICATION"
    };
    db.batch_execute(&format!(
        "SET password_encryption = '{enc}';
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
             CREATE ROLE {name} LOGIN {repl} PASSWORD '{password}';
           END IF;
         END $$;"
    ))
    .await
    .unwrap();
}

/// Names and config for one test: its own table, slot, publication and topics.
pub struct TestCase {
    pub name: String,
    pub table: String,
}

impl TestCase {
    pub async fn new(name: &str) -> TestCase {
        let s = servers();
        let c = s.sql().await;
        let table = format!("outbox_{name}");
        let ddl =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/001_outbox.sql"))
                .unwrap()
                .replace("public.outbox", &format!("public.{table}"));
        c.batch_execute(&ddl).await.unwrap();
        TestCase {
            name: name.to_string(),
            table,
        }
    }

    /// Config text for this test; `extra_kafka` goes into `[kafka]`. No metrics
    /// listener: binaries of concurrent tests would fight over the default port
    /// (replace `listen = ""` to get one).
    pub fn config_text(&self, brokers: &str, extra_kafka: &str) -> String {
        let s = servers();
        format!(
            "[postgres]\nurl = \"{url}\"\nslot = \"{n}\"\npublication = \"{n}\"\nstatus_interval_ms = 200\n\n\
             [outbox]\ntable = \"public.{t}\"\ntopic = \"{n}.{{aggregate_type}}\"\n\n\
             [kafka]\nbrokers = \"{brokers}\"\ncreate_topics = true\ntopic_partitions = 3\n{extra_kafka}\n\
             [relay]\nreconnect_backoff_min_ms = 100\nreconnect_backoff_max_ms = 1000\nshutdown_timeout_ms = 5000\n\n\
             [metrics]\nlisten = \"\"\n",
            url = s.url(),
            n = self.name,
            t = self.table,
        )
    }

    pub fn config(&self) -> Config {
        self.config_with(&servers().brokers, "")
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
        servers()
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
        std::fs::write(&config, self.config_text(&servers().brokers, "")).unwrap();
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
        let c = servers().sql().await;
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

/// A record read back from the broker.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: String,
    pub headers: Vec<(String, String)>,
}

impl Consumed {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads `topics` (all partitions, from the beginning) until at least
/// `expected` records were read, then until nothing more arrives for a second.
pub fn consume_all(brokers: &str, topics: &[String], expected: usize) -> Vec<Consumed> {
    consume_until(brokers, topics, |got| got.len() >= expected)
}

/// Reads `topics` (all partitions, from the beginning) until `complete` holds
/// for what was read, then until nothing more arrives for a second; 150 s at most (tansu reads large batches slowly).
/// Offsets are not assumed dense (tansu's are not), so watermarks are not used.
pub fn consume_until(
    brokers: &str,
    topics: &[String],
    complete: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-tests")
        .set("enable.auto.commit", "false")
        // tansu answers a fetch with about one batch: ask again at once.
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        // Metadata of a just-created topic can briefly show no partitions.
        let parts = loop {
            let n = consumer
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .ok()
                .map(|md| md.topics()[0].partitions().len())
                .unwrap_or(0);
            if n > 0 {
                break n;
            }
            assert!(Instant::now() < deadline, "topic {t} has no partitions");
            std::thread::sleep(Duration::from_millis(200));
        };
        for p in 0..parts as i32 {
            tpl.add_partition_offset(t, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut completed = false;
    let mut last_record = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), text(h.value)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: text(m.key()),
                    value: text(m.payload()),
                    headers,
                });
                last_record = Instant::now();
                completed = completed || complete(&out);
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {
                if completed && last_record.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
        }
    }
    assert!(
        completed,
        "gave up after 150 s with {} records read from {topics:?}",
        out.len()
    );
    out.sort_by_key(|c| (c.topic.clone(), c.partition, c.offset));
    out
}

/// Raw values of a topic in partition/offset order.
pub fn consume_raw_values(brokers: &str, topic: &str, expected: usize) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-tests")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            out.push((
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out.sort();
    out.into_iter().map(|(_, _, v)| v).collect()
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

/// A free loopback address for a metrics listener.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Value of one sample in Prometheus text format (`name{labels}` exactly as rendered).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
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

/// Reads `topic` until `total` distinct seqs (`0..total`, duplicates allowed) arrived.
pub fn consume_distinct(brokers: &str, topic: &str, total: usize) -> Vec<Consumed> {
    consume_until(brokers, &[topic.to_string()], |got| {
        seqs(got)
            .into_iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= total
    })
}

/// Sequence numbers (`payload.seq`) of consumed records.
pub fn seqs(got: &[Consumed]) -> Vec<i64> {
    got.iter()
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.value).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

/// A PostgreSQL cluster of its own, for tests that stop or restart the server
/// or need other server settings. Stopped and removed on drop.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    ids: Option<(u32, u32)>,
    settings: Vec<String>,
}

/// How an own cluster differs from the default one.
#[derive(Default)]
pub struct ClusterOptions {
    /// Server settings (`name=value`) after the defaults, so they win (e.g. `wal_level=replica`).
    pub settings: Vec<String>,
    /// Files written into the data directory before the server starts (mode
    /// 0600, owned by the server's user): `pg_hba.conf`, TLS keys and certificates.
    pub files: Vec<(String, Vec<u8>)>,
}

impl PgCluster {
    pub fn start() -> PgCluster {
        PgCluster::start_with(ClusterOptions::default())
    }

    pub fn start_with(opts: ClusterOptions) -> PgCluster {
        let (dir, data, bin, ids) = init_cluster();
        for (name, content) in &opts.files {
            let path = data.join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if let Some((uid, gid)) = ids {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let c = PgCluster {
            port: free_port(),
            dir,
            data,
            bin,
            ids,
            settings: opts.settings,
        };
        c.start_again();
        c
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = as_postgres(&mut Command::new(self.bin.join("pg_ctl")), self.ids)
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_again(&self) {
        let mut opts = postgres_options(self.port, &self.dir, true);
        for setting in &self.settings {
            opts.push("-c".into());
            opts.push(setting.clone());
        }
        let opts = opts.join(" ");
        let log = self.dir.join("postgres.log");
        self.pg_ctl(&["-w", "-l", log.to_str().unwrap(), "-o", &opts, "start"]);
    }

    /// Stops the server: `mode` is `fast` or `immediate` (a crash).
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["-w", "-m", mode, "stop"]);
    }

    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// Superuser connection over the Unix socket (trusted, whatever pg_hba.conf says for TCP).
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        )
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.socket_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&mut Command::new(self.bin.join("pg_ctl")), self.ids)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
