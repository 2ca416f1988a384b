//! Load: 1,000 network namespaces registered with `divert daemon` through
//! `divert init`, 10 connects from each (10,000 in all), and the kernel's
//! counters, read from the pinned maps and from `/metrics`, exact.

use std::{net::SocketAddr, sync::Mutex, thread};

use divert::ebpf::pinned;
use divert_tests::{
    command_in, divert_bin,
    node::{text, Setup},
    require_root, testkit_bin, Netns, Placement,
};

const NAMESPACES: usize = 1_000;
const CONNECTS: usize = 10;
/// Redirected (everything is, with `-i '*'`) to 127.0.0.1:15001, where
/// nothing listens: the connect is refused, and the kernel has judged and
/// counted it.
const DST: &str = "10.99.0.1:80";

/// Run `f` over `items` on four threads.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let out = Mutex::new(Vec::new());
    let chunk = items.len().div_ceil(4).max(1);
    thread::scope(|s| {
        for part in items.chunks(chunk) {
            let (f, out) = (&f, &out);
            s.spawn(move || {
                let r: Vec<R> = part.iter().map(f).collect();
                out.lock().unwrap().extend(r);
            });
        }
    });
    out.into_inner().unwrap()
}

#[test]
fn a_thousand_namespaces_and_ten_thousand_connections_counted_exactly() {
    require_root!();
    let s = Setup::start();
    // A node of that many pods (the default, 110, would refuse the 111th).
    let _daemon = s.daemon_with(&["--max-pods", &NAMESPACES.to_string()]);
    let sock = s.socket.to_str().unwrap().to_string();
    let indices: Vec<usize> = (0..NAMESPACES).collect();
    let namespaces: Vec<Netns> = parallel(&indices, |i| {
        Netns::create(&format!("divert-test-{}-load-{i}", std::process::id())).unwrap()
    });
    let placed = |ns: &Netns, program: std::path::PathBuf| {
        command_in(
            Placement {
                netns: ns,
                cgroup: &s.lab.plain,
                ids: None,
            },
            program,
        )
        .unwrap()
    };
    let failures: Vec<String> = parallel(&namespaces, |ns| {
        let (mut cmd, _keep) = placed(ns, divert_bin());
        cmd.args([
            "init",
            "--backend",
            "ebpf",
            "--daemon-socket",
            &sock,
            "-u",
            "1337",
            "-i",
            "*",
        ]);
        let out = cmd.output().unwrap();
        (!out.status.success()).then(|| format!("{}: {}", ns.name, text(&out.stderr)))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(
        failures.is_empty(),
        "{} inits failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );

    let maps = pinned::open_maps(&s.bpffs.path()).unwrap();
    let cookies: Vec<u64> = parallel(&namespaces, |ns| {
        ns.enter(divert::netns::current_cookie).unwrap().unwrap()
    });
    let registered = maps.registered_cookies().unwrap();
    assert_eq!(registered.len(), NAMESPACES);
    assert!(cookies.iter().all(|c| registered.binary_search(c).is_ok()));

    let outputs: Vec<String> = parallel(&namespaces, |ns| {
        let (mut cmd, _keep) = placed(ns, testkit_bin());
        cmd.args(["connects", DST, &CONNECTS.to_string()]);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}: {}", ns.name, text(&out.stdout));
        text(&out.stdout)
    });
    let want = format!("connects {CONNECTS} refused {CONNECTS}");
    assert!(
        outputs.iter().all(|o| o.trim() == want),
        "{:?}",
        &outputs[..3]
    );

    // The kernel's per-CPU counters, summed: exactly 10 per namespace, all
    // redirected, to the one destination.
    let dst: SocketAddr = DST.parse().unwrap();
    let counters = maps.counters().unwrap();
    let ours: Vec<_> = counters
        .iter()
        .filter(|c| cookies.contains(&c.netns_cookie))
        .collect();
    assert_eq!(ours.len(), NAMESPACES, "one series per namespace");
    for c in &ours {
        assert_eq!(
            (c.destination, c.port, c.verdict, c.connections),
            (dst.ip(), dst.port(), "redirected", CONNECTS as u64),
            "{c:?}"
        );
    }
    // And the same through /metrics.
    let (_, body) = s.http_get("/metrics");
    let total: u64 = body
        .lines()
        .filter(|l| {
            l.starts_with("divert_connections_total{")
                && l.contains(r#"destination="10.99.0.1",port="80",verdict="redirected""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, (NAMESPACES * CONNECTS) as u64);
    assert!(
        body.contains(&format!("divert_registered_namespaces {NAMESPACES}")),
        "{body}"
    );
}
