//! `divert explain --netns COOKIE|--pod NS/NAME DEST:PORT [--uid U] [--gid G]
//! [--bound-source IP]`: what divert does with one connect, and why, step by
//! step through istio-iptables' `ISTIO_OUTPUT` chain, from the policy in
//! the live maps (the same [`crate::policy::explain_for`] the kernel
//! programs are tested against).

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;

use super::inspect::{self, Output, ReadArgs, Target};
use crate::{
    ebpf::{verdict_name, PodRef},
    policy::{canonical, explain_for, Action, Connect, IncludeRanges, IpNetwork, Policy, Step},
};

/// Arguments of `divert explain`.
#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub target: Target,

    /// The destination as the application dials it: `10.0.0.1:80`,
    /// `[fd00::1]:443` (`[::ffff:a.b.c.d]:P` is judged as IPv4, as the
    /// kernel does).
    #[arg(value_name = "DEST:PORT", value_parser = parse_destination)]
    pub destination: SocketAddr,

    /// Real UID of the connecting process.
    #[arg(long, value_name = "UID", default_value_t = 0)]
    pub uid: u32,

    /// Real GID of the connecting process.
    #[arg(long, value_name = "GID", default_value_t = 0)]
    pub gid: u32,

    /// Address the socket was bound to before connect (127.0.0.6 is
    /// Envoy's inbound passthrough source).
    #[arg(long, value_name = "IP")]
    pub bound_source: Option<IpAddr>,
}

/// `divert explain -o json`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub netns_cookie: u64,
    pub pod: Option<PodRef>,
    /// The destination IP as judged (IPv4-mapped shown as IPv4).
    pub destination: IpAddr,
    pub port: u16,
    pub uid: u32,
    pub gid: u32,
    /// `redirected`, `passthrough` or `inbound_capture` (as `divert stats`).
    pub verdict: &'static str,
    /// The rule that decided, in words.
    pub rule: String,
    /// Where the connect goes: 127.0.0.1/::1 at this port when rewritten,
    /// the destination itself when passed through.
    pub to: SocketAddr,
    /// Every rule tried, in chain order; the last one decided.
    pub steps: Vec<Step>,
}

/// Run `divert explain`: 0, or 2 with the error on stderr.
pub fn main(args: &ExplainArgs) -> ExitCode {
    match run(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("explain", &e),
    }
}

fn run(args: &ExplainArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let dir = &args.read.bpffs_dir;
    let mut maps = inspect::open(dir)?;
    let Some(cookie) = inspect::cookie_of(&mut maps, &args.target, dir)? else {
        bail!("say which namespace: --netns COOKIE or --pod NAMESPACE/NAME (`divert maps` lists them)");
    };
    let Some(mut policy) = maps
        .policy_of(cookie)
        .with_context(|| format!("reading the policy of netns {cookie}"))?
    else {
        bail!(
            "netns {cookie} has no policy registered under {}: its connects are not touched",
            dir.display()
        );
    };
    most_specific_first(&mut policy);
    let pod = maps.pods()?.remove(&cookie);
    let dst = canonical(args.destination.ip());
    let connect = Connect {
        destination: SocketAddr::new(dst, args.destination.port()),
        uid: args.uid,
        gid: args.gid,
        bound_source: args.bound_source,
    };
    let (v, steps) = explain_for(&policy, &connect);
    let lo = |port| {
        SocketAddr::new(
            if dst.is_ipv4() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
            },
            port,
        )
    };
    let e = Explanation {
        netns_cookie: cookie,
        pod,
        destination: dst,
        port: args.destination.port(),
        uid: args.uid,
        gid: args.gid,
        verdict: verdict_name(v.action.code()),
        rule: v.rule.to_string(),
        to: match v.action {
            Action::Redirect(p) | Action::InboundCapture(p) => lo(p),
            Action::PassThrough => connect.destination,
        },
        steps,
    };
    match args.read.output {
        Output::Json => inspect::json(out, &e),
        Output::Table => Ok(print(out, &e)?),
    }
}

/// Order the include and exclude ranges most specific first. The tries do
/// not keep the order ranges were written in, and when several match, the
/// kernel's LPM lookup finds the longest prefix: that is the range named.
/// (Which of several matching ranges decides never changes the verdict.)
pub fn most_specific_first(p: &mut Policy) {
    let order = |a: &IpNetwork, b: &IpNetwork| b.prefix().cmp(&a.prefix()).then(a.cmp(b));
    p.exclude_ranges.sort_by(order);
    if let IncludeRanges::List(v) = &mut p.include_ranges {
        v.sort_by(order);
    }
}

fn print(out: &mut impl Write, e: &Explanation) -> std::io::Result<()> {
    let who = e
        .pod
        .as_ref()
        .map_or(String::new(), |p| format!(" (pod {p})"));
    writeln!(
        out,
        "connect to {} from uid {} gid {} in netns {}{who}",
        SocketAddr::new(e.destination, e.port),
        e.uid,
        e.gid,
        e.netns_cookie
    )?;
    for (i, s) in e.steps.iter().enumerate() {
        writeln!(
            out,
            "  {:>2}. {:<5} {}",
            i + 1,
            if s.matched { "MATCH" } else { "no" },
            s.rule
        )?;
    }
    writeln!(out, "verdict: {} to {}", e.verdict, e.to)?;
    writeln!(out, "rule: {}", e.rule)
}

/// `DEST:PORT` with a port from 1 to 65535: nothing connects to port 0.
fn parse_destination(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s
        .parse()
        .map_err(|e| format!("{e}: write ADDRESS:PORT, e.g. 10.0.0.1:80 or [fd00::1]:443"))?;
    if a.port() == 0 {
        return Err("port 0: ports are whole numbers from 1 to 65535".into());
    }
    Ok(a)
}
