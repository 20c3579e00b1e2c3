//! The binary's exit codes and messages for usage and configuration errors.

use std::process::Command;

fn relay(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env_remove("OUTBOX_RELAY_POSTGRES_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn help_documents_commands_and_exit_codes() {
    let (code, out, _) = relay(&["--help"]);
    assert_eq!(code, Some(0));
    for needle in [
        "run",
        "check-config",
        "Exit codes: 0 clean shutdown, 1 runtime failure",
        "OUTBOX_RELAY_POSTGRES_URL",
    ] {
        assert!(out.contains(needle), "--help lacks {needle:?}:\n{out}");
    }
    let (code, out, _) = relay(&["run", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("--config <FILE>"), "{out}");
}

#[test]
fn bad_usage_exits_2() {
    let (code, _, err) = relay(&["frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unrecognized subcommand"), "{err}");
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let (code, out, err) = relay(&[
        "check-config",
        "--config",
        concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/relay.example.toml"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (slot \"outbox_relay\""), "{out}");
}

#[test]
fn config_errors_exit_2_with_one_line_naming_the_key() {
    let cases = [
        ("[postgres]\nurl = \"postgresql://u:hunter2@db/app\"\nslot_name = \"x\"\n", "unknown field `slot_name`"),
        ("[postgres]\nurl = \"postgresql://u:hunter2@db:99999/app\"\n", "invalid postgres.url"),
        ("[postgres]\n", "postgres.url is missing"),
        ("[postgres]\nurl = \"postgresql://u:hunter2@db/app\"\n[kafka.properties]\n\"enable.idempotence\" = false\n", "remove kafka.properties"),
    ];
    for (text, expected) in cases {
        let f = config(text);
        let (code, _, err) = relay(&["check-config", "--config", f.path().to_str().unwrap()]);
        assert_eq!(code, Some(2), "{text}: {err}");
        assert!(err.contains(expected), "{text}: {err}");
        assert!(!err.contains("hunter2"), "password printed: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    let (code, _, err) = relay(&["run", "--config", "/nonexistent/relay.toml"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("cannot read config file \"/nonexistent/relay.toml\""),
        "{err}"
    );
}

#[test]
fn json_logs_never_contain_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = config(&format!(
        "[postgres]\nurl = \"postgresql://relay:hunter2@127.0.0.1:{port}/app\"\n[relay]\nreconnect_backoff_min_ms = 50\nreconnect_backoff_max_ms = 100\n[metrics]\nlisten = \"\"\n"
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args([
            "--log-format",
            "json",
            "run",
            "--config",
            f.path().to_str().unwrap(),
        ])
        .env("RUST_LOG", "debug")
        .env_remove("OUTBOX_RELAY_POSTGRES_URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "SIGTERM while reconnecting is a clean stop"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("session failed; reconnecting")),
        "{err}"
    );
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some(), "{l}");
    }
    assert!(!err.contains("hunter2"), "password in the logs:\n{err}");
}
