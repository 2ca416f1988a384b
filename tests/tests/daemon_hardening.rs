//! `divert daemon` as a careless operator and a hostile client would try
//! it: bad input refused before anything touches the kernel, one daemon per
//! socket, every request validated and bounded, SIGTERM, and the daemon
//! under abuse (concurrent registrations, silent clients, a 50 MB line,
//! 1,000 idle HTTP connections) with its threads and memory printed.
//! Root only; each test has its own lab, bpffs mount and socket.

use std::{
    io::Write,
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use divert::ebpf::pinned;
use divert_tests::{
    command_in, divert_bin, node::text, node::Bpffs, node::Setup, require_root, testkit_bin, Lab,
};

/// The daemon's command line for `setup` with `extra` flags, not started.
fn daemon_cmd(lab: &Lab, bpffs: &Bpffs, socket: &Path, extra: &[&str]) -> Command {
    divert_tests::node::daemon_command(lab, bpffs, socket, extra)
}

fn on_bpffs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type().0 == 0xcafe4a11)
        .unwrap_or(false)
}

/// Each bad start exits 2 naming what is wrong, and leaves no attachment,
/// no pin and no bpffs mount.
#[test]
fn a_refused_start_leaves_nothing_behind() {
    require_root!();
    let lab = Lab::new().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let not_cgroup = dir.path().join("not-a-cgroup");
    std::fs::create_dir(&not_cgroup).unwrap();
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["--gc-interval".into(), "0".into()],
            vec![],
            "--gc-interval 0",
        ),
        (
            vec!["--metrics-addr".into(), taken_addr.clone()],
            vec![],
            "--metrics-addr",
        ),
        (
            vec!["--kubernetes".into()],
            vec![("NODE_NAME", "")],
            "NODE_NAME",
        ),
        (
            vec!["--cgroup-root".into(), not_cgroup.display().to_string()],
            vec![],
            "not cgroup v2",
        ),
    ];
    for (extra, env, says) in cases {
        let bpffs = Bpffs::tempdir();
        let socket = bpffs.dir.path().join("divert.sock");
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = daemon_cmd(&lab, &bpffs, &socket, &extra)
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?} must say {says:?}: {err}");
        assert!(!on_bpffs(&bpffs.path()), "{extra:?}: bpffs was mounted");
        assert!(
            !bpffs.path().join("maps").exists(),
            "{extra:?}: something was pinned"
        );
        let attached = pinned::attachment_counts(&lab.root.path).unwrap();
        assert!(
            attached.iter().all(|&(_, n, _)| n == 0),
            "{extra:?}: attached {attached:?}"
        );
    }
    // A cgroup v1 hierarchy, where the host has one.
    let v1 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup")
                .then(|| left.split_whitespace().nth(4).map(str::to_string))?
        });
    match v1 {
        Some(v1) => {
            let bpffs = Bpffs::tempdir();
            let socket = bpffs.dir.path().join("divert.sock");
            let out = daemon_cmd(&lab, &bpffs, &socket, &["--cgroup-root", &v1])
                .output()
                .unwrap();
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(err.contains("cgroup v1"), "{err}");
        }
        None => eprintln!("no cgroup v1 hierarchy mounted here: that case is not run"),
    }
}

/// A second daemon on a live socket refuses and exits non-zero; the first
/// one keeps serving registrations and stays ready.
#[test]
fn one_daemon_per_socket() {
    require_root!();
    let s = Setup::start();
    let _first = s.daemon();
    let other = Bpffs::tempdir();
    let out = daemon_cmd(&s.lab, &other, &s.socket, &[])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another divert daemon serves"), "{err}");
    assert!(!on_bpffs(&other.path()), "the refused daemon mounted bpffs");
    s.assert_attached_once("after the refused second daemon");
    assert_eq!(s.http_get("/healthz/ready").0, 200);
    let out = s.init(divert_tests::INJECTOR);
    assert!(out.status.success(), "{}", text(&out.stderr));
    s.assert_redirected("registered through the first daemon");
    // Readiness means registrations are served: without its socket, not ready.
    std::fs::remove_file(&s.socket).unwrap();
    assert_eq!(s.http_get("/healthz/ready").0, 503);
}

/// Send `line` as it is from a process in the lab's client namespace;
/// returns the daemon's answer line.
/// The testkit's `send` client, in the pod's namespace, connected to the
/// daemon's socket: it sends what is written to its stdin, then prints the
/// answer line.
fn sender(s: &Setup) -> std::process::Child {
    let (mut cmd, _keep) = command_in(s.lab.in_client(&s.lab.plain, None), testkit_bin()).unwrap();
    cmd.arg("send")
        .arg(&s.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn send(s: &Setup, line: &[u8]) -> String {
    let mut child = sender(s);
    let mut stdin = child.stdin.take().unwrap();
    let line = line.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&line);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    text(&out.stdout).trim().to_string()
}

fn maps_json(s: &Setup) -> String {
    let out = Command::new(divert_bin())
        .args(["maps", "-o", "json", "--bpffs-dir"])
        .arg(s.bpffs.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Requests the command line would refuse are refused with the field
/// named, change nothing, and never echo what was sent.
#[test]
fn every_request_is_held_to_the_command_line_rules() {
    require_root!();
    let s = Setup::start();
    let _d = s.daemon();
    let out = s.init(divert_tests::INJECTOR);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = maps_json(&s);
    let good = divert::policy::Policy::default();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = serde_json::json!({"version": 2, "op": "register", "policy": good});
        f(&mut v["policy"]);
        format!("{v}\n").into_bytes()
    };
    let secret = "SECRET-1f0e";
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with(&|p| p["proxy_port"] = 0.into()), "policy.proxy_port"),
        (
            with(&|p| p["exclude_ports"] = serde_json::json!([22, 0])),
            "policy.exclude_ports",
        ),
        (
            with(&|p| p["local_addrs"] = serde_json::json!(["10.9.9.9"])),
            "policy.local_addrs",
        ),
        (
            with(&|p| p["proxy_uids"] = serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9])),
            "9 IDs in policy.proxy_uids",
        ),
        (
            with(&|p| p["proxy_uids"] = serde_json::json!([])),
            "policy.proxy_uids",
        ),
        (
            with(&|p| p["proxy_gids"] = serde_json::json!([7, 7])),
            "policy.proxy_gids",
        ),
        (
            with(&|p| p["exclude_ranges"] = serde_json::json!(["::ffff:10.0.0.0/104"])),
            "policy.exclude_ranges",
        ),
        (
            format!("{{\"version\":2,\"op\":\"status\",\"{secret}\":1}}\n").into_bytes(),
            "not part of the protocol",
        ),
        (format!("{secret} not json\n").into_bytes(), "not JSON"),
        (
            format!("{{\"version\":2,\"op\":\"{secret}\"}}\n").into_bytes(),
            "unknown op",
        ),
        (
            [
                b"{\"version\":2,\"op\":\"status\",\"x\":\"".as_slice(),
                &[b'a'; 70_000],
                b"\"}\n",
            ]
            .concat(),
            "longer than 65536 bytes",
        ),
    ];
    for (line, says) in cases {
        let answer = send(&s, &line);
        let shown = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
        let r: divert::daemon::proto::Response = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{shown}: not an answer ({e}): {answer}"));
        assert!(!r.ok, "{shown}: accepted");
        let err = r.error.unwrap_or_default();
        assert!(err.contains(says), "{shown}: must say {says:?}: {err}");
        assert!(
            !err.contains(secret),
            "{shown}: the request is echoed: {err}"
        );
        assert!(err.len() < 600, "{shown}: a long error: {err}");
    }
    assert_eq!(maps_json(&s), before, "a refused request changed the maps");
    s.assert_redirected("after the refused requests");
}

/// SIGTERM is logged; the daemon exits at once with status 0, takes its
/// socket with it, and leaves the programs attached (interception goes on).
#[test]
fn sigterm_stops_the_daemon_promptly_and_cleanly() {
    require_root!();
    let s = Setup::start();
    let mut d = s.daemon();
    let out = s.init(divert_tests::INJECTOR);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    let t = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        thread::sleep(Duration::from_millis(10));
    };
    eprintln!("exited {:?} after SIGTERM", t.elapsed());
    assert!(status.success(), "{status}");
    assert!(!s.socket.exists(), "the socket was left behind");
    let log = std::fs::read_to_string(s.bpffs.dir.path().join("daemon-1.log")).unwrap();
    assert!(log.contains("stopping"), "{log}");
    s.assert_attached_once("after SIGTERM");
    s.assert_redirected("after SIGTERM: interception goes on");
}

#[test]
fn a_request_under_way_at_sigterm_is_answered_before_the_daemon_stops() {
    require_root!();
    let s = Setup::start();
    let mut d = s.daemon();
    // A client connected and still writing its request when SIGTERM comes.
    let mut client = sender(&s);
    // Time for the client to start and connect (the daemon accepts at once).
    thread::sleep(Duration::from_millis(1000));
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    thread::sleep(Duration::from_millis(300));
    // The rest of the request, well within the drain.
    let mut stdin = client.stdin.take().unwrap();
    stdin
        .write_all(b"{\"version\":2,\"op\":\"status\"}\n")
        .unwrap();
    drop(stdin);
    let out = client.wait_with_output().unwrap();
    let answer = text(&out.stdout);
    assert!(
        answer.contains("\"ok\":true"),
        "the request under way was cut off: {answer}"
    );
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!s.socket.exists(), "the socket was left behind");
}

#[test]
fn explain_refuses_port_zero() {
    let out = Command::new(divert_bin())
        .args(["explain", "--netns", "1", "10.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("port 0"),
        "{}",
        text(&out.stderr)
    );
}

/// `(VmRSS in KiB, threads)` of `pid`.
fn rss_and_threads(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("Threads:"))
}

/// The daemon under abuse, bounded in time: 200 concurrent registrations,
/// 50 silent clients, a 50 MB line, 1,000 idle HTTP connections. Prints
/// registration latency and the daemon's RSS and threads before, under and
/// after; threads and RSS must come back down, and every registration
/// must be answered.
#[test]
fn the_daemon_under_abuse() {
    require_root!();
    let s = Setup::start();
    let d = s.daemon();
    let pid = d.child.id();
    // Warm up: one registration and one scrape.
    assert!(s.init(divert_tests::INJECTOR).status.success());
    assert_eq!(s.http_get("/metrics").0, 200);
    let before = rss_and_threads(pid);

    // 50 silent clients and 1,000 idle HTTP connections, held open.
    let silent: Vec<UnixStream> = (0..50)
        .map(|_| UnixStream::connect(&s.socket).unwrap())
        .collect();
    let addr = s.metrics_addr();
    let idle: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    // A 50 MB line, from a process in the pod's namespace.
    let big = {
        let mut v = b"{\"version\":2,\"op\":\"status\",\"x\":\"".to_vec();
        v.resize(50 * 1024 * 1024, b'a');
        v
    };
    let huge = send(&s, &big);
    assert!(huge.contains("longer than"), "{huge}");
    // 200 concurrent registrations (divert init, replacing the pod's policy).
    let t0 = Instant::now();
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let (mut cmd, keep) =
                command_in(s.lab.in_client(&s.lab.plain, None), divert_bin()).unwrap();
            cmd.args(["init", "--backend", "ebpf", "--daemon-socket"])
                .arg(&s.socket)
                .args(divert_tests::injector_with(&[(
                    "-o",
                    &(1000 + i % 50).to_string(),
                )]));
            let child = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (Instant::now(), child, keep)
        })
        .collect();
    let under = rss_and_threads(pid);
    let mut latencies = Vec::new();
    let mut busy = 0;
    for (start, child, _keep) in handles {
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        if err.contains("serving 64 requests already") {
            busy += 1;
            continue;
        }
        assert!(out.status.success(), "a registration failed: {err}");
        latencies.push(start.elapsed());
    }
    let all = t0.elapsed();
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    // The HTTP endpoint still answers with 1,000 connections open.
    drop(idle);
    assert_eq!(s.http_get("/healthz/ready").0, 200);
    // Silent clients are dropped after the request deadline.
    thread::sleep(divert::daemon::proto::REQUEST_DEADLINE + Duration::from_secs(1));
    drop(silent);
    thread::sleep(Duration::from_millis(500));
    let after = rss_and_threads(pid);
    eprintln!(
        "abuse: {} registrations answered in {all:?} ({busy} told busy), p50 {:?} p99 {:?}; \
         daemon RSS {} → {} → {} KiB, threads {} → {} → {} (before → under → after)",
        latencies.len(),
        p(0.5),
        p(0.99),
        before.0,
        under.0,
        after.0,
        before.1,
        under.1,
        after.1
    );
    assert!(latencies.len() + busy == 200);
    assert!(latencies.len() >= 100, "too many refused as busy: {busy}");
    assert!(
        after.1 <= before.1 + 2,
        "threads did not come back down: {before:?} → {after:?}"
    );
    assert!(
        under.1 <= before.1 + divert::daemon::MAX_CLIENTS as u64 + 4,
        "threads are not bounded: {before:?} → {under:?}"
    );
    assert!(
        after.0 <= before.0 + 32 * 1024,
        "RSS did not come back down: {before:?} → {after:?}"
    );
    s.assert_redirected("after the abuse");
}
