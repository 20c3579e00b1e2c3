//! The statements `init` prints and the messages of failed checks.

use super::*;

fn table(schema: &str, name: &str) -> TableName {
    TableName {
        schema: schema.into(),
        name: name.into(),
    }
}

#[test]
fn create_table_sql_is_the_shipped_statement_on_one_line_under_the_configured_name() {
    let code: String = OUTBOX_SQL
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect();
    assert_eq!(
        code.matches("public.outbox").count(),
        1,
        "sql/001_outbox.sql must name the table exactly once"
    );
    let sql = create_table_sql(&table("app", "Events \"v2\""));
    assert!(
        sql.starts_with(r#"CREATE TABLE IF NOT EXISTS "app"."Events ""v2""" (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregate_type text NOT NULL,"#),
        "{sql}"
    );
    assert!(
        sql.ends_with("created_at timestamptz NOT NULL DEFAULT now())"),
        "{sql}"
    );
    assert!(!sql.contains('\n') && !sql.contains("--") && !sql.contains(';'));
    assert!(!sql.contains("public.outbox"));
}

#[test]
fn shipped_columns_are_parsed_from_the_sql() {
    assert_eq!(
        outbox_sql_columns(),
        [
            "id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "payload",
            "headers",
            "created_at"
        ]
    );
}

#[test]
fn publication_and_slot_statements_quote_names() {
    assert_eq!(
        create_publication_sql("outbox_relay", &table("public", "outbox"), false, None),
        r#"CREATE PUBLICATION "outbox_relay" FOR TABLE "public"."outbox" WITH (publish = 'insert')"#
    );
    assert_eq!(
        create_publication_sql("outbox_relay", &table("app", "Events"), true, Some("k = 1")),
        r#"CREATE PUBLICATION "outbox_relay" FOR TABLE "app"."Events" WHERE (k = 1) WITH (publish = 'insert', publish_via_partition_root = true)"#
    );
    assert_eq!(
        create_slot_sql("outbox_relay", false),
        "SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')"
    );
    assert_eq!(
        create_slot_sql("o'r", true),
        "SELECT pg_create_logical_replication_slot('o''r', 'pgoutput', false, false, true)"
    );
}

#[test]
fn failed_checks_say_what_to_change() {
    let msg = wal_level_ok("replica".into()).unwrap_err().to_string();
    assert!(msg.starts_with("wal_level is \"replica\""), "{msg}");
    assert!(
        msg.contains("run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"),
        "{msg}"
    );
    assert!(wal_level_ok("logical".into()).is_ok());

    let cases: Vec<(SetupError, &str)> = vec![
        (
            SetupError::NoReplication { role: "user".into(), role_sql: "\"user\"".into() },
            "role \"user\" lacks the REPLICATION attribute; run ALTER ROLE \"user\" REPLICATION; as a superuser",
        ),
        (
            SetupError::NoCapacity { setting: "max_replication_slots", max: 0, in_use: 0 },
            "max_replication_slots is 0, logical replication needs at least 1; run ALTER SYSTEM SET max_replication_slots = 10; and restart PostgreSQL",
        ),
        (
            SetupError::NoCapacity { setting: "max_replication_slots", max: 4, in_use: 4 },
            "max_replication_slots is 4 and 4 in use, none left for the relay; drop an unused slot (see pg_replication_slots) or run ALTER SYSTEM SET max_replication_slots = 5; and restart PostgreSQL",
        ),
        (
            SetupError::NoCapacity { setting: "max_wal_senders", max: 2, in_use: 2 },
            "end an unused replication connection (see pg_stat_replication) or run ALTER SYSTEM SET max_wal_senders = 3;",
        ),
        (
            SetupError::NoSelect { role: "relay".into(), role_sql: "relay".into(), table: table("public", "outbox") },
            "role \"relay\" lacks SELECT on table \"public.outbox\"; run GRANT SELECT ON \"public\".\"outbox\" TO relay; as the table's owner",
        ),
        (
            SetupError::NoSchema { table: table("app", "outbox") },
            "schema \"app\" of table \"app.outbox\" does not exist; run CREATE SCHEMA \"app\"; or set outbox.table",
        ),
        (
            SetupError::NoCreateOnSchema { role: "relay".into(), role_sql: "relay".into(), table: table("app", "outbox") },
            "run GRANT CREATE ON SCHEMA \"app\" TO relay;",
        ),
        (
            SetupError::NoCreateOnDatabase { role: "relay".into(), role_sql: "relay".into(), database: "app".into(), database_sql: "app".into(), publication: "p".into() },
            "run GRANT CREATE ON DATABASE app TO relay;",
        ),
        (
            SetupError::NotTableOwner { role_sql: "relay".into(), table: table("public", "outbox"), owner_sql: "app".into(), publication: "p".into() },
            "run ALTER TABLE \"public\".\"outbox\" OWNER TO relay; or run CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert'); as app",
        ),
        (
            SetupError::PublicationNoInsert { name: "p".into() },
            "publication \"p\" does not publish inserts; run ALTER PUBLICATION \"p\" SET (publish = 'insert');",
        ),
    ];
    for (err, expected) in cases {
        let msg = err.to_string();
        assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
        assert!(!msg.ends_with('.'), "{msg}");
        assert!(err.is_permanent());
    }
}

#[test]
fn lag_is_measured_from_the_confirmed_position() {
    let mut r = SlotReport {
        slot: "s".into(),
        active: false,
        active_pid: None,
        confirmed_flush: Lsn(100),
        restart_lsn: Lsn(40),
        current_wal: Lsn(160),
        retained_wal_bytes: 120,
        wal_status: Some("reserved".into()),
    };
    assert_eq!(r.lag_bytes(), 60);
    r.confirmed_flush = Lsn::ZERO;
    assert_eq!(r.lag_bytes(), 0);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["current_wal"], "0/A0");
    assert_eq!(json["retained_wal_bytes"], 120);
}
