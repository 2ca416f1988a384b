//! Inbound capture by the eBPF backend (socket lookup, no NAT) against
//! istio-iptables' rules (root; each test makes its own namespaces): the
//! same connections reach the capture listener, with the same original
//! destination for the proxy and the same peer for the client; the
//! namespace's own connections never; and with no capture listener an
//! inbound connection is refused, never let through to the application.

use std::net::{IpAddr, SocketAddr};

use divert::policy::{inbound_verdict, InboundPorts, IncludeRanges, Policy};
use divert_tests::{
    command_in, require_root,
    rig::{EbpfRig, IptablesRig},
    testkit_bin, wait_listening, Daemon, Lab,
};

fn dial_in(lab: &Lab, dst: SocketAddr) -> Result<String, String> {
    lab.dial_in(dst)
}

/// Capture listeners on the client's own addresses, port 15006, as the
/// proxy's inbound listener (in the proxy's cgroup).
fn capture_listener(lab: &Lab) -> Daemon {
    let addrs = [
        SocketAddr::new(lab.v4(1), 15006),
        SocketAddr::new(lab.v6(1), 15006),
    ];
    let (mut cmd, _keep) = command_in(lab.in_client(&lab.proxy, None), testkit_bin()).unwrap();
    cmd.arg("proxy").args(addrs.map(|a| a.to_string()));
    let d = Daemon::spawn("capture listener", cmd).unwrap();
    wait_listening(&lab.client, &addrs, std::time::Duration::from_secs(10)).unwrap();
    d
}

/// Whether `line` is the capture listener's answer for a connection to
/// `dst` (whatever address it accepted on) or the application's.
fn captured(line: &str, dst: SocketAddr) -> Option<bool> {
    let tail = format!("orig={dst} peer={dst}");
    if line.starts_with("proxy ") && line.ends_with(&tail) {
        Some(true)
    } else if line == format!("server {dst} peer={dst}") {
        Some(false)
    } else {
        None
    }
}

fn policy(ports: InboundPorts, exclude: Vec<u16>) -> Policy {
    Policy {
        include_ranges: IncludeRanges::List(vec![]),
        inbound_ports: ports,
        inbound_exclude_ports: exclude,
        ..Policy::default()
    }
}

#[test]
fn socket_lookup_captures_what_istio_iptables_captures() {
    require_root!();
    let mut ebpf = EbpfRig::start();
    let mut ipt = IptablesRig::start();
    ebpf.attach_inbound();
    let mut failures = Vec::new();
    let policies = [
        policy(InboundPorts::All, vec![5432]),
        policy(InboundPorts::List(vec![8080]), vec![]),
        policy(InboundPorts::None, vec![]),
    ];
    for p in policies {
        let pe = ebpf.set(p.clone());
        ipt.set(p.clone());
        // The capture listener listens after the policy is in place, as
        // the proxy does after istio-init.
        let _e = capture_listener(&ebpf.lab);
        let _i = capture_listener(&ipt.lab);
        for port in [80u16, 8080, 5432, 15008] {
            for (e_ip, i_ip) in [
                (ebpf.lab.v4(1), ipt.lab.v4(1)),
                (ebpf.lab.v6(1), ipt.lab.v6(1)),
            ] {
                let want = inbound_verdict(&pe, port, ebpf.lab.v4(2))
                    .captured_to
                    .is_some();
                let (de, di) = (SocketAddr::new(e_ip, port), SocketAddr::new(i_ip, port));
                let got_e = dial_in(&ebpf.lab, de).map(|l| (captured(&l, de), l));
                let got_i = dial_in(&ipt.lab, di).map(|l| (captured(&l, di), l));
                let ok = |g: &Result<(Option<bool>, String), String>| matches!(g, Ok((Some(c), _)) if *c == want);
                if !ok(&got_e) || !ok(&got_i) {
                    failures.push(format!(
                        "{:?} -d {:?} port {port} ({e_ip}): want captured={want}\n  ebpf     {got_e:?}\n  iptables {got_i:?}",
                        p.inbound_ports, p.inbound_exclude_ports
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // No NAT, no conntrack: socket lookup leaves no entry behind, where
    // iptables' REDIRECT keeps one per connection.
    let conntrack = |lab: &Lab| -> u64 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.client.name, "cat"])
            .arg("/proc/sys/net/netfilter/nf_conntrack_count")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    assert_eq!(
        conntrack(&ebpf.lab),
        0,
        "conntrack entries under socket lookup"
    );
    assert!(
        conntrack(&ipt.lab) > 0,
        "iptables' REDIRECT made no conntrack entry?"
    );
}

#[test]
fn the_namespaces_own_connections_are_never_captured() {
    require_root!();
    let mut ebpf = EbpfRig::start();
    ebpf.attach_inbound();
    ebpf.set(policy(InboundPorts::All, vec![]));
    let _l = capture_listener(&ebpf.lab);
    let lab = &ebpf.lab;
    for own in [lab.v4(1), lab.v6(1)] {
        let dst = SocketAddr::new(own, 8080);
        // The application dialling its own address, and Envoy's inbound
        // passthrough (from 127.0.0.6 / ::6) reaching the application.
        let mut opts: Vec<Vec<&str>> = vec![vec![]];
        if own.is_ipv4() {
            opts.push(vec!["--bind", "127.0.0.6:0"]);
        }
        for o in opts {
            let got = lab.dial_with(&lab.plain, dst, None, &o).unwrap();
            assert_eq!(got, format!("server {dst} peer={dst}"), "{o:?}");
        }
    }
    // From outside, the same port is captured, and counted under the
    // destination dialled, once per connection (the own ones not at all).
    let dst = SocketAddr::new(lab.v4(1), 8080);
    for _ in 0..3 {
        assert_eq!(captured(&dial_in(lab, dst).unwrap(), dst), Some(true));
    }
    let inbound: Vec<_> = ebpf
        .counters()
        .into_iter()
        .filter(|c| c.verdict == "inbound_capture")
        .map(|c| (c.destination, c.port, c.connections))
        .collect();
    assert_eq!(inbound, vec![(lab.v4(1), 8080, 3)]);
}

#[test]
fn without_a_capture_listener_inbound_connections_are_refused() {
    require_root!();
    let mut ebpf = EbpfRig::start();
    ebpf.attach_inbound();
    ebpf.set(policy(InboundPorts::All, vec![]));
    let dst = SocketAddr::new(ebpf.lab.v4(1), 8080);
    // No listener yet: refused, not let through to the application.
    let err = dial_in(&ebpf.lab, dst).unwrap_err();
    assert!(err.contains("refused") || err.contains("reset"), "{err}");
    let l = capture_listener(&ebpf.lab);
    assert_eq!(captured(&dial_in(&ebpf.lab, dst).unwrap(), dst), Some(true));
    // The proxy goes: refused again.
    drop(l);
    let err = dial_in(&ebpf.lab, dst).unwrap_err();
    assert!(err.contains("refused") || err.contains("reset"), "{err}");
    // A port the policy does not capture still reaches the application.
    ebpf.set(policy(InboundPorts::List(vec![80]), vec![]));
    assert_eq!(
        dial_in(&ebpf.lab, dst).unwrap(),
        format!("server {dst} peer={dst}")
    );
    let _ = IpAddr::from([0, 0, 0, 0]);
}

#[test]
fn each_address_captures_for_one_namespace_only() {
    require_root!();
    let mut i = divert::ebpf::Interceptor::load().unwrap();
    let with = |addrs: &[&str]| Policy {
        local_addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        ..policy(InboundPorts::All, vec![])
    };
    let by = divert::ebpf::RegisteredBy::Run;
    let (a, b) = (1u64 << 62 | 1, 1u64 << 62 | 2);
    // Loopback and link-local addresses are every namespace's.
    let pa = with(&["127.0.0.1", "::1", "fe80::1", "10.9.9.9"]);
    i.register(a, &pa, by).unwrap();
    let err = i
        .register(b, &with(&["127.0.0.1", "::1", "fe80::1", "10.9.9.9"]), by)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10.9.9.9") && err.contains("is netns"),
        "{err}"
    );
    assert!(!i.is_registered(b).unwrap(), "nothing of it was written");
    let pb = with(&["127.0.0.1", "::1", "fe80::1", "10.9.9.8"]);
    i.register(b, &pb, by).unwrap();
    // Without inbound capture an address is not claimed.
    let c = 1u64 << 62 | 3;
    let pc = Policy {
        inbound_ports: InboundPorts::None,
        ..with(&["10.9.9.9"])
    };
    i.register(c, &pc, by).unwrap();
    // Once the first namespace is gone, its address is free.
    i.unregister(a, &pa).unwrap();
    i.replace(b, &with(&["10.9.9.9"]), by).unwrap();
    assert_eq!(
        i.policy_of(b).unwrap().unwrap().local_addrs,
        vec!["10.9.9.9".parse::<IpAddr>().unwrap()]
    );
}
