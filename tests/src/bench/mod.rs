//! `cargo xtask bench`: divert's eBPF redirect against divert's iptables
//! rules and against no interception at all, measured side by side.
//!
//! For each exclude-range count R, three fresh twin network namespaces are
//! made, identical but for how outbound TCP reaches the proxy:
//!
//! | backend    | the client dials    | how it lands on 127.0.0.1:15001                        |
//! |------------|---------------------|---------------------------------------------------------|
//! | `floor`    | 127.0.0.1:15001     | it does not need to: no interception at all            |
//! | `iptables` | 10.212.0.2:80       | the nat rules `divert init --backend iptables` writes  |
//! | `ebpf`     | 10.212.0.2:80       | divert's cgroup programs, policy registered for the ns |
//!
//! Both diverting backends get the same policy, istio-iptables' flags
//! `-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x <R ranges>`, with R
//! exclude ranges the destination does not match ([`exclude_ranges`]). Each
//! namespace has a proxy pinned to one CPU and a client pinned to another
//! (see [`peer`]); the configurations take turns batch by batch
//! (floor, iptables, ebpf, floor, …) so that drift on a noisy machine falls
//! on all three alike. Every connection is checked: a diverting backend's
//! connection must reach the proxy with the original destination, the
//! floor's must not have one.
//!
//! Nothing here asserts on time: the run prints and writes what it measured.

pub mod peer;
pub mod perf;
pub mod pod;
pub mod registry;
pub mod report;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use divert::{
    ebpf::{Interceptor, RunTimeStats},
    iptables::{self, Family},
    policy::Policy,
};
use divert_common::MapSizes;
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::{command_in, goldens::policy_for, Cgroup, Netns, Placement};
use peer::{Command, Reply};

/// Where the diverting backends' client dials: an address routed out of a
/// veth in its namespace, never answered, so only a redirect reaches a proxy.
pub const DESTINATION: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 212, 0, 2), 80);
/// The outbound proxy port (`-p`), where the proxy listens on 127.0.0.1.
pub const PROXY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001);
/// The conntrack batch binds its connections to source ports from here up
/// (at most 65535 − this many connections), so no two share a tuple.
const CONNTRACK_FIRST_PORT: u16 = 40_000;
/// The client's UID and GID: not the proxy's, so it is diverted.
const CLIENT_IDS: (u32, u32) = (65534, 65534);
/// The proxy's UID and GID (`-u 1337`), as Istio runs Envoy.
const PROXY_IDS: (u32, u32) = (1337, 1337);

/// How a connection reaches the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// No interception: the client dials the proxy itself.
    Floor,
    /// divert's iptables backend (istio-iptables' nat rules).
    Iptables,
    /// divert's eBPF programs.
    Ebpf,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Floor, Backend::Iptables, Backend::Ebpf];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Floor => "floor",
            Backend::Iptables => "iptables",
            Backend::Ebpf => "ebpf",
        }
    }

    fn dial(self) -> SocketAddrV4 {
        match self {
            Backend::Floor => PROXY,
            _ => DESTINATION,
        }
    }

    fn expect_original(self) -> Option<SocketAddrV4> {
        match self {
            Backend::Floor => None,
            _ => Some(DESTINATION),
        }
    }
}

/// How much to measure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// Exclude-range counts, each measured in fresh namespaces.
    pub ranges: Vec<usize>,
    /// Latency rounds; each round runs one batch per backend, in turn.
    pub rounds: usize,
    /// Connections per batch.
    pub batch: usize,
    /// Connections per backend before measuring (discarded).
    pub warmup: usize,
    /// Connections (closed with a FIN, as applications do) whose conntrack
    /// entries are counted.
    pub conntrack_connections: usize,
    /// Bytes per bulk transfer, and transfers per backend.
    pub bulk_bytes: u64,
    pub bulk_rounds: usize,
    /// Connections under eBPF with the kernel's run-time accounting on.
    pub profile_connections: usize,
    /// Node sizes (`--max-pods`) for the registration and memory figures:
    /// maps sized for each, that many namespaces registered, and the
    /// daemon's memory.
    pub max_pods: Vec<u32>,
}

impl Settings {
    /// The full run: every range count, 20,000 samples per configuration.
    pub fn full() -> Settings {
        Settings {
            ranges: vec![1, 100, 1_000, 10_000],
            rounds: 40,
            batch: 500,
            warmup: 500,
            conntrack_connections: 10_000,
            bulk_bytes: 256 << 20,
            bulk_rounds: 3,
            profile_connections: 5_000,
            max_pods: vec![MapSizes::DEFAULT.max_pods, 1_000, MapSizes::PODS_RANGE.1],
        }
    }

    /// Enough to prove every part works, not to measure: for the test that
    /// keeps the benchmark from rotting.
    pub fn smoke() -> Settings {
        Settings {
            ranges: vec![1, 1_000],
            rounds: 2,
            batch: 50,
            warmup: 10,
            conntrack_connections: 200,
            bulk_bytes: 1 << 20,
            bulk_rounds: 1,
            profile_connections: 100,
            max_pods: vec![16],
        }
    }

    /// Well under a minute on two cores: 1 and 10,000 ranges, 5,000
    /// samples per configuration.
    pub fn quick() -> Settings {
        Settings {
            ranges: vec![1, 10_000],
            rounds: 10,
            batch: 500,
            warmup: 200,
            conntrack_connections: 10_000,
            bulk_bytes: 64 << 20,
            bulk_rounds: 2,
            profile_connections: 2_000,
            max_pods: vec![MapSizes::DEFAULT.max_pods, MapSizes::PODS_RANGE.1],
        }
    }
}

/// One backend at one range count: a row of `results.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub backend: Backend,
    /// Exclude ranges in the policy (the floor has none; its row is the
    /// floor measured alongside that range count).
    pub ranges: usize,
    /// Connect latency, `connect()` start to the proxy's `accept()`, ns.
    pub p50_ns: u64,
    pub p99_ns: u64,
    /// Sequential connections per second (connect, one exchange, close),
    /// median over the batches.
    pub connections_per_sec: f64,
    /// Latency samples behind the percentiles.
    pub samples: usize,
    /// The proxy's `getsockopt(SO_ORIGINAL_DST)`, ns (on the floor it fails
    /// with ENOENT: nothing was translated).
    pub so_original_dst_p50_ns: u64,
    /// Conntrack entries in the namespace after `conntrack_connections`
    /// connections, scaled to 10,000.
    pub conntrack_entries_per_10k: u64,
    /// Bulk throughput client → proxy, MB/s (10^6 bytes), median.
    pub bulk_mb_per_sec: f64,
    /// Time to put the policy in place (iptables-restore, or the map
    /// writes of one registration), ms; 0 for the floor.
    pub policy_install_ms: f64,
    /// eBPF only: what each program costs, from the kernel's run-time
    /// accounting over a separate batch (not the latency batches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramCost>,
    /// eBPF with `--perf` only: where each program's time goes, from
    /// sampled call stacks over another batch ([`perf`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub perf: Vec<perf::ProgramProfile>,
}

/// One eBPF program's cost over the profiling batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramCost {
    /// e.g. `divert_connect4`.
    pub name: String,
    /// Mean run time per invocation, ns.
    pub ns_per_run: u64,
    /// Invocations per connection (sock_ops runs for several TCP events).
    pub runs_per_connection: f64,
}

/// What the whole run measured, `run.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Run {
    pub machine: Machine,
    pub settings: Settings,
    pub rows: Vec<Row>,
    /// One per node size ([`Settings::max_pods`]).
    pub registry: Vec<registry::Figures>,
    /// Inbound and DNS capture ([`pod`]); empty in runs from before them.
    #[serde(default)]
    pub pod: Vec<pod::PodRow>,
}

/// Where it ran.
#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    /// CPUs the client and the proxy were pinned to (`None`: one CPU only,
    /// nothing pinned).
    pub client_cpu: Option<usize>,
    pub proxy_cpu: Option<usize>,
    /// The iptables binary divert's backend chose in a fresh namespace.
    pub iptables: String,
}

/// `n` IPv4 ranges none of which contains [`DESTINATION`]: consecutive
/// 64-address blocks of 172.16.0.0/12, with prefixes /26 to /32 in turn so
/// that LPM tries and rule lists see mixed lengths. `n` ≤ 16,384.
pub fn exclude_ranges(n: usize) -> Vec<Ipv4Network> {
    assert!(n <= 16_384, "172.16.0.0/12 holds 16,384 blocks of 64");
    (0..n)
        .map(|i| {
            let base = u32::from(Ipv4Addr::new(172, 16, 0, 0)) + (i as u32) * 64;
            Ipv4Network::new(Ipv4Addr::from(base), 26 + (i % 7) as u8).expect("valid prefix")
        })
        .collect()
}

/// The policy both diverting backends get at `ranges` exclude ranges.
pub fn policy(ranges: usize) -> Result<Policy> {
    let x: Vec<String> = exclude_ranges(ranges)
        .iter()
        .map(|r| r.to_string())
        .collect();
    let flags = [
        "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([x.join(",")])
    .collect::<Vec<_>>();
    policy_for(&flags)
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A long-lived benchmark client process (`divert-bench client`, driven
/// over stdin), killed on drop.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    backend: Backend,
    /// What it is, for errors: e.g. `ebpf client`.
    what: String,
}

impl Client {
    /// Spawn the client at `place`, pinned to `cpu`.
    fn spawn(
        place: Placement<'_>,
        cpu: Option<usize>,
        backend: Backend,
        what: String,
    ) -> Result<Client> {
        let (mut cmd, _keep) = command_in(place, bench_exe()?)?;
        cmd.arg("client");
        if let Some(c) = cpu {
            cmd.args(["--cpu", &c.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning the {what}"))?;
        Ok(Client {
            stdin: child.stdin.take().expect("piped"),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            backend,
            what,
        })
    }

    fn call(&mut self, cmd: &Command) -> Result<Reply> {
        serde_json::to_writer(&mut self.stdin, cmd)?;
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .with_context(|| self.what.clone())?;
        if line.is_empty() {
            bail!("the {} exited", self.what);
        }
        let reply: Reply = serde_json::from_str(&line)?;
        if let Some(e) = reply.error {
            bail!("{}: {e}", self.what);
        }
        Ok(reply)
    }

    fn connect(&mut self, count: usize, reset: bool, first_port: Option<u16>) -> Result<Reply> {
        self.call(&Command::Connect {
            dst: self.backend.dial(),
            count,
            reset,
            first_port,
            expect_original: self.backend.expect_original(),
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cgroups of a run, under `<cgroup2>/divert-bench-<pid>`: eBPF's
/// workload and proxy cgroups, and one with nothing attached.
struct Cgroups {
    workload: Cgroup,
    proxy: Cgroup,
    plain: Cgroup,
    _root: Cgroup,
}

/// One backend's namespace with its proxy and client running.
struct Twin {
    backend: Backend,
    client: Client,
    _proxy: crate::Daemon,
    netns: Netns,
    install_ms: f64,
    /// The eBPF registration to undo when this range count is done.
    registered: Option<(u64, Policy)>,
    samples: Vec<u64>,
    sockopt: Vec<u64>,
    cps: Vec<f64>,
    bulk: Vec<f64>,
    conntrack: u64,
}

/// CPUs for the client and the proxy: 0 and 1 when there are two or more.
fn cpus() -> (Option<usize>, Option<usize>) {
    match std::thread::available_parallelism().map_or(1, |n| n.get()) {
        1 => (None, None),
        _ => (Some(0), Some(1)),
    }
}

/// The `divert-bench` executable whose `proxy`, `client` and `registry`
/// roles the run spawns: this process when it is divert-bench, else the one
/// built next to it (a test binary driving [`measure`]).
pub(crate) fn bench_exe() -> Result<std::path::PathBuf> {
    let me = std::env::current_exe().context("finding the current executable")?;
    if me
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("divert-bench"))
    {
        return Ok(me);
    }
    let sibling = crate::sibling_bin("divert-bench");
    if !sibling.exists() {
        bail!(
            "{} is missing: build the binaries first (cargo build --bins)",
            sibling.display()
        );
    }
    Ok(sibling)
}

impl Twin {
    fn start(
        backend: Backend,
        ranges: usize,
        cgroups: &Cgroups,
        interceptor: &mut Interceptor,
    ) -> Result<Twin> {
        let netns = Netns::create(&format!(
            "divert-bench-{}-{}",
            std::process::id(),
            backend.name()
        ))?;
        netns.ip(&[
            "link", "add", "dvb0", "type", "veth", "peer", "name", "dvb1",
        ])?;
        netns.ip(&["addr", "add", "10.212.0.1/24", "dev", "dvb0"])?;
        netns.ip(&["link", "set", "dvb0", "up"])?;
        netns.ip(&["link", "set", "dvb1", "up"])?;
        netns.enter(|| {
            // Kernel-picked source ports stay below CONNTRACK_FIRST_PORT,
            // which the conntrack batch binds explicitly, one port each.
            fs::write(
                "/proc/sys/net/ipv4/ip_local_port_range",
                format!("16384 {}", CONNTRACK_FIRST_PORT - 1),
            )
        })??;
        let mut registered = None;
        let install_ms = match backend {
            Backend::Floor => 0.0,
            Backend::Iptables => {
                let p = policy(ranges)?;
                netns.enter(move || -> Result<f64> {
                    let ipt = iptables::detect(Family::V4)?;
                    let set = iptables::render(&p, &Default::default(), Family::V4);
                    let t = Instant::now();
                    iptables::apply(&[(ipt, set)])?;
                    Ok(t.elapsed().as_secs_f64() * 1e3)
                })??
            }
            Backend::Ebpf => {
                let mut p = policy(ranges)?;
                let (cookie, local) = netns.enter(|| -> Result<_> {
                    Ok((
                        divert::netns::current_cookie()?,
                        divert::netns::local_addresses()?,
                    ))
                })??;
                p.local_addrs = local;
                let t = Instant::now();
                interceptor.register(cookie, &p, divert::ebpf::RegisteredBy::Run)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                registered = Some((cookie, p));
                ms
            }
        };
        let (client_cpu, proxy_cpu) = cpus();
        let (client_cg, proxy_cg) = match backend {
            Backend::Ebpf => (&cgroups.workload, &cgroups.proxy),
            _ => (&cgroups.plain, &cgroups.plain),
        };
        let exe = bench_exe()?;
        let (mut cmd, _keep) = command_in(
            Placement {
                netns: &netns,
                cgroup: proxy_cg,
                ids: Some(PROXY_IDS),
            },
            &exe,
        )?;
        cmd.args(["proxy", &PROXY.to_string()]);
        if let Some(c) = proxy_cpu {
            cmd.args(["--cpu", &c.to_string()]);
        }
        let proxy = crate::Daemon::spawn(&format!("{} proxy", backend.name()), cmd)?;
        crate::wait_listening(&netns, &[PROXY.into()], std::time::Duration::from_secs(10))?;
        let client = Client::spawn(
            Placement {
                netns: &netns,
                cgroup: client_cg,
                ids: Some(CLIENT_IDS),
            },
            client_cpu,
            backend,
            format!("{} client", backend.name()),
        )?;
        Ok(Twin {
            backend,
            client,
            _proxy: proxy,
            netns,
            install_ms,
            registered,
            samples: Vec::new(),
            sockopt: Vec::new(),
            cps: Vec::new(),
            bulk: Vec::new(),
            conntrack: 0,
        })
    }

    fn conntrack_count(&self) -> Result<u64> {
        let text = self.netns.enter(|| {
            fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count").unwrap_or_default()
        })?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    fn row(&mut self, ranges: usize, settings: &Settings) -> Row {
        self.samples.sort_unstable();
        self.sockopt.sort_unstable();
        Row {
            backend: self.backend,
            ranges,
            p50_ns: percentile(&self.samples, 0.50),
            p99_ns: percentile(&self.samples, 0.99),
            connections_per_sec: median_f64(self.cps.clone()),
            samples: self.samples.len(),
            so_original_dst_p50_ns: percentile(&self.sockopt, 0.50),
            conntrack_entries_per_10k: self.conntrack * 10_000
                / settings.conntrack_connections.max(1) as u64,
            bulk_mb_per_sec: median_f64(self.bulk.clone()),
            policy_install_ms: self.install_ms,
            programs: Vec::new(),
            perf: Vec::new(),
        }
    }
}

fn say(msg: impl AsRef<str>) {
    eprintln!("divert-bench: {}", msg.as_ref());
}

/// Measure every range count of `settings`; returns one row per backend
/// and range count.
/// Measure every range count of `settings`. With `perf_dir`, also sample
/// the programs' call stacks there ([`perf`]).
pub fn measure(settings: &Settings, perf_dir: Option<&std::path::Path>) -> Result<Vec<Row>> {
    let cg2 = divert::cgroup::cgroup2_mount()?;
    let root = Cgroup::create(cg2.join(format!("divert-bench-{}", std::process::id())))?;
    let cgroups = Cgroups {
        workload: root.child("workload")?,
        proxy: root.child("proxy")?,
        plain: root.child("plain")?,
        _root: root,
    };
    let mut interceptor = Interceptor::load()?;
    interceptor.attach_workload(cgroups.workload.file()?)?;
    interceptor.attach_proxy(cgroups.proxy.file()?)?;
    let mut rows = Vec::new();
    for &ranges in &settings.ranges {
        say(format!(
            "{ranges} exclude ranges: setting up the three namespaces"
        ));
        let mut twins = Vec::new();
        for b in Backend::ALL {
            twins.push(Twin::start(b, ranges, &cgroups, &mut interceptor)?);
        }
        // First, in the fresh namespaces: every entry counted is one of
        // these connections (closed with a FIN, so each lingers in
        // TIME_WAIT, 120 s, rather than expiring during the count).
        say(format!(
            "{ranges} ranges: {} connections each for conntrack",
            settings.conntrack_connections
        ));
        for t in &mut twins {
            let before = t.conntrack_count()?;
            t.client.connect(
                settings.conntrack_connections,
                false,
                Some(CONNTRACK_FIRST_PORT),
            )?;
            t.conntrack = t.conntrack_count()?.saturating_sub(before);
        }
        for t in &mut twins {
            t.client.connect(settings.warmup, true, None)?;
        }
        say(format!(
            "{ranges} ranges: {} rounds of {} connections per backend",
            settings.rounds, settings.batch
        ));
        for _ in 0..settings.rounds {
            for t in &mut twins {
                let r = t.client.connect(settings.batch, true, None)?;
                t.cps
                    .push(settings.batch as f64 / (r.elapsed_ns as f64 / 1e9));
                t.samples.extend(r.latency_ns);
                t.sockopt.extend(r.sockopt_ns);
            }
        }
        for _ in 0..settings.bulk_rounds {
            for t in &mut twins {
                let dst = t.backend.dial();
                let r = t.client.call(&Command::Bulk {
                    dst,
                    bytes: settings.bulk_bytes,
                })?;
                t.bulk
                    .push(r.bytes as f64 / 1e6 / (r.elapsed_ns as f64 / 1e9));
            }
        }
        let programs = profile(&mut interceptor, &mut twins[2], settings)?;
        let sampled = match perf_dir {
            Some(dir) => {
                let n = PERF_CONNECTIONS_PER_PROFILED * settings.profile_connections;
                say(format!("{ranges} ranges: {n} connections under perf"));
                let rec = perf::start(&dir.join(format!("perf-{ranges}.data")))?;
                twins[2].client.connect(n, true, None)?;
                rec.finish()?
            }
            None => Vec::new(),
        };
        for t in &mut twins {
            let mut row = t.row(ranges, settings);
            if t.backend == Backend::Ebpf {
                row.programs = programs.clone();
                row.perf = sampled.clone();
            }
            rows.push(row);
        }
        for t in &mut twins {
            if let Some((cookie, p)) = t.registered.take() {
                interceptor.unregister(cookie, &p)?;
            }
        }
    }
    Ok(rows)
}

/// The perf batch is this many times `profile_connections`: a sample is
/// 50 µs of a CPU, and the programs take a few µs per connection.
pub const PERF_CONNECTIONS_PER_PROFILED: usize = 4;

/// What each eBPF program costs over `profile_connections` connections
/// with the kernel's accounting on.
fn profile(
    interceptor: &mut Interceptor,
    twin: &mut Twin,
    settings: &Settings,
) -> Result<Vec<ProgramCost>> {
    let stats = RunTimeStats::enable().context("turning on BPF run-time statistics")?;
    let before = interceptor.program_stats()?;
    twin.client
        .connect(settings.profile_connections, true, None)?;
    let after = interceptor.program_stats()?;
    drop(stats);
    Ok(after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.run_count > b.run_count)
        .map(|(a, b)| {
            let runs = a.run_count - b.run_count;
            ProgramCost {
                name: a.name.clone(),
                ns_per_run: (a.run_time_ns - b.run_time_ns) / runs,
                runs_per_connection: runs as f64 / settings.profile_connections as f64,
            }
        })
        .collect())
}

/// Kernel, CPU model, CPU count, pinning and the iptables variant.
pub fn machine() -> Result<Machine> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let (client_cpu, proxy_cpu) = cpus();
    let probe = Netns::create(&format!("divert-bench-{}-probe", std::process::id()))?;
    let iptables = probe.enter(|| iptables::detect(Family::V4).map(|i| i.command.clone()))??;
    Ok(Machine {
        kernel,
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        client_cpu,
        proxy_cpu,
        iptables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_ranges_are_distinct_and_never_hold_the_destination() {
        let ranges = exclude_ranges(10_000);
        assert_eq!(ranges.len(), 10_000);
        for w in ranges.windows(2) {
            // Consecutive 64-address blocks: no overlap, strictly increasing.
            assert!(u32::from(w[0].broadcast()) < u32::from(w[1].network()));
        }
        assert!(ranges.iter().all(|r| !r.contains(*DESTINATION.ip())));
        let prefixes: std::collections::BTreeSet<u8> = ranges.iter().map(|r| r.prefix()).collect();
        assert_eq!(prefixes, (26..=32).collect());
    }

    #[test]
    fn the_policy_excludes_every_range_and_redirects_the_destination() {
        let p = policy(100).unwrap();
        assert_eq!(p.exclude_ranges.len(), 100);
        let v = divert::policy::verdict(&p, DESTINATION.into(), CLIENT_IDS.0, CLIENT_IDS.1);
        assert_eq!(v.action, divert::policy::Action::Redirect(15001));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
