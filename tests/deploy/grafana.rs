//! deploy/grafana: the dashboard queries exported metrics with valid PromQL, on the
//! datasource and from the directory that provisioning sets up.

use std::collections::BTreeSet;

use crate::{assert_only_exported, deploy, json, metric_names, promtool, read, str_at, yaml};

#[test]
fn dashboard_uses_only_exported_metrics_and_covers_the_relay() {
    let dashboard_text = read(&deploy().join("grafana/dashboards/outbox-relay.json"));
    assert_only_exported(
        "deploy/grafana/dashboards/outbox-relay.json",
        &metric_names(&dashboard_text),
    );
    let in_exprs = metric_names(&dashboard_exprs().join("\n"));
    for needed in [
        "outbox_relay_events_received_total",
        "outbox_relay_events_acked_total",
        "outbox_relay_events_failed_total",
        "outbox_relay_delivery_latency_seconds_bucket",
        "outbox_relay_replication_lag_bytes",
        "outbox_relay_slot_retained_wal_bytes",
        "outbox_relay_active",
        "outbox_relay_records_in_flight",
        "outbox_relay_producer_queue_depth",
        "outbox_relay_broker_rtt_seconds",
        "outbox_relay_reconnects_total",
        "outbox_relay_errors_total",
    ] {
        assert!(
            in_exprs.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn dashboard_exprs() -> Vec<String> {
    let mut exprs = Vec::new();
    collect_exprs(
        &json(&deploy().join("grafana/dashboards/outbox-relay.json")),
        &mut exprs,
    );
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    exprs
}

#[test]
fn dashboard_queries_are_valid_promql_on_the_provisioned_datasource() {
    let dashboard = json(&deploy().join("grafana/dashboards/outbox-relay.json"));
    assert_eq!(dashboard["uid"], "outbox-relay");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"));
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<_> = panels
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    for panel in panels {
        let uid = panel["datasource"]["uid"].as_str().unwrap_or_default();
        assert!(
            uid == "${DS_PROMETHEUS}" || uid == "prometheus",
            "panel {} uses datasource {uid:?}",
            panel["title"]
        );
    }

    // The provisioned datasource is the variable's default, and the provider
    // reads the directory compose mounts the dashboards into.
    let datasource = yaml(&deploy().join("grafana/provisioning/datasources/prometheus.yml"));
    assert_eq!(
        str_at(&datasource["datasources"][0], &["uid"]),
        "prometheus"
    );
    let provider = yaml(&deploy().join("grafana/provisioning/dashboards/outbox-relay.yml"));
    let path = str_at(&provider["providers"][0], &["options", "path"]);
    let grafana =
        serde_norway::to_string(&yaml(&deploy().join("docker-compose.yml"))["services"]["grafana"])
            .unwrap();
    assert!(
        grafana.contains(&format!("./grafana/dashboards:{path}")),
        "compose does not mount the dashboards at {path}"
    );

    // promtool checks PromQL inside rule files, so wrap each query in a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m");
        let expr = serde_json::to_string(&expr).unwrap(); // a JSON string is a YAML string
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {expr}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.rules.yml"), rules).unwrap();
    promtool(&["check", "rules", "dashboard.rules.yml"], dir.path());
}
