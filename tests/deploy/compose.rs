//! deploy/docker-compose.yml, and the relay configurations shipped for compose, the
//! ConfigMap and the image, checked by the relay's own `check-config`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_norway::Value;

use crate::{deploy, read, str_at, yaml, CONFIG_PATH, METRICS_PORT};

#[test]
fn compose_builds_and_mounts_only_existing_paths() {
    let compose = yaml(&deploy().join("docker-compose.yml"));
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<_> = services.keys().filter_map(Value::as_str).collect();
    for expected in ["postgres", "kafka", "relay", "prometheus", "grafana"] {
        assert!(
            names.contains(expected),
            "compose lacks service {expected:?}: {names:?}"
        );
    }

    let mut checked = Vec::new();
    let mut check = |service: &str, what: &str, rel: &Path| {
        let path = deploy().join(rel);
        assert!(
            path.exists(),
            "service {service}: {what} {} does not exist (relative to deploy/)",
            rel.display()
        );
        checked.push(rel.to_path_buf());
    };
    for (name, service) in services {
        let name = name.as_str().unwrap();
        match &service["build"] {
            Value::Null => {}
            Value::String(context) => check(name, "build context", Path::new(context)),
            build => {
                let context = Path::new(str_at(build, &["context"]));
                check(name, "build context", context);
                if let Some(dockerfile) = build["dockerfile"].as_str() {
                    check(name, "dockerfile", &context.join(dockerfile));
                }
            }
        }
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = match volume {
                Value::String(short) => short.split(':').next().unwrap().to_string(),
                long if long["type"].as_str() == Some("bind") => {
                    str_at(long, &["source"]).to_string()
                }
                _ => continue,
            };
            // Anything else is a named volume.
            if source.starts_with('.') || source.starts_with('/') {
                check(name, "mount", Path::new(&source));
            }
        }
    }
    assert!(
        checked.len() >= 8,
        "expected the relay build and the config mounts, checked only {checked:?}"
    );

    let relay = &services["relay"];
    let env = serde_norway::to_string(&relay["environment"]).unwrap();
    assert!(
        env.contains("OUTBOX_RELAY_POSTGRES_URL"),
        "relay has no OUTBOX_RELAY_POSTGRES_URL: {env}"
    );
    let mounts = serde_norway::to_string(&relay["volumes"]).unwrap();
    assert!(
        mounts.contains(&format!("./compose/relay.toml:{CONFIG_PATH}")),
        "relay does not mount compose/relay.toml at {CONFIG_PATH}: {mounts}"
    );
    let postgres = serde_norway::to_string(&services["postgres"]["command"]).unwrap();
    assert!(
        postgres.contains("wal_level=logical"),
        "postgres runs without wal_level=logical: {postgres}"
    );
}

/// Runs `outbox-relay check-config` on a shipped configuration (unknown keys, bad
/// values and conflicts fail it) and returns the parsed file. `url` stands in for
/// `OUTBOX_RELAY_POSTGRES_URL` where the file leaves the password-bearing URL out.
fn check_relay_config(file: &str, text: &str, url: Option<&str>) -> toml::Table {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.arg("check-config").arg("--config").arg(&path);
    cmd.env_remove("OUTBOX_RELAY_POSTGRES_URL")
        .env_remove("OUTBOX_RELAY_KAFKA_BROKERS");
    if let Some(url) = url {
        cmd.env("OUTBOX_RELAY_POSTGRES_URL", url);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "outbox-relay check-config rejects {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: toml::Table = toml::from_str(text).unwrap();
    let listen = config["metrics"]["listen"].as_str().unwrap_or_default();
    assert_eq!(
        listen,
        format!("0.0.0.0:{METRICS_PORT}"),
        "{file}: [metrics] listen must leave the container's loopback"
    );
    config
}

#[test]
fn shipped_relay_configs_are_valid_and_serve_metrics_on_all_interfaces() {
    let compose = check_relay_config(
        "deploy/compose/relay.toml",
        &read(&deploy().join("compose/relay.toml")),
        None,
    );
    // The compose relay reaches the broker through its service name.
    let brokers = compose["kafka"]["brokers"].as_str().unwrap();
    let services = yaml(&deploy().join("docker-compose.yml"))["services"].clone();
    let host = brokers.split(':').next().unwrap();
    assert!(
        !services[host].is_null(),
        "kafka.brokers {brokers:?} is not a compose service"
    );

    let configmap = yaml(&deploy().join("k8s/configmap.yaml"));
    check_relay_config(
        "deploy/k8s/configmap.yaml",
        str_at(&configmap, &["data", "relay.toml"]),
        None,
    );
    check_relay_config(
        "deploy/relay.container.toml",
        &read(&deploy().join("relay.container.toml")),
        Some("postgresql://relay@db.invalid:5432/app"),
    );
}
