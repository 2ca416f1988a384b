//! The demo behind `cargo xtask demo`: a real client's connection goes
//! through a real transparent proxy because divert's eBPF programs diverted it.
//!
//! 1. two throwaway network namespaces joined by a veth pair, an HTTP server
//!    in the peer one (10.211.N.2:80);
//! 2. squid in `intercept` mode on 127.0.0.1:15001 in the client namespace,
//!    as its own UID (`proxy`), in a cgroup of the demo's own;
//! 3. `divert run -u <squid's uid> --proxy-cgroup <that cgroup> --stats --
//!    curl http://10.211.N.2/`;
//! 4. curl's answer, squid's access-log line, divert's counters;
//! 5. inbound: an HTTP server in the client namespace (10.211.N.1:8080),
//!    and `divert run -b 8080 … -- ip netns exec <peer> curl
//!    http://10.211.N.1:8080/`: socket lookup hands curl's connection to
//!    squid's inbound listener (127.0.0.1:15006), squid asks
//!    `SO_ORIGINAL_DST` and forwards it to the server;
//! 6. everything is torn down (also on failure).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{ensure, Context, Result};
use divert_tests::{command_in, divert_bin, start_http, start_http_in, wait_for_line, Lab, Squid};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(s: &str) {
    println!("\n==> {s}");
}

fn demo() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the demo needs root (namespaces, cgroups, eBPF)"
    );
    step("making a client and a peer network namespace joined by a veth pair");
    let lab = Lab::new()?;
    let server = SocketAddr::new(lab.v4(2), 80);
    println!(
        "    client {}  <->  peer {} (HTTP server on {server})",
        lab.client.name, lab.peer.name
    );
    let body = format!(
        "Hello from {server}: you reached the peer namespace through squid, diverted by divert."
    );
    let _http = start_http(&lab, server, &body)?;

    step("starting squid in intercept mode on 127.0.0.1:15001 (client namespace, its own cgroup)");
    let squid = Squid::start(&lab)?;
    println!(
        "    squid runs as uid {} in cgroup {}",
        squid.uid,
        lab.proxy.path.display()
    );

    let uid = squid.uid.to_string();
    let url = format!("http://{}/", server.ip());
    let mut args: Vec<String> = vec![
        "run".into(),
        "-u".into(),
        uid.clone(),
        "-g".into(),
        uid.clone(),
    ];
    args.extend([
        "--proxy-cgroup".into(),
        lab.proxy.path.display().to_string(),
    ]);
    args.extend([
        "--cgroup-parent".into(),
        lab.root.path.display().to_string(),
    ]);
    args.extend([
        "--stats".into(),
        "--".into(),
        "curl".into(),
        "-sS".into(),
        "--max-time".into(),
        "10".into(),
        url.clone(),
    ]);
    step(&format!("divert {}", args.join(" ")));
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.plain, None), divert_bin())?;
    let out = cmd.args(&args).output().context("running divert")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- curl's answer:\n{}", stdout.trim_end());
    println!("--- divert's counters:\n{}", stderr.trim_end());
    ensure!(
        out.status.success(),
        "divert run exited with {}",
        out.status
    );
    ensure!(stdout.trim() == body, "curl did not get the server's body");

    step("squid's access log");
    let line = wait_for_line(&squid.access_log, &url, Duration::from_secs(10))?;
    println!("{line}");
    ensure!(
        line.contains(&format!("ORIGINAL_DST/{}", server.ip())),
        "squid did not learn the original destination"
    );

    step("inbound: an HTTP server in the client namespace, a client in the peer");
    let app = SocketAddr::new(lab.v4(1), 8080);
    let app_body = format!("Hello from {app}: you came in through squid, captured by divert.");
    let _app = start_http_in(&lab, lab.in_client(&lab.plain, None), app, &app_body)?;
    let app_url = format!("http://{app}/");
    let peer = lab.peer.name.clone();
    let inbound_args: Vec<String> = [
        "run",
        "-u",
        &uid,
        "-g",
        &uid,
        "-i",
        "",
        "-b",
        "8080",
        "--proxy-cgroup",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([lab.proxy.path.display().to_string()])
    .chain([
        "--cgroup-parent".into(),
        lab.root.path.display().to_string(),
    ])
    .chain(
        [
            "--stats",
            "--",
            "ip",
            "netns",
            "exec",
            &peer,
            "curl",
            "-sS",
            "--max-time",
            "10",
            &app_url,
        ]
        .map(String::from),
    )
    .collect();
    let shown: Vec<&str> = inbound_args
        .iter()
        .map(|a| if a.is_empty() { "''" } else { a.as_str() })
        .collect();
    step(&format!("divert {}", shown.join(" ")));
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.plain, None), divert_bin())?;
    let out = cmd.args(&inbound_args).output().context("running divert")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("--- curl's answer (from the peer):\n{}", stdout.trim_end());
    println!(
        "--- divert's counters:\n{}",
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    ensure!(
        out.status.success(),
        "divert run exited with {}",
        out.status
    );
    ensure!(
        stdout.trim() == app_body,
        "curl did not get the application's body"
    );
    let line = wait_for_line(&squid.access_log, &app_url, Duration::from_secs(10))?;
    println!("--- squid's access log:\n{line}");
    ensure!(
        line.contains(&format!("ORIGINAL_DST/{}", app.ip())),
        "squid did not learn the inbound connection's original destination"
    );

    step("tearing down the namespaces, cgroups and processes");
    drop(squid);
    drop(lab);
    println!(
        "\ndemo passed: curl -> divert (eBPF connect4) -> squid (SO_ORIGINAL_DST) -> {server}\n\
         and the peer's curl -> divert (eBPF sk_lookup) -> squid (SO_ORIGINAL_DST) -> {app}"
    );
    Ok(())
}
