//! `divert daemon --kubernetes`: watch this node's pods (kube-rs) and
//! register each meshed pod's policy from its annotations over the
//! mesh-wide defaults, live: an annotation change applies to the running
//! pod.
//!
//! * This node: `spec.nodeName` = `NODE_NAME` (the downward API), never the
//!   hostname.
//! * Meshed: annotation `sidecar.istio.io/inject: "true"`, or the pod's
//!   namespace labelled `istio-injection=enabled` and the pod not
//!   annotated `sidecar.istio.io/inject: "false"`, or divert's own
//!   annotation `divert.io/inject: "true"`. Host-network pods and
//!   `sidecar.istio.io/interceptionMode: NONE` are not intercepted.
//! * Policy, with the injector's precedence: each of
//!   `traffic.sidecar.istio.io/{includeOutboundIPRanges, excludeOutboundIPRanges,
//!   includeOutboundPorts, excludeOutboundPorts}` that is present, even
//!   empty, replaces the mesh default (`includeIPRanges`,
//!   `excludeIPRanges`, `includeOutboundPorts`, `excludeOutboundPorts` of
//!   [`MeshConfig`]); absent, the default stands.
//! * The pod's network namespace: a process whose cgroup path holds the pod
//!   UID (kubelet's `pod<uid>` cgroups, with `-` or `_`), then
//!   `/proc/<pid>/ns/net`. A pod whose process is not there yet is retried
//!   every [`RETRY`].
//! * A bad annotation: a `Warning` Event on the pod (reason
//!   `DivertBadAnnotation`) and a log line naming pod, annotation and value;
//!   that pod keeps what it had, every other pod is unaffected.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{Event, EventSource, Namespace, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    api::{Api, PostParams},
    runtime::{watcher, WatchStreamExt},
    Client, ResourceExt,
};
use serde::Deserialize;

use super::Registry;
use crate::ebpf::RegisteredBy;
use crate::policy::{self, Policy, PolicyArgs, Source};

/// Istio's injection annotation.
pub const INJECT: &str = "sidecar.istio.io/inject";
/// divert's own opt-in annotation.
pub const DIVERT_INJECT: &str = "divert.io/inject";
/// Istio's namespace label.
pub const INJECTION_LABEL: &str = "istio-injection";
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const INCLUDE_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// Default path of the mesh-wide defaults (a mounted ConfigMap key).
pub const DEFAULT_MESH_CONFIG: &str = "/etc/divert/mesh/config.json";
/// How often pods whose namespace was not found yet are tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// Mesh-wide defaults, JSON, keys as Istio's values spell them
/// (`global.proxy.includeIPRanges` …). Every key is optional; Istio's
/// defaults apply.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MeshConfig {
    /// `-i`: `*`, empty, or CIDRs.
    #[serde(rename = "includeIPRanges")]
    pub include_ip_ranges: String,
    /// `-x`.
    #[serde(rename = "excludeIPRanges")]
    pub exclude_ip_ranges: String,
    /// `-q`.
    pub include_outbound_ports: String,
    /// `-o`.
    pub exclude_outbound_ports: String,
    /// `-u` (comma-separated).
    #[serde(rename = "proxyUID")]
    pub proxy_uid: String,
    /// `-g`; empty: the same as `-u`.
    #[serde(rename = "proxyGID")]
    pub proxy_gid: String,
    /// `-p`.
    pub proxy_port: u16,
    /// `-z`.
    pub inbound_capture_port: u16,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            include_ip_ranges: "*".into(),
            exclude_ip_ranges: String::new(),
            include_outbound_ports: String::new(),
            exclude_outbound_ports: String::new(),
            proxy_uid: policy::DEFAULT_PROXY_ID.to_string(),
            proxy_gid: String::new(),
            proxy_port: policy::DEFAULT_PROXY_PORT,
            inbound_capture_port: policy::DEFAULT_INBOUND_CAPTURE_PORT,
        }
    }
}

impl MeshConfig {
    /// Read `path`; a missing file means Istio's defaults.
    pub fn load(path: &Path) -> anyhow::Result<MeshConfig> {
        match fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("mesh config {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no mesh config: Istio's defaults");
                Ok(MeshConfig::default())
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// [`MeshConfig::load`], and every value held to the rules pod
    /// policies are (as a pod with no annotation would get them), so a bad
    /// mesh default stops the daemon's start rather than each pod.
    pub fn load_checked(path: &Path) -> anyhow::Result<MeshConfig> {
        let mesh = MeshConfig::load(path)?;
        pod_policy(&Pod::default(), &mesh, &path.display().to_string())
            .map_err(|e| anyhow::anyhow!("mesh config {}: {e}", path.display()))?;
        Ok(mesh)
    }
}

/// A pod annotation that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("annotation {annotation}={value:?}: {reason}")]
pub struct BadAnnotation {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

/// Whether `pod` is meshed (see the module documentation).
pub fn meshed(pod: &Pod, namespace_labels: &BTreeMap<String, String>) -> bool {
    let a = pod.annotations();
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return false;
    }
    if a.get(INTERCEPTION_MODE).map(String::as_str) == Some("NONE") {
        return false;
    }
    if a.get(DIVERT_INJECT).map(String::as_str) == Some("true") {
        return true;
    }
    match a.get(INJECT).map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        _ => namespace_labels.get(INJECTION_LABEL).map(String::as_str) == Some("enabled"),
    }
}

/// The policy of `pod`: each annotation present (even empty) over the mesh
/// default. Errors name the first annotation (or mesh key) that is bad.
pub fn pod_policy(pod: &Pod, mesh: &MeshConfig, mesh_file: &str) -> Result<Policy, BadAnnotation> {
    let a = pod.annotations();
    let who = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    if let Some(mode) = a.get(INTERCEPTION_MODE) {
        if !["REDIRECT", "TPROXY", "NONE"].contains(&mode.as_str()) {
            return Err(BadAnnotation {
                annotation: INTERCEPTION_MODE.into(),
                value: mode.clone(),
                reason: "must be REDIRECT, TPROXY or NONE".into(),
            });
        }
    }
    // (field, annotation, mesh key, mesh value)
    let settings = [
        (
            "include_ranges",
            INCLUDE_RANGES,
            "includeIPRanges",
            &mesh.include_ip_ranges,
        ),
        (
            "exclude_ranges",
            EXCLUDE_RANGES,
            "excludeIPRanges",
            &mesh.exclude_ip_ranges,
        ),
        (
            "include_ports",
            INCLUDE_PORTS,
            "includeOutboundPorts",
            &mesh.include_outbound_ports,
        ),
        (
            "exclude_ports",
            EXCLUDE_PORTS,
            "excludeOutboundPorts",
            &mesh.exclude_outbound_ports,
        ),
    ];
    let value = |field: &str| -> String {
        let (_, ann, _, default) = settings.iter().find(|s| s.0 == field).unwrap();
        a.get(*ann).cloned().unwrap_or_else(|| (*default).clone())
    };
    let args = PolicyArgs {
        proxy_port: mesh.proxy_port.to_string(),
        inbound_capture_port: mesh.inbound_capture_port.to_string(),
        inbound_tunnel_port: policy::DEFAULT_INBOUND_TUNNEL_PORT.to_string(),
        proxy_uids: mesh.proxy_uid.clone(),
        proxy_gids: mesh.proxy_gid.clone(),
        include_ranges: value("include_ranges"),
        exclude_ranges: value("exclude_ranges"),
        include_ports: value("include_ports"),
        exclude_ports: value("exclude_ports"),
        // Istio has no annotation for the owner-group filter: every group.
        owner_groups: "*".to_string(),
        owner_groups_exclude: String::new(),
        // The pod watch registers outbound capture only: inbound ports
        // (includeInboundPorts, excludeInboundPorts) and DNS capture
        // (proxyMetadata ISTIO_META_DNS_CAPTURE) come with its meshed-pod
        // decision (`divert init` registers both today).
        inbound_ports: String::new(),
        inbound_exclude_ports: String::new(),
        redirect_dns: false,
        capture_all_dns: false,
        resolv_conf: "/etc/resolv.conf".into(),
    };
    let origin = |field: &str| -> Source {
        match settings.iter().find(|s| s.0 == field) {
            Some((_, ann, _, _)) if a.contains_key(*ann) => Source::Annotation {
                pod: who.clone(),
                annotation: ann.to_string(),
            },
            Some((_, _, key, _)) => Source::MeshConfig {
                file: mesh_file.to_string(),
                key: key.to_string(),
            },
            None => Source::MeshConfig {
                file: mesh_file.to_string(),
                key: field.to_string(),
            },
        }
    };
    args.to_policy_from(&origin).map_err(|e| {
        // Name the annotation when one is to blame.
        let (annotation, value) = match e.origin() {
            Source::Annotation { annotation, .. } => (
                annotation.clone(),
                a.get(annotation).cloned().unwrap_or_default(),
            ),
            _ => (format!("(mesh config {mesh_file})"), String::new()),
        };
        BadAnnotation {
            annotation,
            value,
            reason: e.to_string(),
        }
    })
}

/// A process of the pod with UID `uid`, found by its cgroup path
/// (kubelet's `pod<uid>` with `-`, or `pod<uid_with_underscores>` under
/// the systemd driver).
pub fn pod_process(uid: &str) -> Option<i32> {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Ok(pid) = name.to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cg) = fs::read_to_string(e.path().join("cgroup")) else {
            continue;
        };
        if cg.contains(&dashed) || cg.contains(&underscored) {
            return Some(pid);
        }
    }
    None
}

/// The watch's memory of each pod, by UID.
#[derive(Default)]
struct Applied {
    /// The policy registered for the pod and its netns cookie.
    registered: HashMap<String, (u64, Policy)>,
    /// Meshed pods whose namespace was not found yet.
    pending: HashMap<String, Pod>,
}

struct Watch {
    client: Client,
    registry: Arc<Registry>,
    mesh: MeshConfig,
    mesh_file: String,
    node: String,
    applied: Applied,
}

impl Watch {
    async fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.get(ns).await {
            Ok(n) => n.labels().clone(),
            Err(e) => {
                tracing::warn!(namespace = ns, error = %e, "reading the namespace's labels");
                BTreeMap::new()
            }
        }
    }

    async fn reconcile(&mut self, pod: Pod) {
        let uid = pod.uid().unwrap_or_default();
        let who = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        let labels = self
            .namespace_labels(&pod.namespace().unwrap_or_default())
            .await;
        if !meshed(&pod, &labels) {
            self.applied.pending.remove(&uid);
            if let Some((cookie, _)) = self.applied.registered.remove(&uid) {
                // Removes the pod identity with the policy.
                let registry = self.registry.clone();
                let _ = tokio::task::spawn_blocking(move || registry.forget(cookie)).await;
                tracing::info!(pod = %who, netns_cookie = cookie, "no longer meshed: unregistered");
            }
            return;
        }
        let policy = match pod_policy(&pod, &self.mesh, &self.mesh_file) {
            Ok(p) => p,
            Err(bad) => {
                self.applied.pending.remove(&uid);
                tracing::warn!(pod = %who, annotation = %bad.annotation, value = %bad.value, error = %bad.reason, "bad annotation: the pod keeps what it had");
                self.post_event(&pod, &bad).await;
                return;
            }
        };
        // Finding the pod's process scans /proc and entering its namespace
        // takes a thread: both on the blocking pool.
        let find = uid.clone();
        let found = tokio::task::spawn_blocking(move || pod_process(&find).map(super::peer_of_pid))
            .await
            .ok()
            .flatten();
        let peer = match found {
            None => {
                self.applied.pending.insert(uid, pod);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(pod = %who, error = %format!("{e:#}"), "pod namespace not readable yet");
                self.applied.pending.insert(uid, pod);
                return;
            }
            Some(Ok(p)) => p,
        };
        self.applied.pending.remove(&uid);
        if self.applied.registered.get(&uid) == Some(&(peer.netns_cookie, policy.clone())) {
            return;
        }
        let registry = self.registry.clone();
        let (cookie, registered) = (peer.netns_cookie, policy.clone());
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let outcome = tokio::task::spawn_blocking(move || {
            registry.register_namespace(
                cookie,
                registered,
                &peer.local_addrs,
                RegisteredBy::Kubernetes,
            )?;
            // The identity only labels what is shown; the pod is meshed
            // either way.
            Ok::<_, anyhow::Error>(registry.set_identity(cookie, &namespace, &name))
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the registration panicked: {e}")));
        match outcome {
            Ok(identity) => {
                if let Err(e) = identity {
                    tracing::warn!(pod = %who, error = %format!("{e:#}"), "recording the pod's identity failed: its metrics and `divert maps` show no pod");
                }
                tracing::info!(pod = %who, netns_cookie = cookie, "registered from annotations");
                self.applied.registered.insert(uid, (cookie, policy));
            }
            Err(e) => tracing::warn!(pod = %who, error = %format!("{e:#}"), "registration failed"),
        }
    }

    async fn post_event(&self, pod: &Pod, bad: &BadAnnotation) {
        let ns = pod.namespace().unwrap_or_default();
        let now = Time(k8s_openapi::chrono::Utc::now());
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.divert-", pod.name_any())),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                namespace: Some(ns.clone()),
                uid: pod.uid(),
                ..ObjectReference::default()
            },
            reason: Some("DivertBadAnnotation".into()),
            message: Some(format!(
                "divert: {bad}; the pod's interception was left as it was"
            )),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("divert".into()),
                host: Some(self.node.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &ev).await {
            tracing::warn!(pod = %pod.name_any(), error = %e, "posting the Event");
        }
    }
}

/// Watch this node's pods until the watch ends. Errors: no Kubernetes
/// configuration (in-cluster or KUBECONFIG), or the watch stream ended.
pub async fn run(
    registry: Arc<Registry>,
    node: String,
    mesh: MeshConfig,
    mesh_file: String,
) -> anyhow::Result<()> {
    {
        let client = Client::try_default()
            .await
            .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
        let pods: Api<Pod> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let mut stream = watcher(pods, cfg).default_backoff().boxed();
        let mut w = Watch {
            client,
            registry,
            mesh,
            mesh_file,
            node,
            applied: Applied::default(),
        };
        let mut retry = tokio::time::interval(RETRY);
        loop {
            tokio::select! {
                ev = stream.try_next() => match ev {
                    Ok(Some(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => w.reconcile(p).await,
                    Ok(Some(watcher::Event::Delete(p))) => {
                        let uid = p.uid().unwrap_or_default();
                        w.applied.pending.remove(&uid);
                        // The namespace goes with the pod; garbage
                        // collection removes the policy.
                        w.applied.registered.remove(&uid);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => anyhow::bail!("the pod watch ended"),
                    Err(e) => tracing::warn!(error = %e, "pod watch"),
                },
                _ = retry.tick() => {
                    let pending: Vec<Pod> = w.applied.pending.values().cloned().collect();
                    for p in pending {
                        w.reconcile(p).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("cart-1".into());
        p.metadata.namespace = Some("shop".into());
        p.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn a_present_annotation_wins_over_the_mesh_default_even_empty() {
        let mesh = MeshConfig {
            exclude_ip_ranges: "169.254.169.254/32".into(),
            exclude_outbound_ports: "3306".into(),
            ..MeshConfig::default()
        };
        let p = pod_policy(&pod(&[]), &mesh, "mesh.json").unwrap();
        assert_eq!(p.exclude_ranges.len(), 1);
        assert_eq!(p.exclude_ports, vec![3306]);
        let p = pod_policy(
            &pod(&[
                (EXCLUDE_RANGES, ""),
                (INCLUDE_RANGES, "10.0.0.0/8"),
                (EXCLUDE_PORTS, "80,443"),
            ]),
            &mesh,
            "mesh.json",
        )
        .unwrap();
        assert!(p.exclude_ranges.is_empty());
        assert_eq!(
            p.include_ranges,
            crate::policy::IncludeRanges::List(vec!["10.0.0.0/8".parse().unwrap()])
        );
        assert_eq!(p.exclude_ports, vec![80, 443]);
        assert_eq!(p.proxy_uids, vec![1337]);
    }

    #[test]
    fn a_bad_annotation_is_named_with_its_value() {
        let e = pod_policy(
            &pod(&[(INCLUDE_RANGES, "10.0.0.0/33")]),
            &MeshConfig::default(),
            "m",
        )
        .unwrap_err();
        assert_eq!(e.annotation, INCLUDE_RANGES);
        assert_eq!(e.value, "10.0.0.0/33");
        assert!(
            e.to_string().contains(
                "annotation traffic.sidecar.istio.io/includeOutboundIPRanges of pod shop/cart-1"
            ),
            "{e}"
        );
        let e = pod_policy(
            &pod(&[(INTERCEPTION_MODE, "MAGIC")]),
            &MeshConfig::default(),
            "m",
        )
        .unwrap_err();
        assert_eq!(e.annotation, INTERCEPTION_MODE);
    }

    #[test]
    fn meshed_follows_istio_and_divert_annotations_and_the_namespace_label() {
        let enabled = BTreeMap::from([(INJECTION_LABEL.to_string(), "enabled".to_string())]);
        let none = BTreeMap::new();
        assert!(meshed(&pod(&[(INJECT, "true")]), &none));
        assert!(meshed(&pod(&[(DIVERT_INJECT, "true")]), &none));
        assert!(meshed(&pod(&[]), &enabled));
        assert!(!meshed(&pod(&[(INJECT, "false")]), &enabled));
        assert!(!meshed(&pod(&[]), &none));
        assert!(!meshed(
            &pod(&[(INJECT, "true"), (INTERCEPTION_MODE, "NONE")]),
            &none
        ));
    }
}
