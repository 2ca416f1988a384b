//! Rendering details and `divert init`'s flags. The comparison with
//! istio-iptables' own test cases lives with their data, in
//! `tests/tests/iptables.rs`.

use clap::{CommandFactory, FromArgMatches, Parser};

use super::*;
use crate::cli::init::InitArgs;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

fn policy_for(flags: &[String]) -> (Policy, Capture) {
    let _g = crate::policy::TEST_ENV
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let m = Cli::command()
        .try_get_matches_from(
            std::iter::once("divert-init".to_string()).chain(flags.iter().cloned()),
        )
        .unwrap_or_else(|e| panic!("{flags:?}: {e}"));
    let cli = Cli::from_arg_matches(&m).unwrap();
    cli.init.settings(Some(&m)).unwrap()
}

#[test]
fn long_port_lists_are_split_at_fifteen() {
    let ports: Vec<u16> = (1..=16).collect();
    let p = Policy {
        exclude_ports: ports,
        ..Policy::default()
    };
    let set = render(&p, &Capture::default(), Family::V4);
    let lines: Vec<String> = set
        .rules
        .iter()
        .map(Rule::line)
        .filter(|l| l.contains("multiport") || l.contains("--dport 16"))
        .collect();
    assert_eq!(
        lines,
        vec![
            "-A ISTIO_OUTPUT -p tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN",
            "-A ISTIO_OUTPUT -p udp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN",
            "-A ISTIO_OUTPUT -p tcp --dport 16 -j RETURN",
            "-A ISTIO_OUTPUT -p udp --dport 16 -j RETURN",
        ]
    );
}

#[test]
fn tproxy_mark_and_route_table_are_checked_numbers() {
    let (_, c) = policy_for(&["-m".into(), "TPROXY".into(), "-t".into(), "7".into()]);
    assert_eq!(c.tproxy.mark, 7);
    assert_eq!(
        c.tproxy.route_table,
        crate::policy::DEFAULT_TPROXY_ROUTE_TABLE
    );
    let _g = crate::policy::TEST_ENV
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for (args, says) in [
        (["-t", "0x539"], "--inbound-tproxy-mark (-t)"),
        (["-t", "4294967296"], "32 bits"),
        (["-r", "254"], "main"),
        (["-r", ""], "--inbound-tproxy-route-table (-r)"),
    ] {
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("divert-init").chain(args))
            .unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let err = cli.init.settings(Some(&m)).unwrap_err().to_string();
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn dns_capture_reads_the_nameservers_and_refuses_what_it_cannot_match() {
    let dir = std::env::temp_dir().join(format!("divert-resolv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("resolv.conf");
    std::fs::write(
        &conf,
        "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10 ; kube-dns\nnameserver fd00::a\noptions ndots:5\n",
    )
    .unwrap();
    let path = conf.to_str().unwrap().to_string();
    let (p, _) = policy_for(&[
        "--redirect-dns".into(),
        "--resolv-conf".into(),
        path.clone(),
    ]);
    let dns = p.dns.unwrap();
    let written = |v: &[crate::policy::Nameserver]| -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    };
    assert_eq!(written(&dns.servers_v4), vec!["10.96.0.10"]);
    assert_eq!(written(&dns.servers_v6), vec!["fd00::a"]);
    assert!(!dns.capture_all);
    // --capture-all-dns does not read the file.
    let (p, _) = policy_for(&[
        "--redirect-dns".into(),
        "--capture-all-dns".into(),
        "--resolv-conf".into(),
        "/nonexistent".into(),
    ]);
    assert!(p.dns.unwrap().capture_all);
    // No nameserver: DNS capture is off, as istio-iptables turns it off.
    std::fs::write(&conf, "search x\n").unwrap();
    let (p, _) = policy_for(&[
        "--redirect-dns".into(),
        "--resolv-conf".into(),
        path.clone(),
    ]);
    assert_eq!(p.dns, None);
    // A nameserver iptables cannot match, and a missing file: errors that
    // name the file and the setting.
    let _g = crate::policy::TEST_ENV
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    std::fs::write(&conf, "nameserver fe80::1%eth0\n").unwrap();
    for file in [path.as_str(), "/nonexistent/resolv.conf"] {
        let m = Cli::command()
            .try_get_matches_from(["divert-init", "--redirect-dns", "--resolv-conf", file])
            .unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let err = cli.init.settings(Some(&m)).unwrap_err().to_string();
        assert!(
            err.contains(file) && err.contains("--redirect-dns"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_defaults_are_istio_iptables_defaults() {
    let (p, _) = policy_for(&[]);
    assert_eq!(p.include_ranges, crate::policy::IncludeRanges::List(vec![]));
    assert_eq!(p.inbound_ports, crate::policy::InboundPorts::None);
    assert_eq!((p.proxy_port, p.inbound_capture_port), (15001, 15006));
}

#[test]
fn injector_command_line_parses() {
    // The istio-init arguments Istio's sidecar injector writes.
    let args: Vec<String> = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020 --log_output_level=default:info"
        .split(' ')
        .map(String::from)
        .collect();
    let (p, _) = policy_for(&args);
    assert_eq!(p.include_ranges, crate::policy::IncludeRanges::All);
    assert_eq!(p.inbound_ports, crate::policy::InboundPorts::All);
    assert_eq!(p.inbound_exclude_ports, vec![15090, 15021, 15020]);
    assert!(p.exclude_ranges.is_empty());
}
