//! Registration latency, map memory and process RSS with many registered
//! namespaces, measured in a process of its own (`divert-bench registry`)
//! that holds one loaded [`Interceptor`] and nothing else, the way the node
//! daemon will. Nothing is attached: only the maps are written, under
//! made-up netns cookies (no namespace connects through them).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use divert::ebpf::{map_memory, Interceptor, MapMemory};
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
    let status = fs::read_to_string("/proc/self/status")?;
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

/// Register `namespaces` policies in a fresh instance (this process) and
/// report. Cookies are made up (`1 << 62 | i`), far above any real one.
pub fn measure(namespaces: usize) -> Result<Figures> {
    let flags = policy_flags();
    let base = policy_for(&flags)?;
    let rss_start_kib = rss_kib()?;
    let mut interceptor = Interceptor::load()?;
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
    })
}

/// Run [`measure`] in a fresh `divert-bench registry` process and read its
/// figures from its stdout (so the RSS is of a process that did only this).
pub fn measure_in_child(namespaces: usize) -> Result<Figures> {
    let out = Command::new(super::bench_exe()?)
        .args(["registry", "--namespaces", &namespaces.to_string()])
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
