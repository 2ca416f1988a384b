//! `divert-cni`: the divert binary run under that name is a chained CNI
//! plugin (spec 1.0; its `type` in the node's conflist), the way into a pod
//! that needs nothing of the pod: no init container, no hostPath.
//!
//! * `ADD`: a container that is not a Kubernetes pod (no `K8S_POD_NAMESPACE`
//!   and `K8S_POD_NAME` in `CNI_ARGS`), or a pod of an excluded namespace,
//!   passes through. Otherwise the pod is read from the API server (the
//!   conflist's `kubernetes.kubeconfig`), and if it is meshed
//!   ([`crate::sidecar::meshed`]) its policy ([`crate::sidecar::policy_of`])
//!   is registered with the node daemon for `CNI_NETNS`, before any of the
//!   pod's containers starts. A bad annotation fails the ADD (the pod does
//!   not start unmeshed), naming it.
//! * `DEL`: the namespace's registration is removed (nothing to do when the
//!   namespace is gone already; the daemon collects it).
//! * `CHECK`: a meshed pod must be registered.
//! * `VERSION`: the spec versions this plugin speaks.
//!
//! `prevResult` is passed through unchanged. Errors are the spec's error
//! object on stdout with a non-zero exit; logs go to stderr (the runtime
//! keeps it), never stdout.
//!
//! The plugin is a short-lived client of the daemon's socket, which is on
//! the node: it enters the pod's network namespace (`setns` on its main
//! thread) and asks over the socket, and the daemon identifies the
//! namespace from the caller as it does for `divert init`.

use std::{
    io::{Read, Write},
    os::fd::AsFd,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    daemon::proto::{self, Op},
    sidecar,
};

/// The spec versions this plugin speaks (its result is the previous
/// plugin's, passed through).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The longest network configuration read from stdin.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The spec's well-known error codes, and ours (100 and up).
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// A pod annotation divert cannot apply.
    pub const BAD_ANNOTATION: u32 = 100;
    /// The API server did not give the pod.
    pub const POD_UNAVAILABLE: u32 = 101;
    /// CHECK: a meshed pod is not registered.
    pub const NOT_REGISTERED: u32 = 102;
}

/// The plugin's own settings in the conflist entry, beside `type` and the
/// spec's fields (unknown keys are ignored, as a plugin must).
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// Where the API server is (the installer writes a kubeconfig for the
    /// plugin's service account).
    #[serde(default)]
    pub kubernetes: Kubernetes,
    /// The daemon's registration socket.
    #[serde(default = "default_socket")]
    pub daemon_socket: PathBuf,
    /// Namespaces whose pods are never touched (istio-cni's
    /// `exclude_namespaces`).
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    /// How many times the pod is asked for, a second apart, before ADD
    /// fails (istio-cni asks 30 times).
    #[serde(default = "default_attempts")]
    pub pod_get_attempts: u32,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Map<String, Value>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Kubernetes {
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
}

fn default_socket() -> PathBuf {
    proto::DEFAULT_SOCKET.into()
}

fn default_attempts() -> u32 {
    30
}

/// A CNI error: the spec's error object.
#[derive(Debug, Serialize)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

/// The pod named by `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`), if
/// both are there. Pairs are `KEY=VALUE` separated by `;`.
pub fn pod_of_args(cni_args: &str) -> Option<(String, String)> {
    let get = |key: &str| {
        cni_args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty())
    };
    Some((get("K8S_POD_NAMESPACE")?, get("K8S_POD_NAME")?))
}

/// Run as `divert-cni`: read `CNI_*` and the network configuration, do the
/// command, print its result (or the error object) on stdout.
pub fn main() -> ExitCode {
    let (out, status) = match run() {
        Ok(result) => (result, ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(code = e.code, error = %e.msg, "divert-cni");
            (
                serde_json::to_value(&e).expect("an error serialises"),
                ExitCode::FAILURE,
            )
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{out}");
    status
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn run() -> Result<Value, CniError> {
    let command = env("CNI_COMMAND")
        .ok_or_else(|| CniError::new(code::INVALID_ENVIRONMENT, "CNI_COMMAND is not set"))?;
    if command == "VERSION" {
        return Ok(serde_json::json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        }));
    }
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!("reading the network configuration: {e}"),
            )
        })?;
    if stdin.len() as u64 > MAX_CONFIG_BYTES {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("the network configuration is longer than {MAX_CONFIG_BYTES} bytes"),
        ));
    }
    let conf: Config = serde_json::from_slice(&stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("the network configuration: {e}"),
        )
    })?;
    if !conf.cni_version.is_empty() && !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {} is not one of {}",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let pod = env("CNI_ARGS").as_deref().and_then(pod_of_args);
    match command.as_str() {
        "ADD" => {
            if let Some((ns, name)) = pod {
                add(&conf, &ns, &name)?;
            }
            Ok(result(&conf))
        }
        "DEL" => {
            if pod.is_some() {
                del(&conf)?;
            }
            Ok(Value::Null)
        }
        "CHECK" => {
            if let Some((ns, name)) = pod {
                check(&conf, &ns, &name)?;
            }
            Ok(Value::Null)
        }
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_COMMAND {other:?}: ADD, DEL, CHECK or VERSION"),
        )),
    }
}

/// ADD's result: the previous plugin's, unchanged but for the version it
/// is printed in; without one, an empty result.
fn result(conf: &Config) -> Value {
    let mut r = conf.prev_result.clone().unwrap_or_default();
    let version = if conf.cni_version.is_empty() {
        "1.0.0".to_string()
    } else {
        conf.cni_version.clone()
    };
    r.insert("cniVersion".into(), Value::String(version));
    Value::Object(r)
}

/// The pod, asked for up to `pod_get_attempts` times a second apart.
fn get_pod(conf: &Config, ns: &str, name: &str) -> Result<Pod, CniError> {
    let unavailable = |e: String| {
        CniError::new(
            code::POD_UNAVAILABLE,
            format!("reading pod {ns}/{name} from the API server: {e}"),
        )
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unavailable(e.to_string()))?;
    rt.block_on(async {
        let config = match &conf.kubernetes.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| unavailable(format!("kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| unavailable(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| unavailable(e.to_string()))?,
        };
        let client = kube::Client::try_from(config).map_err(|e| unavailable(e.to_string()))?;
        let api: kube::Api<Pod> = kube::Api::namespaced(client, ns);
        let mut last = String::new();
        for attempt in 1..=conf.pod_get_attempts.max(1) {
            match api.get(name).await {
                Ok(pod) => return Ok(pod),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "getting the pod");
                    last = e.to_string();
                }
            }
            if attempt < conf.pod_get_attempts {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Err(unavailable(last))
    })
}

/// Enter `CNI_NETNS` on this (the main) thread and make one request of the
/// daemon from there. `Ok(None)` when the namespace is gone.
fn from_the_pod(conf: &Config, op: Op) -> Result<Option<proto::Response>, CniError> {
    let Some(path) = env("CNI_NETNS") else {
        return Ok(None);
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_NETNS {path}: {e}"),
            ))
        }
    };
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("entering CNI_NETNS {path}: {e}"),
        )
    })?;
    let response = proto::call(&conf.daemon_socket, op).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the divert daemon at {}: {e}", conf.daemon_socket.display()),
        )
    })?;
    Ok(Some(response))
}

fn add(conf: &Config, ns: &str, name: &str) -> Result<(), CniError> {
    if conf.exclude_namespaces.iter().any(|n| n == ns) {
        tracing::info!(pod = %format!("{ns}/{name}"), "namespace excluded: passed through");
        return Ok(());
    }
    let pod = get_pod(conf, ns, name)?;
    if let Err(skip) = sidecar::meshed(&pod, &conf.exclude_namespaces) {
        tracing::info!(pod = %format!("{ns}/{name}"), reason = %skip, "not meshed: passed through");
        return Ok(());
    }
    let policy = sidecar::policy_of(&pod).map_err(|bad| {
        CniError::new(
            code::BAD_ANNOTATION,
            format!("pod {ns}/{name}: {bad}; the pod is not started unmeshed"),
        )
    })?;
    let response = from_the_pod(
        conf,
        Op::Register {
            policy: Box::new(policy),
            registrar: Some(proto::Registrar::Cni),
        },
    )?
    .ok_or_else(|| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set or the namespace does not exist",
        )
    })?;
    if !response.ok {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the divert daemon refused pod {ns}/{name}: {}",
                response.error.unwrap_or_default()
            ),
        ));
    }
    tracing::info!(pod = %format!("{ns}/{name}"), netns_cookie = ?response.netns_cookie, "registered");
    Ok(())
}

fn del(conf: &Config) -> Result<(), CniError> {
    match from_the_pod(conf, Op::Unregister)? {
        Some(r) if !r.ok => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the divert daemon did not unregister: {}",
                r.error.unwrap_or_default()
            ),
        )),
        _ => Ok(()),
    }
}

fn check(conf: &Config, ns: &str, name: &str) -> Result<(), CniError> {
    let pod = get_pod(conf, ns, name)?;
    if sidecar::meshed(&pod, &conf.exclude_namespaces).is_err() {
        return Ok(());
    }
    match from_the_pod(conf, Op::Status)? {
        Some(r) if r.ok && r.registered => Ok(()),
        Some(r) => Err(CniError::new(
            code::NOT_REGISTERED,
            format!(
                "pod {ns}/{name} is meshed but its network namespace is not registered{}",
                r.error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        )),
        None => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set or the namespace does not exist",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_name_the_pod() {
        assert_eq!(
            pod_of_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=abc"),
            Some(("shop".into(), "cart-1".into()))
        );
        assert_eq!(pod_of_args("IgnoreUnknown=1"), None);
        assert_eq!(pod_of_args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME="), None);
    }

    #[test]
    fn add_passes_the_previous_result_through() {
        let conf: Config = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"divert-cni",
                "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.5/24","interface":0}]}}"#,
        )
        .unwrap();
        let r = result(&conf);
        assert_eq!(r["ips"][0]["address"], "10.1.0.5/24");
        assert_eq!(r["interfaces"][0]["name"], "eth0");
        assert_eq!(r["cniVersion"], "1.0.0");
    }
}
