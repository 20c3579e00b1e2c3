//! Bad input through the real binary, one table: each case is a config (and a
//! server state) the relay must refuse with one line on stderr that names the
//! problem and the fix, the documented exit code, and no password. Options
//! clap rejects (an unparsable LSN) print clap's one `error: ` line instead of
//! an `outbox-relay: ` line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

struct Case {
    name: &'static str,
    /// `check-config`, `run`, `status` or `replay`, then its options (before `--config`).
    command: &'static [&'static str],
    config: String,
    code: i32,
    /// What went wrong, as the error line says it.
    problem: String,
    /// What to do about it.
    fix: &'static str,
}

fn spawn(dir: &Path, case: &Case) -> (Child, PathBuf) {
    let config = dir.join(format!("{}.toml", case.name));
    std::fs::write(&config, &case.config).unwrap();
    let log = dir.join(format!("{}.log", case.name));
    let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(case.command)
        .args(["--config", config.to_str().unwrap()])
        .env_remove("OUTBOX_RELAY_POSTGRES_URL")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_one_line_naming_problem_and_fix() {
    let s = servers();
    // wal_level=replica needs a server of its own; it starts while the rest runs.
    let replica = tokio::task::spawn_blocking(|| {
        PgCluster::start_with(ClusterOptions {
            settings: vec!["wal_level=replica".into()],
            ..Default::default()
        })
    });
    let tc = TestCase::new("bad_input").await;
    create_role("bad_input_norepl", "norepl-pw-7", false, false).await;
    let base = tc.config_text(&s.brokers, "");
    let with_url = |url: &str| base.replace(&s.url(), url);
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let minimal = format!("[postgres]\nurl = \"{}\"\n", s.url());
    let secrets = [PASSWORD, "wrong-pw-5", "norepl-pw-7"];

    let mut cases = vec![
        Case {
            name: "wrong_type",
            command: &["check-config"],
            config: format!("{minimal}status_interval_ms = \"fast\"\n"),
            code: 2,
            problem: "invalid type: string \"fast\"".into(),
            fix: "expected u64",
        },
        Case {
            name: "unknown_key",
            command: &["check-config"],
            config: format!("{minimal}slott = \"x\"\n"),
            code: 2,
            problem: "unknown field `slott`".into(),
            fix: "expected one of `url`",
        },
        Case {
            name: "unknown_preset",
            command: &["check-config"],
            config: format!("{minimal}[outbox]\npreset = \"debezium2\"\n"),
            code: 2,
            problem: "unknown variant `debezium2`".into(),
            fix: "expected `debezium`",
        },
        Case {
            name: "envelope_placement",
            command: &["check-config"],
            config: format!("{minimal}[outbox]\nadditional_placement = [\"type:envelope:eventType\"]\n"),
            code: 2,
            problem: "invalid outbox.additional_placement: \"type:envelope:eventType\"".into(),
            fix: "place the column as a header",
        },
        Case {
            name: "unreachable_host",
            // `run` retries an unreachable server for ever; `status` reports it.
            command: &["status"],
            config: with_url(&format!(
                "postgresql://postgres:{PASSWORD}@127.0.0.1:{closed_port}/postgres"
            )),
            code: 1,
            problem: format!("cannot connect to PostgreSQL at 127.0.0.1:{closed_port}"),
            fix: "check that the server runs and listens there",
        },
        Case {
            name: "wrong_password",
            command: &["run"],
            config: with_url(&s.url_for("postgres", "wrong-pw-5")),
            code: 2,
            problem: "password authentication failed for user \"postgres\"".into(),
            fix: "check the password in postgres.url",
        },
        Case {
            name: "missing_table",
            command: &["run"],
            config: base.replace(&format!("public.{}", tc.table), "public.no_such_outbox"),
            code: 2,
            problem: "table \"public.no_such_outbox\" does not exist".into(),
            fix: "create it with sql/001_outbox.sql or set outbox.table",
        },
        Case {
            name: "missing_publication",
            command: &["run"],
            config: base.replace(
                "status_interval_ms = 200\n",
                "status_interval_ms = 200\ncreate_missing = false\n",
            ),
            code: 2,
            problem:
                "publication \"bad_input\" does not exist and postgres.create_missing is false"
                    .into(),
            fix: "run CREATE PUBLICATION \"bad_input\" FOR TABLE",
        },
        Case {
            name: "role_without_replication",
            command: &["run"],
            config: with_url(&s.url_for("bad_input_norepl", "norepl-pw-7")),
            code: 2,
            problem: "role \"bad_input_norepl\" lacks the REPLICATION attribute".into(),
            fix: "run ALTER ROLE bad_input_norepl REPLICATION;",
        },
        Case {
            name: "start_lsn_not_an_lsn",
            command: &["run", "--start-lsn", "nonsense"],
            config: base.clone(),
            code: 2,
            problem: "invalid value 'nonsense' for '--start-lsn <LSN>': invalid LSN \"nonsense\""
                .into(),
            fix: "expected the form X/X",
        },
        Case {
            name: "from_lsn_three_parts",
            command: &["replay", "--from-lsn", "1/2/3"],
            config: base.clone(),
            code: 2,
            problem: "invalid value '1/2/3' for '--from-lsn <LSN>': invalid LSN \"1/2/3\"".into(),
            fix: "expected the form X/X",
        },
        Case {
            name: "to_lsn_too_wide",
            command: &["replay", "--from-lsn", "0/0", "--to-lsn", "0/123456789"],
            config: base.clone(),
            code: 2,
            problem: "invalid value '0/123456789' for '--to-lsn <LSN>'".into(),
            fix: "expected the form X/X",
        },
        Case {
            name: "host_port_count_mismatch",
            command: &["check-config"],
            config: with_url(&format!(
                "host=127.0.0.1,127.0.0.2 port=5432,5433,5434 user=postgres password={PASSWORD} dbname=postgres"
            )),
            code: 2,
            problem: "names 2 host(s) but 3 ports".into(),
            fix: "give one port for all hosts or one per host",
        },
        Case {
            name: "bad_target_session_attrs",
            command: &["check-config"],
            config: with_url(&format!("{}?target_session_attrs=leader", s.url())),
            code: 2,
            problem: "target_session_attrs=\"leader\" is not one of".into(),
            fix: "read-write, read-only, primary, standby, prefer-standby",
        },
        Case {
            // The shared server is PostgreSQL 15.
            name: "failover_slot_on_before_17",
            command: &["run"],
            config: base.replace(
                "status_interval_ms = 200\n",
                "status_interval_ms = 200\nfailover_slot = \"on\"\n",
            ),
            code: 2,
            problem: "postgres.failover_slot = \"on\" needs PostgreSQL 17 or later (this server is 15."
                .into(),
            fix: "set it to \"auto\" or \"off\"",
        },
        Case {
            // Only a standby is reachable while target_session_attrs wants the primary: retried, and status says why.
            name: "no_primary_among_the_hosts",
            command: &["status"],
            config: with_url(&format!(
                "{}?target_session_attrs=standby",
                s.url()
            )),
            code: 1,
            problem: "no host in postgres.url could be used with target_session_attrs=standby".into(),
            fix: "is a read-write primary",
        },
    ];
    let replica = replica.await.unwrap();
    replica
        .sql()
        .await
        .batch_execute(&format!("CREATE TABLE public.{} (id int)", tc.table))
        .await
        .unwrap();
    cases.push(Case {
        name: "wal_level_replica",
        command: &["run"],
        config: with_url(&replica.url()),
        code: 2,
        problem: "wal_level is \"replica\", logical replication needs \"logical\"".into(),
        fix: "run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL",
    });

    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut running: Vec<_> = cases.iter().map(|c| (c, spawn(dir.path(), c))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = Vec::new();
    for (case, (child, log)) in &mut running {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stderr = std::fs::read_to_string(log).unwrap();
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("outbox-relay: ") || l.starts_with("error: "))
            .collect();
        let line = errors.first().copied().unwrap_or_default();
        let code = status.and_then(|s| s.code());
        let ok = code == Some(case.code)
            && errors.len() == 1
            && line.contains(&case.problem)
            && line.contains(case.fix)
            && !secrets.iter().any(|p| stderr.contains(p));
        if !ok {
            failures.push(format!(
                "{}: exit {:?} (want {}), want {:?} and {:?} in one line, no password; stderr:\n{stderr}",
                case.name, code, case.code, case.problem, case.fix
            ));
        }
    }
    eprintln!(
        "bad input: {} cases through the binary in {:?}",
        running.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
