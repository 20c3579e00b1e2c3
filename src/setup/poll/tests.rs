//! Unit tests of `setup::poll`.
use std::path::Path;

use super::*;

fn cfg(poll: &str) -> Config {
    let text = format!(
        "[postgres]\nurl = \"postgresql://relay@db/app\"\n[source]\nkind = \"poll\"\n[poll]\n{poll}"
    );
    Config::from_toml(&text, Path::new("relay.toml"), |_| None).unwrap()
}

fn info(columns: &[(&str, u32)]) -> TableInfo {
    TableInfo {
        oid: 1,
        owner_sql: "app".into(),
        owned: true,
        columns: columns
            .iter()
            .map(|(n, t)| Column {
                is_key: false,
                name: n.to_string(),
                type_oid: *t,
                type_modifier: -1,
            })
            .collect(),
        select: true,
        delete: true,
        update: true,
        sequence: Some(("public.outbox_relay_seq_seq".into(), 1)),
        indexes: vec![IndexInfo {
            unique: true,
            partial: false,
            on_unsent: false,
        }],
        trigger: false,
    }
}

fn states(checks: &[(String, Check)]) -> Vec<String> {
    checks
        .iter()
        .map(|(l, c)| match c {
            Check::Ok(_) => format!("{l}: ok"),
            Check::Create(sql) => format!("{l}: {}", sql.join("; ")),
            Check::Warn(_) => format!("{l}: warn"),
            Check::Problem(e) => format!("{l}: {e}"),
        })
        .collect()
}

#[test]
fn a_ready_table_passes_and_a_bare_one_gets_column_and_index() {
    let c = cfg("");
    let ready = info(&[("id", 2950), ("relay_seq", INT8)]);
    assert_eq!(
        states(&checks(Some(&ready), &c, "relay")),
        ["privileges: ok", "order column relay_seq: ok", "index: ok"]
    );
    let mut bare = info(&[("id", 2950)]);
    bare.sequence = None;
    bare.indexes.clear();
    assert_eq!(
        states(&checks(Some(&bare), &c, "relay")),
        [
            "privileges: ok",
            "order column relay_seq: ALTER TABLE \"public\".\"outbox\" ADD COLUMN IF NOT EXISTS \"relay_seq\" bigint GENERATED ALWAYS AS IDENTITY",
            "index: CREATE UNIQUE INDEX IF NOT EXISTS \"outbox_relay_seq_poll\" ON \"public\".\"outbox\" (\"relay_seq\")",
        ]
    );
}

#[test]
fn mark_mode_wants_a_partial_index_and_the_sent_column() {
    let c = cfg("after_send = \"mark\"\nnotify = true\n");
    let t = info(&[("relay_seq", INT8)]);
    let s = states(&checks(Some(&t), &c, "relay"));
    assert_eq!(s[2], "sent column sent_at: ALTER TABLE \"public\".\"outbox\" ADD COLUMN IF NOT EXISTS \"sent_at\" timestamptz");
    assert_eq!(s[3], "index: CREATE UNIQUE INDEX IF NOT EXISTS \"outbox_relay_seq_poll\" ON \"public\".\"outbox\" (\"relay_seq\") WHERE \"sent_at\" IS NULL");
    assert!(
        s[4].starts_with(
            "notify trigger: CREATE OR REPLACE FUNCTION \"public\".\"outbox_relay_poll_notify\"()"
        ),
        "{}",
        s[4]
    );
    assert!(s[4].contains("EXECUTE FUNCTION \"public\".\"outbox_relay_poll_notify\"('outbox_relay_public_outbox')"), "{}", s[4]);
    let mut marked = info(&[("relay_seq", INT8), ("sent_at", TIMESTAMPTZ)]);
    marked.indexes.push(IndexInfo {
        unique: false,
        partial: true,
        on_unsent: true,
    });
    marked.trigger = true;
    assert_eq!(
        states(&checks(Some(&marked), &c, "relay")),
        [
            "privileges: ok",
            "order column relay_seq: ok",
            "sent column sent_at: ok",
            "index: ok",
            "notify trigger: ok"
        ]
    );
}

#[test]
fn problems_say_what_to_run() {
    let c = cfg("");
    let mut t = info(&[("relay_seq", 25)]);
    t.delete = false;
    let s = states(&checks(Some(&t), &c, "relay"));
    assert!(
        s[0].contains("GRANT SELECT, DELETE ON \"public\".\"outbox\" TO relay"),
        "{}",
        s[0]
    );
    assert!(s[1].contains("is not an integer"), "{}", s[1]);
    let mut t = info(&[("relay_seq", INT8)]);
    t.sequence = Some(("public.s".into(), 20));
    t.indexes = vec![IndexInfo {
        unique: false,
        partial: false,
        on_unsent: false,
    }];
    let s = states(&checks(Some(&t), &c, "relay"));
    assert!(s[1].contains("ALTER SEQUENCE public.s CACHE 1"), "{}", s[1]);
    assert!(s[2].contains("no unique index"), "{}", s[2]);
    let mut t = info(&[("id", 2950)]);
    t.owned = false;
    t.indexes.clear();
    let s = states(&checks(Some(&t), &c, "relay"));
    assert!(s[1].contains("owned by app"), "{}", s[1]);
}
