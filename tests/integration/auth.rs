//! The replication connection authenticates every way PostgreSQL asks, over
//! TCP and Unix sockets, and refuses clearly when it cannot.

use outbox_relay::relay::RelayError;
use outbox_relay::replication::{self, ReplicationError};
use outbox_relay::setup::SetupError;
use outbox_relay::transport::PgTarget;

use crate::harness::*;

async fn identify(url: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
    let target = PgTarget::parse(url).unwrap();
    let mut conn = replication::connect(&target).await?;
    conn.simple_query("IDENTIFY_SYSTEM").await
}

#[tokio::test]
async fn authenticates_with_scram_md5_cleartext_and_trust() {
    let s = servers();
    create_role("md5_user", "md5-pw", true, true).await;
    create_role("plain_user", "plain-pw", false, true).await;
    create_role("trust_user", "unused", false, true).await;
    for url in [
        s.url(),
        s.url_for("md5_user", "md5-pw"),
        s.url_for("plain_user", "plain-pw"),
        format!("postgresql://trust_user@127.0.0.1:{}/postgres", s.pg_port),
    ] {
        let rows = identify(&url).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0][3].as_deref(),
            Some("postgres"),
            "IDENTIFY_SYSTEM names the database"
        );
        assert!(
            rows[0][2].as_deref().unwrap().contains('/'),
            "xlogpos is an LSN"
        );
    }
}

#[tokio::test]
async fn connects_over_a_unix_socket() {
    let s = servers();
    let url = format!(
        "host={} port={} user=postgres dbname=postgres",
        s.pg_socket_dir.display(),
        s.pg_port
    );
    let rows = identify(&url).await.unwrap();
    assert_eq!(rows[0][3].as_deref(), Some("postgres"));
}

#[tokio::test]
async fn wrong_or_missing_password_is_a_clear_auth_error_without_the_secret() {
    let s = servers();
    for (url, expected) in [
        (
            s.url_for("postgres", "not-the-password"),
            "password authentication failed",
        ),
        (
            format!("postgresql://postgres@127.0.0.1:{}/postgres", s.pg_port),
            "has none; add it to postgres.url",
        ),
    ] {
        let err = identify(&url).await.unwrap_err();
        assert!(matches!(err, ReplicationError::Auth { .. }), "{err:?}");
        assert!(err.is_permanent());
        let msg = err.to_string();
        assert!(msg.contains(expected), "{msg}");
        assert!(!msg.contains("not-the-password"), "{msg}");
    }
}

#[tokio::test]
async fn unreachable_server_names_the_target() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = identify(&format!("postgresql://u:pw@127.0.0.1:{port}/db"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.is_permanent(), "a down server is retried");
}

#[tokio::test]
async fn role_without_replication_and_missing_table_are_refused_with_the_fix() {
    let s = servers();
    create_role("no_repl_user", "pw", false, false).await;
    let tc = TestCase::new("norepl").await;
    let text = tc
        .config_text(&s.brokers, "")
        .replace(&s.url(), &s.url_for("no_repl_user", "pw"));
    let cfg = outbox_relay::config::Config::from_toml(&text, std::path::Path::new("t"), |_| None)
        .unwrap();
    let err = spawn_relay(cfg).join().await.unwrap_err();
    assert!(
        matches!(&err, RelayError::Setup(e) if matches!(**e, SetupError::NoReplication { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("ALTER ROLE no_repl_user REPLICATION"),
        "{err}"
    );

    let text = tc
        .config_text(&s.brokers, "")
        .replace(&format!("public.{}", tc.table), "public.no_such_outbox");
    let cfg = outbox_relay::config::Config::from_toml(&text, std::path::Path::new("t"), |_| None)
        .unwrap();
    let err = spawn_relay(cfg).join().await.unwrap_err();
    assert!(err.is_fatal());
    assert_eq!(
        err.to_string(),
        "table \"public.no_such_outbox\" does not exist; create it with sql/001_outbox.sql or set outbox.table"
    );
}
