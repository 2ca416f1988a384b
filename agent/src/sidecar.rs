//! A pod's Istio sidecar as istio-cni reads it: whether the pod is meshed
//! ([`meshed`], the checks of istio-cni's `CmdAdd`, istio
//! `cni/pkg/plugin/plugin.go`, plus the host network and `interceptionMode:
//! NONE`), and its policy from its own annotations and its `istio-proxy`
//! container ([`policy_of`], istio-cni's `NewRedirect` and `Program`,
//! `cni/pkg/plugin/sidecar_redirect.go` and `sidecar_iptables_linux.go`).
//! One decision for the CNI plugin and the daemon's pod watch.
//!
//! A pod with an `istio-init` container is not meshed here: its init
//! container configures it (`divert init` registers it through the daemon's
//! socket), and nothing else overwrites that registration.

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;

use crate::policy::{self, DnsCapture, Policy, PolicyArgs, Source};

/// The sidecar's container name.
pub const ISTIO_PROXY: &str = "istio-proxy";
/// The init container of a pod that configures its own interception.
pub const ISTIO_INIT: &str = "istio-init";
/// The injector's record that it injected the pod.
pub const STATUS: &str = "sidecar.istio.io/status";
/// Injection on or off: a label (which wins) or an annotation.
pub const INJECT: &str = "sidecar.istio.io/inject";
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const INCLUDE_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const EXCLUDE_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
/// The proxy's environment variable that turns DNS capture on.
pub const DNS_CAPTURE_ENV: &str = "ISTIO_META_DNS_CAPTURE";

/// Inbound ports istio-cni always leaves alone (the agent's status port,
/// Envoy's health and Prometheus ports), added to `excludeInboundPorts`.
const ALWAYS_EXCLUDED_INBOUND: [&str; 3] = ["15020", "15021", "15090"];
/// istio-cni's default of `excludeInboundPorts` and of
/// `excludeOutboundPorts` (its `defaultRedirectExcludePort`, the status
/// port).
const DEFAULT_EXCLUDED_PORT: &str = "15020";

/// Why a pod is not meshed (what istio-cni logs as "excluded").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("host-network pod: it shares the node's network namespace")]
    HostNetwork,
    #[error("namespace {0} is excluded")]
    ExcludedNamespace(String),
    #[error("it has an istio-init container, which configures it")]
    IstioInit,
    #[error("DISABLE_ENVOY is set on istio-proxy")]
    EnvoyDisabled,
    #[error("no istio-proxy container")]
    NoSidecar,
    #[error("its proxy is a {0}, not a sidecar")]
    ProxyType(String),
    #[error("{INJECT} is false")]
    InjectDisabled,
    #[error("no {STATUS} annotation: not injected")]
    NotInjected,
    #[error("{INTERCEPTION_MODE} is NONE")]
    InterceptionNone,
}

/// A pod annotation (or proxy setting) that could not be used: the pod is
/// not configured at all.
#[derive(Debug, thiserror::Error)]
#[error("annotation {annotation}={value:?}: {reason}")]
pub struct BadAnnotation {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

/// Every container of the pod, init containers first (a native sidecar is
/// an init container).
fn containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    pod.spec.iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    })
}

/// The pod's `istio-proxy` container, if it has one.
pub fn proxy(pod: &Pod) -> Option<&Container> {
    containers(pod).find(|c| c.name == ISTIO_PROXY)
}

/// The value of `istio-proxy`'s environment variable `name` (a literal
/// value; one from a reference reads as absent).
fn proxy_env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// Whether `pod` is meshed, in istio-cni's order: host network (kubelet
/// never calls CNI for it); a namespace of `exclude_namespaces`; an
/// `istio-init` container; `DISABLE_ENVOY` true on `istio-proxy`; no
/// `istio-proxy` container; a proxy that is not a sidecar (`proxy router`,
/// a gateway); `sidecar.istio.io/inject` false (the label beats the
/// annotation; a value Go's `ParseBool` rejects counts as unset); no
/// `sidecar.istio.io/status`; and `interceptionMode: NONE`.
pub fn meshed(pod: &Pod, exclude_namespaces: &[String]) -> Result<(), Skip> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Err(Skip::HostNetwork);
    }
    let ns = pod.namespace().unwrap_or_default();
    if exclude_namespaces.contains(&ns) {
        return Err(Skip::ExcludedNamespace(ns));
    }
    if containers(pod).any(|c| c.name == ISTIO_INIT) {
        return Err(Skip::IstioInit);
    }
    if let Some(c) = proxy(pod) {
        if proxy_env(c, "DISABLE_ENVOY").and_then(|v| policy::go_bool(v).ok()) == Some(true) {
            return Err(Skip::EnvoyDisabled);
        }
    }
    let Some(c) = proxy(pod) else {
        return Err(Skip::NoSidecar);
    };
    if let Some(args) = &c.args {
        if args.len() >= 2 && args[0] == "proxy" && args[1] != "sidecar" {
            return Err(Skip::ProxyType(args[1].clone()));
        }
    }
    let inject = pod
        .labels()
        .get(INJECT)
        .or_else(|| pod.annotations().get(INJECT));
    if inject.and_then(|v| policy::go_bool(v).ok()) == Some(false) {
        return Err(Skip::InjectDisabled);
    }
    if !pod.annotations().contains_key(STATUS) {
        return Err(Skip::NotInjected);
    }
    if pod.annotations().get(INTERCEPTION_MODE).map(String::as_str) == Some("NONE") {
        return Err(Skip::InterceptionNone);
    }
    Ok(())
}

/// The policy of a meshed pod as istio-cni computes it: each annotation
/// present (even empty) over istio-cni's default — include ranges `*`,
/// exclude ranges none, include inbound ports `*`, exclude inbound ports
/// and exclude outbound ports `15020`, include outbound ports none — with
/// 15020, 15021 and 15090 always added to the excluded inbound ports; the
/// proxy's UID and GID from `istio-proxy`'s `runAsUser` / `runAsGroup`
/// (unset or 0: 1337); DNS capture of every address (istio-cni's
/// `--capture-all-dns`) when `istio-proxy` has `ISTIO_META_DNS_CAPTURE`
/// true. What divert's eBPF backend does not do is refused by the
/// annotation or variable that asked: `interceptionMode: TPROXY`, excluded
/// and virtual interfaces, `INVALID_DROP`. Errors name the first bad
/// annotation.
pub fn policy_of(pod: &Pod) -> Result<Policy, BadAnnotation> {
    let a = pod.annotations();
    let who = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    let refuse = |annotation: &str, reason: &str| BadAnnotation {
        annotation: annotation.to_string(),
        value: a.get(annotation).cloned().unwrap_or_default(),
        reason: reason.to_string(),
    };
    match a.get(INTERCEPTION_MODE).map(String::as_str) {
        None | Some("REDIRECT") => {}
        Some("TPROXY") => {
            return Err(refuse(
                INTERCEPTION_MODE,
                "TPROXY interception is not done by divert's eBPF backend (istio-init with --backend iptables does it)",
            ))
        }
        Some(_) => return Err(refuse(INTERCEPTION_MODE, "must be REDIRECT, TPROXY or NONE")),
    }
    for (key, what) in [
        (EXCLUDE_INTERFACES, "excluded interfaces"),
        (KUBEVIRT_INTERFACES, "virtual interfaces"),
        (REROUTE_VIRTUAL_INTERFACES, "virtual interfaces"),
    ] {
        if a.get(key).is_some_and(|v| !v.is_empty()) {
            return Err(refuse(
                key,
                &format!("{what} are not applied by divert's eBPF backend: left unapplied they would capture more, or less, than asked"),
            ));
        }
    }
    let proxy = proxy(pod);
    let env = |name: &str| proxy.and_then(|c| proxy_env(c, name));
    if env("INVALID_DROP").and_then(|v| policy::go_bool(v).ok()) == Some(true) {
        return Err(BadAnnotation {
            annotation: format!("{ISTIO_PROXY} environment variable INVALID_DROP"),
            value: env("INVALID_DROP").unwrap_or_default().to_string(),
            reason: "dropping invalid packets is not done by divert's eBPF backend".into(),
        });
    }
    let security = proxy.and_then(|c| c.security_context.as_ref());
    let id = |v: Option<i64>| match v {
        Some(id) if id != 0 => id.to_string(),
        _ => policy::DEFAULT_PROXY_ID.to_string(),
    };
    let value = |key: &str, default: &str| a.get(key).cloned().unwrap_or_else(|| default.into());
    let mut exclude_inbound: Vec<String> = Vec::new();
    for p in value(EXCLUDE_INBOUND_PORTS, DEFAULT_EXCLUDED_PORT)
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .chain(ALWAYS_EXCLUDED_INBOUND)
    {
        if !exclude_inbound.iter().any(|q| q == p) {
            exclude_inbound.push(p.to_string());
        }
    }
    let args = PolicyArgs {
        proxy_port: policy::DEFAULT_PROXY_PORT.to_string(),
        inbound_capture_port: policy::DEFAULT_INBOUND_CAPTURE_PORT.to_string(),
        inbound_tunnel_port: policy::DEFAULT_INBOUND_TUNNEL_PORT.to_string(),
        proxy_uids: id(security.and_then(|s| s.run_as_user)),
        proxy_gids: id(security.and_then(|s| s.run_as_group)),
        include_ranges: value(INCLUDE_RANGES, "*"),
        exclude_ranges: value(EXCLUDE_RANGES, ""),
        include_ports: value(INCLUDE_PORTS, ""),
        exclude_ports: value(EXCLUDE_PORTS, DEFAULT_EXCLUDED_PORT),
        owner_groups: "*".into(),
        owner_groups_exclude: String::new(),
        inbound_ports: value(INCLUDE_INBOUND_PORTS, "*"),
        inbound_exclude_ports: exclude_inbound.join(","),
        // DNS capture is set below: istio-cni captures every address's
        // port 53 (it cannot read the pod's resolv.conf).
        redirect_dns: false,
        capture_all_dns: false,
        resolv_conf: "/etc/resolv.conf".into(),
    };
    let annotation_of = |field: &str| match field {
        "include_ranges" => Some(INCLUDE_RANGES),
        "exclude_ranges" => Some(EXCLUDE_RANGES),
        "include_ports" => Some(INCLUDE_PORTS),
        "exclude_ports" => Some(EXCLUDE_PORTS),
        "inbound_ports" => Some(INCLUDE_INBOUND_PORTS),
        "inbound_exclude_ports" => Some(EXCLUDE_INBOUND_PORTS),
        _ => None,
    };
    let origin = |field: &str| -> Source {
        match annotation_of(field) {
            Some(ann) => Source::Annotation {
                pod: who.clone(),
                annotation: ann.to_string(),
            },
            None => Source::Default(format!("{field} (istio-cni's)")),
        }
    };
    let mut policy = args.to_policy_from(&origin).map_err(|e| {
        let annotation = match e.origin() {
            Source::Annotation { annotation, .. } => annotation.clone(),
            other => other.to_string(),
        };
        BadAnnotation {
            value: a.get(&annotation).cloned().unwrap_or_default(),
            annotation,
            reason: e.to_string(),
        }
    })?;
    // istio-cni: a value Go's ParseBool rejects is logged and means off.
    if env(DNS_CAPTURE_ENV).and_then(|v| policy::go_bool(v).ok()) == Some(true) {
        policy.dns = Some(DnsCapture {
            capture_all: true,
            servers_v4: Vec::new(),
            servers_v6: Vec::new(),
        });
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{InboundPorts, IncludeRanges};

    /// The pod template of one of Istio's injector goldens
    /// (`tests/testdata/istio-inject/`).
    fn injected(name: &str) -> Pod {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/testdata/istio-inject")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        // The first document (the files end with a `---`).
        use serde::Deserialize as _;
        let doc = serde_yaml_ng::Deserializer::from_str(&text)
            .next()
            .map(serde_yaml_ng::Value::deserialize)
            .unwrap()
            .unwrap();
        let template = doc
            .get("spec")
            .and_then(|s| s.get("template"))
            .cloned()
            .unwrap_or(doc);
        let mut pod: Pod = serde_yaml_ng::from_value(template).unwrap();
        pod.metadata.name = Some("hello-1".into());
        pod.metadata.namespace = Some("default".into());
        pod
    }

    #[test]
    fn an_injected_cni_pod_is_meshed_with_istio_cnis_policy() {
        let pod = injected("hello.yaml.cni.injected");
        assert_eq!(meshed(&pod, &[]), Ok(()));
        let p = policy_of(&pod).unwrap();
        assert_eq!(p.include_ranges, IncludeRanges::All);
        assert_eq!(p.inbound_ports, InboundPorts::All);
        assert_eq!(p.inbound_exclude_ports, vec![15020, 15021, 15090]);
        assert_eq!(p.exclude_ports, vec![15020]);
        assert_eq!(
            (p.proxy_uids.as_slice(), p.proxy_gids.as_slice()),
            (&[1337][..], &[1337][..])
        );
        assert_eq!(p.dns, None);
        // The proxy's UID and GID from its securityContext.
        let p = policy_of(&injected("proxy-override-runas.yaml.cni.injected")).unwrap();
        assert_eq!((p.proxy_uids, p.proxy_gids), (vec![1234], vec![4321]));
    }

    #[test]
    fn pods_istio_cni_leaves_alone_are_not_meshed() {
        let cni = injected("hello.yaml.cni.injected");
        // istio-init configures its own pod.
        assert_eq!(
            meshed(&injected("hello.yaml.injected"), &[]),
            Err(Skip::IstioInit)
        );
        let mut p = cni.clone();
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(meshed(&p, &[]), Err(Skip::HostNetwork));
        assert_eq!(
            meshed(&cni, &["default".to_string()]),
            Err(Skip::ExcludedNamespace("default".into()))
        );
        let mut p = cni.clone();
        p.metadata.annotations.as_mut().unwrap().remove(STATUS);
        assert_eq!(meshed(&p, &[]), Err(Skip::NotInjected));
        // The label beats the annotation.
        let mut p = cni.clone();
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(INJECT.into(), "true".into());
        p.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(INJECT.into(), "false".into());
        assert_eq!(meshed(&p, &[]), Err(Skip::InjectDisabled));
        let mut p = cni.clone();
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(INTERCEPTION_MODE.into(), "NONE".into());
        assert_eq!(meshed(&p, &[]), Err(Skip::InterceptionNone));
        // No sidecar at all: the application's own containers only.
        let mut p = cni;
        let spec = p.spec.as_mut().unwrap();
        spec.init_containers = None;
        spec.containers.retain(|c| c.name != ISTIO_PROXY);
        assert_eq!(meshed(&p, &[]), Err(Skip::NoSidecar));
    }

    #[test]
    fn what_the_ebpf_backend_cannot_apply_is_refused_by_its_annotation() {
        let pod = injected("hello.yaml.cni.injected");
        let with = |k: &str, v: &str| {
            let mut p = pod.clone();
            p.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(k.into(), v.into());
            policy_of(&p).unwrap_err()
        };
        for (k, v) in [
            (INTERCEPTION_MODE, "TPROXY"),
            (EXCLUDE_INTERFACES, "eth1"),
            (KUBEVIRT_INTERFACES, "net1"),
            (INCLUDE_RANGES, "10.0.0.0/33"),
            (EXCLUDE_INBOUND_PORTS, "http"),
        ] {
            let e = with(k, v);
            assert_eq!((e.annotation.as_str(), e.value.as_str()), (k, v), "{e}");
        }
    }
}
