//! `divert maps`, `divert stats` and `divert explain` against a node with
//! `divert daemon` running (see `divert_tests::node`): exact connection and
//! byte counts for a known workload in `stats`, in `/metrics` and in JSON;
//! `explain` against what the kernel does over the Istio matrix and random
//! cases; `maps` before and after a namespace goes; the JSON shapes; the
//! errors of a reader that is not root or points at nothing.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::unix::process::CommandExt as _,
    process::{Command, Output},
    thread,
    time::{Duration, Instant, SystemTime},
};

use divert::{ebpf::pinned, policy::verdict};
use divert_tests::{
    cases::{istio_matrix, seed_and_count, Generator},
    command_in, divert_bin,
    node::{text, Setup},
    require_root, testkit_bin, wait_listening, Daemon, Placement,
};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;

/// `divert ARGS… --bpffs-dir <the setup's>` from the host namespace.
fn divert(s: &Setup, args: &[&str]) -> Output {
    Command::new(divert_bin())
        .args(args)
        .arg("--bpffs-dir")
        .arg(s.bpffs.path())
        .output()
        .expect("running divert")
}

/// [`divert`] with `-o json`, which must succeed and print one JSON value.
fn json(s: &Setup, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = divert(s, &all);
    assert!(
        out.status.success(),
        "divert {all:?}: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "divert {all:?} printed no JSON ({e}): {}",
            text(&out.stdout)
        )
    })
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Number,
    String,
    Array,
    Object,
    NullOr(&'static Kind),
}

/// `v` is an object with at least these keys, of these kinds.
fn assert_shape(what: &str, v: &Value, fields: &[(&str, Kind)]) {
    fn is(v: &Value, k: Kind) -> bool {
        match k {
            Kind::Number => v.is_u64(),
            Kind::String => v.is_string(),
            Kind::Array => v.is_array(),
            Kind::Object => v.is_object(),
            Kind::NullOr(k) => v.is_null() || is(v, *k),
        }
    }
    for (name, kind) in fields {
        let got = v.get(name);
        assert!(
            got.is_some_and(|g| is(g, *kind)),
            "{what}: field {name} should be {kind:?}, got {got:?} in {v}"
        );
    }
}

const MAPS_ROW: &[(&str, Kind)] = &[
    ("netns_cookie", Kind::Number),
    ("pod", Kind::NullOr(&Kind::Object)),
    ("source", Kind::String),
    ("registered_at", Kind::NullOr(&Kind::String)),
    ("proxy_port", Kind::Number),
    ("include_ranges", Kind::Array),
    ("exclude_ranges", Kind::Array),
    ("include_ports", Kind::Array),
    ("exclude_ports", Kind::Array),
    ("proxy_uids", Kind::Array),
    ("proxy_gids", Kind::Array),
];

const STATS_ROW: &[(&str, Kind)] = &[
    ("netns_cookie", Kind::Number),
    ("pod", Kind::NullOr(&Kind::Object)),
    ("destination", Kind::String),
    ("port", Kind::Number),
    ("verdict", Kind::String),
    ("connections", Kind::Number),
    ("bytes_sent", Kind::Number),
    ("bytes_received", Kind::Number),
];

const EXPLAIN: &[(&str, Kind)] = &[
    ("netns_cookie", Kind::Number),
    ("verdict", Kind::String),
    ("rule", Kind::String),
    ("to", Kind::String),
    ("steps", Kind::Array),
];

fn client_cookie(s: &Setup) -> u64 {
    s.lab.client_identity().unwrap().0
}

/// The stats row of (destination, port, verdict) in the client namespace.
fn row<'a>(rows: &'a Value, dst: SocketAddr, verdict: &str) -> Option<&'a Value> {
    rows.as_array().unwrap().iter().find(|r| {
        r["destination"] == dst.ip().to_string()
            && r["port"] == dst.port()
            && r["verdict"] == verdict
    })
}

/// The value of the series `name{…needles…}` in a Prometheus text page.
fn series(page: &str, name: &str, needles: &[String]) -> Option<u64> {
    page.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && needles.iter().all(|n| l.contains(n)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn stats_and_metrics_count_exact_connections_and_bytes() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    // The proxies of this test listen on 15101 and 15102 and answer with R
    // bytes; the passthrough destinations are the peer's ports 9100 and
    // 9101, excluded (-o). On 15101 and 9100 the server closes after the
    // client's FIN, on 15102 and 9101 after S bytes.
    let (sent, received) = (1_000usize, 5_000usize);
    let kit = testkit_bin();
    let mut servers = Vec::new();
    let mut server = |place: Placement<'_>, close: &str, addrs: &[&str]| {
        let (mut cmd, _keep) = command_in(place, &kit).unwrap();
        cmd.args([
            "bytes-server",
            &sent.to_string(),
            &received.to_string(),
            close,
        ])
        .args(addrs);
        servers.push(Daemon::spawn("bytes-server", cmd).unwrap());
    };
    let redirected: SocketAddr = SocketAddr::new(s.lab.v4(2), 80);
    let peer = |port| SocketAddr::new(s.lab.v4(2), port);
    let (pass_eof, pass_first) = (peer(9100), peer(9101));
    let (red6, pass6) = (
        SocketAddr::new(s.lab.v6(2), 80),
        SocketAddr::new(s.lab.v6(2), 9100),
    );
    let peer_ns = || Placement {
        netns: &s.lab.peer,
        cgroup: &s.lab.plain,
        ids: None,
    };
    server(
        s.lab.in_client(&s.lab.proxy, None),
        "eof",
        &["127.0.0.1:15101", "[::1]:15101"],
    );
    server(
        peer_ns(),
        "eof",
        &[&pass_eof.to_string(), &pass6.to_string()],
    );
    server(
        s.lab.in_client(&s.lab.proxy, None),
        "first",
        &["127.0.0.1:15102"],
    );
    server(peer_ns(), "first", &[&pass_first.to_string()]);
    wait_listening(
        &s.lab.client,
        &[
            "127.0.0.1:15101".parse().unwrap(),
            "[::1]:15101".parse().unwrap(),
            "127.0.0.1:15102".parse().unwrap(),
            pass_eof,
            pass6,
            pass_first,
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port()),
        v6 => v6,
    };
    let verdict_of = |a: SocketAddr| {
        if a.port() == 80 {
            "redirected"
        } else {
            "passthrough"
        }
    };
    // Each way of closing takes its own path to TCP_CLOSE: the client's FIN
    // first (orphaned, or half-closed and still reading), the server's
    // first, or a race. The counts must be exact for all of them, for IPv6,
    // and for IPv4 dialled as ::ffff:a.b.c.d (counted on the IPv4 row).
    // Each dial: (the row it counts on, the address dialled, connections).
    let mut want_n: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (proxy_port, mode, dials) in [
        (
            "15101",
            "close",
            vec![
                (redirected, redirected, 4),
                (pass_eof, pass_eof, 2),
                (red6, red6, 2),
                (pass6, pass6, 2),
                (redirected, mapped(redirected), 1),
                (pass_eof, mapped(pass_eof), 1),
            ],
        ),
        (
            "15101",
            "half",
            vec![(redirected, redirected, 3), (pass_eof, pass_eof, 2)],
        ),
        (
            "15102",
            "last",
            vec![(redirected, redirected, 2), (pass_first, pass_first, 1)],
        ),
        (
            "15102",
            "close",
            vec![(redirected, redirected, 2), (pass_first, pass_first, 1)],
        ),
    ] {
        let out = s.init(&["-p", proxy_port, "-o", "9100,9101", "-i", "*"]);
        assert!(out.status.success(), "init: {}", text(&out.stderr));
        for (row, dst, n) in dials {
            let (mut cmd, _keep) =
                command_in(s.lab.in_client(&s.lab.workload, Some((1000, 1000))), &kit).unwrap();
            let out = cmd
                .args(["bytes", &dst.to_string(), &n.to_string()])
                .args([sent.to_string(), received.to_string(), mode.to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "bytes to {dst} ({mode}): {}",
                text(&out.stdout)
            );
            *want_n.entry(row).or_default() += n;
        }
    }
    let want = |n: usize| (n as u64, (n * sent) as u64, (n * received) as u64);
    let got = |rows: &Value, dst: SocketAddr| {
        row(rows, dst, verdict_of(dst)).map(|r| {
            (
                r["connections"].as_u64().unwrap(),
                r["bytes_sent"].as_u64().unwrap(),
                r["bytes_received"].as_u64().unwrap(),
            )
        })
    };
    let all_exact = |rows: &Value| want_n.iter().all(|(&d, &n)| got(rows, d) == Some(want(n)));
    let cookie = client_cookie(&s);
    let netns = cookie.to_string();
    // Bytes are counted as each connection reaches TCP_CLOSE, which can
    // come a moment after the client process is gone. Wait (bounded) for the
    // totals, then hold them to the exact figures.
    let deadline = Instant::now() + Duration::from_secs(15);
    let rows = loop {
        let rows = json(&s, &["stats", "--netns", &netns]);
        if all_exact(&rows) || Instant::now() > deadline {
            break rows;
        }
        thread::sleep(Duration::from_millis(100));
    };
    for (&dst, &n) in &want_n {
        assert_eq!(got(&rows, dst), Some(want(n)), "{dst}: {rows:#}");
    }
    // This namespace made no other connects.
    assert_eq!(rows.as_array().unwrap().len(), want_n.len(), "{rows:#}");
    for r in rows.as_array().unwrap() {
        assert_shape("stats", r, STATS_ROW);
    }

    // --verdict and --top select; the table says the same as the JSON.
    let only_pass = json(
        &s,
        &["stats", "--netns", &netns, "--verdict", "passthrough"],
    );
    assert_eq!(only_pass.as_array().unwrap().len(), 3, "{only_pass:#}");
    let top1 = json(&s, &["stats", "--netns", &netns, "--top", "1"]);
    assert_eq!(top1[0]["verdict"], "redirected", "most connections first");
    let table = text(&divert(&s, &["stats", "--netns", &netns]).stdout);
    let line = table
        .lines()
        .find(|l| l.contains(&redirected.ip().to_string()) && l.contains("redirected"))
        .unwrap_or_else(|| panic!("{table}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let (n, tx, rx) = want(want_n[&redirected]);
    assert!(
        words.ends_with(&[
            "80",
            "redirected",
            &n.to_string(),
            &tx.to_string(),
            &rx.to_string()
        ]),
        "{line}"
    );

    // /metrics: the same figures under Prometheus names.
    let (status, page) = s.http_get("/metrics");
    assert_eq!(status, 200, "{page}");
    for (&dst, &n) in &want_n {
        let verdict = verdict_of(dst);
        let labels = [
            // Registered by init, no pod watch: the pod is unknown.
            "source_workload_namespace=\"unknown\",source_pod=\"unknown\"".to_string(),
            format!("destination=\"{}\"", dst.ip()),
            format!("port=\"{}\"", dst.port()),
            format!("verdict=\"{verdict}\""),
        ];
        let (conns, tx, rx) = want(n);
        assert_eq!(
            series(&page, "divert_connections_total", &labels),
            Some(conns),
            "{page}"
        );
        assert_eq!(
            series(&page, "divert_sent_bytes_total", &labels),
            Some(tx),
            "{page}"
        );
        assert_eq!(
            series(&page, "divert_received_bytes_total", &labels),
            Some(rx),
            "{page}"
        );
    }
}

#[test]
fn a_connection_closing_after_its_namespace_was_unregistered_is_not_counted() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let out = s.init(&["-p", "15101", "-i", "*"]);
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    let kit = testkit_bin();
    let (mut srv, _keep) = command_in(s.lab.in_client(&s.lab.proxy, None), &kit).unwrap();
    srv.args(["bytes-server", "100", "100", "eof", "127.0.0.1:15101"]);
    let _srv = Daemon::spawn("bytes-server", srv).unwrap();
    wait_listening(
        &s.lab.client,
        &["127.0.0.1:15101".parse().unwrap()],
        Duration::from_secs(10),
    )
    .unwrap();
    let (mut hold, _keep) =
        command_in(s.lab.in_client(&s.lab.workload, Some((1000, 1000))), &kit).unwrap();
    let mut hold = hold
        .args([
            "hold",
            &SocketAddr::new(s.lab.v4(2), 80).to_string(),
            "100",
            "1000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "open");
    let netns = client_cookie(&s).to_string();
    let rows = json(&s, &["stats", "--netns", &netns]);
    assert_eq!(rows[0]["connections"], 1, "{rows:#}");
    // Unregistered while the connection is open: its series go at once...
    let out = s.init(&["--cleanup"]);
    assert!(out.status.success(), "cleanup: {}", text(&out.stderr));
    assert_eq!(
        json(&s, &["stats", "--netns", &netns]),
        serde_json::json!([])
    );
    // ...and its close (after the client's 1 s, then the server's FIN)
    // brings no bytes back.
    assert!(hold.wait().unwrap().success());
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        json(&s, &["stats", "--netns", &netns]),
        serde_json::json!([])
    );
}

#[test]
fn stats_watch_prints_rates_per_interval() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let out = s.init(&["-i", "*"]);
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    s.assert_redirected("before watching");
    let mut watch = Command::new(divert_bin())
        .args([
            "stats",
            "--watch",
            "--interval",
            "0.2",
            "-o",
            "json",
            "--bpffs-dir",
        ])
        .arg(s.bpffs.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    // Two samples, each a JSON array of rows with their rates.
    for _ in 0..2 {
        let line = lines.next().expect("a sample").unwrap();
        let rows: Value = serde_json::from_str(&line).unwrap();
        let rows = rows.as_array().unwrap();
        assert!(!rows.is_empty(), "{line}");
        for r in rows {
            assert_shape("stats --watch", r, STATS_ROW);
            for rate in [
                "connections_per_sec",
                "bytes_sent_per_sec",
                "bytes_received_per_sec",
            ] {
                assert!(r[rate].as_f64().is_some_and(|x| x >= 0.0), "{rate}: {r}");
            }
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn explain_agrees_with_the_kernel() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    let (cookie, local) = s.lab.client_identity().unwrap();
    let netns = cookie.to_string();
    // Policies go straight into the daemon's pinned maps, as the daemon
    // writes them, so the matrix's policies need no flag spelling.
    let set = |mut p: divert::policy::Policy| {
        p.local_addrs = local.clone();
        pinned::open_maps(&s.bpffs.path())
            .unwrap()
            .replace(cookie, &p, divert::ebpf::RegisteredBy::Init)
            .unwrap();
        p
    };
    // What the kernel did, from the testkit client's line: which listener
    // answered.
    let kernel = |got: &str| {
        if got.starts_with("proxy 127.0.0.1:15006") || got.starts_with("proxy [::1]:15006") {
            "inbound_capture"
        } else if got.starts_with("proxy ") {
            "redirected"
        } else if got.starts_with("server ") {
            "passthrough"
        } else {
            "error"
        }
    };
    let explain = |dst: SocketAddr, uid: u32, gid: u32, mapped: bool| {
        let shown = match (dst, mapped) {
            (SocketAddr::V4(v4), true) => {
                SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            _ => dst,
        };
        json(
            &s,
            &[
                "explain",
                "--netns",
                &netns,
                &shown.to_string(),
                "--uid",
                &uid.to_string(),
                "--gid",
                &gid.to_string(),
            ],
        )
    };
    let mut failures = Vec::new();
    let mut check = |name: String, p: &divert::policy::Policy, dst, uid, gid, mapped| {
        let e = explain(dst, uid, gid, mapped);
        assert_shape("explain", &e, EXPLAIN);
        let got = s.lab.dial(dst, uid, gid, mapped).unwrap();
        // The rule named is the one of the maps' order: the most specific
        // matching range (see `divert::cli::explain::most_specific_first`).
        let mut ordered = p.clone();
        divert::cli::explain::most_specific_first(&mut ordered);
        let want_rule = verdict(&ordered, dst, uid, gid).rule.to_string();
        if e["verdict"] != kernel(&got) || e["rule"] != want_rule.as_str() {
            failures.push(format!(
                "{name}: {dst} as {uid}/{gid} mapped={mapped}: explain says {} ({}), the kernel did {got}, verdict() names {want_rule}",
                e["verdict"], e["rule"]
            ) + &format!(
                "\n   policy excludes {:?} includes {:?}; the maps hold {:?}",
                p.exclude_ranges,
                p.include_ranges,
                pinned::open_maps(&s.bpffs.path()).unwrap().policy_of(cookie).unwrap().map(|m| (m.exclude_ranges, m.include_ranges))
            ));
        }
        let steps = e["steps"].as_array().unwrap();
        let matched: Vec<bool> = steps.iter().map(|s| s["matched"] == true).collect();
        if matched.last() != Some(&true) || matched.iter().filter(|m| **m).count() != 1 {
            failures.push(format!(
                "{name}: the last step, and only it, must match: {e}"
            ));
        }
    };
    for c in istio_matrix(&s.lab) {
        let p = set(c.policy.clone());
        check(c.name.to_string(), &p, c.dst, c.uid, c.gid, c.mapped);
    }
    let (seed, cases) = seed_and_count(30);
    eprintln!("explain differential: {cases} policies, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let gen = Generator::new(&s.lab);
    for i in 0..cases {
        let p = set(gen.policy(&mut rng));
        for _ in 0..2 {
            let (dst, uid, gid, mapped) = gen.dial(&mut rng);
            check(format!("random {i}"), &p, dst, uid, gid, mapped);
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreement(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn maps_shows_what_init_registered_and_nothing_once_the_namespace_is_gone() {
    require_root!();
    let s = Setup::start();
    let mut daemon = s.daemon();
    let before = SystemTime::now() - Duration::from_secs(1);
    let (gone, gone_cookie, out) = s.init_in_new_netns(
        "maps",
        &divert_tests::injector_with(&[("-o", "5432,3306"), ("-x", "10.96.0.0/12")]),
    );
    assert!(out.status.success(), "init: {}", text(&out.stderr));

    let netns = gone_cookie.to_string();
    let rows = json(&s, &["maps", "--netns", &netns]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows:#}");
    let r = &rows[0];
    assert_shape("maps", r, MAPS_ROW);
    assert_eq!(r["netns_cookie"], gone_cookie);
    assert_eq!(r["source"], "init");
    assert_eq!(r["pod"], Value::Null, "no pod watch ran");
    // The injector's flags, as the kernel holds them.
    assert_eq!(r["include_ranges"], serde_json::json!(["*"]));
    assert_eq!(r["exclude_ranges"], serde_json::json!(["10.96.0.0/12"]));
    assert_eq!(r["include_ports"], serde_json::json!([]));
    assert_eq!(r["exclude_ports"], serde_json::json!([3306, 5432]));
    assert_eq!(r["proxy_uids"], serde_json::json!([1337]));
    assert_eq!(r["proxy_gids"], serde_json::json!([1337]));
    assert_eq!(r["proxy_port"], 15001);
    let at = r["registered_at"].as_str().unwrap();
    let at = k8s_openapi::chrono::DateTime::parse_from_rfc3339(at).unwrap();
    assert!(
        SystemTime::from(at) >= before && SystemTime::from(at) <= SystemTime::now(),
        "registered_at {at}"
    );

    // A pod identity, as the pod watch records it, selects with --pod; and
    // the daemon being down does not stop the readers.
    pinned::open_maps(&s.bpffs.path())
        .unwrap()
        .set_pod(gone_cookie, "shop", "cart-1")
        .unwrap();
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    let by_pod = json(&s, &["maps", "--pod", "shop/cart-1"]);
    assert_eq!(by_pod[0]["netns_cookie"], gone_cookie, "{by_pod:#}");
    assert_eq!(
        by_pod[0]["pod"],
        serde_json::json!({"namespace": "shop", "name": "cart-1"})
    );
    let table = text(&divert(&s, &["maps"]).stdout);
    assert!(
        table.lines().any(|l| l.contains(&netns)
            && l.contains("shop/cart-1")
            && l.contains(" init ")
            && l.contains("3306,5432")),
        "{table}"
    );

    // It makes three connects (to its own loopback, refused), counted.
    gone.ip(&["link", "set", "lo", "up"]).unwrap();
    let (mut cmd, _keep) = command_in(
        Placement {
            netns: &gone,
            cgroup: &s.lab.workload,
            ids: None,
        },
        testkit_bin(),
    )
    .unwrap();
    let out = cmd.args(["connects", "127.0.0.1:9", "3"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    let counted = json(&s, &["stats", "--netns", &netns]);
    assert_eq!(counted[0]["connections"], 3, "{counted:#}");

    // The namespace goes: the restarted daemon's sweep removes its policy,
    // its pod and its counters; maps and stats show nothing of it.
    let _daemon = s.daemon();
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all = json(&s, &["maps"]);
        if !all
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["netns_cookie"] == gone_cookie)
        {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {all:#}");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        json(&s, &["stats", "--netns", &netns]),
        serde_json::json!([])
    );
    let out = divert(&s, &["maps", "--pod", "shop/cart-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("pod shop/cart-1 is not recorded"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn readers_say_what_is_wrong() {
    require_root!();
    let s = Setup::start();
    let _daemon = s.daemon();
    // Nothing pinned at that path.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(divert_bin())
        .args(["maps", "--bpffs-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("no divert maps are pinned under") && err.contains("divert daemon"),
        "{err}"
    );
    // Not root.
    let out = Command::new(divert_bin())
        .args(["stats", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("needs root on the node"), "{err}");
    // A namespace with no policy, and explain without a namespace.
    let out = divert(&s, &["explain", "--netns", "1", "10.0.0.1:80"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("netns 1 has no policy registered"),
        "{}",
        text(&out.stderr)
    );
    let out = divert(&s, &["explain", "10.0.0.1:80"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--netns COOKIE or --pod"),
        "{}",
        text(&out.stderr)
    );
}
