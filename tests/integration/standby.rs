//! The harness's primary and standby primitives on real servers (the base of
//! the failover tests): a hot standby made without pg_basebackup follows its
//! primary, outlives its crash and is promoted to take writes, and a libpq
//! multi-host URL finds whichever is the primary.

use crate::harness::*;

/// The port of the server a multi-host URL connected to.
async fn connected_port(url: &str) -> i32 {
    connect(url)
        .await
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn count(c: &PgCluster) -> i64 {
    c.value("SELECT count(*) FROM failover_probe").await
}

async fn standby_follows_and_is_promoted_after_the_primary_crashes(major: u32) {
    let primary = PgCluster::start_version(major);
    let standby = primary
        .start_standby(StandbyOptions {
            sync_replication_slots: major >= 17,
            ..Default::default()
        })
        .await;
    assert_eq!(standby.major(), major);
    assert!(standby.in_recovery().await, "the standby is in recovery");
    assert!(!primary.in_recovery().await);

    let db = primary.sql().await;
    db.batch_execute(
        "CREATE TABLE failover_probe (id int PRIMARY KEY);
         INSERT INTO failover_probe SELECT generate_series(1, 100);",
    )
    .await
    .unwrap();
    standby.wait_replayed(primary.current_lsn().await).await;
    assert_eq!(
        count(&standby).await,
        100,
        "the standby replayed the writes"
    );
    let refused = standby
        .sql()
        .await
        .batch_execute("INSERT INTO failover_probe VALUES (0)")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );
    // The standby first: the URL skips it because it is read-only.
    let url = multi_host_url(&[&standby, &primary]);
    assert_eq!(connected_port(&url).await, i32::from(primary.port));

    drop(db);
    primary.kill();
    assert!(
        tokio_postgres::connect(&primary.socket_url(), tokio_postgres::NoTls)
            .await
            .is_err(),
        "the crashed primary accepts no connections"
    );
    standby.promote();
    assert!(!standby.in_recovery().await, "promoted");
    standby
        .sql()
        .await
        .batch_execute("INSERT INTO failover_probe VALUES (101)")
        .await
        .unwrap();
    assert_eq!(count(&standby).await, 101, "the new primary takes writes");
    // The crashed primary first: the URL goes on to the promoted standby.
    let url = multi_host_url(&[&primary, &standby]);
    assert_eq!(connected_port(&url).await, i32::from(standby.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_on_14_follows_and_is_promoted_after_the_primary_crashes() {
    standby_follows_and_is_promoted_after_the_primary_crashes(14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_on_17_follows_and_is_promoted_after_the_primary_crashes() {
    standby_follows_and_is_promoted_after_the_primary_crashes(17).await;
}
