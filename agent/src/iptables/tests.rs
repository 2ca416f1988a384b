//! Rendering against istio-iptables' own test cases
//! (`tests/testdata/istio-iptables/*.golden`): same flags, same rules, same
//! order, same spelling.

use std::{fs, path::PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser};

use super::*;
use crate::cli::init::InitArgs;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

/// One golden file: its flags, whether the namespace has IPv6, and the
/// expected iptables-restore input per family.
struct Golden {
    name: String,
    flags: Vec<String>,
    ipv6: bool,
    v4: String,
    v6: Option<String>,
}

fn goldens() -> Vec<Golden> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/testdata/istio-iptables");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).expect("testdata dir") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("golden") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let mut flags = Vec::new();
        let mut ipv6 = false;
        let (mut v4, mut v6, mut cur) = (String::new(), String::new(), 0);
        for line in text.lines() {
            if let Some(f) = line.strip_prefix("flags:") {
                flags = f.split_whitespace().map(String::from).collect();
            } else if let Some(v) = line.strip_prefix("ipv6:") {
                ipv6 = v.trim() == "yes";
            } else if line == "--- iptables" {
                cur = 4;
            } else if line == "--- ip6tables" {
                cur = 6;
            } else if cur == 4 {
                v4 += line;
                v4.push('\n');
            } else if cur == 6 {
                v6 += line;
                v6.push('\n');
            }
        }
        out.push(Golden {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            flags,
            ipv6,
            v4,
            v6: (!v6.is_empty()).then_some(v6),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn policy_for(flags: &[String]) -> Policy {
    let _g = crate::policy::TEST_ENV
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let m = Cli::command()
        .try_get_matches_from(
            std::iter::once("divert-init".to_string()).chain(flags.iter().cloned()),
        )
        .unwrap_or_else(|e| panic!("{flags:?}: {e}"));
    let cli = Cli::from_arg_matches(&m).unwrap();
    cli.init.to_policy(Some(&m)).unwrap()
}

#[test]
fn every_istio_case_renders_as_istio_iptables_writes_it() {
    let goldens = goldens();
    assert!(goldens.len() >= 15, "only {} golden files", goldens.len());
    let mut failures = Vec::new();
    for g in &goldens {
        let p = policy_for(&g.flags);
        let got4 = render(&p, Family::V4).unwrap().restore_text();
        if got4 != g.v4 {
            failures.push(format!(
                "{} (IPv4):\n--- want\n{}--- got\n{}",
                g.name, g.v4, got4
            ));
        }
        assert_eq!(
            g.ipv6,
            g.v6.is_some(),
            "{}: ipv6 line and blocks disagree",
            g.name
        );
        if let Some(want6) = &g.v6 {
            let got6 = render(&p, Family::V6).unwrap().restore_text();
            if &got6 != want6 {
                failures.push(format!(
                    "{} (IPv6):\n--- want\n{}--- got\n{}",
                    g.name, want6, got6
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn long_port_lists_are_split_at_fifteen() {
    let ports: Vec<u16> = (1..=16).collect();
    let p = Policy {
        exclude_ports: ports,
        ..Policy::default()
    };
    let set = render(&p, Family::V4).unwrap();
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
    let p = policy_for(&["-m".into(), "TPROXY".into()]);
    assert_eq!(render(&p, Family::V4), Err(RenderError::Tproxy));
    let _g = crate::policy::TEST_ENV
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let m = Cli::command()
        .try_get_matches_from(["divert-init", "--redirect-dns"])
        .unwrap();
    let cli = Cli::from_arg_matches(&m).unwrap();
    let err = cli.init.to_policy(Some(&m)).unwrap_err().to_string();
    assert!(err.contains("--redirect-dns"), "{err}");
}

#[test]
fn init_defaults_are_istio_iptables_defaults() {
    let p = policy_for(&[]);
    assert_eq!(p.include_ranges, crate::policy::IncludeRanges::List(vec![]));
    assert_eq!(p.inbound.ports, crate::policy::InboundPorts::None);
    assert_eq!((p.proxy_port, p.inbound_capture_port), (15001, 15006));
}

#[test]
fn injector_command_line_parses() {
    // The istio-init arguments Istio's sidecar injector writes.
    let args: Vec<String> = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x  -b * -d 15090,15021,15020 --log_output_level=default:info"
        .split(' ')
        .map(String::from)
        .collect();
    let p = policy_for(&args);
    assert_eq!(p.include_ranges, crate::policy::IncludeRanges::All);
    assert_eq!(p.inbound.ports, crate::policy::InboundPorts::All);
    assert_eq!(p.inbound.exclude_ports, vec![15090, 15021, 15020]);
    assert!(p.exclude_ranges.is_empty());
}
