//! Loading, attaching and filling divert's kernel programs and maps (aya).
//!
//! An [`Interceptor`] is the programs this process loaded and their maps.
//! The workload side (connect4/6, sock_ops, getpeername4/6) is attached to
//! the cgroup whose processes are diverted; the proxy side (getsockopt) to
//! the cgroup the proxy runs in, so its `SO_ORIGINAL_DST` is answered.
//! Attachments are bpf links owned by the instance: dropping it detaches
//! everything. [`Maps`] is an instance's maps alone, which is all the node
//! daemon and the inspection commands hold ([`pinned`]).
//!
//! Modules, one concern each: `load` (the object, its programs, attaching),
//! this module (the [`Maps`] handle and the policy maps: register, replace,
//! unregister, read back), `encode` (a policy as the header and map keys,
//! and back), `counters`, `pods`, `diagnostics` (run-time statistics and
//! map memory, for the benchmark: feature `testing`), [`pinned`] (bpffs pins, adoption,
//! uninstall).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData, MapError},
    programs::ProgramError,
    EbpfError,
};
use divert_common::{
    maps, AddrKey, GroupKey, LpmKey4, LpmKey6, MapKind, PolicyHeader, PortKey, POD_NAMESPACE_LEN,
    POD_NAME_LEN,
};

use crate::policy::{canonical, Policy};

mod counters;
#[cfg(feature = "testing")]
mod diagnostics;
mod encode;
mod listeners;
pub use listeners::find_listeners;
mod load;
pub mod pinned;
mod pods;

pub use counters::Counter;
#[cfg(feature = "testing")]
pub use diagnostics::{map_memory, MapMemory, ProgramStats, RunTimeStats};
pub use encode::{header, Entries};
use encode::{policy_from, stamped};
pub use load::Interceptor;
pub use pods::PodRef;

/// Loading, attaching or map access failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the eBPF object (is BPF available, and are we root with CAP_BPF/CAP_SYS_ADMIN?): {0}")]
    Load(#[from] EbpfError),
    #[error("the kernel refused program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {0} is full: the policy was not registered (nothing of it is left behind)")]
    Full(&'static str),
    #[error("a private bpf filesystem to load into (a mount namespace for the loading thread, and bpffs mounted in it): {0}")]
    PrivateBpffs(#[source] std::io::Error),
    #[error("eBPF map {map}: the object's key and value are {object:?} bytes, divert_common::MAPS' layout says {declared:?}")]
    MapLayout {
        map: &'static str,
        object: (u32, u32),
        declared: (u32, u32),
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(
        "eBPF map {map} is not declared as a {kind:?} in the object, as divert_common::MAPS says"
    )]
    MapKind { map: &'static str, kind: MapKind },
    #[error("reading the run statistics of program {program}: {source}")]
    Stats {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error("netns {0:#x} is already registered in this instance")]
    AlreadyRegistered(u64),
    #[error("{0} nameservers to capture DNS for: the kernel holds at most {max} per namespace", max = divert_common::limits::MAX_NAMESERVERS)]
    TooManyNameservers(usize),
    #[error("owner groups {0:?}: the kernel takes GIDs; resolve group names first (OwnerGroups::resolved)")]
    GroupName(String),
    #[error("address {addr} is netns {netns:#x}'s, which captures inbound connections too: inbound capture finds a connection's namespace by its destination, so each address must be one namespace's")]
    AddressTaken { addr: IpAddr, netns: u64 },
    #[error("pod {namespace}/{name} does not fit the PODS map (namespace at most {} bytes, name at most {} bytes)", POD_NAMESPACE_LEN - 1, POD_NAME_LEN - 1)]
    PodName { namespace: String, name: String },
}

impl Error {
    /// A failed insert because the map is full (`E2BIG` from a hash map,
    /// `ENOSPC` from an LPM trie) becomes [`Error::Full`].
    fn full(self) -> Error {
        if let Error::Map {
            map,
            source: MapError::SyscallError(ref e),
        } = self
        {
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
                return Error::Full(map);
            }
        }
        self
    }
}

type Result<T> = std::result::Result<T, Error>;

/// Who registered a namespace's policy (the header's `registered_by`).
pub use divert_common::RegisteredBy;

/// One registered namespace as the maps hold it (see [`Maps::registrations`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub netns_cookie: u64,
    /// The pod, when the daemon's pod watch recorded it in `PODS`.
    pub pod: Option<PodRef>,
    pub registered_by: RegisteredBy,
    /// When the policy header was last written; `None` when not recorded.
    pub registered_at: Option<SystemTime>,
    /// The policy, as [`Maps::policy_of`] rebuilds it.
    pub policy: Policy,
}

/// A map's data, for the kinds divert declares ([`MapKind`]).
fn map_data(m: &Map) -> Option<&MapData> {
    match m {
        Map::HashMap(d) | Map::LpmTrie(d) | Map::LruHashMap(d) | Map::SockHash(d) => Some(d),
        _ => None,
    }
}

/// Every map of the object, by name ([`divert_common::MAPS`]).
pub const MAP_NAMES: [&str; divert_common::MAPS.len()] = {
    let mut names = [""; divert_common::MAPS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = divert_common::MAPS[i].name;
        i += 1;
    }
    names
};

/// One instance's maps: every map of [`divert_common::MAPS`], from
/// [`Interceptor::load`] or opened from bpffs pins ([`pinned::open`],
/// [`pinned::open_maps`]). Policies are written through `&mut self`;
/// readers take `&self`, so a second handle on the same pins reads without
/// holding up the writer.
pub struct Maps {
    maps: BTreeMap<&'static str, Map>,
}

impl Maps {
    /// Register `policy` for the network namespace `netns_cookie`, recording
    /// who registered it and when (now) in the header.
    ///
    /// Ranges, ports and local addresses are written first and the policy
    /// header last, so the kernel never judges with half a policy. On error
    /// everything written is removed again: the namespace is either fully
    /// configured or untouched.
    pub fn register(&mut self, netns_cookie: u64, policy: &Policy, by: RegisteredBy) -> Result<()> {
        if self.policies()?.get(&netns_cookie, 0).is_ok() {
            return Err(Error::AlreadyRegistered(netns_cookie));
        }
        kernel_ready(policy)?;
        self.check_inbound_addresses(netns_cookie, policy)?;
        let written = self.write_entries(netns_cookie, policy);
        let header = stamped(header(policy), by);
        let result = written.and_then(|()| {
            self.policies()?
                .insert(netns_cookie, header, 0)
                .map_err(|source| Error::Map {
                    map: maps::POLICIES,
                    source,
                })
        });
        if result.is_err() {
            let _ = self.remove_entries(netns_cookie, policy);
        }
        result.map_err(Error::full)
    }

    /// Remove `netns_cookie`'s policy: the header first (the namespace is
    /// unmeshed at once), then its entries and its counter series.
    pub fn unregister(&mut self, netns_cookie: u64, policy: &Policy) -> Result<()> {
        match self.policies()?.remove(&netns_cookie) {
            Ok(()) => {}
            Err(e) if absent(&e) => {}
            Err(source) => {
                return Err(Error::Map {
                    map: maps::POLICIES,
                    source,
                })
            }
        }
        self.remove_entries(netns_cookie, policy)?;
        self.remove_counters(netns_cookie)
    }

    /// Inbound capture finds a connection's namespace by its destination
    /// address (`INBOUND_NETNS`), so an address must be one namespace's:
    /// refuse a policy with inbound capture whose own address another
    /// registered namespace with inbound capture has.
    fn check_inbound_addresses(&self, netns_cookie: u64, policy: &Policy) -> Result<()> {
        let owners = self.read_hash::<[u8; 16], u64>(maps::INBOUND_NETNS)?;
        for (addr, _) in Entries::of(netns_cookie, policy).inbound_netns {
            if let Ok(other) = owners.get(&addr, 0) {
                if other != netns_cookie && self.is_registered(other)? {
                    return Err(Error::AddressTaken {
                        addr: canonical(IpAddr::from(addr)),
                        netns: other,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every registered netns cookie, sorted.
    pub fn registered_cookies(&self) -> Result<Vec<u64>> {
        let mut v: Vec<u64> = self
            .read_hash::<u64, PolicyHeader>(maps::POLICIES)?
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Map {
                map: maps::POLICIES,
                source,
            })?;
        v.sort_unstable();
        Ok(v)
    }

    /// Replace `netns_cookie`'s policy make-before-break: the new entries
    /// are written beside the old ones, then the header is swapped in one
    /// map update, then the old entries the new policy does not have are
    /// removed. The namespace is never without a policy, so no connect slips
    /// through unmeshed while a policy changes; during the change a connect
    /// is judged by the old header or the new one. Not registered yet: a
    /// plain [`Maps::register`]. On error the old policy stands.
    pub fn replace(&mut self, netns_cookie: u64, policy: &Policy, by: RegisteredBy) -> Result<()> {
        if !self.is_registered(netns_cookie)? {
            return self.register(netns_cookie, policy, by);
        }
        kernel_ready(policy)?;
        self.check_inbound_addresses(netns_cookie, policy)?;
        let old = self.owned(netns_cookie)?;
        let new = Entries::of(netns_cookie, policy);
        let added = new.minus(&old);
        if let Err(e) = self.write_keys(&added) {
            let _ = self.remove_keys(&added);
            return Err(e.full());
        }
        self.policies()?
            .insert(netns_cookie, stamped(header(policy), by), 0)
            .map_err(|source| Error::Map {
                map: maps::POLICIES,
                source,
            })?;
        self.remove_keys(&old.minus(&new))
    }

    /// The outbound policy `netns_cookie` has in the maps, as the kernel
    /// judges with it: ports, UIDs and GIDs from the header, include and
    /// exclude ranges, ports and the namespace's own addresses from their
    /// maps (ranges, ports and addresses sorted). Inbound settings and
    /// interfaces are not in the maps and come back as defaults. `None`:
    /// not registered.
    pub fn policy_of(&self, netns_cookie: u64) -> Result<Option<Policy>> {
        let h = match self
            .read_hash::<u64, PolicyHeader>(maps::POLICIES)?
            .get(&netns_cookie, 0)
        {
            Ok(h) => h,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => {
                return Err(Error::Map {
                    map: maps::POLICIES,
                    source,
                })
            }
        };
        let e = self.owned(netns_cookie)?;
        Ok(Some(policy_from(&h, &e)))
    }

    /// Every registered namespace with its policy, who registered it and
    /// when, and its pod when known, sorted by netns cookie. Walks each map
    /// once (O(entries)).
    pub fn registrations(&self) -> Result<Vec<Registration>> {
        let headers: Vec<(u64, PolicyHeader)> = self
            .read_hash::<u64, PolicyHeader>(maps::POLICIES)?
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Map {
                map: maps::POLICIES,
                source,
            })?;
        let mut entries = self.entries_by_netns()?;
        let mut pods = self.pods()?;
        let mut out: Vec<Registration> = headers
            .into_iter()
            .map(|(cookie, h)| Registration {
                netns_cookie: cookie,
                pod: pods.remove(&cookie),
                registered_by: RegisteredBy::from_code(h.registered_by),
                registered_at: (h.registered_at_unix_ns != 0)
                    .then(|| UNIX_EPOCH + Duration::from_nanos(h.registered_at_unix_ns)),
                policy: policy_from(&h, &entries.remove(&cookie).unwrap_or_default()),
            })
            .collect();
        out.sort_by_key(|r| r.netns_cookie);
        Ok(out)
    }

    /// Every trie, port and address key carrying `netns_cookie`, found by
    /// walking the maps.
    fn owned(&self, netns_cookie: u64) -> Result<Entries> {
        Ok(self
            .entries_by_netns()?
            .remove(&netns_cookie)
            .unwrap_or_default())
    }

    /// Every trie, port and address key, grouped by the netns cookie it
    /// carries: one walk of each map.
    fn entries_by_netns(&self) -> Result<BTreeMap<u64, Entries>> {
        type Field<K> = fn(&mut Entries) -> &mut Vec<Key<K>>;
        fn trie_keys<K: aya::Pod>(maps: &MapsByName, name: &'static str) -> Result<Vec<Key<K>>> {
            let m = maps.get(name).ok_or(Error::MissingMap(name))?;
            let t: LpmTrie<&MapData, K, u8> =
                LpmTrie::try_from(m).map_err(|source| Error::Map { map: name, source })?;
            Ok(t.keys().filter_map(|k| k.ok()).collect())
        }
        let mut by: BTreeMap<u64, Entries> = BTreeMap::new();
        let v4: [(&'static str, Field<LpmKey4>); 2] = [
            (maps::INCLUDE_V4, |e| &mut e.include4),
            (maps::EXCLUDE_V4, |e| &mut e.exclude4),
        ];
        for (name, field) in v4 {
            for k in trie_keys::<LpmKey4>(&self.maps, name)? {
                field(by.entry(k.data().netns_cookie).or_default()).push(k);
            }
        }
        let v6: [(&'static str, Field<LpmKey6>); 2] = [
            (maps::INCLUDE_V6, |e| &mut e.include6),
            (maps::EXCLUDE_V6, |e| &mut e.exclude6),
        ];
        for (name, field) in v6 {
            for k in trie_keys::<LpmKey6>(&self.maps, name)? {
                field(by.entry(k.data().netns_cookie).or_default()).push(k);
            }
        }
        let ports = self.read_hash::<PortKey, u8>(maps::PORTS)?;
        for k in ports.keys().filter_map(|k| k.ok()) {
            by.entry(k.netns_cookie).or_default().ports.push(k);
        }
        let addrs = self.read_hash::<AddrKey, u8>(maps::LOCAL_ADDRS)?;
        for k in addrs.keys().filter_map(|k| k.ok()) {
            by.entry(k.netns_cookie).or_default().addrs.push(k);
        }
        let groups = self.read_hash::<GroupKey, u8>(maps::OWNER_GROUPS)?;
        for k in groups.keys().filter_map(|k| k.ok()) {
            by.entry(k.netns_cookie).or_default().groups.push(k);
        }
        let servers = self.read_hash::<AddrKey, u8>(maps::NAMESERVERS)?;
        for k in servers.keys().filter_map(|k| k.ok()) {
            by.entry(k.netns_cookie).or_default().nameservers.push(k);
        }
        let owners = self.read_hash::<[u8; 16], u64>(maps::INBOUND_NETNS)?;
        for (addr, netns) in owners.iter().filter_map(|e| e.ok()) {
            by.entry(netns)
                .or_default()
                .inbound_netns
                .push((addr, netns));
        }
        Ok(by)
    }

    /// Whether `netns_cookie` has a policy in this instance.
    pub fn is_registered(&self, netns_cookie: u64) -> Result<bool> {
        match self
            .read_hash::<u64, PolicyHeader>(maps::POLICIES)?
            .get(&netns_cookie, 0)
        {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(Error::Map {
                map: maps::POLICIES,
                source,
            }),
        }
    }

    /// Remove everything `netns_cookie` owns without knowing the policy it
    /// was registered with: the header first (the namespace is unmeshed at
    /// once), then every trie, port, address, pod and counter entry whose key
    /// carries the cookie, found by walking the maps (O(entries), for the daemon after
    /// a restart and for garbage collection). Returns whether a policy was
    /// registered.
    pub fn unregister_netns(&mut self, netns_cookie: u64) -> Result<bool> {
        let was = match self.policies()?.remove(&netns_cookie) {
            Ok(()) => true,
            Err(e) if absent(&e) => false,
            Err(source) => {
                return Err(Error::Map {
                    map: maps::POLICIES,
                    source,
                })
            }
        };
        let owned = self.owned(netns_cookie)?;
        self.remove_keys(&owned)?;
        self.remove_pod(netns_cookie)?;
        self.remove_counters(netns_cookie)?;
        Ok(was)
    }

    fn policies(&mut self) -> Result<HashMap<&mut MapData, u64, PolicyHeader>> {
        hash_map(&mut self.maps, maps::POLICIES)
    }

    /// `LAYOUTS`, for reading: map id → the layout its maker recorded.
    pub(crate) fn layouts(
        &self,
    ) -> Result<HashMap<&MapData, u32, divert_common::layout::MapLayout>> {
        self.read_hash(maps::LAYOUTS)
    }

    /// `LAYOUTS`, for writing.
    pub(crate) fn layouts_mut(
        &mut self,
    ) -> Result<HashMap<&mut MapData, u32, divert_common::layout::MapLayout>> {
        hash_map(&mut self.maps, maps::LAYOUTS)
    }

    /// A read-only handle on the hash map `name`: readers take `&self`.
    fn read_hash<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>> {
        let m = self.maps.get(name).ok_or(Error::MissingMap(name))?;
        HashMap::try_from(m).map_err(|source| Error::Map { map: name, source })
    }

    fn write_entries(&mut self, netns: u64, policy: &Policy) -> Result<()> {
        self.write_keys(&Entries::of(netns, policy))
    }

    fn write_keys(&mut self, e: &Entries) -> Result<()> {
        for (name, keys) in [
            (maps::INCLUDE_V4, &e.include4),
            (maps::EXCLUDE_V4, &e.exclude4),
        ] {
            let mut trie: LpmTrie<&mut MapData, LpmKey4, u8> = lpm(&mut self.maps, name)?;
            for k in keys {
                trie.insert(k, 1, 0)
                    .map_err(|source| Error::Map { map: name, source })?;
            }
        }
        for (name, keys) in [
            (maps::INCLUDE_V6, &e.include6),
            (maps::EXCLUDE_V6, &e.exclude6),
        ] {
            let mut trie: LpmTrie<&mut MapData, LpmKey6, u8> = lpm(&mut self.maps, name)?;
            for k in keys {
                trie.insert(k, 1, 0)
                    .map_err(|source| Error::Map { map: name, source })?;
            }
        }
        insert_all(
            hash_map(&mut self.maps, maps::PORTS)?,
            maps::PORTS,
            &e.ports,
        )?;
        insert_all(
            hash_map(&mut self.maps, maps::LOCAL_ADDRS)?,
            maps::LOCAL_ADDRS,
            &e.addrs,
        )?;
        insert_all(
            hash_map(&mut self.maps, maps::OWNER_GROUPS)?,
            maps::OWNER_GROUPS,
            &e.groups,
        )?;
        insert_all(
            hash_map(&mut self.maps, maps::NAMESERVERS)?,
            maps::NAMESERVERS,
            &e.nameservers,
        )?;
        let mut owners: HashMap<&mut MapData, [u8; 16], u64> =
            hash_map(&mut self.maps, maps::INBOUND_NETNS)?;
        for (addr, netns) in &e.inbound_netns {
            owners.insert(addr, netns, 0).map_err(|source| Error::Map {
                map: maps::INBOUND_NETNS,
                source,
            })?;
        }
        Ok(())
    }

    /// Remove every entry `policy` wrote for `netns`; entries already gone
    /// are fine. Tries them all and returns the first failure.
    fn remove_entries(&mut self, netns: u64, policy: &Policy) -> Result<()> {
        self.remove_keys(&Entries::of(netns, policy))
    }

    fn remove_keys(&mut self, e: &Entries) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |name: &'static str, r: std::result::Result<(), MapError>| match r {
            Ok(()) => {}
            Err(e) if absent(&e) => {}
            Err(source) => {
                first.get_or_insert(Error::Map { map: name, source });
            }
        };
        for (name, keys) in [
            (maps::INCLUDE_V4, &e.include4),
            (maps::EXCLUDE_V4, &e.exclude4),
        ] {
            let mut trie: LpmTrie<&mut MapData, LpmKey4, u8> = lpm(&mut self.maps, name)?;
            keys.iter().for_each(|k| note(name, trie.remove(k)));
        }
        for (name, keys) in [
            (maps::INCLUDE_V6, &e.include6),
            (maps::EXCLUDE_V6, &e.exclude6),
        ] {
            let mut trie: LpmTrie<&mut MapData, LpmKey6, u8> = lpm(&mut self.maps, name)?;
            keys.iter().for_each(|k| note(name, trie.remove(k)));
        }
        let mut ports: HashMap<&mut MapData, PortKey, u8> = hash_map(&mut self.maps, maps::PORTS)?;
        e.ports
            .iter()
            .for_each(|k| note(maps::PORTS, ports.remove(k)));
        let mut addrs: HashMap<&mut MapData, AddrKey, u8> =
            hash_map(&mut self.maps, maps::LOCAL_ADDRS)?;
        e.addrs
            .iter()
            .for_each(|k| note(maps::LOCAL_ADDRS, addrs.remove(k)));
        let mut groups: HashMap<&mut MapData, GroupKey, u8> =
            hash_map(&mut self.maps, maps::OWNER_GROUPS)?;
        e.groups
            .iter()
            .for_each(|k| note(maps::OWNER_GROUPS, groups.remove(k)));
        let mut servers: HashMap<&mut MapData, AddrKey, u8> =
            hash_map(&mut self.maps, maps::NAMESERVERS)?;
        e.nameservers
            .iter()
            .for_each(|k| note(maps::NAMESERVERS, servers.remove(k)));
        let mut owners: HashMap<&mut MapData, [u8; 16], u64> =
            hash_map(&mut self.maps, maps::INBOUND_NETNS)?;
        for (addr, netns) in &e.inbound_netns {
            // Only while it is still this namespace's.
            if owners.get(addr, 0).is_ok_and(|n| n == *netns) {
                note(maps::INBOUND_NETNS, owners.remove(addr));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// What the maps cannot hold however they are written: an owner group
/// given by name (the kernel compares GIDs), more nameservers than a
/// namespace may have.
fn kernel_ready(policy: &Policy) -> Result<()> {
    if policy.owner_groups.gids().is_none() {
        return Err(Error::GroupName(policy.owner_groups.groups().join(",")));
    }
    if let Some(dns) = &policy.dns {
        let count = dns.servers().count();
        if count > divert_common::limits::MAX_NAMESERVERS {
            return Err(Error::TooManyNameservers(count));
        }
    }
    Ok(())
}

fn insert_all<K: aya::Pod>(
    mut map: HashMap<&mut MapData, K, u8>,
    name: &'static str,
    keys: &[K],
) -> Result<()> {
    for k in keys {
        map.insert(k, 1, 0)
            .map_err(|source| Error::Map { map: name, source })?;
    }
    Ok(())
}

/// Whether a failed removal only says the key was not there: aya reports a
/// lookup's miss as `KeyNotFound` but a delete's as the syscall's `ENOENT`.
fn absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

type MapsByName = BTreeMap<&'static str, Map>;

fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    maps: &'a mut MapsByName,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, V>> {
    let m = maps.get_mut(name).ok_or(Error::MissingMap(name))?;
    HashMap::try_from(m).map_err(|source| Error::Map { map: name, source })
}

fn lpm<'a, K: aya::Pod>(
    maps: &'a mut MapsByName,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, u8>> {
    let m = maps.get_mut(name).ok_or(Error::MissingMap(name))?;
    LpmTrie::try_from(m).map_err(|source| Error::Map { map: name, source })
}
