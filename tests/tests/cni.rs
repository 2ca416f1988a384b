//! `divert-cni` driven exactly as a container runtime drives a chained CNI
//! plugin (root; its own namespaces, cgroups and bpffs): `CNI_COMMAND`,
//! `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_ARGS` with the pod's
//! name, `CNI_PATH`, and the network configuration with `prevResult` on
//! stdin, against the node daemon and a fake API server serving Istio's own
//! injected pod (`tests/testdata/istio-inject/hello.yaml.cni.injected`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use divert::policy::Action;
use divert_tests::{
    cases::expected,
    divert_bin,
    fake_api::{kubeconfig, FakeApi},
    node::Setup,
    require_root,
};
use serde_json::{json, Value};

/// The pod template of Istio's CNI-mode injector golden as a pod named
/// `default/<name>`, with `annotations` added (or, with a null value,
/// removed).
fn pod(name: &str, annotations: &[(&str, Option<&str>)]) -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/istio-inject/hello.yaml.cni.injected");
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("\n---").next().unwrap();
    let doc: Value = serde_yaml_ng::from_str(text).unwrap();
    let mut p = doc["spec"]["template"].clone();
    p["apiVersion"] = json!("v1");
    p["kind"] = json!("Pod");
    p["metadata"]["name"] = json!(name);
    p["metadata"]["namespace"] = json!("default");
    p["metadata"]["uid"] = json!(format!("uid-{name}"));
    for (k, v) in annotations {
        match v {
            Some(v) => p["metadata"]["annotations"][*k] = json!(v),
            None => {
                p["metadata"]["annotations"]
                    .as_object_mut()
                    .unwrap()
                    .remove(*k);
            }
        }
    }
    p
}

/// Run the injected pod's `istio-validation` container (`istio-iptables
/// … --run-validation --skip-rule-apply`, as the injector writes it) in
/// `netns` as UID/GID 1337, under the daemon's cgroup root, with a short
/// probe timeout: its exit status.
fn validation(s: &Setup, netns: &divert_tests::Netns) -> Option<i32> {
    let p = pod("x", &[]);
    let c = p["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "istio-validation")
        .unwrap();
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(args[0], "istio-iptables");
    let (mut cmd, _keep) = divert_tests::command_in(
        divert_tests::Placement {
            netns,
            cgroup: &s.lab.plain,
            ids: Some((1337, 1337)),
        },
        divert_bin(),
    )
    .unwrap();
    let out = cmd
        .args(&args)
        .arg("--probe-timeout=2s")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    out.status.code()
}

/// A pod with no sidecar: the application's container only.
fn plain_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    })
}

/// `divert` under the name the conflist gives it.
fn plugin(dir: &Path) -> PathBuf {
    let p = dir.join("divert-cni");
    if !p.exists() {
        std::os::unix::fs::symlink(divert_bin(), &p).unwrap();
    }
    p
}

const PREV_RESULT: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.244.1.17/24","interface":0}]}"#;

struct Cni {
    bin: PathBuf,
    config: Value,
    netns: PathBuf,
}

impl Cni {
    /// Run one command as the runtime would: (exit code, stdout as JSON).
    fn call(&self, command: &str, pod: Option<&str>) -> (Option<i32>, Value) {
        let args = match pod {
            Some(name) => format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=uid-{name}"
            ),
            None => "IgnoreUnknown=1".to_string(),
        };
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "0123abcd")
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", "/opt/cni/bin");
        let out = divert_tests::output_with_stdin(&mut cmd, self.config.to_string().as_bytes());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "{command}: stdout is not JSON ({e}): {stdout} / stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    }
}

#[test]
fn the_cni_plugin_registers_meshed_pods_before_they_start_and_nothing_else() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let pods = vec![
        pod("hello-1", &[]),
        plain_pod("plain-1"),
        pod(
            "bad-1",
            &[(
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                Some("10.0.0.0/33"),
            )],
        ),
        pod("optout-1", &[("sidecar.istio.io/inject", Some("false"))]),
    ];
    let api = FakeApi::start(
        pods,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    let dir = s.bpffs.dir.path();
    let cni = Cni {
        bin: plugin(dir),
        config: json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "divert-cni",
            "kubernetes": {"kubeconfig": kubeconfig(dir, api.addr)},
            "daemon_socket": s.socket,
            "exclude_namespaces": ["kube-system"],
            "pod_get_attempts": 1,
            "prevResult": serde_json::from_str::<Value>(PREV_RESULT).unwrap(),
        }),
        netns: s.lab.client.path(),
    };
    let (cookie, _) = s.lab.client_identity().unwrap();
    let registered = || s.is_registered(cookie);
    let passed_through = |v: &Value| {
        let mut want: Value = serde_json::from_str(PREV_RESULT).unwrap();
        want["cniVersion"] = json!("1.0.0");
        *v == want
    };
    let dst = SocketAddr::new(s.lab.v4(2), 80);
    let dial = || s.lab.dial(dst, 1000, 1000, false).unwrap();

    let (code, v) = cni.call("VERSION", None);
    assert_eq!(code, Some(0));
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")),
        "{v}"
    );

    // Not a Kubernetes pod, a pod without a sidecar, an opted-out pod:
    // passed through, untouched.
    for pod in [None, Some("plain-1"), Some("optout-1")] {
        let (code, v) = cni.call("ADD", pod);
        assert_eq!(code, Some(0), "{pod:?}: {v}");
        assert!(passed_through(&v), "{pod:?}: {v}");
        assert!(!registered(), "{pod:?} was registered");
    }
    assert_eq!(dial(), expected(Action::PassThrough, dst, false));

    // A bad annotation: the spec's error object naming it, nothing registered.
    let (code, v) = cni.call("ADD", Some("bad-1"));
    assert_ne!(code, Some(0), "{v}");
    assert_eq!(v["code"], 100, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains("traffic.sidecar.istio.io/includeOutboundIPRanges")
            && msg.contains("10.0.0.0/33"),
        "{msg}"
    );
    assert!(!registered());

    // The meshed pod: registered by ADD, its first connection diverted.
    let (code, v) = cni.call("ADD", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");
    assert!(passed_through(&v), "{v}");
    assert!(registered());
    let rows = registrations(&s);
    assert_eq!(rows[0]["source"], "cni", "{rows:#?}");
    assert_eq!(dial(), expected(Action::Redirect(15001), dst, false));
    // istio-cni's policy: inbound capture of every port but 15020, 15021,
    // 15090 (the proxy listens on 15006 in the lab).
    let own = SocketAddr::new(s.lab.v4(1), 8080);
    assert_eq!(
        s.lab.dial_in(own).unwrap(),
        format!("proxy {own} orig={own} peer={own}")
    );
    let (code, v) = cni.call("CHECK", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");
    // The injector's istio-validation container, its arguments as Istio
    // writes them, as its UID, in a pod registered this way (a namespace of
    // its own, where nothing listens yet, as before the proxy starts).
    let fresh =
        divert_tests::Netns::create(&format!("divert-test-{}-cni", std::process::id())).unwrap();
    let in_fresh = Cni {
        netns: fresh.path(),
        bin: cni.bin.clone(),
        config: cni.config.clone(),
    };
    assert_eq!(
        validation(&s, &fresh),
        Some(126),
        "istio-validation fails unregistered"
    );
    let (code, v) = in_fresh.call("ADD", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        validation(&s, &fresh),
        Some(0),
        "istio-validation passes registered"
    );
    let (code, v) = in_fresh.call("DEL", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");

    // DEL unregisters; CHECK then says the meshed pod is not registered.
    let (code, v) = cni.call("DEL", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");
    assert!(!registered());
    assert_eq!(dial(), expected(Action::PassThrough, dst, false));
    let (code, v) = cni.call("CHECK", Some("hello-1"));
    assert_ne!(code, Some(0), "{v}");
    assert_eq!(v["code"], 102, "{v}");

    // A pod the API server does not have, and a daemon that does not
    // answer: errors the runtime shows (101), and retries (11).
    let (code, v) = cni.call("ADD", Some("missing-1"));
    assert_ne!(code, Some(0), "{v}");
    assert_eq!(v["code"], 101, "{v}");
    let mut no_daemon = cni.config.clone();
    no_daemon["daemon_socket"] = json!(dir.join("no-such.sock"));
    let down = Cni {
        config: no_daemon,
        bin: cni.bin.clone(),
        netns: cni.netns.clone(),
    };
    let (code, v) = down.call("ADD", Some("hello-1"));
    assert_ne!(code, Some(0), "{v}");
    assert_eq!(v["code"], 11, "{v}");
    assert!(!registered());

    // DEL for a namespace that is gone already succeeds.
    let gone = Cni {
        netns: "/run/netns/divert-test-no-such-namespace".into(),
        ..cni
    };
    let (code, v) = gone.call("DEL", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");
}

#[test]
fn the_daemon_chains_the_plugin_into_the_primary_conflist_and_keeps_it_there() {
    require_root!();
    let s = Setup::start();
    let dir = s.bpffs.dir.path();
    let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let flannel = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cni/10-flannel.conflist"),
    )
    .unwrap();
    let conflist = conf.join("10-flannel.conflist");
    std::fs::write(&conflist, &flannel).unwrap();
    let api = FakeApi::start(
        vec![pod("hello-1", &[])],
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    let kubeconfig = kubeconfig(dir, api.addr);
    let cni_flags = [
        "--cni-conf-dir".to_string(),
        conf.display().to_string(),
        "--cni-bin-dir".to_string(),
        bin.display().to_string(),
    ];
    let mut flags: Vec<&str> = cni_flags.iter().map(String::as_str).collect();
    let kc = kubeconfig.display().to_string();
    flags.extend(["--cni-kubeconfig", &kc]);
    let daemon = s.daemon_with(&flags);
    let ours = |text: &str| -> Option<Value> {
        let v: Value = serde_json::from_str(text).ok()?;
        v["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["type"] == "divert-cni")
            .cloned()
    };
    divert_tests::fake_api::wait_until("divert-cni chained", || {
        ours(&std::fs::read_to_string(&conflist).unwrap()).is_some()
    });
    let entry = ours(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    assert_eq!(entry["daemon_socket"], json!(s.socket), "{entry}");
    assert_eq!(
        entry["kubernetes"]["kubeconfig"],
        json!(kubeconfig),
        "{entry}"
    );
    let installed = bin.join("divert-cni");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(divert_bin()).unwrap(),
        "the plugin is this build's binary"
    );

    // The runtime runs the installed plugin with its entry of the list.
    let mut config = entry.clone();
    config["cniVersion"] = json!("0.3.1");
    config["name"] = json!("cbr0");
    config["pod_get_attempts"] = json!(1);
    config["prevResult"] = serde_json::from_str(PREV_RESULT).unwrap();
    let runtime = Cni {
        bin: installed,
        config,
        netns: s.lab.client.path(),
    };
    let (code, v) = runtime.call("ADD", Some("hello-1"));
    assert_eq!(code, Some(0), "{v}");
    let dst = SocketAddr::new(s.lab.v4(2), 80);
    assert_eq!(
        s.lab.dial(dst, 1000, 1000, false).unwrap(),
        expected(Action::Redirect(15001), dst, false)
    );

    // Flannel rewrites its file: divert-cni is chained again.
    let rewritten = flannel.replace("cbr0", "cbr1");
    std::fs::write(&conflist, &rewritten).unwrap();
    divert_tests::fake_api::wait_until("divert-cni chained again", || {
        ours(&std::fs::read_to_string(&conflist).unwrap()).is_some()
    });

    // Uninstall: flannel's latest file back byte for byte, no plugin left.
    drop(daemon);
    let out = Command::new(divert_bin())
        .args(["daemon", "--uninstall", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .args(&cni_flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), rewritten);
    assert!(!bin.join("divert-cni").exists());
    let left: Vec<_> = std::fs::read_dir(&conf)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

/// The rows `divert maps -o json` shows for the daemon's bpffs.
fn registrations(s: &Setup) -> Vec<Value> {
    let out = Command::new(divert_bin())
        .args(["maps", "-o", "json", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .output()
        .unwrap();
    serde_json::from_slice::<Vec<Value>>(&out.stdout)
        .unwrap_or_else(|e| panic!("divert maps: {e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The plugin in a real container runtime's chain: Debian's podman with
/// its CNI backend (bridge, then `divert-cni`) runs busybox containers
/// named as the pods the fake API server serves. podman passes
/// `K8S_POD_NAME=<container name>` and appends the `CNI_ARGS` it is given
/// (`K8S_POD_NAMESPACE=default`). Each container's first command connects
/// to the peer's server; a busybox `nc` in the container listens on 15001
/// as the proxy would.
#[test]
fn a_real_container_runtime_runs_the_plugin_in_its_chain() {
    require_root!();
    let s = Setup::start();
    let daemon = s.daemon();
    let bad = (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        Some("80,http"),
    );
    // The runtime runs in the peer namespace, and so does the plugin it
    // executes: the API server is served there.
    let api = FakeApi::start_in(
        &s.lab.peer,
        vec![pod("cart", &[]), plain_pod("plain"), pod("bad", &[bad])],
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    let dir = s.bpffs.dir.path();
    let bin_dir = dir.join("cni-bin");
    std::fs::create_dir(&bin_dir).unwrap();
    plugin(&bin_dir);
    let pods = s.lab.root.child("pods").unwrap();
    let podman = divert_tests::podman::Podman::new(
        &s.lab.peer,
        &pods,
        s.lab.n,
        vec![json!({
            "type": "divert-cni",
            "kubernetes": {"kubeconfig": kubeconfig(dir, api.addr)},
            "daemon_socket": s.socket,
            "pod_get_attempts": 1,
        })],
        &[&bin_dir],
    )
    .unwrap();
    podman.busybox().unwrap();

    let peer = s.lab.v4(2);
    // Every try either reaches a listener or is refused (the container's
    // own listener not up yet): the first answer is the first connection
    // that got anywhere.
    let script = format!(
        "nc -ll -p 15001 -e echo diverted & \
         for i in $(seq 50); do out=$(nc -w 2 {peer} 80 </dev/null); \
         [ -n \"$out\" ] && break; sleep 0.1; done; echo \"answer: $out\"; sleep 60"
    );
    let start = |name: &str, k8s: bool| {
        let mut cmd = podman.command();
        cmd.args(podman.run_on(&podman.network))
            .args([
                "-d",
                "--name",
                name,
                divert_tests::podman::BUSYBOX,
                "sh",
                "-c",
            ])
            .arg(&script);
        if k8s {
            cmd.env("CNI_ARGS", "K8S_POD_NAMESPACE=default");
        }
        cmd.output().unwrap()
    };
    let answer = |name: &str| -> String {
        for _ in 0..200 {
            let out = podman.run(&["logs", name]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(a) = text.lines().find_map(|l| l.strip_prefix("answer: ")) {
                return a.to_string();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{name} did not answer")
    };
    let direct = format!("server {peer}:80");

    // The meshed pod: registered before its container ran, so its first
    // connection reached its proxy.
    let out = start("cart", true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(answer("cart"), "diverted");
    let rows = registrations(&s);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["exclude_ports"], json!([15020]), "{rows:#?}");
    assert_eq!(rows[0]["source"], "cni", "{rows:#?}");

    // A pod without a sidecar, and a container that is not a pod: passed
    // through, nothing registered.
    for (name, k8s) in [("plain", true), ("not-a-pod", false)] {
        let out = start(name, k8s);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(answer(name), direct, "{name}");
    }
    assert_eq!(registrations(&s).len(), 1);

    // A bad annotation: the runtime's ADD fails with the plugin's error
    // naming it, and the container never runs.
    let out = start("bad", true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the bad pod started: {err}");
    assert!(
        err.contains("traffic.sidecar.istio.io/excludeOutboundPorts") && err.contains("80,http"),
        "{err}"
    );
    assert_eq!(registrations(&s).len(), 1);

    // A daemon restart changes nothing of what the plugin registered.
    let settled = || {
        let mut rows = registrations(&s);
        rows.iter_mut()
            .for_each(|r| r["registered_at"] = Value::Null);
        rows
    };
    let before = settled();
    drop(daemon);
    let _daemon = s.daemon();
    assert_eq!(settled(), before, "a restart changed the policy");

    // Removing the meshed pod's container: the runtime's DEL unregisters
    // it (the daemon says so; its collector would say "namespace gone").
    let out = podman
        .run(&["rm", "--force", "--time", "0", "cart"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(registrations(&s).is_empty());
    let log = std::fs::read_to_string(dir.join("daemon-2.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("unregistered")),
        "no unregister request: {log}"
    );
}
