//! deploy/k8s: a hot-standby pair whose Deployment, ConfigMap, Secret, Service and
//! ServiceMonitor refer to each other correctly.

use std::path::Path;

use serde_norway::Value;

use crate::{deploy, str_at, yaml, yaml_docs, CONFIG_PATH, METRICS_PORT};

fn k8s_object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let mut found = objects.iter().filter(|o| o["kind"].as_str() == Some(kind));
    let object = found
        .next()
        .unwrap_or_else(|| panic!("deploy/k8s has no {kind}"));
    assert!(
        found.next().is_none(),
        "deploy/k8s has more than one {kind}"
    );
    object
}

/// Every `key: value` of `subset` is in `set` (label selectors).
fn labels_match(subset: &Value, set: &Value) -> bool {
    let subset = subset.as_mapping().expect("labels");
    !subset.is_empty() && subset.iter().all(|(k, v)| set.get(k) == Some(v))
}

#[test]
fn kubernetes_runs_a_hot_standby_pair_with_probes() {
    let dir = deploy().join("k8s");
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        let path = dir.join(resource.as_str().unwrap());
        assert!(
            path.exists(),
            "kustomization lists {} which does not exist",
            path.display()
        );
        objects.extend(yaml_docs(&path));
    }
    objects.extend(yaml_docs(&dir.join("secret.example.yaml")));

    let deployment = k8s_object(&objects, "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(
        spec["replicas"].as_u64(),
        Some(2),
        "one streams, one stands by"
    );
    let pod = &spec["template"]["spec"];
    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(str_at(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
    assert_eq!(str_at(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            str_at(c, &[probe, "httpGet", "port"]),
            "metrics",
            "{probe} port"
        );
    }
    let port = &c["ports"].as_sequence().unwrap()[0];
    assert_eq!(
        (port["name"].as_str(), port["containerPort"].as_u64()),
        (Some("metrics"), Some(METRICS_PORT))
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    assert!(c["resources"]["requests"].is_mapping() && c["resources"]["limits"].is_mapping());
    let args = serde_norway::to_string(&c["args"]).unwrap();
    assert!(
        args.contains(CONFIG_PATH),
        "container args do not name {CONFIG_PATH}: {args}"
    );

    // The config volume is the ConfigMap, mounted where the args point.
    let configmap = k8s_object(&objects, "ConfigMap");
    let mount = &c["volumeMounts"].as_sequence().unwrap()[0];
    assert_eq!(
        Path::new(str_at(mount, &["mountPath"])).join("relay.toml"),
        Path::new(CONFIG_PATH)
    );
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    assert!(configmap["data"]["relay.toml"].is_string());

    // The password comes from the Secret the example shows.
    let secret = k8s_object(&objects, "Secret");
    let env = c["env"].as_sequence().unwrap();
    let url = env
        .iter()
        .find(|e| e["name"].as_str() == Some("OUTBOX_RELAY_POSTGRES_URL"))
        .expect("OUTBOX_RELAY_POSTGRES_URL");
    let key_ref = &url["valueFrom"]["secretKeyRef"];
    assert_eq!(key_ref["name"], secret["metadata"]["name"]);
    assert!(
        secret["stringData"][str_at(key_ref, &["key"])].is_string(),
        "secret lacks the referenced key"
    );

    // Service selects the pods and exposes the metrics port; the ServiceMonitor selects the Service.
    let service = k8s_object(&objects, "Service");
    let labels = &spec["template"]["metadata"]["labels"];
    assert!(
        labels_match(&service["spec"]["selector"], labels),
        "Service does not select the pods"
    );
    assert!(
        labels_match(&spec["selector"]["matchLabels"], labels),
        "Deployment selector misses its pods"
    );
    let budget = k8s_object(&objects, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["minAvailable"].as_u64(), Some(1));
    assert!(
        labels_match(&budget["spec"]["selector"]["matchLabels"], labels),
        "the PodDisruptionBudget does not select the pods"
    );
    let service_port = &service["spec"]["ports"].as_sequence().unwrap()[0];
    assert_eq!(
        (service_port["name"].as_str(), service_port["port"].as_u64()),
        (Some("metrics"), Some(METRICS_PORT))
    );
    let monitor = k8s_object(&objects, "ServiceMonitor");
    assert_eq!(str_at(monitor, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert!(labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    let endpoint = &monitor["spec"]["endpoints"].as_sequence().unwrap()[0];
    assert_eq!(
        (str_at(endpoint, &["port"]), str_at(endpoint, &["path"])),
        ("metrics", "/metrics")
    );
}

#[test]
fn the_sharded_statefulset_gives_every_shard_two_pods_from_the_pod_name() {
    let dir = deploy().join("k8s-sharded");
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_sequence().expect("resources") {
        objects.extend(yaml_docs(&dir.join(resource.as_str().unwrap())));
    }
    let set = k8s_object(&objects, "StatefulSet");
    let configmap = k8s_object(&objects, "ConfigMap");
    let service = k8s_object(&objects, "Service");
    assert_eq!(set["spec"]["serviceName"], service["metadata"]["name"]);
    assert_eq!(service["spec"]["clusterIP"].as_str(), Some("None"));
    let labels = &set["spec"]["template"]["metadata"]["labels"];
    assert!(labels_match(&service["spec"]["selector"], labels));
    assert!(labels_match(
        &k8s_object(&objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        labels
    ));
    let c = &set["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()[0];
    let index = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("OUTBOX_RELAY_SHARD_INDEX"))
        .expect("OUTBOX_RELAY_SHARD_INDEX");
    assert_eq!(
        str_at(index, &["valueFrom", "fieldRef", "fieldPath"]),
        "metadata.name"
    );
    let volume = &set["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()[0];
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);

    // Each pod's name gives its shard; every shard gets two pods (one stands by).
    let text = str_at(configmap, &["data", "relay.toml"]);
    let name = str_at(set, &["metadata", "name"]);
    let replicas = set["spec"]["replicas"].as_u64().unwrap() as u32;
    let mut pods_per_shard = std::collections::BTreeMap::new();
    let mut count = 0;
    for ordinal in 0..replicas {
        let pod = format!("{name}-{ordinal}");
        let cfg = outbox_relay::config::Config::from_toml(text, Path::new("relay.toml"), |k| {
            (k == "OUTBOX_RELAY_SHARD_INDEX").then(|| pod.clone())
        })
        .unwrap_or_else(|e| panic!("{pod}: {e}"));
        count = cfg.shard.count;
        *pods_per_shard.entry(cfg.shard.index).or_insert(0) += 1;
        assert_eq!(
            cfg.postgres.slot,
            format!("outbox_relay_shard{}of{count}", ordinal % count)
        );
    }
    assert!(count > 1, "the example is sharded");
    assert_eq!(pods_per_shard.len() as u32, count, "every shard has pods");
    assert!(
        pods_per_shard.values().all(|n| *n == 2),
        "{pods_per_shard:?}"
    );
}
