//! DNS capture by the eBPF backend (connect, sendmsg and recvmsg programs,
//! no NAT, no conntrack zones) against istio-iptables' rules (root; each
//! test makes its own namespaces): the same queries reach the DNS proxy,
//! the application sees the reply come from the server it asked, the
//! proxy's own queries go where it asked, and real resolvers (glibc
//! through resolv.conf, dig) get the same answers under both.

use std::{net::SocketAddr, process::Command};

use divert::{
    ebpf::Counter,
    policy::{DnsCapture, IncludeRanges, Nameserver, Policy},
};
use divert_common::Verdict;
use divert_tests::{
    cases::{dns_matrix, expected_dns, NAMESERVER_ANSWER, PROXY_ANSWER},
    command_in, require_root,
    rig::{EbpfRig, IptablesRig},
    testkit_bin, Lab,
};

#[test]
fn dns_capture_answers_what_istio_iptables_answers() {
    require_root!();
    let mut ebpf = EbpfRig::start();
    let mut ipt = IptablesRig::start();
    let _e = ebpf.lab.start_dns_servers().expect("DNS servers");
    let _i = ipt.lab.start_dns_servers().expect("DNS servers");
    let (em, im) = (dns_matrix(&ebpf.lab), dns_matrix(&ipt.lab));
    assert_eq!(em.len(), im.len());
    let mut failures = Vec::new();
    let mut current: Option<Policy> = None;
    for (ec, ic) in em.iter().zip(&im) {
        if current.as_ref() != Some(&ec.policy) {
            ebpf.set(ec.policy.clone());
            ipt.set(ic.policy.clone());
            current = Some(ec.policy.clone());
        }
        let (e, i) = (ebpf.lab.ask_dns(ec).unwrap(), ipt.lab.ask_dns(ic).unwrap());
        let (want_e, want_i) = (expected_dns(ec, ec.want), expected_dns(ic, ic.want));
        if e != want_e || i != want_i {
            failures.push(format!(
                "{}:\n  ebpf     {e}\n  iptables {i}\n  want     {want_e} / {want_i}",
                ec.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every captured query was counted, under the server asked.
    let dns: Vec<Counter> = ebpf
        .counters()
        .into_iter()
        .filter(|c| c.verdict == Verdict::Dns.name())
        .collect();
    let asked = |ip| dns.iter().any(|c| c.destination == ip && c.port == 53);
    assert!(
        asked(ebpf.lab.v4(2)) && asked(ebpf.lab.v6(2)),
        "dns counters: {dns:?}"
    );
}

/// The nameservers policy of the matrix: the peer's first addresses.
fn nameservers(lab: &Lab) -> Policy {
    Policy {
        include_ranges: IncludeRanges::List(vec![]),
        dns: Some(DnsCapture {
            capture_all: false,
            servers_v4: vec![Nameserver::from(lab.v4(2))],
            servers_v6: vec![Nameserver::from(lab.v6(2))],
        }),
        ..Policy::default()
    }
}

/// Run `program args…` in the client namespace's workload cgroup as root
/// (an application), through `ip netns exec`, which gives it
/// /etc/netns/<client>/resolv.conf as its /etc/resolv.conf. Its output, or
/// `error …`.
fn resolver(lab: &Lab, program: &str, args: &[&str]) -> String {
    let (mut cmd, _keep): (Command, _) =
        command_in(lab.in_client(&lab.workload, None), "ip").unwrap();
    cmd.args(["netns", "exec", &lab.client.name, program])
        .args(args);
    let out = cmd.output().unwrap();
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        format!(
            "error {} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// The client namespace's resolv.conf, for `ip netns exec`; removed on drop.
struct ResolvConf(std::path::PathBuf);

impl ResolvConf {
    fn write(lab: &Lab) -> ResolvConf {
        let dir = std::path::Path::new("/etc/netns").join(&lab.client.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {}\noptions attempts:1 timeout:2\n", lab.v4(2)),
        )
        .unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn glibc_and_dig_get_the_proxys_answer_as_under_istio_iptables() {
    require_root!();
    let mut ebpf = EbpfRig::start();
    let mut ipt = IptablesRig::start();
    let _e = ebpf.lab.start_dns_servers().expect("DNS servers");
    let _i = ipt.lab.start_dns_servers().expect("DNS servers");
    let _er = ResolvConf::write(&ebpf.lab);
    let _ir = ResolvConf::write(&ipt.lab);
    let mut failures = Vec::new();
    for (captured, policy) in [
        (true, nameservers as fn(&Lab) -> Policy),
        (false, |_: &Lab| Policy {
            include_ranges: IncludeRanges::List(vec![]),
            ..Policy::default()
        }),
    ] {
        ebpf.set(policy(&ebpf.lab));
        ipt.set(policy(&ipt.lab));
        let want = if captured {
            PROXY_ANSWER
        } else {
            NAMESERVER_ANSWER
        };
        let queries = |lab: &Lab| -> Vec<(String, String)> {
            let v4 = format!("@{}", lab.v4(2));
            let v6 = format!("@{}", lab.v6(2));
            let dig = |extra: &[&str]| {
                let mut a = vec!["+short", "+time=2", "+tries=1"];
                a.extend_from_slice(extra);
                a.push("example.test");
                resolver(lab, "dig", &a)
            };
            vec![
                (
                    "glibc (getent ahostsv4, connected UDP)".into(),
                    resolver(lab, "getent", &["ahostsv4", "example.test"])
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                ),
                ("dig UDP IPv4".into(), dig(&[&v4])),
                ("dig TCP IPv4".into(), dig(&["+tcp", &v4])),
                ("dig UDP IPv6".into(), dig(&[&v6])),
                ("dig TCP IPv6".into(), dig(&["+tcp", &v6])),
            ]
        };
        for ((what, e), (_, i)) in queries(&ebpf.lab).into_iter().zip(queries(&ipt.lab)) {
            if e != want || i != want {
                failures.push(format!(
                    "{what} (captured: {captured}): ebpf {e:?}, iptables {i:?}, want {want}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_socket_asking_two_nameservers_sees_each_reply_from_a_nameserver_it_asked() {
    // One unconnected socket asks two nameservers before reading, as musl
    // asks them all at once: each reply must come from a server asked, or
    // musl drops it. Under iptables each reply comes from its own server;
    // the socket hooks cannot tell which query a reply of the DNS proxy
    // answers (no payload, one proxy address), so both show the server
    // asked last.
    require_root!();
    let mut ebpf = EbpfRig::start();
    let mut ipt = IptablesRig::start();
    let _e = ebpf.lab.start_dns_servers().expect("DNS servers");
    let _i = ipt.lab.start_dns_servers().expect("DNS servers");
    for lab_is_ebpf in [true, false] {
        let lab = if lab_is_ebpf { &ebpf.lab } else { &ipt.lab };
        let (s1, s2) = (
            SocketAddr::new(lab.v4(2), 53),
            SocketAddr::new(lab.v4(3), 53),
        );
        let mut p = nameservers(lab);
        p.dns
            .as_mut()
            .unwrap()
            .servers_v4
            .push(Nameserver::from(s2.ip()));
        if lab_is_ebpf {
            ebpf.set(p);
        } else {
            ipt.set(p);
        }
        let lab = if lab_is_ebpf { &ebpf.lab } else { &ipt.lab };
        let (mut cmd, _keep) = command_in(
            lab.in_client(&lab.workload, Some((1000, 1000))),
            testkit_bin(),
        )
        .unwrap();
        let out = cmd
            .args([
                "dns",
                "example.test",
                &s1.to_string(),
                "--unconnected",
                "--also",
            ])
            .arg(s2.to_string())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        for l in &lines {
            let ok = [s1, s2]
                .iter()
                .any(|s| *l == format!("answer={PROXY_ANSWER} from={s}"));
            assert!(
                ok,
                "ebpf: {lab_is_ebpf}: {l:?} is not the proxy's answer from a server asked"
            );
        }
    }
}
