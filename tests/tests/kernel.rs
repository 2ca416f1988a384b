//! The kernel programs against real sockets: a fixed matrix of Istio cases, a
//! differential run against `policy::verdict()`, and getsockopt transparency.
//! Root only; each test has its own namespaces and cgroups (see `Lab`).

use std::net::{IpAddr, SocketAddr};

use divert::{
    ebpf::Interceptor,
    policy::{verdict, Action, IncludeRanges, IpNetwork, Policy},
};
use divert_tests::{command_in, require_root, Lab};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

const APP: u32 = 1000;

/// What the testkit client prints when `action` happens to a dial of `dst`.
fn expected(action: Action, dst: SocketAddr, mapped: bool) -> String {
    let shown_peer = match (dst, mapped) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => dst,
    };
    let lo = |port| match dst {
        SocketAddr::V4(_) => format!("127.0.0.1:{port}"),
        SocketAddr::V6(_) => format!("[::1]:{port}"),
    };
    match action {
        Action::Redirect(p) | Action::InboundCapture(p) => {
            format!("proxy {} orig={dst} peer={shown_peer}", lo(p))
        }
        Action::PassThrough => format!("server {dst} peer={shown_peer}"),
    }
}

/// A lab with the programs attached, the peers running, and the client
/// namespace registered with whatever policy `set` was last given.
struct Rig {
    lab: Lab,
    _daemons: Vec<divert_tests::Daemon>,
    interceptor: Interceptor,
    cookie: u64,
    local: Vec<IpAddr>,
    current: Option<Policy>,
}

impl Rig {
    fn new() -> Rig {
        let lab = Lab::new().expect("lab");
        let daemons = lab.start_peers().expect("peers");
        let (cookie, local) = lab.client_identity().expect("client identity");
        let mut interceptor = Interceptor::load().expect("load");
        interceptor
            .attach_workload(lab.workload.file().unwrap())
            .expect("attach workload");
        interceptor
            .attach_proxy(lab.proxy.file().unwrap())
            .expect("attach proxy");
        Rig {
            lab,
            _daemons: daemons,
            interceptor,
            cookie,
            local,
            current: None,
        }
    }

    fn set(&mut self, mut p: Policy) -> Policy {
        p.local_addrs = self.local.clone();
        if let Some(old) = self.current.take() {
            self.interceptor
                .unregister(self.cookie, &old)
                .expect("unregister");
        }
        self.interceptor
            .register(self.cookie, &p)
            .expect("register");
        self.current = Some(p.clone());
        p
    }

    fn dial(&self, dst: SocketAddr, uid: u32, gid: u32, mapped: bool) -> String {
        self.lab.dial(dst, uid, gid, mapped).expect("dial")
    }
}

fn net(s: String) -> IpNetwork {
    s.parse().unwrap()
}

#[test]
fn istio_case_matrix() {
    require_root!();
    let mut rig = Rig::new();
    let n = rig.lab.n;
    let (own, p2, p3) = (rig.lab.v4(1), rig.lab.v4(2), rig.lab.v4(3));
    let (p6, p6b) = (rig.lab.v6(2), rig.lab.v6(3));
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    let lo4: IpAddr = "127.0.0.1".parse().unwrap();
    let lo6: IpAddr = "::1".parse().unwrap();
    let redirect = Action::Redirect(15001);
    let pass = Action::PassThrough;
    let all = Policy::default();
    let list = |v: Vec<String>| IncludeRanges::List(v.into_iter().map(net).collect());

    // (name, policy, destination, uid, gid, mapped, expected)
    let cases: Vec<(&str, Policy, SocketAddr, u32, u32, bool, Action)> = vec![
        (
            "include * redirects",
            all.clone(),
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "include list: inside",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.2/32")]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "include list: outside",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.2/32")]),
                ..all.clone()
            },
            at(p3, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "exclude beats a longer include",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.2/32")]),
                exclude_ranges: vec![net(format!("10.211.{n}.0/24"))],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-q redirects whatever -i says",
            Policy {
                include_ranges: list(vec![]),
                include_ports: vec![8080],
                ..all.clone()
            },
            at(p2, 8080),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "-q leaves other ports",
            Policy {
                include_ranges: list(vec![]),
                include_ports: vec![8080],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-q under -x passes",
            Policy {
                include_ranges: list(vec![]),
                include_ports: vec![8080],
                exclude_ranges: vec![net(format!("10.211.{n}.2/32"))],
                ..all.clone()
            },
            at(p2, 8080),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-o passes",
            Policy {
                exclude_ports: vec![5432],
                ..all.clone()
            },
            at(p2, 5432),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-o leaves other ports",
            Policy {
                exclude_ports: vec![5432],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "proxy UID passes",
            all.clone(),
            at(p2, 80),
            1337,
            APP,
            false,
            pass,
        ),
        (
            "proxy GID passes",
            all.clone(),
            at(p2, 80),
            APP,
            1337,
            false,
            pass,
        ),
        (
            "-u changed: old proxy UID is captured",
            Policy {
                proxy_uids: vec![2000],
                proxy_gids: vec![2000],
                ..all.clone()
            },
            at(p2, 80),
            1337,
            1337,
            false,
            redirect,
        ),
        (
            "-u changed: new proxy UID passes",
            Policy {
                proxy_uids: vec![2000],
                proxy_gids: vec![2000],
                ..all.clone()
            },
            at(p2, 80),
            2000,
            APP,
            false,
            pass,
        ),
        (
            "127.0.0.1 passes",
            all.clone(),
            at(lo4, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "own address passes",
            all.clone(),
            at(own, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "proxy to own address: inbound capture",
            all.clone(),
            at(own, 80),
            1337,
            1337,
            false,
            Action::InboundCapture(15006),
        ),
        (
            "IPv6 include *",
            all.clone(),
            at(p6, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "IPv6 outside an IPv4-only include",
            Policy {
                include_ranges: list(vec!["10.0.0.0/8".into()]),
                ..all.clone()
            },
            at(p6, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "IPv6 include list",
            Policy {
                include_ranges: list(vec![format!("fd00:211:{n}::2/128")]),
                ..all.clone()
            },
            at(p6, 8080),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "IPv6 exclude",
            Policy {
                exclude_ranges: vec![net(format!("fd00:211:{n}::/64"))],
                ..all.clone()
            },
            at(p6b, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "::1 passes",
            all.clone(),
            at(lo6, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "mapped IPv4 judged as IPv4: include",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.0/24")]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            true,
            redirect,
        ),
        (
            "mapped IPv4 judged as IPv4: exclude",
            Policy {
                exclude_ranges: vec![net(format!("10.211.{n}.2/32"))],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            true,
            pass,
        ),
        (
            "mapped 127.0.0.1 passes",
            all.clone(),
            at(lo4, 80),
            APP,
            APP,
            true,
            pass,
        ),
    ];
    let mut failures = Vec::new();
    for (name, policy, dst, uid, gid, mapped, want) in cases {
        let p = rig.set(policy);
        // The hand-written expectation and the reference agree...
        assert_eq!(
            verdict(&p, dst, uid, gid).action,
            want,
            "{name}: verdict() disagrees with the table"
        );
        // ...and so does the kernel.
        let got = rig.dial(dst, uid, gid, mapped);
        let want_line = expected(want, dst, mapped);
        if got != want_line {
            failures.push(format!("{name}: dial {dst} as {uid}/{gid} mapped={mapped}\n   got  {got}\n   want {want_line}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn kernel_agrees_with_verdict_on_random_cases() {
    require_root!();
    let mut rig = Rig::new();
    let n = rig.lab.n;
    let seed: u64 = std::env::var("DIVERT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0d17e57);
    let cases: usize = std::env::var("DIVERT_TEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    eprintln!("differential: {cases} cases, seed {seed} (DIVERT_TEST_SEED, DIVERT_TEST_CASES)");
    let mut rng = StdRng::seed_from_u64(seed);
    let include_pool: Vec<String> = vec![
        format!("10.211.{n}.0/24"),
        format!("10.211.{n}.2/32"),
        format!("10.211.{n}.3/32"),
        "10.0.0.0/8".into(),
        format!("fd00:211:{n}::/64"),
        format!("fd00:211:{n}::2/128"),
        "127.0.0.0/8".into(),
    ];
    let exclude_pool: Vec<String> = vec![
        format!("10.211.{n}.3/32"),
        format!("10.211.{n}.0/25"),
        format!("fd00:211:{n}::3/128"),
        "10.0.0.0/8".into(),
        format!("10.211.{n}.1/32"),
    ];
    let dests: Vec<(IpAddr, bool)> = vec![
        (rig.lab.v4(2), false),
        (rig.lab.v4(3), false),
        (rig.lab.v4(1), false),
        ("127.0.0.1".parse().unwrap(), false),
        ("127.0.0.5".parse().unwrap(), false),
        (rig.lab.v6(2), false),
        (rig.lab.v6(3), false),
        ("::1".parse().unwrap(), false),
        (rig.lab.v4(2), true),
        (rig.lab.v4(1), true),
    ];
    let ports = [80u16, 8080, 5432, 15008];
    let id_sets: Vec<Vec<u32>> = vec![
        vec![1337],
        vec![2000],
        vec![1337, 2000],
        vec![3000, 1337],
        vec![],
    ];
    let ids = [1337u32, 2000, 3000, APP];
    let subset = |pool: &[String], rng: &mut StdRng| -> Vec<IpNetwork> {
        pool.iter()
            .filter(|_| rng.gen_bool(0.3))
            .map(|s| net(s.clone()))
            .collect()
    };
    let mut mismatches = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..cases {
        let include_ranges = match rng.gen_range(0..4) {
            0 => IncludeRanges::All,
            1 => IncludeRanges::List(vec![]),
            _ => IncludeRanges::List(subset(&include_pool, &mut rng)),
        };
        let mut proxy_uids = id_sets.choose(&mut rng).unwrap().clone();
        if proxy_uids.is_empty() {
            proxy_uids = vec![1337];
        }
        let policy = Policy {
            include_ranges,
            exclude_ranges: subset(&exclude_pool, &mut rng),
            include_ports: ports
                .iter()
                .copied()
                .filter(|_| rng.gen_bool(0.25))
                .collect(),
            exclude_ports: ports
                .iter()
                .copied()
                .filter(|_| rng.gen_bool(0.15))
                .collect(),
            proxy_uids,
            proxy_gids: id_sets.choose(&mut rng).unwrap().clone(),
            ..Policy::default()
        };
        let p = rig.set(policy);
        // A few dials per policy keep the run short.
        for _ in 0..3 {
            let (ip, mapped) = *dests.choose(&mut rng).unwrap();
            let dst = SocketAddr::new(ip, *ports.choose(&mut rng).unwrap());
            let (uid, gid) = (
                *ids.choose(&mut rng).unwrap(),
                *ids.choose(&mut rng).unwrap(),
            );
            let v = verdict(&p, dst, uid, gid);
            *seen
                .entry(
                    format!("{:?}", v.rule)
                        .split('(')
                        .next()
                        .unwrap()
                        .to_string(),
                )
                .or_default() += 1;
            let want = expected(v.action, dst, mapped);
            let got = rig.dial(dst, uid, gid, mapped);
            if got != want {
                mismatches.push(format!(
                    "case {i}: {dst} as {uid}/{gid} mapped={mapped} rule={:?}\n  policy {p:?}\n  got  {got}\n  want {want}",
                    v.rule
                ));
            }
        }
    }
    eprintln!("differential: rules exercised {seen:?}");
    assert!(
        seen.len() >= 9,
        "the random cases exercise too few rules: {seen:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatch(es):\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn getsockopt_program_leaves_other_options_alone() {
    require_root!();
    let rig = Rig::new();
    let dst = SocketAddr::new(rig.lab.v4(2), 80).to_string();
    let report = |cg| {
        let (mut cmd, _keep) =
            command_in(rig.lab.in_client(cg, None), divert_tests::testkit_bin()).unwrap();
        let out = cmd.args(["sockopts", &dst]).output().unwrap();
        assert!(
            out.status.success(),
            "sockopts failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The proxy cgroup has divert's getsockopt program; "plain" has none.
    let shown = |cg: &std::path::Path| {
        let out = std::process::Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(cg)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        shown(&rig.lab.proxy.path).contains("divert_getsock"),
        "getsockopt program not attached"
    );
    assert!(!shown(&rig.lab.plain.path).contains("divert_getsock"));
    let with = report(&rig.lab.proxy);
    let without = report(&rig.lab.plain);
    assert!(with.lines().count() >= 12, "short report: {with}");
    let differing: Vec<String> = with
        .lines()
        .zip(without.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  with    {a}\n  without {b}"))
        .collect();
    assert!(
        differing.is_empty(),
        "getsockopt results differ under divert's program:\n{}",
        differing.join("\n")
    );
    assert_eq!(with.lines().count(), without.lines().count());
}
