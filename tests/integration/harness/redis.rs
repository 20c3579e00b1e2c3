//! The Redis server for the Redis sink's tests: the one the tests share, and
//! servers of a test's own that it kills and starts again (or uses as a
//! replica). Each runs `redis-server` (Debian's package, installed by
//! install-deps.sh) on a free port with its data in a temporary directory,
//! with the append-only file fsynced on every write, as docs/sinks/redis.md
//! asks of production. Also reads streams back.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::process::{free_port, supervise, wait_port, Watchdog};

fn redis_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("REDIS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join("redis-server");
        if p.exists() {
            return p;
        }
    }
    panic!("redis-server not found in /usr/bin or /usr/local/bin: run deploy/dev/install-deps.sh (or set REDIS_SERVER_BIN)");
}

/// Starts `redis-server` on `port` with its data in `dir`, under a watchdog
/// that stops it with `signal` and then runs `cleanup`.
fn start_redis(port: u16, dir: &Path, signal: &str, cleanup: &str, extra: &[&str]) -> Watchdog {
    let log = dir.join("redis.log");
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        dir.to_str().unwrap(),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
        "--logfile",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let w = supervise(&redis_server_bin(), &args, signal, cleanup, None, &log);
    wait_port(port, "redis-server", &log);
    w
}

/// The server every Redis test of this binary shares: its URL. Started on
/// first use, stopped (and its directory removed) when the process exits.
pub fn shared_redis() -> &'static str {
    static SHARED: OnceLock<(String, Mutex<Watchdog>)> = OnceLock::new();
    &SHARED
        .get_or_init(|| {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("outbox-relay-redis-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let w = start_redis(
                port,
                &dir,
                "TERM",
                &format!("rm -rf '{}'", dir.display()),
                &[],
            );
            (format!("redis://127.0.0.1:{port}"), Mutex::new(w))
        })
        .0
}

/// A server of a test's own: killed with SIGKILL and started again on the
/// same port and data (what the append-only file kept survives).
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    watchdog: Option<Watchdog>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// With extra `redis-server` arguments (e.g. `--replicaof 127.0.0.1 <port>`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        RedisServer::start_on(free_port(), extra)
    }

    /// Speaking TLS only (`rediss://`), with the PEM certificate and key
    /// given; clients are not asked for a certificate.
    pub fn start_tls(cert: &Path, key: &Path) -> RedisServer {
        let port = free_port();
        let extra = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        RedisServer::start_on(port, extra)
    }

    fn start_on(port: u16, extra: Vec<String>) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RedisServer {
            port,
            dir,
            extra,
            watchdog: None,
        };
        s.start_again();
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no shutdown, only what was fsynced stays).
    pub fn kill(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and data directory.
    pub fn start_again(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.watchdog = Some(start_redis(
            self.port,
            self.dir.path(),
            "KILL",
            "true",
            &extra,
        ));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A connection for the test's own commands.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// One stream entry: its id and its fields in order.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl Entry {
    /// The last field named `name`.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The last field named `name`, as text.
    pub fn text(&self, name: &str) -> Option<String> {
        self.field(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The `seq` of the payload the tests write (`{"seq": n, ...}`).
    pub fn seq(&self) -> i64 {
        let v: serde_json::Value =
            serde_json::from_slice(self.field("value").expect("a value field")).unwrap();
        v["seq"].as_i64().unwrap()
    }
}

/// Every entry of `stream`, oldest first (XRANGE in pages).
pub async fn read_stream(url: &str, stream: &str) -> Vec<Entry> {
    let mut conn = redis_conn(url).await;
    let mut out = Vec::new();
    let mut from = "-".to_string();
    loop {
        let page: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let entries = match page {
            redis::Value::Array(entries) => entries,
            other => panic!("XRANGE answered {other:?}"),
        };
        if entries.is_empty() {
            break;
        }
        for e in entries {
            let redis::Value::Array(parts) = e else {
                panic!("an XRANGE entry that is not an array: {e:?}")
            };
            let [redis::Value::BulkString(id), redis::Value::Array(flat)] = &parts[..] else {
                panic!("unexpected XRANGE entry {parts:?}")
            };
            let bytes = |v: &redis::Value| match v {
                redis::Value::BulkString(b) => b.clone(),
                other => panic!("a field that is not a bulk string: {other:?}"),
            };
            let fields = flat
                .chunks(2)
                .map(|kv| (String::from_utf8(bytes(&kv[0])).unwrap(), bytes(&kv[1])))
                .collect();
            out.push(Entry {
                id: String::from_utf8(id.clone()).unwrap(),
                fields,
            });
        }
        from = format!("({}", out.last().unwrap().id);
    }
    out
}
