//! The servers the tests of this binary share: one PostgreSQL per major
//! version (the default one, Debian's, for the full suite; 14, 16, 17 and 18
//! for the version matrix), each started on first use, and the one tansu
//! broker. Everything stops (and the data directories go) when the process
//! exits, however it exits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::postgres::{
    connect, init_cluster, postgres_options, socket_url, tcp_url, wait_ready, PgInstall, PASSWORD,
};
use super::process::{free_port, supervise, wait_port, Watchdog};
use super::tansu::shared_brokers;

/// A shared PostgreSQL server and the shared broker.
pub struct Servers {
    pub major: u32,
    pub pg_port: u16,
    pub pg_socket_dir: PathBuf,
    pub brokers: String,
    /// Appended to test names on this server: empty on the default server,
    /// `_pg<major>` on the others (they share the broker, topics must differ).
    pub name_suffix: String,
    _watchdog: Mutex<Watchdog>,
}

/// The default server (`PgInstall::default_install`: Debian's) and the broker.
pub fn servers() -> &'static Servers {
    static DEFAULT: OnceLock<Servers> = OnceLock::new();
    DEFAULT.get_or_init(|| Servers::start(PgInstall::default_install(), ""))
}

/// A server of major `major` (see `PgInstall::of`) and the broker. Tests of
/// the same major share it.
pub fn servers_on(major: u32) -> &'static Servers {
    static BY_MAJOR: OnceLock<Mutex<HashMap<u32, &'static Servers>>> = OnceLock::new();
    let mut started = BY_MAJOR.get_or_init(Default::default).lock().unwrap();
    started.entry(major).or_insert_with(|| {
        let s = Servers::start(PgInstall::of(major), &format!("_pg{major}"));
        Box::leak(Box::new(s))
    })
}

impl Servers {
    fn start(install: PgInstall, name_suffix: &str) -> Servers {
        let c = init_cluster(&install);
        let pg_port = free_port();
        let mut args = vec!["-D".to_string(), c.data.display().to_string()];
        args.extend(postgres_options(pg_port, &c.dir, false));
        let watchdog = supervise(
            &install.program("postgres"),
            &args,
            "INT",
            &format!("rm -rf '{}'", c.dir.display()),
            c.ids,
            &c.log(),
        );
        wait_port(pg_port, "PostgreSQL", &c.log());
        wait_ready(&socket_url(&c.dir, pg_port), &c);
        Servers {
            major: install.major,
            pg_port,
            pg_socket_dir: c.dir,
            brokers: shared_brokers().to_string(),
            name_suffix: name_suffix.to_string(),
            _watchdog: Mutex::new(watchdog),
        }
    }

    /// Superuser connection string (SCRAM over TCP).
    pub fn url(&self) -> String {
        self.url_for("postgres", PASSWORD)
    }

    pub fn url_for(&self, user: &str, password: &str) -> String {
        tcp_url(self.pg_port, user, password)
    }

    pub async fn sql(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }
}

/// Creates a login role on the default server unless it exists (`md5` or SCRAM password).
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
