//! Registration latency, map memory and process RSS for a node of
//! `max_pods` pods, every one registered, measured in a process of its own
//! (`divert-bench registry`) that holds one [`Interceptor`] loaded with the
//! maps sized for that node ([`MapSizes`]) and nothing else. Nothing is
//! attached: only the maps are written, under made-up netns cookies (no
//! namespace connects through them).
//!
//! Then the node daemon itself ([`daemon_memory`]): `divert daemon
//! --max-pods N` started in a memory cgroup of its own, whose usage is what
//! a container's request and limit are held to (the kernel charges a map
//! to the memory cgroup of the process that creates it, Linux 5.11+).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use divert::ebpf::{map_memory, Interceptor, MapMemory};
use divert_common::MapSizes;
use serde::{Deserialize, Serialize};

use crate::goldens::policy_for;

/// The flags each registered namespace gets: the Istio injector's command
/// line ([`crate::INJECTOR`]) with a mesh-wide include/exclude list and one
/// excluded port, as a cluster that sets
/// `global.proxy.includeIPRanges`/`excludeIPRanges` has.
pub fn policy_flags() -> Vec<String> {
    crate::injector_with(&[
        ("-i", "10.0.0.0/8,172.16.0.0/12"),
        ("-x", "169.254.169.254/32"),
        ("-o", "3306"),
    ])
}

/// What [`measure`] found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Figures {
    /// The node's size: the maps are sized for it, and this many
    /// namespaces are registered.
    pub max_pods: u32,
    pub max_connections: u32,
    pub namespaces: usize,
    pub policy_flags: String,
    /// One `Interceptor::register` (all map writes of one policy), µs.
    pub register_p50_us: f64,
    pub register_p99_us: f64,
    pub unregister_p50_us: f64,
    /// VmRSS of the process, KiB: before loading, loaded, and with every
    /// namespace registered.
    pub rss_start_kib: u64,
    pub rss_loaded_kib: u64,
    pub rss_registered_kib: u64,
    /// Kernel memory of every map (fdinfo `memlock`), bytes: loaded and
    /// empty, then with every namespace registered.
    pub maps_loaded_bytes: u64,
    pub maps_registered_bytes: u64,
    /// Per map, with every namespace registered.
    pub maps: Vec<MapFigure>,
    /// `divert daemon --max-pods max_pods` in a memory cgroup of its own.
    #[serde(default)]
    pub daemon: Option<DaemonMemory>,
}

/// The node daemon's memory, as its container's cgroup sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DaemonMemory {
    /// The cgroup's usage, bytes: the process's memory and the kernel
    /// memory charged to it, its maps included, and page cache.
    pub cgroup_bytes: u64,
    /// Of `cgroup_bytes`, page cache (v1 `memory.stat` `cache`, v2
    /// `file`): the binary's pages, charged here only when this start read
    /// them from disk, so 0 to 15 MiB from one run to the next; the first
    /// thing the kernel reclaims at the limit. Absent from older runs.
    #[serde(default)]
    pub page_cache_bytes: u64,
    /// VmRSS of the daemon, KiB.
    pub rss_kib: u64,
    /// fdinfo `memlock` of its maps, bytes.
    pub maps_bytes: u64,
}

/// One map's memory with every namespace registered.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MapFigure {
    pub name: String,
    pub max_entries: u32,
    pub loaded_bytes: u64,
    pub registered_bytes: u64,
}

fn rss_kib() -> Result<u64> {
    rss_kib_of("self")
}

/// VmRSS of process `pid` (or `self`), KiB.
fn rss_kib_of(pid: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

fn us(sorted: &[u64], q: f64) -> f64 {
    super::percentile(sorted, q) as f64 / 1e3
}

/// The pod address of the `i`-th namespace: 10.244.0.0/16 upwards.
fn pod_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 244, 0, 10)) + i as u32,
    ))
}

/// Load the maps sized for `max_pods` pods in a fresh instance (this
/// process), register that many policies and report. Cookies are made up
/// (`1 << 62 | i`), far above any real one.
pub fn measure(max_pods: u32) -> Result<Figures> {
    let sizes = MapSizes {
        max_pods,
        ..MapSizes::DEFAULT
    };
    let namespaces = max_pods as usize;
    let flags = policy_flags();
    let base = policy_for(&flags)?;
    let rss_start_kib = rss_kib()?;
    let mut interceptor = Interceptor::load_sized(sizes)?;
    let rss_loaded_kib = rss_kib()?;
    let loaded = map_memory()?;
    let mut register = Vec::with_capacity(namespaces);
    let mut policies = Vec::with_capacity(namespaces);
    for i in 0..namespaces {
        let mut p = base.clone();
        p.local_addrs = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            pod_ip(i),
        ];
        let cookie = 1u64 << 62 | i as u64;
        let t = Instant::now();
        interceptor
            .register(cookie, &p, divert::ebpf::RegisteredBy::Run)
            .with_context(|| format!("registering namespace {i} of {namespaces}"))?;
        register.push(t.elapsed().as_nanos() as u64);
        policies.push((cookie, p));
    }
    let rss_registered_kib = rss_kib()?;
    let registered = map_memory()?;
    let mut unregister = Vec::with_capacity(namespaces);
    for (cookie, p) in &policies {
        let t = Instant::now();
        interceptor.unregister(*cookie, p)?;
        unregister.push(t.elapsed().as_nanos() as u64);
    }
    register.sort_unstable();
    unregister.sort_unstable();
    let total = |m: &[MapMemory]| m.iter().map(|m| m.memlock_bytes).sum::<u64>();
    let maps = registered
        .iter()
        .map(|r| MapFigure {
            name: r.name.clone(),
            max_entries: r.max_entries,
            loaded_bytes: loaded
                .iter()
                .find(|l| l.id == r.id)
                .map_or(0, |l| l.memlock_bytes),
            registered_bytes: r.memlock_bytes,
        })
        .collect();
    Ok(Figures {
        max_pods,
        max_connections: sizes.max_connections,
        namespaces,
        policy_flags: flags.join(" "),
        register_p50_us: us(&register, 0.50),
        register_p99_us: us(&register, 0.99),
        unregister_p50_us: us(&unregister, 0.50),
        rss_start_kib,
        rss_loaded_kib,
        rss_registered_kib,
        maps_loaded_bytes: total(&loaded),
        maps_registered_bytes: total(&registered),
        maps,
        daemon: None,
    })
}

/// Run [`measure`] in a fresh `divert-bench registry` process and read its
/// figures from its stdout (so the RSS is of a process that did only this).
pub fn measure_in_child(max_pods: u32) -> Result<Figures> {
    let out = Command::new(super::bench_exe()?)
        .args(["registry", "--max-pods", &max_pods.to_string()])
        .output()
        .context("spawning divert-bench registry")?;
    if !out.status.success() {
        bail!(
            "divert-bench registry failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading divert-bench registry's figures")
}

/// Start `divert daemon --max-pods max_pods` (the binary beside this one)
/// in a memory cgroup of its own — cgroup v1's memory controller where it
/// is mounted, else a cgroup v2 child with `memory` — attached at a child
/// cgroup made for it, pins under a bpffs of its own; once it serves,
/// read the cgroup's usage, its RSS and its maps' memory; then stop it and
/// remove everything.
pub fn daemon_memory(max_pods: u32) -> Result<DaemonMemory> {
    use std::os::unix::process::CommandExt;
    let tag = format!("divert-bench-daemon-{}", std::process::id());
    let memcg = MemoryCgroup::create(&tag)?;
    let cg2 = divert::cgroup::cgroup2_mount()?;
    let root = crate::Cgroup::create(cg2.join(&tag))?;
    // Its pins, removed (and the bpffs it mounts unmounted) on drop.
    let bpffs = crate::node::Bpffs::tempdir();
    let dir = bpffs.dir.path();
    let log = dir.join("daemon.log");
    let exe = crate::sibling_bin("divert");
    let procs = fs::OpenOptions::new().write(true).open(memcg.procs())?;
    let procs_fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    let mut cmd = Command::new(&exe);
    cmd.arg("daemon")
        .arg("--cgroup-root")
        .arg(&root.path)
        .arg("--bpffs-dir")
        .arg(bpffs.path())
        .arg("--socket")
        .arg(dir.join("divert.sock"))
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--max-pods",
            &max_pods.to_string(),
        ])
        .stderr(fs::File::create(&log)?);
    // SAFETY: one write(2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let daemon = crate::Daemon::spawn("divert daemon", cmd)?;
    let ready = crate::wait_for_line(&log, "metrics on", std::time::Duration::from_secs(30));
    let measured = ready.and_then(|_| {
        // Let start-up allocations settle.
        std::thread::sleep(std::time::Duration::from_secs(1));
        let rss_kib = rss_kib_of(&daemon.child.id().to_string())?;
        // Holding the pinned maps open, this process sees their memory
        // (it holds no other maps here).
        let _maps = divert::ebpf::pinned::open_maps(&bpffs.path())?;
        let maps_bytes = map_memory()?.iter().map(|m| m.memlock_bytes).sum();
        Ok(DaemonMemory {
            cgroup_bytes: memcg.usage()?,
            page_cache_bytes: memcg.page_cache()?,
            rss_kib,
            maps_bytes,
        })
    });
    drop(daemon);
    measured.with_context(|| fs::read_to_string(&log).unwrap_or_default())
}

/// A memory cgroup of the bench's own, removed on drop.
struct MemoryCgroup {
    dir: std::path::PathBuf,
    v1: bool,
}

impl MemoryCgroup {
    fn create(name: &str) -> Result<MemoryCgroup> {
        let mounts = fs::read_to_string("/proc/self/mounts")?;
        let v1 = mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == "memory"))
                .then(|| std::path::PathBuf::from(f[1]))
        });
        let (dir, v1) = match v1 {
            Some(m) => (m.join(name), true),
            None => {
                let cg2 = divert::cgroup::cgroup2_mount()?;
                let controllers = fs::read_to_string(cg2.join("cgroup.subtree_control"))?;
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    bail!("no memory controller: neither a cgroup v1 memory hierarchy nor memory in the cgroup v2 root's subtree_control");
                }
                (cg2.join(name), false)
            }
        };
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(MemoryCgroup { dir, v1 })
    }

    fn procs(&self) -> std::path::PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Bytes charged to the cgroup now.
    fn usage(&self) -> Result<u64> {
        let file = if self.v1 {
            "memory.usage_in_bytes"
        } else {
            "memory.current"
        };
        let text = fs::read_to_string(self.dir.join(file))?;
        text.trim()
            .parse()
            .with_context(|| format!("{file}: {text}"))
    }
}

impl MemoryCgroup {
    /// Bytes of page cache charged to the cgroup now.
    fn page_cache(&self) -> Result<u64> {
        let key = if self.v1 { "cache" } else { "file" };
        let text = fs::read_to_string(self.dir.join("memory.stat"))?;
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no {key} in memory.stat: {text}"))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The daemon is gone; its charges move to the parent on removal.
        let _ = divert::cgroup::remove_cgroup(&self.dir);
    }
}
