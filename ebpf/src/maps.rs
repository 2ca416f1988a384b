//! The maps, as `divert_common::maps` names and describes them. Their
//! shapes (type, key, value, capacity, flags) are stated here once; the
//! agent reads them from the object.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::LpmTrie, HashMap, LruHashMap, LruPerCpuHashMap, SockHash},
};
use divert_common::{
    limits, AddrKey, BoundOrig, CounterKey, CounterValue, GroupKey, ListenerKey, LpmKey4, LpmKey6,
    OrigDst, PodName, PolicyHeader, PortKey, TupleKey,
};

#[map]
pub static POLICIES: HashMap<u64, PolicyHeader> =
    HashMap::with_max_entries(limits::MAX_POLICIES, 0);
#[map]
pub static INCLUDE_V4: LpmTrie<LpmKey4, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
pub static EXCLUDE_V4: LpmTrie<LpmKey4, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
pub static INCLUDE_V6: LpmTrie<LpmKey6, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
pub static EXCLUDE_V6: LpmTrie<LpmKey6, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
pub static PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(limits::MAX_PORTS, 0);
#[map]
pub static LOCAL_ADDRS: HashMap<AddrKey, u8> =
    HashMap::with_max_entries(limits::MAX_LOCAL_ADDRS, 0);
#[map]
pub static OWNER_GROUPS: HashMap<GroupKey, u8> =
    HashMap::with_max_entries(limits::MAX_OWNER_GROUP_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
pub static NAMESERVERS: HashMap<AddrKey, u8> =
    HashMap::with_max_entries(limits::MAX_NAMESERVER_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(limits::MAX_ORIG, 0);
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, BoundOrig> =
    LruHashMap::with_max_entries(limits::MAX_ORIG, 0);
#[map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(limits::MAX_DNS_ORIG, 0);
#[map]
pub static COUNTERS: LruPerCpuHashMap<CounterKey, CounterValue> =
    LruPerCpuHashMap::with_max_entries(limits::MAX_COUNTERS, 0);
#[map]
pub static PODS: HashMap<u64, PodName> =
    HashMap::with_max_entries(limits::MAX_POLICIES, BPF_F_NO_PREALLOC);
#[map]
pub static INBOUND_NETNS: HashMap<[u8; 16], u64> =
    HashMap::with_max_entries(limits::MAX_LOCAL_ADDRS, BPF_F_NO_PREALLOC);
// `static mut`: aya-ebpf's socket-lookup redirect takes `&mut self`.
#[map]
pub static mut LISTENERS: SockHash<ListenerKey> =
    SockHash::with_max_entries(2 * limits::MAX_POLICIES, 0);
#[map]
pub static INBOUND_ORIG: LruHashMap<TupleKey, OrigDst> =
    LruHashMap::with_max_entries(limits::MAX_INBOUND_ORIG, 0);
