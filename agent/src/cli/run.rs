//! `divert run [policy flags] -- CMD [ARGS…]`: run CMD with its outbound TCP
//! diverted to the proxy, everything private to this run and gone when it ends.

use std::{
    ffi::OsString,
    io::{self, Write},
    os::{fd::AsRawFd, unix::process::CommandExt as _, unix::process::ExitStatusExt as _},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{bail, Context as _};
use clap::{ArgMatches, Args};
use nix::{
    sys::signal::{kill, Signal},
    unistd::{geteuid, Pid},
};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cgroup::{self, TransientCgroup},
    ebpf::{Counter, Interceptor, RegisteredBy},
    netns,
    policy::{Policy, PolicyArgs},
};

/// Arguments of `divert run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,

    /// cgroup v2 directory the proxy runs in; divert's getsockopt program is
    /// attached there to answer the proxy's SO_ORIGINAL_DST [default: the
    /// cgroup v2 root]
    #[arg(long, value_name = "PATH")]
    pub proxy_cgroup: Option<PathBuf>,

    /// cgroup v2 directory under which CMD's transient cgroup is created
    /// [default: the cgroup v2 root]
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<PathBuf>,

    /// Print the per-destination connection counters to stderr when CMD exits.
    #[arg(long)]
    pub stats: bool,

    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Run `divert run`; returns CMD's exit status (128+N if killed by signal N),
/// or 2 when the policy is bad or the interception could not be set up.
pub fn main(args: &RunArgs, matches: &ArgMatches) -> ExitCode {
    let policy = match args.policy.to_policy(Some(matches)) {
        Ok(p) => p,
        Err(e) => return super::fail("run", &e.into()),
    };
    // The kernel compares GIDs: group names are resolved here, as iptables
    // would resolve them.
    let policy = match policy.owner_groups.resolved() {
        Ok(owner_groups) => Policy {
            owner_groups,
            ..policy
        },
        Err(e) => {
            return super::fail(
                "run",
                &anyhow::anyhow!("ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]: {e}"),
            )
        }
    };
    match run(args, policy) {
        Ok(code) => code,
        Err(e) => super::fail("run", &e),
    }
}

fn run(args: &RunArgs, mut policy: Policy) -> anyhow::Result<ExitCode> {
    if !geteuid().is_root() {
        bail!(
            "divert run must run as root: it loads eBPF programs and creates a cgroup (running as uid {})",
            geteuid()
        );
    }
    let root = cgroup::cgroup2_mount()?;
    let parent = args.cgroup_parent.clone().unwrap_or_else(|| root.clone());
    let proxy_path = args.proxy_cgroup.clone().unwrap_or_else(|| root.clone());
    let proxy_cgroup = cgroup::open(&proxy_path).context("--proxy-cgroup")?;

    let cookie = netns::current_cookie().context("reading this network namespace's cookie")?;
    policy.local_addrs = netns::local_addresses().context("listing this namespace's addresses")?;

    let mut interceptor = Interceptor::load()?;
    let cgroup = TransientCgroup::create(&parent, &format!("divert-run-{}", std::process::id()))
        .context("--cgroup-parent")?;
    interceptor.attach_workload(cgroup.open()?)?;
    interceptor.attach_proxy(&proxy_cgroup)?;
    interceptor.register(cookie, &policy, RegisteredBy::Run)?;
    if !policy.inbound_ports.is_none() {
        // Inbound capture: socket lookup in this namespace, and a capture
        // listener that was already listening.
        let netns =
            std::fs::File::open("/proc/self/ns/net").context("opening this network namespace")?;
        interceptor.attach_netns(&netns)?;
        let found = crate::ebpf::find_listeners(policy.inbound_capture_port);
        let adopted = interceptor.adopt_listeners(cookie, &found)?;
        tracing::info!(
            adopted,
            "capturing inbound connections to {:?} on port {}",
            policy.inbound_ports,
            policy.inbound_capture_port
        );
    }
    tracing::info!(
        netns_cookie = cookie,
        cgroup = %cgroup.path().display(),
        proxy_cgroup = %proxy_path.display(),
        "diverting outbound TCP to 127.0.0.1:{}",
        policy.proxy_port
    );

    let status = run_command(&args.command, &cgroup);

    // Counters are read before the maps go away with the instance.
    if args.stats {
        match interceptor.counters() {
            Ok(c) => print_stats(&mut io::stderr().lock(), cookie, &c),
            Err(e) => tracing::warn!("cannot read counters: {e}"),
        }
    }
    drop(interceptor);
    cgroup.remove()?;
    status
}

/// Spawn CMD inside `cgroup` and wait for it, forwarding SIGINT, SIGTERM,
/// SIGHUP and SIGQUIT. Returns its exit status as ours.
fn run_command(command: &[OsString], cgroup: &TransientCgroup) -> anyhow::Result<ExitCode> {
    let procs = cgroup.procs_for_writing()?;
    let procs_fd = procs.as_raw_fd();
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: between fork and exec the child only calls write(2), which is
    // async-signal-safe; it joins the transient cgroup before CMD starts.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(async {
        // Handlers first: a signal from here on reaches CMD, never kills us
        // before we clean up.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut quit = signal(SignalKind::quit())?;
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .with_context(|| format!("cannot start {:?}", command[0]))?;
        let pid = Pid::from_raw(child.id().context("child has no pid")? as i32);
        loop {
            let sig = tokio::select! {
                status = child.wait() => return anyhow::Ok(status?),
                _ = int.recv() => Signal::SIGINT,
                _ = term.recv() => Signal::SIGTERM,
                _ = hup.recv() => Signal::SIGHUP,
                _ = quit.recv() => Signal::SIGQUIT,
            };
            let _ = kill(pid, sig);
        }
    })?;
    drop(procs);
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
        _ => ExitCode::FAILURE,
    })
}

/// The counters of `netns`: the table `divert stats` prints.
pub fn print_stats(out: &mut impl Write, netns: u64, counters: &[Counter]) {
    let _ = writeln!(
        out,
        "divert: connections and bytes by destination (netns cookie {netns}):"
    );
    let rows = super::stats::rows(counters, &Default::default(), Some(netns), None);
    let _ = super::stats::print_table(out, &rows);
}
