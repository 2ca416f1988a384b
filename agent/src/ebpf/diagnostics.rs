//! Measurements of the programs and maps for the benchmark (`divert-bench`):
//! the kernel's run-time accounting and each map's memory.

use std::collections::BTreeMap;

/// One program's run statistics (see [`super::Interceptor::program_stats`]).
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
/// memory, sorted by name. A process that holds one [`super::Interceptor`] and
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
