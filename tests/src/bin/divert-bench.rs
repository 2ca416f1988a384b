//! `divert-bench`: what `cargo xtask bench` runs (as root). See
//! `divert_tests::bench` for what is measured and how.
//!
//! Writes `<out>/results.json` (one object per backend and range count),
//! `<out>/run.json` (machine, settings, every figure), `<out>/summary.txt`
//! (the printed report) and `<out>/connect-latency.png`.

use std::{fs, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use divert_tests::bench::{self, peer, registry, report, Run, Settings};

#[derive(Parser)]
#[command(
    name = "divert-bench",
    about = "divert against iptables and against no interception"
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// A few minutes on two cores: 1 and 10,000 ranges, fewer samples.
    #[arg(long)]
    quick: bool,
    /// Where the results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Also sample the eBPF programs' call stacks with `perf record` and
    /// report where their time goes (perf-<ranges>.data in --out).
    #[arg(long)]
    perf: bool,
    /// Measure nothing: redraw summary.txt and connect-latency.png in
    /// --out from the run.json of an earlier run.
    #[arg(long, value_name = "RUN_JSON")]
    report_from: Option<PathBuf>,
}

/// The processes the benchmark spawns of itself.
#[derive(Subcommand)]
enum Role {
    /// The proxy end, listening on ADDR (spawned by the benchmark).
    #[command(hide = true)]
    Proxy {
        addr: SocketAddr,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// The DNS proxy's stand-in, echoing datagrams on ADDR (spawned by the
    /// benchmark).
    #[command(hide = true)]
    DnsProxy {
        addr: SocketAddr,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// The client end, driven over stdin (spawned by the benchmark).
    #[command(hide = true)]
    Client {
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Registration latency and memory with N namespaces; prints JSON.
    #[command(hide = true)]
    Registry {
        #[arg(long)]
        max_pods: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.role {
        Some(Role::Proxy { addr, cpu }) => pin(cpu).and_then(|()| Ok(peer::proxy(addr)?)),
        Some(Role::DnsProxy { addr, cpu }) => pin(cpu).and_then(|()| Ok(peer::dns_proxy(addr)?)),
        Some(Role::Client { cpu }) => pin(cpu).and_then(|()| Ok(peer::client()?)),
        Some(Role::Registry { max_pods }) => registry::measure(max_pods).and_then(|f| {
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }),
        None => match &cli.report_from {
            Some(json) => redraw(json, &cli.out),
            None => orchestrate(cli.quick, cli.perf, &cli.out),
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("divert-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pin(cpu: Option<usize>) -> Result<()> {
    if let Some(c) = cpu {
        peer::pin_to_cpu(c).with_context(|| format!("pinning to CPU {c}"))?;
    }
    Ok(())
}

fn orchestrate(quick: bool, perf: bool, out: &PathBuf) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("needs root: it makes network namespaces, cgroups and iptables rules and loads eBPF programs");
    }
    let settings = if quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let machine = bench::machine()?;
    let rows = bench::measure(&settings, perf.then_some(out.as_path()))?;
    let pod = bench::pod::measure(&settings)?;
    let mut registry = Vec::new();
    for &max_pods in &settings.max_pods {
        eprintln!("divert-bench: a node of {max_pods} pods: registering them; the daemon's memory");
        let mut f = registry::measure_in_child(max_pods)?;
        f.daemon = Some(registry::daemon_memory(max_pods)?);
        registry.push(f);
    }
    let run = Run {
        machine,
        settings,
        rows,
        registry,
        pod,
    };
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&run.rows)?,
    )?;
    fs::write(out.join("run.json"), serde_json::to_string_pretty(&run)?)?;
    write_report(&run, out)
}

fn redraw(json: &PathBuf, out: &PathBuf) -> Result<()> {
    let text = fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let run: Run = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a run.json", json.display()))?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_report(&run, out)
}

/// Print the report and write summary.txt and connect-latency.png.
fn write_report(run: &Run, out: &std::path::Path) -> Result<()> {
    let text = report::text(run);
    fs::write(out.join("summary.txt"), &text)?;
    let png = out.join("connect-latency.png");
    report::chart(run, &png)?;
    println!("{text}");
    println!("wrote {} (summary.txt, connect-latency.png)", out.display());
    Ok(())
}
