//! `divert daemon` with a test cgroup root (the lab's own cgroup) and a
//! test bpffs (a private mount in a temporary directory) and `divert init
//! --backend ebpf` from the lab's client namespace: registration, survival
//! across `kill -9` and restart with one attachment per program, refusal of
//! the host namespace and of requests that name a namespace, unregister,
//! and uninstall.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use divert::{ebpf::pinned, policy::Action};
use divert_tests::{
    cases::expected,
    command_in, divert_bin,
    node::{text, Setup},
    require_root, testkit_bin, INJECTOR,
};

#[test]
fn init_registers_and_interception_survives_kill_and_restart() {
    require_root!();
    let s = Setup::start();
    let mut daemon = s.daemon();
    s.assert_attached_once("after the first start");

    let out = s.init(INJECTOR);
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("registered with the daemon"), "{err}");
    assert!(!err.contains("warning"), "{err}");
    s.assert_redirected("after init");
    // The injector's -b '*' -d 15090,15021,15020: inbound capture by socket
    // lookup, to the proxy listening on 15006 (it was listening already).
    let own = |port| SocketAddr::new(s.lab.v4(1), port);
    let captured = |port| format!("proxy {0} orig={0} peer={0}", own(port));
    let direct = |port| format!("server {0} peer={0}", own(port));
    assert_eq!(
        s.lab.dial_in(own(8080)).unwrap(),
        captured(8080),
        "after init"
    );
    assert_eq!(s.lab.dial_in(own(5432)).unwrap(), captured(5432));
    let links = s.bpffs.path().join("links");
    let netns_links = || {
        std::fs::read_dir(&links)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("netns-"))
            .count()
    };
    assert_eq!(netns_links(), 1, "one socket lookup link, pinned");

    // kill -9: the pinned links keep the programs attached, the pinned maps
    // keep the policy (and the capture listener).
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    s.assert_redirected("with the daemon killed");
    s.assert_attached_once("with the daemon killed");
    assert_eq!(
        s.lab.dial_in(own(8080)).unwrap(),
        captured(8080),
        "daemon killed"
    );

    let _daemon = s.daemon();
    s.assert_attached_once("after the restart");
    s.assert_redirected("after the restart");
    assert_eq!(
        s.lab.dial_in(own(8080)).unwrap(),
        captured(8080),
        "after the restart"
    );
    // A proxy that starts listening now is recorded as it listens (the
    // root's sock_ops program), and the last to listen takes the
    // connections.
    let later = {
        let (mut cmd, _keep) =
            command_in(s.lab.in_client(&s.lab.proxy, None), testkit_bin()).unwrap();
        cmd.args(["tproxy", &own(15006).to_string()]);
        let d = divert_tests::Daemon::spawn("a later capture listener", cmd).unwrap();
        divert_tests::wait_listening(&s.lab.client, &[own(15006)], Duration::from_secs(10))
            .unwrap();
        d
    };
    assert_eq!(
        s.lab.dial_in(own(8080)).unwrap(),
        format!("tproxy {0} peer={0}", own(8080)),
        "the listener that came later"
    );
    drop(later);
    // The adopted instance still takes requests: unregister, then the
    // connection goes where it was dialled, inbound too.
    let out = s.init(&["--cleanup", "-i", "*"]);
    assert!(
        out.status.success(),
        "init --cleanup: {}",
        text(&out.stderr)
    );
    let (dst, got) = s.dial();
    assert_eq!(got, expected(Action::PassThrough, dst, false));
    assert_eq!(
        s.lab.dial_in(own(8080)).unwrap(),
        direct(8080),
        "after --cleanup"
    );
    assert_eq!(netns_links(), 0, "the link went with the policy");
}

#[test]
fn only_the_callers_own_pod_namespace_can_be_registered() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    assert!(s.init(INJECTOR).status.success());

    // From the host namespace: refused, exit status 2, nothing changes.
    let out = Command::new(divert_bin())
        .args(["init", "--backend", "ebpf", "--daemon-socket"])
        .arg(&s.socket)
        .args(["-i", "*"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("node's own network namespace"),
        "{}",
        text(&out.stderr)
    );
    let (_, body) = s.http_get("/metrics");
    assert!(
        body.contains(r#"divert_registration_errors_total{reason="refused"} 1"#),
        "{body}"
    );

    // From the peer namespace, a request naming the client's namespace:
    // refused; the client stays registered.
    let (cookie, _) = s.lab.client_identity().unwrap();
    let socket = s.socket.clone();
    let answer = s
        .lab
        .peer
        .enter(move || {
            let stream = UnixStream::connect(&socket).unwrap();
            writeln!(
                &stream,
                r#"{{"version":2,"op":"unregister","netns_cookie":{cookie}}}"#
            )
            .unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            line
        })
        .unwrap();
    assert!(answer.contains(r#""ok":false"#), "{answer}");
    assert!(answer.contains("not part of the protocol"), "{answer}");
    s.assert_redirected("after another namespace's attempt");
}

#[test]
fn uninstall_detaches_and_unpins_everything() {
    require_root!();
    let s = Setup::start();
    let mut daemon = s.daemon();
    assert!(s.init(INJECTOR).status.success());
    s.assert_redirected("before uninstall");
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let out = Command::new(divert_bin())
        .args(["daemon", "--uninstall", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .arg("--socket")
        .arg(&s.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let counts = pinned::attachment_counts(&s.lab.root.path).unwrap();
    assert!(counts.iter().all(|&(_, n, _)| n == 0), "{counts:?}");
    // (A bpffs root also holds the kernel's own maps.debug and progs.debug.)
    for d in ["maps", "progs", "links"] {
        assert!(
            !s.bpffs.path().join(d).exists(),
            "{d} left under the bpffs dir"
        );
    }
    let (dst, got) = s.dial();
    assert_eq!(got, expected(Action::PassThrough, dst, false));
}

#[test]
fn a_pinned_map_of_another_shape_is_reported_not_reused() {
    require_root!();
    let s = Setup::start();
    let mut daemon = s.daemon();
    assert!(s.init(INJECTOR).status.success());
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    // Another build's PORTS map: same name, other key and value sizes.
    let pin = s.bpffs.path().join("maps/PORTS");
    std::fs::remove_file(&pin).unwrap();
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "16", "name", "PORTS",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", text(&out.stderr));
    let out = s.daemon_command(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("the pinned map PORTS"), "{err}");
    assert!(err.contains("is not this divert's"), "{err}");
    // Nothing was touched: the pods registered before stay diverted.
    s.assert_attached_once("after the refused start");
    s.assert_redirected("after the refused start");
}

#[test]
fn a_deleted_namespace_loses_its_policy_and_the_others_keep_theirs() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    assert!(s.init(INJECTOR).status.success());
    let (client, _) = s.lab.client_identity().unwrap();
    let (gone, gone_cookie, out) = s.init_in_new_netns("gc", &["-i", "*", "-b", "*"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Its inbound capture link, pinned, goes with it too.
    let link = s.bpffs.path().join(format!("links/netns-{gone_cookie}"));
    assert!(link.exists(), "{}", link.display());
    assert!(s.is_registered(gone_cookie));
    let registered = || {
        pinned::open_maps(&s.bpffs.path())
            .unwrap()
            .registered_cookies()
            .unwrap()
    };
    drop(gone);
    // The daemon sweeps every 0.5 s: the policy goes within one interval
    // plus a sweep. Allow far more on a loaded machine; a policy that never
    // goes fails here.
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.is_registered(gone_cookie) {
        assert!(
            Instant::now() < deadline,
            "the deleted namespace's policy stayed"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(registered(), vec![client]);
    assert!(!link.exists(), "the gone namespace's link pin stayed");
    s.assert_redirected("after the sweep");
    let (_, body) = s.http_get("/metrics");
    assert!(
        body.contains("divert_gc_removed_namespaces_total 1"),
        "{body}"
    );
}

#[test]
fn the_maps_are_sized_for_the_node_and_a_full_one_fails_the_registration() {
    require_root!();
    let s = Setup::start();
    let sizes = divert_common::MapSizes {
        max_pods: 4,
        max_connections: 2_048,
    };
    let daemon = s.daemon_with(&["--max-pods", "4", "--max-connections", "2048"]);
    // Every map has the capacity MapSizes gives it for these flags.
    for divert_common::MapDef { name, .. } in divert_common::MAPS {
        let info = aya::maps::MapData::from_pin(s.bpffs.path().join("maps").join(name))
            .and_then(|m| m.info())
            .unwrap();
        let want = sizes.entries(name).unwrap();
        // The kernel rounds a common LRU up to a multiple of the CPUs.
        let cpus = aya::util::nr_cpus().unwrap() as u32;
        let got = info.max_entries();
        assert!(
            got == want || (got >= want && got - want < cpus),
            "{name}: {got} entries, MapSizes says {want}"
        );
    }
    // Fill every slot of POLICIES with made-up namespaces.
    let mut maps = pinned::open_maps(&s.bpffs.path()).unwrap();
    for i in 0..sizes.policies() as u64 {
        maps.register(
            1 << 62 | i,
            &divert::policy::Policy::default(),
            divert::ebpf::RegisteredBy::Init,
        )
        .unwrap();
    }
    let out = s.init(INJECTOR);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("POLICIES is full"), "{err}");
    // Never a silent pass-through: init fails (so the pod does not start)
    // and nothing of the policy is left in the maps.
    let (client, _) = s.lab.client_identity().unwrap();
    assert!(!maps.registered_cookies().unwrap().contains(&client));
    // And visible to the operator.
    let (_, body) = s.http_get("/metrics");
    for series in [
        r#"divert_map_full_total{map="POLICIES"} 1"#,
        r#"divert_registration_errors_total{reason="map_full"} 1"#,
    ] {
        assert!(body.contains(series), "{series}: {body}");
    }

    // Another --max-pods or --max-connections: the maps of other sizes
    // are made anew and their entries carried over; every policy stays.
    drop(daemon);
    // Another --max-connections: the connection maps are made anew at
    // that size, their entries carried over; every policy stays.
    let _daemon = s.daemon_with(&["--max-pods", "8", "--max-connections", "4096"]);
    s.assert_attached_once("after taking over at another size");
    let entries = |map: &str| {
        aya::maps::MapData::from_pin(s.bpffs.path().join("maps").join(map))
            .and_then(|m| m.info())
            .unwrap()
            .max_entries()
    };
    assert!(entries("ORIG_BY_COOKIE") >= 4096);
    assert_eq!((entries("POLICIES"), entries("LISTENERS")), (8, 16));
    let maps = pinned::open_maps(&s.bpffs.path()).unwrap();
    assert_eq!(
        maps.registered_cookies().unwrap().len(),
        sizes.policies() as usize
    );
}

/// A namespace with a veth pair and a default route through it, nothing
/// listening, as a fresh pod is when its init container runs.
fn pod_netns(tag: &str) -> divert_tests::Netns {
    let ns =
        divert_tests::Netns::create(&format!("divert-test-{}-{tag}", std::process::id())).unwrap();
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
    ])
    .unwrap();
    ns.ip(&["addr", "add", "10.213.0.1/24", "dev", "eth0"])
        .unwrap();
    ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    ns.ip(&["link", "set", "eth1", "up"]).unwrap();
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.213.0.2",
        "dev",
        "eth0",
    ])
    .unwrap();
    ns
}

fn init_in(
    ns: &divert_tests::Netns,
    cgroup: &divert_tests::Cgroup,
    args: &[&str],
) -> std::process::Output {
    let (mut cmd, _keep) = command_in(
        divert_tests::Placement {
            netns: ns,
            cgroup,
            ids: None,
        },
        divert_bin(),
    )
    .unwrap();
    cmd.arg("init").args(args);
    cmd.output().unwrap()
}

#[test]
fn validate_proves_each_backend_and_undoes_a_failed_setup() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let sock = s.socket.to_str().unwrap();
    let ebpf = [
        "--backend",
        "ebpf",
        "--daemon-socket",
        sock,
        "--validate",
        "-u",
        "1337",
        "-i",
        "*",
    ];

    // eBPF, the pod under the daemon's cgroup root: proven.
    let pod = pod_netns("va");
    let out = init_in(&pod, &s.lab.plain, &ebpf);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("validate: a connect to 192.0.2.1:15002 landed on 127.0.0.1:15001"),
        "{err}"
    );

    // iptables: proven the same way.
    let ipt = pod_netns("vi");
    let out = init_in(
        &ipt,
        &s.lab.plain,
        &[
            "--backend",
            "iptables",
            "--validate",
            "-u",
            "1337",
            "-i",
            "*",
        ],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("validate: a connect to 192.0.2.1:15002 landed"),
        "{err}"
    );

    // eBPF, but the pod's processes are outside the daemon's cgroup root:
    // registered, yet nothing is diverted. Validation says so, and the
    // registration is taken back.
    let outside = divert_tests::Cgroup::create(
        divert::cgroup::cgroup2_mount()
            .unwrap()
            .join(format!("divert-test-{}-outside", std::process::id())),
    )
    .unwrap();
    let stray = pod_netns("vo");
    let stray_cookie = stray.enter(divert::netns::current_cookie).unwrap().unwrap();
    let out = init_in(&stray, &outside, &ebpf);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("validation failed; the interception was removed again"),
        "{err}"
    );
    assert!(err.contains("did not arrive on 127.0.0.1:15001"), "{err}");
    assert!(!s.is_registered(stray_cookie));
}

#[test]
fn metrics_count_every_connection_per_destination_with_bounded_series() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon_with(&["--metrics-top", "2"]);
    assert_eq!(s.http_get("/healthz/ready").0, 200);
    assert!(s.init(INJECTOR).status.success());
    // Three destinations, known counts: two get series of their own, the
    // third is folded into "other".
    let peer = s.lab.v4(2);
    for (port, n) in [(80u16, 3), (8080, 2), (5432, 4)] {
        for _ in 0..n {
            s.lab
                .dial(SocketAddr::new(peer, port), 1000, 1000, false)
                .unwrap();
        }
    }
    let (status, body) = s.http_get("/metrics");
    assert_eq!(status, 200);
    let value = |labels: &str| -> Option<u64> {
        body.lines()
            .find(|l| l.starts_with("divert_connections_total{") && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    // No pod identity without the pod watch: "unknown", as Istio writes it.
    let series = |dst: &str, port: &str| {
        format!(
            r#"source_workload_namespace="unknown",source_pod="unknown",destination="{dst}",port="{port}",verdict="redirected""#
        )
    };
    let p = peer.to_string();
    let own80 = value(&series(&p, "80"));
    let own8080 = value(&series(&p, "8080"));
    let own5432 = value(&series(&p, "5432"));
    let other = value(&series("other", ""));
    // Which two get their own series depends on the order the kernel map
    // hands them out; the counts do not.
    let got = [own80, own8080, own5432]
        .iter()
        .zip([3, 2, 4])
        .filter_map(|(v, want)| v.map(|v| (v, want)))
        .collect::<Vec<_>>();
    assert_eq!(got.len(), 2, "{body}");
    got.iter()
        .for_each(|(v, want)| assert_eq!(v, want, "{body}"));
    let folded: u64 = [(own80, 3), (own8080, 2), (own5432, 4)]
        .iter()
        .filter(|(v, _)| v.is_none())
        .map(|(_, n)| n)
        .sum();
    assert_eq!(other, Some(folded), "{body}");
    assert!(body.contains("divert_registered_namespaces 1"), "{body}");
    assert_eq!(s.http_get("/nope").0, 404);
}

#[test]
fn a_second_init_replaces_the_policy_exactly() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let flags = |x: &str, o: &str| {
        vec!["-p", "15001", "-u", "1337", "-i", "*", "-x", x, "-o", o]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let first = flags("10.1.0.0/16,10.2.0.0/16", "5432");
    let out = s.init(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = flags("10.2.0.0/16,10.3.0.0/16", "80");
    let out = s.init(&second.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out.stderr));

    // What the maps hold is the second policy, entry for entry: nothing of
    // the first is left, nothing of the second is missing.
    let (cookie, mut local) = s.lab.client_identity().unwrap();
    let mut want = divert_tests::goldens::policy_for(&second).unwrap();
    local.sort();
    want.local_addrs = local;
    want.exclude_ranges.sort();
    let got = pinned::open_maps(&s.bpffs.path())
        .unwrap()
        .policy_of(cookie)
        .unwrap()
        .expect("registered");
    assert_eq!(got.exclude_ranges, want.exclude_ranges);
    assert_eq!(got.exclude_ports, want.exclude_ports);
    assert_eq!(got.include_ranges, want.include_ranges);
    assert_eq!(got.local_addrs, want.local_addrs);
    assert_eq!(
        (
            got.proxy_port,
            got.proxy_uids.clone(),
            got.proxy_gids.clone()
        ),
        (
            want.proxy_port,
            want.proxy_uids.clone(),
            want.proxy_gids.clone()
        )
    );
    // And the kernel judges by it: 5432 is redirected again, 80 is not.
    let peer = s.lab.v4(2);
    for (port, action) in [(5432, Action::Redirect(15001)), (80, Action::PassThrough)] {
        let dst = SocketAddr::new(peer, port);
        assert_eq!(
            s.lab.dial(dst, 1000, 1000, false).unwrap(),
            expected(action, dst, false)
        );
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    // No root needed: uninstalling from an empty directory only logs.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(divert_bin())
        .args([
            "--log-format",
            "json",
            "daemon",
            "--uninstall",
            "--bpffs-dir",
        ])
        .arg(dir.path().join("nothing"))
        .arg("--socket")
        .arg(dir.path().join("sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
        assert_eq!(v["level"], "INFO", "{l}");
        assert!(
            v["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("nothing pinned under"),
            "{l}"
        );
    }
}

#[test]
fn dns_capture_registered_by_init_sends_the_pods_dns_to_its_proxy() {
    use divert_tests::cases::{Ask, DnsCase, NAMESERVER_ANSWER, PROXY_ANSWER};
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let _dns = s.lab.start_dns_servers().expect("DNS servers");
    let conf = s.bpffs.dir.path().join("resolv.conf");
    std::fs::write(&conf, format!("nameserver {}\n", s.lab.v4(2))).unwrap();
    // The injector's line, with DNS capture from istio-agent's environment.
    let (mut cmd, _keep) = command_in(s.lab.in_client(&s.lab.plain, None), divert_bin()).unwrap();
    cmd.args(["init", "--backend", "ebpf", "--daemon-socket"])
        .arg(&s.socket)
        .args(INJECTOR)
        .arg("--resolv-conf")
        .arg(&conf)
        .env("ISTIO_META_DNS_CAPTURE", "true");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    let ask = |uid, ask| {
        s.lab
            .ask_dns(&DnsCase {
                name: String::new(),
                policy: Default::default(),
                server: SocketAddr::new(s.lab.v4(2), 53),
                ask,
                mapped: false,
                uid,
                want: Action::PassThrough,
            })
            .unwrap()
    };
    let from = |answer: &str, connected: bool| {
        let ns = SocketAddr::new(s.lab.v4(2), 53);
        if connected {
            format!("answer={answer} from={ns} peer={ns}")
        } else {
            format!("answer={answer} from={ns}")
        }
    };
    assert_eq!(ask(1000, Ask::Udp), from(PROXY_ANSWER, true));
    assert_eq!(ask(1000, Ask::UdpUnconnected), from(PROXY_ANSWER, false));
    assert_eq!(ask(1000, Ask::Tcp), from(PROXY_ANSWER, true));
    // istio-agent's own upstream query goes to the nameserver.
    assert_eq!(ask(1337, Ask::Udp), from(NAMESERVER_ANSWER, true));
    // explain reads the same decision from the pinned maps.
    let cookie = s.lab.client_identity().unwrap().0.to_string();
    let out = Command::new(divert_bin())
        .args(["explain", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .args(["--netns", &cookie, "--udp", "-o", "json"])
        .arg(format!("{}:53", s.lab.v4(2)))
        .output()
        .unwrap();
    assert!(out.status.success(), "explain: {}", text(&out.stderr));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["verdict"], "dns", "{e}");
    assert_eq!(e["to"], "127.0.0.1:15053", "{e}");
    // And an inbound connection (the injector's -b '*' -d 15090,15021,15020).
    let inbound = |port: u16| -> serde_json::Value {
        let out = Command::new(divert_bin())
            .args(["explain", "--bpffs-dir"])
            .arg(s.bpffs.path())
            .args(["--netns", &cookie, "--inbound", "-o", "json"])
            .arg(format!("{}:{port}", s.lab.v4(1)))
            .output()
            .unwrap();
        assert!(out.status.success(), "explain: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = inbound(8080);
    assert_eq!(
        (&e["verdict"], &e["direction"]),
        (
            &serde_json::json!("inbound_capture"),
            &serde_json::json!("inbound")
        ),
        "{e}"
    );
    assert_eq!(inbound(15021)["verdict"], "passthrough");
    // Unregistered: DNS goes where it was asked again.
    let out = s.init(&["--cleanup", "-i", "*"]);
    assert!(out.status.success(), "cleanup: {}", text(&out.stderr));
    assert_eq!(ask(1000, Ask::Udp), from(NAMESERVER_ANSWER, true));
}
