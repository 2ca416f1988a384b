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
    iptables::{self, Family, Iptables, RuleSet},
    netns,
    policy::{Capture, CaptureArgs, Policy, PolicyArgs},
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
#[command(mut_arg("include_ranges", |a| a.default_value("")))]
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
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN")]
    pub dry_run: bool,

    /// Remove what divert init writes for these flags from this namespace,
    /// and nothing else; write nothing.
    #[arg(
        long = "cleanup",
        visible_alias = "cleanup-only",
        conflicts_with = "dry_run"
    )]
    pub cleanup: bool,

    /// istio's logging flag, which the injector passes
    /// (`--log_output_level=default:info`): accepted and ignored; divert's
    /// log level is DIVERT_LOG.
    #[arg(long = "log_output_level", hide = true, value_name = "LEVELS")]
    pub log_output_level: Option<String>,
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

/// The address families to configure: IPv4 always; IPv6 when the
/// namespace has an IPv6 address other than loopback and link-local (what
/// istio-iptables' `EnableIPv6` stands for in a pod).
pub fn families(local: &[IpAddr]) -> Vec<Family> {
    let v6 = local.iter().any(|a| match a {
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        IpAddr::V4(_) => false,
    });
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Run `divert init`; 0 when interception is in place (or, with
/// `--cleanup`, removed; with `--dry-run`, printed), 2 otherwise with
/// nothing changed.
pub fn main(args: &InitArgs, matches: &ArgMatches) -> ExitCode {
    match run(args, matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("init", &e),
    }
}

fn run(args: &InitArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let (policy, capture) = args.settings(Some(matches))?;
    let backend = match args.backend {
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
    let apply = |args: &InitArgs| match backend {
        Backend::Ebpf => ebpf(args, &policy, &capture),
        _ => iptables_backend(args, &policy, &capture),
    };
    apply(args)?;
    if args.validate && !args.dry_run && !args.cleanup {
        if let Err(e) = super::validate::probe(&policy) {
            let mut undo = args.clone();
            undo.cleanup = true;
            let undone = match apply(&undo) {
                Ok(()) => "the interception was removed again".to_string(),
                Err(u) => format!("removing the interception again failed too: {u:#}"),
            };
            return Err(e.context(format!("validation failed; {undone}")));
        }
    }
    Ok(())
}

/// What the eBPF backend does not apply, for the warning: inbound capture,
/// `-k` and `-c` are iptables-only (PREROUTING rules).
pub fn not_applied_under_ebpf(capture: &Capture) -> Vec<String> {
    let mut v = Vec::new();
    if capture.inbound.ports != crate::policy::InboundPorts::None {
        v.push("inbound capture (-b/-d)".to_string());
    }
    if !capture.kube_virt_interfaces.is_empty() {
        v.push(format!("-k {}", capture.kube_virt_interfaces.join(",")));
    }
    if !capture.exclude_interfaces.is_empty() {
        v.push(format!("-c {}", capture.exclude_interfaces.join(",")));
    }
    v
}

fn ebpf(args: &InitArgs, policy: &Policy, capture: &Capture) -> anyhow::Result<()> {
    use crate::daemon::proto::{self, Op};
    let op = if args.cleanup {
        Op::Unregister
    } else {
        Op::Register {
            policy: Box::new(policy.clone()),
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
    let skipped = not_applied_under_ebpf(capture);
    if !skipped.is_empty() && !args.cleanup {
        eprintln!(
            "divert init: warning: the ebpf backend diverts outbound TCP only; not applied: {}",
            skipped.join("; ")
        );
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
    let mut wanted = families(&local);
    if args.cleanup {
        // Remove from both families, whatever the addresses are now.
        wanted = vec![Family::V4, Family::V6];
    }
    let mut sets: Vec<RuleSet> = Vec::new();
    for f in &wanted {
        sets.push(iptables::render(&policy, capture, *f)?);
    }
    if args.dry_run {
        for set in &sets {
            println!(
                "# {} ({}-restore --noflush)",
                set.family,
                set.family.command()
            );
            print!("{}", set.restore_text());
        }
        return Ok(());
    }
    let mut with_bins: Vec<(Iptables, RuleSet)> = Vec::new();
    for set in sets {
        match iptables::detect(set.family) {
            Ok(ipt) => with_bins.push((ipt, set)),
            // Cleanup of a family whose tools are missing has nothing to remove.
            Err(_) if args.cleanup && set.family == Family::V6 => {}
            Err(e) => return Err(e),
        }
    }
    if args.cleanup {
        let removed = iptables::cleanup(&with_bins)?;
        if wanted.contains(&Family::V6) {
            netns::remove_inbound_passthrough_v6().context("removing ::6/128 from lo")?;
        }
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
    // istio-iptables adds ::6 on lo for the inbound passthrough cluster to
    // bind to (IPv4 has 127.0.0.6 in 127/8 already).
    let added = wanted.contains(&Family::V6)
        && netns::add_inbound_passthrough_v6().context("adding ::6/128 to lo")?;
    if let Err(e) = iptables::apply(&with_bins) {
        if added {
            let _ = netns::remove_inbound_passthrough_v6();
        }
        return Err(e);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_needs_an_address_beyond_loopback_and_link_local() {
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        assert_eq!(
            families(&ips(&["127.0.0.1", "::1", "fe80::1", "10.0.0.1"])),
            vec![Family::V4]
        );
        assert_eq!(
            families(&ips(&["10.0.0.1", "fd00::1"])),
            vec![Family::V4, Family::V6]
        );
    }
}
