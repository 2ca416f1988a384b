//! Types shared by divert's kernel programs (`divert-ebpf`) and its user-space
//! agent (`divert`).
//!
//! Every type here is `#[repr(C)]` with explicit padding so that the kernel
//! and user space agree on the layout byte for byte. Conventions, stated once
//! and repeated on each field:
//!
//! * **Addresses** are 16 bytes in network byte order. An IPv4 address is
//!   stored IPv4-mapped (`::ffff:a.b.c.d`), so one key shape serves both
//!   families and an IPv4-mapped IPv6 destination is the same key as the IPv4
//!   destination it stands for.
//! * **Ports** are in host byte order unless a field says otherwise.
//! * **Netns cookies** are the kernel's network-namespace cookie
//!   (`bpf_get_netns_cookie()`, `getsockopt(SO_NETNS_COOKIE)`), a `u64` in
//!   host byte order. A cookie is never reused while the machine is up.
//!
//! With the `user` feature each type implements `aya::Pod` so the agent can
//! read and write the maps.
#![no_std]

pub mod chain;
#[macro_use]
pub mod layout;

use layout::MapLayout;

pub use chain::Verdict;

/// Map names, as the kernel object declares them and the loader looks them up.
pub mod maps {
    /// `HashMap<u64 netns cookie, PolicyHeader>`: the meshed network namespaces.
    pub const POLICIES: &str = "POLICIES";
    /// `LpmTrie<LpmKey4, u8>`: include ranges (`-i`), IPv4.
    pub const INCLUDE_V4: &str = "INCLUDE_V4";
    /// `LpmTrie<LpmKey4, u8>`: exclude ranges (`-x`), IPv4.
    pub const EXCLUDE_V4: &str = "EXCLUDE_V4";
    /// `LpmTrie<LpmKey6, u8>`: include ranges (`-i`), IPv6.
    pub const INCLUDE_V6: &str = "INCLUDE_V6";
    /// `LpmTrie<LpmKey6, u8>`: exclude ranges (`-x`), IPv6.
    pub const EXCLUDE_V6: &str = "EXCLUDE_V6";
    /// `HashMap<PortKey, u8>`: include (`-q`) and exclude (`-o`) outbound
    /// ports, include (`-b`) and exclude (`-d`) inbound ports.
    pub const PORTS: &str = "PORTS";
    /// `HashMap<AddrKey, u8>`: the namespace's own addresses (what iptables
    /// calls `-o lo`: destinations routed over loopback).
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// `HashMap<GroupKey, u8>`: the owner-group filter's GIDs
    /// (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`); the header's
    /// [`flags::OWNER_GROUPS_ONLY`](crate::flags::OWNER_GROUPS_ONLY) or
    /// [`flags::OWNER_GROUPS_EXCEPT`](crate::flags::OWNER_GROUPS_EXCEPT) says
    /// which list they are.
    pub const OWNER_GROUPS: &str = "OWNER_GROUPS";
    /// `HashMap<AddrKey, u8>`: the nameservers whose port 53 DNS capture
    /// sends to the DNS proxy (the namespace's resolv.conf), when the
    /// header's [`flags::DNS_CAPTURE`](crate::flags::DNS_CAPTURE) is set
    /// without [`flags::DNS_CAPTURE_ALL`](crate::flags::DNS_CAPTURE_ALL).
    pub const NAMESERVERS: &str = "NAMESERVERS";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: original destination of each
    /// diverted socket, for `getpeername` and `sock_ops`.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `LruHashMap<TupleKey, BoundOrig>`: original destination by the
    /// connection the proxy accepts (client address and port, proxy port),
    /// bound to that one connection by the client's initial sequence number,
    /// for `SO_ORIGINAL_DST`.
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// `LruHashMap<u64 socket cookie, OrigDst>`: the nameserver a UDP
    /// socket's last captured DNS query was for, so its replies (from the
    /// DNS proxy) are shown as from that nameserver (`recvmsg`), and its
    /// `getpeername` too. Apart from `ORIG_BY_COOKIE` so that short-lived
    /// DNS sockets, which no close callback removes, never evict a TCP
    /// connection's entry.
    pub const DNS_ORIG: &str = "DNS_ORIG";
    /// `LruHashMap<CounterKey, CounterValue>`: connections and bytes per
    /// destination and verdict, added to atomically (one value for every
    /// CPU, so its memory does not grow with the node's CPUs).
    pub const COUNTERS: &str = "COUNTERS";
    /// `HashMap<[u8; 16] address, u64 netns cookie>`: the namespace each
    /// address belongs to, for the namespaces with inbound capture (socket
    /// lookup programs cannot read a netns cookie: an inbound connection's
    /// namespace is the one that owns its destination address).
    pub const INBOUND_NETNS: &str = "INBOUND_NETNS";
    /// `SockHash<ListenerKey>`: each namespace's inbound capture listener
    /// (the socket listening on its `-z` port), per address family; the
    /// socket lookup program hands captured inbound connections to it.
    pub const LISTENERS: &str = "LISTENERS";
    /// `LruHashMap<TupleKey, OrigDst>`: the inbound connections handed to
    /// the capture listener, by client address and port and the port the
    /// client dialled (the accepted socket's local port), for
    /// `SO_ORIGINAL_DST`.
    pub const INBOUND_ORIG: &str = "INBOUND_ORIG";
    /// `HashMap<u64 netns cookie, PodName>`: which Kubernetes pod a registered
    /// namespace is, written by the daemon's pod watch. No program reads it;
    /// it lives in the object so it is pinned, and survives, with the rest.
    pub const PODS: &str = "PODS";
    /// `HashMap<u32 map id, MapLayout>`: the layout of each pinned map's
    /// keys and values as the build that made the map declared them
    /// ([`layout`](crate::layout)). No program reads it; the daemon writes
    /// it when it pins a map and reads it when it takes over another
    /// build's pins. Its own layout never changes.
    pub const LAYOUTS: &str = "LAYOUTS";
}

/// The kind of a map, as the kernel object declares it (`BPF_MAP_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_LPM_TRIE`.
    LpmTrie,
    /// `BPF_MAP_TYPE_LRU_HASH`.
    LruHash,
    /// `BPF_MAP_TYPE_SOCKHASH`.
    SockHash,
}

/// Who writes a map, which decides how its entries are carried over to a
/// map of another layout or size when a daemon takes over another build's
/// pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// User space (the daemon) writes, the programs read: policies, ranges,
    /// ports, addresses, pods. Copied and converted before the programs
    /// switch, so the old ones decide until the new map is complete.
    UserSpace,
    /// The programs write: original destinations. Copied before the
    /// switch, and what the old programs added meanwhile copied after it.
    Programs,
    /// The programs add to the values: counters. Added into the new map
    /// after the switch, once the old programs no longer write.
    ProgramsAdding,
    /// A socket hash, which holds sockets: user space cannot read them
    /// out, so each is found again as a registration finds it (the
    /// namespace entered, the socket taken from the process that holds
    /// it) before the switch, and once more after it.
    Sockets,
}

/// One map of the object: its name, kind, who writes it, and the layout of
/// its keys and values ([`layout`]), which the daemon records beside the
/// pinned map so another build can carry its entries over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: &'static str,
    pub kind: MapKind,
    pub layout: Layout,
    pub writer: Writer,
}

const fn map(name: &'static str, kind: MapKind, layout: Layout) -> MapDef {
    let writer = match kind {
        MapKind::SockHash => Writer::Sockets,
        MapKind::LruHash => Writer::Programs,
        MapKind::Hash | MapKind::LpmTrie => Writer::UserSpace,
    };
    MapDef {
        name,
        kind,
        layout,
        writer,
    }
}

const fn layout(
    key: &'static [Field],
    key_size: usize,
    value: &'static [Field],
    value_size: usize,
) -> Layout {
    Layout {
        key_size: key_size as u16,
        key,
        value_size: value_size as u16,
        value,
    }
}

use core::mem::size_of;
use layout::{whole, Field, Layout};

/// An LPM trie's key: the kernel's 4-byte prefix length, then the data.
const PREFIX_LEN: Field = Field {
    name: "prefix_len",
    offset: 0,
    size: 4,
};
const LPM_KEY4: [Field; 3] = {
    let f = fields!(LpmKey4 { netns_cookie, addr } + 4);
    [PREFIX_LEN, f[0], f[1]]
};
const LPM_KEY6: [Field; 3] = {
    let f = fields!(LpmKey6 { netns_cookie, addr } + 4);
    [PREFIX_LEN, f[0], f[1]]
};
/// The value of the range, port, address and group maps: 1, "present".
const PRESENT: [Field; 1] = whole("present", 1);
const NETNS_COOKIE: [Field; 1] = whole("netns_cookie", 8);
const SOCKET_COOKIE: [Field; 1] = whole("socket_cookie", 8);
const POLICY_HEADER: &[Field] = fields!(PolicyHeader {
    flags,
    proxy_port,
    inbound_capture_port,
    inbound_tunnel_port,
    proxy_uid_count,
    proxy_gid_count,
    registered_by,
    _pad,
    proxy_uids,
    proxy_gids,
    registered_at_unix_ns,
});
const PORT_KEY: &[Field] = fields!(PortKey {
    netns_cookie,
    port,
    list,
    _pad
});
const ADDR_KEY: &[Field] = fields!(AddrKey { netns_cookie, addr });
const GROUP_KEY: &[Field] = fields!(GroupKey {
    netns_cookie,
    gid,
    _pad
});
const ORIG_DST: &[Field] = fields!(OrigDst {
    addr,
    port,
    is_v4,
    verdict,
    _pad
});
const TUPLE_KEY: &[Field] = fields!(TupleKey {
    netns_cookie,
    addr,
    port,
    proxy_port,
    _pad
});
const LPM4: Layout = layout(&LPM_KEY4, 4 + size_of::<LpmKey4>(), &PRESENT, 1);
const LPM6: Layout = layout(&LPM_KEY6, 4 + size_of::<LpmKey6>(), &PRESENT, 1);

/// Every map of the object with its kind and layout, in the order the
/// loader takes, pins and adopts them (`divert-ebpf`'s `maps` module
/// declares each with this kind, key and value).
pub const MAPS: [MapDef; 18] = [
    map(
        maps::POLICIES,
        MapKind::Hash,
        layout(&NETNS_COOKIE, 8, POLICY_HEADER, size_of::<PolicyHeader>()),
    ),
    map(maps::INCLUDE_V4, MapKind::LpmTrie, LPM4),
    map(maps::EXCLUDE_V4, MapKind::LpmTrie, LPM4),
    map(maps::INCLUDE_V6, MapKind::LpmTrie, LPM6),
    map(maps::EXCLUDE_V6, MapKind::LpmTrie, LPM6),
    map(
        maps::PORTS,
        MapKind::Hash,
        layout(PORT_KEY, size_of::<PortKey>(), &PRESENT, 1),
    ),
    map(
        maps::LOCAL_ADDRS,
        MapKind::Hash,
        layout(ADDR_KEY, size_of::<AddrKey>(), &PRESENT, 1),
    ),
    map(
        maps::OWNER_GROUPS,
        MapKind::Hash,
        layout(GROUP_KEY, size_of::<GroupKey>(), &PRESENT, 1),
    ),
    map(
        maps::NAMESERVERS,
        MapKind::Hash,
        layout(ADDR_KEY, size_of::<AddrKey>(), &PRESENT, 1),
    ),
    map(
        maps::ORIG_BY_COOKIE,
        MapKind::LruHash,
        layout(&SOCKET_COOKIE, 8, ORIG_DST, size_of::<OrigDst>()),
    ),
    map(
        maps::ORIG_BY_TUPLE,
        MapKind::LruHash,
        layout(
            TUPLE_KEY,
            size_of::<TupleKey>(),
            fields!(BoundOrig {
                orig,
                client_isn,
                established,
                _pad
            }),
            size_of::<BoundOrig>(),
        ),
    ),
    map(
        maps::DNS_ORIG,
        MapKind::LruHash,
        layout(&SOCKET_COOKIE, 8, ORIG_DST, size_of::<OrigDst>()),
    ),
    MapDef {
        writer: Writer::ProgramsAdding,
        ..map(
            maps::COUNTERS,
            MapKind::LruHash,
            layout(
                fields!(CounterKey {
                    netns_cookie,
                    addr,
                    port,
                    verdict,
                    _pad
                }),
                size_of::<CounterKey>(),
                fields!(CounterValue {
                    connections,
                    bytes_sent,
                    bytes_received
                }),
                size_of::<CounterValue>(),
            ),
        )
    },
    map(
        maps::PODS,
        MapKind::Hash,
        layout(
            &NETNS_COOKIE,
            8,
            fields!(PodName { namespace, name }),
            size_of::<PodName>(),
        ),
    ),
    map(
        maps::INBOUND_NETNS,
        MapKind::Hash,
        layout(&whole("addr", 16), 16, &NETNS_COOKIE, 8),
    ),
    map(
        maps::LISTENERS,
        MapKind::SockHash,
        layout(
            fields!(ListenerKey {
                netns_cookie,
                family,
                _pad
            }),
            size_of::<ListenerKey>(),
            &whole("socket", 4),
            4,
        ),
    ),
    map(
        maps::INBOUND_ORIG,
        MapKind::LruHash,
        layout(
            TUPLE_KEY,
            size_of::<TupleKey>(),
            ORIG_DST,
            size_of::<OrigDst>(),
        ),
    ),
    map(
        maps::LAYOUTS,
        MapKind::Hash,
        layout(
            &whole("map_id", 4),
            4,
            fields!(MapLayout {
                name,
                key_size,
                value_size,
                field_count,
                _pad,
                fields
            }),
            size_of::<MapLayout>(),
        ),
    ),
];

/// The [`MapDef`] of the map named `name`, `None` for a name that is not
/// one of [`MAPS`].
pub fn map_def(name: &str) -> Option<&'static MapDef> {
    MAPS.iter().find(|m| m.name == name)
}

/// Program names (the Rust function names in `divert-ebpf`).
pub mod programs {
    pub const CONNECT4: &str = "divert_connect4";
    pub const CONNECT6: &str = "divert_connect6";
    pub const SOCK_OPS: &str = "divert_sock_ops";
    pub const GETSOCKOPT: &str = "divert_getsockopt";
    pub const GETPEERNAME4: &str = "divert_getpeername4";
    pub const GETPEERNAME6: &str = "divert_getpeername6";
    pub const SENDMSG4: &str = "divert_sendmsg4";
    pub const SENDMSG6: &str = "divert_sendmsg6";
    pub const RECVMSG4: &str = "divert_recvmsg4";
    pub const RECVMSG6: &str = "divert_recvmsg6";
    pub const LISTEN: &str = "divert_listen";
    pub const SK_LOOKUP: &str = "divert_sk_lookup";
}

/// The kind of a kernel program, which decides how it is loaded and
/// attached (aya's `CgroupSockAddr`, `SockOps`, `CgroupSockopt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
    CgroupSockAddr,
    /// `BPF_PROG_TYPE_SOCK_OPS`.
    SockOps,
    /// `BPF_PROG_TYPE_CGROUP_SOCKOPT`.
    CgroupSockopt,
    /// `BPF_PROG_TYPE_SK_LOOKUP`, attached to a network namespace.
    SkLookup,
}

/// Where a program is attached: the workload's cgroup (its connects are
/// judged), the proxy's (its `getsockopt` is answered) — the node daemon
/// attaches both at the cgroup root — or each meshed network namespace
/// with inbound capture (socket lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Workload,
    Proxy,
    /// The proxy's cgroup only when it is not the workload's: what the
    /// workload side's programs also do there (recording the capture
    /// listener). The node daemon, which attaches both sides at one
    /// cgroup, leaves it out, so no socket pays for it twice.
    SeparateProxy,
    Netns,
}

/// One kernel program: its name in the object, kind, attach type (uapi
/// `enum bpf_attach_type`) and the side it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    pub kind: ProgramKind,
    /// uapi `enum bpf_attach_type`, as `BPF_LINK_CREATE` and
    /// `bpf_link_info.cgroup.attach_type` spell it.
    pub attach_type: u32,
    pub side: Side,
}

/// Every program of the object, in the order they are loaded, attached and
/// pinned. Loading, attaching, pinning and adopting all read this table.
pub const PROGRAMS: [Program; 12] = [
    Program {
        name: programs::CONNECT4,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 10, // BPF_CGROUP_INET4_CONNECT
        side: Side::Workload,
    },
    Program {
        name: programs::CONNECT6,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 11, // BPF_CGROUP_INET6_CONNECT
        side: Side::Workload,
    },
    Program {
        name: programs::GETPEERNAME4,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 29, // BPF_CGROUP_INET4_GETPEERNAME
        side: Side::Workload,
    },
    Program {
        name: programs::GETPEERNAME6,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 30, // BPF_CGROUP_INET6_GETPEERNAME
        side: Side::Workload,
    },
    Program {
        name: programs::SENDMSG4,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 14, // BPF_CGROUP_UDP4_SENDMSG
        side: Side::Workload,
    },
    Program {
        name: programs::SENDMSG6,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 15, // BPF_CGROUP_UDP6_SENDMSG
        side: Side::Workload,
    },
    Program {
        name: programs::RECVMSG4,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 19, // BPF_CGROUP_UDP4_RECVMSG
        side: Side::Workload,
    },
    Program {
        name: programs::RECVMSG6,
        kind: ProgramKind::CgroupSockAddr,
        attach_type: 20, // BPF_CGROUP_UDP6_RECVMSG
        side: Side::Workload,
    },
    Program {
        name: programs::SOCK_OPS,
        kind: ProgramKind::SockOps,
        attach_type: 3, // BPF_CGROUP_SOCK_OPS
        side: Side::Workload,
    },
    Program {
        name: programs::GETSOCKOPT,
        kind: ProgramKind::CgroupSockopt,
        attach_type: 21, // BPF_CGROUP_GETSOCKOPT
        side: Side::Proxy,
    },
    Program {
        name: programs::LISTEN,
        kind: ProgramKind::SockOps,
        attach_type: 3, // BPF_CGROUP_SOCK_OPS
        side: Side::SeparateProxy,
    },
    Program {
        name: programs::SK_LOOKUP,
        kind: ProgramKind::SkLookup,
        attach_type: 36, // BPF_SK_LOOKUP
        side: Side::Netns,
    },
];

/// Limits of one policy, in entries.
pub mod limits {
    /// Proxy UIDs and, separately, proxy GIDs per policy.
    pub const MAX_PROXY_IDS: usize = 8;
    /// Nameservers per policy (a resolv.conf names three that glibc uses;
    /// istio-iptables captures every one it names, up to this many here).
    pub const MAX_NAMESERVERS: usize = 16;
    /// Owner-group GIDs per policy (istio-iptables' limit on an include
    /// list, `maxOwnerGroupsInclude`; the kernel holds an exclude list to
    /// it too).
    pub const MAX_OWNER_GROUPS: usize = 64;
}

/// How large the maps are made: every map's capacity follows from the
/// node's two figures (`divert daemon --max-pods --max-connections`). The
/// kernel object declares [`MapSizes::DEFAULT`]'s; the loader sets every
/// map to [`MapSizes::entries`] of the sizes it is given.
///
/// Maps written only by user space (policies, ranges, ports, addresses)
/// are not preallocated: they cost what they hold, plus a bucket array for
/// the hash maps. The LRU maps the programs write (original destinations,
/// counters) must be preallocated by the kernel: they are the memory a
/// node pays up front, and they follow `max_connections` and `max_pods`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Registered network namespaces (pods) on the node: the kubelet's
    /// `maxPods`.
    pub max_pods: u32,
    /// Diverted TCP connections open at once on the node (each holds an
    /// entry in `ORIG_BY_COOKIE` and `ORIG_BY_TUPLE` until it closes; past
    /// this, the least recently used are evicted).
    pub max_connections: u32,
}

impl MapSizes {
    /// Kubernetes' default `maxPods` (110) and 65,536 connections.
    pub const DEFAULT: MapSizes = MapSizes {
        max_pods: 110,
        max_connections: 65_536,
    };
    /// Bounds of `max_pods`.
    pub const PODS_RANGE: (u32, u32) = (1, 4_096);
    /// Bounds of `max_connections`.
    pub const CONNECTIONS_RANGE: (u32, u32) = (1_024, 16_777_216);

    /// `POLICIES` and `PODS`: one entry per namespace.
    pub const fn policies(&self) -> u32 {
        self.max_pods
    }
    /// `LISTENERS`: a capture listener per family per namespace.
    pub const fn listeners(&self) -> u32 {
        2 * self.max_pods
    }
    /// `LOCAL_ADDRS` and `INBOUND_NETNS`: 16 own addresses per namespace.
    pub const fn local_addrs(&self) -> u32 {
        16 * self.max_pods
    }
    /// `PORTS`: include plus exclude ports, 64 per namespace on average
    /// (Istio's defaults write four).
    pub const fn ports(&self) -> u32 {
        64 * self.max_pods
    }
    /// Each LPM trie (one per list and family): 1,024 prefixes per
    /// namespace on average, and at least 131,072 (a mesh-wide list of
    /// thousands of ranges on a small node). Tries are never preallocated.
    pub const fn ranges(&self) -> u32 {
        let n = 1_024 * self.max_pods;
        if n < 131_072 {
            131_072
        } else {
            n
        }
    }
    /// `OWNER_GROUPS`: 16 GIDs per namespace on average (one namespace
    /// may have up to [`limits::MAX_OWNER_GROUPS`] in each list).
    pub const fn owner_groups(&self) -> u32 {
        16 * self.max_pods
    }
    /// `NAMESERVERS`: every namespace's nameservers.
    pub const fn nameservers(&self) -> u32 {
        limits::MAX_NAMESERVERS as u32 * self.max_pods
    }
    /// `ORIG_BY_COOKIE` and `ORIG_BY_TUPLE` (LRU): the open diverted
    /// connections.
    pub const fn orig(&self) -> u32 {
        self.max_connections
    }
    /// `INBOUND_ORIG` (LRU): captured inbound connections until the proxy
    /// asks for their destination, as it accepts them; a quarter of
    /// `max_connections`.
    pub const fn inbound_orig(&self) -> u32 {
        self.max_connections / 4
    }
    /// `DNS_ORIG` (LRU): UDP sockets with a captured query, an eighth of
    /// `max_connections` (an entry is needed until the answer is read, a
    /// lookup's time; nothing frees it but the LRU).
    pub const fn dns_orig(&self) -> u32 {
        self.max_connections / 8
    }
    /// `COUNTERS` (LRU): (namespace, destination, port, verdict) series,
    /// 64 per namespace and at least 16,384.
    pub const fn counters(&self) -> u32 {
        let n = 64 * self.max_pods;
        if n < 16_384 {
            16_384
        } else {
            n
        }
    }

    /// The capacity of the map named `map` (one of [`MAPS`]), `None` for a
    /// name that is not one.
    pub fn entries(&self, map: &str) -> Option<u32> {
        Some(match map {
            maps::POLICIES | maps::PODS => self.policies(),
            maps::INCLUDE_V4 | maps::EXCLUDE_V4 | maps::INCLUDE_V6 | maps::EXCLUDE_V6 => {
                self.ranges()
            }
            maps::PORTS => self.ports(),
            maps::LOCAL_ADDRS | maps::INBOUND_NETNS => self.local_addrs(),
            maps::OWNER_GROUPS => self.owner_groups(),
            maps::NAMESERVERS => self.nameservers(),
            maps::ORIG_BY_COOKIE | maps::ORIG_BY_TUPLE => self.orig(),
            maps::DNS_ORIG => self.dns_orig(),
            maps::COUNTERS => self.counters(),
            maps::LISTENERS => self.listeners(),
            maps::INBOUND_ORIG => self.inbound_orig(),
            maps::LAYOUTS => layout::MAX_MAPS,
            _ => return None,
        })
    }
}

/// Bits of [`PolicyHeader::flags`].
pub mod flags {
    /// `-i '*'`: every destination not excluded is redirected.
    pub const INCLUDE_ALL: u32 = 1 << 0;
    /// An include range's network address is a loopback address; istio-iptables
    /// then omits its `-o lo -m owner ! --uid-owner` RETURN rules.
    pub const INCLUDE_HAS_LOOPBACK: u32 = 1 << 1;
    /// At least one `-o` port: look the port up in `PORTS`.
    pub const HAS_EXCLUDE_PORTS: u32 = 1 << 2;
    /// At least one `-q` port.
    pub const HAS_INCLUDE_PORTS: u32 = 1 << 3;
    pub const HAS_INCLUDE_V4: u32 = 1 << 4;
    pub const HAS_EXCLUDE_V4: u32 = 1 << 5;
    pub const HAS_INCLUDE_V6: u32 = 1 << 6;
    pub const HAS_EXCLUDE_V6: u32 = 1 << 7;
    /// At least one own address is in `LOCAL_ADDRS`.
    pub const HAS_LOCAL_ADDRS: u32 = 1 << 8;
    /// An owner-group include list (`ISTIO_OUTBOUND_OWNER_GROUPS` other than
    /// `*`): a connect whose GID is not in `OWNER_GROUPS` passes through.
    pub const OWNER_GROUPS_ONLY: u32 = 1 << 9;
    /// An owner-group exclude list (`ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`,
    /// non-empty): a connect whose GID is in `OWNER_GROUPS` passes through.
    pub const OWNER_GROUPS_EXCEPT: u32 = 1 << 10;
    /// Inbound capture of every port (`-b '*'`) but the
    /// [`port_list::INBOUND_EXCLUDE`](crate::port_list::INBOUND_EXCLUDE)
    /// ones (`-d`).
    pub const INBOUND_ALL: u32 = 1 << 11;
    /// Inbound capture of the
    /// [`port_list::INBOUND_INCLUDE`](crate::port_list::INBOUND_INCLUDE)
    /// ports only (`-b` a list).
    pub const INBOUND_LIST: u32 = 1 << 12;
    /// DNS capture (`--redirect-dns`, `ISTIO_META_DNS_CAPTURE`): TCP and
    /// UDP to port 53 of a nameserver in `NAMESERVERS` go to the DNS proxy.
    pub const DNS_CAPTURE: u32 = 1 << 13;
    /// With [`DNS_CAPTURE`]: port 53 of every destination
    /// (`--capture-all-dns`), `NAMESERVERS` unused.
    pub const DNS_CAPTURE_ALL: u32 = 1 << 14;
}

/// The DNS port, which DNS capture matches (istio-iptables' `--dport 53`).
pub const DNS_PORT: u16 = 53;

/// The port istio-agent's DNS proxy listens on (127.0.0.1 and ::1), where
/// DNS capture sends port 53 (istio's `IstioAgentDNSListenerPort`, fixed:
/// istio-iptables has no flag for it).
pub const DNS_PROXY_PORT: u16 = 15053;

/// Who registered a policy, as stored in [`PolicyHeader::registered_by`]
/// (`as u8`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "user",
    derive(serde::Serialize),
    serde(rename_all = "snake_case")
)]
pub enum RegisteredBy {
    /// Not recorded.
    Unknown = 0,
    /// `divert init` in the pod, through the daemon's socket.
    Init = 1,
    /// The daemon's Kubernetes pod watch (`divert daemon --kubernetes`).
    Kubernetes = 2,
    /// `divert run`, for the namespace it runs in.
    Run = 3,
    /// `divert-cni`, the chained CNI plugin, through the daemon's socket.
    Cni = 4,
}

impl RegisteredBy {
    /// The value stored as `code`; an unknown code reads as `Unknown`.
    pub const fn from_code(code: u8) -> RegisteredBy {
        match code {
            1 => RegisteredBy::Init,
            2 => RegisteredBy::Kubernetes,
            3 => RegisteredBy::Run,
            4 => RegisteredBy::Cni,
            _ => RegisteredBy::Unknown,
        }
    }

    /// The name `divert maps` prints (`init`, `kubernetes`, `run`, `cni`,
    /// `unknown`).
    pub const fn name(self) -> &'static str {
        match self {
            RegisteredBy::Unknown => "unknown",
            RegisteredBy::Init => "init",
            RegisteredBy::Kubernetes => "kubernetes",
            RegisteredBy::Run => "run",
            RegisteredBy::Cni => "cni",
        }
    }
}

/// `PortKey::list` values.
pub mod port_list {
    /// `-o`, `excludeOutboundPorts`.
    pub const EXCLUDE: u8 = 0;
    /// `-q`, `includeOutboundPorts`.
    pub const INCLUDE: u8 = 1;
    /// `-b` as a list, `includeInboundPorts`.
    pub const INBOUND_INCLUDE: u8 = 2;
    /// `-d`, `excludeInboundPorts` (with `-b '*'`).
    pub const INBOUND_EXCLUDE: u8 = 3;
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` / `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`.
pub const SO_ORIGINAL_DST: i32 = 80;

/// The per-namespace policy header, the value of the `POLICIES` map.
///
/// 88 bytes. Ports in host byte order; UIDs and GIDs as the kernel's
/// `bpf_get_current_uid_gid()` reports them (the caller's real IDs, in the
/// initial user namespace). The programs read everything up to
/// `proxy_gids`; `registered_by` and `registered_at_unix_ns` are for the
/// people reading the map (`divert maps`).
#[cfg(not(feature = "upgrade-test"))]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyHeader {
    /// Bits from [`flags`].
    pub flags: u32,
    /// Outbound proxy port (`-p`), host byte order.
    pub proxy_port: u16,
    /// Inbound capture port (`-z`), host byte order.
    pub inbound_capture_port: u16,
    /// Inbound tunnel port (15008) that a proxy-owned connect to a local
    /// address is never sent to the inbound capture port for.
    pub inbound_tunnel_port: u16,
    /// How many of `proxy_uids` are set.
    pub proxy_uid_count: u8,
    /// How many of `proxy_gids` are set.
    pub proxy_gid_count: u8,
    /// A [`RegisteredBy`] `as u8`.
    pub registered_by: u8,
    pub _pad: [u8; 3],
    pub proxy_uids: [u32; limits::MAX_PROXY_IDS],
    pub proxy_gids: [u32; limits::MAX_PROXY_IDS],
    /// When this header was written: nanoseconds since the Unix epoch
    /// (`CLOCK_REALTIME`), host byte order.
    pub registered_at_unix_ns: u64,
}

/// [`PolicyHeader`] as the `upgrade-test` build lays it out: the same
/// fields in another order (88 bytes), so its kernel programs differ from
/// this build's and its `POLICIES` map has another layout of the same
/// size (as has `COUNTERS`, see the other [`CounterValue`]). Only the upgrade test builds it, as "the other release" whose
/// pins this build takes over and which takes this build's over.
#[cfg(feature = "upgrade-test")]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyHeader {
    pub registered_at_unix_ns: u64,
    pub proxy_uids: [u32; limits::MAX_PROXY_IDS],
    pub proxy_gids: [u32; limits::MAX_PROXY_IDS],
    pub flags: u32,
    pub registered_by: u8,
    pub proxy_uid_count: u8,
    pub proxy_gid_count: u8,
    pub _pad: [u8; 3],
    pub inbound_tunnel_port: u16,
    pub inbound_capture_port: u16,
    pub proxy_port: u16,
}

/// Bits of an LPM trie key that hold the netns cookie: every trie key's
/// prefix length is this plus the CIDR's, so the cookie always matches
/// exactly, and a lookup's is this plus 32 (IPv4) or 128 (IPv6).
pub const COOKIE_PREFIX_BITS: u32 = 64;

/// Key data of the IPv4 LPM tries: 12 bytes, matched with prefix length
/// [`COOKIE_PREFIX_BITS`] `+ CIDR length`, so the netns cookie always
/// matches exactly.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmKey4 {
    /// Netns cookie, host byte order (matched as opaque bytes).
    pub netns_cookie: u64,
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
}

/// Key data of the IPv6 LPM tries: 24 bytes, prefix length
/// [`COOKIE_PREFIX_BITS`] `+ CIDR length`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmKey6 {
    /// Netns cookie, host byte order (matched as opaque bytes).
    pub netns_cookie: u64,
    /// IPv6 address, network byte order.
    pub addr: [u8; 16],
}

/// Key of the `PORTS` map: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns_cookie: u64,
    /// Destination port, host byte order.
    pub port: u16,
    /// One of [`port_list`].
    pub list: u8,
    pub _pad: [u8; 5],
}

/// Key of the `LISTENERS` socket hash: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    /// The listener's address family, `AF_INET` (2) or `AF_INET6` (10).
    pub family: u32,
    pub _pad: [u8; 4],
}

/// Key of the `OWNER_GROUPS` map: 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub netns_cookie: u64,
    /// A GID, as `bpf_get_current_uid_gid()` reports the caller's.
    pub gid: u32,
    pub _pad: [u8; 4],
}

/// Key of the `LOCAL_ADDRS` map: 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub netns_cookie: u64,
    /// Address, 16 bytes network byte order, IPv4 mapped.
    pub addr: [u8; 16],
}

/// The destination an application dialled: 24 bytes, the value of
/// `ORIG_BY_COOKIE` (and the first field of `ORIG_BY_TUPLE`'s [`BoundOrig`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// Address, 16 bytes network byte order, IPv4 (and IPv4-mapped) mapped.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    /// 1 when the connection was judged and diverted as IPv4 (an AF_INET
    /// socket, or an AF_INET6 socket dialling `::ffff:a.b.c.d`).
    pub is_v4: u8,
    /// A [`Verdict`] `as u8`.
    pub verdict: u8,
    pub _pad: [u8; 4],
}

/// Key of `ORIG_BY_TUPLE`: a diverted connection as the proxy sees it on
/// its accepted socket (the application's end is its peer), in the
/// namespace it belongs to. 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    /// Application's local address, 16 bytes network byte order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Application's local port, host byte order.
    pub port: u16,
    /// The loopback port the connect was rewritten to (the proxy's outbound
    /// port, or its inbound capture port), host byte order: two diverted
    /// connections may share a source port when they go to different
    /// proxy ports.
    pub proxy_port: u16,
    pub _pad: [u8; 4],
}

/// Value of `ORIG_BY_TUPLE`: 32 bytes, host byte order.
///
/// A tuple outlives its connection, and the next connection from the same
/// address and port (diverted or not) has it again. The entry is bound to
/// the one connection that filed it by the client's initial sequence
/// number, which the proxy's accepted socket knows as its peer's
/// (`rcv_nxt` minus `bytes_received` minus 1): `getsockopt` answers only a
/// socket whose number matches, so no later connection is ever told an
/// earlier one's destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundOrig {
    pub orig: OrigDst,
    /// The client's initial sequence number, once `established` is 1.
    pub client_isn: u32,
    /// 0 from `TCP_CONNECT_CB` until the client's handshake completes (the
    /// client socket is in `SYN_SENT` and holds the tuple, so only the
    /// connection it is making can match), then 1 with `client_isn` set.
    pub established: u8,
    pub _pad: [u8; 3],
}

/// Key of `COUNTERS`: 32 bytes. The value is a [`CounterValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub netns_cookie: u64,
    /// Destination as dialled, 16 bytes network byte order, IPv4 mapped.
    pub addr: [u8; 16],
    /// Destination port as dialled, host byte order.
    pub port: u16,
    /// A [`Verdict`] `as u8`.
    pub verdict: u8,
    pub _pad: [u8; 5],
}

/// Value of `COUNTERS`: 24 bytes, host byte order, each field added to
/// with an atomic add by the programs.
///
/// `connections` is added to by `connect4`/`connect6` when a connect is
/// judged; the byte counts by `sock_ops` when the connection reaches
/// `TCP_CLOSE`, so an open connection's bytes are not in them yet.
#[cfg(not(feature = "upgrade-test"))]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Connects judged.
    pub connections: u64,
    /// Payload bytes the peer acknowledged (the socket's `bytes_acked`
    /// without the SYN and FIN sequence numbers), of closed connections.
    pub bytes_sent: u64,
    /// Payload bytes received in sequence (the socket's `bytes_received`
    /// without the peer's FIN), of closed connections.
    pub bytes_received: u64,
}

/// [`CounterValue`] as the `upgrade-test` build lays it out: the same
/// counters in another order, so `COUNTERS` is carried over (added into
/// the new map after the switch) by the upgrade test.
#[cfg(feature = "upgrade-test")]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub bytes_received: u64,
    pub connections: u64,
    pub bytes_sent: u64,
}

/// Longest Kubernetes namespace name (a DNS label), in bytes.
pub const POD_NAMESPACE_LEN: usize = 64;
/// Longest Kubernetes pod name (a DNS subdomain), in bytes, rounded up.
pub const POD_NAME_LEN: usize = 256;

/// Value of `PODS`: a pod's namespace and name, UTF-8, NUL-padded. 320 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodName {
    pub namespace: [u8; POD_NAMESPACE_LEN],
    pub name: [u8; POD_NAME_LEN],
}

/// `a.b.c.d` as the 16-byte IPv4-mapped form `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn mapped_v4(v4: [u8; 4]) -> [u8; 16] {
    // As two 8-byte words: the kernel programs' LLVM turns the ten zero
    // bytes of the plain array literal into a call to a byte-wise memset.
    let low = u64::from_ne_bytes([0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]);
    // SAFETY: two u64s are 16 bytes, in memory order.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>([0, low]) }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C) (or packed) plain data with explicit
    // padding fields, valid for every bit pattern.
    unsafe impl aya::Pod for PolicyHeader {}
    unsafe impl aya::Pod for LpmKey4 {}
    unsafe impl aya::Pod for LpmKey6 {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for GroupKey {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for BoundOrig {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for PodName {}
    unsafe impl aya::Pod for MapLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PolicyHeader>(), 88);
        assert_eq!(size_of::<CounterValue>(), 24);
        assert_eq!(size_of::<PodName>(), 320);
        assert_eq!(size_of::<LpmKey4>(), 12);
        assert_eq!(size_of::<LpmKey6>(), 24);
        assert_eq!(size_of::<PortKey>(), 16);
        assert_eq!(size_of::<GroupKey>(), 16);
        assert_eq!(size_of::<ListenerKey>(), 16);
        assert_eq!(size_of::<AddrKey>(), 24);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<TupleKey>(), 32);
        assert_eq!(size_of::<BoundOrig>(), 32);
        assert_eq!(size_of::<CounterKey>(), 32);
    }

    #[test]
    fn every_map_is_sized_and_the_node_figures_bound_them() {
        for sizes in [
            MapSizes::DEFAULT,
            MapSizes {
                max_pods: MapSizes::PODS_RANGE.1,
                max_connections: MapSizes::CONNECTIONS_RANGE.1,
            },
            MapSizes {
                max_pods: MapSizes::PODS_RANGE.0,
                max_connections: MapSizes::CONNECTIONS_RANGE.0,
            },
        ] {
            for MapDef { name, .. } in MAPS {
                let n = sizes
                    .entries(name)
                    .unwrap_or_else(|| panic!("{name} is not sized"));
                assert!(n >= 1, "{name}: {n}");
            }
        }
        assert_eq!(MapSizes::DEFAULT.entries("NO_SUCH_MAP"), None);
    }

    #[test]
    fn every_layout_names_each_byte_once_and_fits_its_record() {
        for m in MAPS {
            let l = &m.layout;
            for (part, fields, size) in
                [("key", l.key, l.key_size), ("value", l.value, l.value_size)]
            {
                let mut covered = [false; 2048];
                for f in fields {
                    assert!(
                        f.name.len() <= layout::FIELD_NAME_LEN,
                        "{}: {}",
                        m.name,
                        f.name
                    );
                    for b in f.offset..f.offset + f.size {
                        assert!(b < size, "{} {part}: {} past the end", m.name, f.name);
                        assert!(
                            !covered[b as usize],
                            "{} {part}: {} overlaps",
                            m.name, f.name
                        );
                        covered[b as usize] = true;
                    }
                }
                assert!(
                    covered[..size as usize].iter().all(|&c| c),
                    "{} {part}: bytes no field names (padding must be a field)",
                    m.name
                );
            }
            let r = MapLayout::new(m.name, l);
            assert_eq!(r.map_name(), m.name);
            assert_eq!(r.field_count as usize, l.key.len() + l.value.len());
        }
        assert!(MAPS.len() * 2 <= layout::MAX_MAPS as usize);
    }

    #[test]
    fn mapped_form() {
        assert_eq!(
            mapped_v4([10, 211, 0, 2]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 10, 211, 0, 2]
        );
    }
}
