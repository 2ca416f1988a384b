//! The kernel's encoding of a [`Policy`]: its [`PolicyHeader`] and the map
//! entries it owns ([`Entries`]), and back (`divert maps`, `explain`).
//! Layouts are `divert_common`'s; this is the one place a policy becomes
//! map keys.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::lpm_trie::Key;
use divert_common::{
    flags, mapped_v4, port_list, AddrKey, GroupKey, LpmKey4, LpmKey6, PolicyHeader, PortKey,
    COOKIE_PREFIX_BITS,
};
use ipnetwork::IpNetwork;

use super::RegisteredBy;
use crate::policy::{
    canonical, DnsCapture, InboundPorts, IncludeRanges, Nameserver, OwnerGroups, Policy,
};

/// Every map entry (besides the header) that one namespace's policy owns.
#[derive(Default)]
pub struct Entries {
    pub include4: Vec<Key<LpmKey4>>,
    pub exclude4: Vec<Key<LpmKey4>>,
    pub include6: Vec<Key<LpmKey6>>,
    pub exclude6: Vec<Key<LpmKey6>>,
    pub ports: Vec<PortKey>,
    pub addrs: Vec<AddrKey>,
    pub groups: Vec<GroupKey>,
    /// `NAMESERVERS` entries: each nameserver DNS capture captures.
    pub nameservers: Vec<AddrKey>,
    /// `INBOUND_NETNS` entries: each own address (16 bytes, IPv4 mapped)
    /// with the namespace, when the policy captures inbound connections.
    pub inbound_netns: Vec<([u8; 16], u64)>,
}

impl Entries {
    /// The entries of `self` that `other` does not have.
    pub fn minus(&self, other: &Entries) -> Entries {
        use std::collections::HashSet;
        fn lpm_minus<K: aya::Pod>(a: &[Key<K>], b: &[Key<K>]) -> Vec<Key<K>> {
            // Compare keys as (prefix length, key bytes).
            let ident = |k: &Key<K>| {
                let d = k.data();
                // SAFETY: K is a plain-old-data map key; reading its bytes is sound.
                let bytes = unsafe {
                    std::slice::from_raw_parts(
                        (&d as *const K).cast::<u8>(),
                        std::mem::size_of::<K>(),
                    )
                }
                .to_vec();
                (k.prefix_len(), bytes)
            };
            let have: HashSet<_> = b.iter().map(ident).collect();
            a.iter()
                .filter(|k| !have.contains(&ident(k)))
                .copied()
                .collect()
        }
        fn minus<K: Copy + Eq + std::hash::Hash>(a: &[K], b: &[K]) -> Vec<K> {
            let have: HashSet<&K> = b.iter().collect();
            a.iter().filter(|k| !have.contains(k)).copied().collect()
        }
        Entries {
            include4: lpm_minus(&self.include4, &other.include4),
            exclude4: lpm_minus(&self.exclude4, &other.exclude4),
            include6: lpm_minus(&self.include6, &other.include6),
            exclude6: lpm_minus(&self.exclude6, &other.exclude6),
            ports: minus(&self.ports, &other.ports),
            addrs: minus(&self.addrs, &other.addrs),
            groups: minus(&self.groups, &other.groups),
            nameservers: minus(&self.nameservers, &other.nameservers),
            inbound_netns: minus(&self.inbound_netns, &other.inbound_netns),
        }
    }

    /// The entries `policy` owns in namespace `netns`. Owner groups are
    /// GIDs by then ([`Policy::validate`], [`OwnerGroups::resolved`]); a
    /// name has no entry ([`super::Maps::register`] refuses it).
    pub fn of(netns: u64, policy: &Policy) -> Entries {
        let port = |port, list| PortKey {
            netns_cookie: netns,
            port,
            list,
            _pad: [0; 5],
        };
        let mapped = |a: &IpAddr| match canonical(*a) {
            IpAddr::V4(v4) => mapped_v4(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        };
        let (include4, include6) = lpm_keys(netns, policy.include_ranges.cidrs());
        let (exclude4, exclude6) = lpm_keys(netns, &policy.exclude_ranges);
        Entries {
            include4,
            exclude4,
            include6,
            exclude6,
            ports: policy
                .exclude_ports
                .iter()
                .map(|&p| port(p, port_list::EXCLUDE))
                .chain(
                    policy
                        .include_ports
                        .iter()
                        .map(|&p| port(p, port_list::INCLUDE)),
                )
                .chain(
                    match &policy.inbound_ports {
                        InboundPorts::List(l) => l.as_slice(),
                        _ => &[],
                    }
                    .iter()
                    .map(|&p| port(p, port_list::INBOUND_INCLUDE)),
                )
                .chain(
                    policy
                        .inbound_exclude_ports
                        .iter()
                        .map(|&p| port(p, port_list::INBOUND_EXCLUDE)),
                )
                .collect(),
            addrs: policy
                .local_addrs
                .iter()
                .map(|a| AddrKey {
                    netns_cookie: netns,
                    addr: mapped(a),
                })
                .collect(),
            nameservers: policy
                .dns
                .iter()
                .filter(|d| !d.capture_all)
                .flat_map(|d| d.servers())
                .map(|s| AddrKey {
                    netns_cookie: netns,
                    addr: mapped(&s.addr()),
                })
                .collect(),
            // Loopback and link-local addresses are every namespace's:
            // they find none.
            inbound_netns: if policy.inbound_ports.is_none() {
                Vec::new()
            } else {
                policy
                    .local_addrs
                    .iter()
                    .filter(|a| !crate::netns::is_loopback_or_link_local(canonical(**a)))
                    .map(|a| (mapped(a), netns))
                    .collect()
            },
            groups: policy
                .owner_groups
                .groups()
                .iter()
                .filter_map(|g| g.parse().ok())
                .map(|gid| GroupKey {
                    netns_cookie: netns,
                    gid,
                    _pad: [0; 4],
                })
                .collect(),
        }
    }
}

/// LPM keys of `nets` for `netns`, by family: prefix length
/// [`COOKIE_PREFIX_BITS`] (the cookie)
/// plus the CIDR's, address masked to the network.
fn lpm_keys(netns: u64, nets: &[IpNetwork]) -> (Vec<Key<LpmKey4>>, Vec<Key<LpmKey6>>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for n in nets {
        let prefix_len = COOKIE_PREFIX_BITS + u32::from(n.prefix());
        match n {
            IpNetwork::V4(n) => v4.push(Key::new(
                prefix_len,
                LpmKey4 {
                    netns_cookie: netns,
                    addr: n.network().octets(),
                },
            )),
            IpNetwork::V6(n) => v6.push(Key::new(
                prefix_len,
                LpmKey6 {
                    netns_cookie: netns,
                    addr: n.network().octets(),
                },
            )),
        }
    }
    (v4, v6)
}

/// `h` with who registered it and the current time.
pub fn stamped(mut h: PolicyHeader, by: RegisteredBy) -> PolicyHeader {
    h.registered_by = by as u8;
    h.registered_at_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    h
}

/// The policy a header and its entries hold (see [`super::Maps::policy_of`]).
pub fn policy_from(h: &PolicyHeader, e: &Entries) -> Policy {
    let net4 = |k: &Key<LpmKey4>| {
        IpNetwork::new(
            IpAddr::from(k.data().addr),
            (k.prefix_len() - COOKIE_PREFIX_BITS) as u8,
        )
        .expect("a prefix the trie accepted")
    };
    let net6 = |k: &Key<LpmKey6>| {
        IpNetwork::new(
            IpAddr::from(k.data().addr),
            (k.prefix_len() - COOKIE_PREFIX_BITS) as u8,
        )
        .expect("a prefix the trie accepted")
    };
    let mut include: Vec<IpNetwork> = e
        .include4
        .iter()
        .map(net4)
        .chain(e.include6.iter().map(net6))
        .collect();
    let mut exclude: Vec<IpNetwork> = e
        .exclude4
        .iter()
        .map(net4)
        .chain(e.exclude6.iter().map(net6))
        .collect();
    include.sort();
    exclude.sort();
    let ports = |list: u8| {
        let mut v: Vec<u16> = e
            .ports
            .iter()
            .filter(|k| k.list == list)
            .map(|k| k.port)
            .collect();
        v.sort_unstable();
        v
    };
    let mut local_addrs: Vec<IpAddr> = e
        .addrs
        .iter()
        .map(|k| canonical(IpAddr::from(k.addr)))
        .collect();
    local_addrs.sort();
    let mut gids: Vec<u32> = e.groups.iter().map(|k| k.gid).collect();
    gids.sort_unstable();
    let gids: Vec<String> = gids.iter().map(u32::to_string).collect();
    Policy {
        proxy_port: h.proxy_port,
        inbound_capture_port: h.inbound_capture_port,
        inbound_tunnel_port: h.inbound_tunnel_port,
        proxy_uids: h.proxy_uids[..h.proxy_uid_count as usize].to_vec(),
        proxy_gids: h.proxy_gids[..h.proxy_gid_count as usize].to_vec(),
        include_ranges: if h.flags & flags::INCLUDE_ALL != 0 {
            IncludeRanges::All
        } else {
            IncludeRanges::List(include)
        },
        exclude_ranges: exclude,
        include_ports: ports(port_list::INCLUDE),
        exclude_ports: ports(port_list::EXCLUDE),
        local_addrs,
        owner_groups: if h.flags & flags::OWNER_GROUPS_ONLY != 0 {
            OwnerGroups::Only(gids)
        } else {
            OwnerGroups::AllExcept(gids)
        },
        inbound_ports: if h.flags & flags::INBOUND_ALL != 0 {
            InboundPorts::All
        } else if h.flags & flags::INBOUND_LIST != 0 {
            InboundPorts::List(ports(port_list::INBOUND_INCLUDE))
        } else {
            InboundPorts::None
        },
        inbound_exclude_ports: ports(port_list::INBOUND_EXCLUDE),
        dns: (h.flags & flags::DNS_CAPTURE != 0).then(|| {
            let mut servers: Vec<IpAddr> = e
                .nameservers
                .iter()
                .map(|k| canonical(IpAddr::from(k.addr)))
                .collect();
            servers.sort();
            let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) =
                servers.into_iter().partition(IpAddr::is_ipv4);
            DnsCapture {
                capture_all: h.flags & flags::DNS_CAPTURE_ALL != 0,
                servers_v4: v4.into_iter().map(Nameserver::from).collect(),
                servers_v6: v6.into_iter().map(Nameserver::from).collect(),
            }
        }),
    }
}

/// The kernel's policy header for `policy`.
pub fn header(policy: &Policy) -> PolicyHeader {
    let mut h = PolicyHeader {
        proxy_port: policy.proxy_port,
        inbound_capture_port: policy.inbound_capture_port,
        inbound_tunnel_port: policy.inbound_tunnel_port,
        proxy_uid_count: policy.proxy_uids.len() as u8,
        proxy_gid_count: policy.proxy_gids.len() as u8,
        ..Default::default()
    };
    h.proxy_uids[..policy.proxy_uids.len()].copy_from_slice(&policy.proxy_uids);
    h.proxy_gids[..policy.proxy_gids.len()].copy_from_slice(&policy.proxy_gids);
    let e = Entries::of(0, policy);
    for (cond, bit) in [
        (
            policy.include_ranges == IncludeRanges::All,
            flags::INCLUDE_ALL,
        ),
        (
            policy.include_ranges.has_loopback(),
            flags::INCLUDE_HAS_LOOPBACK,
        ),
        (!policy.exclude_ports.is_empty(), flags::HAS_EXCLUDE_PORTS),
        (!policy.include_ports.is_empty(), flags::HAS_INCLUDE_PORTS),
        (!e.include4.is_empty(), flags::HAS_INCLUDE_V4),
        (!e.exclude4.is_empty(), flags::HAS_EXCLUDE_V4),
        (!e.include6.is_empty(), flags::HAS_INCLUDE_V6),
        (!e.exclude6.is_empty(), flags::HAS_EXCLUDE_V6),
        (!policy.local_addrs.is_empty(), flags::HAS_LOCAL_ADDRS),
        (
            matches!(policy.owner_groups, OwnerGroups::Only(_)),
            flags::OWNER_GROUPS_ONLY,
        ),
        (
            matches!(&policy.owner_groups, OwnerGroups::AllExcept(g) if !g.is_empty()),
            flags::OWNER_GROUPS_EXCEPT,
        ),
        (
            policy.inbound_ports == InboundPorts::All,
            flags::INBOUND_ALL,
        ),
        (
            matches!(policy.inbound_ports, InboundPorts::List(_)),
            flags::INBOUND_LIST,
        ),
        (policy.dns.is_some(), flags::DNS_CAPTURE),
        (
            policy.dns.as_ref().is_some_and(|d| d.capture_all),
            flags::DNS_CAPTURE_ALL,
        ),
    ] {
        if cond {
            h.flags |= bit;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_flags_follow_the_policy() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec![
                "127.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ]),
            exclude_ranges: vec!["10.0.0.0/8".parse().unwrap()],
            include_ports: vec![80],
            proxy_uids: vec![1, 2, 3],
            proxy_gids: vec![],
            ..Policy::default()
        };
        let h = header(&p);
        assert_eq!(
            h.flags,
            flags::INCLUDE_HAS_LOOPBACK
                | flags::HAS_INCLUDE_PORTS
                | flags::HAS_INCLUDE_V4
                | flags::HAS_INCLUDE_V6
                | flags::HAS_EXCLUDE_V4
        );
        assert_eq!((h.proxy_uid_count, h.proxy_gid_count), (3, 0));
        assert_eq!(&h.proxy_uids[..4], &[1, 2, 3, 0]);
    }

    #[test]
    fn lpm_keys_mask_host_bits_and_prefix_the_cookie() {
        let p = Policy {
            include_ranges: IncludeRanges::List(vec!["10.211.9.9/16".parse().unwrap()]),
            exclude_ranges: vec!["fd00:211::1/64".parse().unwrap()],
            ..Policy::default()
        };
        let e = Entries::of(7, &p);
        assert_eq!(
            (
                e.include4.len(),
                e.exclude4.len(),
                e.include6.len(),
                e.exclude6.len()
            ),
            (1, 0, 0, 1)
        );
        assert_eq!(e.include4[0].prefix_len(), 80);
        assert_eq!(e.include4[0].data().addr, [10, 211, 0, 0]);
        assert_eq!({ e.include4[0].data().netns_cookie }, 7);
        assert_eq!(e.exclude6[0].prefix_len(), 128);
    }
}
