//! [`verdict()`]: istio-iptables' `ISTIO_OUTPUT` chain as a function of a
//! [`Policy`], the kernel's own decision ([`divert_common::chain`]).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

pub use divert_common::chain::Transport;
use divert_common::chain::{self, Hit, Owner};
use ipnetwork::IpNetwork;
use serde::Serialize;

use super::{canonical, InboundPorts, Policy};

/// What happens to a connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "action", content = "port")]
pub enum Action {
    /// Rewritten to the outbound proxy on the loopback (`ISTIO_REDIRECT`), at this port.
    Redirect(u16),
    /// Rewritten to the inbound capture port on the loopback (`ISTIO_IN_REDIRECT`).
    InboundCapture(u16),
    /// DNS rewritten to istio-agent's DNS proxy on the loopback
    /// (`ISTIO_OUTPUT_DNS`), at this port.
    Dns(u16),
    /// Left alone (`RETURN`).
    PassThrough,
}

impl Action {
    /// The kernel's verdict for this action.
    pub fn kernel(self) -> chain::Verdict {
        match self {
            Action::PassThrough => chain::Verdict::PassThrough,
            Action::Redirect(_) => chain::Verdict::Redirect,
            Action::InboundCapture(_) => chain::Verdict::InboundCapture,
            Action::Dns(_) => chain::Verdict::Dns,
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
    /// `-m owner --gid-owner G -j RETURN`: the connecting GID is in the
    /// owner-group exclude list (`ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`).
    OwnerGroupExcluded(u32),
    /// `-m owner ! --gid-owner G1 … -j RETURN`: the connecting GID is not
    /// in the owner-group include list (`ISTIO_OUTBOUND_OWNER_GROUPS`).
    OwnerGroupNotIncluded,
    /// `-A ISTIO_OUTPUT_DNS -p tcp|udp --dport 53 -d <nameserver> -j
    /// REDIRECT --to-ports 15053` (`None`: without `-d`, capture-all).
    DnsCapture(Option<IpAddr>),
    /// UDP past DNS capture: the rest of `ISTIO_OUTPUT` redirects TCP only.
    NotTcp,
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
    /// `-A ISTIO_INBOUND -p tcp --dport <tunnel> -j RETURN`.
    InboundTunnelPort,
    /// `-A ISTIO_INBOUND -p tcp --dport P -j RETURN` (`-d`, with `-b '*'`).
    InboundExcludedPort(u16),
    /// `-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT` (`-b '*'`).
    InboundAllPorts,
    /// `-A ISTIO_INBOUND -p tcp --dport P -j ISTIO_IN_REDIRECT` (`-b` list).
    InboundListedPort(u16),
    /// No `-b`: no inbound rule exists.
    NoInboundCapture,
    /// From a local address: the namespace's own connection, whose NAT
    /// `OUTPUT` decides; the inbound rules never see it.
    InboundFromLocal,
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
            Rule::OwnerGroupExcluded(g) => write!(
                f,
                "GID {g} is in the owner groups not captured (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)"
            ),
            Rule::OwnerGroupNotIncluded => write!(
                f,
                "the GID is not in the owner groups captured (ISTIO_OUTBOUND_OWNER_GROUPS)"
            ),
            Rule::DnsCapture(Some(ns)) => {
                write!(
                    f,
                    "DNS to nameserver {ns}: to the DNS proxy (--redirect-dns)"
                )
            }
            Rule::DnsCapture(None) => {
                write!(
                    f,
                    "DNS to any address: to the DNS proxy (--capture-all-dns)"
                )
            }
            Rule::NotTcp => write!(f, "UDP: only DNS is captured"),
            Rule::HostLoopback => write!(f, "destination is 127.0.0.1 / ::1"),
            Rule::ExcludeRange(n) => write!(f, "destination is in exclude range {n} (-x)"),
            Rule::IncludeOutboundPort(p) => {
                write!(f, "port {p} is in the include outbound ports (-q)")
            }
            Rule::IncludeAll => write!(f, "include ranges are '*' (-i)"),
            Rule::IncludeRange(n) => write!(f, "destination is in include range {n} (-i)"),
            Rule::NoMatch => write!(f, "no rule matched"),
            Rule::InboundTunnelPort => write!(f, "the inbound tunnel port is never captured"),
            Rule::InboundExcludedPort(p) => {
                write!(f, "port {p} is in the exclude inbound ports (-d)")
            }
            Rule::InboundAllPorts => write!(f, "inbound ports are '*' (-b)"),
            Rule::InboundListedPort(p) => {
                write!(f, "port {p} is in the include inbound ports (-b)")
            }
            Rule::NoInboundCapture => write!(f, "no inbound capture (-b is empty)"),
            Rule::InboundFromLocal => {
                write!(f, "from a local address: the namespace's own connection")
            }
        }
    }
}

/// The outcome of [`verdict()`]: what happens and which rule said so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub action: Action,
    pub rule: Rule,
}

/// One outbound connect as the kernel sees it at `connect()` (for UDP,
/// or at `sendmsg()` with a destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// TCP or UDP.
    pub transport: Transport,
    /// Destination as dialled (IPv4-mapped IPv6 is judged as IPv4).
    pub destination: SocketAddr,
    /// Real UID of the connecting process.
    pub uid: u32,
    /// Real GID of the connecting process.
    pub gid: u32,
    /// Address the socket was bound to before `connect()`, if any.
    pub bound_source: Option<IpAddr>,
}

/// The verdict for `destination` dialled over TCP by a process with
/// `uid`/`gid` from an unbound socket. See [`verdict_for`].
pub fn verdict(policy: &Policy, destination: SocketAddr, uid: u32, gid: u32) -> Verdict {
    verdict_for(
        policy,
        &Connect {
            transport: Transport::Tcp,
            destination,
            uid,
            gid,
            bound_source: None,
        },
    )
}

/// The verdict for one connect: the kernel programs' own decision,
/// [`divert_common::chain::judge`] (istio-iptables' `ISTIO_OUTPUT` chain,
/// first match wins; its doc lists the rules), over `policy`'s header as
/// the kernel holds it and lookups in its lists.
///
/// `0.0.0.0` and `::` are judged as 127.0.0.1 and ::1, which is what the
/// kernel dials for them ([`as_dialled`]). Where several ranges match,
/// the rule named is the first in the policy's order.
pub fn verdict_for(policy: &Policy, c: &Connect) -> Verdict {
    let dst = as_dialled(canonical(c.destination.ip()));
    let port = c.destination.port();
    let passthrough_src = [
        IpAddr::from(chain::PASSTHROUGH_SRC4),
        IpAddr::from(chain::PASSTHROUGH_SRC6),
    ];
    let connect = chain::Connect {
        transport: c.transport,
        dst: chain_dst(dst),
        port,
        uid: c.uid,
        gid: c.gid,
        src_is_passthrough: c
            .bound_source
            .is_some_and(|b| passthrough_src.contains(&canonical(b))),
    };
    let mut lists = Lists {
        policy,
        range: None,
    };
    let (v, hit) = chain::judge(&crate::ebpf::header(policy), &connect, &mut lists);
    let by_owner = |owner, uid: fn(u32) -> Rule, gid: fn(u32) -> Rule, id| match owner {
        Owner::Uid => uid(id),
        Owner::Gid => gid(id),
    };
    let rule = match hit {
        Hit::ExcludeOutboundPort => Rule::ExcludeOutboundPort(port),
        Hit::InboundPassthroughSource => Rule::InboundPassthroughSource,
        Hit::ProxyToLocal(o, id) => by_owner(o, Rule::ProxyUidToLocal, Rule::ProxyGidToLocal, id),
        Hit::LocalNotProxy(o, id) => {
            by_owner(o, Rule::LocalNotProxyUid, Rule::LocalNotProxyGid, id)
        }
        Hit::Proxy(o, id) => by_owner(o, Rule::ProxyUid, Rule::ProxyGid, id),
        Hit::OwnerGroupExcluded => Rule::OwnerGroupExcluded(c.gid),
        Hit::OwnerGroupNotIncluded => Rule::OwnerGroupNotIncluded,
        Hit::DnsCapture => Rule::DnsCapture(
            policy
                .dns
                .as_ref()
                .is_some_and(|d| !d.capture_all)
                .then_some(dst),
        ),
        Hit::NotTcp => Rule::NotTcp,
        Hit::HostLoopback => Rule::HostLoopback,
        Hit::ExcludeRange => Rule::ExcludeRange(lists.range.expect("the lookup found it")),
        Hit::IncludeOutboundPort => Rule::IncludeOutboundPort(port),
        Hit::IncludeAll => Rule::IncludeAll,
        Hit::IncludeRange => Rule::IncludeRange(lists.range.expect("the lookup found it")),
        Hit::End => Rule::NoMatch,
    };
    let action = match v {
        chain::Verdict::PassThrough => Action::PassThrough,
        chain::Verdict::Redirect => Action::Redirect(policy.proxy_port),
        chain::Verdict::InboundCapture => Action::InboundCapture(policy.inbound_capture_port),
        chain::Verdict::Dns => Action::Dns(super::DNS_PROXY_PORT),
    };
    Verdict { action, rule }
}

/// [`chain::Lookups`] over a policy's lists, remembering the range that
/// matched (the first of the policy's order).
struct Lists<'a> {
    policy: &'a Policy,
    range: Option<IpNetwork>,
}

impl Lists<'_> {
    fn first_containing(&mut self, nets: &[IpNetwork], dst: chain::Dst) -> bool {
        let ip = ip_of(dst);
        self.range = nets.iter().find(|n| contains(n, ip)).copied();
        self.range.is_some()
    }
}

impl chain::Lookups for Lists<'_> {
    fn exclude_port(&mut self, port: u16) -> bool {
        self.policy.exclude_ports.contains(&port)
    }
    fn include_port(&mut self, port: u16) -> bool {
        self.policy.include_ports.contains(&port)
    }
    fn own_address(&mut self, dst: chain::Dst) -> bool {
        self.policy.local_addrs.contains(&ip_of(dst))
    }
    fn exclude_range(&mut self, dst: chain::Dst) -> bool {
        self.first_containing(&self.policy.exclude_ranges, dst)
    }
    fn include_range(&mut self, dst: chain::Dst) -> bool {
        self.first_containing(self.policy.include_ranges.cidrs(), dst)
    }
    fn owner_group(&mut self, gid: u32) -> bool {
        self.policy.owner_groups.lists(gid)
    }
    fn inbound_include_port(&mut self, port: u16) -> bool {
        matches!(&self.policy.inbound_ports, InboundPorts::List(l) if l.contains(&port))
    }
    fn inbound_exclude_port(&mut self, port: u16) -> bool {
        self.policy.inbound_exclude_ports.contains(&port)
    }
    fn nameserver(&mut self, dst: chain::Dst) -> bool {
        let ip = ip_of(dst);
        self.policy
            .dns
            .as_ref()
            .is_some_and(|d| d.servers().any(|s| s.addr() == ip))
    }
}

/// What happens to an inbound connection: handed to the inbound capture
/// listener (`Some(port)`), or left to the port it dialled, and the rule of
/// istio-iptables' `ISTIO_INBOUND` chain that said so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundVerdict {
    /// The inbound capture port it goes to, or `None`.
    pub captured_to: Option<u16>,
    pub rule: chain::InboundHit,
}

impl InboundVerdict {
    /// The deciding rule as a [`Rule`] (what the iptables backend's
    /// `ISTIO_INBOUND` rules are marked with) for a connection to `port`.
    pub fn rule_for(&self, port: u16) -> Rule {
        use chain::InboundHit as H;
        match self.rule {
            H::NoInboundCapture => Rule::NoInboundCapture,
            H::FromLocal => Rule::InboundFromLocal,
            H::TunnelPort => Rule::InboundTunnelPort,
            H::ExcludedPort => Rule::InboundExcludedPort(port),
            H::AllPorts => Rule::InboundAllPorts,
            H::ListedPort => Rule::InboundListedPort(port),
            H::End => Rule::NoMatch,
        }
    }
}

/// The verdict for an inbound TCP connection to `port` of the namespace
/// from `source`: the kernel's own decision
/// ([`divert_common::chain::judge_inbound`]) over `policy`'s header and
/// lists. A source on loopback or among the policy's own addresses is the
/// namespace dialling itself.
pub fn inbound_verdict(policy: &Policy, port: u16, source: IpAddr) -> InboundVerdict {
    let source = canonical(source);
    let from_local = source.is_loopback() || policy.local_addrs.contains(&source);
    let mut lists = Lists {
        policy,
        range: None,
    };
    let (capture, rule) = chain::judge_inbound(
        &crate::ebpf::header(policy),
        &chain::Accept { port, from_local },
        &mut lists,
    );
    InboundVerdict {
        captured_to: capture.then_some(policy.inbound_capture_port),
        rule,
    }
}

/// A canonical address (no IPv4-mapped IPv6) as the chain's destination.
fn chain_dst(ip: IpAddr) -> chain::Dst {
    match ip {
        IpAddr::V4(a) => chain::Dst::V4(a.octets()),
        IpAddr::V6(a) => chain::Dst::V6(a.octets()),
    }
}

fn ip_of(dst: chain::Dst) -> IpAddr {
    match dst {
        chain::Dst::V4(a) => IpAddr::from(a),
        chain::Dst::V6(a) => IpAddr::from(a),
    }
}

/// The address the kernel dials for a canonical `ip` (no IPv4-mapped
/// IPv6): `0.0.0.0` and `::` are 127.0.0.1 and ::1
/// ([`chain::Dst::as_dialled`]).
pub fn as_dialled(ip: IpAddr) -> IpAddr {
    ip_of(chain_dst(ip).as_dialled())
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
    use crate::policy::IncludeRanges;

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
            transport: Transport::Tcp,
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
                transport: Transport::Tcp,
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
                transport: Transport::Tcp,
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

    #[test]
    fn inbound_capture_follows_istio_iptables_inbound_chain() {
        use chain::InboundHit::*;
        let peer: IpAddr = "10.1.1.2".parse().unwrap();
        let own: IpAddr = "10.1.1.1".parse().unwrap();
        let with = |ports, exclude: Vec<u16>| Policy {
            inbound_ports: ports,
            inbound_exclude_ports: exclude,
            local_addrs: vec![own],
            ..Policy::default()
        };
        let all = with(InboundPorts::All, vec![22]);
        let v = |p: &Policy, port, src| {
            let v = inbound_verdict(p, port, src);
            (v.captured_to, v.rule)
        };
        assert_eq!(v(&all, 8080, peer), (Some(15006), AllPorts));
        assert_eq!(v(&all, 22, peer), (None, ExcludedPort));
        assert_eq!(v(&all, 15008, peer), (None, TunnelPort));
        // The namespace dialling itself, or Envoy's inbound passthrough.
        assert_eq!(v(&all, 8080, own), (None, FromLocal));
        assert_eq!(
            v(&all, 8080, "127.0.0.6".parse().unwrap()),
            (None, FromLocal)
        );
        // A list captures its ports only; -d is ignored with it, as
        // istio-iptables ignores it.
        let list = with(InboundPorts::List(vec![8080, 22]), vec![22]);
        assert_eq!(v(&list, 22, peer), (Some(15006), ListedPort));
        assert_eq!(v(&list, 80, peer), (None, End));
        assert_eq!(
            v(&with(InboundPorts::None, vec![]), 8080, peer),
            (None, NoInboundCapture)
        );
    }

    fn dns_policy(servers: &[&str]) -> Policy {
        use crate::policy::{DnsCapture, Nameserver};
        let ns: Vec<Nameserver> = servers
            .iter()
            .map(|s| Nameserver::parse(s).unwrap())
            .collect();
        Policy {
            include_ranges: IncludeRanges::List(vec![]),
            dns: Some(DnsCapture {
                capture_all: servers.is_empty(),
                servers_v4: ns.iter().filter(|n| n.addr().is_ipv4()).cloned().collect(),
                servers_v6: ns.iter().filter(|n| n.addr().is_ipv6()).cloned().collect(),
            }),
            ..base()
        }
    }

    fn udp(p: &Policy, dst: &str, uid: u32, gid: u32) -> Verdict {
        verdict_for(
            p,
            &Connect {
                transport: Transport::Udp,
                destination: sa(dst),
                uid,
                gid,
                bound_source: None,
            },
        )
    }

    #[test]
    fn dns_to_a_nameserver_goes_to_the_dns_proxy_except_the_proxys_own() {
        let p = dns_policy(&["10.96.0.10", "fd00::a"]);
        for dst in ["10.96.0.10:53", "[fd00::a]:53"] {
            let want = Verdict {
                action: Action::Dns(15053),
                rule: Rule::DnsCapture(Some(sa(dst).ip())),
            };
            assert_eq!(udp(&p, dst, APP, APP), want, "{dst}");
            assert_eq!(verdict(&p, sa(dst), APP, APP), want, "{dst} over TCP");
            assert_eq!(udp(&p, dst, 1337, 1337).rule, Rule::ProxyUid(1337));
        }
        // Another server, another port: UDP is left alone past DNS capture.
        assert_eq!(udp(&p, "10.96.0.11:53", APP, APP).rule, Rule::NotTcp);
        assert_eq!(udp(&p, "10.96.0.10:5353", APP, APP).rule, Rule::NotTcp);
        // Capture-all: every address's port 53.
        let all = dns_policy(&[]);
        assert_eq!(
            udp(&all, "192.0.2.9:53", APP, APP).rule,
            Rule::DnsCapture(None)
        );
        // No DNS capture: UDP is never captured.
        assert_eq!(
            udp(&base(), "10.96.0.10:53", APP, APP).action,
            Action::PassThrough
        );
    }

    #[test]
    fn dns_capture_follows_istio_iptables_port_53_exceptions() {
        // A loopback nameserver (systemd-resolved's stub): the
        // application's TCP DNS is not returned as "local" (`! --dport 53`)
        // and reaches DNS capture.
        let p = dns_policy(&["127.0.0.53"]);
        assert_eq!(
            verdict(&p, sa("127.0.0.53:53"), APP, APP).rule,
            Rule::DnsCapture(Some("127.0.0.53".parse().unwrap()))
        );
        // Other local ports still return.
        assert_eq!(
            verdict(&p, sa("127.0.0.53:80"), APP, APP).rule,
            Rule::LocalNotProxyUid(1337)
        );
        // The proxy UID's TCP to a local port 53 is not sent inbound
        // (`! --dports 53,15008` with --uid-owner) ...
        let own: SocketAddr = sa("10.211.0.1:53");
        assert_eq!(verdict(&p, own, 1337, 1337).rule, Rule::ProxyUid(1337));
        // ... but istio writes only `! --dport 15008` with --gid-owner.
        assert_eq!(
            verdict(&p, own, 4242, 1337).rule,
            Rule::ProxyGidToLocal(1337)
        );
        // -o 53 excludes UDP too (istio-iptables writes -p tcp and -p udp).
        let excluded = Policy {
            exclude_ports: vec![53],
            ..dns_policy(&["10.96.0.10"])
        };
        assert_eq!(
            udp(&excluded, "10.96.0.10:53", APP, APP).rule,
            Rule::ExcludeOutboundPort(53)
        );
    }
}
