//! divert's image (`cargo xtask image`, its OCI archive named by
//! `DIVERT_IMAGE_ARCHIVE`, which `cargo xtask test` sets) run by a real OCI
//! runtime, Debian's podman with runc, offline: the command line, the
//! injector's `istio-iptables` dry run, and the node daemon run as the
//! DaemonSet runs it — its securityContext (capabilities, read-only root,
//! no privilege escalation, the runtime's default seccomp profile), host
//! PID namespace, its memory limit, the lab's "node" namespace as its host
//! network, and its
//! volumes mapped to the test's own bpffs, cgroup, socket and CNI
//! directories. The daemon attaches, takes a registration, captures
//! outbound and inbound (adopting a proxy listening as UID 1337, as
//! Istio's), chains its CNI plugin in and serves /healthz/ready.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use divert_tests::{
    fake_api::{kubeconfig, FakeApi},
    node::{text, try_http_get, Setup},
    podman::Podman,
    require_root, INJECTOR,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::json;

fn archive() -> Option<PathBuf> {
    match std::env::var_os("DIVERT_IMAGE_ARCHIVE") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!(
                "skipped: DIVERT_IMAGE_ARCHIVE is not set (`cargo xtask test` builds the image and sets it)"
            );
            None
        }
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn daemonset() -> DaemonSet {
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

#[test]
fn the_image_runs_offline_and_the_daemon_with_the_daemonsets_privileges() {
    require_root!();
    let Some(archive) = archive() else { return };
    // Istio's proxy runs as 1337: the daemon adopts its listener through
    // /proc/PID/fd of a process that is not root's.
    let s = Setup::start_with_proxy(Some((1337, 1337)));
    let containers = s.lab.root.child("containers").unwrap();
    let podman = Podman::new(&s.lab.peer, &containers, s.lab.n, vec![], &[]).unwrap();
    let out = podman
        .run(&["load", "--quiet", "--input", archive.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "podman load: {}", text(&out.stderr));

    let ds = daemonset();
    let spec = ds.spec.unwrap().template.spec.unwrap();
    let c = &spec.containers[0];
    let image = c.image.clone().unwrap();
    // The archive holds the image under the name the DaemonSet gives it
    // (nothing is pulled: the run below is offline).
    let out = podman.run(&["image", "exists", &image]).unwrap();
    assert!(
        out.status.success(),
        "the DaemonSet names {image}, which the archive does not hold"
    );
    let offline = |args: &[&str]| {
        let mut cmd = podman.command();
        cmd.args(podman.run_on("none"))
            .args(["--rm", &image])
            .args(args);
        cmd.output().unwrap()
    };

    // The command line.
    let out = offline(&["--version"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("divert {}\n", env!("CARGO_PKG_VERSION"))
    );
    // istio-init's command line, as the injector writes it, dry run: the
    // image has what the iptables backend needs.
    let mut dry = vec!["istio-iptables"];
    dry.extend_from_slice(INJECTOR);
    dry.push("--dry-run");
    let out = offline(&dry);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rules = text(&out.stdout);
    assert!(
        rules.contains("-A ISTIO_OUTPUT") && rules.contains("-A ISTIO_REDIRECT"),
        "{rules}"
    );

    // The daemon, as the DaemonSet runs it.
    // A bpffs of the test's own standing for the node's /sys/fs/bpf (the
    // daemon pins under its divert/): unmounted, with what is pinned, on
    // drop.
    let bpffs = divert_tests::node::Bpffs::tempdir();
    std::fs::create_dir(bpffs.path()).unwrap();
    nix::mount::mount(
        Some("bpf"),
        &bpffs.path(),
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let node = tempfile::Builder::new()
        .prefix("divert-image-node-")
        .tempdir()
        .unwrap();
    let (run_dir, net_d, cni_bin) = (
        node.path().join("run"),
        node.path().join("net.d"),
        node.path().join("cni-bin"),
    );
    for d in [&run_dir, &net_d, &cni_bin] {
        std::fs::create_dir(d).unwrap();
    }
    let flannel = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/cni/10-flannel.conflist");
    std::fs::copy(&flannel, net_d.join("10-flannel.conflist")).unwrap();
    let api = FakeApi::start_in(
        &s.lab.peer,
        vec![],
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}),
    );
    let config = kubeconfig(&net_d, api.addr);
    // The node's paths the DaemonSet mounts, and the test's stand-ins.
    let host_path = |p: &str| -> PathBuf {
        match p {
            "/sys/fs/bpf" => bpffs.path(),
            "/sys/fs/cgroup" => s.lab.root.path.clone(),
            "/var/run/divert" => run_dir.clone(),
            "/etc/cni/net.d" => net_d.clone(),
            "/opt/cni/bin" => cni_bin.clone(),
            other => panic!("the DaemonSet mounts {other}: give the test a stand-in"),
        }
    };

    let mut cmd = podman.command();
    let network = format!("ns:{}", s.lab.peer.path().display());
    cmd.args(podman.run_on(&network))
        .args(["-d", "--name", "divert"]);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.host_pid, Some(true));
    cmd.args(["--pid", "host"]);
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.clone().unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    cmd.args(["--cap-drop", "all"]);
    for cap in caps.add.iter().flatten() {
        cmd.args(["--cap-add", cap]);
    }
    if sc.read_only_root_filesystem == Some(true) {
        cmd.arg("--read-only");
    }
    if sc.allow_privilege_escalation == Some(false) {
        cmd.args(["--security-opt", "no-new-privileges"]);
    }
    // RuntimeDefault: podman's default profile, which it applies unless
    // told otherwise.
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    cmd.args(["--user", &sc.run_as_user.unwrap().to_string()]);
    // The memory limit the manifest sets (Mi): the daemon's maps are
    // charged to its cgroup, so it must start within it.
    let limit = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .map(|q| q.0.clone())
        .expect("a memory limit");
    let mib: u64 = limit
        .strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("memory limit {limit}: give the test its Mi"));
    cmd.args(["--memory", &format!("{}", mib << 20)]);
    let volumes = spec.volumes.clone().unwrap();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes.iter().find(|v| v.name == m.name).unwrap();
        let from = host_path(&v.host_path.as_ref().unwrap().path);
        let ro = if m.read_only == Some(true) { ":ro" } else { "" };
        cmd.args(["-v", &format!("{}:{}{ro}", from.display(), m.mount_path)]);
    }
    cmd.args(["-e", "NODE_NAME=node-1", "-e", "HOST_IP=127.0.0.1"])
        .args(["-e", "KUBECONFIG=/host/etc/cni/net.d/kubeconfig"]);
    cmd.arg(&image);
    for a in c.args.iter().flatten() {
        cmd.arg(a.replace("$(HOST_IP)", "127.0.0.1"));
    }
    // The service account's token is not there: the plugin reads pods
    // with the test's kubeconfig.
    cmd.arg(format!(
        "--cni-kubeconfig={}",
        Path::new("/etc/cni/net.d")
            .join(config.file_name().unwrap())
            .display()
    ));
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "podman run: {}", text(&out.stderr));
    let logs = || {
        let state = podman
            .run(&[
                "inspect",
                "--format",
                "status {{.State.Status}}, OOM-killed {{.State.OOMKilled}}, exit {{.State.ExitCode}}",
                "divert",
            ])
            .unwrap();
        format!(
            "{}; its log: {}",
            text(&state.stdout).trim(),
            text(&podman.run(&["logs", "divert"]).unwrap().stderr)
        )
    };

    let metrics: SocketAddr = "127.0.0.1:15016".parse().unwrap();
    // The status of /healthz/ready, None while nothing answers (or the
    // daemon died answering).
    let ready = || {
        s.lab
            .peer
            .enter(move || try_http_get(metrics, "/healthz/ready").ok().map(|r| r.0))
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready() != Some(200) {
        assert!(Instant::now() < deadline, "not ready in 30 s: {}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    // A registration through the socket the DaemonSet shares with the node.
    let socket = run_dir.join("divert.sock");
    let out = s.init_with(&s.lab.client, &socket, INJECTOR);
    assert!(
        out.status.success(),
        "init: {} / daemon: {}",
        text(&out.stderr),
        logs()
    );
    s.assert_redirected("through the daemon in its container");
    let own = SocketAddr::new(s.lab.v4(1), 8080);
    assert_eq!(
        s.lab
            .dial_in(own)
            .unwrap_or_else(|e| panic!("{e}: {}", logs())),
        format!("proxy {own} orig={own} peer={own}"),
        "inbound, the UID 1337 proxy's listener adopted: {}",
        logs()
    );

    // The CNI plugin installed on the node.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let conf = std::fs::read_to_string(net_d.join("10-flannel.conflist")).unwrap();
        if conf.contains("divert-cni") && cni_bin.join("divert-cni").is_file() {
            break;
        }
        assert!(Instant::now() < deadline, "not chained: {}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM: exit 0 at once, the programs stay pinned.
    let out = podman.run(&["stop", "--time", "10", "divert"]).unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = podman
        .run(&["inspect", "--format", "{{.State.ExitCode}}", "divert"])
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "0", "{}", logs());
    s.assert_redirected("after the daemon's container stopped");
}
