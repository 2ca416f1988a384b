//! `cargo xtask bench --perf`: where the eBPF programs' time goes. While a
//! batch of diverted connections runs, `perf record -a -g` samples every
//! CPU's call stack at [`FREQ`] (`cpu-clock`: a virtual machine often has
//! no hardware counters); each sample whose stack passes through one of
//! divert's programs (`bpf_prog_<tag>_divert_…`, the JIT's symbols) is
//! charged to that program, and to the function the program was calling
//! at that moment (a helper or map operation, or the program's own
//! instructions).
//!
//! What this gives is the split of each program's time, as shares. The
//! sampling itself slows the programs down (on the 2-vCPU VM of
//! `docs/benchmarks`, `connect4` takes about three times as long while
//! perf samples at 20 kHz with call stacks), so the time itself is the
//! run-time accounting's, from a batch without perf. Samples taken with
//! interrupts off land where they come back on (a map's bucket lock is
//! released), which favours the functions that take such locks.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Samples per second per CPU.
pub const FREQ: u64 = 20_000;

/// Where one program's samples fell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramProfile {
    /// e.g. `divert_connect4`.
    pub name: String,
    /// Samples under the program.
    pub samples: u64,
    /// The function the program was calling (`(own instructions)`: none),
    /// and its share of the program's samples (0–1); most first.
    pub callees: Vec<(String, f64)>,
}

/// A `perf record` running over every CPU.
pub struct Recording {
    child: Child,
    data: PathBuf,
}

/// Start sampling into `data` (a `perf.data` file).
pub fn start(data: &Path) -> Result<Recording> {
    let child = Command::new("perf")
        .args(["record", "-a", "-g", "-e", "cpu-clock", "-F"])
        .arg(FREQ.to_string())
        .arg("-o")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting `perf record` (`cargo xtask setup` installs linux-perf)")?;
    // perf needs a moment to open its events on every CPU.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(Recording {
        child,
        data: data.to_path_buf(),
    })
}

impl Recording {
    /// Stop sampling (SIGINT, as perf expects) and attribute the samples.
    pub fn finish(mut self) -> Result<Vec<ProgramProfile>> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
            .context("stopping `perf record`")?;
        let status = self.child.wait()?;
        // Debian's `perf` is a wrapper script, which the signal ends too.
        let interrupted =
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGINT);
        if !(status.success() || interrupted) {
            bail!("`perf record` failed: {status}");
        }
        let out = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("running `perf script`")?;
        if !out.status.success() {
            bail!("`perf script -i {}` failed", self.data.display());
        }
        Ok(attribute(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// The program a JIT symbol is (`bpf_prog_<16 hex>_<name>` → `<name>`),
/// when it is one of divert's.
fn program_of(sym: &str) -> Option<&str> {
    let rest = sym.strip_prefix("bpf_prog_")?;
    let (tag, name) = rest.split_once('_')?;
    (tag.len() == 16 && name.starts_with("divert_")).then_some(name)
}

/// Charge the samples of `perf script -F ip,sym` output (stacks leaf
/// first, separated by blank lines; each frame `<ip> <symbol>`) to
/// divert's programs. Programs by name.
pub fn attribute(script: &str) -> Vec<ProgramProfile> {
    let mut by: BTreeMap<String, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for stack in script.split("\n\n") {
        let frames: Vec<&str> = stack
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        let Some((i, name)) = frames
            .iter()
            .enumerate()
            .find_map(|(i, f)| program_of(f).map(|n| (i, n)))
        else {
            continue;
        };
        let callee = match i {
            0 => "(own instructions)".to_string(),
            // A helper may show as `name.isra.0` and the like.
            _ => frames[i - 1].split('.').next().unwrap_or("").to_string(),
        };
        let e = by.entry(name.to_string()).or_default();
        e.0 += 1;
        *e.1.entry(callee).or_default() += 1;
    }
    by.into_iter()
        .map(|(name, (n, callees))| {
            let mut callees: Vec<(String, f64)> = callees
                .into_iter()
                .map(|(c, k)| (c, k as f64 / n as f64))
                .collect();
            callees.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            ProgramProfile {
                name,
                samples: n,
                callees,
            }
        })
        .collect()
}

/// The report's lines for one range count: each program's samples and
/// the callees of at least 3% of them.
pub fn text(profiles: &[ProgramProfile]) -> Vec<String> {
    profiles
        .iter()
        .map(|p| {
            let callees: Vec<String> = p
                .callees
                .iter()
                .filter(|(_, share)| *share >= 0.03)
                .map(|(c, share)| format!("{c} {:.0}%", share * 100.0))
                .collect();
            format!(
                "{} ({} samples): {}",
                p.name.trim_start_matches("divert_"),
                p.samples,
                callees.join(", ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
\tffffffff8100 htab_lru_map_update_elem
\tffffffffc000 bpf_prog_3b864f5377e14bf9_divert_connect4
\tffffffff8200 __cgroup_bpf_run_filter_sock_addr

\tffffffffc000 bpf_prog_3b864f5377e14bf9_divert_connect4
\tffffffff8200 __cgroup_bpf_run_filter_sock_addr

\tffffffff8300 lookup_nulls_elem_raw
\tffffffff8310 __htab_map_lookup_elem
\tffffffffc100 bpf_prog_5d367e79dc5c329c_divert_sock_ops

\tffffffff8400 bpf_map_get_memcg.isra.0
\tffffffffc000 bpf_prog_3b864f5377e14bf9_divert_connect4

\tffffffff8500 pv_native_safe_halt
\tffffffff8510 default_idle

\tffffffffc200 bpf_prog_0123456789abcdef_other_prog
";

    #[test]
    fn samples_are_charged_to_the_program_and_the_function_it_called() {
        let got = attribute(SCRIPT);
        let third = 1.0 / 3.0;
        assert_eq!(
            got,
            vec![
                ProgramProfile {
                    name: "divert_connect4".into(),
                    samples: 3,
                    callees: vec![
                        ("(own instructions)".into(), third),
                        ("bpf_map_get_memcg".into(), third),
                        ("htab_lru_map_update_elem".into(), third),
                    ],
                },
                ProgramProfile {
                    name: "divert_sock_ops".into(),
                    samples: 1,
                    callees: vec![("__htab_map_lookup_elem".into(), 1.0)],
                },
            ]
        );
        assert_eq!(
            text(&got)[1],
            "sock_ops (1 samples): __htab_map_lookup_elem 100%"
        );
    }

    #[test]
    fn only_divert_programs_are_programs() {
        assert_eq!(
            program_of("bpf_prog_3b864f5377e14bf9_divert_connect4"),
            Some("divert_connect4")
        );
        assert_eq!(program_of("bpf_prog_0123456789abcdef_other"), None);
        assert_eq!(program_of("bpf_prog_short_divert_x"), None);
        assert_eq!(program_of("divert_connect4"), None);
    }
}
