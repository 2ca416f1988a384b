//! Loading the kernel object and attaching its programs ([`Interceptor`]).

use std::{collections::BTreeMap, os::fd::AsFd};

use aya::{
    maps::Map,
    programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SockOps},
    Ebpf,
};
use divert_common::{MapKind, MapSizes, ProgramKind, Side, PROGRAMS};

use super::{Error, Maps, Result};

/// Attachments are bpf links (Linux 5.7+), which the kernel always runs
/// beside other programs (`BPF_F_ALLOW_MULTI` semantics); link_create takes
/// no attach flags, so the mode must be the flag-less one.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The kernel object built from `ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/divert"));

/// The programs and maps this process loaded ([`Interceptor::load`]):
/// attach them, read their run statistics; the maps are reached through
/// `Deref` to [`Maps`]. Dropping it detaches every attachment it made.
pub struct Interceptor {
    pub(super) ebpf: Ebpf,
    pub(super) maps: Maps,
}

impl Interceptor {
    /// [`Interceptor::load_sized`] with [`MapSizes::DEFAULT`].
    pub fn load() -> Result<Self> {
        Self::load_sized(MapSizes::DEFAULT)
    }

    /// Load and verify every program, each map made with its capacity for
    /// `sizes` ([`MapSizes::entries`]). Private to this process: nothing is
    /// pinned, and everything is released when the instance is dropped.
    ///
    /// The object's maps are declared pinned by name, so the loader needs
    /// a bpffs directory: it gets an empty one of its own, a bpffs mounted
    /// in a mount namespace of a thread made for the load (gone with the
    /// thread), so nothing of it is ever seen outside this process.
    pub fn load_sized(sizes: MapSizes) -> Result<Self> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let dir = private_bpffs().map_err(Error::PrivateBpffs)?;
                let loaded = Self::load_in(sizes, &dir);
                let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
                loaded
            })
            .join()
            .expect("the loading thread does not panic")
        })
    }

    /// Load as [`Interceptor::load_sized`] does, against the maps pinned
    /// by name in `dir` (on bpffs): a map pinned there is used as it is
    /// (the caller has checked its shape and layout), any other is made
    /// and pinned there.
    pub fn load_in(sizes: MapSizes, dir: &std::path::Path) -> Result<Self> {
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        let mut loader = aya::EbpfLoader::new();
        loader.map_pin_path(dir);
        for m in divert_common::MAPS {
            loader.set_max_entries(m.name, sizes.entries(m.name).expect("every map is sized"));
        }
        let mut ebpf = loader.load(OBJECT)?;
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
                ProgramKind::SkLookup => prog::<SkLookup>(&mut ebpf, p.name)?
                    .load()
                    .map_err(failed)?,
            }
        }
        let mut maps = BTreeMap::new();
        for m in divert_common::MAPS {
            let (name, kind) = (m.name, m.kind);
            let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
            let declared = match &map {
                Map::HashMap(_) => Some(MapKind::Hash),
                Map::LpmTrie(_) => Some(MapKind::LpmTrie),
                Map::LruHashMap(_) => Some(MapKind::LruHash),
                Map::SockHash(_) => Some(MapKind::SockHash),
                _ => None,
            };
            if declared != Some(kind) {
                return Err(Error::MapKind { map: name, kind });
            }
            let info = super::map_data(&map)
                .expect("one of our kinds")
                .info()
                .map_err(|source| Error::Map { map: name, source })?;
            let sizes = (info.key_size(), info.value_size());
            let declared = (u32::from(m.layout.key_size), u32::from(m.layout.value_size));
            if sizes != declared {
                return Err(Error::MapLayout {
                    map: name,
                    object: sizes,
                    declared,
                });
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

    /// Attach the proxy's programs (getsockopt, the capture listener's
    /// sock_ops) to the proxy's cgroup.
    pub fn attach_proxy(&mut self, cgroup: impl AsFd) -> Result<()> {
        self.attach(Side::Proxy, cgroup.as_fd())?;
        self.attach(Side::SeparateProxy, cgroup.as_fd())
    }

    /// Attach the socket lookup program (inbound capture) to the network
    /// namespace `netns` (an open `/proc/…/ns/net` or netns file), beside
    /// any other such program there. Detached when this instance is
    /// dropped, or when the namespace goes.
    pub fn attach_netns(&mut self, netns: impl AsFd) -> Result<()> {
        for p in PROGRAMS.iter().filter(|p| p.side == Side::Netns) {
            prog::<SkLookup>(&mut self.ebpf, p.name)?
                .attach(netns.as_fd())
                .map(drop)
                .map_err(|source| Error::Program {
                    program: p.name,
                    source,
                })?;
        }
        Ok(())
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
                ProgramKind::SkLookup => unreachable!("socket lookup is attached to a netns"),
            }
        }
        Ok(())
    }

    #[cfg(feature = "testing")]
    /// Each program's run count and total run time, as the kernel accounts
    /// them while a [`super::RunTimeStats`] guard is held (`bpf_prog_info.run_cnt`
    /// and `run_time_ns`; both stay 0 while no guard or
    /// `kernel.bpf_stats_enabled` is on). Sorted by program name.
    pub fn program_stats(&self) -> Result<Vec<super::ProgramStats>> {
        let mut out = Vec::new();
        for (name, program) in self.ebpf.programs() {
            let info = program.info().map_err(|source| Error::Stats {
                program: name.to_string(),
                source,
            })?;
            out.push(super::ProgramStats {
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

/// Mount an empty bpffs for this thread alone: a mount namespace of its
/// own (`unshare(CLONE_NEWNS)` unshares the calling thread's filesystem
/// context only), every mount in it made private so nothing propagates
/// back, and a new bpffs instance over the temporary directory (only this
/// thread sees it there). Returns the directory.
fn private_bpffs() -> std::io::Result<std::path::PathBuf> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let dir = std::env::temp_dir();
    mount(
        Some("bpf"),
        &dir,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )?;
    Ok(dir)
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
