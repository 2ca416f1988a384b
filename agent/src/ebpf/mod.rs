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
//! Modules: [`pinned`] (bpffs pins, adoption, uninstall), `encode` (a
//! policy as the header and map keys, and back).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::AsFd,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::{
    maps::{lpm_trie::Key, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap},
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps},
    Ebpf, EbpfError,
};
use divert_common::{
    maps, AddrKey, CounterKey, CounterValue, LpmKey4, LpmKey6, MapKind, PodName, PolicyHeader,
    PortKey, ProgramKind, Side, Verdict, POD_NAMESPACE_LEN, POD_NAME_LEN, PROGRAMS,
};

use crate::policy::{canonical, Policy};

mod encode;
pub mod pinned;

pub use encode::{header, Entries};
use encode::{policy_from, stamped};

/// Attachments are bpf links (Linux 5.7+), which the kernel always runs
/// beside other programs (`BPF_F_ALLOW_MULTI` semantics); link_create takes
/// no attach flags, so the mode must be the flag-less one.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The kernel object built from `ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/divert"));

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

/// One destination's counters in one namespace, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Counter {
    pub netns_cookie: u64,
    /// Destination as dialled (IPv4-mapped shown as IPv4).
    pub destination: IpAddr,
    pub port: u16,
    /// `redirected`, `inbound_capture` or `passthrough`.
    pub verdict: &'static str,
    /// Connects judged.
    pub connections: u64,
    /// Payload bytes sent and acknowledged, of connections closed so far.
    pub bytes_sent: u64,
    /// Payload bytes received, of connections closed so far.
    pub bytes_received: u64,
}

/// Who registered a namespace's policy (the header's `registered_by`).
pub use divert_common::RegisteredBy;

/// A Kubernetes pod: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

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

/// One program's run statistics (see [`Interceptor::program_stats`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProgramStats {
    /// The program's function name in `divert-ebpf` (e.g. `divert_connect4`).
    pub name: String,
    /// Times the program ran while run-time statistics were on.
    pub run_count: u64,
    /// Total time it ran, nanoseconds, while run-time statistics were on.
    pub run_time_ns: u64,
}

/// While held, the kernel accounts every BPF program's run count and run
/// time (`BPF_ENABLE_STATS` with `BPF_STATS_RUN_TIME`, Linux 5.8+). It
/// costs two clock reads per program run, so measure latency without it.
/// Dropping the guard turns the accounting off again (unless another
/// holder, or the `kernel.bpf_stats_enabled` sysctl, keeps it on).
pub struct RunTimeStats {
    _fd: std::os::fd::OwnedFd,
}

impl RunTimeStats {
    /// Turn run-time accounting on. Errors: the kernel refused
    /// (`EPERM` without CAP_SYS_ADMIN, `EINVAL` before 5.8).
    pub fn enable() -> std::io::Result<Self> {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map_err(|e| std::io::Error::other(format!("BPF_ENABLE_STATS: {e}")))?;
        Ok(RunTimeStats { _fd: fd })
    }
}

/// Kernel memory of one BPF map held open by this process, as
/// `/proc/self/fdinfo` reports it (`memlock:`, which since Linux 6.4 is the
/// map's actual usage, `map_mem_usage`, not a bound from `max_entries`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapMemory {
    /// The map's name as the kernel holds it (at most 15 bytes).
    pub name: String,
    pub id: u32,
    pub max_entries: u32,
    /// Bytes.
    pub memlock_bytes: u64,
}

/// Every BPF map this process holds a file descriptor to, with its kernel
/// memory, sorted by name. A process that holds one [`Interceptor`] and
/// nothing else sees exactly that instance's maps. Errors: `/proc/self`
/// could not be read.
pub fn map_memory() -> std::io::Result<Vec<MapMemory>> {
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if link.as_os_str() != "anon_inode:bpf-map" {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(
            std::path::Path::new("/proc/self/fdinfo").join(entry.file_name()),
        ) else {
            continue;
        };
        let field = |key: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        let id = id as u32;
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_string))
            .unwrap_or_default();
        seen.insert(
            id,
            MapMemory {
                name,
                id,
                max_entries: field("max_entries:").unwrap_or(0) as u32,
                memlock_bytes: memlock,
            },
        );
    }
    let mut out: Vec<MapMemory> = seen.into_values().collect();
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Every map of the object, by name ([`divert_common::MAPS`]).
pub const MAP_NAMES: [&str; divert_common::MAPS.len()] = {
    let mut names = [""; divert_common::MAPS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = divert_common::MAPS[i].0;
        i += 1;
    }
    names
};

/// The programs and maps this process loaded ([`Interceptor::load`]):
/// attach them, read their run statistics; the maps are reached through
/// `Deref` to [`Maps`]. Dropping it detaches every attachment it made.
pub struct Interceptor {
    ebpf: Ebpf,
    maps: Maps,
}

/// One instance's maps: every map of [`divert_common::MAPS`], from
/// [`Interceptor::load`] or opened from bpffs pins ([`pinned::open`],
/// [`pinned::open_maps`]). Policies are written through `&mut self`;
/// readers take `&self`, so a second handle on the same pins reads without
/// holding up the writer.
pub struct Maps {
    maps: BTreeMap<&'static str, Map>,
}

impl Interceptor {
    /// Load and verify every program. Private to this process: nothing is
    /// pinned, and everything is released when the instance is dropped.
    pub fn load() -> Result<Self> {
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        let mut ebpf = Ebpf::load(OBJECT)?;
        for p in PROGRAMS {
            let failed = |source| Error::Program {
                program: p.name,
                source,
            };
            match p.kind {
                ProgramKind::CgroupSockAddr => prog::<CgroupSockAddr>(&mut ebpf, p.name)?
                    .load()
                    .map_err(failed)?,
                ProgramKind::SockOps => {
                    prog::<SockOps>(&mut ebpf, p.name)?.load().map_err(failed)?
                }
                ProgramKind::CgroupSockopt => prog::<CgroupSockopt>(&mut ebpf, p.name)?
                    .load()
                    .map_err(failed)?,
            }
        }
        let mut maps = BTreeMap::new();
        for (name, kind) in divert_common::MAPS {
            let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
            let declared = match &map {
                Map::HashMap(_) => Some(MapKind::Hash),
                Map::LpmTrie(_) => Some(MapKind::LpmTrie),
                Map::LruHashMap(_) => Some(MapKind::LruHash),
                Map::PerCpuLruHashMap(_) => Some(MapKind::LruPerCpuHash),
                _ => None,
            };
            if declared != Some(kind) {
                return Err(Error::MapKind { map: name, kind });
            }
            maps.insert(name, map);
        }
        Ok(Interceptor {
            ebpf,
            maps: Maps { maps },
        })
    }

    /// Attach the workload programs (connect4/6, sock_ops, getpeername4/6)
    /// to `cgroup` (an open cgroup v2 directory), beside any other programs
    /// attached there.
    pub fn attach_workload(&mut self, cgroup: impl AsFd) -> Result<()> {
        self.attach(Side::Workload, cgroup.as_fd())
    }

    /// Attach the getsockopt program to the proxy's cgroup.
    pub fn attach_proxy(&mut self, cgroup: impl AsFd) -> Result<()> {
        self.attach(Side::Proxy, cgroup.as_fd())
    }

    /// Attach every program of `side` in [`PROGRAMS`] to `cgroup`.
    fn attach(&mut self, side: Side, cgroup: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let ebpf = &mut self.ebpf;
        for p in PROGRAMS.iter().filter(|p| p.side == side) {
            let failed = |source| Error::Program {
                program: p.name,
                source,
            };
            match p.kind {
                ProgramKind::CgroupSockAddr => prog::<CgroupSockAddr>(ebpf, p.name)?
                    .attach(cgroup, LINK_MODE)
                    .map(drop)
                    .map_err(failed)?,
                ProgramKind::SockOps => prog::<SockOps>(ebpf, p.name)?
                    .attach(cgroup, LINK_MODE)
                    .map(drop)
                    .map_err(failed)?,
                ProgramKind::CgroupSockopt => prog::<CgroupSockopt>(ebpf, p.name)?
                    .attach(cgroup, LINK_MODE)
                    .map(drop)
                    .map_err(failed)?,
            }
        }
        Ok(())
    }

    /// Each program's run count and total run time, as the kernel accounts
    /// them while a [`RunTimeStats`] guard is held (`bpf_prog_info.run_cnt`
    /// and `run_time_ns`; both stay 0 while no guard or
    /// `kernel.bpf_stats_enabled` is on). Sorted by program name.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        let mut out = Vec::new();
        for (name, program) in self.ebpf.programs() {
            let info = program.info().map_err(|source| Error::Stats {
                program: name.to_string(),
                source,
            })?;
            out.push(ProgramStats {
                name: name.to_string(),
                run_count: info.run_count(),
                run_time_ns: info.run_time().as_nanos() as u64,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The maps alone, for a process that keeps them (the node daemon,
    /// whose programs live on through their pins and links).
    pub fn into_maps(self) -> Maps {
        self.maps
    }
}

impl std::ops::Deref for Interceptor {
    type Target = Maps;
    fn deref(&self) -> &Maps {
        &self.maps
    }
}

impl std::ops::DerefMut for Interceptor {
    fn deref_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }
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

    /// Remove every `COUNTERS` series of `netns_cookie` (a namespace that is
    /// unregistered is no longer counted; its old series would only linger
    /// until the LRU evicted them).
    fn remove_counters(&mut self, netns_cookie: u64) -> Result<()> {
        let m = self
            .maps
            .get_mut(maps::COUNTERS)
            .ok_or(Error::MissingMap(maps::COUNTERS))?;
        let mut counters: PerCpuHashMap<&mut MapData, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(m).map_err(|source| Error::Map {
                map: maps::COUNTERS,
                source,
            })?;
        let keys: Vec<CounterKey> = counters
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.netns_cookie == netns_cookie)
            .collect();
        for k in keys {
            match counters.remove(&k) {
                Ok(()) => {}
                Err(e) if absent(&e) => {}
                Err(source) => {
                    return Err(Error::Map {
                        map: maps::COUNTERS,
                        source,
                    })
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

    /// Record that `netns_cookie` is the pod `namespace`/`name` (`PODS`), for
    /// `divert maps`, `divert stats` and the metric labels. Errors:
    /// [`Error::PodName`] when a name is longer than Kubernetes allows.
    pub fn set_pod(&mut self, netns_cookie: u64, namespace: &str, name: &str) -> Result<()> {
        let too_long = || Error::PodName {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let mut v = PodName {
            namespace: [0; POD_NAMESPACE_LEN],
            name: [0; POD_NAME_LEN],
        };
        // Keep a NUL at the end of each field.
        if namespace.len() >= POD_NAMESPACE_LEN || name.len() >= POD_NAME_LEN {
            return Err(too_long());
        }
        v.namespace[..namespace.len()].copy_from_slice(namespace.as_bytes());
        v.name[..name.len()].copy_from_slice(name.as_bytes());
        let mut m: HashMap<&mut MapData, u64, PodName> = hash_map(&mut self.maps, maps::PODS)?;
        m.insert(netns_cookie, v, 0).map_err(|source| {
            Error::Map {
                map: maps::PODS,
                source,
            }
            .full()
        })
    }

    /// Forget `netns_cookie`'s pod; absent is fine.
    pub fn remove_pod(&mut self, netns_cookie: u64) -> Result<()> {
        let mut m: HashMap<&mut MapData, u64, PodName> = hash_map(&mut self.maps, maps::PODS)?;
        match m.remove(&netns_cookie) {
            Ok(()) => Ok(()),
            Err(e) if absent(&e) => Ok(()),
            Err(source) => Err(Error::Map {
                map: maps::PODS,
                source,
            }),
        }
    }

    /// Every recorded pod, by netns cookie.
    pub fn pods(&self) -> Result<BTreeMap<u64, PodRef>> {
        let m = self.read_hash::<u64, PodName>(maps::PODS)?;
        let text = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        m.iter()
            .map(|r| {
                r.map(|(cookie, v)| {
                    (
                        cookie,
                        PodRef {
                            namespace: text(&v.namespace),
                            name: text(&v.name),
                        },
                    )
                })
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| Error::Map {
                map: maps::PODS,
                source,
            })
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

    /// Per-destination counters, summed over CPUs, sorted by namespace,
    /// destination, port and verdict.
    pub fn counters(&self) -> Result<Vec<Counter>> {
        let map = self
            .maps
            .get(maps::COUNTERS)
            .ok_or(Error::MissingMap(maps::COUNTERS))?;
        let counters: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(map).map_err(|source| Error::Map {
                map: maps::COUNTERS,
                source,
            })?;
        let mut sums: BTreeMap<CounterKey, CounterValue> = BTreeMap::new();
        for entry in counters.iter() {
            let (key, per_cpu) = entry.map_err(|source| Error::Map {
                map: maps::COUNTERS,
                source,
            })?;
            let sum = sums.entry(key).or_default();
            for v in per_cpu.iter() {
                sum.connections += v.connections;
                sum.bytes_sent += v.bytes_sent;
                sum.bytes_received += v.bytes_received;
            }
        }
        Ok(sums
            .into_iter()
            .map(|(k, v)| Counter {
                netns_cookie: k.netns_cookie,
                destination: canonical(IpAddr::from(k.addr)),
                port: k.port,
                verdict: Verdict::from_code(k.verdict).name(),
                connections: v.connections,
                bytes_sent: v.bytes_sent,
                bytes_received: v.bytes_received,
            })
            .collect())
    }

    fn policies(&mut self) -> Result<HashMap<&mut MapData, u64, PolicyHeader>> {
        hash_map(&mut self.maps, maps::POLICIES)
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
        )
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
        first.map_or(Ok(()), Err)
    }
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

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(Error::Program {
        program: name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    p.try_into().map_err(|source| Error::Program {
        program: name,
        source,
    })
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
