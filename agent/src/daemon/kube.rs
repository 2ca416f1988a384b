//! `divert daemon --kubernetes`: watch this node's pods (kube-rs) and
//! register each meshed pod, live: an annotation change applies to the
//! running pod.
//!
//! * This node: `spec.nodeName` = `NODE_NAME` (the downward API), never the
//!   hostname.
//! * Meshed, and its policy: exactly what the CNI plugin decides and
//!   computes ([`crate::sidecar::meshed`], [`crate::sidecar::policy_of`]):
//!   an injected pod with an `istio-proxy` sidecar and no `istio-init`
//!   container. A pod with `istio-init` is its init container's to
//!   configure, and the watch never overwrites what that registered; a pod
//!   without a sidecar is never touched. So a pod the CNI plugin registered
//!   gets the same policy again (a daemon restart changes nothing), and a
//!   pod that started before the plugin was installed is registered here.
//! * The pod's network namespace: a process whose cgroup path holds the pod
//!   UID (kubelet's `pod<uid>` cgroups, with `-` or `_`), then
//!   `/proc/<pid>/ns/net`. A pod whose process is not there yet is retried
//!   every [`RETRY`].
//! * A bad annotation: a `Warning` Event on the pod (reason
//!   `DivertBadAnnotation`) and a log line naming pod, annotation and value;
//!   that pod keeps what it had, every other pod is unaffected.
//! * A meshed pod whose registration fails (a full map, an address another
//!   namespace captures, …): a `Warning` Event (`DivertNotRegistered`) once,
//!   the `divert_meshed_pods_unregistered` gauge, and another try every
//!   [`RETRY`].

use std::{collections::HashMap, fs, sync::Arc, time::Duration};

use super::Registry;
use prometheus_client::metrics::gauge::Gauge;

use crate::{ebpf::RegisteredBy, policy::Policy, sidecar};
use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    api::{Api, PostParams},
    runtime::{watcher, WatchStreamExt},
    Client, ResourceExt,
};

/// How often pods whose namespace was not found yet are tried again.
pub const RETRY: Duration = Duration::from_secs(2);

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
    /// Meshed pods whose registration failed (reported, and tried again
    /// with the pending ones).
    failed: HashMap<String, Pod>,
}

struct Watch {
    client: Client,
    registry: Arc<Registry>,
    exclude_namespaces: Vec<String>,
    /// `divert_meshed_pods_unregistered`: meshed pods whose registration
    /// failed.
    unregistered: Gauge,
    node: String,
    applied: Applied,
}

impl Watch {
    async fn reconcile(&mut self, pod: Pod) {
        let uid = pod.uid().unwrap_or_default();
        let who = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        if let Err(skip) = sidecar::meshed(&pod, &self.exclude_namespaces) {
            tracing::debug!(pod = %who, reason = %skip, "not meshed");
            self.applied.pending.remove(&uid);
            self.settled(&uid);
            if let Some((cookie, _)) = self.applied.registered.remove(&uid) {
                // Removes the pod identity with the policy.
                let registry = self.registry.clone();
                let _ = tokio::task::spawn_blocking(move || registry.forget(cookie)).await;
                tracing::info!(pod = %who, netns_cookie = cookie, "no longer meshed: unregistered");
            }
            return;
        }
        let policy = match sidecar::policy_of(&pod) {
            Ok(p) => p,
            Err(bad) => {
                self.applied.pending.remove(&uid);
                self.registry.health().error("invalid");
                tracing::warn!(pod = %who, annotation = %bad.annotation, value = %bad.value, error = %bad.reason, "bad annotation: the pod keeps what it had");
                self.post_warning(
                    &pod,
                    "DivertBadAnnotation",
                    format!("divert: {bad}; the pod's interception was left as it was"),
                )
                .await;
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
            registry.register_peer(&peer, registered, RegisteredBy::Kubernetes)?;
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
                self.applied
                    .registered
                    .insert(uid.clone(), (cookie, policy));
                self.settled(&uid);
            }
            Err(e) => {
                let e = format!("{e:#}");
                tracing::warn!(pod = %who, error = %e, "registration failed: the pod is meshed but not intercepted");
                // Reported once per failure, tried again every RETRY.
                if self.applied.failed.insert(uid, pod.clone()).is_none() {
                    self.post_warning(
                        &pod,
                        "DivertNotRegistered",
                        format!("divert: the pod is meshed but could not be registered: {e}; trying again"),
                    )
                    .await;
                }
                self.unregistered.set(self.applied.failed.len() as i64);
            }
        }
    }

    /// `uid` is registered or no longer meshed: not a failure any more.
    fn settled(&mut self, uid: &str) {
        if self.applied.failed.remove(uid).is_some() {
            self.unregistered.set(self.applied.failed.len() as i64);
        }
    }

    async fn post_warning(&self, pod: &Pod, reason: &str, message: String) {
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
            reason: Some(reason.into()),
            message: Some(message),
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
    exclude_namespaces: Vec<String>,
    unregistered: Gauge,
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
            exclude_namespaces,
            unregistered,
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
                        w.settled(&uid);
                        // The namespace goes with the pod; garbage
                        // collection removes the policy.
                        w.applied.registered.remove(&uid);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => anyhow::bail!("the pod watch ended"),
                    Err(e) => tracing::warn!(error = %e, "pod watch"),
                },
                _ = retry.tick() => {
                    let pending: Vec<Pod> = w
                        .applied
                        .pending
                        .values()
                        .chain(w.applied.failed.values())
                        .cloned()
                        .collect();
                    for p in pending {
                        w.reconcile(p).await;
                    }
                }
            }
        }
    }
}
