//! `divert init [istio-iptables flags]`: the init container of a meshed pod,
//! a drop-in for `istio-iptables`. It configures interception for the
//! network namespace it runs in.
//!
//! Backends: `ebpf` registers the namespace's policy with the node daemon
//! (`divert daemon`) over its Unix socket; `iptables` writes the rules
//! istio-iptables writes (see [`crate::iptables`]); `auto` (the default)
//! uses the daemon when its socket answers and iptables otherwise, and says
//! which.

use std::{net::IpAddr, process::ExitCode};

use anyhow::Context as _;
use clap::{ArgMatches, Args, ValueEnum};

use crate::{
    iptables::{self, route, Family, Iptables, RuleSet},
    netns, nftables,
    policy::{go_bool, go_bool_flag, Capture, CaptureArgs, Policy, PolicyArgs},
};

/// How interception is put in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The node daemon when its socket answers, iptables otherwise.
    Auto,
    /// Register with the node daemon (`divert daemon`): eBPF programs.
    Ebpf,
    /// NAT rules in the pod's namespace, as istio-iptables writes them.
    Iptables,
}

/// Arguments of `divert init`: istio-iptables' flags and environment
/// variables with its spellings and defaults (`-i` defaults to `""` here,
/// as in istio-iptables), plus divert's own.
#[derive(Args, Debug, Clone)]
#[command(mut_arg("include_ranges", |a| a.default_value("")), mut_args(go_bool_flag))]
pub struct InitArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub capture: CaptureArgs,

    /// Interception backend.
    #[arg(long, value_enum, default_value = "auto", env = "DIVERT_BACKEND")]
    pub backend: Backend,

    /// The node daemon's registration socket (ebpf and auto backends).
    #[arg(long, value_name = "PATH", default_value = crate::daemon::proto::DEFAULT_SOCKET, env = "DIVERT_DAEMON_SOCKET")]
    pub daemon_socket: std::path::PathBuf,

    /// After applying, prove it from inside this namespace: listen on
    /// `127.0.0.1:<proxy port>`, connect to a destination the policy
    /// redirects, and require the connection to arrive there with that
    /// destination as its SO_ORIGINAL_DST (what Istio's validation init
    /// container checks). On failure the interception is removed again and
    /// init exits 2.
    #[arg(long, env = "DIVERT_VALIDATE")]
    pub validate: bool,

    /// Print the rules that would be written (iptables-restore input per
    /// address family) and change nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN", value_parser = go_bool, value_name = "BOOL")]
    pub dry_run: bool,

    /// Remove what divert init writes for these flags from this namespace,
    /// and nothing else; write nothing.
    #[arg(long = "cleanup", visible_alias = "cleanup-only", env = "CLEANUP_ONLY",
          conflicts_with = "dry_run", value_parser = go_bool, value_name = "BOOL")]
    pub cleanup: bool,

    /// istio-validation's check (`--validate` does divert's): from
    /// 127.0.0.1 (::1 when the namespace's first address is IPv6), connect
    /// to 127.0.0.6 (::6) at --iptables-probe-port, again every second,
    /// until a listener on the proxy port or the inbound capture port
    /// accepts it with that port as its original destination; run as the
    /// proxy's UID. Exits 126 when --probe-timeout passes first.
    #[arg(long = "run-validation", env = "RUN_VALIDATION", value_parser = go_bool, value_name = "BOOL")]
    pub run_validation: bool,

    /// Apply nothing (with --run-validation: check rules someone else,
    /// istio-cni, put in place).
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY", value_parser = go_bool, value_name = "BOOL")]
    pub skip_rule_apply: bool,

    /// The original destination port --run-validation dials.
    #[arg(
        long = "iptables-probe-port",
        env = "IPTABLES_PROBE_PORT",
        default_value = "15002",
        value_name = "PORT"
    )]
    pub iptables_probe_port: u16,

    /// How long --run-validation waits, in Go's duration syntax (`5s`,
    /// `1m30s`, `500ms`).
    #[arg(long = "probe-timeout", env = "PROBE_TIMEOUT", default_value = "5s",
          value_parser = go_duration, value_name = "DURATION")]
    pub probe_timeout: std::time::Duration,

    /// Replace rules already in the namespace instead of failing: what
    /// divert always does (its chains are rewritten whole in one
    /// transaction), so accepted.
    #[arg(long = "reconcile", env = "RECONCILE", value_parser = go_bool, value_name = "BOOL")]
    pub reconcile: bool,

    /// Apply even when the rules look in place: what divert always does,
    /// so accepted.
    #[arg(long = "force-apply", env = "FORCE_APPLY", value_parser = go_bool, value_name = "BOOL")]
    pub force_apply: bool,

    /// Which iptables binaries: `legacy` or `nft` (default: as
    /// istio-iptables detects).
    #[arg(
        long = "force-iptables-binary",
        env = "FORCE_IPTABLES_BINARY",
        value_name = "legacy|nft"
    )]
    pub force_iptables_binary: Option<String>,

    /// Another network namespace to configure (istio-cni's): not supported,
    /// refused; run divert in the namespace instead.
    #[arg(
        long = "network-namespace",
        env = "NETWORK_NAMESPACE",
        default_value = "",
        value_name = "PATH"
    )]
    pub network_namespace: String,

    /// Write istio-nftables' rules (three `inet` tables, applied with `nft
    /// -f`) instead of iptables rules (iptables backend).
    #[arg(long = "native-nftables", env = "NATIVE_NFTABLES", value_parser = go_bool, value_name = "BOOL")]
    pub native_nftables: bool,

    /// istio-cni's host-filesystem mode: not supported, refused.
    #[arg(long = "cni-mode", env = "CNI_MODE", value_parser = go_bool, value_name = "BOOL")]
    pub cni_mode: bool,

    /// istio's logging flags, which the injector may pass
    /// (`--log_output_level=default:info`, `--log_as_json`, …): accepted;
    /// divert's logs are set by DIVERT_LOG and --log-format.
    #[arg(long = "log_output_level", hide = true, value_name = "LEVELS")]
    pub log_output_level: Option<String>,
    #[arg(long = "log_as_json", hide = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = go_bool)]
    pub log_as_json: Option<bool>,
    #[arg(long = "log_target", hide = true, value_name = "TARGETS")]
    pub log_target: Option<String>,
    #[arg(long = "log_caller", hide = true, value_name = "SCOPES")]
    pub log_caller: Option<String>,
    #[arg(long = "log_stacktrace_level", hide = true, value_name = "LEVELS")]
    pub log_stacktrace_level: Option<String>,
}

/// A duration as Go's `time.ParseDuration` writes the ones istio uses:
/// a sequence of decimal numbers with units `ns us µs ms s m h` (`5s`,
/// `1m30s`, `1.5s`).
pub fn go_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration: write e.g. 5s, 500ms or 1m30s");
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

impl InitArgs {
    /// The validated outbound policy (no local addresses) and capture
    /// settings these arguments describe; nothing when either is bad.
    pub fn settings(&self, matches: Option<&ArgMatches>) -> anyhow::Result<(Policy, Capture)> {
        let policy = self.policy.to_policy(matches)?;
        let capture = self.capture.to_capture(matches)?;
        Ok((policy, capture))
    }
}

/// The address families to configure, as istio-iptables decides them
/// (`getLocalIP`, `EnableIPv6`): IPv4 always; IPv6 when the namespace's
/// first address other than loopback and link-local is IPv6, or, with
/// `--dual-stack`, when it has any such IPv6 address. `local` in the
/// kernel's order (IPv4 addresses before IPv6 ones).
pub fn families(local: &[IpAddr], dual_stack: bool) -> Vec<Family> {
    let mut addrs = local
        .iter()
        .filter(|a| !netns::is_loopback_or_link_local(**a));
    let v6 = if dual_stack {
        addrs.any(IpAddr::is_ipv6)
    } else {
        addrs.next().is_some_and(IpAddr::is_ipv6)
    };
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Which command line is being served: `divert init`, or `divert
/// istio-iptables` (and a binary named `istio-iptables`), which exits as
/// istio-iptables does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Errors exit [`super::EXIT_SETUP`] (2).
    Init,
    /// Errors exit 1, a failed `--run-validation` 126 (istio's
    /// `ValidationErrorCode`, which istio-cni's repair controller looks for).
    IstioIptables,
}

/// Exit status of a failed `--run-validation`, as istio-iptables'.
pub const EXIT_VALIDATION: u8 = 126;

/// Run `divert init` (or `divert istio-iptables`, see [`Mode`]); 0 when
/// interception is in place (or, with `--cleanup`, removed; with
/// `--dry-run`, printed), an error status otherwise with nothing changed.
pub fn main(args: &InitArgs, matches: &ArgMatches, mode: Mode) -> ExitCode {
    let name = match mode {
        Mode::Init => "divert init",
        Mode::IstioIptables => "divert istio-iptables",
    };
    match run(args, matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            if e.downcast_ref::<super::validate::ValidationFailed>()
                .is_some()
            {
                ExitCode::from(EXIT_VALIDATION)
            } else if mode == Mode::IstioIptables {
                ExitCode::from(1)
            } else {
                ExitCode::from(super::EXIT_SETUP)
            }
        }
    }
}

fn run(args: &InitArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    for (refused, flag, why) in [
        (
            !args.network_namespace.is_empty(),
            "--network-namespace (NETWORK_NAMESPACE)",
            "run divert in the namespace to configure",
        ),
        (
            args.cni_mode,
            "--cni-mode (CNI_MODE)",
            "istio-cni's host-filesystem mode is not supported",
        ),
    ] {
        if refused {
            anyhow::bail!("{flag} is set: {why}; nothing was changed");
        }
    }
    let (policy, capture) = args.settings(Some(matches))?;
    if !args.skip_rule_apply {
        apply(args, &policy, &capture)?;
    }
    if args.dry_run || args.cleanup {
        return Ok(());
    }
    let check = |policy: &Policy| -> anyhow::Result<()> {
        if args.validate {
            super::validate::probe(policy)?;
        }
        if args.run_validation {
            let local = netns::local_addresses().context("listing this namespace's addresses")?;
            let v6 = families(&local, false).contains(&Family::V6);
            super::validate::istio(policy, args.iptables_probe_port, args.probe_timeout, v6)?;
        }
        Ok(())
    };
    if let Err(e) = check(&policy) {
        if args.skip_rule_apply {
            return Err(e);
        }
        let mut undo = args.clone();
        undo.cleanup = true;
        let undone = match apply(&undo, &policy, &capture) {
            Ok(()) => "the interception was removed again".to_string(),
            Err(u) => format!("removing the interception again failed too: {u:#}"),
        };
        return Err(e.context(format!("validation failed; {undone}")));
    }
    Ok(())
}

/// Put the interception in place (or, with `--cleanup`, remove it; with
/// `--dry-run`, print it) with the backend `--backend` chooses.
fn apply(args: &InitArgs, policy: &Policy, capture: &Capture) -> anyhow::Result<()> {
    let mut refused = refused_under_ebpf(capture);
    if args.native_nftables {
        refused.push("--native-nftables (istio's nftables rules)".to_string());
    }
    let backend = match args.backend {
        Backend::Auto if !refused.is_empty() => {
            eprintln!(
                "divert init: auto: {} needs the iptables backend: using it",
                refused.join(", ")
            );
            Backend::Iptables
        }
        Backend::Ebpf if !refused.is_empty() && !args.cleanup => anyhow::bail!(
            "the ebpf backend cannot apply {}: use --backend iptables (or auto); nothing was changed",
            refused.join(", ")
        ),
        Backend::Auto if args.daemon_socket.exists() => {
            eprintln!(
                "divert init: auto: the daemon socket {} exists: using the ebpf backend",
                args.daemon_socket.display()
            );
            Backend::Ebpf
        }
        Backend::Auto => {
            eprintln!(
                "divert init: auto: no daemon socket at {}: using the iptables backend",
                args.daemon_socket.display()
            );
            Backend::Iptables
        }
        b => b,
    };
    match backend {
        Backend::Ebpf => ebpf(args, policy),
        _ => iptables_backend(args, policy, capture),
    }
}

/// What the eBPF backend refuses: interface settings, which it cannot
/// apply either way without changing what is captured (`-c` would leave
/// connections it exempts redirected: more capture than asked; `-k` would
/// leave the VM's traffic uncaptured); TPROXY, another host loopback range
/// and `--drop-invalid`, which its programs do not do.
pub fn refused_under_ebpf(capture: &Capture) -> Vec<String> {
    let mut v = Vec::new();
    if !capture.exclude_interfaces.is_empty() {
        v.push(format!(
            "-c {} (excluded interfaces)",
            capture.exclude_interfaces.join(",")
        ));
    }
    if !capture.kube_virt_interfaces.is_empty() {
        v.push(format!(
            "-k {} (KubeVirt interfaces)",
            capture.kube_virt_interfaces.join(",")
        ));
    }
    if capture.drop_invalid {
        v.push("--drop-invalid (dropping invalid packets)".to_string());
    }
    if capture.host_loopback_v4 != crate::policy::DEFAULT_HOST_LOOPBACK_V4 {
        v.push(format!(
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR {} (a host loopback range)",
            capture.host_loopback_v4
        ));
    }
    if capture.tproxy_routing().is_some() {
        v.push("-m TPROXY (TPROXY inbound interception)".to_string());
    }
    v
}

fn ebpf(args: &InitArgs, policy: &Policy) -> anyhow::Result<()> {
    use crate::daemon::proto::{self, Op};
    let op = if args.cleanup {
        Op::Unregister
    } else {
        // Owner groups as iptables would read them: this container's
        // /etc/group. The daemon takes GIDs.
        let owner_groups = policy
            .owner_groups
            .resolved()
            .map_err(|e| anyhow::anyhow!("ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]: {e}"))?;
        Op::Register {
            registrar: None,
            policy: Box::new(Policy {
                owner_groups,
                ..policy.clone()
            }),
        }
    };
    if args.dry_run {
        println!(
            "{}",
            serde_json::to_string(&proto::Request {
                version: proto::VERSION,
                op
            })?
        );
        return Ok(());
    }
    let r = proto::call(&args.daemon_socket, op)?;
    if !r.ok {
        anyhow::bail!(
            "the divert daemon refused: {}",
            r.error.unwrap_or_else(|| "no reason given".into())
        );
    }
    let cookie = r.netns_cookie.unwrap_or_default();
    if args.cleanup {
        eprintln!("divert init: ebpf backend: netns {cookie} unregistered");
    } else if r.registered {
        eprintln!(
            "divert init: ebpf backend: netns {cookie} registered with the daemon at {} (proxy port {})",
            args.daemon_socket.display(),
            policy.proxy_port
        );
    } else {
        anyhow::bail!("the divert daemon answered ok but netns {cookie} is not registered");
    }
    Ok(())
}

fn iptables_backend(args: &InitArgs, policy: &Policy, capture: &Capture) -> anyhow::Result<()> {
    let policy = policy.clone();
    let local = netns::local_addresses().context("listing this namespace's addresses")?;
    let mut wanted = families(&local, capture.dual_stack);
    if args.cleanup {
        // Remove from both families, whatever the addresses are now.
        wanted = vec![Family::V4, Family::V6];
    }
    if args.native_nftables {
        return nftables_backend(args, &policy, capture, &wanted);
    }
    let mut sets: Vec<RuleSet> = Vec::new();
    for f in &wanted {
        sets.push(iptables::render(&policy, capture, *f));
    }
    let tproxy = capture.tproxy_routing();
    if args.dry_run {
        for set in &sets {
            println!(
                "# {} ({}-restore --noflush)",
                set.family,
                set.family.command()
            );
            print!("{}", set.restore_text());
            for cmd in tproxy
                .iter()
                .flat_map(|t| route::commands(t, set.family, "add"))
            {
                println!("# ip {}", cmd.join(" "));
            }
        }
        return Ok(());
    }
    let mut with_bins: Vec<(Iptables, RuleSet)> = Vec::new();
    for set in sets {
        match iptables::detect_forced(set.family, args.force_iptables_binary.as_deref()) {
            Ok(ipt) => with_bins.push((ipt, set)),
            // Cleanup of a family whose tools are missing has nothing to remove.
            Err(_) if args.cleanup && set.family == Family::V6 => {}
            Err(e) => return Err(e),
        }
    }
    if args.cleanup {
        let removed = iptables::cleanup(&with_bins)?;
        remove_around(tproxy, &wanted)?;
        for ((ipt, set), r) in with_bins.iter().zip(removed) {
            eprintln!(
                "divert init: {} {} with {}",
                if r {
                    "removed the"
                } else {
                    "nothing to remove in the"
                },
                set.family,
                ipt.command
            );
        }
        return Ok(());
    }
    apply_around(tproxy, &wanted, || iptables::apply(&with_bins))?;
    for (ipt, set) in &with_bins {
        eprintln!(
            "divert init: iptables backend: {} {} rules in place with {} (proxy port {}, inbound capture port {})",
            set.rules.len(),
            set.family,
            ipt.command,
            policy.proxy_port,
            policy.inbound_capture_port
        );
    }
    Ok(())
}

/// Run `apply` (the rules) with what istio-iptables puts around them, all
/// or nothing: `::6/128` on `lo` when IPv6 rules are written (the inbound
/// passthrough cluster binds it; IPv4 has 127.0.0.6 in 127/8 already) and,
/// for TPROXY, the policy routing. On a failure what this added is removed.
fn apply_around(
    tproxy: Option<&crate::policy::Tproxy>,
    wanted: &[Family],
    apply: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let added = wanted.contains(&Family::V6)
        && netns::add_inbound_passthrough_v6().context("adding ::6/128 to lo")?;
    let applied = match tproxy {
        Some(t) => route::add(t, wanted).and_then(|routes| apply().inspect_err(|_| routes.undo())),
        None => apply(),
    };
    if applied.is_err() && added {
        let _ = netns::remove_inbound_passthrough_v6();
    }
    applied
}

/// The cleanup of [`apply_around`]'s additions: the TPROXY routing and
/// `::6/128`.
fn remove_around(tproxy: Option<&crate::policy::Tproxy>, wanted: &[Family]) -> anyhow::Result<()> {
    if let Some(t) = tproxy {
        if route::remove(t, wanted).context("removing TPROXY's policy routing")? {
            eprintln!(
                "divert init: removed TPROXY's ip rule and route (table {})",
                t.route_table
            );
        }
    }
    if wanted.contains(&Family::V6) {
        netns::remove_inbound_passthrough_v6().context("removing ::6/128 from lo")?;
    }
    Ok(())
}

/// `--native-nftables`: istio-nftables' tables instead of iptables rules,
/// with the same `::6` and TPROXY routing around them.
fn nftables_backend(
    args: &InitArgs,
    policy: &Policy,
    capture: &Capture,
    wanted: &[Family],
) -> anyhow::Result<()> {
    let set = nftables::render(policy, capture, wanted.contains(&Family::V6));
    let tproxy = capture.tproxy_routing();
    if args.dry_run {
        println!("# nft -f -");
        print!("{}", set.script());
        for f in wanted {
            for cmd in tproxy.iter().flat_map(|t| route::commands(t, *f, "add")) {
                println!("# ip {}", cmd.join(" "));
            }
        }
        return Ok(());
    }
    if args.cleanup {
        nftables::cleanup().context("removing istio-nftables' tables")?;
        remove_around(tproxy, wanted)?;
        eprintln!("divert init: removed istio-nftables' tables");
        return Ok(());
    }
    apply_around(tproxy, wanted, || nftables::apply(&set))?;
    eprintln!(
        "divert init: native nftables: {} rules in {} in place (proxy port {}, inbound capture port {})",
        set.rules.len(),
        set.tables()
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        policy.proxy_port,
        policy.inbound_capture_port
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_as_istio_iptables_decides_it() {
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        assert_eq!(
            families(&ips(&["127.0.0.1", "::1", "fe80::1", "10.0.0.1"]), false),
            vec![Family::V4]
        );
        // istio-iptables' EnableIPv6: the first address's family, unless
        // --dual-stack.
        assert_eq!(
            families(&ips(&["10.0.0.1", "fd00::1"]), false),
            vec![Family::V4]
        );
        assert_eq!(
            families(&ips(&["10.0.0.1", "fd00::1"]), true),
            vec![Family::V4, Family::V6]
        );
        assert_eq!(
            families(&ips(&["127.0.0.1", "fe80::1", "fd00::1"]), false),
            vec![Family::V4, Family::V6]
        );
    }
}
