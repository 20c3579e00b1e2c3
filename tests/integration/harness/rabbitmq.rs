//! RabbitMQ for the tests: the server the tests of this binary share and
//! servers of a test's own (stopped and started again with their data), each a
//! child process on free ports (below the ephemeral range) in a temporary
//! directory with its own epmd; and reading messages back with lapin.
//!
//! As root the server runs as the `rabbitmq` user (the Debian package's), which
//! owns the directory. Nothing touches the system's service, its epmd on 4369
//! or `/var/lib/rabbitmq`.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use super::process::{chown, supervise, wait_port, Ids, Watchdog};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const EPMD: &str = "/usr/bin/epmd";

/// A free port below the kernel's ephemeral range (32768 and up), never
/// handed out twice in this process. RabbitMQ binds its AMQP port only after
/// booting (seconds later): a port from the ephemeral range could meanwhile be
/// taken by any outgoing connection of the other tests.
pub fn free_low_port() -> u16 {
    static GIVEN: OnceLock<std::sync::Mutex<HashSet<u16>>> = OnceLock::new();
    let mut given = GIVEN.get_or_init(Default::default).lock().unwrap();
    let mut x = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

/// uid/gid of the `rabbitmq` user when running as root, `None` otherwise.
fn rabbitmq_ids() -> Ids {
    let me = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "rabbitmq"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("running as root needs the 'rabbitmq' user of the rabbitmq-server package")
    };
    Some((id("-u"), id("-g")))
}

/// A RabbitMQ server: its AMQP port and directory.
pub struct RabbitMq {
    pub port: u16,
    epmd_port: u16,
    dir: PathBuf,
    ids: Ids,
    epmd: Option<Watchdog>,
    server: Option<Watchdog>,
}

impl RabbitMq {
    /// A server of its own (for tests that stop and restart it).
    pub fn start() -> RabbitMq {
        RabbitMq::start_with("", &[])
    }

    /// A server of its own with `conf` as its `rabbitmq.conf` and `files`
    /// (name, content) beside it; `{dir}` in `conf` is their directory.
    pub fn start_with(conf: &str, files: &[(&str, &[u8])]) -> RabbitMq {
        assert!(
            Path::new(SERVER).exists(),
            "{SERVER} not found: run deploy/dev/install-deps.sh (Debian's rabbitmq-server)"
        );
        let port = free_low_port();
        let dir = std::env::temp_dir().join(format!("outbox-relay-rabbitmq-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["", "mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let ids = rabbitmq_ids();
        let mut owned = vec!["".to_string(), "mnesia".into(), "log".into(), "home".into()];
        owned.extend(["enabled_plugins".into(), "run.sh".into()]);
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
            owned.push(name.to_string());
        }
        // Without a file the server runs on its defaults (a missing base name is fine).
        let config_file = if conf.is_empty() {
            "rabbitmq"
        } else {
            let text = conf.replace("{dir}", &dir.display().to_string());
            std::fs::write(dir.join("rabbitmq.conf"), text).unwrap();
            owned.push("rabbitmq.conf".into());
            "rabbitmq.conf"
        };
        let epmd_port = free_low_port();
        let dist_port = free_low_port();
        // The environment rabbitmq-server reads; the watchdog runs this script.
        let script = format!(
            "#!/bin/sh\ncd '{d}'\n\
             export HOME='{d}/home' ERL_EPMD_PORT={epmd_port}\n\
             export RABBITMQ_NODENAME=rabbit-{port}@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1\n\
             export RABBITMQ_NODE_PORT={port} RABBITMQ_DIST_PORT={dist_port}\n\
             export RABBITMQ_MNESIA_BASE='{d}/mnesia' RABBITMQ_LOG_BASE='{d}/log' RABBITMQ_LOGS=-\n\
             export RABBITMQ_FEATURE_FLAGS_FILE='{d}/feature_flags' RABBITMQ_PID_FILE='{d}/pid'\n\
             export RABBITMQ_ENABLED_PLUGINS_FILE='{d}/enabled_plugins' RABBITMQ_CONF_ENV_FILE='{d}/env.conf'\n\
             export RABBITMQ_CONFIG_FILE='{d}/{config_file}' RABBITMQ_ADVANCED_CONFIG_FILE='{d}/advanced.config'\n\
             exec {SERVER}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("run.sh"), script).unwrap();
        std::fs::set_permissions(
            dir.join("run.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        for sub in &owned {
            chown(&dir.join(sub), ids);
        }
        // epmd of its own on a free port, in the foreground; it outlives
        // restarts of the server and removes the directory at the end.
        let epmd = supervise(
            Path::new(EPMD),
            &["-port".into(), epmd_port.to_string()],
            "TERM",
            &format!("rm -rf '{}'", dir.display()),
            ids,
            &dir.join("epmd.log"),
        );
        wait_port(epmd_port, "epmd", &dir.join("epmd.log"));
        let mut server = RabbitMq {
            port,
            epmd_port,
            dir,
            ids,
            epmd: Some(epmd),
            server: None,
        };
        server.start_again();
        server
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in over loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl <args>` against this server (as its user); panics
    /// with the output unless it succeeds.
    pub fn ctl(&self, args: &[&str]) -> String {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        cmd.arg("-n")
            .arg(format!("rabbit-{}@localhost", self.port))
            .args(args)
            .current_dir(&self.dir)
            .env("HOME", self.dir.join("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string());
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "rabbitmqctl {args:?}: {text}");
        text
    }

    /// Stops the server gracefully (SIGTERM) and waits until it is gone; its
    /// data (durable exchanges, queues, persistent messages) stays.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.server.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port with the same data; returns once it
    /// takes connections.
    pub fn start_again(&mut self) {
        self.stop();
        let log = self.dir.join("server.log");
        let started = Instant::now();
        self.server = Some(supervise(
            &self.dir.join("run.sh"),
            &[],
            "TERM",
            "",
            self.ids,
            &log,
        ));
        wait_port(self.port, "RabbitMQ", &log);
        eprintln!(
            "RabbitMQ on 127.0.0.1:{} took {} ms to start",
            self.port,
            started.elapsed().as_millis()
        );
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
        if let Some((mut child, stdin)) = self.epmd.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// The server every test of this binary shares: started on first use,
/// stopped (and its directory removed) when the process exits.
pub fn shared_rabbitmq() -> &'static RabbitMq {
    static SHARED: OnceLock<RabbitMq> = OnceLock::new();
    SHARED.get_or_init(RabbitMq::start)
}

/// A message read back.
#[derive(Debug, Clone)]
pub struct Got {
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub delivery_mode: Option<u8>,
    /// Header name and value bytes (long strings and byte arrays), sorted by name.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    pub fn key(&self) -> &str {
        self.header("key").expect("a key header")
    }

    /// `payload.seq` of the JSON body.
    pub fn seq(&self) -> i64 {
        serde_json::from_slice::<serde_json::Value>(&self.body).unwrap()["seq"]
            .as_i64()
            .unwrap()
    }
}

pub async fn rabbit_channel(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ: {e}"));
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Declares `exchange` as the relay does with `declare = true` (durable topic)
/// and a durable queue `queue` bound to it with `binding`.
pub async fn bind_queue(url: &str, exchange: &str, queue: &str, binding: &str) {
    bind_queue_with(url, exchange, queue, binding, FieldTable::default()).await
}

/// [`bind_queue`] with queue arguments (`x-max-length`, `x-overflow`, ...).
pub async fn bind_queue_with(
    url: &str,
    exchange: &str,
    queue: &str,
    binding: &str,
    arguments: FieldTable,
) {
    let (conn, ch) = rabbit_channel(url).await;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        arguments,
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        binding.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}

/// Reads `queue` (acknowledging what it reads) until `complete` holds, then
/// until nothing more arrives for a second; 120 s at most.
pub async fn consume_queue(url: &str, queue: &str, complete: impl Fn(&[Got]) -> bool) -> Vec<Got> {
    let (conn, ch) = rabbit_channel(url).await;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "outbox-relay-tests".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    let mut completed = complete(&out);
    loop {
        let wait = if completed {
            Duration::from_secs(1)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let mut headers: Vec<(String, Vec<u8>)> = d
                    .properties
                    .headers()
                    .as_ref()
                    .map(|t| {
                        t.inner()
                            .iter()
                            .map(|(k, v)| {
                                let bytes = match v {
                                    AMQPValue::LongString(s) => s.as_bytes().to_vec(),
                                    AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
                                    other => panic!("header {k} is {other:?}"),
                                };
                                (k.to_string(), bytes)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                headers.sort();
                out.push(Got {
                    routing_key: d.routing_key.to_string(),
                    body: d.data,
                    message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
                    delivery_mode: *d.properties.delivery_mode(),
                    headers,
                });
                completed = completed || complete(&out);
            }
            Ok(Some(Err(e))) => panic!("consuming {queue}: {e}"),
            Ok(None) => panic!("the consumer of {queue} was cancelled"),
            Err(_) if completed => break,
            Err(_) => panic!(
                "gave up after 120 s with {} messages read from {queue}",
                out.len()
            ),
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    out
}

/// Reads `queue` until `n` messages arrived (and a second passed without more).
pub async fn consume_n(url: &str, queue: &str, n: usize) -> Vec<Got> {
    consume_queue(url, queue, |got| got.len() >= n).await
}
