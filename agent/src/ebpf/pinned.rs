//! The node daemon's one instance: programs, maps and cgroup links pinned in
//! bpffs so that interception outlives the daemon process (restarts, and
//! `kill -9` included), and a restart adopts what it finds instead of
//! attaching a second time.
//!
//! Layout under the bpffs directory `DIR` (default /sys/fs/bpf/divert):
//!
//! ```text
//! DIR/maps/<MAP>       every map of divert_common::maps
//! DIR/progs/<program>  every program of divert_common::programs
//! DIR/links/<program>  one bpf_link per program, attached at the cgroup root
//! ```
//!
//! Links are pinned last, so "all links pinned" means a complete install.
//! [`open`] decides from what is there:
//!
//! * no pins: load, pin maps and programs, attach at the cgroup root with
//!   `BPF_LINK_CREATE`, pin the links. Any failure removes every pin made.
//! * links pinned (all or some): adopt. Each pinned map must have the shape
//!   (type, key and value size, max entries, flags) of this build's object
//!   sized for this daemon's `MapSizes`, and each pinned program the tag (a
//!   hash of its instructions) of this build's object; each link
//!   must run its pinned program at this cgroup root. Anything else is an
//!   [`PinnedError::Incompatible`] naming the object, never silently
//!   reused. A link missing (a crash between link pins) is created again
//!   from the pinned program.
//! * pins but no link: nothing was ever attached (a crash mid-install); the
//!   pins are removed and the install starts over.
//!
//! aya 0.13 cannot pin a cgroup link (no `FdLink` from a cgroup link), so
//! links are made and pinned with the `bpf(2)` commands directly (see
//! [`sys`]).

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, MapError},
    programs::{ProgramError, ProgramInfo},
};
use divert_common::{MapKind, MapSizes, Program, Side, PROGRAMS};

use super::{Interceptor, Maps, MAP_NAMES};

/// `BPF_FS_MAGIC` from the kernel's uapi `magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Opening, adopting or removing the pinned instance failed.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a bpf filesystem and mounting one there failed: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "the pinned {object} at {path} is not this divert's: {detail}. \
         Stop the daemon that pinned it and run its `divert daemon --uninstall`, \
         or this one's with the same --bpffs-dir, then start again"
    )]
    Incompatible {
        object: String,
        path: PathBuf,
        detail: String,
    },
    #[error("pinned map {path}: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("pinned program {path}: {source}")]
    Program {
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Ebpf(#[from] super::Error),
}

type Result<T> = std::result::Result<T, PinnedError>;

/// What [`open`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Nothing was pinned: loaded, attached at the cgroup root, pinned.
    Installed,
    /// A complete or nearly complete install was found and adopted;
    /// `relinked` links were missing and made again.
    Adopted { relinked: usize },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PinnedError {
    let path = path.to_path_buf();
    move |source| PinnedError::Io { what, path, source }
}

/// Make sure `dir` exists on a bpf filesystem: create it, and mount bpffs on
/// it when it is not on one. When `dir` cannot be created because its parent
/// is an unmounted bpffs mount point (a fresh /sys/fs/bpf), mount bpffs on
/// the parent. Returns whether this call mounted anything.
pub fn ensure_bpffs(dir: &Path) -> Result<bool> {
    let on_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    let mount = |p: &Path| {
        nix::mount::mount(
            Some("bpf"),
            p,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| PinnedError::Bpffs {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut mounted = false;
    if fs::create_dir_all(dir).is_err() {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !on_bpffs(parent) {
            mount(parent)?;
            mounted = true;
        }
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    if !on_bpffs(dir) {
        mount(dir)?;
        mounted = true;
    }
    Ok(mounted)
}

fn map_data(m: &Map) -> Option<&MapData> {
    match m {
        Map::HashMap(d) | Map::LpmTrie(d) | Map::LruHashMap(d) | Map::SockHash(d) => Some(d),
        _ => None,
    }
}

/// Wrap a pinned map's data in the variant its name is declared with.
/// A pinned map's data as the [`Map`] of its kind ([`divert_common::MAPS`]).
fn typed(name: &str, d: MapData) -> Map {
    let kind = divert_common::MAPS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, k)| k)
        .expect("every map name is in divert_common::MAPS");
    match kind {
        MapKind::Hash => Map::HashMap(d),
        MapKind::LpmTrie => Map::LpmTrie(d),
        MapKind::LruHash => Map::LruHashMap(d),
        MapKind::SockHash => Map::SockHash(d),
    }
}

fn dirs(dir: &Path) -> [PathBuf; 3] {
    [dir.join("maps"), dir.join("progs"), dir.join("links")]
}

fn has_entries(p: &Path) -> bool {
    fs::read_dir(p).is_ok_and(|mut d| d.next().is_some())
}

/// Open the pinned instance under `dir` for `cgroup_root` (see the module
/// documentation for what is installed, adopted or refused).
pub fn open(dir: &Path, cgroup_root: &Path, sizes: MapSizes) -> Result<(Maps, Opened)> {
    // The cgroup first: a bad root must leave no bpffs mount behind.
    let cgroup = crate::cgroup::open(cgroup_root).map_err(|e| PinnedError::Io {
        what: "opening the cgroup root",
        path: cgroup_root.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    if ensure_bpffs(dir)? {
        tracing::warn!(dir = %dir.display(), "no bpf filesystem was mounted there: mounted one; what is pinned outlives this daemon only as long as that mount (in a container, mount the node's /sys/fs/bpf)");
    }
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    let fresh = Interceptor::load_sized(sizes)?;
    if has_entries(&links_dir) {
        let relinked = adopt_check(dir, &fresh, cgroup.as_fd(), cgroup_root)?;
        drop(fresh);
        return Ok((open_maps(dir)?, Opened::Adopted { relinked }));
    }
    if has_entries(&maps_dir) || has_entries(&progs_dir) {
        tracing::warn!(
            dir = %dir.display(),
            "pins without links (an install that did not finish): removing them and installing again"
        );
        uninstall(dir)?;
    }
    let mut fresh = fresh;
    match install(dir, &mut fresh, cgroup.as_fd()) {
        // The programs live on through their pins and links: only the maps
        // are kept.
        Ok(()) => Ok((fresh.into_maps(), Opened::Installed)),
        Err(e) => {
            let _ = uninstall(dir);
            Err(e)
        }
    }
}

fn install(dir: &Path, i: &mut Interceptor, cgroup: BorrowedFd<'_>) -> Result<()> {
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    for d in [&maps_dir, &progs_dir, &links_dir] {
        fs::create_dir_all(d).map_err(io("creating", d))?;
    }
    for (name, map) in &i.maps.maps {
        let path = maps_dir.join(name);
        map.pin(&path).map_err(|e| PinnedError::Io {
            what: "pinning map",
            path,
            source: std::io::Error::other(e),
        })?;
    }
    let ebpf = &mut i.ebpf;
    // What the daemon attaches: at the cgroup root, and per namespace.
    for Program { name, .. } in PROGRAMS.iter().filter(|p| p.side != Side::SeparateProxy) {
        let path = progs_dir.join(name);
        let p = ebpf.program_mut(name).ok_or(super::Error::Program {
            program: name,
            source: ProgramError::UnexpectedProgramType,
        })?;
        p.pin(&path).map_err(|e| PinnedError::Io {
            what: "pinning program",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
    }
    for &Program {
        name, attach_type, ..
    } in cgroup_programs()
    {
        let p = ebpf.program(name).expect("pinned above");
        let fd = p.fd().map_err(|source| PinnedError::Program {
            path: progs_dir.join(name),
            source,
        })?;
        link(fd.as_fd(), cgroup, attach_type, &links_dir.join(name))?;
    }
    Ok(())
}

fn link(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32, pin: &Path) -> Result<()> {
    let l = sys::link_create(prog, cgroup, attach_type).map_err(io("attaching", pin))?;
    sys::obj_pin(l.as_fd(), pin).map_err(io("pinning link", pin))
}

/// The pin of netns `cookie`'s socket lookup link under `dir`.
fn netns_link_pin(dir: &Path, cookie: u64) -> PathBuf {
    dir.join("links").join(format!("netns-{cookie}"))
}

/// Attach the pinned socket lookup program (inbound capture) to the
/// network namespace `netns` (cookie `cookie`), the link pinned under
/// `dir` so a daemon restart keeps it. Already attached: nothing to do.
pub fn link_netns(dir: &Path, cookie: u64, netns: BorrowedFd<'_>) -> Result<()> {
    let pin = netns_link_pin(dir, cookie);
    if pin.exists() {
        return Ok(());
    }
    for p in PROGRAMS.iter().filter(|p| p.side == Side::Netns) {
        let prog_path = dir.join("progs").join(p.name);
        let prog = sys::obj_get(&prog_path).map_err(io("opening", &prog_path))?;
        link(prog.as_fd(), netns, p.attach_type, &pin)?;
    }
    Ok(())
}

/// Detach and unpin netns `cookie`'s socket lookup link, if it has one
/// (a link whose namespace is gone was detached by the kernel already).
/// Returns whether there was one.
pub fn unlink_netns(dir: &Path, cookie: u64) -> Result<bool> {
    let pin = netns_link_pin(dir, cookie);
    if !pin.exists() {
        return Ok(false);
    }
    let l = sys::obj_get(&pin).map_err(io("opening", &pin))?;
    if let Err(e) = sys::link_detach(l.as_fd()) {
        tracing::debug!(netns_cookie = cookie, error = %e, "socket lookup link already detached");
    }
    fs::remove_file(&pin).map_err(io("unpinning", &pin))?;
    Ok(true)
}

/// Check every pin against this build's object (`fresh`) and this cgroup
/// root; relink programs whose link pin is missing. Returns how many were
/// relinked.
fn adopt_check(
    dir: &Path,
    fresh: &Interceptor,
    cgroup: BorrowedFd<'_>,
    cgroup_root: &Path,
) -> Result<usize> {
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    let incompatible = |object: String, path: &Path, detail: String| PinnedError::Incompatible {
        object,
        path: path.to_path_buf(),
        detail,
    };
    for name in MAP_NAMES {
        let path = maps_dir.join(name);
        if !path.exists() {
            return Err(incompatible(
                format!("map {name}"),
                &path,
                "it is missing".into(),
            ));
        }
        let pinned = MapData::from_pin(&path)
            .and_then(|d| d.info())
            .map_err(|source| PinnedError::Map {
                path: path.clone(),
                source,
            })?;
        let ours = map_data(&fresh.maps.maps[name])
            .expect("our map types")
            .info()
            .map_err(|source| PinnedError::Map {
                path: path.clone(),
                source,
            })?;
        let shape = |i: &aya::maps::MapInfo| {
            format!(
                "type {:?}, key {} B, value {} B, {} entries, flags {:#x}",
                i.map_type().ok(),
                i.key_size(),
                i.value_size(),
                i.max_entries(),
                i.map_flags()
            )
        };
        if shape(&pinned) != shape(&ours) {
            return Err(incompatible(
                format!("map {name}"),
                &path,
                format!(
                    "pinned {}, this daemon's {} (another build, or another --max-pods or --max-connections)",
                    shape(&pinned),
                    shape(&ours)
                ),
            ));
        }
    }
    let cgroup_id = fs::metadata(cgroup_root)
        .map_err(io("reading", cgroup_root))?
        .ino();
    let ebpf = &fresh.ebpf;
    let mut relinked = 0;
    for &Program {
        name, attach_type, ..
    } in cgroup_programs()
    {
        let prog_path = progs_dir.join(name);
        let pinned = ProgramInfo::from_pin(&prog_path).map_err(|source| PinnedError::Program {
            path: prog_path.clone(),
            source,
        })?;
        let ours = ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .expect("a loaded program");
        if pinned.tag() != ours.tag() {
            return Err(incompatible(
                format!("program {name}"),
                &prog_path,
                format!(
                    "its tag is {:016x}, this build's is {:016x} (another divert version)",
                    pinned.tag(),
                    ours.tag()
                ),
            ));
        }
        let link_path = links_dir.join(name);
        if !link_path.exists() {
            let prog = sys::obj_get(&prog_path).map_err(io("opening", &prog_path))?;
            link(prog.as_fd(), cgroup, attach_type, &link_path)?;
            relinked += 1;
            continue;
        }
        let l = sys::obj_get(&link_path).map_err(io("opening", &link_path))?;
        let info = sys::link_info(l.as_fd()).map_err(io("reading", &link_path))?;
        if info.prog_id != pinned.id()
            || info.cgroup_id != cgroup_id
            || info.attach_type != attach_type
        {
            return Err(incompatible(
                format!("link {name}"),
                &link_path,
                format!(
                    "it runs program {} at cgroup {} (attach type {}); expected program {} at {} ({}, cgroup {cgroup_id}, attach type {attach_type})",
                    info.prog_id,
                    info.cgroup_id,
                    info.attach_type,
                    pinned.id(),
                    cgroup_root.display(),
                    name
                ),
            ));
        }
    }
    Ok(relinked)
}

/// The maps pinned under `dir`, for reading and writing without the
/// programs (inspection, tests). Errors: a map pin is missing or unreadable.
pub fn open_maps(dir: &Path) -> Result<Maps> {
    let maps_dir = dir.join("maps");
    let mut pinned = std::collections::BTreeMap::new();
    for name in MAP_NAMES {
        let path = maps_dir.join(name);
        let d = MapData::from_pin(&path).map_err(|source| PinnedError::Map { path, source })?;
        pinned.insert(name, typed(name, d));
    }
    Ok(Maps { maps: pinned })
}

/// Detach and unpin everything under `dir`: links first, each detached
/// with `BPF_LINK_DETACH` before its pin goes (so the programs have stopped
/// when this returns, not when the kernel gets round to freeing the link),
/// then programs, then maps (and every registered policy with them).
/// Returns whether anything was there. The bpffs mount itself is left
/// alone.
pub fn uninstall(dir: &Path) -> Result<bool> {
    let mut found = false;
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    for d in [&links_dir, &progs_dir, &maps_dir] {
        let Ok(rd) = fs::read_dir(d) else { continue };
        for e in rd {
            let path = e.map_err(io("reading", d))?.path();
            if d == &links_dir {
                let l = sys::obj_get(&path).map_err(io("opening", &path))?;
                let detached = sys::link_detach(l.as_fd());
                // A namespace's socket lookup link whose namespace is gone
                // was detached by the kernel already.
                let netns_link = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("netns-"));
                if !netns_link {
                    detached.map_err(io("detaching", &path))?;
                }
            }
            fs::remove_file(&path).map_err(io("unpinning", &path))?;
            found = true;
        }
        fs::remove_dir(d).map_err(io("removing", d))?;
    }
    Ok(found)
}

/// The programs of [`PROGRAMS`] the daemon attaches at the cgroup root:
/// both sides (not the per-namespace socket lookup, nor what only a
/// separate proxy cgroup needs).
fn cgroup_programs() -> impl Iterator<Item = &'static Program> {
    PROGRAMS
        .iter()
        .filter(|p| matches!(p.side, Side::Workload | Side::Proxy))
}

/// Per attach type of our cgroup programs: `(attach type, programs
/// attached at `cgroup_root` with it (`BPF_PROG_QUERY`, effective programs
/// excluded), how many of ours have it)`. Once installed, the two counts
/// are equal; uninstalled, the second is all there is.
pub fn attachment_counts(cgroup_root: &Path) -> std::io::Result<Vec<(u32, u32, u32)>> {
    let cg = fs::File::open(cgroup_root)?;
    let mut types: Vec<u32> = cgroup_programs().map(|p| p.attach_type).collect();
    types.sort_unstable();
    types.dedup();
    types
        .into_iter()
        .map(|t| {
            let ours = cgroup_programs().filter(|p| p.attach_type == t).count() as u32;
            Ok((t, sys::prog_query_count(cg.as_fd(), t)?, ours))
        })
        .collect()
}

/// The `bpf(2)` commands aya 0.13 does not offer for cgroup links.
pub mod sys {
    use super::*;

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_LINK_DETACH: libc::c_long = 34;

    /// `bpf(cmd, attr, sizeof attr)` on a zeroed 128-byte `union bpf_attr`
    /// whose leading bytes `fill` sets.
    fn bpf(cmd: libc::c_long, fill: impl FnOnce(&mut [u8; 128])) -> std::io::Result<i32> {
        let mut attr = [0u8; 128];
        fill(&mut attr);
        // SAFETY: attr is a valid, fully initialised bpf_attr of the given size.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(rc as i32)
    }

    fn put_u32(a: &mut [u8], at: usize, v: u32) {
        a[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(a: &mut [u8], at: usize, v: u64) {
        a[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn owned(fd: i32) -> OwnedFd {
        // SAFETY: the kernel just returned this new descriptor to us.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    /// `BPF_LINK_CREATE` (`link_create.{prog_fd, target_fd, attach_type}`):
    /// attach `prog` to the cgroup `target`; the link lives while its fd or
    /// a pin does.
    pub fn link_create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> std::io::Result<OwnedFd> {
        bpf(BPF_LINK_CREATE, |a| {
            put_u32(a, 0, prog.as_raw_fd() as u32);
            put_u32(a, 4, target.as_raw_fd() as u32);
            put_u32(a, 8, attach_type);
        })
        .map(owned)
    }

    /// `BPF_LINK_DETACH` (`link_detach.link_fd`): detach now; the link
    /// object lives on, defunct, until its last fd or pin goes.
    pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
        bpf(BPF_LINK_DETACH, |a| put_u32(a, 0, link.as_raw_fd() as u32)).map(|_| ())
    }

    fn path_c(path: &Path) -> std::io::Result<std::ffi::CString> {
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    }

    /// `BPF_OBJ_PIN` (`{pathname, bpf_fd}`).
    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
        let c = path_c(path)?;
        bpf(BPF_OBJ_PIN, |a| {
            put_u64(a, 0, c.as_ptr() as u64);
            put_u32(a, 8, fd.as_raw_fd() as u32);
        })
        .map(|_| ())
    }

    /// `BPF_OBJ_GET` (`{pathname}`): a new fd for a pinned object.
    pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
        let c = path_c(path)?;
        bpf(BPF_OBJ_GET, |a| put_u64(a, 0, c.as_ptr() as u64)).map(owned)
    }

    /// What `BPF_OBJ_GET_INFO_BY_FD` says of a cgroup link.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct LinkInfo {
        pub id: u32,
        pub prog_id: u32,
        /// The cgroup's id (its inode number on cgroup2).
        pub cgroup_id: u64,
        pub attach_type: u32,
    }

    /// `struct bpf_link_info`: type, id, prog_id, then (8-aligned at 16)
    /// `cgroup.{cgroup_id u64, attach_type u32}`.
    pub fn link_info(fd: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
        let mut info = [0u8; 64];
        let ptr = info.as_mut_ptr() as u64;
        bpf(BPF_OBJ_GET_INFO_BY_FD, |a| {
            put_u32(a, 0, fd.as_raw_fd() as u32);
            put_u32(a, 4, info.len() as u32);
            put_u64(a, 8, ptr);
        })?;
        let u32_at = |i: usize| u32::from_ne_bytes(info[i..i + 4].try_into().unwrap());
        Ok(LinkInfo {
            id: u32_at(4),
            prog_id: u32_at(8),
            cgroup_id: u64::from_ne_bytes(info[16..24].try_into().unwrap()),
            attach_type: u32_at(24),
        })
    }

    /// `BPF_PROG_QUERY` (`query.{target_fd, attach_type, query_flags,
    /// attach_flags, prog_ids, prog_cnt}`) with no id buffer: how many
    /// programs are attached directly at `target` for `attach_type`.
    pub fn prog_query_count(target: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<u32> {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, target.as_raw_fd() as u32);
        put_u32(&mut attr, 4, attach_type);
        // SAFETY: as in `bpf`; the kernel writes prog_cnt back into attr.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), attr.len()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // prog_ids (u64) at 16, prog_cnt (u32) at 24.
        Ok(u32::from_ne_bytes(attr[24..28].try_into().unwrap()))
    }
}
