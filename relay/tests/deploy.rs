//! The files in `deploy/` are accepted by what reads them: `relay.toml` (and the ConfigMap's
//! copy) by the relay's own config loader, and the YAML files parse and say what the docs
//! promise (non-root, one UDP port, /healthz probes, scrape annotations).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use keyway_relay::cli::{parse_args, Cli, Command};
use keyway_relay::Limits;
use serde_norway::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Loads a relay config file exactly as `keyway-relay run --config FILE` would.
fn load(path: &Path) -> keyway_relay::cli::RunArgs {
    let args: Vec<OsString> = vec!["keyway-relay".into(), "run".into(), "--config".into(), path.into()];
    match parse_args(&args).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
        Cli { command: Command::Run(run), .. } => *run,
        other => panic!("{other:?}"),
    }
}

fn yaml_docs(path: &str) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(deploy(path)).unwrap();
    serde_norway::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect()
}

#[test]
fn the_example_relay_toml_is_accepted_and_documents_the_defaults() {
    // Environment variables would beat the file; make sure none is set for the keys we check.
    assert!(std::env::vars().all(|(k, _)| !k.starts_with("KEYWAY_RELAY_")), "unset KEYWAY_RELAY_* first");
    let args = load(&deploy("relay.toml"));
    assert_eq!(args.limits.to_limits(), Limits::default(), "relay.toml must show the default limits");
    assert_eq!(args.listen.port(), 4433);
    assert!(args.metrics_listen.ip().is_loopback());
    assert_eq!(args.key, Path::new("/var/lib/keyway/relay.key"));
    // Every flag of `run` appears in the example, so operators see every option.
    let text = std::fs::read_to_string(deploy("relay.toml")).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let command = <Cli as clap::CommandFactory>::command();
    let run = command.find_subcommand("run").unwrap();
    for arg in run.get_arguments().filter(|a| a.get_env().is_some()) {
        let key = arg.get_long().unwrap().replace('-', "_");
        // An option without a default (node_id) is shown commented out.
        let commented = arg.get_default_values().is_empty() && text.contains(&format!("\n# {key} = "));
        if key != "config" {
            assert!(table.contains_key(&key) || commented, "deploy/relay.toml lacks {key}");
        }
    }
}

#[test]
fn the_kubernetes_manifests_parse_and_probe_healthz() {
    let docs = yaml_docs("k8s/relay.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in ["Namespace", "ConfigMap", "StatefulSet", "Service"] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let sts = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let pod = &sts["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data");
    let udp = docs
        .iter()
        .filter(|d| d["kind"] == "Service")
        .flat_map(|d| d["spec"]["ports"].as_sequence().unwrap().iter())
        .filter(|p| p["protocol"] == "UDP")
        .count();
    assert_eq!(udp, 1, "one UDP port");

    // The ConfigMap's relay.toml is accepted by the relay's loader too.
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, cm["data"]["relay.toml"].as_str().unwrap()).unwrap();
    assert_eq!(load(&path).drain_timeout, std::time::Duration::from_secs(20));
}

#[test]
fn the_compose_file_parses_and_keeps_metrics_on_loopback() {
    let docs = yaml_docs("compose.yaml");
    let services = &docs[0]["services"];
    for service in ["relay", "hub", "web"] {
        assert!(services[service].is_mapping(), "service {service} missing");
    }
    let ports: Vec<&str> =
        services["relay"]["ports"].as_sequence().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(ports.contains(&"4433:4433/udp"), "{ports:?}");
    assert!(ports.iter().filter(|p| p.contains("9464")).all(|p| p.starts_with("127.0.0.1:")), "{ports:?}");
}

#[test]
fn the_cluster_compose_file_runs_redis_with_aof_and_three_nodes_with_their_own_ids() {
    let mut docs = yaml_docs("cluster-compose.yaml");
    docs[0].apply_merge().unwrap(); // the nodes share a `<<: *relay` block
    let services = &docs[0]["services"];
    let redis = services["redis"]["command"].as_sequence().unwrap();
    let redis: Vec<&str> = redis.iter().filter_map(|v| v.as_str()).collect();
    assert!(redis.windows(2).any(|w| w == ["--appendonly", "yes"]), "{redis:?}");
    let mut ids = Vec::new();
    for node in ["relay-1", "relay-2", "relay-3"] {
        let env = &services[node]["environment"];
        assert!(env["KEYWAY_RELAY_CLUSTER"].as_str().unwrap().starts_with("redis://"), "{node}");
        ids.push(env["KEYWAY_RELAY_NODE_ID"].as_str().unwrap().to_owned());
        assert!(env["KEYWAY_RELAY_KEY"].as_str().unwrap().ends_with("shared/cluster.key"), "{node}: one key");
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "every node has its own id");
}

/// `deploy/k8s/cluster.yaml`: three relay nodes whose ids are their pod names, one Redis with
/// AOF on a volume, a headless Service, readiness on `/healthz` and a liveness probe that store
/// trouble (which `/healthz` reports) does not fail.
#[test]
fn the_kubernetes_cluster_runs_three_nodes_named_by_their_pods_and_one_redis_with_aof() {
    let docs = yaml_docs("k8s/cluster.yaml");
    let sts = |name: &str| {
        docs.iter().find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == name).unwrap()
    };
    let redis = sts("keyway-redis");
    let args: Vec<&str> = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(args.windows(2).any(|w| w == ["--appendonly", "yes"]), "{args:?}");
    assert_eq!(redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], "redis-data");

    let relay = sts("keyway-relay");
    assert_eq!(relay["spec"]["replicas"], 3);
    let pod = &relay["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = container["env"].as_sequence().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap();
    assert_eq!(var("KEYWAY_RELAY_NODE_ID")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert!(var("KEYWAY_RELAY_ADVERTISE")["value"].as_str().unwrap().ends_with(":4433"));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
    let liveness = container["livenessProbe"]["httpGet"]["path"].as_str().unwrap();
    assert_ne!(liveness, "/healthz", "store trouble must not restart a node");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    // Every pod name is a valid node id (the StatefulSet's name plus an ordinal).
    for ordinal in 0..3 {
        keyway_relay::cluster::NodeId::new(&format!("keyway-relay-{ordinal}")).unwrap();
    }
    let headless = docs
        .iter()
        .filter(|d| d["kind"] == "Service" && d["spec"]["clusterIP"] == "None")
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect::<Vec<_>>();
    assert!(headless.contains(&"keyway-relay") && headless.contains(&"keyway-redis"), "{headless:?}");
    assert_eq!(relay["spec"]["serviceName"], "keyway-relay");

    // The ConfigMap's relay.toml is accepted by the relay's loader and names the Redis.
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, cm["data"]["relay.toml"].as_str().unwrap()).unwrap();
    let run = load(&path);
    assert!(run.cluster.unwrap().starts_with("redis://keyway-redis-0.keyway-redis."));
    assert_eq!(run.hubs, Path::new("/etc/keyway/authorized_hubs"));
}

#[test]
fn the_containerfile_is_from_scratch_runs_the_relay_and_checks_its_health_and_deployments_use_it() {
    let text = std::fs::read_to_string(deploy("Containerfile")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(lines.first().copied(), Some("FROM scratch"), "no registry: {lines:?}");
    assert!(lines.contains(&r#"ENTRYPOINT ["keyway-relay"]"#), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("HEALTHCHECK ") && l.ends_with(r#"CMD ["keyway-relay", "health"]"#)),
        "{lines:?}"
    );
    // compose, the cluster compose and both Kubernetes manifests run that image.
    let mut images = Vec::new();
    for file in ["compose.yaml", "cluster-compose.yaml", "k8s/relay.yaml", "k8s/cluster.yaml"] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        let keyway: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .filter(|i| i.contains("keyway"))
            .map(str::to_owned)
            .collect();
        assert!(!keyway.is_empty(), "{file} runs no keyway image");
        images.extend(keyway);
    }
    assert!(images.iter().all(|i| *i == "keyway:latest"), "{images:?}");
}
