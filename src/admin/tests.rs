//! `init`'s decisions on synthetic server facts (settings the shared test
//! cluster cannot have, such as `wal_level = replica`) and `status`'s output.

use std::path::Path;

use super::*;
use crate::config::TableName;
use crate::lsn::Lsn;
use crate::pgoutput::Column;
use crate::setup::server::Server;
use crate::setup::{Role, SlotReport};

fn config(extra: &str) -> Config {
    Config::from_toml(
        &format!("[postgres]\nurl = \"postgresql://relay:s3cret@db/app\"\nslot = \"s\"\npublication = \"p\"\n{extra}"),
        Path::new("relay.toml"),
        |_| None,
    )
    .unwrap()
}

fn shipped_columns() -> Vec<Column> {
    setup::outbox_sql_columns()
        .into_iter()
        .map(|name| Column {
            is_key: false,
            name,
            type_oid: 25,
            type_modifier: -1,
        })
        .collect()
}

/// A primary of this version, without standbys.
fn pg(version_num: i32) -> Server {
    Server {
        version_num,
        in_recovery: false,
        hot_standby_feedback: false,
        synchronized_standby_slots: None,
        sync_replication_slots: None,
        physical_slots: Vec::new(),
    }
}

/// A healthy server where nothing exists yet, connected as a REPLICATION role.
fn fresh() -> Facts {
    Facts {
        server: pg(150018),
        wal_level: "logical".into(),
        max_replication_slots: 10,
        slots_in_use: 2,
        max_wal_senders: 10,
        wal_senders_in_use: 1,
        role: Role {
            name: "relay".into(),
            name_sql: "relay".into(),
            replication: true,
            superuser: false,
            database: "app".into(),
            database_sql: "app".into(),
            create_on_database: true,
        },
        table: TableFacts::Missing {
            schema_exists: true,
            create_on_schema: true,
        },
        publication: None,
        slot: None,
        other_layouts: Vec::new(),
        state: StateFacts {
            exists: false,
            usable: false,
            may_create: true,
            schema_exists: false,
        },
    }
}

fn existing_table(owned: bool, select: bool) -> TableFacts {
    TableFacts::Exists {
        owner_sql: "\"app owner\"".into(),
        owned,
        select,
        partitioned: false,
        columns: shipped_columns(),
    }
}

/// `label: state` per item, states abbreviated to ok / create: SQL / problem: message.
fn render(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| match &i.state {
            ItemState::Ok(_) => format!("{}: ok", i.label),
            ItemState::Create(sql) => format!("{}: create: {sql}", i.label),
            ItemState::Problem(e) => format!("{}: problem: {e}", i.label),
            ItemState::Warn(_) => format!("{}: warning", i.label),
        })
        .collect()
}

fn problems(items: &[Item]) -> Vec<String> {
    render(items)
        .into_iter()
        .filter(|l| l.contains(": problem: "))
        .collect()
}

#[test]
fn fresh_database_creates_table_publication_and_slot_in_order() {
    let items = plan(&fresh(), &config(""));
    assert_eq!(
        render(&items),
        [
            "server: ok",
            "wal_level: ok",
            "max_replication_slots: ok",
            "max_wal_senders: ok",
            "role relay: ok",
            &format!("table public.outbox: create: {}", setup::create_table_sql(&TableName { schema: "public".into(), name: "outbox".into() })),
            "columns: ok",
            "publication p: create: CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert')",
            "slot s: create: SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
            "failover: warning",
            &format!("state tables outbox_relay: create: {}", crate::state::state_sql("outbox_relay").join(";\n")),
        ]
    );
}

#[test]
fn everything_in_place_is_all_ok() {
    let mut f = fresh();
    f.table = existing_table(true, true);
    f.publication = Some(PublicationFacts {
        includes_table: true,
        publishes_insert: true,
        via_root: false,
    });
    f.slot = Some(SlotFacts {
        plugin: "pgoutput".into(),
        database: "app".into(),
        active: true,
        wal_status: Some("reserved".into()),
        failover: Some(true),
        synced: None,
        invalidated: None,
    });
    f.server = pg(170010);
    f.server.physical_slots = vec!["standby1".into()];
    f.server.synchronized_standby_slots = Some("standby1".into());
    f.state.exists = true;
    f.state.usable = true;
    // All slots and walsenders in use, but ours are among them.
    f.slots_in_use = 10;
    f.wal_senders_in_use = 10;
    let items = plan(&f, &config(""));
    assert!(
        items.iter().all(|i| matches!(i.state, ItemState::Ok(_))),
        "{:?}",
        render(&items)
    );
}

#[test]
fn wal_level_replica_says_how_to_change_it() {
    let mut f = fresh();
    f.wal_level = "replica".into();
    assert_eq!(
        problems(&plan(&f, &config(""))),
        ["wal_level: problem: wal_level is \"replica\", logical replication needs \"logical\"; run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"]
    );
}

#[test]
fn no_free_slot_or_walsender_is_a_problem() {
    let mut f = fresh();
    f.slots_in_use = 10;
    f.max_wal_senders = 0;
    f.wal_senders_in_use = 0;
    let p = problems(&plan(&f, &config("")));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with(
            "max_replication_slots: problem: max_replication_slots is 10 and 10 in use"
        ),
        "{p:?}"
    );
    assert!(
        p[0].contains("ALTER SYSTEM SET max_replication_slots = 11;"),
        "{p:?}"
    );
    assert!(p[1].contains("max_wal_senders is 0, logical replication needs at least 1; run ALTER SYSTEM SET max_wal_senders = 10;"), "{p:?}");
}

#[test]
fn role_without_replication_or_select_gets_the_exact_statements() {
    let mut f = fresh();
    f.role.replication = false;
    f.table = existing_table(false, false);
    let p = problems(&plan(&f, &config("")));
    assert_eq!(
        p,
        [
            "role relay: problem: role \"relay\" lacks the REPLICATION attribute; run ALTER ROLE relay REPLICATION; as a superuser",
            "table public.outbox: problem: role \"relay\" lacks SELECT on table \"public.outbox\"; run GRANT SELECT ON \"public\".\"outbox\" TO relay; as the table's owner",
            "publication p: problem: publication \"p\" does not exist and only the owner of table \"public.outbox\" (\"app owner\") or a superuser may create it; run ALTER TABLE \"public\".\"outbox\" OWNER TO relay; or run CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert'); as \"app owner\"",
        ]
    );
}

#[test]
fn superuser_needs_no_attribute_or_grants() {
    let mut f = fresh();
    f.role.replication = false;
    f.role.superuser = true;
    f.role.create_on_database = false;
    f.table = TableFacts::Missing {
        schema_exists: true,
        create_on_schema: false,
    };
    assert!(problems(&plan(&f, &config(""))).is_empty());
}

#[test]
fn missing_schema_or_create_privileges_are_problems() {
    let mut f = fresh();
    f.table = TableFacts::Missing {
        schema_exists: false,
        create_on_schema: false,
    };
    f.role.create_on_database = false;
    let p = problems(&plan(&f, &config("[outbox]\ntable = \"events.outbox\"\n")));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("schema \"events\" of table \"events.outbox\" does not exist; run CREATE SCHEMA \"events\";"), "{p:?}");
    assert!(
        p[1].contains("run GRANT CREATE ON DATABASE app TO relay;"),
        "{p:?}"
    );

    let mut f = fresh();
    f.table = TableFacts::Missing {
        schema_exists: true,
        create_on_schema: false,
    };
    let p = problems(&plan(&f, &config("")));
    assert!(
        p[0].contains("run GRANT CREATE ON SCHEMA \"public\" TO relay;"),
        "{p:?}"
    );
}

#[test]
fn columns_are_checked_against_the_table_or_the_shipped_sql() {
    let p = problems(&plan(
        &fresh(),
        &config("[outbox.columns]\npayload = \"body\"\n"),
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("columns: problem: column \"body\" not found in table \"public.outbox\" (columns: id, aggregate_type,"), "{p:?}");
    assert!(
        p[0].ends_with("set outbox.columns.payload in the config"),
        "{p:?}"
    );

    let mut f = fresh();
    f.table = existing_table(true, true);
    let p = problems(&plan(&f, &config("[outbox]\ntopic = \"t.{tenant}\"\n")));
    assert!(
        p[0].contains("column \"tenant\" not found") && p[0].contains("outbox.topic"),
        "{p:?}"
    );
}

#[test]
fn existing_publication_or_slot_that_cannot_work_is_a_problem() {
    let mut f = fresh();
    f.table = existing_table(true, true);
    f.publication = Some(PublicationFacts {
        includes_table: false,
        publishes_insert: true,
        via_root: false,
    });
    f.slot = Some(SlotFacts {
        plugin: "test_decoding".into(),
        database: "app".into(),
        active: false,
        wal_status: Some("reserved".into()),
        failover: None,
        synced: None,
        invalidated: None,
    });
    let p = problems(&plan(&f, &config("")));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].contains("run ALTER PUBLICATION \"p\" ADD TABLE \"public\".\"outbox\";"),
        "{p:?}"
    );
    assert!(p[1].contains("uses plugin \"test_decoding\""), "{p:?}");

    f.publication = Some(PublicationFacts {
        includes_table: true,
        publishes_insert: false,
        via_root: false,
    });
    f.slot.as_mut().unwrap().plugin = "pgoutput".into();
    f.slot.as_mut().unwrap().wal_status = Some("lost".into());
    let p = problems(&plan(&f, &config("")));
    assert!(p[0].contains("SET (publish = 'insert');"), "{p:?}");
    assert!(p[1].contains("is lost (wal_status = lost)"), "{p:?}");
}

fn status(report: Option<SlotReport>) -> Status {
    Status {
        slot: "s".into(),
        kind: report.as_ref().map(|_| ("pgoutput".into(), "app".into())),
        report,
        database: "app".into(),
        current_wal: Lsn(0x1_0000_2000),
        publication: "p".into(),
        publication_tables: Some(vec!["public.outbox".into()]),
        checkpoint: None,
        server: pg(150018),
        slot_state: None,
        failover: Err("PostgreSQL 15 keeps logical slots on the primary only".into()),
        state_tables: true,
        live_acked: None,
    }
}

fn report() -> SlotReport {
    SlotReport {
        slot: "s".into(),
        active: true,
        active_pid: Some(4242),
        confirmed_flush: Lsn(0x1_0000_1000),
        restart_lsn: Lsn(0x0_FFF0_0000),
        current_wal: Lsn(0x1_0000_2000),
        retained_wal_bytes: 0x10_2000,
        wal_status: Some("reserved".into()),
    }
}

#[test]
fn status_text_is_aligned_and_json_is_flat() {
    let mut s = status(Some(report()));
    // In the future: the age is 0 whenever the test runs.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    s.checkpoint = Some(crate::state::Checkpoint {
        acked: Lsn(0x1_0000_1800),
        acked_at: later,
        window_start: Some((Lsn(0x1_0000_1000), later)),
        window_samples: Vec::new(),
    });
    s.live_acked = Some((Lsn(0x1_0000_1900), "http://127.0.0.1:9187/metrics".into()));
    assert_eq!(
        s.text(),
        "slot                       s
active                     yes
active_pid                 4242
confirmed_flush_lsn        1/1000
restart_lsn                0/FFF00000
retained_wal_bytes         1056768 (1.0 MiB)
wal_status                 reserved
current_wal_lsn            1/2000
lag_bytes                  4096 (4.0 KiB)
publication                p
publication_tables         public.outbox
checkpoint_lsn             1/1800 (stored 0 ms ago)
live_acked_lsn             1/1900 (from http://127.0.0.1:9187/metrics)
earliest_replayable_lsn    1/1000
replay_window_bytes        2048 (2.0 KiB)
replay_window_age_seconds  0
server                     PostgreSQL 15.18, primary
failover                   unsafe: PostgreSQL 15 keeps logical slots on the primary only
"
    );
    let json = serde_json::to_value(s.json()).unwrap();
    assert_eq!(json["confirmed_flush_lsn"], "1/1000");
    assert_eq!(json["retained_wal_bytes"], 1056768);
    assert_eq!(json["lag_bytes"], 4096);
    assert_eq!(json["wal_status"], "reserved");
    assert_eq!(json["publication_tables"][0], "public.outbox");
    assert_eq!(json["checkpoint_lsn"], "1/1800");
    assert_eq!(json["checkpoint_age_ms"], 0);
    assert_eq!(json["live_acked_lsn"], "1/1900");
    assert_eq!(json["earliest_replayable_lsn"], "1/1000");
    assert_eq!(json["replay_window_bytes"], 2048);
    assert_eq!(s.problem(Path::new("relay.toml")), None);
}

#[test]
fn status_fails_for_a_missing_lost_or_foreign_slot() {
    let s = status(None);
    assert_eq!(
        s.problem(Path::new("/etc/relay.toml")).unwrap(),
        "replication slot \"s\" does not exist; create it with: outbox-relay init --config /etc/relay.toml"
    );
    assert!(
        s.text().starts_with(
            "slot                       s (missing)\ncurrent_wal_lsn            1/2000\n"
        ),
        "{}",
        s.text()
    );
    let json = serde_json::to_value(s.json()).unwrap();
    assert_eq!(json["slot_exists"], false);
    assert!(json["confirmed_flush_lsn"].is_null());

    let mut r = report();
    r.wal_status = Some("lost".into());
    let reason = status(Some(r)).problem(Path::new("r.toml")).unwrap();
    assert!(reason.contains("is lost (wal_status = lost)"), "{reason}");

    let mut s = status(Some(report()));
    s.kind = Some(("pgoutput".into(), "other".into()));
    assert!(s
        .problem(Path::new("r.toml"))
        .unwrap()
        .contains("database \"other\""));
}

#[test]
fn byte_counts_read_well() {
    assert_eq!(bytes(0), "0");
    assert_eq!(bytes(1023), "1023");
    assert_eq!(bytes(1536), "1536 (1.5 KiB)");
    assert_eq!(bytes(3 << 30), "3221225472 (3.0 GiB)");
}

#[test]
fn on_17_the_slot_is_a_failover_slot_and_a_partitioned_table_is_published_through_its_root() {
    let mut f = fresh();
    f.server = pg(170010);
    f.table = existing_table(true, true);
    if let TableFacts::Exists { partitioned, .. } = &mut f.table {
        *partitioned = true;
    }
    let lines = render(&plan(&f, &config("")));
    assert!(lines.contains(&"publication p: create: CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"outbox\" WITH (publish = 'insert', publish_via_partition_root = true)".to_string()), "{lines:?}");
    assert!(lines.contains(&"slot s: create: SELECT pg_create_logical_replication_slot('s', 'pgoutput', false, false, true)".to_string()), "{lines:?}");
    // No standby streams through a physical slot: not safe for a failover.
    assert!(
        lines.contains(&"failover: warning".to_string()),
        "{lines:?}"
    );
    let lines = render(&plan(&f, &config("failover_slot = \"off\"\n")));
    assert!(
        lines.contains(
            &"slot s: create: SELECT pg_create_logical_replication_slot('s', 'pgoutput')"
                .to_string()
        ),
        "{lines:?}"
    );

    // An existing publication that publishes the partitions under their own names.
    f.publication = Some(PublicationFacts {
        includes_table: false,
        publishes_insert: true,
        via_root: false,
    });
    let p = problems(&plan(&f, &config("")));
    assert!(
        p[0].contains("SET (publish_via_partition_root = true);"),
        "{p:?}"
    );

    f.server.physical_slots = vec!["standby1".into()];
    f.server.synchronized_standby_slots = Some("standby1".into());
    f.publication = None;
    assert!(render(&plan(&f, &config(""))).contains(&"failover: ok".to_string()));
}

#[test]
fn versions_and_standbys_that_cannot_work_are_problems_and_nothing_is_created() {
    let mut f = fresh();
    f.server = pg(130012);
    let p = problems(&plan(&f, &config("")));
    assert!(
        p[0].starts_with("server: problem: PostgreSQL 13.12 is not supported"),
        "{p:?}"
    );

    let mut f = fresh();
    f.server = pg(160014);
    let p = problems(&plan(&f, &config("failover_slot = \"on\"\n")));
    assert!(
        p[0].contains("needs PostgreSQL 17 or later (this server is 16.14)"),
        "{p:?}"
    );

    let mut f = fresh();
    f.server = pg(160014);
    f.server.in_recovery = true;
    let p = problems(&plan(&f, &config("")));
    assert!(p[0].contains("hot_standby_feedback = off"), "{p:?}");
    f.server.hot_standby_feedback = true;
    f.table = existing_table(true, true);
    let p = problems(&plan(&f, &config("")));
    assert!(
        p[0].contains("cannot be created; run CREATE PUBLICATION"),
        "{p:?}"
    );
}
