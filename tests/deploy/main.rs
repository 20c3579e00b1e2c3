//! The deploy bundle under `deploy/`, checked without PostgreSQL, Kafka or a
//! container runtime. This file holds the shared helpers and the check that every
//! YAML, JSON and TOML file parses; one module per part of the bundle:
//!
//! - `compose`: the compose file builds and mounts only paths that exist; the relay
//!   configurations pass `outbox-relay check-config` and serve metrics on all
//!   interfaces.
//! - `kubernetes`: two replicas with /healthz and /readyz probes; the Deployment,
//!   ConfigMap, Secret, Service and ServiceMonitor refer to each other.
//! - `prometheus`: promtool accepts the config and the rules; the rules use only
//!   exported metrics and fire on the failures they describe
//!   (`tests/fixtures/prometheus/alerts.test.yml`).
//! - `grafana`: the dashboard queries only exported metrics with valid PromQL.
//! - `image_and_systemd`: the Dockerfile and the unit run the same command.
//!
//! Needs `promtool` (Debian package `prometheus`, installed by
//! `deploy/dev/install-deps.sh`) and fails when it is missing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_norway::Value;

mod compose;
mod grafana;
mod image_and_systemd;
mod kubernetes;
mod prometheus;

/// Every metric the relay exports (names are final; labels in the comments).
const METRICS: &[&str] = &[
    "outbox_relay_events_received_total", // {topic}
    "outbox_relay_events_produced_total", // {topic}
    "outbox_relay_events_acked_total",    // {topic}
    "outbox_relay_events_failed_total",
    "outbox_relay_events_dead_lettered_total", // {reason}   // {topic}
    "outbox_relay_changes_ignored_total",      // {kind}
    "outbox_relay_transactions_received_total",
    "outbox_relay_transactions_confirmed_total",
    "outbox_relay_reconnects_total",
    "outbox_relay_errors_total",             // {kind}
    "outbox_relay_delivery_latency_seconds", // histogram
    "outbox_relay_received_lsn",
    "outbox_relay_confirmed_lsn",
    "outbox_relay_server_wal_end_lsn",
    "outbox_relay_replication_lag_bytes",
    "outbox_relay_slot_retained_wal_bytes",
    "outbox_relay_slot_active",
    "outbox_relay_slot_wal_status", // {status}
    "outbox_relay_records_in_flight",
    "outbox_relay_producer_queue_depth",
    "outbox_relay_broker_rtt_seconds", // {broker, stat}
    "outbox_relay_active",
    "outbox_relay_build_info", // {version}
];
const HISTOGRAMS: &[&str] = &["outbox_relay_delivery_latency_seconds"];

/// Where the Dockerfile, the compose file, the Deployment and the unit expect the config.
const CONFIG_PATH: &str = "/etc/outbox-relay/relay.toml";
const METRICS_PORT: u64 = 9187;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .collect()
}

fn yaml(path: &Path) -> Value {
    let mut docs = yaml_docs(path);
    assert_eq!(
        docs.len(),
        1,
        "{} should hold one YAML document",
        path.display()
    );
    docs.remove(0)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
    {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn deploy_files(extensions: &[&str]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files_under(&deploy(), &mut all);
    all.retain(|p| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e))
    });
    all.sort();
    all
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{} is not a string in {value:?}", path.join(".")))
}

/// The `outbox_relay_*` tokens in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("outbox_relay_") {
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let len = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(text.len() - start);
        names.insert(text[start..start + len].to_string());
    }
    names
}

fn is_exported(name: &str) -> bool {
    METRICS.contains(&name)
        || HISTOGRAMS.iter().any(|h| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix) == Some(h))
        })
}

fn assert_only_exported(file: &str, names: &BTreeSet<String>) {
    let unknown: Vec<_> = names.iter().filter(|n| !is_exported(n)).collect();
    assert!(
        unknown.is_empty(),
        "{file} uses metrics the relay does not export: {unknown:?}; known: {METRICS:?}"
    );
}

/// Runs promtool in the repository root; fails (never skips) when it is missing.
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}); install it with deploy/dev/install-deps.sh \
             or `apt-get install prometheus`"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    println!("$ promtool {}\n{text}", args.join(" "));
    text
}

#[test]
fn every_yaml_json_and_toml_file_parses() {
    let yamls = deploy_files(&["yml", "yaml"]);
    for path in &yamls {
        assert!(!yaml_docs(path).is_empty(), "{} is empty", path.display());
    }
    let jsons = deploy_files(&["json"]);
    for path in &jsons {
        json(path);
    }
    for path in deploy_files(&["toml"]) {
        toml::from_str::<toml::Table>(&read(&path))
            .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()));
    }
    // Guard against a walk that silently finds nothing.
    for expected in [
        "docker-compose.yml",
        "k8s/deployment.yaml",
        "prometheus/alerts.yml",
        "grafana/dashboards/outbox-relay.json",
    ] {
        assert!(
            yamls.iter().chain(&jsons).any(|p| p.ends_with(expected)),
            "deploy/{expected} is missing"
        );
    }
}
