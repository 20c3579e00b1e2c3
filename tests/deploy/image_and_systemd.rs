//! deploy/Dockerfile, .dockerignore and deploy/systemd: the same command, config
//! path and metrics port as the other deployments.

use std::collections::BTreeSet;

use crate::{deploy, read, root, CONFIG_PATH, METRICS_PORT};

#[test]
fn image_unit_and_ignore_file_agree_on_command_user_and_port() {
    let dockerfile = read(&deploy().join("Dockerfile"));
    for needle in [
        "FROM rust:1-bookworm AS builder".to_string(),
        "cargo build --release --locked --bin outbox-relay".to_string(),
        "FROM debian:bookworm-slim".to_string(),
        "USER 10001".to_string(),
        format!("EXPOSE {METRICS_PORT}"),
        r#"ENTRYPOINT ["outbox-relay"]"#.to_string(),
        format!(r#"CMD ["run", "--config", "{CONFIG_PATH}"]"#),
        format!("COPY deploy/relay.container.toml {CONFIG_PATH}"),
    ] {
        assert!(
            dockerfile.contains(&needle),
            "deploy/Dockerfile lacks {needle:?}"
        );
    }
    let ignored: BTreeSet<_> = read(&root().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .map(String::from)
        .collect();
    for entry in ["target", ".local", ".git"] {
        assert!(ignored.contains(entry), ".dockerignore lacks {entry}");
    }

    let unit = read(&deploy().join("systemd/outbox-relay.service"));
    for needle in [
        format!("ExecStart=/usr/local/bin/outbox-relay run --config {CONFIG_PATH}"),
        "RestartPreventExitStatus=2".to_string(),
        "DynamicUser=yes".to_string(),
        "KillSignal=SIGTERM".to_string(),
    ] {
        assert!(
            unit.lines().any(|l| l == needle),
            "the systemd unit lacks {needle:?}"
        );
    }
}
