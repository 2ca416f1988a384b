//! The kernel's decision without a kernel: `divert_common::chain::judge`
//! (the function the connect programs run) over a model of the maps as the
//! loader fills them (`divert::ebpf::header` and `Entries`, LPM keys
//! matched bit for bit), on every case of the Istio matrix and the random
//! generator the root tests dial for real. No root, no namespaces: it runs
//! everywhere, in milliseconds, and names the rule that decided.

use std::net::{IpAddr, SocketAddr};

use divert::{
    ebpf::{header, Entries},
    policy::{as_dialled, canonical, verdict, verdict_for, Action, Connect, Policy, Transport},
};
use divert_common::{
    chain::{self, Dst, Lookups},
    port_list, AddrKey, GroupKey, PortKey, Verdict,
};
use divert_tests::{
    cases::{dns_matrix, istio_matrix, seed_and_count, Generator, APP},
    Addrs,
};
use rand::{rngs::StdRng, SeedableRng};

/// Any netns cookie: the model holds one namespace's entries, but keys it
/// as the kernel does.
const NETNS: u64 = 0x1234_5678_9abc_def0;

/// The maps of one namespace as the loader writes them.
struct MapModel {
    entries: Entries,
}

/// Whether the first `prefix_len` bits of `key` and `lookup` agree: an LPM
/// trie's match (key data compared as bytes, most significant bit first).
fn lpm_match(prefix_len: u32, key: &[u8], lookup: &[u8]) -> bool {
    let (bytes, bits) = ((prefix_len / 8) as usize, prefix_len % 8);
    key[..bytes] == lookup[..bytes]
        && (bits == 0 || {
            let mask = 0xffu8 << (8 - bits);
            key[bytes] & mask == lookup[bytes] & mask
        })
}

fn cookie_and(addr: &[u8]) -> Vec<u8> {
    NETNS.to_ne_bytes().iter().chain(addr).copied().collect()
}

impl MapModel {
    fn port(&self, port: u16, list: u8) -> bool {
        self.entries.ports.contains(&PortKey {
            netns_cookie: NETNS,
            port,
            list,
            _pad: [0; 5],
        })
    }

    fn range(&self, dst: Dst, include: bool) -> bool {
        match dst {
            Dst::V4(a) => {
                let keys = if include {
                    &self.entries.include4
                } else {
                    &self.entries.exclude4
                };
                keys.iter().any(|k| {
                    let d = k.data();
                    lpm_match(k.prefix_len(), &cookie_and(&d.addr), &cookie_and(&a)) && {
                        d.netns_cookie
                    } == NETNS
                })
            }
            Dst::V6(a) => {
                let keys = if include {
                    &self.entries.include6
                } else {
                    &self.entries.exclude6
                };
                keys.iter().any(|k| {
                    let d = k.data();
                    lpm_match(k.prefix_len(), &cookie_and(&d.addr), &cookie_and(&a)) && {
                        d.netns_cookie
                    } == NETNS
                })
            }
        }
    }
}

impl Lookups for MapModel {
    fn exclude_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::EXCLUDE)
    }
    fn include_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::INCLUDE)
    }
    fn own_address(&mut self, dst: Dst) -> bool {
        self.entries.addrs.contains(&AddrKey {
            netns_cookie: NETNS,
            addr: dst.mapped(),
        })
    }
    fn exclude_range(&mut self, dst: Dst) -> bool {
        self.range(dst, false)
    }
    fn include_range(&mut self, dst: Dst) -> bool {
        self.range(dst, true)
    }
    fn inbound_include_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::INBOUND_INCLUDE)
    }
    fn inbound_exclude_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::INBOUND_EXCLUDE)
    }
    fn owner_group(&mut self, gid: u32) -> bool {
        self.entries.groups.contains(&GroupKey {
            netns_cookie: NETNS,
            gid,
            _pad: [0; 4],
        })
    }
    fn nameserver(&mut self, dst: Dst) -> bool {
        self.entries.nameservers.contains(&AddrKey {
            netns_cookie: NETNS,
            addr: dst.mapped(),
        })
    }
}

/// What the kernel's connect program decides for a TCP connect to `dst`
/// by `uid`/`gid` under `policy`, as the loader would have written it.
fn kernel(policy: &Policy, dst: SocketAddr, uid: u32, gid: u32) -> Action {
    kernel_for(policy, Transport::Tcp, dst, uid, gid)
}

/// [`kernel`] for either transport.
fn kernel_for(
    policy: &Policy,
    transport: Transport,
    dst: SocketAddr,
    uid: u32,
    gid: u32,
) -> Action {
    let ip = as_dialled(canonical(dst.ip()));
    let connect = chain::Connect {
        transport,
        dst: match ip {
            IpAddr::V4(a) => Dst::V4(a.octets()),
            IpAddr::V6(a) => Dst::V6(a.octets()),
        },
        port: dst.port(),
        uid,
        gid,
        src_is_passthrough: false,
    };
    let mut maps = MapModel {
        entries: Entries::of(NETNS, policy),
    };
    match chain::judge(&header(policy), &connect, &mut maps).0 {
        Verdict::PassThrough => Action::PassThrough,
        Verdict::Redirect => Action::Redirect(policy.proxy_port),
        Verdict::InboundCapture => Action::InboundCapture(policy.inbound_capture_port),
        Verdict::Dns => Action::Dns(divert::policy::DNS_PROXY_PORT),
    }
}

/// The matrix's policies as the root tests register them: with the
/// client namespace's own addresses.
fn with_own_addresses(mut p: Policy, at: Addrs) -> Policy {
    p.local_addrs = vec![at.v4(1), at.v6(1)];
    p
}

#[test]
fn the_kernel_decision_passes_the_istio_matrix() {
    let at = Addrs { n: 7 };
    let mut failures = Vec::new();
    let matrix = istio_matrix(at);
    assert!(matrix.len() > 20, "the matrix has its cases");
    for c in matrix {
        let p = with_own_addresses(c.policy.clone(), at);
        let got = kernel(&p, c.dst, c.uid, c.gid);
        if got != c.want {
            failures.push(format!(
                "{}: {} as {}/{}: the kernel's chain says {got:?}, the table {:?}",
                c.name, c.dst, c.uid, c.gid, c.want
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_kernel_decision_agrees_with_verdict_on_random_cases() {
    let at = Addrs { n: 7 };
    let (seed, cases) = seed_and_count(20_000);
    eprintln!("chain differential: {cases} cases, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let gen = Generator::new(at);
    let mut rules = std::collections::BTreeSet::new();
    for i in 0..cases {
        let p = with_own_addresses(gen.policy(&mut rng), at);
        let (dst, uid, gid, _) = gen.dial(&mut rng);
        let v = verdict(&p, dst, uid, gid);
        rules.insert(
            format!("{:?}", v.rule)
                .split('(')
                .next()
                .unwrap()
                .to_string(),
        );
        assert_eq!(
            kernel(&p, dst, uid, gid),
            v.action,
            "case {i}: {dst} as {uid}/{gid}, rule {:?}\n  policy {p:?}",
            v.rule
        );
    }
    // The generator reaches every rule but the passthrough source (which
    // needs a bound socket) and the exclude-port rule's twin.
    assert!(rules.len() >= 12, "rules reached: {rules:?}");
}

#[test]
fn an_app_connect_is_redirected_by_default() {
    // The smallest case, spelled out: a plain `divert run` policy.
    let p = Policy::default();
    let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
    assert_eq!(kernel(&p, dst, APP, APP), Action::Redirect(15001));
    assert_eq!(kernel(&p, dst, 1337, APP), Action::PassThrough);
}

#[test]
fn the_kernel_decision_passes_the_dns_matrix() {
    let at = Addrs { n: 7 };
    let mut failures = Vec::new();
    let matrix = dns_matrix(at);
    assert!(matrix.len() > 40, "the matrix has its cases");
    for c in matrix {
        let p = with_own_addresses(c.policy.clone(), at);
        let t = c.ask.transport();
        let got = kernel_for(&p, t, c.server, c.uid, c.uid);
        let reference = verdict_for(
            &p,
            &Connect {
                transport: t,
                destination: c.server,
                uid: c.uid,
                gid: c.uid,
                bound_source: None,
            },
        );
        if got != c.want || reference.action != c.want {
            failures.push(format!(
                "{}: the kernel's chain says {got:?}, verdict() {:?} ({}), the table {:?}",
                c.name, reference.action, reference.rule, c.want
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
