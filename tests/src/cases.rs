//! The connect cases every backend is held to: a fixed matrix of named Istio
//! cases and a seeded generator of random policies and dials. The eBPF
//! kernel tests and the iptables equivalence tests run the same cases.

use std::net::{IpAddr, SocketAddr};

use divert::policy::{Action, IncludeRanges, IpNetwork, OwnerGroups, Policy};
use rand::{rngs::StdRng, seq::SliceRandom, Rng};

use crate::Addrs;

/// The UID and GID of an ordinary (non-proxy) application.
pub const APP: u32 = 1000;

/// One dial under one policy, and what must happen to it.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: &'static str,
    pub policy: Policy,
    pub dst: SocketAddr,
    pub uid: u32,
    pub gid: u32,
    /// Dial an IPv4 destination as `::ffff:a.b.c.d` from an AF_INET6 socket.
    pub mapped: bool,
    pub want: Action,
}

fn net(s: String) -> IpNetwork {
    s.parse().unwrap()
}

/// What the testkit client prints when `action` happens to a dial of `dst`:
/// which listener answered, the original destination the proxy read with
/// SO_ORIGINAL_DST, and what getpeername() told the client.
pub fn expected(action: Action, dst: SocketAddr, mapped: bool) -> String {
    let shown_peer = match (dst, mapped) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => dst,
    };
    let lo = |port| match dst {
        SocketAddr::V4(_) => format!("127.0.0.1:{port}"),
        SocketAddr::V6(_) => format!("[::1]:{port}"),
    };
    match action {
        Action::Redirect(p) | Action::InboundCapture(p) | Action::Dns(p) => {
            format!("proxy {} orig={dst} peer={shown_peer}", lo(p))
        }
        Action::PassThrough => format!("server {dst} peer={shown_peer}"),
    }
}

/// The named Istio cases, for a lab's addresses (`&Lab` or [`Addrs`]).
pub fn istio_matrix(lab: impl Into<Addrs>) -> Vec<Case> {
    let lab: Addrs = lab.into();
    let n = lab.n;
    let (own, p2, p3) = (lab.v4(1), lab.v4(2), lab.v4(3));
    let (p6, p6b) = (lab.v6(2), lab.v6(3));
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    let lo4: IpAddr = "127.0.0.1".parse().unwrap();
    let lo6: IpAddr = "::1".parse().unwrap();
    let redirect = Action::Redirect(15001);
    let pass = Action::PassThrough;
    let all = Policy::default();
    let list = |v: Vec<String>| IncludeRanges::List(v.into_iter().map(net).collect());
    let rows: Vec<(&'static str, Policy, SocketAddr, u32, u32, bool, Action)> = vec![
        (
            "include * redirects",
            all.clone(),
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "include list: inside",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.2/32")]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "include list: outside",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.2/32")]),
                ..all.clone()
            },
            at(p3, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "exclude beats a longer include",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.2/32")]),
                exclude_ranges: vec![net(format!("10.211.{n}.0/24"))],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-q redirects whatever -i says",
            Policy {
                include_ranges: list(vec![]),
                include_ports: vec![8080],
                ..all.clone()
            },
            at(p2, 8080),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "-q leaves other ports",
            Policy {
                include_ranges: list(vec![]),
                include_ports: vec![8080],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-q under -x passes",
            Policy {
                include_ranges: list(vec![]),
                include_ports: vec![8080],
                exclude_ranges: vec![net(format!("10.211.{n}.2/32"))],
                ..all.clone()
            },
            at(p2, 8080),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-o passes",
            Policy {
                exclude_ports: vec![5432],
                ..all.clone()
            },
            at(p2, 5432),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "-o leaves other ports",
            Policy {
                exclude_ports: vec![5432],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "proxy UID passes",
            all.clone(),
            at(p2, 80),
            1337,
            APP,
            false,
            pass,
        ),
        (
            "proxy GID passes",
            all.clone(),
            at(p2, 80),
            APP,
            1337,
            false,
            pass,
        ),
        (
            "-u changed: old proxy UID is captured",
            Policy {
                proxy_uids: vec![2000],
                proxy_gids: vec![2000],
                ..all.clone()
            },
            at(p2, 80),
            1337,
            1337,
            false,
            redirect,
        ),
        (
            "-u changed: new proxy UID passes",
            Policy {
                proxy_uids: vec![2000],
                proxy_gids: vec![2000],
                ..all.clone()
            },
            at(p2, 80),
            2000,
            APP,
            false,
            pass,
        ),
        (
            "127.0.0.1 passes",
            all.clone(),
            at(lo4, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "own address passes",
            all.clone(),
            at(own, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "proxy to own address: inbound capture",
            all.clone(),
            at(own, 80),
            1337,
            1337,
            false,
            Action::InboundCapture(15006),
        ),
        (
            "IPv6 include *",
            all.clone(),
            at(p6, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "IPv6 outside an IPv4-only include",
            Policy {
                include_ranges: list(vec!["10.0.0.0/8".into()]),
                ..all.clone()
            },
            at(p6, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "IPv6 include list",
            Policy {
                include_ranges: list(vec![format!("fd00:211:{n}::2/128")]),
                ..all.clone()
            },
            at(p6, 8080),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "IPv6 exclude",
            Policy {
                exclude_ranges: vec![net(format!("fd00:211:{n}::/64"))],
                ..all.clone()
            },
            at(p6b, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "::1 passes",
            all.clone(),
            at(lo6, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "mapped IPv4 judged as IPv4: include",
            Policy {
                include_ranges: list(vec![format!("10.211.{n}.0/24")]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            true,
            redirect,
        ),
        (
            "mapped IPv4 judged as IPv4: exclude",
            Policy {
                exclude_ranges: vec![net(format!("10.211.{n}.2/32"))],
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            true,
            pass,
        ),
        (
            "mapped 127.0.0.1 passes",
            all.clone(),
            at(lo4, 80),
            APP,
            APP,
            true,
            pass,
        ),
        (
            "owner groups 2000 only: a process of group 2000 is captured",
            Policy {
                owner_groups: OwnerGroups::Only(vec!["2000".into()]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            2000,
            false,
            redirect,
        ),
        (
            "owner groups 2000 only: another group passes",
            Policy {
                owner_groups: OwnerGroups::Only(vec!["2000".into()]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "owner groups: an empty include list captures nothing",
            Policy {
                owner_groups: OwnerGroups::Only(vec![]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            pass,
        ),
        (
            "owner groups all but 2000: group 2000 passes",
            Policy {
                owner_groups: OwnerGroups::AllExcept(vec!["3000".into(), "2000".into()]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            2000,
            false,
            pass,
        ),
        (
            "owner groups all but 2000: another group is captured",
            Policy {
                owner_groups: OwnerGroups::AllExcept(vec!["2000".into()]),
                ..all.clone()
            },
            at(p2, 80),
            APP,
            APP,
            false,
            redirect,
        ),
        (
            "owner groups come after the proxy's rules: the proxy to its own pod is still inbound capture",
            Policy {
                owner_groups: OwnerGroups::Only(vec!["2000".into()]),
                ..all.clone()
            },
            at(own, 80),
            1337,
            1337,
            false,
            Action::InboundCapture(15006),
        ),
    ];
    rows.into_iter()
        .map(|(name, policy, dst, uid, gid, mapped, want)| Case {
            name,
            policy,
            dst,
            uid,
            gid,
            mapped,
            want,
        })
        .collect()
}

/// Random policies and dials over `lab`'s addresses, ports and IDs, chosen
/// to reach every rule of the verdict.
pub struct Generator {
    include_pool: Vec<String>,
    exclude_pool: Vec<String>,
    dests: Vec<(IpAddr, bool)>,
    ports: [u16; 4],
    id_sets: Vec<Vec<u32>>,
    ids: [u32; 4],
}

impl Generator {
    /// Over a lab's addresses (`&Lab` or [`Addrs`]).
    pub fn new(lab: impl Into<Addrs>) -> Generator {
        let lab: Addrs = lab.into();
        let n = lab.n;
        let include_pool: Vec<String> = vec![
            format!("10.211.{n}.0/24"),
            format!("10.211.{n}.2/32"),
            format!("10.211.{n}.3/32"),
            "10.0.0.0/8".into(),
            format!("fd00:211:{n}::/64"),
            format!("fd00:211:{n}::2/128"),
            "127.0.0.0/8".into(),
        ];
        let exclude_pool: Vec<String> = vec![
            format!("10.211.{n}.3/32"),
            format!("10.211.{n}.0/25"),
            format!("fd00:211:{n}::3/128"),
            "10.0.0.0/8".into(),
            format!("10.211.{n}.1/32"),
        ];
        let dests: Vec<(IpAddr, bool)> = vec![
            (lab.v4(2), false),
            (lab.v4(3), false),
            (lab.v4(1), false),
            ("127.0.0.1".parse().unwrap(), false),
            ("127.0.0.5".parse().unwrap(), false),
            (lab.v6(2), false),
            (lab.v6(3), false),
            ("::1".parse().unwrap(), false),
            (lab.v4(2), true),
            (lab.v4(1), true),
        ];
        let ports = [80u16, 8080, 5432, 15008];
        let id_sets: Vec<Vec<u32>> = vec![
            vec![1337],
            vec![2000],
            vec![1337, 2000],
            vec![3000, 1337],
            vec![],
        ];
        let ids = [1337u32, 2000, 3000, APP];
        Generator {
            include_pool,
            exclude_pool,
            dests,
            ports,
            id_sets,
            ids,
        }
    }

    fn subset(pool: &[String], rng: &mut StdRng) -> Vec<IpNetwork> {
        pool.iter()
            .filter(|_| rng.gen_bool(0.3))
            .map(|s| net(s.clone()))
            .collect()
    }

    /// A random policy (without local addresses).
    pub fn policy(&self, rng: &mut StdRng) -> Policy {
        let include_ranges = match rng.gen_range(0..4) {
            0 => IncludeRanges::All,
            1 => IncludeRanges::List(vec![]),
            _ => IncludeRanges::List(Self::subset(&self.include_pool, rng)),
        };
        let mut proxy_uids = self.id_sets.choose(rng).unwrap().clone();
        if proxy_uids.is_empty() {
            proxy_uids = vec![1337];
        }
        Policy {
            include_ranges,
            exclude_ranges: Self::subset(&self.exclude_pool, rng),
            include_ports: self
                .ports
                .iter()
                .copied()
                .filter(|_| rng.gen_bool(0.25))
                .collect(),
            exclude_ports: self
                .ports
                .iter()
                .copied()
                .filter(|_| rng.gen_bool(0.15))
                .collect(),
            proxy_uids,
            proxy_gids: self.id_sets.choose(rng).unwrap().clone(),
            owner_groups: {
                let groups = |rng: &mut StdRng| -> Vec<String> {
                    self.ids
                        .iter()
                        .filter(|_| rng.gen_bool(0.4))
                        .map(u32::to_string)
                        .collect()
                };
                match rng.gen_range(0..5) {
                    0 => OwnerGroups::Only(groups(rng)),
                    1 => OwnerGroups::AllExcept(groups(rng)),
                    _ => OwnerGroups::default(),
                }
            },
            ..Policy::default()
        }
    }

    /// A random dial: destination, UID, GID, mapped.
    pub fn dial(&self, rng: &mut StdRng) -> (SocketAddr, u32, u32, bool) {
        let (ip, mapped) = *self.dests.choose(rng).unwrap();
        let dst = SocketAddr::new(ip, *self.ports.choose(rng).unwrap());
        (
            dst,
            *self.ids.choose(rng).unwrap(),
            *self.ids.choose(rng).unwrap(),
            mapped,
        )
    }
}

/// The seed and number of random cases: `DIVERT_TEST_SEED` and
/// `DIVERT_TEST_CASES`, or the given defaults.
pub fn seed_and_count(default_cases: usize) -> (u64, usize) {
    let seed = std::env::var("DIVERT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0d17e57);
    let cases = std::env::var("DIVERT_TEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_cases);
    (seed, cases)
}

/// What the DNS proxy (the testkit's, on 127.0.0.1/::1 port 15053 in the
/// proxy's cgroup) answers every A query with.
pub const PROXY_ANSWER: &str = "192.0.2.1";
/// What the peer's nameservers (its addresses, port 53) answer.
pub const NAMESERVER_ANSWER: &str = "192.0.2.2";
/// What the client namespace's own loopback nameserver (127.0.0.53:53, as
/// systemd-resolved's stub) answers.
pub const LOCAL_NAMESERVER_ANSWER: &str = "192.0.2.3";
/// The loopback nameserver's address.
pub const LOCAL_NAMESERVER: &str = "127.0.0.53";

/// How a DNS case asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// A connected UDP socket (`connect`, `send`, `recvfrom`): glibc, dig.
    Udp,
    /// An unconnected UDP socket (`sendto`, `recvfrom`): musl and others.
    UdpUnconnected,
    /// DNS over TCP.
    Tcp,
}

impl Ask {
    /// The testkit `dns` options for this way of asking.
    pub fn opts(self) -> &'static [&'static str] {
        match self {
            Ask::Udp => &[],
            Ask::UdpUnconnected => &["--unconnected"],
            Ask::Tcp => &["--tcp"],
        }
    }

    /// The transport the kernel judges.
    pub fn transport(self) -> divert::policy::Transport {
        match self {
            Ask::Tcp => divert::policy::Transport::Tcp,
            _ => divert::policy::Transport::Udp,
        }
    }
}

/// One DNS query under one policy, and what must happen to it.
#[derive(Clone, Debug)]
pub struct DnsCase {
    pub name: String,
    pub policy: Policy,
    pub server: SocketAddr,
    pub ask: Ask,
    /// Ask an IPv4 server as `::ffff:a.b.c.d` from an AF_INET6 socket.
    pub mapped: bool,
    pub uid: u32,
    pub want: Action,
}

/// What the testkit `dns` client prints for `case` when `action` happens:
/// the proxy's answer or the server's, and the server asked as the reply's
/// source (and peer, when connected) either way.
pub fn expected_dns(case: &DnsCase, action: Action) -> String {
    let shown = match (case.server, case.mapped) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => case.server,
    };
    let answer = match action {
        Action::Dns(_) => PROXY_ANSWER,
        _ if case.server.ip().is_loopback() => LOCAL_NAMESERVER_ANSWER,
        _ => NAMESERVER_ANSWER,
    };
    match case.ask {
        Ask::UdpUnconnected => format!("answer={answer} from={shown}"),
        _ => format!("answer={answer} from={shown} peer={shown}"),
    }
}

/// The DNS cases: four policies (nameservers v4, v6 and loopback;
/// capture-all; no DNS capture; nameservers with `-i '*'`), each asked of a
/// nameserver, of another server and of the loopback nameserver, over
/// connected and unconnected UDP and TCP, IPv4, IPv6 and mapped, by the
/// application and by the proxy. Include ranges are empty but in the last
/// policy, so TCP that DNS capture leaves alone reaches the server asked
/// (under `-i '*'`, only what DNS capture takes is asked over TCP).
pub fn dns_matrix(lab: impl Into<Addrs>) -> Vec<DnsCase> {
    use divert::policy::{DnsCapture, Nameserver};
    let lab: Addrs = lab.into();
    let local: IpAddr = LOCAL_NAMESERVER.parse().unwrap();
    let ns = |ip: IpAddr| Nameserver::from(ip);
    let servers = DnsCapture {
        capture_all: false,
        servers_v4: vec![ns(lab.v4(2)), ns(local)],
        servers_v6: vec![ns(lab.v6(2))],
    };
    let none = IncludeRanges::List(vec![]);
    let policies: [(&str, Policy); 4] = [
        (
            "nameservers",
            Policy {
                include_ranges: none.clone(),
                dns: Some(servers.clone()),
                ..Policy::default()
            },
        ),
        (
            "capture-all",
            Policy {
                include_ranges: none.clone(),
                dns: Some(DnsCapture {
                    capture_all: true,
                    servers_v4: vec![],
                    servers_v6: vec![],
                }),
                ..Policy::default()
            },
        ),
        (
            "no DNS capture",
            Policy {
                include_ranges: none,
                ..Policy::default()
            },
        ),
        (
            "nameservers, -i *",
            Policy {
                dns: Some(servers),
                ..Policy::default()
            },
        ),
    ];
    let dns = Action::Dns(15053);
    let pass = Action::PassThrough;
    let mut out = Vec::new();
    for (pname, p) in policies {
        let (capture_listed, capture_other) = match pname {
            "nameservers" | "nameservers, -i *" => (dns, pass),
            "capture-all" => (dns, dns),
            _ => (pass, pass),
        };
        let targets: [(&str, IpAddr, Action, bool); 5] = [
            ("nameserver v4", lab.v4(2), capture_listed, true),
            ("nameserver v6", lab.v6(2), capture_listed, false),
            ("other server v4", lab.v4(3), capture_other, false),
            ("other server v6", lab.v6(3), capture_other, false),
            ("loopback nameserver", local, capture_listed, false),
        ];
        for (tname, ip, want, try_mapped) in targets {
            for ask in [Ask::Udp, Ask::UdpUnconnected, Ask::Tcp] {
                // TCP to a server no DNS rule captures meets -i '*' and
                // goes to the outbound proxy: a TCP case, not a DNS one.
                if ask == Ask::Tcp && want == pass && pname == "nameservers, -i *" {
                    continue;
                }
                for mapped in [false, true] {
                    if mapped && !try_mapped {
                        continue;
                    }
                    let server = SocketAddr::new(ip, 53);
                    out.push(DnsCase {
                        name: format!(
                            "{pname}: {tname} {ask:?}{}",
                            if mapped { " mapped" } else { "" }
                        ),
                        policy: p.clone(),
                        server,
                        ask,
                        mapped,
                        uid: APP,
                        want,
                    });
                }
            }
        }
        // The proxy's own queries go where it asked.
        for ask in [Ask::Udp, Ask::Tcp] {
            out.push(DnsCase {
                name: format!("{pname}: the proxy's own {ask:?} query"),
                policy: p.clone(),
                server: SocketAddr::new(lab.v4(2), 53),
                ask,
                mapped: false,
                uid: 1337,
                want: pass,
            });
        }
    }
    out
}
