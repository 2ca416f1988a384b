//! What `divert maps`, `divert stats` and `divert explain` share: where the
//! node's pinned maps are, how a namespace is named on the command line,
//! opening the maps with errors that say what to do, and the table and JSON
//! output.
//!
//! The read commands open the pins under `--bpffs-dir` directly (no daemon
//! needed, so they work while it is down or restarting). They only read.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};

use crate::ebpf::{
    pinned::{self, PinnedError},
    Maps, PodRef,
};

/// Where the maps are and how to print them.
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// bpffs directory of the node agent's pinned maps (`divert daemon
    /// --bpffs-dir`).
    #[arg(long, value_name = "PATH", default_value = super::daemon::DEFAULT_BPFFS_DIR, env = "DIVERT_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,

    /// Output format: an aligned table, or JSON (one array; with --watch,
    /// one array per line).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// `-o`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Columns padded for a terminal.
    Table,
    /// JSON, one value per line.
    Json,
}

/// One network namespace, by pod or by netns cookie.
#[derive(Args, Debug, Clone, Default)]
pub struct Target {
    /// A pod, as `NAMESPACE/NAME`: its network namespace (pods are known
    /// once the daemon's pod watch has recorded them).
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_pod, conflicts_with = "netns")]
    pub pod: Option<PodRef>,

    /// The network namespace with this cookie (`SO_NETNS_COOKIE`; `divert
    /// maps` lists them).
    #[arg(long, value_name = "COOKIE")]
    pub netns: Option<u64>,
}

/// `NAMESPACE/NAME` as a [`PodRef`].
pub fn parse_pod(s: &str) -> Result<PodRef, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(PodRef {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// Open the maps pinned under `dir`, read-only in intent. Errors name the
/// directory and say what is wrong: not root, nothing pinned there, or
/// pins of another layout.
pub fn open(dir: &Path) -> anyhow::Result<Maps> {
    let maps = dir.join("maps");
    let denied = || {
        anyhow::anyhow!(
            "reading divert's pinned maps under {} needs root on the node (CAP_BPF and CAP_SYS_ADMIN); running as uid {}",
            dir.display(),
            nix::unistd::geteuid()
        )
    };
    match std::fs::metadata(&maps) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(denied()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "no divert maps are pinned under {}: `divert daemon` has not run on this node, or it was given another --bpffs-dir (DIVERT_BPFFS_DIR)",
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", maps.display())),
    }
    pinned::open_maps(dir).map_err(|e| {
        let errno = match &e {
            PinnedError::Map {
                source: aya::maps::MapError::SyscallError(s),
                ..
            } => s.io_error.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::EPERM | libc::EACCES) => denied(),
            _ if matches!(e, PinnedError::OtherBuild { .. }) => e.into(),
            _ => anyhow::Error::new(e).context(format!(
                "opening the maps pinned under {} (pinned by another version of divert? its `divert daemon --uninstall` removes them)",
                dir.display()
            )),
        }
    })
}

/// The netns cookie `target` names, if it names one. A pod must be in the
/// `PODS` map.
pub fn cookie_of(maps: &mut Maps, target: &Target, dir: &Path) -> anyhow::Result<Option<u64>> {
    if let Some(c) = target.netns {
        return Ok(Some(c));
    }
    let Some(pod) = &target.pod else {
        return Ok(None);
    };
    let pods = maps.pods().context("reading the PODS map")?;
    match pods.iter().find(|(_, p)| *p == pod) {
        Some((&c, _)) => Ok(Some(c)),
        None => bail!(
            "pod {pod} is not recorded under {}: pods are recorded by the daemon's pod watch (--kubernetes) once it has registered them; `divert maps` lists every registered namespace",
            dir.display()
        ),
    }
}

/// `t` as RFC 3339 UTC, to the second (`2026-11-22T04:34:36Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    k8s_openapi::chrono::DateTime::from_timestamp(d.as_secs() as i64, 0)
        .map(|t| t.to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Print `rows` under `headers`, columns padded to their widest cell;
/// columns whose index is in `right` are right-aligned (numbers).
pub fn table(
    out: &mut impl Write,
    headers: &[&str],
    rows: &[Vec<String>],
    right: &[usize],
) -> io::Result<()> {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = width[i].saturating_sub(cell.chars().count());
            if right.contains(&i) {
                s.extend(std::iter::repeat_n(' ', pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, &mut headers.iter().copied())?;
    for r in rows {
        line(out, &mut r.iter().map(String::as_str))?;
    }
    Ok(())
}

/// Print `value` as JSON on one line.
pub fn json(out: &mut impl Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A comma-joined list, `-` when empty.
pub fn list<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_namespace_slash_name() {
        assert_eq!(
            parse_pod("shop/cart-1").unwrap(),
            PodRef {
                namespace: "shop".into(),
                name: "cart-1".into()
            }
        );
        for bad in ["shop", "/cart", "shop/", "a/b/c"] {
            assert!(parse_pod(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tables_align_and_numbers_go_right() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["NAME", "N"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long".into(), "100".into()],
            ],
            &[1],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME    N\na       1\nlong  100\n"
        );
    }

    #[test]
    fn times_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_321_476);
        assert_eq!(rfc3339(t), "2026-11-22T04:24:36Z");
    }
}
