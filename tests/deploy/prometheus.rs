//! deploy/prometheus: promtool accepts the configuration and the rules, the rules
//! use exported metrics only, and each alert fires on the failure it describes.

use crate::{
    assert_only_exported, deploy, metric_names, promtool, read, root, str_at, yaml, METRICS_PORT,
};

#[test]
fn alerts_use_only_exported_metrics_and_say_what_to_do() {
    let alerts_text = read(&deploy().join("prometheus/alerts.yml"));
    let in_alerts = metric_names(&alerts_text);
    assert_only_exported("deploy/prometheus/alerts.yml", &in_alerts);
    for needed in [
        "outbox_relay_slot_retained_wal_bytes",
        "outbox_relay_slot_wal_status",
        "outbox_relay_replication_lag_bytes",
        "outbox_relay_active",
        "outbox_relay_events_failed_total",
        "outbox_relay_delivery_latency_seconds_bucket",
    ] {
        assert!(
            in_alerts.contains(needed),
            "alerts.yml has no rule on {needed}"
        );
    }
    let alerts = yaml(&deploy().join("prometheus/alerts.yml"));
    for group in alerts["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = str_at(rule, &["alert"]);
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation].is_string(),
                    "alert {name} has no {annotation}"
                );
            }
            assert!(
                rule["labels"]["severity"].is_string(),
                "alert {name} has no severity"
            );
        }
    }

    let fixture = read(&root().join("tests/fixtures/prometheus/alerts.test.yml"));
    assert_only_exported(
        "tests/fixtures/prometheus/alerts.test.yml",
        &metric_names(&fixture),
    );
}

#[test]
fn promtool_accepts_the_rules_and_the_config() {
    let rules = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"], &root());
    assert!(rules.contains("SUCCESS"), "{rules}");
    let config = promtool(
        &["check", "config", "deploy/prometheus/prometheus.yml"],
        &root(),
    );
    assert!(
        config.contains("1 rule files found"),
        "prometheus.yml does not load alerts.yml:\n{config}"
    );

    let prometheus = yaml(&deploy().join("prometheus/prometheus.yml"));
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(
        str_at(job, &["job_name"]),
        "outbox-relay",
        "the alerts match job=\"outbox-relay\""
    );
    let target = job["static_configs"][0]["targets"][0].as_str();
    assert_eq!(target, Some(format!("relay:{METRICS_PORT}").as_str()));
}

#[test]
fn alert_rules_fire_on_the_failures_they_describe() {
    // promtool compares annotations verbatim; the scenarios check labels and timing.
    let mut alerts = yaml(&deploy().join("prometheus/alerts.yml"));
    for group in alerts["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            rule.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("alerts.yml"),
        serde_norway::to_string(&alerts).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        root().join("tests/fixtures/prometheus/alerts.test.yml"),
        dir.path().join("alerts.test.yml"),
    )
    .unwrap();
    promtool(&["test", "rules", "alerts.test.yml"], dir.path());
}
