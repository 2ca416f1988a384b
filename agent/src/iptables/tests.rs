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
    let set = render(&p, &Capture::default(), Family::V4).unwrap();
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
fn tproxy_and_dns_are_refused_whole() {
    let (p, c) = policy_for(&["-m".into(), "TPROXY".into()]);
    assert_eq!(render(&p, &c, Family::V4), Err(RenderError::Tproxy));
    let _g = crate::policy::TEST_ENV
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let m = Cli::command()
        .try_get_matches_from(["divert-init", "--redirect-dns"])
        .unwrap();
    let cli = Cli::from_arg_matches(&m).unwrap();
    let err = cli.init.settings(Some(&m)).unwrap_err().to_string();
    assert!(err.contains("--redirect-dns"), "{err}");
}

#[test]
fn init_defaults_are_istio_iptables_defaults() {
    let (p, c) = policy_for(&[]);
    assert_eq!(p.include_ranges, crate::policy::IncludeRanges::List(vec![]));
    assert_eq!(c.inbound.ports, crate::policy::InboundPorts::None);
    assert_eq!((p.proxy_port, p.inbound_capture_port), (15001, 15006));
}

#[test]
fn injector_command_line_parses() {
    // The istio-init arguments Istio's sidecar injector writes.
    let args: Vec<String> = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020 --log_output_level=default:info"
        .split(' ')
        .map(String::from)
        .collect();
    let (p, c) = policy_for(&args);
    assert_eq!(p.include_ranges, crate::policy::IncludeRanges::All);
    assert_eq!(c.inbound.ports, crate::policy::InboundPorts::All);
    assert_eq!(c.inbound.exclude_ports, vec![15090, 15021, 15020]);
    assert!(p.exclude_ranges.is_empty());
}
