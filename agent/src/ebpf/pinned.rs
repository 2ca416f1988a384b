//! The node daemon's one instance: programs, maps and cgroup links pinned in
//! bpffs so that interception outlives the daemon process (restarts, and
//! `kill -9` included), a restart adopts what it finds instead of
//! attaching a second time, and a daemon of another build takes over what
//! it finds without a moment in which a connection is not judged.
//!
//! Layout under the bpffs directory `DIR` (default /sys/fs/bpf/divert):
//!
//! ```text
//! DIR/maps/<MAP>        every map of divert_common::MAPS (LAYOUTS records each one's layout)
//! DIR/progs/<program>   every program of divert_common::programs the daemon attaches
//! DIR/links/<program>   one bpf_link per program, attached at the cgroup root
//! DIR/links/netns-<cookie>  the socket lookup link of each namespace with inbound capture
//! DIR/upgrade/<MAP>     only while a daemon takes over another build's pins
//! ```
//!
//! Links are pinned last, so "all links pinned" means a complete install.
//! [`open`] decides from what is there:
//!
//! * no pins: load with every map pinned by name in `maps/` as it is made,
//!   record each map's layout in `LAYOUTS`, pin the programs, attach at the
//!   cgroup root with `BPF_LINK_CREATE`, pin the links. Any failure removes
//!   every pin made.
//! * links pinned, and every pinned map and program this build's (the same
//!   layout record, shape and program tag): adopt. Each link must run its
//!   pinned program at this cgroup root; a link missing (a crash between
//!   link pins) is created again from the pinned program.
//! * links pinned by another build (another version, or the same one with
//!   another `--max-pods`/`--max-connections`): take over ([`upgrade`]).
//!   The maps whose layout and shape are this build's are shared as they
//!   are; the others are made anew and their entries carried over, field
//!   by field by name ([`divert_common::layout`]); the new programs are
//!   loaded against those maps, and every link is switched to its new
//!   program with `BPF_LINK_UPDATE`: the attachment never goes away, so
//!   every connection is judged by the old programs or by the new ones.
//!   An older build takes over a newer one's pins the same way (a
//!   downgrade).
//! * pins but no link: nothing was ever attached (a crash mid-install); the
//!   pins are removed and the install starts over.
//!
//! Pins that cannot be taken over are an [`PinnedError::Incompatible`]
//! naming the object, never silently reused: pins from a divert without
//! layout records, a map without a record, a link at another cgroup.
//!
//! aya 0.13 cannot pin a cgroup link (no `FdLink` from a cgroup link) nor
//! update one, so links are made, pinned and updated with the `bpf(2)`
//! commands directly (see [`sys`]).

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
use divert_common::{layout::MapLayout, maps, MapKind, MapSizes, Program, Side, Writer, PROGRAMS};

use super::{map_data, Interceptor, Maps, MAP_NAMES};

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
    #[error(
        "the pinned map {map} at {path} is laid out by another divert build than this one: \
         read the pins with the divert of the daemon that made them (its version), \
         or start this version's daemon, which takes them over"
    )]
    OtherBuild { map: &'static str, path: PathBuf },
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Nothing was pinned: loaded, attached at the cgroup root, pinned.
    Installed,
    /// A complete or nearly complete install was found and adopted;
    /// `relinked` links were missing and made again.
    Adopted { relinked: usize },
    /// Another build's install was taken over ([`upgrade`]).
    Upgraded(Upgraded),
}

/// What taking over another build's pins did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgraded {
    /// Maps shared with the old programs as they were.
    pub reused: Vec<&'static str>,
    /// Maps made anew, and how many entries were carried into each.
    pub migrated: Vec<(&'static str, usize)>,
    /// Links switched to this build's program (`BPF_LINK_UPDATE`),
    /// namespaces' socket lookup links included.
    pub links_updated: usize,
    /// From loading the new programs to the last pin committed.
    pub elapsed: std::time::Duration,
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

/// Wrap a pinned map's data in the variant its name is declared with.
/// A pinned map's data as the [`Map`] of its kind ([`divert_common::MAPS`]).
fn typed(name: &str, d: MapData) -> Map {
    let kind = divert_common::map_def(name)
        .expect("every map name is in divert_common::MAPS")
        .kind;
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

/// Where a takeover stages the maps its programs are loaded against.
fn stage_dir(dir: &Path) -> PathBuf {
    dir.join("upgrade")
}

fn has_entries(p: &Path) -> bool {
    fs::read_dir(p).is_ok_and(|mut d| d.next().is_some())
}

/// Open the pinned instance under `dir` for `cgroup_root` (see the module
/// documentation for what is installed, adopted, taken over or refused).
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
    if has_entries(&links_dir) {
        // This build's shapes and program tags, from a private load.
        let fresh = Interceptor::load_sized(sizes)?;
        let plan = plan(dir, &fresh, cgroup_root)?;
        drop(fresh);
        if plan.is_adoption() {
            let relinked = adopt(dir, cgroup.as_fd())?;
            return Ok((open_maps(dir)?, Opened::Adopted { relinked }));
        }
        let upgraded = upgrade(dir, sizes, &plan, cgroup.as_fd())?;
        return Ok((open_maps(dir)?, Opened::Upgraded(upgraded)));
    }
    if has_entries(&maps_dir) || has_entries(&progs_dir) || stage_dir(dir).exists() {
        tracing::warn!(
            dir = %dir.display(),
            "pins without links (an install that did not finish): removing them and installing again"
        );
        uninstall(dir)?;
    }
    match install(dir, sizes, cgroup.as_fd()) {
        // The programs live on through their pins and links: only the maps
        // are kept.
        Ok(i) => Ok((i.into_maps(), Opened::Installed)),
        Err(e) => {
            let _ = uninstall(dir);
            Err(e)
        }
    }
}

fn install(dir: &Path, sizes: MapSizes, cgroup: BorrowedFd<'_>) -> Result<Interceptor> {
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    for d in [&maps_dir, &progs_dir, &links_dir] {
        fs::create_dir_all(d).map_err(io("creating", d))?;
    }
    // Every map is made and pinned in maps/ by the loader.
    let mut i = Interceptor::load_in(sizes, &maps_dir)?;
    for m in &divert_common::MAPS {
        record_layout(&mut i.maps, m)?;
    }
    let ebpf = &mut i.ebpf;
    for Program { name, .. } in daemon_programs() {
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
    Ok(i)
}

/// Record the layout of `maps`' map `m` in its `LAYOUTS`, under the map's
/// id.
fn record_layout(maps: &mut Maps, m: &divert_common::MapDef) -> Result<()> {
    let id = map_data(&maps.maps[m.name])
        .expect("our map types")
        .info()
        .map_err(|source| map_error(m.name, source))?
        .id();
    let mut layouts = maps.layouts_mut()?;
    layouts
        .insert(id, MapLayout::new(m.name, &m.layout), 0)
        .map_err(|source| map_error(maps::LAYOUTS, source))
}

fn map_error(map: &'static str, source: MapError) -> PinnedError {
    PinnedError::Ebpf(super::Error::Map { map, source })
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

/// What a pinned map is to this build.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MapPlan {
    /// Its layout and shape are this build's: shared as it is.
    Reuse,
    /// Made anew, its entries carried over from the pinned map, whose
    /// layout is `from`; `why` says what differs (layout or shape).
    Migrate { from: Box<MapLayout>, why: String },
    /// The pinned install has no such map (an older build): made anew,
    /// empty.
    New,
}

/// What [`open`] found pinned, against this build.
struct Plan {
    maps: Vec<(&'static divert_common::MapDef, MapPlan)>,
    /// Pinned programs whose tag is not this build's.
    programs_differ: Vec<&'static str>,
}

impl Plan {
    fn is_adoption(&self) -> bool {
        self.programs_differ.is_empty() && self.maps.iter().all(|(_, p)| *p == MapPlan::Reuse)
    }
}

/// A map's shape as `BPF_OBJ_GET_INFO_BY_FD` gives it, for comparing and
/// for messages.
fn shape(i: &aya::maps::MapInfo) -> String {
    format!(
        "type {:?}, key {} B, value {} B, {} entries, flags {:#x}",
        i.map_type().ok(),
        i.key_size(),
        i.value_size(),
        i.max_entries(),
        i.map_flags()
    )
}

/// Compare every pin under `dir` with this build's object (`fresh`,
/// loaded privately) and check the links are at `cgroup_root`.
fn plan(dir: &Path, fresh: &Interceptor, cgroup_root: &Path) -> Result<Plan> {
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    let incompatible = |object: String, path: &Path, detail: String| PinnedError::Incompatible {
        object,
        path: path.to_path_buf(),
        detail,
    };
    let layouts_path = maps_dir.join(maps::LAYOUTS);
    if !layouts_path.exists() {
        return Err(incompatible(
            format!("map {}", maps::LAYOUTS),
            &layouts_path,
            "it is missing: these pins were made by a divert from before upgrades in place (it records no layouts), which cannot be taken over".into(),
        ));
    }
    let pinned_layouts = open_maps_unchecked(dir, &[maps::LAYOUTS])?;
    let layouts = pinned_layouts.layouts()?;
    let mut out = Vec::new();
    for m in &divert_common::MAPS {
        let path = maps_dir.join(m.name);
        if !path.exists() {
            out.push((m, MapPlan::New));
            continue;
        }
        let pinned = MapData::from_pin(&path)
            .and_then(|d| d.info())
            .map_err(|source| PinnedError::Map {
                path: path.clone(),
                source,
            })?;
        let ours = map_data(&fresh.maps.maps[m.name])
            .expect("our map types")
            .info()
            .map_err(|source| PinnedError::Map {
                path: path.clone(),
                source,
            })?;
        let record = layouts.get(&pinned.id(), 0).map_err(|_| {
            incompatible(
                format!("map {}", m.name),
                &path,
                format!(
                    "{} records no layout for it (map id {})",
                    maps::LAYOUTS,
                    pinned.id()
                ),
            )
        })?;
        let our_record = MapLayout::new(m.name, &m.layout);
        let (same_shape, same_layout) = (shape(&pinned) == shape(&ours), record == our_record);
        if same_shape && same_layout {
            out.push((m, MapPlan::Reuse));
            continue;
        }
        let why = if same_layout {
            format!("pinned {}, this daemon's {}", shape(&pinned), shape(&ours))
        } else {
            "its keys or values are laid out differently".to_string()
        };
        if m.name == maps::LAYOUTS {
            return Err(incompatible(
                format!("map {}", m.name),
                &path,
                format!(
                    "{why}, and it cannot be carried over: it is how every build reads the others' layouts"
                ),
            ));
        }
        if record.key_size != pinned.key_size() || record.value_size != pinned.value_size() {
            return Err(incompatible(
                format!("map {}", m.name),
                &path,
                format!(
                    "its layout record says {} and {} B, the map is {} and {} B",
                    record.key_size,
                    record.value_size,
                    pinned.key_size(),
                    pinned.value_size()
                ),
            ));
        }
        out.push((
            m,
            MapPlan::Migrate {
                from: Box::new(record),
                why,
            },
        ));
    }
    let cgroup_id = fs::metadata(cgroup_root)
        .map_err(io("reading", cgroup_root))?
        .ino();
    let mut programs_differ = Vec::new();
    for &Program {
        name, attach_type, ..
    } in daemon_programs()
    {
        let prog_path = progs_dir.join(name);
        let pinned = ProgramInfo::from_pin(&prog_path).map_err(|source| PinnedError::Program {
            path: prog_path.clone(),
            source,
        })?;
        let ours = fresh
            .ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .expect("a loaded program");
        if pinned.tag() != ours.tag() {
            programs_differ.push(name);
        }
        if !cgroup_programs().any(|p| p.name == name) {
            continue;
        }
        let link_path = links_dir.join(name);
        if !link_path.exists() {
            continue;
        }
        let l = sys::obj_get(&link_path).map_err(io("opening", &link_path))?;
        let info = sys::link_info(l.as_fd()).map_err(io("reading", &link_path))?;
        if info.cgroup_id != cgroup_id || info.attach_type != attach_type {
            return Err(incompatible(
                format!("link {name}"),
                &link_path,
                format!(
                    "it is attached at cgroup {} (attach type {}); expected {} (cgroup {cgroup_id}, attach type {attach_type})",
                    info.cgroup_id,
                    info.attach_type,
                    cgroup_root.display(),
                ),
            ));
        }
    }
    Ok(Plan {
        maps: out,
        programs_differ,
    })
}

/// Adopt an install of this build's: every link must run its pinned
/// program; a missing link is made again. Returns how many were.
fn adopt(dir: &Path, cgroup: BorrowedFd<'_>) -> Result<usize> {
    let [_, progs_dir, links_dir] = dirs(dir);
    let mut relinked = 0;
    for &Program {
        name, attach_type, ..
    } in cgroup_programs()
    {
        let prog_path = progs_dir.join(name);
        let link_path = links_dir.join(name);
        if !link_path.exists() {
            let prog = sys::obj_get(&prog_path).map_err(io("opening", &prog_path))?;
            link(prog.as_fd(), cgroup, attach_type, &link_path)?;
            relinked += 1;
            continue;
        }
        let pinned = ProgramInfo::from_pin(&prog_path).map_err(|source| PinnedError::Program {
            path: prog_path.clone(),
            source,
        })?;
        let l = sys::obj_get(&link_path).map_err(io("opening", &link_path))?;
        let info = sys::link_info(l.as_fd()).map_err(io("reading", &link_path))?;
        if info.prog_id != pinned.id() {
            return Err(PinnedError::Incompatible {
                object: format!("link {name}"),
                path: link_path,
                detail: format!(
                    "it runs program {}, not the pinned {name} ({})",
                    info.prog_id,
                    pinned.id()
                ),
            });
        }
    }
    Ok(relinked)
}

/// Take over another build's pins under `dir` as `plan` says, this
/// build's maps sized for `sizes`:
///
/// 1. the maps to share are pinned again in `upgrade/`, and the new
///    programs loaded against that directory: the loader uses them, and
///    makes (and pins there) the maps that are new or migrate;
/// 2. the migrating maps that user space or the programs write are filled
///    from the pinned ones, each entry converted by field name, and a new
///    `LISTENERS` with the sockets found again, while the old programs
///    still decide ([`Writer`]);
/// 3. every link, the namespaces' socket lookup links too, is switched to
///    its new program with `BPF_LINK_UPDATE` (`BPF_F_REPLACE`: only from
///    the program it runs);
/// 4. after a grace period for old program runs in flight, what the old
///    programs wrote since step 2 is carried over: entries still missing,
///    counters added, capture listeners that began listening found;
/// 5. the new pins replace the old by `rename(2)`, each atomically, and
///    only the layout records of the maps pinned now are kept.
///
/// A failure before step 3 leaves the old install as it was (the staging
/// directory is removed); a crash at any point leaves links that run
/// either program, and the next start takes over again from there.
fn upgrade(dir: &Path, sizes: MapSizes, plan: &Plan, cgroup: BorrowedFd<'_>) -> Result<Upgraded> {
    let started = std::time::Instant::now();
    let stage = stage_dir(dir);
    let result = stage_and_switch(dir, &stage, sizes, plan, cgroup);
    let _ = remove_pins(&stage);
    let mut upgraded = result?;
    upgraded.elapsed = started.elapsed();
    Ok(upgraded)
}

fn remove_pins(d: &Path) -> std::io::Result<()> {
    let Ok(rd) = fs::read_dir(d) else {
        return Ok(());
    };
    for e in rd {
        fs::remove_file(e?.path())?;
    }
    fs::remove_dir(d)
}

fn stage_and_switch(
    dir: &Path,
    stage: &Path,
    sizes: MapSizes,
    plan: &Plan,
    cgroup: BorrowedFd<'_>,
) -> Result<Upgraded> {
    let [maps_dir, progs_dir, links_dir] = dirs(dir);
    remove_pins(stage).map_err(io("removing", stage))?;
    fs::create_dir(stage).map_err(io("creating", stage))?;
    let mut reused = Vec::new();
    for (m, p) in &plan.maps {
        if *p == MapPlan::Reuse {
            let from = maps_dir.join(m.name);
            let fd = sys::obj_get(&from).map_err(io("opening", &from))?;
            let to = stage.join(m.name);
            sys::obj_pin(fd.as_fd(), &to).map_err(io("pinning", &to))?;
            reused.push(m.name);
        }
    }
    // 1. The new programs, against the shared maps and the new ones.
    let mut new = Interceptor::load_in(sizes, stage)?;
    let mut migrated = Vec::new();
    for (m, p) in &plan.maps {
        if *p == MapPlan::Reuse {
            continue;
        }
        record_layout(&mut new.maps, m)?;
        if let MapPlan::Migrate { why, .. } = p {
            tracing::info!(
                map = m.name,
                "{why}: carrying its entries over to a new map"
            );
        }
    }
    // 2. Before the switch.
    let migrating: Vec<_> = plan
        .maps
        .iter()
        .filter_map(|(m, p)| match p {
            MapPlan::Migrate { from, .. } => Some((*m, from.as_ref())),
            _ => None,
        })
        .collect();
    let mut carried = std::collections::BTreeMap::new();
    for &(m, from) in &migrating {
        if matches!(m.writer, Writer::UserSpace | Writer::Programs) {
            let n = carry(&maps_dir, &new.maps, m, from, Carry::All)?;
            carried.insert(m.name, n);
        }
    }
    // The capture listeners last: they are found by the (carried) policies.
    for &(m, from) in &migrating {
        if m.writer == Writer::Sockets {
            let n = refill_listeners(&maps_dir, &mut new.maps, from)?;
            carried.insert(m.name, n);
        }
    }
    // 3. The switch.
    let mut links_updated = 0;
    for &Program {
        name, attach_type, ..
    } in cgroup_programs()
    {
        let prog = new
            .ebpf
            .program(name)
            .expect("loaded")
            .fd()
            .map_err(|source| PinnedError::Program {
                path: progs_dir.join(name),
                source,
            })?;
        let link_path = links_dir.join(name);
        if link_path.exists() {
            update_link(&link_path, prog.as_fd())?;
            links_updated += 1;
        } else {
            link(prog.as_fd(), cgroup, attach_type, &link_path)?;
        }
    }
    for p in PROGRAMS.iter().filter(|p| p.side == Side::Netns) {
        let prog = new
            .ebpf
            .program(p.name)
            .expect("loaded")
            .fd()
            .map_err(|source| PinnedError::Program {
                path: progs_dir.join(p.name),
                source,
            })?;
        for e in fs::read_dir(&links_dir).map_err(io("reading", &links_dir))? {
            let path = e.map_err(io("reading", &links_dir))?.path();
            let netns_link = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("netns-"));
            if netns_link {
                match update_link(&path, prog.as_fd()) {
                    Ok(()) => links_updated += 1,
                    // Its namespace is gone: the link was detached, and
                    // the garbage collection removes the pin.
                    Err(e) => {
                        tracing::debug!(link = %path.display(), error = %e, "socket lookup link not updated")
                    }
                }
            }
        }
    }
    // 4. After the switch: what the old programs wrote meanwhile, once a
    // run of an old program that began before its link switched has
    // ended (runs take microseconds; the kernel frees the old program
    // after an RCU grace period, which user space cannot wait for).
    std::thread::sleep(SWITCH_GRACE);
    for &(m, from) in &migrating {
        let how = match m.writer {
            Writer::Programs => Carry::Missing,
            Writer::ProgramsAdding => Carry::Add,
            // A proxy that began listening since the refill was recorded
            // by the old programs: found again.
            Writer::Sockets => {
                match refill_listeners(&maps_dir, &mut new.maps, from) {
                    Ok(n) => *carried.entry(m.name).or_default() += n,
                    Err(e) => {
                        tracing::warn!(map = m.name, error = %e, "finding the capture listeners that began listening during the switch failed")
                    }
                }
                continue;
            }
            Writer::UserSpace => continue,
        };
        match carry(&maps_dir, &new.maps, m, from, how) {
            Ok(n) => *carried.entry(m.name).or_default() += n,
            Err(e) => {
                tracing::warn!(map = m.name, error = %e, "carrying over what the old programs wrote during the switch failed")
            }
        }
    }
    // 5. Commit: programs, then maps, each pin replaced atomically.
    for Program { name, .. } in daemon_programs() {
        let path = progs_dir.join(name);
        // (bpffs refuses names with a dot.)
        let tmp = stage.join(format!("program-{name}"));
        let p = new.ebpf.program(name).expect("loaded");
        let fd = p.fd().map_err(|source| PinnedError::Program {
            path: path.clone(),
            source,
        })?;
        let _ = fs::remove_file(&tmp);
        sys::obj_pin(fd.as_fd(), &tmp).map_err(io("pinning", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("replacing", &path))?;
    }
    for (m, p) in &plan.maps {
        if *p == MapPlan::Reuse {
            continue;
        }
        let path = maps_dir.join(m.name);
        fs::rename(stage.join(m.name), &path).map_err(io("replacing", &path))?;
        migrated.push((m.name, carried.get(m.name).copied().unwrap_or(0)));
    }
    // Maps of the old build that this one does not have.
    for e in fs::read_dir(&maps_dir).map_err(io("reading", &maps_dir))? {
        let path = e.map_err(io("reading", &maps_dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if divert_common::map_def(&name).is_none() {
            fs::remove_file(&path).map_err(io("unpinning", &path))?;
        }
    }
    // Only the records of the maps pinned now are kept: those of the maps
    // that went (and any an interrupted takeover left) are removed.
    let current: std::collections::HashSet<u32> = new
        .maps
        .maps
        .values()
        .filter_map(|m| map_data(m)?.info().ok().map(|i| i.id()))
        .collect();
    let mut layouts = new.maps.layouts_mut()?;
    let stale: Vec<u32> = layouts
        .keys()
        .filter_map(|k| k.ok())
        .filter(|id| !current.contains(id))
        .collect();
    for id in stale {
        let _ = layouts.remove(&id);
    }
    Ok(Upgraded {
        reused,
        migrated,
        links_updated,
        elapsed: Default::default(),
    })
}

/// How long [`upgrade`] waits after switching the links before it carries
/// over what the old programs wrote.
const SWITCH_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Switch the link pinned at `path` to `prog`, from the program it runs.
fn update_link(path: &Path, prog: BorrowedFd<'_>) -> Result<()> {
    let l = sys::obj_get(path).map_err(io("opening", path))?;
    let info = sys::link_info(l.as_fd()).map_err(io("reading", path))?;
    let old = sys::prog_get_fd_by_id(info.prog_id).map_err(io("opening the program of", path))?;
    sys::link_update(l.as_fd(), prog, old.as_fd()).map_err(io("updating", path))
}

/// Fill `new`'s `LISTENERS` for the namespaces the pinned one (layout
/// `from`) has a capture listener for, where the new map has none yet.
///
/// A socket hash holds sockets, which user space cannot read out of it, so
/// each listener is found again as a registration finds one: the
/// namespace (by cookie, among the live ones) is entered and the socket
/// listening on its policy's inbound capture port taken from its holder
/// ([`super::find_listeners`]: `/proc/PID/fd` and `pidfd_getfd(2)`).
/// Returns how many sockets were put in.
fn refill_listeners(maps_dir: &Path, new: &mut Maps, from: &MapLayout) -> Result<usize> {
    use divert_common::{
        layout::{convert, PART_KEY},
        ListenerKey,
    };
    let path = maps_dir.join(maps::LISTENERS);
    let old = sys::obj_get(&path).map_err(io("opening", &path))?;
    let ours = MapLayout::new(
        maps::LISTENERS,
        &divert_common::map_def(maps::LISTENERS)
            .expect("a map")
            .layout,
    );
    let mut wanted = std::collections::BTreeMap::<u64, Vec<u32>>::new();
    let (mut key, mut k) = (None::<Vec<u8>>, [0u8; core::mem::size_of::<ListenerKey>()]);
    let bound = 1 << 20;
    for _ in 0..bound {
        let Some(next) = sys::map_get_next_key(old.as_fd(), key.as_deref(), from.key_size as usize)
            .map_err(io("walking", &path))?
        else {
            break;
        };
        convert(from, &ours, PART_KEY, &next, &mut k, |_| {});
        key = Some(next);
        // SAFETY: ListenerKey is plain data of exactly these bytes.
        let lk: ListenerKey = unsafe { core::ptr::read_unaligned(k.as_ptr().cast()) };
        let families = wanted.entry(lk.netns_cookie).or_default();
        if !families.contains(&lk.family) {
            families.push(lk.family);
        }
    }
    if wanted.is_empty() {
        return Ok(0);
    }
    let live = crate::netns::live_namespaces()
        .map_err(io("reading the namespaces of", Path::new("/proc")))?;
    let mut put = 0;
    for (cookie, families) in wanted {
        if new.has_listener(cookie)? {
            continue;
        }
        let Ok(header) = new.policies()?.get(&cookie, 0) else {
            continue;
        };
        let (Some(ns_path), port) = (live.get(&cookie), header.inbound_capture_port) else {
            continue;
        };
        if port == 0 {
            continue;
        }
        let Ok(ns) = fs::File::open(ns_path) else {
            continue;
        };
        let found = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map(|()| super::find_listeners(port))
            })
            .join()
            .expect("the namespace thread does not panic")
        })
        .map_err(|e| io("entering", ns_path)(e.into()))?;
        let found: Vec<_> = found
            .into_iter()
            .filter(|(family, _)| families.contains(family))
            .collect();
        put += new.adopt_listeners(cookie, &found)?;
    }
    Ok(put)
}

/// How [`carry`] writes an entry into the new map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carry {
    /// Every entry, replacing what is there.
    All,
    /// Only keys the new map does not have.
    Missing,
    /// Values are `u64` counters: added to what the new map has.
    Add,
}

/// Carry map `m`'s entries from the pinned map (layout `from`) in
/// `maps_dir` to `new`'s, converting keys and values by field name.
/// Returns how many entries were written. Errors: reading the old map,
/// and (for [`Carry::All`]) writing the new one, a full map included.
fn carry(
    maps_dir: &Path,
    new: &Maps,
    m: &divert_common::MapDef,
    from: &MapLayout,
    how: Carry,
) -> Result<usize> {
    use divert_common::layout::{convert, PART_KEY, PART_VALUE};
    let path = maps_dir.join(m.name);
    let old = sys::obj_get(&path).map_err(io("opening", &path))?;
    let to_data = map_data(&new.maps[m.name]).expect("our map types");
    let to = to_data.fd().as_fd();
    let ours = MapLayout::new(m.name, &m.layout);
    let (fk, fv) = (from.key_size as usize, from.value_size as usize);
    let (tk, tv) = (ours.key_size as usize, ours.value_size as usize);
    let mut zeroed = std::collections::BTreeSet::new();
    let mut seen = std::collections::HashSet::new();
    let (mut key, mut written) = (None::<Vec<u8>>, 0);
    let (mut k, mut v) = (vec![0u8; tk], vec![0u8; tv]);
    let failed = |what: &'static str| io(what, &path);
    // A hash map restarts its walk when the key it was given was deleted
    // meanwhile; `seen` makes each key count once, and the walk is bounded.
    let bound = 2 * MapData::from_pin(&path)
        .and_then(|d| d.info())
        .map(|i| i.max_entries() as usize)
        .unwrap_or(1 << 24);
    for _ in 0..bound {
        let Some(next) =
            sys::map_get_next_key(old.as_fd(), key.as_deref(), fk).map_err(failed("walking"))?
        else {
            break;
        };
        key = Some(next.clone());
        if !seen.insert(next.clone()) {
            continue;
        }
        let Some(value) = sys::map_lookup(old.as_fd(), &next, fv).map_err(failed("reading"))?
        else {
            continue;
        };
        convert(from, &ours, PART_KEY, &next, &mut k, |f| {
            zeroed.insert(f);
        });
        convert(from, &ours, PART_VALUE, &value, &mut v, |f| {
            zeroed.insert(f);
        });
        let wrote = match how {
            Carry::All => {
                sys::map_update(to, &k, &v, sys::BPF_ANY).map_err(|e| {
                    if matches!(e.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
                        PinnedError::Incompatible {
                            object: format!("map {}", m.name),
                            path: path.clone(),
                            detail: format!(
                                "its entries do not fit this daemon's map of {} entries (--max-pods, --max-connections)",
                                to_data.info().map(|i| i.max_entries()).unwrap_or(0)
                            ),
                        }
                    } else {
                        io("writing the new map for", &path)(e)
                    }
                })?;
                true
            }
            Carry::Missing => match sys::map_update(to, &k, &v, sys::BPF_NOEXIST) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
                Err(e) => return Err(io("writing the new map for", &path)(e)),
            },
            Carry::Add => {
                if let Some(cur) = sys::map_lookup(to, &k, tv).map_err(failed("reading"))? {
                    for (i, chunk) in v.chunks_exact_mut(8).enumerate() {
                        let a = u64::from_ne_bytes(chunk.try_into().unwrap());
                        let b = u64::from_ne_bytes(cur[i * 8..i * 8 + 8].try_into().unwrap());
                        chunk.copy_from_slice(&a.wrapping_add(b).to_ne_bytes());
                    }
                }
                sys::map_update(to, &k, &v, sys::BPF_ANY)
                    .map_err(io("writing the new map for", &path))?;
                true
            }
        };
        written += usize::from(wrote);
    }
    if !zeroed.is_empty() && how == Carry::All {
        tracing::info!(map = m.name, fields = ?zeroed, "fields the old layout does not have are zero in the carried entries");
    }
    Ok(written)
}

/// The maps pinned under `dir`, for reading and writing without the
/// programs (inspection, tests). Errors: a map pin is missing or
/// unreadable, or a map is laid out otherwise than this build's (its
/// `LAYOUTS` record): the pins are another divert version's.
pub fn open_maps(dir: &Path) -> Result<Maps> {
    let maps = open_maps_unchecked(dir, &MAP_NAMES)?;
    let layouts = maps.layouts()?;
    for m in divert_common::MAPS {
        let path = dir.join("maps").join(m.name);
        let id = map_data(&maps.maps[m.name])
            .expect("our map types")
            .info()
            .map_err(|source| PinnedError::Map {
                path: path.clone(),
                source,
            })?
            .id();
        if layouts.get(&id, 0).ok() != Some(MapLayout::new(m.name, &m.layout)) {
            return Err(PinnedError::OtherBuild { map: m.name, path });
        }
    }
    Ok(maps)
}

/// The maps `names` pinned under `dir`, unchecked.
fn open_maps_unchecked(dir: &Path, names: &[&'static str]) -> Result<Maps> {
    let maps_dir = dir.join("maps");
    let mut pinned = std::collections::BTreeMap::new();
    for &name in names {
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
    for d in [&links_dir, &progs_dir, &stage_dir(dir), &maps_dir] {
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

/// The programs of [`PROGRAMS`] the daemon pins: those it attaches at the
/// cgroup root and per namespace (not what only a separate proxy cgroup
/// needs).
fn daemon_programs() -> impl Iterator<Item = &'static Program> {
    PROGRAMS.iter().filter(|p| p.side != Side::SeparateProxy)
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
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    /// `BPF_F_REPLACE`: update a link only if it runs `old_prog_fd`.
    const BPF_F_REPLACE: u32 = 1 << 2;
    /// Map update flags.
    pub const BPF_ANY: u64 = 0;
    pub const BPF_NOEXIST: u64 = 1;

    /// `BPF_PROG_GET_FD_BY_ID` (`prog_id`): a descriptor of a loaded program.
    pub fn prog_get_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
        bpf(BPF_PROG_GET_FD_BY_ID, |a| put_u32(a, 0, id)).map(owned)
    }

    /// `BPF_LINK_UPDATE` (`link_update.{link_fd, new_prog_fd, flags,
    /// old_prog_fd}`) with `BPF_F_REPLACE`: the link runs `new` from now on
    /// in place of `old`, with no moment in which it runs neither; refused
    /// (`EPERM`) when it does not run `old`.
    pub fn link_update(
        link: BorrowedFd<'_>,
        new: BorrowedFd<'_>,
        old: BorrowedFd<'_>,
    ) -> std::io::Result<()> {
        bpf(BPF_LINK_UPDATE, |a| {
            put_u32(a, 0, link.as_raw_fd() as u32);
            put_u32(a, 4, new.as_raw_fd() as u32);
            put_u32(a, 8, BPF_F_REPLACE);
            put_u32(a, 12, old.as_raw_fd() as u32);
        })
        .map(|_| ())
    }

    /// The map element commands' attr: `{map_fd u32, pad, key u64, value
    /// or next_key u64, flags u64}`.
    fn map_elem(
        cmd: libc::c_long,
        map: BorrowedFd<'_>,
        key: *const u8,
        value: *mut u8,
        flags: u64,
    ) -> std::io::Result<i32> {
        bpf(cmd, |a| {
            put_u32(a, 0, map.as_raw_fd() as u32);
            put_u64(a, 8, key as u64);
            put_u64(a, 16, value as u64);
            put_u64(a, 24, flags);
        })
    }

    /// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first for `None`),
    /// `None` at the end. `key_size` is the map's.
    pub fn map_get_next_key(
        map: BorrowedFd<'_>,
        key: Option<&[u8]>,
        key_size: usize,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut next = vec![0u8; key_size];
        let k = key.map_or(std::ptr::null(), |k| k.as_ptr());
        match map_elem(BPF_MAP_GET_NEXT_KEY, map, k, next.as_mut_ptr(), 0) {
            Ok(_) => Ok(Some(next)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `BPF_MAP_LOOKUP_ELEM`: `key`'s value (`value_size` bytes), `None`
    /// when there is none.
    pub fn map_lookup(
        map: BorrowedFd<'_>,
        key: &[u8],
        value_size: usize,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut v = vec![0u8; value_size];
        match map_elem(BPF_MAP_LOOKUP_ELEM, map, key.as_ptr(), v.as_mut_ptr(), 0) {
            Ok(_) => Ok(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `BPF_MAP_UPDATE_ELEM` with `flags` ([`BPF_ANY`], [`BPF_NOEXIST`]).
    pub fn map_update(
        map: BorrowedFd<'_>,
        key: &[u8],
        value: &[u8],
        flags: u64,
    ) -> std::io::Result<()> {
        map_elem(
            BPF_MAP_UPDATE_ELEM,
            map,
            key.as_ptr(),
            value.as_ptr() as *mut u8,
            flags,
        )
        .map(|_| ())
    }

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
