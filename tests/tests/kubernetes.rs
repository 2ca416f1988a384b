//! `divert daemon --kubernetes` against a fake API server that serves
//! recorded list/watch JSON (`tests/testdata/kubernetes/`) over real HTTP to
//! the real kube-rs client: a pod injected for istio-cni is registered with
//! the policy the CNI plugin gives it, an annotation change is applied to
//! the running pod, a bad annotation posts an Event and changes nothing,
//! and a pod that is its istio-init's is let go.

use std::{net::SocketAddr, path::PathBuf};

use divert::policy::Action;
use divert_tests::{
    cases::expected,
    command_in,
    fake_api::{kubeconfig, wait_until, FakeApi},
    node::Setup,
    require_root, Daemon,
};
use serde_json::{json, Value};

const POD_UID: &str = "7d5c3b1e-4a2f-4e8b-9c61-2f0d6e1a9b33";

fn testdata(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/kubernetes")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The pod with UID `uid`: a process in the client namespace, in a cgroup
/// named the way kubelet names the pod's (cgroupfs driver). Killed (and
/// its cgroups removed) on drop. Tests running at once use different UIDs:
/// the daemon finds a pod's process by its UID anywhere on the machine.
fn pod_process(s: &Setup, uid: &str) -> (Daemon, [divert_tests::Cgroup; 3]) {
    let kubepods = s.lab.root.child("kubepods").unwrap();
    let besteffort = kubepods.child("besteffort").unwrap();
    let pod_cg = besteffort.child(&format!("pod{uid}")).unwrap();
    let (mut pause, _keep) = command_in(s.lab.in_client(&pod_cg, None), "sleep").unwrap();
    pause.arg("600");
    let pause = Daemon::spawn("pause", pause).unwrap();
    (pause, [pod_cg, besteffort, kubepods])
}

#[test]
fn pods_are_registered_from_their_annotations_live() {
    require_root!();
    let s = Setup::start();
    let _pod_process = pod_process(&s, POD_UID);

    let pod = testdata("pod-cart-1.json");
    let api = FakeApi::start(vec![pod.clone()], testdata("namespace-shop.json"));
    let config = kubeconfig(s.bpffs.dir.path(), api.addr);
    let _daemon = s.daemon_env(
        &["--kubernetes"],
        &[
            ("KUBECONFIG", config.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
        ],
    );

    let (cookie, _) = s.lab.client_identity().unwrap();
    let registered = || s.is_registered(cookie);
    wait_until("the pod registered", registered);
    let peer = s.lab.v4(2);
    let dial = |port: u16| {
        let dst = SocketAddr::new(peer, port);
        (dst, s.lab.dial(dst, 1000, 1000, false).unwrap())
    };
    let redirected = |port| {
        let (dst, got) = dial(port);
        got == expected(Action::Redirect(15001), dst, false)
    };
    // The annotation excludes 8080; present, it replaces istio-cni's
    // default (15020), which is therefore redirected.
    assert!(redirected(80));
    assert!(!redirected(8080));
    assert!(redirected(15020));
    let (_, metrics) = s.http_get("/metrics");
    assert!(
        metrics.contains(r#"source_workload_namespace="shop",source_pod="cart-1""#),
        "{metrics}"
    );
    // The watch recorded the pod and itself as the registrar in the pinned
    // maps: `divert maps --pod` finds it, and says so.
    let out = std::process::Command::new(divert_tests::divert_bin())
        .args(["maps", "--pod", "shop/cart-1", "-o", "json", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .output()
        .unwrap();
    let rows: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("divert maps: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(rows[0]["netns_cookie"], cookie, "{rows:#}");
    assert_eq!(rows[0]["source"], "kubernetes", "{rows:#}");
    assert_eq!(rows[0]["exclude_ports"], json!([8080]), "{rows:#}");

    // A daemon restart changes no policy: the watch computes the same one.
    let maps_row = || -> Value {
        let out = std::process::Command::new(divert_tests::divert_bin())
            .args(["maps", "--pod", "shop/cart-1", "-o", "json", "--bpffs-dir"])
            .arg(s.bpffs.path())
            .output()
            .unwrap();
        let mut rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        rows[0]["registered_at"] = Value::Null;
        rows[0].clone()
    };
    let before = maps_row();
    drop(_daemon);
    let _daemon = s.daemon_env(
        &["--kubernetes"],
        &[
            ("KUBECONFIG", config.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
        ],
    );
    // The restarted daemon's watch has registered the pod again.
    divert_tests::wait_for_line(
        &s.bpffs.dir.path().join("daemon-2.log"),
        "registered from annotations",
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(maps_row(), before, "a restart changed the policy");

    // Live: the annotation now excludes 80 instead.
    let mut changed = pod.clone();
    changed["metadata"]["resourceVersion"] = json!("5001");
    changed["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] =
        json!("80");
    api.modify(changed.clone());
    wait_until("the annotation change applied", || !redirected(80));
    assert!(redirected(8080));

    // A bad annotation: an Event, a log line, and the pod keeps its policy.
    let mut bad = changed.clone();
    bad["metadata"]["resourceVersion"] = json!("5002");
    bad["metadata"]["annotations"]["traffic.sidecar.istio.io/includeOutboundIPRanges"] =
        json!("10.0.0.0/33");
    api.modify(bad);
    wait_until("the Event posted", || {
        !api.events.lock().unwrap().is_empty()
    });
    let ev = api.events.lock().unwrap()[0].clone();
    assert_eq!(ev["reason"], "DivertBadAnnotation", "{ev}");
    assert_eq!(ev["type"], "Warning", "{ev}");
    assert_eq!(ev["involvedObject"]["uid"], POD_UID, "{ev}");
    let msg = ev["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("traffic.sidecar.istio.io/includeOutboundIPRanges")
            && msg.contains("10.0.0.0/33"),
        "{msg}"
    );
    assert!(!redirected(80), "the bad annotation changed the policy");
    assert!(redirected(8080), "the bad annotation changed the policy");
    let (_, metrics) = s.http_get("/metrics");
    assert!(
        metrics.contains(r#"divert_registration_errors_total{reason="invalid"}"#),
        "{metrics}"
    );

    // An istio-init container now: the pod is its init container's, and
    // the watch takes back what it registered (never a pod it does not
    // own, never one without a sidecar).
    let mut own_init = changed.clone();
    own_init["metadata"]["resourceVersion"] = json!("5003");
    own_init["spec"]["initContainers"][0]["name"] = json!("istio-init");
    api.modify(own_init);
    wait_until("the watch let go of the pod", || !registered());
    assert!(!redirected(80) && !redirected(8080));
}

#[test]
fn a_meshed_pod_that_cannot_be_registered_is_reported_and_tried_again() {
    require_root!();
    let s = Setup::start();
    // A UID of its own (see `pod_process`).
    let uid = "0f1e2d3c-4b5a-4697-8877-665544332211";
    let _pod_process = pod_process(&s, uid);
    let mut pod = testdata("pod-cart-1.json");
    pod["metadata"]["uid"] = json!(uid);
    let api = FakeApi::start(vec![], testdata("namespace-shop.json"));
    let config = kubeconfig(s.bpffs.dir.path(), api.addr);
    let _daemon = s.daemon_env(
        &["--kubernetes"],
        &[
            ("KUBECONFIG", config.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
        ],
    );
    // Another namespace with the pod's address captures inbound first: the
    // pod (also -b '*') cannot be registered while it does.
    let other =
        divert_tests::Netns::create(&format!("divert-test-{}-twin", std::process::id())).unwrap();
    let own = s.lab.v4(1).to_string();
    other
        .ip(&["addr", "add", &format!("{own}/32"), "dev", "lo"])
        .unwrap();
    let init = |extra: &[&str]| {
        let out = s.init_with(&other, &s.socket, extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    init(&["-b", "*", "-i", ""]);
    let (cookie, _) = s.lab.client_identity().unwrap();
    api.modify(pod);
    wait_until("the failure reported", || {
        api.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == "DivertNotRegistered")
    });
    let ev = api.events.lock().unwrap().last().unwrap().clone();
    assert_eq!(ev["involvedObject"]["uid"], uid, "{ev}");
    assert!(
        ev["message"].as_str().unwrap_or_default().contains(&own),
        "the Event says why: {ev}"
    );
    assert!(!s.is_registered(cookie));
    assert!(
        s.http_get("/metrics")
            .1
            .contains("divert_meshed_pods_unregistered 1"),
        "the gauge counts it"
    );
    // The other namespace lets go: the next try registers the pod.
    init(&["--cleanup", "-i", "*"]);
    wait_until("the pod registered on a later try", || {
        s.is_registered(cookie)
    });
    wait_until("the gauge back to 0", || {
        s.http_get("/metrics")
            .1
            .contains("divert_meshed_pods_unregistered 0")
    });
    assert_eq!(
        api.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "DivertNotRegistered")
            .count(),
        1,
        "reported once, not at every try"
    );
}
