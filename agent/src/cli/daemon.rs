//! `divert daemon`: the node agent. Loads the programs once, attaches them
//! at the cgroup root and pins everything under `--bpffs-dir` (a restart
//! adopts the pins; see [`crate::ebpf::pinned`]), then serves registrations
//! on `--socket` (see [`crate::daemon`]).

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    daemon::{self, proto, Registry},
    ebpf::pinned::{self, Opened},
};

/// Default bpffs directory of the pinned instance.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/divert";

/// Arguments of `divert daemon`.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// cgroup v2 directory the programs are attached at; every process below
    /// it whose network namespace is registered is diverted. Default: the
    /// cgroup v2 mount (from /proc/self/mountinfo).
    #[arg(long, value_name = "PATH", env = "DIVERT_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// bpffs directory for the pinned programs, links and maps (bpffs is
    /// mounted there if it is not).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS_DIR, env = "DIVERT_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,

    /// Registration socket for the pods' `divert init`.
    #[arg(long, value_name = "PATH", default_value = proto::DEFAULT_SOCKET, env = "DIVERT_DAEMON_SOCKET")]
    pub socket: PathBuf,

    /// Address of the HTTP endpoint: /metrics (Prometheus text) and
    /// /healthz/ready.
    #[arg(long, value_name = "ADDR", default_value = daemon::metrics::DEFAULT_ADDR, env = "DIVERT_METRICS_ADDR")]
    pub metrics_addr: std::net::SocketAddr,

    /// Destinations per network namespace with their own metric series; the
    /// rest are folded into destination="other".
    #[arg(long, value_name = "N", default_value_t = daemon::metrics::DEFAULT_TOP, env = "DIVERT_METRICS_TOP")]
    pub metrics_top: usize,

    /// Seconds between garbage-collection sweeps: the policy of a deleted
    /// network namespace is removed within this long (plus one sweep).
    #[arg(long, value_name = "SECONDS", default_value_t = daemon::gc::DEFAULT_INTERVAL.as_secs_f64(), env = "DIVERT_GC_INTERVAL")]
    pub gc_interval: f64,

    /// Watch this node's pods (NODE_NAME) and register the meshed ones the
    /// CNI plugin would (injected, with an istio-proxy sidecar and no
    /// istio-init), with the policy it would give them, live.
    #[arg(long, env = "DIVERT_KUBERNETES")]
    pub kubernetes: bool,

    /// Namespaces whose pods the pod watch never touches (comma-separated;
    /// istio-cni's excludeNamespaces).
    #[arg(
        long,
        value_name = "NAMESPACES",
        default_value = "kube-system",
        value_delimiter = ',',
        env = "DIVERT_EXCLUDE_NAMESPACES"
    )]
    pub exclude_namespaces: Vec<String>,

    /// Detach and unpin everything under --bpffs-dir, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

pub fn main(args: &DaemonArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("daemon", &e),
    }
}

fn run(args: &DaemonArgs) -> anyhow::Result<()> {
    if args.uninstall {
        let found = pinned::uninstall(&args.bpffs_dir)?;
        let _ = std::fs::remove_file(&args.socket);
        tracing::info!(
            "{} {}",
            if found {
                "detached and unpinned everything under"
            } else {
                "nothing pinned under"
            },
            args.bpffs_dir.display()
        );
        return Ok(());
    }
    // One runtime for everything the daemon serves: the registration
    // socket, /metrics, garbage collection and the pod watch. Blocking work
    // (entering a namespace, map writes) goes to its blocking pool, bounded
    // by the registrations served at once.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(daemon::MAX_CLIENTS + 8)
        // Idle blocking threads go soon after a burst of registrations.
        .thread_keep_alive(std::time::Duration::from_secs(1))
        .thread_name("divert-daemon")
        .enable_all()
        .build()
        .context("the daemon's runtime")?;
    // SIGTERM and SIGINT are caught from here on: one arriving while the
    // daemon starts is acted on once it serves, never half-way through an
    // install.
    let _in_runtime = rt.enter();
    let mut sigterm = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("catching SIGINT")?;

    // Everything that can be wrong with the input is found before bpffs or
    // the kernel is touched: a refused start leaves nothing behind.
    if !(args.gc_interval > 0.0 && args.gc_interval.is_finite()) {
        anyhow::bail!(
            "--gc-interval {}: must be a positive number of seconds",
            args.gc_interval
        );
    }
    let node = match (args.kubernetes, std::env::var("NODE_NAME")) {
        (false, _) => None,
        (true, Ok(n)) if !n.is_empty() => Some(n),
        (true, _) => anyhow::bail!(
            "--kubernetes needs NODE_NAME (set it from the downward API: spec.nodeName)"
        ),
    };
    let cgroup_root = match &args.cgroup_root {
        Some(p) => p.clone(),
        None => crate::cgroup::cgroup2_mount().context("finding the cgroup v2 mount")?,
    };
    crate::cgroup::open(&cgroup_root).context("--cgroup-root")?;
    let http = daemon::metrics::bind(args.metrics_addr).context("--metrics-addr")?;
    let endpoint = daemon::Endpoint::bind(&args.socket).context("--socket")?;

    let (interceptor, opened) = pinned::open(&args.bpffs_dir, &cgroup_root)?;
    match opened {
        Opened::Installed => tracing::info!(
            "attached at {} and pinned under {}",
            cgroup_root.display(),
            args.bpffs_dir.display()
        ),
        Opened::Adopted { relinked } => tracing::info!(
            "adopted the pinned instance under {} (attached at {}; {relinked} links made again)",
            args.bpffs_dir.display(),
            cgroup_root.display()
        ),
    }
    let registry = Arc::new(Registry::new(interceptor, &args.bpffs_dir)?);
    let ready = endpoint.readiness();
    let interval = std::time::Duration::from_secs_f64(args.gc_interval);
    let bound = http.local_addr()?;
    let metrics = Arc::new(daemon::metrics::Metrics::new(args.metrics_top));
    // A read-only handle of the metrics' own: scrapes never wait for, or
    // hold up, a registration.
    let reader = Arc::new(pinned::open_maps(&args.bpffs_dir)?);
    let shutdown = CancellationToken::new();
    let bpffs = args.bpffs_dir.clone();
    let exclude_namespaces = args.exclude_namespaces.clone();
    let socket = args.socket.display().to_string();
    rt.block_on(async move {
        tokio::spawn(
            registry
                .clone()
                .collect_garbage(interval, shutdown.clone()),
        );
        tokio::spawn({
            let (ready, shutdown) = (ready.clone(), shutdown.clone());
            async move {
                if let Err(e) =
                    daemon::metrics::serve(http, reader, metrics, ready, shutdown).await
                {
                    tracing::error!(error = %format!("{e:#}"), "the metrics endpoint stopped");
                }
            }
        });
        tracing::info!("metrics on http://{bound}/metrics, readiness on /healthz/ready");
        let watch = async {
            match node {
                Some(node) => {
                    tracing::info!(node = %node, "watching this node's pods");
                    daemon::kube::run(registry.clone(), node, exclude_namespaces).await
                }
                _ => std::future::pending().await,
            }
        };
        let mut serving = tokio::spawn(daemon::serve(endpoint, registry.clone(), shutdown.clone()));
        tracing::info!("serving registrations on {socket}");
        let signal = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
            stopped = watch => {
                let e = stopped.err().unwrap_or_else(|| anyhow::anyhow!("the pod watch ended"));
                tracing::error!(error = %format!("{e:#}"), "the Kubernetes pod watch stopped");
                std::process::exit(crate::cli::EXIT_SETUP.into());
            }
            served = &mut serving => {
                let e = match served {
                    Ok(Ok(_)) => anyhow::anyhow!("the registration socket closed"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("the registration server panicked: {e}"),
                };
                return Err(e);
            }
        };
        // The one way out: stop accepting, give the registrations under
        // way a moment to finish, then hold the maps (no write is
        // half-done) while the socket goes.
        shutdown.cancel();
        let _ = tokio::time::timeout(DRAIN, &mut serving).await;
        tokio::task::spawn_blocking(move || {
            let _maps = registry.hold();
            ready.remove_socket();
            tracing::info!(
                signal,
                "stopping: the programs stay attached and pinned under {}, so interception goes on; a restarted daemon adopts them",
                bpffs.display()
            );
            std::process::exit(0);
        })
        .await
        .context("stopping")?;
        Ok(())
    })
}

/// How long a stopping daemon waits for the registrations under way.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);
