//! The iptables backend against real iptables (root only; each test makes
//! its own network namespaces):
//!
//! * golden text (no root): each case renders character for character as
//!   istio-iptables writes it;
//! * golden: for each istio-iptables test case in
//!   `tests/testdata/istio-iptables/`, the expected rules and `divert init`
//!   are applied to twin namespaces holding the same unrelated user rules;
//!   their `iptables-save` must match, a second `divert init` must change
//!   nothing, and `--cleanup` must give back the namespace as it was;
//! * equivalence: the eBPF backend and the iptables backend give the same
//!   answer (listener, SO_ORIGINAL_DST, getpeername) to the connect matrix
//!   and to random cases;
//! * inbound capture with `-b '*'` and `-b 8080`;
//! * bad input changes nothing.

use std::{
    net::SocketAddr,
    process::{Command, Output},
};

use divert::{
    iptables::{render, Family},
    policy::verdict,
};
use divert_tests::{
    cases::{expected, istio_matrix, seed_and_count, Generator, APP},
    command_in, divert_bin,
    goldens::{goldens, nft_goldens, settings_for, Golden},
    require_root,
    rig::{EbpfRig, IptablesRig},
    testkit_bin, Daemon, Netns, Placement,
};
use rand::{rngs::StdRng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn tool(self) -> &'static str {
        match self {
            Fam::V4 => "iptables",
            Fam::V6 => "ip6tables",
        }
    }
}

fn in_ns(ns: &Netns, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, program]);
    c
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The nat, mangle and raw tables as iptables-save prints them, without
/// comments and counters.
fn save(ns: &Netns, f: Fam) -> String {
    ["nat", "mangle", "raw"]
        .map(|table| {
            let out = in_ns(ns, &format!("{}-save", f.tool()))
                .args(["-t", table])
                .output()
                .unwrap();
            ok(out, "iptables-save")
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| match l.rfind(" [") {
                    Some(i) if l.starts_with(':') => l[..i].to_string(),
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .join("\n")
}

fn restore(ns: &Netns, f: Fam, text: &str) {
    let mut cmd = in_ns(ns, &format!("{}-restore", f.tool()));
    cmd.arg("--noflush");
    ok(
        divert_tests::output_with_stdin(&mut cmd, text.as_bytes()),
        &format!("{}-restore of:\n{text}", f.tool()),
    );
}

fn init(ns: &Netns, args: &[String]) -> Output {
    let bin = divert_bin();
    in_ns(ns, bin.to_str().unwrap())
        .arg("init")
        .args(args)
        .env_remove("FORCE_IPTABLES_BINARY")
        .output()
        .unwrap()
}

/// Rules a namespace already had: divert must keep them and keep out of them.
fn user_rules(f: Fam) -> String {
    let (dst, ifc) = match f {
        Fam::V4 => ("192.0.2.1/32", "eth9"),
        Fam::V6 => ("2001:db8::1/128", "eth9"),
    };
    format!(
        "*nat\n:USER_CHAIN - [0:0]\n-A PREROUTING -i {ifc} -j RETURN\n-A OUTPUT -d {dst} -j USER_CHAIN\n-A USER_CHAIN -j RETURN\nCOMMIT\n\
         *mangle\n-A PREROUTING -i {ifc} -j RETURN\n-A OUTPUT -o lo -m mark --mark 7 -j RETURN\nCOMMIT\n\
         *raw\n-A OUTPUT -d {dst} -j CT --zone 9\nCOMMIT\n"
    )
}

fn twin(tag: &str, ipv6: bool) -> Netns {
    let ns = Netns::create(&format!("divert-ipt-{}-{tag}", std::process::id())).unwrap();
    if ipv6 {
        // What makes divert init (and istio-iptables' EnableIPv6) write IPv6 rules.
        ns.ip(&["link", "add", "v6a", "type", "veth", "peer", "name", "v6b"])
            .unwrap();
        ns.ip(&["addr", "add", "fd00:99::1/64", "dev", "v6a", "nodad"])
            .unwrap();
        ns.ip(&["link", "set", "v6a", "up"]).unwrap();
    }
    for f in [Fam::V4, Fam::V6] {
        restore(&ns, f, &user_rules(f));
    }
    ns
}

#[test]
fn every_istio_case_renders_as_istio_iptables_writes_it() {
    let goldens = goldens();
    assert!(goldens.len() >= 32, "only {} golden files", goldens.len());
    let mut failures = Vec::new();
    for g in &goldens {
        let (p, c) = settings_for(&g.flags).unwrap_or_else(|e| panic!("{}: {e:#}", g.name));
        let mut fams = vec![(Family::V4, &g.v4)];
        if g.ipv6 {
            fams.push((Family::V6, &g.v6));
        } else {
            assert!(g.v6.is_empty(), "{}: ipv6 line and blocks disagree", g.name);
        }
        for (f, want) in fams {
            let got = render(&p, &c, f).restore_text();
            if &got != want {
                failures.push(format!("{} ({f}):\n--- want\n{want}--- got\n{got}", g.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// TPROXY's policy routing in `ns` for `f`: (`ip rule`s for fwmark 1337 to
/// table 133, whether table 133 has the local default route).
fn tproxy_routing(ns: &Netns, f: Fam) -> (usize, bool) {
    let v = if f == Fam::V4 { "-4" } else { "-6" };
    let rules = ok(
        in_ns(ns, "ip")
            .args([v, "rule", "show", "fwmark", "1337", "lookup", "133"])
            .output()
            .unwrap(),
        "ip rule show",
    );
    let routes = in_ns(ns, "ip")
        .args([v, "route", "show", "table", "133"])
        .output()
        .unwrap();
    (
        rules.lines().count(),
        String::from_utf8_lossy(&routes.stdout).contains("local default dev lo"),
    )
}

/// For each golden that can be applied: istio's expected rules (`theirs`)
/// in one fresh twin namespace (`twin_of`), `divert init FLAGS` in the
/// other; what `state` reads of them must match after a first and a second
/// run; TPROXY cases have exactly one `ip rule` and local route per family;
/// `--cleanup` gives the namespace back as `state` read it before, routing
/// included. Returns the failures.
fn applied_goldens(
    goldens: &[Golden],
    tag: &str,
    twin_of: fn(&str, bool) -> Netns,
    theirs: impl Fn(&Netns, &Golden),
    state: impl Fn(&Netns) -> String,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, g) in goldens.iter().enumerate() {
        if let Some(why) = &g.not_applied {
            eprintln!("{}: rendering compared only: {why}", g.name);
            continue;
        }
        let ns_theirs = twin_of(&format!("{i}{tag}e"), g.ipv6);
        let ours = twin_of(&format!("{i}{tag}d"), g.ipv6);
        let before = state(&ours);
        theirs(&ns_theirs, g);
        let want = state(&ns_theirs);
        let mut applied = true;
        for run in ["divert init", "a second divert init"] {
            let out = init(&ours, &g.flags);
            if !out.status.success() {
                failures.push(format!(
                    "{}: {run} {:?} failed: {}",
                    g.name,
                    g.flags,
                    String::from_utf8_lossy(&out.stderr)
                ));
                applied = false;
                break;
            }
            let got = state(&ours);
            if got != want {
                failures.push(format!(
                    "{}: after {run} {:?}, the rules differ\n--- istio's\n{want}\n--- divert's\n{got}",
                    g.name, g.flags
                ));
                applied = false;
                break;
            }
        }
        if !applied {
            continue;
        }
        // TPROXY's policy routing (istio's configureTProxyRoutes), once.
        let tproxy = g.flags.windows(2).any(|w| w == ["-m", "TPROXY"]);
        let fams: &[Fam] = if g.ipv6 {
            &[Fam::V4, Fam::V6]
        } else {
            &[Fam::V4]
        };
        for &f in fams {
            let want = if tproxy { (1, true) } else { (0, false) };
            let got = tproxy_routing(&ours, f);
            if got != want {
                failures.push(format!(
                    "{}: {f:?} policy routing {got:?}, want {want:?}",
                    g.name
                ));
            }
        }
        let mut cleanup = vec!["--cleanup".to_string()];
        cleanup.extend(g.flags.iter().cloned());
        ok(init(&ours, &cleanup), "divert init --cleanup");
        for &f in fams {
            if tproxy_routing(&ours, f) != (0, false) {
                failures.push(format!(
                    "{}: {f:?} policy routing left after --cleanup",
                    g.name
                ));
            }
        }
        let after = state(&ours);
        if after != before {
            failures.push(format!(
                "{}: --cleanup did not restore the namespace\n--- before\n{before}\n--- after\n{after}",
                g.name
            ));
        }
    }
    failures
}

#[test]
fn istio_goldens_applied_match_and_cleanup_restores() {
    require_root!();
    let goldens = goldens();
    assert!(goldens.len() >= 32, "only {} golden files", goldens.len());
    let failures = applied_goldens(
        &goldens,
        "",
        twin,
        |ns, g| {
            restore(ns, Fam::V4, &g.v4);
            if g.ipv6 {
                restore(ns, Fam::V6, &g.v6);
            }
        },
        |ns| [Fam::V4, Fam::V6].map(|f| save(ns, f)).join("\n"),
    );
    assert!(
        failures.is_empty(),
        "{} of {} case(s) failed:\n{}",
        failures.len(),
        goldens.len(),
        failures.join("\n\n")
    );
}

#[test]
fn dry_run_prints_the_golden_rules_and_changes_nothing() {
    require_root!();
    let g = goldens()
        .into_iter()
        .find(|g| g.name == "ipv6-ipnets")
        .unwrap();
    let ns = twin("dry", true);
    let before = [Fam::V4, Fam::V6].map(|f| save(&ns, f));
    let mut args = vec!["--dry-run".to_string()];
    args.extend(g.flags.iter().cloned());
    let out = ok(init(&ns, &args), "divert init --dry-run");
    let body: String = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(body, format!("{}{}", g.v4, g.v6));
    assert_eq!([Fam::V4, Fam::V6].map(|f| save(&ns, f)), before);
}

#[test]
fn bad_input_exits_2_and_changes_nothing() {
    require_root!();
    let ns = twin("bad", true);
    ok(init(&ns, &["-i".into(), "10.0.0.0/8".into()]), "good init");
    let before = [Fam::V4, Fam::V6].map(|f| save(&ns, f));
    for (args, says) in [
        (vec!["-i", "10.0.0.0/33"], "10.0.0.0/33"),
        (vec!["-b", "80,http"], "--istio-inbound-ports (-b)"),
        (vec!["-c", "a/b"], "--istio-exclude-interfaces (-c)"),
        (
            vec!["-m", "TPROXY", "-t", "0x539"],
            "--inbound-tproxy-mark (-t)",
        ),
        (vec!["-m", "tproxy"], "interception mode"),
        (
            vec!["--redirect-dns", "--resolv-conf", "/nonexistent"],
            "--redirect-dns",
        ),
        // (An empty -u is istio-iptables' default, not an error.)
        (vec!["-u", "1,,2"], "--proxy-uid (-u)"),
    ] {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let out = init(&ns, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(says),
            "{args:?}: {err:?} does not name {says:?}"
        );
        assert_eq!(
            [Fam::V4, Fam::V6].map(|f| save(&ns, f)),
            before,
            "{args:?} changed the rules"
        );
    }
}

#[test]
fn ebpf_and_iptables_give_the_same_answers() {
    require_root!();
    let mut ebpf = EbpfRig::start();
    let mut ipt = IptablesRig::start();
    let mut failures = Vec::new();
    let matrix = istio_matrix(&ebpf.lab)
        .into_iter()
        .zip(istio_matrix(&ipt.lab));
    let mut n = 0;
    for (e, i) in matrix {
        assert_eq!(e.name, i.name);
        ebpf.set(e.policy.clone());
        ipt.set(i.policy.clone());
        let got_e = ebpf.dial(e.dst, e.uid, e.gid, e.mapped);
        let got_i = ipt.dial(i.dst, i.uid, i.gid, i.mapped);
        let (want_e, want_i) = (
            expected(e.want, e.dst, e.mapped),
            expected(i.want, i.dst, i.mapped),
        );
        if got_e != want_e || got_i != want_i {
            failures.push(format!(
                "{}:\n  ebpf     {got_e}\n  iptables {got_i}\n  want     {want_i}",
                e.name
            ));
        }
        n += 1;
    }
    // Random policies, the same for both labs (up to the lab's addresses).
    let (seed, cases) = seed_and_count(80);
    let (ge, gi) = (Generator::new(&ebpf.lab), Generator::new(&ipt.lab));
    let (mut re, mut ri) = (StdRng::seed_from_u64(seed), StdRng::seed_from_u64(seed));
    for case in 0..cases {
        let pe = ebpf.set(ge.policy(&mut re));
        let pi = ipt.set(gi.policy(&mut ri));
        for _ in 0..3 {
            let (de, ue, gde, me) = ge.dial(&mut re);
            let (di, ui, gdi, mi) = gi.dial(&mut ri);
            let ve = verdict(&pe, de, ue, gde);
            let vi = verdict(&pi, di, ui, gdi);
            let kind =
                |r: &divert::policy::Rule| format!("{r:?}").split('(').next().unwrap().to_string();
            assert_eq!(kind(&ve.rule), kind(&vi.rule), "the generators diverged");
            let got_e = ebpf.dial(de, ue, gde, me);
            let got_i = ipt.dial(di, ui, gdi, mi);
            let (want_e, want_i) = (expected(ve.action, de, me), expected(vi.action, di, mi));
            if got_e != want_e || got_i != want_i {
                failures.push(format!(
                    "random case {case} (seed {seed}): {di} as {ui}/{gdi} mapped={mi} rule={:?}\n  policy {pi:?}\n  ebpf     {got_e}\n  iptables {got_i}\n  want     {want_i}",
                    vi.rule
                ));
            }
            n += 1;
        }
    }
    eprintln!("equivalence: {n} dials compared under both backends");
    assert!(
        failures.is_empty(),
        "{} disagreement(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Dial `dst` from the peer namespace (into the client namespace).
fn dial_in(rig: &IptablesRig, dst: SocketAddr) -> String {
    rig.lab.dial_in(dst).unwrap()
}

#[test]
fn inbound_capture_with_b_star_and_b_list() {
    require_root!();
    let rig = IptablesRig::start();
    let own = rig.lab.v4(1);
    // Envoy's inbound listener listens on every address; REDIRECT in
    // PREROUTING sends to the address the packet came in on.
    let (mut cmd, _keep) =
        command_in(rig.lab.in_client(&rig.lab.proxy, None), testkit_bin()).unwrap();
    cmd.args(["proxy", &format!("{own}:15006")]);
    let _inbound = Daemon::spawn("inbound proxy", cmd).unwrap();
    divert_tests::wait_listening(
        &rig.lab.client,
        &[SocketAddr::new(own, 15006)],
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let at = |p: u16| SocketAddr::new(own, p);
    let captured = |p: u16| format!("proxy {own}:15006 orig={} peer={}", at(p), at(p));
    let direct = |p: u16| format!("server {} peer={}", at(p), at(p));
    let set = |flags: &[&str]| {
        let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        ok(init(&rig.lab.client, &args), "divert init");
    };

    set(&["-b", "*", "-d", "5432"]);
    assert_eq!(dial_in(&rig, at(80)), captured(80));
    assert_eq!(dial_in(&rig, at(8080)), captured(8080));
    assert_eq!(dial_in(&rig, at(5432)), direct(5432), "-d excludes");
    assert_eq!(
        dial_in(&rig, at(15008)),
        direct(15008),
        "the tunnel port is never captured"
    );

    set(&["-b", "8080"]);
    assert_eq!(dial_in(&rig, at(8080)), captured(8080));
    assert_eq!(dial_in(&rig, at(80)), direct(80));

    set(&["--cleanup", "-b", "8080"]);
    assert_eq!(dial_in(&rig, at(8080)), direct(8080));
}

#[test]
fn uses_the_iptables_variant_the_namespace_already_uses() {
    require_root!();
    let ns = Netns::create(&format!("divert-ipt-{}-variant", std::process::id())).unwrap();
    let nat_of = |tool: &str| {
        ok(
            in_ns(&ns, &format!("{tool}-save"))
                .args(["-t", "nat"])
                .output()
                .unwrap(),
            tool,
        )
    };
    let init_with = |force: Option<&str>, args: &[&str]| {
        let bin = divert_bin();
        let mut c = in_ns(&ns, bin.to_str().unwrap());
        c.arg("init").args(args).env_remove("FORCE_IPTABLES_BINARY");
        if let Some(v) = force {
            c.env("FORCE_IPTABLES_BINARY", v);
        }
        c.output().unwrap()
    };
    // A namespace whose rules are legacy (x_tables): divert writes there too.
    ok(
        in_ns(&ns, "iptables-legacy")
            .args(["-A", "INPUT", "-s", "192.0.2.9/32", "-j", "ACCEPT"])
            .output()
            .unwrap(),
        "iptables-legacy -A",
    );
    let out = init_with(None, &["-i", "*"]);
    let said = ok(out.clone(), "divert init") + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("iptables-legacy"), "{said}");
    assert!(nat_of("iptables-legacy").contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
    assert!(!nat_of("iptables-nft").contains("ISTIO_OUTPUT"));
    ok(init_with(None, &["--cleanup", "-i", "*"]), "cleanup");
    assert!(!nat_of("iptables-legacy").contains("ISTIO"));

    // FORCE_IPTABLES_BINARY wins, as in istio-iptables.
    ok(init_with(Some("nft"), &["-i", "*"]), "forced nft");
    assert!(nat_of("iptables-nft").contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"));
    assert!(!nat_of("iptables-legacy").contains("ISTIO"));
    let bad = init_with(Some("ebtables"), &["-i", "*"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("FORCE_IPTABLES_BINARY=\"ebtables\""));
}

/// testkit in `ns`, in `cgroup`, as `ids`, and what keeps its placement
/// alive.
fn kit_command(
    ns: &Netns,
    cgroup: &divert_tests::Cgroup,
    ids: Option<(u32, u32)>,
) -> (Command, impl Sized) {
    command_in(
        Placement {
            netns: ns,
            cgroup,
            ids,
        },
        testkit_bin(),
    )
    .unwrap()
}

/// testkit `args` in `ns`, in `cgroup`, as `ids`: its output line.
fn kit(
    ns: &Netns,
    cgroup: &divert_tests::Cgroup,
    ids: Option<(u32, u32)>,
    args: &[&str],
) -> String {
    let (mut cmd, _keep) = kit_command(ns, cgroup, ids);
    let out = cmd.args(args).output().unwrap();
    ok(out, &format!("testkit {args:?}")).trim().to_string()
}

/// testkit `args` running in `ns` as `ids` until the test ends.
fn kit_daemon(
    ns: &Netns,
    cgroup: &divert_tests::Cgroup,
    ids: Option<(u32, u32)>,
    name: &str,
    args: &[&str],
) -> Daemon {
    let (mut cmd, _keep) = kit_command(ns, cgroup, ids);
    cmd.args(args);
    Daemon::spawn(name, cmd).unwrap()
}

#[test]
fn dns_capture_sends_the_apps_queries_to_the_agent_and_lets_the_proxys_through() {
    require_root!();
    let rig = IptablesRig::start();
    let lab = &rig.lab;
    let (nameserver, other) = (lab.v4(2), lab.v4(3));
    let (ns53, other53) = (SocketAddr::new(nameserver, 53), SocketAddr::new(other, 53));
    // Two DNS servers in the peer namespace; istio-agent's DNS proxy on
    // 127.0.0.1:15053, UDP and TCP, in the client's, as the proxy's UID (its
    // answers go back through conntrack zone 2 by that UID).
    let _servers = kit_daemon(
        &lab.peer,
        &lab.plain,
        None,
        "nameservers",
        &["udp-server", &ns53.to_string(), &other53.to_string()],
    );
    let _agent_udp = kit_daemon(
        &lab.client,
        &lab.proxy,
        Some((1337, 1337)),
        "agent udp",
        &["udp-server", "127.0.0.1:15053"],
    );
    let _agent_tcp = kit_daemon(
        &lab.client,
        &lab.proxy,
        Some((1337, 1337)),
        "agent tcp",
        &["proxy", "127.0.0.1:15053"],
    );
    divert_tests::wait_listening(
        &lab.client,
        &["127.0.0.1:15053".parse().unwrap()],
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(
        &conf,
        format!("search svc.cluster.local\nnameserver {nameserver}\n"),
    )
    .unwrap();
    let conf = conf.to_str().unwrap().to_string();
    let set = |extra: &[&str]| {
        let mut args = vec![
            "--redirect-dns".to_string(),
            "--resolv-conf".into(),
            conf.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        ok(init(&lab.client, &args), "divert init --redirect-dns");
    };
    let app = |args: &[&str]| kit(&lab.client, &lab.plain, Some((APP, APP)), args);
    let proxy = |args: &[&str]| kit(&lab.client, &lab.proxy, Some((1337, 1337)), args);
    let agent = |dst: SocketAddr, got: &str| {
        got.starts_with("udp 127.0.0.1:15053 from=") && got.ends_with(&format!("peer={dst}"))
    };
    let direct = |dst: SocketAddr, got: &str| {
        got.starts_with(&format!("udp {dst} from=")) && got.ends_with(&format!("peer={dst}"))
    };

    set(&[]);
    let got = app(&["udp", &ns53.to_string()]);
    assert!(
        agent(ns53, &got),
        "the app's query to its nameserver: {got}"
    );
    let got = app(&["client", &ns53.to_string()]);
    assert_eq!(
        got,
        format!("proxy 127.0.0.1:15053 orig={ns53} peer={ns53}"),
        "DNS over TCP"
    );
    let got = app(&["udp", &other53.to_string()]);
    assert!(
        direct(other53, &got),
        "not a nameserver of resolv.conf: {got}"
    );
    let got = proxy(&["udp", &ns53.to_string()]);
    assert!(direct(ns53, &got), "the proxy's own query upstream: {got}");

    // --capture-all-dns: every address's port 53.
    set(&["--capture-all-dns"]);
    let got = app(&["udp", &other53.to_string()]);
    assert!(agent(other53, &got), "--capture-all-dns: {got}");
    let got = proxy(&["udp", &other53.to_string()]);
    assert!(
        direct(other53, &got),
        "the proxy's own query upstream: {got}"
    );

    // Without DNS capture (a run without the flag replaces the rules).
    ok(init(&lab.client, &[]), "divert init");
    let got = app(&["udp", &ns53.to_string()]);
    assert!(direct(ns53, &got), "no DNS capture: {got}");
}

#[test]
fn tproxy_hands_inbound_connections_over_with_their_destination_as_local_address() {
    require_root!();
    let rig = IptablesRig::start();
    let own = rig.lab.v4(1);
    let listener = SocketAddr::new(own, 15006);
    let _tproxy = kit_daemon(
        &rig.lab.client,
        &rig.lab.proxy,
        None,
        "TPROXY inbound listener",
        &["tproxy", &listener.to_string()],
    );
    divert_tests::wait_listening(
        &rig.lab.client,
        &[listener],
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let at = |p: u16| SocketAddr::new(own, p);
    let set = |flags: &[&str]| {
        let args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        ok(init(&rig.lab.client, &args), "divert init");
    };
    set(&["-m", "TPROXY", "-b", "8080"]);
    // No NAT: the listener's accepted socket has the destination the
    // client dialled as its local address, and the client sees it answer.
    assert_eq!(
        dial_in(&rig, at(8080)),
        format!("tproxy {} peer={}", at(8080), at(8080))
    );
    assert_eq!(
        dial_in(&rig, at(8080)),
        format!("tproxy {} peer={}", at(8080), at(8080)),
        "again"
    );
    assert_eq!(
        dial_in(&rig, at(80)),
        format!("server {} peer={}", at(80), at(80)),
        "not -b"
    );
    set(&["-m", "TPROXY", "-b", "*", "-d", "80"]);
    assert_eq!(
        dial_in(&rig, at(5432)),
        format!("tproxy {} peer={}", at(5432), at(5432))
    );
    assert_eq!(
        dial_in(&rig, at(80)),
        format!("server {} peer={}", at(80), at(80)),
        "-d"
    );
    set(&["--cleanup", "-m", "TPROXY", "-b", "*", "-d", "80"]);
    assert_eq!(
        dial_in(&rig, at(8080)),
        format!("server {} peer={}", at(8080), at(8080))
    );
}

/// nft's ruleset as `nft list ruleset` prints it, without the counters'
/// values (`counter packets N bytes M` is `counter`).
fn nft_ruleset(ns: &Netns) -> String {
    let out = ok(
        in_ns(ns, "nft").args(["list", "ruleset"]).output().unwrap(),
        "nft list ruleset",
    );
    out.lines()
        .map(|l| {
            let mut words: Vec<&str> = Vec::new();
            let mut it = l.split(' ').peekable();
            while let Some(w) = it.next() {
                words.push(w);
                if w == "counter" && it.peek() == Some(&"packets") {
                    it.nth(3);
                }
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A namespace for the nftables goldens: an nft table of someone else's,
/// and, when `ipv6`, an IPv6 address (what makes both write IPv6 rules).
fn nft_twin(tag: &str, ipv6: bool) -> Netns {
    let ns = twin(tag, ipv6);
    nft_f(
        &ns,
        "table inet user {\n chain out {\n  type filter hook output priority 10; policy accept;\n  oifname \"eth9\" counter accept\n }\n}\n",
    );
    ns
}

/// `nft -f` of `script` in `ns`, which must succeed.
fn nft_f(ns: &Netns, script: &str) {
    let mut cmd = in_ns(ns, "nft");
    cmd.args(["-f", "-"]);
    ok(
        divert_tests::output_with_stdin(&mut cmd, script.as_bytes()),
        &format!("nft -f of:\n{script}"),
    );
}

#[test]
fn every_istio_nftables_case_renders_as_istio_writes_it() {
    let goldens = nft_goldens();
    assert!(goldens.len() >= 28, "only {} golden files", goldens.len());
    let mut failures = Vec::new();
    for g in &goldens {
        let (p, c) = settings_for(&g.flags).unwrap_or_else(|e| panic!("{}: {e:#}", g.name));
        let got = divert::nftables::render(&p, &c, g.ipv6).script();
        if got != g.nft {
            failures.push(format!("{}:\n--- want\n{}--- got\n{got}", g.name, g.nft));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn istio_nftables_goldens_applied_match_and_cleanup_restores() {
    require_root!();
    let goldens = nft_goldens();
    let failures = applied_goldens(
        &goldens,
        "n",
        nft_twin,
        |ns, g| nft_f(ns, &g.nft),
        // The iptables tables too: native nftables leaves them alone.
        |ns| [nft_ruleset(ns), save(ns, Fam::V4), save(ns, Fam::V6)].join("\n"),
    );
    assert!(
        failures.is_empty(),
        "{} of {} case(s) failed:\n{}",
        failures.len(),
        goldens.len(),
        failures.join("\n\n")
    );
}

#[test]
fn native_nftables_gives_the_matrixs_answers() {
    require_root!();
    let rig = IptablesRig::start();
    let mut failures = Vec::new();
    for case in istio_matrix(&rig.lab) {
        let a = divert::policy::PolicyArgs::of(&case.policy);
        let mut args: Vec<String> = vec!["--native-nftables".into(), "--dual-stack".into()];
        for (flag, value) in [
            ("-p", &a.proxy_port),
            ("-z", &a.inbound_capture_port),
            ("-e", &a.inbound_tunnel_port),
            ("-u", &a.proxy_uids),
            ("-g", &a.proxy_gids),
            ("-i", &a.include_ranges),
            ("-x", &a.exclude_ranges),
            ("-q", &a.include_ports),
            ("-o", &a.exclude_ports),
            ("--outbound-owner-groups", &a.owner_groups),
            ("--outbound-owner-groups-exclude", &a.owner_groups_exclude),
        ] {
            args.push(flag.to_string());
            args.push(value.clone());
        }
        ok(
            init(&rig.lab.client, &args),
            &format!("{}: divert init", case.name),
        );
        let got = rig.dial(case.dst, case.uid, case.gid, case.mapped);
        let want = expected(case.want, case.dst, case.mapped);
        if got != want {
            failures.push(format!("{}:\n  got  {got}\n  want {want}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn native_nftables_replaces_an_earlier_runs_tables_whole() {
    require_root!();
    let ns = nft_twin("nftstale", false);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("resolv.conf");
    std::fs::write(&conf, "nameserver 10.96.0.10\n").unwrap();
    let conf = conf.to_string_lossy().into_owned();
    let tables = || {
        ok(
            in_ns(&ns, "nft").args(["list", "tables"]).output().unwrap(),
            "nft list tables",
        )
    };
    let run = |extra: &[&str]| {
        let mut a = vec!["--native-nftables".to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        ok(init(&ns, &a), "divert init --native-nftables");
    };
    run(&["--redirect-dns", "--resolv-conf", &conf, "--drop-invalid"]);
    let t = tables();
    assert!(
        t.contains("istio-proxy-raw") && t.contains("istio-proxy-mangle"),
        "{t}"
    );
    assert!(nft_ruleset(&ns).contains("chain istio-output-dns"));
    // Without DNS capture and --drop-invalid: their tables and chains go.
    run(&[]);
    let t = tables();
    assert!(
        !t.contains("istio-proxy-raw") && !t.contains("istio-proxy-mangle"),
        "{t}"
    );
    assert!(!nft_ruleset(&ns).contains("istio-output-dns"));
    assert!(
        t.contains("table inet user"),
        "someone else's table stays: {t}"
    );
}
