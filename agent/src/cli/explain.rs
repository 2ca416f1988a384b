//! `divert explain --netns COOKIE|--pod NS/NAME DEST:PORT [--uid U] [--gid G]
//! [--bound-source IP] [--udp]`: what divert does with one connect (or, with
//! `--udp`, a DNS query), and why, step by step through istio-iptables'
//! `ISTIO_OUTPUT` chain (and `ISTIO_OUTPUT_DNS`), from the policy in the
//! live maps; with `--inbound [--from IP]`, one inbound connection to one
//! of the namespace's addresses through `ISTIO_INBOUND`. The decision is the kernel's own
//! ([`crate::policy::verdict_for`] runs `divert_common::chain::judge`); the
//! rules are printed as the iptables backend writes them
//! ([`crate::iptables::render`]): one source for each.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;

use super::inspect::{self, Output, ReadArgs, Target};
use crate::{
    ebpf::PodRef,
    iptables::{self, Family},
    policy::{
        as_dialled, canonical, inbound_verdict, verdict_for, Action, Capture, Connect,
        InboundVerdict, IncludeRanges, IpNetwork, Policy, Rule, Transport, Verdict,
    },
};

/// Arguments of `divert explain`.
#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub target: Target,

    /// The destination as the application dials it: `10.0.0.1:80`,
    /// `[fd00::1]:443` (`[::ffff:a.b.c.d]:P` is judged as IPv4, as the
    /// kernel does).
    #[arg(value_name = "DEST:PORT", value_parser = parse_destination)]
    pub destination: SocketAddr,

    /// Real UID of the connecting process.
    #[arg(long, value_name = "UID", default_value_t = 0)]
    pub uid: u32,

    /// Real GID of the connecting process.
    #[arg(long, value_name = "GID", default_value_t = 0)]
    pub gid: u32,

    /// Address the socket was bound to before connect (127.0.0.6 is
    /// Envoy's inbound passthrough source).
    #[arg(long, value_name = "IP")]
    pub bound_source: Option<IpAddr>,

    /// A UDP connect or datagram (a DNS query) instead of a TCP connect.
    #[arg(long, conflicts_with = "inbound")]
    pub udp: bool,

    /// An inbound TCP connection to DEST:PORT, one of the namespace's own
    /// addresses, walked through istio-iptables' `ISTIO_INBOUND` chain
    /// (`--uid`, `--gid` and `--bound-source` do not apply).
    #[arg(long, conflicts_with_all = ["uid", "gid", "bound_source"])]
    pub inbound: bool,

    /// With --inbound: the client's address [default: a remote client, not
    /// one of the namespace's own addresses].
    #[arg(long, value_name = "IP", requires = "inbound")]
    pub from: Option<IpAddr>,
}

/// `divert explain -o json`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub netns_cookie: u64,
    pub pod: Option<PodRef>,
    /// The destination IP as judged (IPv4-mapped shown as IPv4).
    pub destination: IpAddr,
    pub port: u16,
    /// `tcp` or `udp`.
    pub transport: &'static str,
    /// `outbound` (a connect of the namespace's) or `inbound` (a connection
    /// to one of its addresses).
    pub direction: &'static str,
    /// Outbound: the connecting process's UID and GID; null inbound.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Inbound: the client's address (null: a remote client); null
    /// outbound.
    pub from: Option<IpAddr>,
    /// `redirected`, `passthrough`, `inbound_capture` or `dns` (as `divert
    /// stats`).
    pub verdict: &'static str,
    /// The rule that decided, in words.
    pub rule: String,
    /// Where the connection goes. Outbound: 127.0.0.1/::1 at this port
    /// when rewritten. Inbound: the capture listener's port at the
    /// destination address (socket lookup keeps the destination). Passed
    /// through: the destination itself.
    pub to: SocketAddr,
    /// Every rule tried, in chain order; the last one decided.
    pub steps: Vec<Step>,
}

/// Run `divert explain`: 0, or 2 with the error on stderr.
pub fn main(args: &ExplainArgs) -> ExitCode {
    match run(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("explain", &e),
    }
}

fn run(args: &ExplainArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let dir = &args.read.bpffs_dir;
    let mut maps = inspect::open(dir)?;
    let Some(cookie) = inspect::cookie_of(&mut maps, &args.target, dir)? else {
        bail!("say which namespace: --netns COOKIE or --pod NAMESPACE/NAME (`divert maps` lists them)");
    };
    let Some(mut policy) = maps
        .policy_of(cookie)
        .with_context(|| format!("reading the policy of netns {cookie}"))?
    else {
        bail!(
            "netns {cookie} has no policy registered under {}: its connects are not touched",
            dir.display()
        );
    };
    most_specific_first(&mut policy);
    let pod = maps.pods()?.remove(&cookie);
    let dst = canonical(args.destination.ip());
    if args.inbound {
        if !policy.local_addrs.contains(&dst) {
            bail!(
                "{dst} is not an address of netns {cookie} (its addresses: {}): no inbound connection to it is this namespace's",
                policy
                    .local_addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let port = args.destination.port();
        let (v, steps) = explain_inbound_for(&policy, dst, port, args.from);
        let e = Explanation {
            netns_cookie: cookie,
            pod,
            destination: dst,
            port,
            transport: "tcp",
            direction: "inbound",
            uid: None,
            gid: None,
            from: args.from,
            verdict: if v.captured_to.is_some() {
                divert_common::Verdict::InboundCapture.name()
            } else {
                divert_common::Verdict::PassThrough.name()
            },
            rule: v.rule_for(port).to_string(),
            to: SocketAddr::new(dst, v.captured_to.unwrap_or(port)),
            steps,
        };
        return match args.read.output {
            Output::Json => inspect::json(out, &e),
            Output::Table => Ok(print(out, &e)?),
        };
    }
    let transport = if args.udp {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let connect = Connect {
        transport,
        destination: SocketAddr::new(dst, args.destination.port()),
        uid: args.uid,
        gid: args.gid,
        bound_source: args.bound_source,
    };
    let (v, steps) = explain_for(&policy, &connect);
    let lo = |port| {
        SocketAddr::new(
            if dst.is_ipv4() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
            },
            port,
        )
    };
    let e = Explanation {
        netns_cookie: cookie,
        pod,
        destination: dst,
        port: args.destination.port(),
        transport: if args.udp { "udp" } else { "tcp" },
        direction: "outbound",
        uid: Some(args.uid),
        gid: Some(args.gid),
        from: None,
        verdict: v.action.kernel().name(),
        rule: v.rule.to_string(),
        to: match v.action {
            Action::Redirect(p) | Action::InboundCapture(p) | Action::Dns(p) => lo(p),
            Action::PassThrough => connect.destination,
        },
        steps,
    };
    match args.read.output {
        Output::Json => inspect::json(out, &e),
        Output::Table => Ok(print(out, &e)?),
    }
}

/// One rule of `ISTIO_OUTPUT` as [`explain_for`] walked it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The rule as the iptables backend writes it for this policy
    /// (`-A ISTIO_OUTPUT …`), or the chain's end.
    pub rule: String,
    /// Whether it matched the connect; the last step is the one that did
    /// (or the chain's end).
    pub matched: bool,
}

/// [`verdict_for`] with the rules of istio-iptables' `ISTIO_OUTPUT` chain
/// for the destination's family that a connect passes, in order: those
/// that did not match, then the one that decided (or the chain's end).
/// The rules are [`iptables::render`]'s, so a policy's rules are listed as
/// istio-iptables writes them (no rule for an empty list; one `-p tcp` and
/// one `-p udp` rule per chunk of exclude ports).
pub fn explain_for(policy: &Policy, c: &Connect) -> (Verdict, Vec<Step>) {
    let v = verdict_for(policy, c);
    let family = if as_dialled(canonical(c.destination.ip())).is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    // Only ISTIO_OUTPUT is walked, which capture settings do not change.
    let rules = iptables::render(policy, &Capture::default(), family);
    let mut steps = Vec::new();
    for r in rules
        .in_table(iptables::Table::Nat)
        .filter(|r| r.chain == iptables::ISTIO_OUTPUT || r.chain == iptables::ISTIO_OUTPUT_DNS)
    {
        // Past DNS capture (the first rule after it is the host loopback's)
        // nothing rewrites UDP.
        if v.rule == Rule::NotTcp && r.decides.contains(&Rule::HostLoopback) {
            break;
        }
        let matched = r.decides.contains(&v.rule) && r.matches_transport(c.transport);
        steps.push(Step {
            rule: r.line(),
            matched,
        });
        if matched {
            return (v, steps);
        }
    }
    steps.push(Step {
        rule: if v.rule == Rule::NotTcp {
            format!(
                "UDP: the rest of {} redirects TCP only: RETURN",
                iptables::ISTIO_OUTPUT
            )
        } else {
            format!("end of {}: RETURN", iptables::ISTIO_OUTPUT)
        },
        matched: true,
    });
    (v, steps)
}

/// [`inbound_verdict`] for a TCP connection from `from` (default: a
/// remote client) to `port` of `dst`, one of the namespace's addresses,
/// with the rules of istio-iptables' `ISTIO_INBOUND` chain (REDIRECT mode)
/// it passes, in order, up to the one that decided (or the chain's end). A
/// connection from a local address, or a policy without `-b`, meets no
/// inbound rule: one step says why.
pub fn explain_inbound_for(
    policy: &Policy,
    dst: IpAddr,
    port: u16,
    from: Option<IpAddr>,
) -> (InboundVerdict, Vec<Step>) {
    // A source in TEST-NET (RFC 5737/3849): never one of the namespace's.
    let source = from.unwrap_or(if dst.is_ipv4() {
        IpAddr::from([192, 0, 2, 1])
    } else {
        "2001:db8::1".parse().expect("an IPv6 address")
    });
    let v = inbound_verdict(policy, port, source);
    let rule = v.rule_for(port);
    if matches!(rule, Rule::NoInboundCapture | Rule::InboundFromLocal) {
        return (
            v,
            vec![Step {
                rule: format!("{rule}: no {} rule applies", iptables::ISTIO_INBOUND),
                matched: true,
            }],
        );
    }
    let family = if dst.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    };
    let rules = iptables::render(policy, &Capture::default(), family);
    let mut steps = Vec::new();
    for r in rules
        .in_table(iptables::Table::Nat)
        .filter(|r| r.chain == iptables::ISTIO_INBOUND)
    {
        let matched = r.decides.contains(&rule);
        steps.push(Step {
            rule: r.line(),
            matched,
        });
        if matched {
            return (v, steps);
        }
    }
    steps.push(Step {
        rule: format!("end of {}: RETURN", iptables::ISTIO_INBOUND),
        matched: true,
    });
    (v, steps)
}

/// Order the include and exclude ranges most specific first. The tries do
/// not keep the order ranges were written in, and when several match, the
/// kernel's LPM lookup finds the longest prefix: that is the range named.
/// (Which of several matching ranges decides never changes the verdict.)
pub fn most_specific_first(p: &mut Policy) {
    let order = |a: &IpNetwork, b: &IpNetwork| b.prefix().cmp(&a.prefix()).then(a.cmp(b));
    p.exclude_ranges.sort_by(order);
    if let IncludeRanges::List(v) = &mut p.include_ranges {
        v.sort_by(order);
    }
}

fn print(out: &mut impl Write, e: &Explanation) -> std::io::Result<()> {
    let who = e
        .pod
        .as_ref()
        .map_or(String::new(), |p| format!(" (pod {p})"));
    let dst = SocketAddr::new(e.destination, e.port);
    match (e.uid, e.gid) {
        (Some(uid), Some(gid)) => writeln!(
            out,
            "{} connect to {dst} from uid {uid} gid {gid} in netns {}{who}",
            e.transport.to_uppercase(),
            e.netns_cookie
        )?,
        _ => writeln!(
            out,
            "inbound TCP connection to {dst} of netns {}{who} from {}",
            e.netns_cookie,
            e.from
                .map_or("a remote client".to_string(), |f| f.to_string())
        )?,
    }
    for (i, s) in e.steps.iter().enumerate() {
        writeln!(
            out,
            "  {:>2}. {:<5} {}",
            i + 1,
            if s.matched { "MATCH" } else { "no" },
            s.rule
        )?;
    }
    writeln!(out, "verdict: {} to {}", e.verdict, e.to)?;
    writeln!(out, "rule: {}", e.rule)
}

/// `DEST:PORT` with a port from 1 to 65535: nothing connects to port 0.
fn parse_destination(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s
        .parse()
        .map_err(|e| format!("{e}: write ADDRESS:PORT, e.g. 10.0.0.1:80 or [fd00::1]:443"))?;
    if a.port() == 0 {
        return Err("port 0: ports are whole numbers from 1 to 65535".into());
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn explain_walks_the_rules_as_the_iptables_backend_writes_them() {
        let p = Policy {
            exclude_ranges: vec![net("10.96.0.0/12"), net("fd00::/8")],
            include_ranges: IncludeRanges::List(vec![net("10.211.0.0/16")]),
            exclude_ports: vec![5432, 9090],
            include_ports: vec![8080, 8443],
            local_addrs: vec!["10.211.0.1".parse().unwrap()],
            ..Policy::default()
        };
        let c = Connect {
            transport: Transport::Tcp,
            destination: "10.211.0.2:80".parse().unwrap(),
            uid: 1000,
            gid: 1000,
            bound_source: None,
        };
        let (v, steps) = explain_for(&p, &c);
        assert_eq!(v, verdict_for(&p, &c));
        let rules: Vec<(&str, bool)> = steps.iter().map(|s| (s.rule.as_str(), s.matched)).collect();
        assert_eq!(
            rules,
            [
                ("-A ISTIO_OUTPUT -p tcp -m multiport --dports 5432,9090 -j RETURN", false),
                ("-A ISTIO_OUTPUT -p udp -m multiport --dports 5432,9090 -j RETURN", false),
                ("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN", false),
                ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT", false),
                ("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN", false),
                ("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN", false),
                ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT", false),
                ("-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN", false),
                ("-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN", false),
                ("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN", false),
                ("-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN", false),
                ("-A ISTIO_OUTPUT -p tcp --dport 8080 -j ISTIO_REDIRECT", false),
                ("-A ISTIO_OUTPUT -p tcp --dport 8443 -j ISTIO_REDIRECT", false),
                ("-A ISTIO_OUTPUT -d 10.211.0.0/16 -j ISTIO_REDIRECT", true),
            ]
        );
        // The proxy's own connect stops at its owner rule.
        let (v, steps) = explain_for(&p, &Connect { uid: 1337, ..c });
        assert_eq!(v.rule, Rule::ProxyUid(1337));
        assert_eq!(steps.iter().filter(|s| s.matched).count(), 1);
        assert_eq!(
            steps.last().unwrap().rule,
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"
        );
    }

    #[test]
    fn an_exclude_port_stops_at_its_tcp_rule_as_iptables_writes_it() {
        // One port: `--dport`, as istio-iptables writes it (not multiport).
        let p = Policy {
            exclude_ports: vec![22],
            ..Policy::default()
        };
        let c = Connect {
            transport: Transport::Tcp,
            destination: "[fd00::1]:22".parse().unwrap(),
            uid: 1000,
            gid: 1000,
            bound_source: None,
        };
        let (v, steps) = explain_for(&p, &c);
        assert_eq!(v.rule, Rule::ExcludeOutboundPort(22));
        assert_eq!(
            steps,
            [Step {
                rule: "-A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN".into(),
                matched: true
            }]
        );
        // Past the chain's end: every rule of the family, then RETURN.
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![net("10.0.0.0/8")]),
            proxy_gids: vec![],
            ..Policy::default()
        };
        let (v, steps) = explain_for(
            &p,
            &Connect {
                transport: Transport::Tcp,
                destination: "[fd00::1]:80".parse().unwrap(),
                ..c
            },
        );
        assert_eq!(v.rule, Rule::NoMatch);
        let rules: Vec<&str> = steps.iter().map(|s| s.rule.as_str()).collect();
        assert_eq!(
            rules,
            [
                "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN",
                "-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
                "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A ISTIO_OUTPUT -d ::1/128 -j RETURN",
                "end of ISTIO_OUTPUT: RETURN",
            ]
        );
    }

    #[test]
    fn a_dns_query_is_explained_through_istio_output_dns() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![]),
            proxy_gids: vec![],
            dns: Some(crate::policy::DnsCapture {
                capture_all: false,
                servers_v4: vec!["10.96.0.10".parse::<IpAddr>().unwrap().into()],
                servers_v6: vec![],
            }),
            ..Policy::default()
        };
        let c = Connect {
            transport: Transport::Udp,
            destination: "10.96.0.10:53".parse().unwrap(),
            uid: 1000,
            gid: 1000,
            bound_source: None,
        };
        let (v, steps) = explain_for(&p, &c);
        assert_eq!(v.action, Action::Dns(15053));
        let rules: Vec<(&str, bool)> = steps.iter().map(|s| (s.rule.as_str(), s.matched)).collect();
        assert_eq!(
            rules,
            [
                ("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN", false),
                ("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT", false),
                ("-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN", false),
                ("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN", false),
                ("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS", false),
                ("-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053", false),
                ("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053", true),
            ]
        );
        // UDP to another server: past DNS capture, nothing rewrites it.
        let (v, steps) = explain_for(
            &p,
            &Connect {
                destination: "10.96.0.11:53".parse().unwrap(),
                ..c
            },
        );
        assert_eq!(v.rule, Rule::NotTcp);
        assert_eq!(
            steps.last().unwrap().rule,
            "UDP: the rest of ISTIO_OUTPUT redirects TCP only: RETURN"
        );
        assert_eq!(steps.iter().filter(|s| s.matched).count(), 1);
    }

    #[test]
    fn an_inbound_connection_is_explained_through_istio_inbound() {
        let own: IpAddr = "10.211.0.1".parse().unwrap();
        let p = Policy {
            inbound_ports: crate::policy::InboundPorts::All,
            inbound_exclude_ports: vec![15090, 15021],
            local_addrs: vec![own],
            ..Policy::default()
        };
        let walk = |p: &Policy, port, from| {
            let (v, steps) = explain_inbound_for(p, own, port, from);
            let rules: Vec<(String, bool)> =
                steps.into_iter().map(|s| (s.rule, s.matched)).collect();
            (v.captured_to, v.rule_for(port), rules)
        };
        let tunnel = (
            "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN".to_string(),
            false,
        );
        let excluded =
            "-A ISTIO_INBOUND -p tcp -m multiport --dports 15090,15021 -j RETURN".to_string();
        assert_eq!(
            walk(&p, 8080, None),
            (
                Some(15006),
                Rule::InboundAllPorts,
                vec![
                    tunnel.clone(),
                    (excluded.clone(), false),
                    ("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into(), true)
                ]
            )
        );
        assert_eq!(
            walk(&p, 15021, None),
            (
                None,
                Rule::InboundExcludedPort(15021),
                vec![tunnel.clone(), (excluded, true)]
            )
        );
        // The namespace's own connection meets no inbound rule.
        let (to, rule, steps) = walk(&p, 8080, Some(own));
        assert_eq!((to, rule, steps.len()), (None, Rule::InboundFromLocal, 1));
        // A -b list: another port reaches the chain's end.
        let list = Policy {
            inbound_ports: crate::policy::InboundPorts::List(vec![8080]),
            ..p
        };
        let (to, rule, steps) = walk(&list, 9090, None);
        assert_eq!((to, rule), (None, Rule::NoMatch));
        assert_eq!(steps.last().unwrap().0, "end of ISTIO_INBOUND: RETURN");
    }
}
