//! [`verdict()`]: istio-iptables' `ISTIO_OUTPUT` chain as a function.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::{canonical, IncludeRanges, Policy};

/// 127.0.0.6 / ::6: the source Envoy binds for inbound passthrough connects.
const PASSTHROUGH_SRC4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH_SRC6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// What happens to a connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "port")]
pub enum Action {
    /// Rewritten to the outbound proxy on the loopback (`ISTIO_REDIRECT`), at this port.
    Redirect(u16),
    /// Rewritten to the inbound capture port on the loopback (`ISTIO_IN_REDIRECT`).
    InboundCapture(u16),
    /// Left alone (`RETURN`).
    PassThrough,
}

impl Action {
    /// The kernel's code for this action (`divert_common::verdict`).
    pub fn code(self) -> u8 {
        match self {
            Action::PassThrough => divert_common::verdict::PASSTHROUGH,
            Action::Redirect(_) => divert_common::verdict::REDIRECT,
            Action::InboundCapture(_) => divert_common::verdict::INBOUND,
        }
    }
}

/// The `ISTIO_OUTPUT` rule that decided, in chain order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "rule", content = "value")]
pub enum Rule {
    /// `-p tcp --dport P -j RETURN` (`-o`).
    ExcludeOutboundPort(u16),
    /// `-o lo -s 127.0.0.6/32 -j RETURN`: Envoy's inbound passthrough.
    InboundPassthroughSource,
    /// `-o lo ! -d 127.0.0.1/32 ! --dport 15008 -m owner --uid-owner U -j ISTIO_IN_REDIRECT`.
    ProxyUidToLocal(u32),
    /// The same with `--gid-owner G`.
    ProxyGidToLocal(u32),
    /// `-o lo -m owner ! --uid-owner U -j RETURN`: app to the pod's own address.
    LocalNotProxyUid(u32),
    /// `-o lo -m owner ! --gid-owner G -j RETURN`.
    LocalNotProxyGid(u32),
    /// `-m owner --uid-owner U -j RETURN`: the proxy reaching the real destination.
    ProxyUid(u32),
    /// `-m owner --gid-owner G -j RETURN`.
    ProxyGid(u32),
    /// `-d 127.0.0.1/32 -j RETURN` (`::1/128` for IPv6).
    HostLoopback,
    /// `-d CIDR -j RETURN` (`-x`).
    ExcludeRange(IpNetwork),
    /// `-p tcp --dport P -j ISTIO_REDIRECT` (`-q`).
    IncludeOutboundPort(u16),
    /// `-j ISTIO_REDIRECT` (`-i '*'`).
    IncludeAll,
    /// `-d CIDR -j ISTIO_REDIRECT` (`-i`).
    IncludeRange(IpNetwork),
    /// End of the chain: `RETURN`.
    NoMatch,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::ExcludeOutboundPort(p) => {
                write!(f, "port {p} is in the exclude outbound ports (-o)")
            }
            Rule::InboundPassthroughSource => {
                write!(f, "source is 127.0.0.6/::6 (inbound passthrough)")
            }
            Rule::ProxyUidToLocal(u) => {
                write!(f, "proxy UID {u} dialling a local address: inbound capture")
            }
            Rule::ProxyGidToLocal(g) => {
                write!(f, "proxy GID {g} dialling a local address: inbound capture")
            }
            Rule::LocalNotProxyUid(u) => write!(f, "local address, owner is not proxy UID {u}"),
            Rule::LocalNotProxyGid(g) => write!(f, "local address, owner is not proxy GID {g}"),
            Rule::ProxyUid(u) => write!(f, "owner is proxy UID {u} (-u)"),
            Rule::ProxyGid(g) => write!(f, "owner is proxy GID {g} (-g)"),
            Rule::HostLoopback => write!(f, "destination is 127.0.0.1 / ::1"),
            Rule::ExcludeRange(n) => write!(f, "destination is in exclude range {n} (-x)"),
            Rule::IncludeOutboundPort(p) => {
                write!(f, "port {p} is in the include outbound ports (-q)")
            }
            Rule::IncludeAll => write!(f, "include ranges are '*' (-i)"),
            Rule::IncludeRange(n) => write!(f, "destination is in include range {n} (-i)"),
            Rule::NoMatch => write!(f, "no rule matched"),
        }
    }
}

/// The outcome of [`verdict()`]: what happens and which rule said so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub action: Action,
    pub rule: Rule,
}

/// One outbound TCP connect as the kernel sees it at `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// Destination as dialled (IPv4-mapped IPv6 is judged as IPv4).
    pub destination: SocketAddr,
    /// Real UID of the connecting process.
    pub uid: u32,
    /// Real GID of the connecting process.
    pub gid: u32,
    /// Address the socket was bound to before `connect()`, if any.
    pub bound_source: Option<IpAddr>,
}

/// The verdict for `destination` dialled by a process with `uid`/`gid` from
/// an unbound socket. See [`verdict_for`].
pub fn verdict(policy: &Policy, destination: SocketAddr, uid: u32, gid: u32) -> Verdict {
    verdict_for(
        policy,
        &Connect {
            destination,
            uid,
            gid,
            bound_source: None,
        },
    )
}

/// The verdict for one connect, first match wins, in the order of
/// istio-iptables' `ISTIO_OUTPUT` chain:
///
/// 1. port in `-o` → pass through;
/// 2. bound to 127.0.0.6 / ::6 and the destination is local → pass through;
/// 3. for each proxy UID U in order: owner U, local destination other than
///    127.0.0.1/::1, port not the tunnel port → inbound capture; local
///    destination and owner not U (rule absent when an include range is
///    written with a loopback address) → pass through; owner U → pass through;
/// 4. the same for each proxy GID;
/// 5. 127.0.0.1 / ::1 → pass through;
/// 6. in an exclude range → pass through;
/// 7. port in `-q` → redirect;
/// 8. include `*`, or in an include range → redirect;
/// 9. pass through.
///
/// "Local" is what iptables' `-o lo` matches: 127.0.0.0/8, ::1 and the
/// namespace's own addresses. `0.0.0.0` and `::` are judged as 127.0.0.1
/// and ::1, which is what the kernel dials for them ([`as_dialled`]).
pub fn verdict_for(policy: &Policy, c: &Connect) -> Verdict {
    decide(policy, c, &mut |_| {})
}

/// One rule of the chain as [`explain_for`] walked it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The rule in istio-iptables' spelling (`ISTIO_OUTPUT`), with this
    /// policy's values.
    pub rule: String,
    /// Whether it matched the connect; the last step is the one that did
    /// (or the chain's end).
    pub matched: bool,
}

/// [`verdict_for`] with every rule it tried, in chain order: the rules that
/// did not match, then the one that decided. Rules the policy does not
/// have (an empty port list, no proxy GIDs) are not listed, as
/// istio-iptables does not write them.
pub fn explain_for(policy: &Policy, c: &Connect) -> (Verdict, Vec<Step>) {
    let mut steps = Vec::new();
    let v = decide(policy, c, &mut |s| steps.push(s));
    (v, steps)
}

fn decide(policy: &Policy, c: &Connect, step: &mut dyn FnMut(Step)) -> Verdict {
    let dst = as_dialled(canonical(c.destination.ip()));
    let port = c.destination.port();
    let mut tried = |rule: String, matched: bool| {
        step(Step { rule, matched });
        matched
    };
    let pass = |rule| Verdict {
        action: Action::PassThrough,
        rule,
    };
    let redirect = |rule| Verdict {
        action: Action::Redirect(policy.proxy_port),
        rule,
    };
    let inbound = |rule| Verdict {
        action: Action::InboundCapture(policy.inbound_capture_port),
        rule,
    };
    let lo = if dst.is_ipv4() {
        "127.0.0.1/32"
    } else {
        "::1/128"
    };
    let joined = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");

    if !policy.exclude_ports.is_empty()
        && tried(
            format!(
                "-p tcp -m multiport --dports {} -j RETURN",
                joined(&policy.exclude_ports)
            ),
            policy.exclude_ports.contains(&port),
        )
    {
        return pass(Rule::ExcludeOutboundPort(port));
    }
    let bound = c.bound_source.map(canonical);
    let passthrough_src = if dst.is_ipv4() {
        "127.0.0.6/32"
    } else {
        "::6/128"
    };
    let local = dst.is_loopback() || policy.local_addrs.contains(&dst);
    // "-o lo": only towards a local destination; bound to ::6, a connect to
    // anywhere else goes on down the chain.
    if tried(
        format!("-o lo -s {passthrough_src} -j RETURN"),
        local
            && (bound == Some(IpAddr::V4(PASSTHROUGH_SRC4))
                || bound == Some(IpAddr::V6(PASSTHROUGH_SRC6))),
    ) {
        return pass(Rule::InboundPassthroughSource);
    }
    let host_loopback = is_host_loopback(dst);
    let lo_return = !policy.include_ranges.has_loopback();
    let tunnel = port == policy.inbound_tunnel_port;
    // Per ID, istio-iptables emits three rules in turn: inbound capture,
    // "-o lo ! --uid-owner" RETURN, "--uid-owner" RETURN (then the same per GID).
    let mut owner_rules = |ids: &[u32],
                           id: u32,
                           kind: &str,
                           to_local: fn(u32) -> Rule,
                           local_not_owner: fn(u32) -> Rule,
                           owner_rule: fn(u32) -> Rule| {
        for &x in ids {
            let owner = id == x;
            if tried(
                format!(
                    "-o lo ! -d {lo} -p tcp ! --dport {} -m owner --{kind}-owner {x} -j ISTIO_IN_REDIRECT",
                    policy.inbound_tunnel_port
                ),
                owner && local && !host_loopback && !tunnel,
            ) {
                return Some(inbound(to_local(x)));
            }
            if lo_return
                && tried(
                    format!("-o lo -m owner ! --{kind}-owner {x} -j RETURN"),
                    local && !owner,
                )
            {
                return Some(pass(local_not_owner(x)));
            }
            if tried(format!("-m owner --{kind}-owner {x} -j RETURN"), owner) {
                return Some(pass(owner_rule(x)));
            }
        }
        None
    };
    if let Some(v) = owner_rules(
        &policy.proxy_uids,
        c.uid,
        "uid",
        Rule::ProxyUidToLocal,
        Rule::LocalNotProxyUid,
        Rule::ProxyUid,
    ) {
        return v;
    }
    if let Some(v) = owner_rules(
        &policy.proxy_gids,
        c.gid,
        "gid",
        Rule::ProxyGidToLocal,
        Rule::LocalNotProxyGid,
        Rule::ProxyGid,
    ) {
        return v;
    }
    if tried(format!("-d {lo} -j RETURN"), host_loopback) {
        return pass(Rule::HostLoopback);
    }
    for n in &policy.exclude_ranges {
        if same_family(n, dst) && tried(format!("-d {n} -j RETURN"), contains(n, dst)) {
            return pass(Rule::ExcludeRange(*n));
        }
    }
    if !policy.include_ports.is_empty()
        && tried(
            format!(
                "-p tcp -m multiport --dports {} -j ISTIO_REDIRECT",
                joined(&policy.include_ports)
            ),
            policy.include_ports.contains(&port),
        )
    {
        return redirect(Rule::IncludeOutboundPort(port));
    }
    match &policy.include_ranges {
        IncludeRanges::All => {
            tried("-j ISTIO_REDIRECT".to_string(), true);
            redirect(Rule::IncludeAll)
        }
        IncludeRanges::List(list) => {
            for n in list {
                if same_family(n, dst)
                    && tried(format!("-d {n} -j ISTIO_REDIRECT"), contains(n, dst))
                {
                    return redirect(Rule::IncludeRange(*n));
                }
            }
            tried("end of ISTIO_OUTPUT: RETURN".to_string(), true);
            pass(Rule::NoMatch)
        }
    }
}

/// Whether `net` is written in `ip`'s family (an IPv4 range sits in the
/// iptables chain, an IPv6 range in the ip6tables chain).
fn same_family(net: &IpNetwork, ip: IpAddr) -> bool {
    net.is_ipv4() == ip.is_ipv4()
}

/// The address the kernel dials for `ip`: the unspecified addresses
/// `0.0.0.0` and `::` mean the local host (Linux's `ip_route_connect()` and
/// `tcp_v6_connect()` turn them into 127.0.0.1 and ::1 before any packet
/// exists, so istio-iptables' rules only ever see those).
pub fn as_dialled(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        a => a,
    }
}

fn is_host_loopback(ip: IpAddr) -> bool {
    ip == IpAddr::V4(Ipv4Addr::LOCALHOST) || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
}

/// Family-strict containment: an IPv4 range never matches an IPv6 address.
fn contains(net: &IpNetwork, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNetwork::V4(n), IpAddr::V4(a)) => n.contains(a),
        (IpNetwork::V6(n), IpAddr::V6(a)) => n.contains(a),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn base() -> Policy {
        Policy {
            local_addrs: vec![
                "10.211.0.1".parse().unwrap(),
                "fd00:211::1".parse().unwrap(),
            ],
            ..Policy::default()
        }
    }
    const APP: u32 = 1000;

    #[test]
    fn explain_walks_the_chain_to_the_deciding_rule() {
        let p = Policy {
            exclude_ranges: vec![net("10.96.0.0/12"), net("fd00::/8")],
            include_ranges: IncludeRanges::List(vec![net("10.211.0.0/16")]),
            exclude_ports: vec![5432, 9090],
            ..base()
        };
        let c = Connect {
            destination: sa("10.211.0.2:80"),
            uid: APP,
            gid: APP,
            bound_source: None,
        };
        let (v, steps) = explain_for(&p, &c);
        assert_eq!(v, verdict_for(&p, &c));
        let rules: Vec<(&str, bool)> = steps.iter().map(|s| (s.rule.as_str(), s.matched)).collect();
        assert_eq!(
            rules,
            [
                ("-p tcp -m multiport --dports 5432,9090 -j RETURN", false),
                ("-o lo -s 127.0.0.6/32 -j RETURN", false),
                ("-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT", false),
                ("-o lo -m owner ! --uid-owner 1337 -j RETURN", false),
                ("-m owner --uid-owner 1337 -j RETURN", false),
                ("-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT", false),
                ("-o lo -m owner ! --gid-owner 1337 -j RETURN", false),
                ("-m owner --gid-owner 1337 -j RETURN", false),
                ("-d 127.0.0.1/32 -j RETURN", false),
                ("-d 10.96.0.0/12 -j RETURN", false),
                ("-d 10.211.0.0/16 -j ISTIO_REDIRECT", true),
            ]
        );
        // The proxy's own connect stops at its owner rule.
        let (v, steps) = explain_for(&p, &Connect { uid: 1337, ..c });
        assert_eq!(v.rule, Rule::ProxyUid(1337));
        assert_eq!(steps.iter().filter(|s| s.matched).count(), 1);
        assert!(steps.last().unwrap().matched);
    }

    #[test]
    fn include_all_redirects_to_the_proxy_port() {
        let v = verdict(&base(), sa("10.211.0.2:80"), APP, APP);
        assert_eq!(v.action, Action::Redirect(15001));
        assert_eq!(v.rule, Rule::IncludeAll);
    }

    #[test]
    fn empty_include_captures_nothing_by_range() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![]),
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), APP, APP).rule,
            Rule::NoMatch
        );
    }

    #[test]
    fn include_list_redirects_only_its_ranges() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![net("10.211.0.0/24"), net("fd00:211::/64")]),
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), APP, APP).rule,
            Rule::IncludeRange(net("10.211.0.0/24"))
        );
        assert_eq!(
            verdict(&p, sa("[fd00:211::2]:80"), APP, APP).action,
            Action::Redirect(15001)
        );
        assert_eq!(
            verdict(&p, sa("10.212.0.2:80"), APP, APP).action,
            Action::PassThrough
        );
    }

    #[test]
    fn exclude_beats_a_longer_include() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![net("10.211.0.2/32")]),
            exclude_ranges: vec![net("10.0.0.0/8")],
            ..base()
        };
        let v = verdict(&p, sa("10.211.0.2:80"), APP, APP);
        assert_eq!(v.action, Action::PassThrough);
        assert_eq!(v.rule, Rule::ExcludeRange(net("10.0.0.0/8")));
    }

    #[test]
    fn include_port_ignores_include_ranges_but_not_exclude_ranges() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![]),
            include_ports: vec![8080],
            exclude_ranges: vec![net("10.211.0.3/32")],
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.2:8080"), APP, APP).rule,
            Rule::IncludeOutboundPort(8080)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.3:8080"), APP, APP).rule,
            Rule::ExcludeRange(net("10.211.0.3/32"))
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.2:8081"), APP, APP).rule,
            Rule::NoMatch
        );
    }

    #[test]
    fn exclude_port_comes_first() {
        let p = Policy {
            exclude_ports: vec![5432],
            include_ports: vec![5432],
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.2:5432"), APP, APP).rule,
            Rule::ExcludeOutboundPort(5432)
        );
        // Even for the proxy dialling its own pod address.
        assert_eq!(
            verdict(&p, sa("10.211.0.1:5432"), 1337, 1337).rule,
            Rule::ExcludeOutboundPort(5432)
        );
    }

    #[test]
    fn proxy_uid_and_gid_pass_through() {
        let p = base();
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), 1337, APP).rule,
            Rule::ProxyUid(1337)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), APP, 1337).rule,
            Rule::ProxyGid(1337)
        );
    }

    #[test]
    fn changing_the_proxy_uid_captures_the_old_one() {
        let p = Policy {
            proxy_uids: vec![2000],
            proxy_gids: vec![2000],
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), 1337, 1337).action,
            Action::Redirect(15001)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), 2000, 1).rule,
            Rule::ProxyUid(2000)
        );
    }

    #[test]
    fn localhost_and_own_addresses_pass_through() {
        let p = base();
        assert_eq!(
            verdict(&p, sa("127.0.0.1:80"), APP, APP).rule,
            Rule::LocalNotProxyUid(1337)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.1:80"), APP, APP).rule,
            Rule::LocalNotProxyUid(1337)
        );
        assert_eq!(
            verdict(&p, sa("[::1]:80"), APP, APP).action,
            Action::PassThrough
        );
        // Without proxy IDs the chain reaches the explicit 127.0.0.1 rule.
        let bare = Policy {
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..base()
        };
        assert_eq!(
            verdict(&bare, sa("127.0.0.1:80"), APP, APP).rule,
            Rule::HostLoopback
        );
        assert_eq!(
            verdict(&bare, sa("10.211.0.1:80"), APP, APP).rule,
            Rule::IncludeAll
        );
    }

    #[test]
    fn proxy_dialling_its_own_pod_goes_to_inbound_capture() {
        let p = base();
        let v = verdict(&p, sa("10.211.0.1:8080"), 1337, 1337);
        assert_eq!(v.action, Action::InboundCapture(15006));
        assert_eq!(v.rule, Rule::ProxyUidToLocal(1337));
        // ...but not to 127.0.0.1, and not to the tunnel port.
        assert_eq!(
            verdict(&p, sa("127.0.0.1:8080"), 1337, 1337).rule,
            Rule::ProxyUid(1337)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.1:15008"), 1337, 1337).rule,
            Rule::ProxyUid(1337)
        );
        // 127.0.0.5 is local and not the host loopback.
        assert_eq!(
            verdict(&p, sa("127.0.0.5:80"), 1337, 1337).action,
            Action::InboundCapture(15006)
        );
    }

    #[test]
    fn inbound_passthrough_source_passes() {
        let p = base();
        let c = Connect {
            destination: sa("10.211.0.1:8080"),
            uid: 1337,
            gid: 1337,
            bound_source: Some("127.0.0.6".parse().unwrap()),
        };
        assert_eq!(verdict_for(&p, &c).rule, Rule::InboundPassthroughSource);
    }

    #[test]
    fn inbound_passthrough_source_is_no_way_out_of_the_pod() {
        // istio-iptables: `-o lo -s ::6/128 -j RETURN`. Bound to ::6 (or
        // 127.0.0.6), a connect to a remote address is judged like any other.
        let p = Policy {
            include_ranges: IncludeRanges::All,
            ..base()
        };
        for (src, dst) in [
            ("::6", "[2001:db8::1]:443"),
            ("127.0.0.6", "10.0.0.1:443"),
            ("::6", "[::ffff:10.0.0.1]:443"),
        ] {
            let c = Connect {
                destination: sa(dst),
                uid: APP,
                gid: APP,
                bound_source: Some(src.parse().unwrap()),
            };
            let v = verdict_for(&p, &c);
            assert_eq!(v.action, Action::Redirect(15001), "{src} -> {dst}: {v:?}");
            assert_eq!(v.rule, Rule::IncludeAll, "{src} -> {dst}");
        }
        for dst in ["[::1]:8080", "[fd00:211::1]:8080", "127.0.0.1:8080"] {
            let c = Connect {
                destination: sa(dst),
                uid: APP,
                gid: APP,
                bound_source: Some("::6".parse().unwrap()),
            };
            assert_eq!(
                verdict_for(&p, &c).rule,
                Rule::InboundPassthroughSource,
                "{dst}"
            );
        }
    }

    #[test]
    fn the_unspecified_address_is_the_local_host() {
        // The kernel dials 127.0.0.1 / ::1 for 0.0.0.0 / ::, so
        // istio-iptables' `-d 127.0.0.1/32 -j RETURN` decides.
        let p = Policy {
            include_ranges: IncludeRanges::All,
            ..base()
        };
        let no_ids = Policy {
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..p.clone()
        };
        for (dst, host) in [
            ("0.0.0.0:80", "127.0.0.1:80"),
            ("[::]:80", "[::1]:80"),
            ("[::ffff:0.0.0.0]:80", "127.0.0.1:80"),
        ] {
            for uid in [APP, 1337] {
                let v = verdict(&p, sa(dst), uid, uid);
                assert_eq!(v, verdict(&p, sa(host), uid, uid), "{dst} as {uid}");
                assert_eq!(v.action, Action::PassThrough, "{dst} as {uid}");
            }
            assert_eq!(verdict(&no_ids, sa(dst), APP, APP).rule, Rule::HostLoopback);
        }
    }

    #[test]
    fn loopback_include_range_drops_the_local_return_rules() {
        // istio-iptables' loopback-outbound-iprange case.
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![net("127.1.2.3/32")]),
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("127.1.2.3:80"), APP, APP).rule,
            Rule::IncludeRange(net("127.1.2.3/32"))
        );
        assert_eq!(
            verdict(&p, sa("127.0.0.1:80"), APP, APP).rule,
            Rule::HostLoopback
        );
    }

    #[test]
    fn second_proxy_uid_to_local_is_caught_by_the_first_uids_local_rule() {
        // istio-iptables emits the three rules per UID in turn, so with -u 3,4
        // the "-o lo ! --uid-owner 3 -j RETURN" rule comes before UID 4's
        // inbound capture rule.
        let p = Policy {
            proxy_uids: vec![3, 4],
            proxy_gids: vec![],
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.1:80"), 4, 4).rule,
            Rule::LocalNotProxyUid(3)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.1:80"), 3, 3).rule,
            Rule::ProxyUidToLocal(3)
        );
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), 4, 4).rule,
            Rule::ProxyUid(4)
        );
    }

    #[test]
    fn ipv4_mapped_destination_is_judged_as_ipv4() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![net("10.211.0.0/24")]),
            exclude_ranges: vec![net("10.211.0.9/32")],
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("[::ffff:10.211.0.2]:80"), APP, APP).rule,
            Rule::IncludeRange(net("10.211.0.0/24"))
        );
        assert_eq!(
            verdict(&p, sa("[::ffff:10.211.0.9]:80"), APP, APP).rule,
            Rule::ExcludeRange(net("10.211.0.9/32"))
        );
        assert_eq!(
            verdict(&base(), sa("[::ffff:127.0.0.1]:80"), APP, APP).action,
            Action::PassThrough
        );
    }

    #[test]
    fn ranges_are_family_strict() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![net("::/0")]),
            ..base()
        };
        assert_eq!(
            verdict(&p, sa("10.211.0.2:80"), APP, APP).rule,
            Rule::NoMatch
        );
        assert_eq!(
            verdict(&p, sa("[fd00:211::2]:80"), APP, APP).rule,
            Rule::IncludeRange(net("::/0"))
        );
    }
}
