//! cgroup v2: finding the mount and owning a transient child cgroup.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

/// Something about the cgroup v2 tree is not as divert needs it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no cgroup v2 (cgroup2) mount in /proc/self/mountinfo: divert needs the unified hierarchy"
    )]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a cgroup v2 directory (no cgroup.procs in it)")]
    NotACgroup(PathBuf),
    #[error("{path} is {what}, not cgroup v2: divert's programs attach to the unified hierarchy only (on a hybrid host it is mounted apart, e.g. at /sys/fs/cgroup/unified)")]
    NotCgroup2 { path: PathBuf, what: &'static str },
}

type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The mount point of the cgroup v2 hierarchy, read from
/// `/proc/self/mountinfo` (on hybrid systems it is not /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(Error::MountInfo)?;
    find_cgroup2(&info).ok_or(Error::NoCgroup2)
}

/// The first `cgroup2` mount point in mountinfo text.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent maj:min root mountpoint options [optional fields...] - fstype source super
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mountpoint)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Open a cgroup v2 directory (for attaching programs), checking it is one.
pub fn open(path: &Path) -> Result<File> {
    require_v2(path)?;
    if !path.join("cgroup.procs").exists() {
        return Err(Error::NotACgroup(path.to_owned()));
    }
    File::open(path).map_err(io_err(path))
}

/// `CGROUP2_SUPER_MAGIC` and `CGROUP_SUPER_MAGIC` (cgroup v1), from the
/// kernel's uapi `magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;

/// `path` must be a directory of the cgroup v2 filesystem: a cgroup v1
/// hierarchy (whose directories also hold `cgroup.procs`) or any other
/// filesystem is refused with a message that says so.
pub fn require_v2(path: &Path) -> Result<()> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| Error::Io {
        path: path.to_owned(),
        source: e.into(),
    })?;
    match st.filesystem_type().0 as i64 {
        CGROUP2_SUPER_MAGIC => Ok(()),
        CGROUP_SUPER_MAGIC => Err(Error::NotCgroup2 {
            path: path.to_owned(),
            what: "a cgroup v1 hierarchy",
        }),
        _ => Err(Error::NotCgroup2 {
            path: path.to_owned(),
            what: "not on a cgroup filesystem",
        }),
    }
}

/// A child cgroup this process created and removes again when dropped:
/// every process left in it is killed (`cgroup.kill`), then the directory
/// is removed.
#[derive(Debug)]
pub struct TransientCgroup {
    path: PathBuf,
    removed: bool,
}

impl TransientCgroup {
    /// Create `parent/name`. Fails if it exists: it is not ours to remove.
    pub fn create(parent: &Path, name: &str) -> Result<Self> {
        if !parent.join("cgroup.procs").exists() {
            return Err(Error::NotACgroup(parent.to_owned()));
        }
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(TransientCgroup {
            path,
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory, opened for attaching programs.
    pub fn open(&self) -> Result<File> {
        open(&self.path)
    }

    /// `cgroup.procs`, opened for writing: writing `0` to it moves the
    /// writing process in (what a child does between fork and exec).
    pub fn procs_for_writing(&self) -> Result<File> {
        let p = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err(&p))
    }

    /// Kill what is left inside, wait (up to 5 s) for it to empty, remove it.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        remove_cgroup(&self.path)
    }
}

impl Drop for TransientCgroup {
    fn drop(&mut self) {
        if !self.removed {
            if let Err(e) = remove_cgroup(&self.path) {
                tracing::warn!("leaving cgroup {} behind: {e}", self.path.display());
            }
        }
    }
}

/// Kill every process in `path` and remove the directory. A cgroup that
/// is already gone is fine.
pub fn remove_cgroup(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kill = path.join("cgroup.kill");
    if kill.exists() {
        let _ = fs::write(&kill, "1");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            find_cgroup2("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/mnt/my\\040cgroups"), "/mnt/my cgroups");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
