//! The demo behind `cargo xtask demo`: a real client's connection goes
//! through a real transparent proxy because divert's eBPF programs diverted it.
//!
//! 1. two throwaway network namespaces joined by a veth pair, an HTTP server
//!    in the peer one (10.211.N.2:80);
//! 2. squid in `intercept` mode on 127.0.0.1:15001 in the client namespace,
//!    as its own UID (`proxy`), in a cgroup of the demo's own;
//! 3. `divert run -u <squid's uid> --proxy-cgroup <that cgroup> --stats --
//!    curl http://10.211.N.2/`;
//! 4. curl's answer, squid's access-log line, divert's counters; then
//!    everything is torn down (also on failure).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{ensure, Context, Result};
use divert_tests::{command_in, divert_bin, start_http, wait_for_line, Lab, Squid};

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

    step("tearing down the namespaces, cgroups and processes");
    drop(squid);
    drop(lab);
    println!(
        "\ndemo passed: curl -> divert (eBPF connect4) -> squid (SO_ORIGINAL_DST) -> {server}"
    );
    Ok(())
}
