//! `outbox-relay init` and `status`, run as the real binary against the test
//! cluster: what they print, what they create (and do not create) and their
//! exit codes, as a superuser, as a table-owning REPLICATION role and as a role
//! lacking privileges. No output may contain a password.

use std::path::Path;

use outbox_relay::lsn::Lsn;

use crate::harness::*;

/// Names for a test whose table does not exist yet (TestCase::new creates it).
fn without_table(name: &str) -> TestCase {
    TestCase {
        name: name.to_string(),
        table: format!("outbox_{name}"),
        s: servers(),
    }
}

/// Config text connecting as `user`.
fn config_as(tc: &TestCase, user: &str, password: &str) -> String {
    let s = servers();
    // A state schema of its own: the shared one belongs to the superuser.
    tc.config_text(&s.brokers, "")
        .replace(&s.url(), &s.url_for(user, password))
        + &format!("\n[checkpoint]\nschema = \"state_{user}\"\n")
}

async fn create_role(name: &str, password: &str, attributes: &str) {
    servers()
        .sql()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {name} LOGIN {attributes} PASSWORD '{password}'"
        ))
        .await
        .unwrap();
}

/// (table exists, publication exists, slot's plugin).
async fn objects(tc: &TestCase) -> (bool, bool, Option<String>) {
    let db = servers().sql().await;
    let row = db
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2),
                    (SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $2)",
            &[&format!("public.{}", tc.table), &tc.name],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn drop_slot(tc: &TestCase) {
    let db = servers().sql().await;
    db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        &[&tc.name],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn init_dry_run_prints_the_sql_and_creates_nothing() {
    let tc = without_table("admin_dry");
    // A state schema nobody creates, so the output does not depend on other tests.
    let cfg = config_file(&format!(
        "{}\n[checkpoint]\nschema = \"state_admin_dry\"\n",
        tc.config_text(&servers().brokers, "")
    ));
    let out = relay_cli(&["init", "--dry-run"], cfg.path()).await;
    println!("$ outbox-relay init --dry-run --config FILE\n{out}");
    assert_eq!(out.code, Some(0), "{out}");
    out.assert_no_secret(&[]);
    assert!(out.item("wal_level").starts_with("ok (logical)"), "{out}");
    assert!(
        out.item("role postgres").starts_with("ok (superuser)"),
        "{out}"
    );
    for label in [
        "table public.outbox_admin_dry",
        "publication admin_dry",
        "slot admin_dry",
    ] {
        assert_eq!(out.item(label), "would create", "{out}");
    }
    let sql: Vec<&str> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("-- SQL"))
        .skip(1)
        .collect();
    assert_eq!(sql.len(), 6, "{out}");
    assert!(
        sql[0].starts_with(
            r#"CREATE TABLE IF NOT EXISTS "public"."outbox_admin_dry" (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "#
        ),
        "{out}"
    );
    assert_eq!(
        sql[1..4],
        [
            r#"CREATE PUBLICATION "admin_dry" FOR TABLE "public"."outbox_admin_dry" WITH (publish = 'insert');"#,
            "SELECT pg_create_logical_replication_slot('admin_dry', 'pgoutput');",
            r#"CREATE SCHEMA IF NOT EXISTS "state_admin_dry";"#,
        ]
    );
    assert!(sql[4].starts_with(r#"CREATE TABLE IF NOT EXISTS "state_admin_dry".checkpoint ("#));
    assert!(sql[5].starts_with(r#"CREATE TABLE IF NOT EXISTS "state_admin_dry".replay_request ("#));
    for statement in &sql {
        assert!(
            statement.ends_with(';') && statement.matches(';').count() == 1,
            "{statement}"
        );
    }
    assert_eq!(
        objects(&tc).await,
        (false, false, None),
        "--dry-run changed nothing"
    );

    // The printed SQL is exactly what init needs: after running it, init finds all in place.
    let db = servers().sql().await;
    for statement in &sql {
        db.batch_execute(statement).await.unwrap();
    }
    let out = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(!out.stdout.contains("create"), "{out}");
    drop_slot(&tc).await;
}

#[tokio::test]
async fn init_creates_table_publication_and_slot_once_and_the_relay_streams_from_them() {
    let tc = without_table("admin_init");
    let text = tc.config_text(&servers().brokers, "");
    let cfg = config_file(&text);
    let out = relay_cli(&["init"], cfg.path()).await;
    println!("$ outbox-relay init --config FILE\n{out}");
    assert_eq!(out.code, Some(0), "{out}");
    out.assert_no_secret(&[]);
    for label in [
        "table public.outbox_admin_init",
        "publication admin_init",
        "slot admin_init",
    ] {
        assert_eq!(out.item(label), "created", "{out}");
    }
    for label in [
        "wal_level",
        "max_replication_slots",
        "max_wal_senders",
        "role postgres",
        "columns",
    ] {
        assert!(out.item(label).starts_with("ok ("), "{out}");
    }
    assert_eq!(objects(&tc).await, (true, true, Some("pgoutput".into())));
    let db = servers().sql().await;
    let row = db
        .query_one(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate,
                    (SELECT array_agg(tablename::text) FROM pg_publication_tables t WHERE t.pubname = p.pubname)
             FROM pg_publication p WHERE pubname = $1",
            &[&tc.name],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2),
            row.get::<_, bool>(3)
        ),
        (true, false, false, false),
        "the publication publishes inserts only"
    );
    assert_eq!(row.get::<_, Vec<String>>(4), vec![tc.table.clone()]);

    let again = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(again.code, Some(0), "{again}");
    assert_eq!(again.stdout.lines().count(), out.stdout.lines().count());
    for line in again.stdout.lines() {
        // PostgreSQL 15 keeps slots on the primary only: a failover warning, not a check.
        assert!(
            line.contains("  ok (") || line.starts_with("failover  "),
            "second run: {line:?}\n{again}"
        );
    }

    // What init created is all the relay needs: it streams without creating anything.
    let cfg = outbox_relay::config::Config::from_toml(
        &text.replace(
            "status_interval_ms = 200\n",
            "status_interval_ms = 200\ncreate_missing = false\n",
        ),
        Path::new("t"),
        |_| None,
    )
    .unwrap();
    let running = start_relay(cfg).await;
    db.batch_execute(&format!(
        "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'o-1', 'OrderPlaced', '{{\"total\": 42}}')",
        tc.table
    ))
    .await
    .unwrap();
    let brokers = servers().brokers.clone();
    let topic = tc.topic("order");
    let got = tokio::task::spawn_blocking(move || consume_all(&brokers, &[topic], 1))
        .await
        .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "o-1");
    running.stop().await.unwrap();
    drop_slot(&tc).await;
}

#[tokio::test]
async fn init_works_for_a_replication_role_that_owns_the_table() {
    const PW: &str = "owner-pw-7f3a";
    create_role("admin_owner", PW, "REPLICATION").await;
    let tc = TestCase::new("admin_owner").await;
    let db = servers().sql().await;
    db.batch_execute(&format!("ALTER TABLE {} OWNER TO admin_owner", tc.table))
        .await
        .unwrap();
    let cfg = config_file(&config_as(&tc, "admin_owner", PW));

    // Creating a publication also needs CREATE on the database, which PUBLIC lacks.
    let out = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    out.assert_no_secret(&[PW]);
    assert!(
        out.item("publication admin_owner")
            .contains("run GRANT CREATE ON DATABASE postgres TO admin_owner;"),
        "{out}"
    );
    assert!(out.stderr.contains("nothing was changed"), "{out}");
    assert_eq!(objects(&tc).await, (true, false, None));

    db.batch_execute("GRANT CREATE ON DATABASE postgres TO admin_owner")
        .await
        .unwrap();
    let out = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(out.code, Some(0), "{out}");
    out.assert_no_secret(&[PW]);
    assert_eq!(out.item("role admin_owner"), "ok (REPLICATION)", "{out}");
    assert_eq!(
        out.item("table public.outbox_admin_owner"),
        "ok (exists)",
        "{out}"
    );
    assert_eq!(out.item("publication admin_owner"), "created", "{out}");
    assert_eq!(out.item("slot admin_owner"), "created", "{out}");
    assert_eq!(objects(&tc).await, (true, true, Some("pgoutput".into())));
    drop_slot(&tc).await;
}

#[tokio::test]
async fn init_as_a_role_without_replication_exits_2_with_the_statements_to_run() {
    const PW: &str = "norepl-pw-9c1e";
    create_role("admin_norepl", PW, "NOREPLICATION").await;
    let tc = TestCase::new("admin_norepl").await;
    let cfg = config_file(&config_as(&tc, "admin_norepl", PW));
    let out = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    out.assert_no_secret(&[PW]);
    assert!(
        out.item("role admin_norepl")
            .contains("run ALTER ROLE admin_norepl REPLICATION; as a superuser"),
        "{out}"
    );
    assert!(
        out.item("table public.outbox_admin_norepl")
            .contains("run GRANT SELECT ON \"public\".\"outbox_admin_norepl\" TO admin_norepl;"),
        "{out}"
    );
    assert!(
        out.item("publication admin_norepl")
            .starts_with("error: publication \"admin_norepl\" does not exist and"),
        "{out}"
    );
    assert_eq!(out.item("slot admin_norepl"), "would create", "{out}");
    assert!(
        out.item("state tables state_admin_norepl")
            .contains("run `outbox-relay init` as a role with CREATE on the database"),
        "{out}"
    );
    assert!(
        out.stderr.contains("4 checks failed; nothing was changed"),
        "{out}"
    );
    assert_eq!(objects(&tc).await, (true, false, None));

    // Bad credentials are a configuration problem, reported without the secret.
    let cfg = config_file(&config_as(&tc, "admin_norepl", "wrong-pw-4d2b"));
    for command in ["init", "status"] {
        let out = relay_cli(&[command], cfg.path()).await;
        assert_eq!(out.code, Some(2), "{out}");
        assert!(out.stdout.is_empty(), "{out}");
        assert!(
            out.stderr
                .contains("password authentication failed for user \"admin_norepl\""),
            "{out}"
        );
        out.assert_no_secret(&["wrong-pw-4d2b", PW]);
    }
}

#[tokio::test]
async fn status_reports_the_slot_as_aligned_text_and_as_json() {
    let tc = TestCase::new("admin_status").await;
    let cfg = config_file(&tc.config_text(&servers().brokers, ""));
    let init = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(init.code, Some(0), "{init}");
    let db = servers().sql().await;
    db.batch_execute(&format!(
        "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload)
         SELECT 'order', 'o-' || i, 'OrderPlaced', '{{}}' FROM generate_series(1, 50) i",
        tc.table
    ))
    .await
    .unwrap();

    let out = relay_cli(&["status"], cfg.path()).await;
    println!("$ outbox-relay status --config FILE\n{out}");
    assert_eq!(out.code, Some(0), "{out}");
    out.assert_no_secret(&[]);
    let confirmed = tc.confirmed().await;
    assert_eq!(out.item("slot"), "admin_status", "{out}");
    assert_eq!(out.item("active"), "no", "{out}");
    assert_eq!(out.item("active_pid"), "-", "{out}");
    assert_eq!(
        out.item("confirmed_flush_lsn"),
        confirmed.to_string(),
        "{out}"
    );
    assert!(out.item("restart_lsn").parse::<Lsn>().is_ok(), "{out}");
    assert_eq!(out.item("wal_status"), "reserved", "{out}");
    assert_eq!(out.item("publication"), "admin_status", "{out}");
    assert_eq!(
        out.item("publication_tables"),
        "public.outbox_admin_status",
        "{out}"
    );
    let first_number =
        |label: &str| -> u64 { out.item(label).split(' ').next().unwrap().parse().unwrap() };
    assert!(first_number("retained_wal_bytes") > 0, "{out}");
    assert!(
        first_number("lag_bytes") > 0,
        "rows were written after the slot's position\n{out}"
    );
    // Values start in one column.
    let columns: Vec<usize> = out
        .stdout
        .lines()
        .map(|l| l.len() - l.split_once("  ").unwrap().1.trim_start().len())
        .collect();
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{out}");

    let out = relay_cli(&["status", "--json"], cfg.path()).await;
    println!("$ outbox-relay status --json --config FILE\n{out}");
    assert_eq!(out.code, Some(0), "{out}");
    out.assert_no_secret(&[]);
    assert_eq!(out.stdout.lines().count(), 1, "one JSON object\n{out}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["slot"], "admin_status");
    assert_eq!(json["slot_exists"], true);
    assert_eq!(json["active"], false);
    assert_eq!(json["confirmed_flush_lsn"], confirmed.to_string());
    assert_eq!(json["wal_status"], "reserved");
    let current: Lsn = json["current_wal_lsn"].as_str().unwrap().parse().unwrap();
    let restart: Lsn = json["restart_lsn"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        json["retained_wal_bytes"].as_u64(),
        Some(current.bytes_since(restart))
    );
    assert_eq!(
        json["lag_bytes"].as_u64(),
        Some(current.bytes_since(confirmed))
    );
    assert_eq!(json["publication_tables"][0], "public.outbox_admin_status");
    drop_slot(&tc).await;
}

#[tokio::test]
async fn status_of_a_missing_slot_exits_1_and_says_how_to_create_it() {
    let tc = without_table("admin_nostatus");
    let cfg = config_file(&tc.config_text(&servers().brokers, ""));
    for args in [&["status"][..], &["status", "--json"]] {
        let out = relay_cli(args, cfg.path()).await;
        assert_eq!(out.code, Some(1), "{out}");
        out.assert_no_secret(&[]);
        assert_eq!(
            out.stderr.trim_end(),
            format!(
                "outbox-relay: replication slot \"admin_nostatus\" does not exist; create it with: outbox-relay init --config {}",
                cfg.path().display()
            ),
            "{out}"
        );
        if args.len() == 2 {
            let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(json["slot_exists"], false, "{out}");
            assert!(json["current_wal_lsn"].as_str().unwrap().contains('/'));
        } else {
            assert_eq!(out.item("slot"), "admin_nostatus (missing)", "{out}");
            assert_eq!(out.item("publication"), "admin_nostatus (missing)", "{out}");
        }
    }
}

/// The README's least-privilege setup: a REPLICATION role with SELECT on the
/// outbox, a publication and slot created for it, and a schema of its own for
/// the state tables. `init` creates only those tables; the relay then streams.
#[tokio::test]
async fn the_relay_runs_as_a_least_privilege_role() {
    const PW: &str = "lp-pw-31c8";
    create_role("admin_lp", PW, "REPLICATION").await;
    let tc = TestCase::new("admin_lp").await;
    let db = servers().sql().await;
    let t = &tc.table;
    // One statement per call: a slot cannot be created in a transaction that wrote.
    for sql in [
        format!("GRANT SELECT ON public.{t} TO admin_lp"),
        format!("CREATE PUBLICATION admin_lp FOR TABLE public.{t} WITH (publish = 'insert')"),
        "SELECT pg_create_logical_replication_slot('admin_lp', 'pgoutput')".into(),
        "CREATE SCHEMA state_admin_lp AUTHORIZATION admin_lp".into(),
    ] {
        db.batch_execute(&sql).await.unwrap();
    }
    let text = config_as(&tc, "admin_lp", PW).replace(
        "status_interval_ms = 200\n",
        "status_interval_ms = 200\ncreate_missing = false\n",
    );
    let cfg = config_file(&text);
    let out = relay_cli(&["init"], cfg.path()).await;
    assert_eq!(out.code, Some(0), "{out}");
    out.assert_no_secret(&[PW]);
    assert_eq!(out.item("role admin_lp"), "ok (REPLICATION)", "{out}");
    assert_eq!(out.item("state tables state_admin_lp"), "created", "{out}");
    assert!(out.item("slot admin_lp").starts_with("ok"), "{out}");

    let config = outbox_relay::config::Config::from_toml(&text, Path::new("t"), |_| None).unwrap();
    let running = start_relay(config).await;
    insert_rows(&db, &tc.table, "order", 0, 3).await;
    let brokers = servers().brokers.clone();
    let topic = tc.topic("order");
    let got = tokio::task::spawn_blocking(move || consume_all(&brokers, &[topic], 3))
        .await
        .unwrap();
    assert_eq!(got.len(), 3, "{got:?}");
    running.stop().await.unwrap();
    let stored: Option<String> = db
        .query_opt(
            "SELECT acked_lsn::text FROM state_admin_lp.checkpoint WHERE slot_name = 'admin_lp'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0));
    assert!(
        stored.is_some(),
        "the relay stored its checkpoint as that role"
    );
    drop_slot(&tc).await;
}
