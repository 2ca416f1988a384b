//! `divert run` as a user runs it: real curl, real squid, real signals.
//! Root only; each test has its own namespaces and cgroups (see `Lab`).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use divert_tests::{command_in, divert_bin, require_root, start_http, wait_for_line, Lab, Squid};

/// Run `divert run ARGS` in the lab's client namespace (plain cgroup), with
/// the transient cgroup under the lab's root and the proxy cgroup the lab's.
fn divert_run(lab: &Lab, args: &[&str], uid: Option<u32>) -> Output {
    let (mut cmd, _keep) =
        command_in(lab.in_client(&lab.plain, uid.map(|u| (u, u))), divert_bin()).unwrap();
    cmd.arg("run")
        .arg("--proxy-cgroup")
        .arg(&lab.proxy.path)
        .arg("--cgroup-parent")
        .arg(&lab.root.path)
        .args(args)
        .stdin(Stdio::null());
    cmd.output().expect("running divert")
}

/// Child cgroups named `divert-run-*` under `parent`.
fn leftover_cgroups(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("divert-run-"))
        .collect()
}

/// Programs attached to `cgroup` according to bpftool (`bpftool cgroup show`).
fn attached(cgroup: &Path) -> String {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn curl_through_squid_end_to_end() {
    require_root!();
    let lab = Lab::new().unwrap();
    let server: SocketAddr = SocketAddr::new(lab.v4(2), 80);
    let body = "hello from the peer namespace";
    let _http = start_http(&lab, server, body).unwrap();
    let squid = Squid::start(&lab).unwrap();
    let url = format!("http://{}/", server.ip());
    let uid = squid.uid.to_string();
    let out = divert_run(
        &lab,
        &[
            "-u",
            &uid,
            "-g",
            &uid,
            "--stats",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            &url,
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cache_log = std::fs::read_to_string(squid.dir.path().join("cache.log")).unwrap_or_default();
    let access = std::fs::read_to_string(&squid.access_log).unwrap_or_default();
    assert!(
        out.status.success(),
        "divert run failed: {stdout} {stderr}\nsquid access.log:\n{access}\nsquid cache.log:\n{cache_log}"
    );
    assert_eq!(stdout.trim(), body, "curl got something else");
    // squid saw the request for the original destination...
    let line = wait_for_line(&squid.access_log, &url, Duration::from_secs(10)).unwrap();
    assert!(line.contains("/200 "), "squid did not serve it: {line}");
    // squid found the destination through SO_ORIGINAL_DST, answered by divert.
    assert!(
        line.contains(&format!("ORIGINAL_DST/{}", server.ip())),
        "{line}"
    );
    // ...and divert counted the redirect.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&server.ip().to_string()) && l.contains("redirected")),
        "no redirected counter for {server} in:\n{stderr}"
    );
    assert!(leftover_cgroups(&lab.root.path).is_empty());
}

#[test]
fn bad_input_exits_2_and_leaves_nothing() {
    require_root!();
    let lab = Lab::new().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["-i", "10.0.0.0/33", "--", "true"], "10.0.0.0/33"),
        (
            &["-x", "*", "--", "true"],
            "--istio-service-exclude-cidr (-x)",
        ),
        (&["-o", "0", "--", "true"], "\"0\""),
        (&["-q", "80,,81", "--", "true"], "80,,81"),
    ];
    for (args, needle) in cases {
        let out = divert_run(&lab, args, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} does not name {needle:?}"
        );
    }
    // A proxy cgroup that does not exist: found after parsing, still nothing applied.
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.plain, None), divert_bin()).unwrap();
    let out = cmd
        .args([
            "run",
            "--proxy-cgroup",
            "/nonexistent/cgroup",
            "--cgroup-parent",
        ])
        .arg(&lab.root.path)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cgroup"));
    // Not root.
    let out = divert_run(&lab, &["--", "true"], Some(65534));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));

    assert!(leftover_cgroups(&lab.root.path).is_empty());
    assert_eq!(
        attached(&lab.proxy.path),
        attached(&lab.plain.path),
        "something stayed attached"
    );
}

#[test]
fn exit_status_is_the_commands() {
    require_root!();
    let lab = Lab::new().unwrap();
    let out = divert_run(&lab, &["--", "sh", "-c", "exit 7"], None);
    assert_eq!(out.status.code(), Some(7));
    let out = divert_run(&lab, &["--", "sh", "-c", "kill -KILL $$"], None);
    assert_eq!(out.status.code(), Some(128 + 9));
    assert!(leftover_cgroups(&lab.root.path).is_empty());
}

#[test]
fn sigterm_reaches_the_command_and_everything_is_removed() {
    require_root!();
    let lab = Lab::new().unwrap();
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.plain, None), divert_bin()).unwrap();
    cmd.args(["run", "--proxy-cgroup"])
        .arg(&lab.proxy.path)
        .arg("--cgroup-parent")
        .arg(&lab.root.path)
        .args(["--", "sleep", "30"]);
    let mut child = cmd.spawn().unwrap();
    // Wait until the transient cgroup holds the command.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = leftover_cgroups(&lab.root.path).iter().any(|n| {
            std::fs::read_to_string(lab.root.path.join(n).join("cgroup.procs"))
                .map(|p| !p.trim().is_empty())
                .unwrap_or(false)
        });
        if running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "divert run never started the command"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        attached(&lab.proxy.path).contains("getsockopt"),
        "{}",
        attached(&lab.proxy.path)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "sleep should die of the forwarded SIGTERM"
    );
    assert!(
        leftover_cgroups(&lab.root.path).is_empty(),
        "transient cgroup left behind"
    );
    assert!(
        !attached(&lab.proxy.path).contains("getsockopt"),
        "getsockopt still attached"
    );
}

#[test]
fn run_captures_inbound_connections_to_a_proxy_already_listening() {
    require_root!();
    let lab = Lab::new().unwrap();
    // The peers, and the proxy's listeners (127.0.0.1:15006 among them),
    // up before divert run starts: the capture listener is found, not
    // waited for.
    let _peers = lab.start_peers().unwrap();
    let own = SocketAddr::new(lab.v4(1), 8080);
    let kit = divert_tests::testkit_bin();
    let from_peer = |extra: &[&str]| {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend(["ip", "netns", "exec", &lab.peer.name].map(String::from));
        a.push(kit.to_string_lossy().into_owned());
        a.extend(["client".to_string(), own.to_string()]);
        a
    };
    let args = from_peer(&["-b", "*", "-i", "", "--"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = divert_run(&lab, &args, None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        format!("proxy {own} orig={own} peer={own}"),
        "captured by the listener on 127.0.0.1:15006, the dialled address kept"
    );
    // Once divert run is over, the connection reaches the application.
    let (mut cmd, _keep) = command_in(
        divert_tests::Placement {
            netns: &lab.peer,
            cgroup: &lab.plain,
            ids: None,
        },
        kit,
    )
    .unwrap();
    let out = cmd.arg("client").arg(own.to_string()).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("server {own} peer={own}")
    );
}
