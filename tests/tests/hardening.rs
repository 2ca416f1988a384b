//! What an attacker or a careless application could get wrong answers from
//! the kernel programs with, each against real sockets: a stale
//! `SO_ORIGINAL_DST`, the other family's `SO_ORIGINAL_DST`, the `::6`
//! passthrough source used as a way out, `0.0.0.0` / `::` as destinations,
//! and an MPTCP socket's peer. Root only; each test has its own namespaces
//! and cgroups (see `Lab`).

use std::{
    net::{IpAddr, SocketAddr},
    process::Stdio,
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use divert::policy::{Action, Policy};
use divert_tests::{
    cases::expected,
    command_in, require_root,
    rig::{EbpfRig, IptablesRig},
    testkit_bin, wait_for_line, Daemon, Lab,
};

const APP: Option<(u32, u32)> = Some((1000, 1000));

/// Source ports of the fixed-port dials: each test takes its own, so no
/// two dials of this binary share a tuple.
static NEXT_PORT: AtomicU16 = AtomicU16::new(41_000);

fn fresh_port() -> u16 {
    NEXT_PORT.fetch_add(1, Ordering::SeqCst)
}

fn lo(v6: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = if v6 {
        "::1".parse().unwrap()
    } else {
        "127.0.0.1".parse().unwrap()
    };
    SocketAddr::new(ip, port)
}

/// Dial a diverted destination from a fixed source port and close it each
/// way a connection can close, then dial the proxy directly from the same
/// address and port (from the workload's cgroup, where the programs see the
/// connect, and from one where they do not): the proxy must never be told
/// the earlier connection's destination. The kernel alone says ENOENT.
#[test]
fn a_later_connection_on_the_same_tuple_is_never_told_an_earlier_destination() {
    require_root!();
    let mut rig = EbpfRig::start();
    rig.set(Policy::default());
    let lab = &rig.lab;
    let mut failures = Vec::new();
    for v6 in [false, true] {
        let dst = SocketAddr::new(if v6 { lab.v6(2) } else { lab.v4(2) }, 80);
        for close in ["rst", "last", "now"] {
            for (direct_from, where_) in [(&lab.workload, "workload"), (&lab.plain, "plain")] {
                let src = lo(v6, fresh_port()).to_string();
                let first = lab
                    .dial_with(&lab.workload, dst, APP, &["--bind", &src, "--close", close])
                    .unwrap();
                let proxy = lo(v6, 15001);
                let diverted = if close == "now" {
                    format!("closed peer={dst}")
                } else {
                    format!("proxy {proxy} orig={dst}")
                };
                assert!(
                    first.starts_with(&diverted),
                    "the first dial ({close}) was not diverted: {first}"
                );
                // The first connection's TIME_WAIT holds the tuple; loopback
                // may take it over (tcp_tw_reuse) only in a later second.
                let mut tries = 0;
                let direct = loop {
                    match lab.dial_with(direct_from, proxy, APP, &["--bind", &src]) {
                        Err(e)
                            if tries < 3
                                && format!("{e:#}").contains("Cannot assign requested address") =>
                        {
                            tries += 1;
                            std::thread::sleep(std::time::Duration::from_millis(1100));
                        }
                        r => break r.unwrap(),
                    }
                };
                if !direct.starts_with(&format!("proxy {proxy} orig=none(")) {
                    failures.push(format!(
                        "{dst} closed by {close}, then {src} -> {proxy} directly from {where_}: {direct}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "stale SO_ORIGINAL_DST answers:\n{}",
        failures.join("\n")
    );
}

/// The client closes before the proxy has even asked (fire and forget):
/// the proxy's socket of that connection is still answered, as conntrack
/// answers it.
#[test]
fn the_proxy_is_answered_after_the_client_has_gone() {
    require_root!();
    let mut rig = EbpfRig::start();
    rig.set(Policy {
        proxy_port: 15011,
        ..Policy::default()
    });
    let lab = &rig.lab;
    let log = tempfile::NamedTempFile::new().unwrap();
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.proxy, None), testkit_bin()).unwrap();
    cmd.args(["late-proxy", "127.0.0.1:15011", "300"])
        .stdout(Stdio::from(log.reopen().unwrap()));
    let _late4 = Daemon::spawn("late proxy v4", cmd).unwrap();
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.proxy, None), testkit_bin()).unwrap();
    cmd.args(["late-proxy", "[::1]:15011", "300"])
        .stdout(Stdio::from(log.reopen().unwrap()));
    let _late6 = Daemon::spawn("late proxy v6", cmd).unwrap();
    divert_tests::wait_listening(
        &lab.client,
        &[lo(false, 15011), lo(true, 15011)],
        Duration::from_secs(10),
    )
    .unwrap();
    for dst in [
        SocketAddr::new(lab.v4(3), 8080),
        SocketAddr::new(lab.v6(3), 8080),
    ] {
        let out = lab
            .dial_with(&lab.workload, dst, APP, &["--close", "now"])
            .unwrap();
        assert_eq!(out, format!("closed peer={dst}"));
        wait_for_line(
            log.path(),
            &format!("late orig={dst}"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nlate proxy said:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            )
        });
    }
}

/// `SOL_IP` answers an IPv4 original and `SOL_IPV6` an IPv6 one; the other
/// call fails as the kernel's does (the testkit proxy reports an answer to
/// it as ` also=`).
#[test]
fn so_original_dst_answers_only_in_the_family_dialled() {
    require_root!();
    let mut rig = EbpfRig::start();
    rig.set(Policy::default());
    for (dst, mapped) in [
        (SocketAddr::new(rig.lab.v4(2), 80), false),
        (SocketAddr::new(rig.lab.v4(2), 80), true),
        (SocketAddr::new(rig.lab.v6(2), 80), false),
    ] {
        let got = rig.dial(dst, 1000, 1000, mapped);
        assert_eq!(
            got,
            expected(Action::Redirect(15001), dst, mapped),
            "mapped={mapped}"
        );
        assert!(!got.contains("also="), "{got}");
    }
}

/// Dials whose answer depends on the passthrough source (127.0.0.6 / ::6)
/// and on the unspecified destination, under a policy with no proxy IDs
/// and include `*` (so nothing but those rules lets a connect pass): the
/// destination, the client's options, and who must answer.
fn source_and_unspecified_cases(lab: &Lab) -> Vec<(SocketAddr, Vec<&'static str>, String)> {
    let redirect = |dst| expected(Action::Redirect(15001), dst, false);
    let pass = |dst| expected(Action::PassThrough, dst, false);
    let remote6 = SocketAddr::new(lab.v6(2), 80);
    let own6 = SocketAddr::new(lab.v6(1), 80);
    let own4 = SocketAddr::new(lab.v4(1), 80);
    let host6: SocketAddr = "[::1]:80".parse().unwrap();
    vec![
        // Bound to the passthrough source, leaving the pod: judged like any other connect.
        (remote6, vec!["--bind", "[::6]:0"], redirect(remote6)),
        // To the pod itself: `-o lo -s ::6/128 -j RETURN`.
        (own6, vec!["--bind", "[::6]:0"], pass(own6)),
        (own4, vec!["--bind", "127.0.0.6:0"], pass(own4)),
        (host6, vec!["--bind", "[::6]:0"], pass(host6)),
        // 0.0.0.0 and :: are the local host: `-d 127.0.0.1/32 -j RETURN`.
        (
            "0.0.0.0:80".parse().unwrap(),
            vec![],
            "server 127.0.0.1:80 peer=127.0.0.1:80".into(),
        ),
        (
            "[::]:80".parse().unwrap(),
            vec![],
            "server [::1]:80 peer=[::1]:80".into(),
        ),
        (
            "0.0.0.0:80".parse().unwrap(),
            vec!["--mapped"],
            "server 127.0.0.1:80 peer=[::ffff:127.0.0.1]:80".into(),
        ),
    ]
}

fn no_proxy_ids() -> Policy {
    Policy {
        proxy_uids: vec![],
        proxy_gids: vec![],
        ..Policy::default()
    }
}

fn check_source_and_unspecified(
    lab: &Lab,
    backend: &str,
    more: Vec<(SocketAddr, Vec<&'static str>, String)>,
) {
    // istio-iptables puts ::6 on lo for Envoy's inbound passthrough cluster.
    lab.client
        .ip(&["-6", "addr", "add", "::6/128", "dev", "lo"])
        .unwrap();
    let mut failures = Vec::new();
    for (dst, opts, want) in source_and_unspecified_cases(lab).into_iter().chain(more) {
        let got = lab
            .dial_with(&lab.workload, dst, APP, &opts)
            .unwrap_or_else(|e| format!("{e:#}"));
        if got != want {
            failures.push(format!("{dst} {opts:?}\n   got  {got}\n   want {want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{backend}: {} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn ebpf_passthrough_source_and_unspecified_destinations() {
    require_root!();
    let mut rig = EbpfRig::start();
    rig.set(no_proxy_ids());
    // 127.0.0.6 to a remote address: under iptables the kernel's routing
    // refuses a loopback source off `lo` (EINVAL) before any rule is seen;
    // under eBPF the connect is judged first, and diverted.
    let remote4 = SocketAddr::new(rig.lab.v4(2), 80);
    let more = vec![(
        remote4,
        vec!["--bind", "127.0.0.6:0"],
        expected(Action::Redirect(15001), remote4, false),
    )];
    check_source_and_unspecified(&rig.lab, "ebpf", more);
}

/// The same dials under divert's iptables rules: both backends agree.
#[test]
fn iptables_passthrough_source_and_unspecified_destinations() {
    require_root!();
    let mut rig = IptablesRig::start();
    rig.set(no_proxy_ids());
    check_source_and_unspecified(&rig.lab, "iptables", vec![]);
}

/// An MPTCP socket's connect is made by its first subflow (a TCP socket of
/// its own); `getpeername` on the MPTCP socket shows the address dialled.
#[test]
fn an_mptcp_socket_sees_the_address_it_dialled() {
    require_root!();
    let mut rig = EbpfRig::start();
    rig.set(Policy::default());
    for dst in [
        SocketAddr::new(rig.lab.v4(2), 80),
        SocketAddr::new(rig.lab.v6(2), 80),
    ] {
        match rig.lab.dial_with(&rig.lab.workload, dst, APP, &["--mptcp"]) {
            Ok(got) => assert_eq!(got, expected(Action::Redirect(15001), dst, false)),
            Err(e) if format!("{e:#}").contains("Protocol not supported") => {
                eprintln!("skipped: this kernel has no MPTCP ({e:#})");
                return;
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}
