//! TLS to PostgreSQL on both connections, against an own cluster with
//! `ssl = on`, a throwaway CA and a server certificate for localhost and
//! 127.0.0.1, whose pg_hba.conf refuses TCP connections without TLS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509NameBuilder, X509};
use outbox_relay::config::Config;
use outbox_relay::replication::{self, ReplicationError};
use outbox_relay::setup::{self, SetupError};
use outbox_relay::transport::{ConnectError, PgTarget};

use crate::harness::*;

pub(crate) fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// A certificate for `cn`, signed by `issuer` (self-signed CA when `None`).
pub(crate) fn cert(cn: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    b.set_pubkey(key).unwrap();
    let signer = match issuer {
        None => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .unwrap(),
            )
            .unwrap();
            b.set_issuer_name(&name).unwrap();
            key
        }
        Some((ca, ca_key)) => {
            let san = SubjectAlternativeName::new()
                .dns("localhost")
                .ip("127.0.0.1")
                .build(&b.x509v3_context(Some(ca), None))
                .unwrap();
            b.append_extension(san).unwrap();
            b.append_extension(BasicConstraints::new().build().unwrap())
                .unwrap();
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .build()
                    .unwrap(),
            )
            .unwrap();
            b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
                .unwrap();
            b.set_issuer_name(ca.subject_name()).unwrap();
            ca_key
        }
    };
    b.sign(signer, MessageDigest::sha256()).unwrap();
    b.build()
}

/// A cluster that speaks TLS with a certificate from its own CA, plus the CA
/// file and the file of an unrelated CA, in `dir`.
struct TlsServer {
    pg: PgCluster,
    ca: PathBuf,
    other_ca: PathBuf,
}

impl TlsServer {
    fn start(dir: &Path) -> TlsServer {
        let ca_key = key();
        let ca = cert("outbox-relay test CA", &ca_key, None);
        let server_key = key();
        let server = cert("localhost", &server_key, Some((&ca, &ca_key)));
        let other_ca = cert("unrelated CA", &key(), None);
        let hba = "local all all trust\n\
                   hostssl all all 127.0.0.0/8 scram-sha-256\n\
                   hostnossl all all 0.0.0.0/0 reject\n";
        let pg = PgCluster::start_with(ClusterOptions {
            settings: vec![
                "ssl=on".into(),
                "ssl_cert_file=server.crt".into(),
                "ssl_key_file=server.key".into(),
                // 127.0.0.2 is not in the certificate: connecting there is a host name mismatch.
                "listen_addresses=127.0.0.1,127.0.0.2".into(),
            ],
            files: vec![
                ("pg_hba.conf".into(), hba.into()),
                ("server.crt".into(), server.to_pem().unwrap()),
                (
                    "server.key".into(),
                    server_key.private_key_to_pem_pkcs8().unwrap(),
                ),
            ],
            ..Default::default()
        });
        let write = |name: &str, c: &X509| {
            let p = dir.join(name);
            std::fs::write(&p, c.to_pem().unwrap()).unwrap();
            p
        };
        TlsServer {
            ca: write("ca.pem", &ca),
            other_ca: write("other-ca.pem", &other_ca),
            pg,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgresql://postgres:{PASSWORD}@{host}:{}/postgres?{params}",
            self.pg.port
        )
    }
}

fn target(url: &str) -> PgTarget {
    PgTarget::parse(url).unwrap_or_else(|e| panic!("{e}"))
}

async fn uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_streams_over_tls_with_verify_full_on_both_connections() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TlsServer::start(dir.path());
    let s = servers();
    let db = srv.pg.sql().await;
    db.batch_execute(include_str!("../../sql/001_outbox.sql"))
        .await
        .unwrap();
    let tc = TestCase {
        name: "tls_full".into(),
        table: "outbox".into(),
        s: servers(),
    };
    let url = srv.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", srv.ca.display()),
    );
    let text = tc.config_text(&s.brokers, "").replace(&s.url(), &url);
    let relay = start_relay(Config::from_toml(&text, Path::new("t"), |_| None).unwrap()).await;

    // The walsender and the slot poller's SQL connection are both encrypted
    // (and pg_hba.conf would refuse them otherwise).
    let relay_backends = "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'outbox-relay'";
    eventually(30, "walsender and SQL connection of the relay", || async {
        let rows = db.query(relay_backends, &[]).await.unwrap();
        let kinds: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        kinds.iter().any(|k| k == "walsender") && kinds.iter().any(|k| k == "client backend")
    })
    .await;
    for row in db.query(relay_backends, &[]).await.unwrap() {
        let kind: String = row.get(0);
        assert!(row.get::<_, bool>(1), "{kind} connection without TLS");
    }

    insert_rows(&db, "outbox", "evt", 0, 20).await;
    let got = consume_all(&s.brokers, &[tc.topic("evt")], 20);
    let mut seen = seqs(&got);
    seen.sort();
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "every row once");
    relay.stop().await.unwrap();

    // prefer: TLS where the server offers it (here it must: plain TCP is
    // refused), plain against the shared server, which has ssl off.
    let prefer = target(&srv.url("127.0.0.1", "sslmode=prefer"));
    assert!(uses_tls(&setup::sql_connect(&prefer).await.unwrap()).await);
    let mut repl = replication::connect(&prefer).await.unwrap();
    assert_eq!(repl.simple_query("IDENTIFY_SYSTEM").await.unwrap().len(), 1);
    let plain = target(&format!("{}?sslmode=prefer", s.url()));
    assert!(!uses_tls(&setup::sql_connect(&plain).await.unwrap()).await);
    // verify-ca checks the chain only: an address missing from the certificate is fine.
    let ca_only = target(&srv.url(
        "127.0.0.2",
        &format!("sslmode=verify-ca&sslrootcert={}", srv.ca.display()),
    ));
    assert!(uses_tls(&setup::sql_connect(&ca_only).await.unwrap()).await);
}

/// Both connections fail the same way; returns the SQL connection's message.
async fn refused(url: &str) -> String {
    let t = target(url);
    let sql = setup::sql_connect(&t).await.map(|_| ()).unwrap_err();
    let repl = replication::connect(&t).await.map(|_| ()).unwrap_err();
    assert!(sql.is_permanent(), "{sql}");
    assert!(repl.is_permanent(), "{repl}");
    let (sql, repl) = (sql.to_string(), repl.to_string());
    assert!(
        !sql.contains(PASSWORD) && !repl.contains(PASSWORD),
        "{sql} / {repl}"
    );
    if let Some(i) = sql.find("PostgreSQL at") {
        assert!(
            repl.contains(&sql[i..]),
            "the two connections disagree:\n{sql}\n{repl}"
        );
    }
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_name_the_problem_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TlsServer::start(dir.path());
    let port = srv.pg.port;

    let wrong_ca = srv.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", srv.other_ca.display()),
    );
    let msg = refused(&wrong_ca).await;
    assert!(
        msg.contains(&format!(
            "certificate verify failed for PostgreSQL at 127.0.0.1:{port}"
        )) && msg.contains("unable to get local issuer certificate")
            && msg.contains("other-ca.pem")
            && msg.contains("set sslrootcert"),
        "{msg}"
    );

    let mismatch = srv.url(
        "127.0.0.2",
        &format!("sslmode=verify-full&sslrootcert={}", srv.ca.display()),
    );
    let msg = refused(&mismatch).await;
    assert!(
        msg.contains("does not match host \"127.0.0.2\"")
            && msg.contains("IP address mismatch")
            && msg.contains("sslmode=verify-ca"),
        "{msg}"
    );

    // pg_hba.conf refuses plain TCP: the server's reason plus what to set.
    let t = target(&srv.url("127.0.0.1", "sslmode=disable"));
    let sql = setup::sql_connect(&t).await.map(|_| ()).unwrap_err();
    let repl = replication::connect(&t).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(sql, SetupError::Connect(_)) && sql.is_permanent(),
        "{sql:?}"
    );
    assert!(matches!(repl, ReplicationError::Auth { .. }), "{repl:?}");
    for msg in [sql.to_string(), repl.to_string()] {
        assert!(
            msg.contains("no encryption") && msg.contains("set sslmode=require"),
            "{msg}"
        );
    }

    // A server without TLS (the shared one has ssl off) and sslmode=require.
    let msg = refused(&format!("{}?sslmode=require", servers().url())).await;
    assert!(
        msg.contains("does not support SSL, but sslmode=require requires it")
            && msg.contains("ssl = on"),
        "{msg}"
    );
    let t = target(&format!("{}?sslmode=require", servers().url()));
    assert!(matches!(
        setup::sql_connect(&t).await.map(|_| ()),
        Err(SetupError::Transport(ConnectError::SslUnsupported { .. }))
    ));

    // Through the binary: a configuration problem, exit code 2, one clear line.
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = \"{wrong_ca}\"\nslot = \"tls_bin\"\npublication = \"tls_bin\"\n[kafka]\nbrokers = \"{}\"\n[metrics]\nlisten = \"\"\n",
            servers().brokers
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "relay did not exit on a bad CA");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("outbox-relay: certificate verify failed")
            && last.contains("set sslrootcert"),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}
