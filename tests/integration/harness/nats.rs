//! nats-server with JetStream (`nats-server -js -sd <dir> -p <port>`): the one
//! the tests of this binary share, servers of a test's own that it stops and
//! starts again on the same port and storage, and reading a stream back.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

use super::process::{free_port, supervise, wait_port, Watchdog};

/// `$NATS_SERVER_BIN`, else `nats-server` on the PATH or in /usr/sbin (Debian's package).
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.exists())
        .expect("nats-server not found: run deploy/dev/install-deps.sh (Debian's nats-server) or set NATS_SERVER_BIN")
}

/// Starts a JetStream server on `port` storing in `dir`, with `extra`
/// arguments, under a watchdog. `cleanup` runs once it stopped (the shared
/// server removes its storage).
fn start_nats(port: u16, dir: &std::path::Path, extra: &[String], cleanup: &str) -> Watchdog {
    let log = std::env::temp_dir().join(format!("outbox-relay-nats-{port}.log"));
    let mut args: Vec<String> = vec![
        "-js".into(),
        "-sd".into(),
        dir.display().to_string(),
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    args.extend_from_slice(extra);
    let server = supervise(
        &nats_server_bin(),
        &args,
        "TERM",
        &format!("rm -f '{}'; {cleanup}", log.display()),
        None,
        &log,
    );
    wait_port(port, "nats-server", &log);
    server
}

/// The server every test of this binary shares: its URL. Started on first
/// use, stopped (and its storage removed) when the process exits.
pub fn shared_nats() -> &'static str {
    static SHARED: OnceLock<(String, Mutex<Watchdog>)> = OnceLock::new();
    &SHARED
        .get_or_init(|| {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("outbox-relay-nats-js-{port}"));
            std::fs::create_dir_all(&dir).unwrap();
            let w = start_nats(port, &dir, &[], &format!("rm -rf '{}'", dir.display()));
            (format!("nats://127.0.0.1:{port}"), Mutex::new(w))
        })
        .0
}

/// A server of a test's own, for tests that stop and restart it. Its
/// JetStream storage survives a restart (as a real server's disk does).
pub struct NatsServer {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    watchdog: Option<Watchdog>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// With more `nats-server` arguments (`--user`, `--pass`, ...).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let watchdog = Some(start_nats(port, dir.path(), &extra, ""));
        NatsServer {
            port,
            dir,
            extra,
            watchdog,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some((mut child, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn start_again(&mut self) {
        self.stop();
        self.watchdog = Some(start_nats(self.port, self.dir.path(), &self.extra, ""));
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client of `url`; `user:password@` in it is used (async-nats 0.46 itself ignores it).
pub async fn nats_client(url: &str) -> async_nats::Client {
    let addr: async_nats::ServerAddr = url.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let opts = match (addr.username(), addr.password()) {
            (Some(u), Some(p)) => {
                async_nats::ConnectOptions::with_user_and_password(u.into(), p.into())
            }
            _ => async_nats::ConnectOptions::new(),
        };
        match opts.connect(addr.clone()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connecting to {url}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

/// Creates stream `name` capturing `subjects` (file storage, JetStream's
/// default duplicate window of 2 minutes); `max_msg_size` -1 for no limit.
pub async fn create_stream(url: &str, name: &str, subjects: &[String], max_msg_size: i32) {
    let js = jetstream::new(nats_client(url).await);
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: subjects.to_vec(),
        storage: stream::StorageType::File,
        max_message_size: max_msg_size,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("cannot create stream {name}: {e}"));
}

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct NatsMsg {
    pub seq: u64,
    pub subject: String,
    pub payload: bytes::Bytes,
    /// Every header value, per name in the order sent (names in any order).
    pub headers: Vec<(String, String)>,
}

impl NatsMsg {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn value(&self) -> &str {
        std::str::from_utf8(&self.payload).unwrap()
    }

    /// The `seq` field of a test row's payload.
    pub fn row_seq(&self) -> i64 {
        serde_json::from_slice::<serde_json::Value>(&self.payload).unwrap()["seq"]
            .as_i64()
            .unwrap()
    }
}

/// Number of messages stream `name` holds.
pub async fn stream_len(url: &str, name: &str) -> u64 {
    let js = jetstream::new(nats_client(url).await);
    let mut s = js.get_stream(name).await.unwrap();
    s.info().await.unwrap().state.messages
}

/// Every message of stream `name`, in stream order, once it holds at least
/// `expected` (60 s at most).
pub async fn read_stream(url: &str, name: &str, expected: u64) -> Vec<NatsMsg> {
    let js = jetstream::new(nats_client(url).await);
    let mut s = js.get_stream(name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let state = s.info().await.unwrap().state.clone();
        if state.messages >= expected || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = Vec::with_capacity(state.messages as usize);
    for seq in state.first_sequence..=state.last_sequence {
        let m = match s.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) => panic!("stream {name}: message {seq}: {e}"),
        };
        let mut headers = Vec::new();
        for (k, vs) in m.headers.iter() {
            for v in vs {
                headers.push((AsRef::<str>::as_ref(k).to_string(), v.as_str().to_string()));
            }
        }
        out.push(NatsMsg {
            seq,
            subject: m.subject.to_string(),
            payload: m.payload,
            headers,
        });
    }
    out
}
