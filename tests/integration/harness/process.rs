//! Processes the servers run as: free ports, the `postgres` user when the
//! tests run as root, and the watchdog that stops a server when the test
//! process exits. Knows nothing about PostgreSQL or Kafka themselves.

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback address for a metrics listener.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The cache install-deps.sh fills: `$OUTBOX_RELAY_CACHE`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay`.
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var("OUTBOX_RELAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
                .join("outbox-relay")
        })
}

/// uid/gid the servers run as: the `postgres` user when running as root
/// (PostgreSQL refuses root), `None` otherwise.
pub(crate) type Ids = Option<(u32, u32)>;

pub(crate) fn postgres_ids() -> Ids {
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

pub(crate) fn as_postgres(cmd: &mut Command, ids: Ids) -> &mut Command {
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd
}

/// Gives `path` to the servers' user (when running as root).
pub(crate) fn chown(path: &Path, ids: Ids) {
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

/// One argument quoted for `sh` (pg_ctl hands its `-o` options to the shell).
pub(crate) fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// A process under a watchdog shell: the shell stops it and cleans up once its
/// stdin, a pipe only the test process holds, closes (however the test process exits).
pub(crate) type Watchdog = (Child, ChildStdin);

/// Starts `program args..` under a watchdog shell that stops it with `signal`
/// and runs `cleanup` once our stdin closes.
pub(crate) fn supervise(
    program: &Path,
    args: &[String],
    signal: &str,
    cleanup: &str,
    ids: Ids,
    log: &Path,
) -> Watchdog {
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

pub(crate) fn wait_port(port: u16, what: &str, log: &Path) {
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
