//! `divert daemon`: the node agent. Loads the programs once, attaches them
//! at the cgroup root and pins everything under `--bpffs-dir` (a restart
//! adopts the pins; see [`crate::ebpf::pinned`]), then serves registrations
//! on `--socket` (see [`crate::daemon`]).

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Args;
use divert_common::MapSizes;
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

    /// Pods this node runs at most (the kubelet's maxPods): the maps'
    /// capacities for policies, addresses, ports, nameservers, DNS sockets
    /// and counter series follow from it (divert_common::MapSizes). A
    /// registration past it fails with "eBPF map … is full".
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.max_pods,
          value_parser = clap::value_parser!(u32).range(MapSizes::PODS_RANGE.0 as i64..=MapSizes::PODS_RANGE.1 as i64),
          env = "DIVERT_MAX_PODS")]
    pub max_pods: u32,

    /// Diverted TCP connections open at once on this node: the capacity of
    /// the original-destination maps, which the kernel preallocates (about
    /// 270 bytes per connection, all four together). Past it, the least
    /// recently used entries are evicted.
    #[arg(long, value_name = "N", default_value_t = MapSizes::DEFAULT.max_connections,
          value_parser = clap::value_parser!(u32).range(MapSizes::CONNECTIONS_RANGE.0 as i64..=MapSizes::CONNECTIONS_RANGE.1 as i64),
          env = "DIVERT_MAX_CONNECTIONS")]
    pub max_connections: u32,

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

    /// The node's CNI configuration directory as this process sees it (a
    /// hostPath mount): with --cni-bin-dir, divert-cni is chained into the
    /// primary configuration there, kept there when the primary rewrites
    /// its file, and taken out again by --uninstall.
    #[arg(
        long,
        value_name = "PATH",
        env = "DIVERT_CNI_CONF_DIR",
        requires = "cni_bin_dir"
    )]
    pub cni_conf_dir: Option<PathBuf>,

    /// The node's CNI bin directory as this process sees it: divert-cni
    /// (this binary) is copied there.
    #[arg(
        long,
        value_name = "PATH",
        env = "DIVERT_CNI_BIN_DIR",
        requires = "cni_conf_dir"
    )]
    pub cni_bin_dir: Option<PathBuf>,

    /// The kubeconfig divert-cni reads pods with, as a path on the node
    /// (the plugin runs there). Default: one written from this pod's
    /// service account into --cni-conf-dir, as divert-kubeconfig.
    #[arg(long, value_name = "PATH", env = "DIVERT_CNI_KUBECONFIG")]
    pub cni_kubeconfig: Option<PathBuf>,

    /// The CNI configuration directory as the node sees it (where the
    /// written kubeconfig is, for the plugin).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/cni/net.d",
        env = "DIVERT_CNI_HOST_CONF_DIR"
    )]
    pub cni_host_conf_dir: PathBuf,

    /// Detach and unpin everything under --bpffs-dir (and, with
    /// --cni-conf-dir, take divert-cni out of the node's CNI
    /// configuration), then exit.
    #[arg(long)]
    pub uninstall: bool,
}

/// How often the CNI configuration is checked (and repaired).
pub const CNI_REPAIR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Where divert-cni goes, and what its conflist entry says.
#[derive(Clone)]
struct CniInstall {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    entry: serde_json::Value,
    /// Where the kubeconfig written into `conf_dir` comes from, when none
    /// was given: read again at every check, so a rotated token is written.
    service_account: Option<ServiceAccount>,
}

/// This pod's service account and the API server's address.
#[derive(Clone, Debug)]
struct ServiceAccount {
    /// Holds `token` and `ca.crt`.
    dir: PathBuf,
    host: String,
    port: String,
}

/// Where a pod's service account is mounted.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl ServiceAccount {
    /// This pod's (`KUBERNETES_SERVICE_HOST` and `_PORT`, and
    /// [`SERVICE_ACCOUNT_DIR`]), checked readable now.
    fn of_this_pod() -> anyhow::Result<ServiceAccount> {
        let sa = ServiceAccount {
            dir: SERVICE_ACCOUNT_DIR.into(),
            host: std::env::var("KUBERNETES_SERVICE_HOST").context("KUBERNETES_SERVICE_HOST")?,
            port: std::env::var("KUBERNETES_SERVICE_PORT").context("KUBERNETES_SERVICE_PORT")?,
        };
        sa.kubeconfig()?;
        Ok(sa)
    }

    /// A kubeconfig for the API server with the service account's current
    /// token and CA: what the plugin, running on the node outside any pod,
    /// reads pods with.
    fn kubeconfig(&self) -> anyhow::Result<String> {
        let token = std::fs::read_to_string(self.dir.join("token")).context("the token")?;
        let ca = std::fs::read(self.dir.join("ca.crt")).context("the CA")?;
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://{host}:{}\n    certificate-authority-data: {ca}\n\
             users:\n- name: divert-cni\n  user:\n    token: {}\n\
             contexts:\n- name: divert-cni\n  context:\n    cluster: local\n    user: divert-cni\n\
             current-context: divert-cni\n",
            self.port,
            token.trim()
        ))
    }
}

impl CniInstall {
    fn of(args: &DaemonArgs) -> anyhow::Result<Option<CniInstall>> {
        let (Some(conf_dir), Some(bin_dir)) = (&args.cni_conf_dir, &args.cni_bin_dir) else {
            return Ok(None);
        };
        let (path, service_account) = match &args.cni_kubeconfig {
            Some(p) => (p.clone(), None),
            None => (
                args.cni_host_conf_dir.join(KUBECONFIG_NAME),
                Some(ServiceAccount::of_this_pod().context(
                    "writing divert-cni's kubeconfig from this pod's service account (or give --cni-kubeconfig)",
                )?),
            ),
        };
        Ok(Some(CniInstall {
            conf_dir: conf_dir.clone(),
            bin_dir: bin_dir.clone(),
            entry: serde_json::json!({
                "type": crate::conflist::PLUGIN,
                "daemon_socket": args.socket,
                "kubernetes": {"kubeconfig": path},
                "exclude_namespaces": args.exclude_namespaces,
            }),
            service_account,
        }))
    }

    /// Install or repair: the kubeconfig (when the token changed), the
    /// plugin binary (when `copy_binary`, or when it is gone: reading this
    /// binary at every check would cost far more than the check), and the
    /// conflist entry. Logs what changed.
    fn apply(&self, copy_binary: bool) -> anyhow::Result<()> {
        if let Some(sa) = &self.service_account {
            let k = sa.kubeconfig()?;
            let path = self.conf_dir.join(KUBECONFIG_NAME);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(k.as_str()) {
                std::fs::write(&path, &k).with_context(|| format!("writing {}", path.display()))?;
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        if copy_binary || !self.bin_dir.join(crate::conflist::PLUGIN).exists() {
            let exe = std::env::current_exe().context("finding this binary")?;
            crate::conflist::install_plugin(&self.bin_dir, &exe)?;
        }
        match crate::conflist::chain(&self.conf_dir, &self.entry)? {
            crate::conflist::Installed::Chained(p) => {
                tracing::info!(conflist = %p.display(), "divert-cni chained into the node's CNI configuration")
            }
            crate::conflist::Installed::NoPrimary => tracing::warn!(
                dir = %self.conf_dir.display(),
                "no CNI network configuration yet: divert-cni is chained when the primary plugin writes one"
            ),
            crate::conflist::Installed::AlreadyThere(_) => {}
        }
        Ok(())
    }
}

/// The kubeconfig divert writes for its CNI plugin.
pub const KUBECONFIG_NAME: &str = "divert-kubeconfig";

pub fn main(args: &DaemonArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("daemon", &e),
    }
}

fn run(args: &DaemonArgs) -> anyhow::Result<()> {
    if args.uninstall {
        if let (Some(conf), Some(bin)) = (&args.cni_conf_dir, &args.cni_bin_dir) {
            let restored = crate::conflist::uninstall(conf, bin)?;
            let _ = std::fs::remove_file(conf.join(KUBECONFIG_NAME));
            tracing::info!(restored = ?restored, "divert-cni taken out of the node's CNI configuration");
        }
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
    let cni = CniInstall::of(args).context("--cni-conf-dir")?;
    let http = daemon::metrics::bind(args.metrics_addr).context("--metrics-addr")?;
    let endpoint = daemon::Endpoint::bind(&args.socket).context("--socket")?;

    let sizes = MapSizes {
        max_pods: args.max_pods,
        max_connections: args.max_connections,
    };
    let (interceptor, opened) = pinned::open(&args.bpffs_dir, &cgroup_root, sizes)?;
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
        Opened::Upgraded(u) => tracing::info!(
            reused = ?u.reused,
            migrated = ?u.migrated,
            links_updated = u.links_updated,
            elapsed_ms = u.elapsed.as_secs_f64() * 1e3,
            "took over the pinned instance of another build under {} (attached at {}): every link switched to this build's programs in place",
            args.bpffs_dir.display(),
            cgroup_root.display()
        ),
    }
    let health = daemon::metrics::Health::default();
    let registry = Arc::new(Registry::new(interceptor, &args.bpffs_dir, health.clone())?);
    let ready = endpoint.readiness();
    let interval = std::time::Duration::from_secs_f64(args.gc_interval);
    let bound = http.local_addr()?;
    let metrics = Arc::new(daemon::metrics::Metrics::new(args.metrics_top, &health));
    let unregistered = metrics.unregistered_pods();
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
        if let Some(cni) = cni {
            // Chained now (the socket serves from here on), and again
            // whenever the primary plugin rewrites its configuration.
            tokio::spawn(async move {
                let mut last_error = String::new();
                let mut tick = tokio::time::interval(CNI_REPAIR_INTERVAL);
                // This build's binary is copied once (and again if removed).
                let mut copied = false;
                loop {
                    tick.tick().await;
                    let once = cni.clone();
                    let copy = !copied;
                    let outcome = match tokio::task::spawn_blocking(move || once.apply(copy))
                    .await
                    {
                        Ok(r) => r,
                        Err(e) => Err(anyhow::anyhow!("the CNI installer panicked: {e}")),
                    };
                    match outcome {
                        Ok(()) => {
                            copied = true;
                            last_error.clear();
                        }
                        Err(e) => {
                            let e = format!("{e:#}");
                            if e != last_error {
                                tracing::error!(error = %e, "chaining divert-cni into the node's CNI configuration");
                                last_error = e;
                            }
                        }
                    }
                }
            });
        }
        let watch = async {
            match node {
                Some(node) => {
                    tracing::info!(node = %node, "watching this node's pods");
                    daemon::kube::run(registry.clone(), node, exclude_namespaces, unregistered).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_service_account_token_is_written_at_the_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let (sa, conf, bin) = (
            dir.path().join("sa"),
            dir.path().join("net.d"),
            dir.path().join("bin"),
        );
        for d in [&sa, &conf, &bin] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(sa.join("ca.crt"), b"CA").unwrap();
        std::fs::write(sa.join("token"), "first-token\n").unwrap();
        let install = CniInstall {
            conf_dir: conf.clone(),
            bin_dir: bin,
            entry: serde_json::json!({"type": crate::conflist::PLUGIN}),
            service_account: Some(ServiceAccount {
                dir: sa.clone(),
                host: "fd00::1".into(),
                port: "443".into(),
            }),
        };
        let written = || std::fs::read_to_string(conf.join(KUBECONFIG_NAME)).unwrap();
        install.apply(true).unwrap();
        assert!(written().contains("token: first-token\n"), "{}", written());
        assert!(
            written().contains("server: https://[fd00::1]:443"),
            "{}",
            written()
        );
        std::fs::write(sa.join("token"), "second-token\n").unwrap();
        install.apply(false).unwrap();
        assert!(written().contains("token: second-token\n"), "{}", written());
    }
}
