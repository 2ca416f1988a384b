//! The maps, as `divert_common::maps` names and describes them. Their
//! shapes (type, key, value, flags) are stated here once; the agent reads
//! them from the object. Capacities are [`MapSizes::DEFAULT`]'s; the
//! loader sets each to the node's (`MapSizes::entries`).
//!
//! Every map is declared pinned by name (`LIBBPF_PIN_BY_NAME`): the loader
//! gives a directory, and a map already pinned there under its name is
//! used instead of a new one. That is how a daemon's new programs share the
//! maps of the programs they replace (`pinned` in the agent), and every
//! other load gives an empty private directory.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::LpmTrie, HashMap, LruHashMap, SockHash},
};
use divert_common::{
    layout::{MapLayout, MAX_MAPS},
    AddrKey, BoundOrig, CounterKey, CounterValue, GroupKey, ListenerKey, LpmKey4, LpmKey6,
    MapSizes, OrigDst, PodName, PolicyHeader, PortKey, TupleKey,
};

const SIZES: MapSizes = MapSizes::DEFAULT;

#[map]
pub static POLICIES: HashMap<u64, PolicyHeader> =
    HashMap::pinned(SIZES.policies(), BPF_F_NO_PREALLOC);
#[map]
pub static INCLUDE_V4: LpmTrie<LpmKey4, u8> = LpmTrie::pinned(SIZES.ranges(), BPF_F_NO_PREALLOC);
#[map]
pub static EXCLUDE_V4: LpmTrie<LpmKey4, u8> = LpmTrie::pinned(SIZES.ranges(), BPF_F_NO_PREALLOC);
#[map]
pub static INCLUDE_V6: LpmTrie<LpmKey6, u8> = LpmTrie::pinned(SIZES.ranges(), BPF_F_NO_PREALLOC);
#[map]
pub static EXCLUDE_V6: LpmTrie<LpmKey6, u8> = LpmTrie::pinned(SIZES.ranges(), BPF_F_NO_PREALLOC);
#[map]
pub static PORTS: HashMap<PortKey, u8> = HashMap::pinned(SIZES.ports(), BPF_F_NO_PREALLOC);
#[map]
pub static LOCAL_ADDRS: HashMap<AddrKey, u8> =
    HashMap::pinned(SIZES.local_addrs(), BPF_F_NO_PREALLOC);
#[map]
pub static OWNER_GROUPS: HashMap<GroupKey, u8> =
    HashMap::pinned(SIZES.owner_groups(), BPF_F_NO_PREALLOC);
#[map]
pub static NAMESERVERS: HashMap<AddrKey, u8> =
    HashMap::pinned(SIZES.nameservers(), BPF_F_NO_PREALLOC);
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(SIZES.orig(), 0);
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, BoundOrig> = LruHashMap::pinned(SIZES.orig(), 0);
#[map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(SIZES.dns_orig(), 0);
#[map]
pub static COUNTERS: LruHashMap<CounterKey, CounterValue> = LruHashMap::pinned(SIZES.counters(), 0);
#[map]
pub static PODS: HashMap<u64, PodName> = HashMap::pinned(SIZES.policies(), BPF_F_NO_PREALLOC);
#[map]
pub static INBOUND_NETNS: HashMap<[u8; 16], u64> =
    HashMap::pinned(SIZES.local_addrs(), BPF_F_NO_PREALLOC);
// `static mut`: aya-ebpf's socket-lookup redirect takes `&mut self`.
#[map]
pub static mut LISTENERS: SockHash<ListenerKey> = SockHash::pinned(SIZES.listeners(), 0);
#[map]
pub static INBOUND_ORIG: LruHashMap<TupleKey, OrigDst> =
    LruHashMap::pinned(SIZES.inbound_orig(), 0);
#[map]
pub static LAYOUTS: HashMap<u32, MapLayout> = HashMap::pinned(MAX_MAPS, BPF_F_NO_PREALLOC);
