//! Every manifest under `deploy/` parses as the Kubernetes type its `kind`
//! names (k8s-openapi), with no field the type does not know (a typo would
//! be dropped by the typed round trip and caught here), and the divert
//! command lines in them parse with the `divert` binary itself. No root.

use std::{path::PathBuf, process::Command};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, Pod, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    serde::{de::DeserializeOwned, Serialize},
};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
}

/// Parse `doc` as `T` and require the typed value to say exactly what the
/// document says.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, file: &str) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    let back = serde_json::to_value(&t).unwrap();
    let mut unknown = Vec::new();
    dropped(doc, &back, String::new(), &mut unknown);
    assert!(
        unknown.is_empty() && &back == doc,
        "{file}: {} {}: fields its type does not know: {unknown:?}",
        doc["kind"],
        doc["metadata"]["name"]
    );
    t
}

/// Paths of `doc` that the typed round trip `back` lost.
fn dropped(doc: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    match (doc, back) {
        (Value::Object(d), Value::Object(b)) => {
            for (k, v) in d {
                match b.get(k) {
                    Some(bv) => dropped(v, bv, format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(d), Value::Array(b)) => {
            for (i, (v, bv)) in d.iter().zip(b).enumerate() {
                dropped(v, bv, format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Every document of every YAML file, with its file name.
fn documents() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests under deploy/");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            if !v.is_null() {
                out.push((name.clone(), v));
            }
        }
    }
    out
}

/// The `divert` command lines of a pod spec: (container, args).
fn divert_args(spec: &PodSpec) -> Vec<(String, Vec<String>)> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.image.as_deref().is_some_and(|i| i.contains("divert")))
        .map(|c| {
            // This version's: the tag `cargo xtask image` gives (the
            // image test runs the archive under the DaemonSet's name).
            assert_eq!(
                c.image
                    .as_deref()
                    .and_then(|i| i.rsplit_once(':'))
                    .map(|(_, t)| t),
                Some(env!("CARGO_PKG_VERSION")),
                "{}",
                c.name
            );
            (c.name.clone(), c.args.clone().unwrap_or_default())
        })
        .collect()
}

/// `divert ARGS --help` must parse: an unknown flag or a bad value fails.
fn assert_divert_parses(file: &str, container: &str, args: &[String]) {
    // Kubernetes expands $(VAR) from the container's env; use a value of
    // the right shape.
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(HOST_IP)", "10.0.0.1"))
        .collect();
    let out = Command::new(divert_tests::divert_bin())
        .args(&args)
        .arg("--help")
        .output()
        .expect("the divert binary (cargo build --bins)");
    assert!(
        out.status.success(),
        "{file}: container {container}: divert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    let mut kinds = Vec::new();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(&doc, &file)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &file)),
            "ClusterRole" => drop(typed::<ClusterRole>(&doc, &file)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &file)),
            "ConfigMap" => {
                let cm: ConfigMap = typed(&doc, &file);
                for (key, value) in cm.data.iter().flatten() {
                    if key.ends_with(".json") {
                        serde_json::from_str::<Value>(value)
                            .unwrap_or_else(|e| panic!("{file}: {key} is not JSON: {e}"));
                    }
                }
            }
            "DaemonSet" => {
                let ds: DaemonSet = typed(&doc, &file);
                let spec = ds.spec.unwrap().template.spec.unwrap();
                for (c, args) in divert_args(&spec) {
                    assert_divert_parses(&file, &c, &args);
                }
            }
            "Pod" => {
                let pod: Pod = typed(&doc, &file);
                for (c, args) in divert_args(&pod.spec.unwrap()) {
                    assert_divert_parses(&file, &c, &args);
                }
            }
            other => panic!("{file}: kind {other:?} is not checked here; add it"),
        }
        kinds.push(kind);
    }
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Namespace",
            "Pod",
            "ServiceAccount"
        ]
    );
}

#[test]
fn the_daemonset_grants_what_the_daemon_needs() {
    for (file, doc) in documents() {
        if doc["kind"] != "DaemonSet" {
            continue;
        }
        let ds: DaemonSet = typed(&doc, &file);
        let template = ds.spec.unwrap().template;
        let spec = template.spec.unwrap();
        assert_eq!(
            spec.host_network,
            Some(true),
            "registration and metrics on the node"
        );
        assert_eq!(
            spec.host_pid,
            Some(true),
            "SO_PEERCRED pids and pod processes"
        );
        let c = &spec.containers[0];
        // Least privilege (the capabilities themselves are proved by
        // tests/tests/image.rs, which runs the daemon with exactly these).
        let sc = c.security_context.clone().expect("a securityContext");
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let caps = sc.capabilities.expect("capabilities");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            caps.add,
            Some(
                ["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"]
                    .map(String::from)
                    .to_vec()
            )
        );
        for (what, profile) in [
            ("container", sc.seccomp_profile),
            (
                "pod",
                spec.security_context
                    .clone()
                    .and_then(|s| s.seccomp_profile),
            ),
        ] {
            assert_eq!(
                profile.map(|p| p.type_),
                Some("RuntimeDefault".to_string()),
                "{what} seccomp profile"
            );
        }
        // The API server refuses Bidirectional propagation in a container
        // that is not privileged.
        for m in c.volume_mounts.iter().flatten() {
            assert_ne!(
                m.mount_propagation.as_deref(),
                Some("Bidirectional"),
                "{}",
                m.mount_path
            );
        }
        assert_eq!(
            spec.node_selector
                .as_ref()
                .and_then(|n| n.get("kubernetes.io/os"))
                .map(String::as_str),
            Some("linux")
        );
        let meta = template.metadata.clone().unwrap();
        assert_eq!(
            meta.labels
                .as_ref()
                .unwrap()
                .get("sidecar.istio.io/inject")
                .map(String::as_str),
            Some("false"),
            "the agent is never injected"
        );
        let annotations = meta.annotations.unwrap_or_default();
        let port = c
            .args
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("--metrics-addr="))
            .and_then(|a| a.rsplit_once(':'))
            .map(|(_, p)| p.to_string())
            .expect("--metrics-addr");
        assert_eq!(
            annotations.get("prometheus.io/scrape").map(String::as_str),
            Some("true")
        );
        assert_eq!(annotations.get("prometheus.io/port"), Some(&port));
        let env: Vec<_> = c.env.iter().flatten().collect();
        let node = env
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME");
        assert_eq!(
            node.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("spec.nodeName"),
            "the node name comes from the downward API"
        );
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        for want in ["/sys/fs/bpf", "/host/sys/fs/cgroup", "/var/run/divert"] {
            assert!(mounts.contains(&want), "{want} not mounted: {mounts:?}");
        }
        // The CNI directories the daemon installs divert-cni into are the
        // node's own (/host/X is the node's /X).
        for flag in ["--cni-conf-dir=", "--cni-bin-dir="] {
            let arg = c
                .args
                .iter()
                .flatten()
                .find_map(|a| a.strip_prefix(flag))
                .unwrap_or_else(|| panic!("{flag} is not set"));
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == arg)
                .unwrap_or_else(|| panic!("{arg} is not mounted"));
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap();
            assert_eq!(
                volume.host_path.as_ref().map(|h| h.path.as_str()),
                arg.strip_prefix("/host"),
                "{flag}"
            );
        }
    }
}
