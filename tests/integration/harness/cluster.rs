//! A PostgreSQL cluster of a test's own, of any major version, for tests that
//! stop, crash or restart the server, need other server settings, or build a
//! primary and standbys (`standby`). Stopped and removed on drop.

use std::process::Command;
use std::time::{Duration, Instant};

use super::postgres::{
    connect, init_cluster, postgres_options, socket_url, tcp_url, wait_ready, ClusterDir,
    PgInstall, PASSWORD,
};
use super::process::{as_postgres, chown, free_port, shell_quote};

pub struct PgCluster {
    pub port: u16,
    pub(crate) c: ClusterDir,
    pub(crate) install: PgInstall,
    pub(super) settings: Vec<String>,
}

/// How an own cluster differs from the default one.
#[derive(Default)]
pub struct ClusterOptions {
    /// Major version (`PgInstall::of`: Debian's, else the npm build from the
    /// cache); `None`: the default server's (`PgInstall::default_install`).
    pub major: Option<u32>,
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

    /// A primary of major `major` with the default settings.
    pub fn start_version(major: u32) -> PgCluster {
        PgCluster::start_with(ClusterOptions {
            major: Some(major),
            ..Default::default()
        })
    }

    pub fn start_with(opts: ClusterOptions) -> PgCluster {
        let install = match opts.major {
            Some(major) => PgInstall::of(major),
            None => PgInstall::default_install(),
        };
        let c = init_cluster(&install);
        for (name, content) in &opts.files {
            let path = c.data.join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            chown(&path, c.ids);
        }
        let cluster = PgCluster::new(c, install, opts.settings);
        cluster.start_again();
        cluster
    }

    /// A cluster on a free port whose data directory `c.data` is ready to start.
    pub(crate) fn new(c: ClusterDir, install: PgInstall, settings: Vec<String>) -> PgCluster {
        PgCluster {
            port: free_port(),
            c,
            install,
            settings,
        }
    }

    pub fn major(&self) -> u32 {
        self.install.major
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = as_postgres(
            &mut Command::new(self.install.program("pg_ctl")),
            self.c.ids,
        )
        .arg("-D")
        .arg(&self.c.data)
        .args(args)
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?} (PostgreSQL {}) failed: {}\n{}",
            self.major(),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Starts the server (again) and waits until it answers queries.
    pub fn start_again(&self) {
        let mut opts = postgres_options(self.port, &self.c.dir, true);
        for setting in &self.settings {
            opts.push("-c".into());
            opts.push(setting.clone());
        }
        // pg_ctl hands -o to the shell: quote each argument (settings may contain spaces).
        let opts: Vec<String> = opts.iter().map(|o| shell_quote(o)).collect();
        let log = self.c.log();
        self.pg_ctl(&[
            "-w",
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts.join(" "),
            "start",
        ]);
        wait_ready(&self.socket_url(), &self.c);
    }

    /// Stops the server: `mode` is `fast` or `immediate` (a crash).
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["-w", "-m", mode, "stop"]);
    }

    /// A crash: SIGKILL to the postmaster and to every process of the server
    /// at once (nothing writes a shutdown checkpoint or says goodbye to a
    /// client; the kernel closes their TCP connections). Returns when all of
    /// them are gone; `start_again` then runs crash recovery.
    pub fn kill(&self) {
        let pid_file = std::fs::read_to_string(self.c.data.join("postmaster.pid"))
            .unwrap_or_else(|e| panic!("no postmaster.pid in {}: {e}", self.c.data.display()));
        let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        assert!(
            !is_gone(postmaster),
            "postmaster {postmaster} is not running"
        );
        let mut pids = children_of(postmaster);
        pids.insert(0, postmaster);
        // One kill(1) for all (a child may have exited meanwhile: not an error).
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(pids.iter().map(u32::to_string))
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pids.iter().all(|p| is_gone(*p)) {
            assert!(
                Instant::now() < deadline,
                "processes {pids:?} still alive 30 s after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Promotes a standby (`pg_ctl promote`, which waits until it accepts writes).
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "promote"]);
    }

    pub fn url(&self) -> String {
        tcp_url(self.port, "postgres", PASSWORD)
    }

    /// Superuser connection over the Unix socket (trusted, whatever pg_hba.conf says for TCP).
    pub fn socket_url(&self) -> String {
        socket_url(&self.c.dir, self.port)
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        connect(&self.socket_url()).await
    }

    /// The one value `sql` returns (e.g. `SELECT pg_is_in_recovery()`).
    pub async fn value<T: tokio_postgres::types::FromSqlOwned>(&self, sql: &str) -> T {
        self.sql().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        self.c.log_text()
    }
}

/// Processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| stat_field(*p, 1).is_some_and(|ppid| ppid == pid.to_string()))
        .collect()
}

/// Exited (or a zombie nobody reaped yet).
fn is_gone(pid: u32) -> bool {
    !stat_field(pid, 0).is_some_and(|state| state != "Z" && state != "X")
}

/// Field `n` after the command name of /proc/<pid>/stat (0: state, 1: parent pid).
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n).map(str::to_string)
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &mut Command::new(self.install.program("pg_ctl")),
            self.c.ids,
        )
        .arg("-D")
        .arg(&self.c.data)
        .args(["-m", "immediate", "stop"])
        .output();
        let _ = std::fs::remove_dir_all(&self.c.dir);
    }
}
