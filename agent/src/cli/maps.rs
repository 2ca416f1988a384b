//! `divert maps [--pod NS/NAME | --netns COOKIE]`: every registered policy
//! as the kernel holds it, with who registered it, when, and for which pod.

use std::{io::Write, net::IpAddr, process::ExitCode};

use clap::Args;
use serde::Serialize;

use super::inspect::{self, Output, ReadArgs, Target};
use crate::{
    ebpf::{PodRef, Registration},
    policy::{DnsCapture, InboundPorts, IncludeRanges, OwnerGroups},
};

/// Arguments of `divert maps`.
#[derive(Args, Debug, Clone)]
pub struct MapsArgs {
    #[command(flatten)]
    pub read: ReadArgs,
    #[command(flatten)]
    pub target: Target,
}

/// One registered namespace, as `divert maps -o json` prints it. Ports are
/// numbers, ranges CIDR strings; `include_ranges` is `["*"]` when every
/// destination not excluded is captured (Istio's spelling).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    pub netns_cookie: u64,
    /// The pod, when the daemon's pod watch recorded it; else null.
    pub pod: Option<PodRef>,
    /// Who registered the policy: `init`, `cni`, `kubernetes`, `run` or
    /// `unknown`.
    pub source: &'static str,
    /// When the policy was last written, RFC 3339 UTC; null if not recorded.
    pub registered_at: Option<String>,
    /// `-p`.
    pub proxy_port: u16,
    /// `-z`.
    pub inbound_capture_port: u16,
    /// `--inbound-tunnel-port`.
    pub inbound_tunnel_port: u16,
    /// `-i`, `includeOutboundIPRanges`.
    pub include_ranges: Vec<String>,
    /// `-x`, `excludeOutboundIPRanges`.
    pub exclude_ranges: Vec<String>,
    /// `-q`, `includeOutboundPorts`.
    pub include_ports: Vec<u16>,
    /// `-o`, `excludeOutboundPorts`.
    pub exclude_ports: Vec<u16>,
    /// `-u`.
    pub proxy_uids: Vec<u32>,
    /// `-g`.
    pub proxy_gids: Vec<u32>,
    /// The namespace's own addresses (iptables' `-o lo` besides loopback).
    pub local_addrs: Vec<IpAddr>,
    /// The owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`):
    /// `{"all_except": [GID…]}` (every group: an empty list) or
    /// `{"only": [GID…]}`.
    pub owner_groups: OwnerGroups,
    /// `-b`, `includeInboundPorts`: `["*"]`, a list, or empty (none).
    pub inbound_ports: Vec<String>,
    /// `-d`, `excludeInboundPorts` (with `-b '*'`).
    pub inbound_exclude_ports: Vec<u16>,
    /// DNS capture: null when off, else `{"capture_all": bool,
    /// "servers_v4": [...], "servers_v6": [...]}`.
    pub dns: Option<DnsCapture>,
}

/// Inbound capture in a table cell: `*` (every port), `*,!P,…` (all but
/// these), `P,…` (these), `-` (none).
fn inbound_cell(r: &PolicyRow) -> String {
    if r.inbound_ports.is_empty() {
        return "-".into();
    }
    r.inbound_ports
        .iter()
        .cloned()
        .chain(r.inbound_exclude_ports.iter().map(|p| format!("!{p}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// DNS capture in a table cell: `*` (capture-all), the nameservers, or `-`.
fn dns_cell(d: &Option<DnsCapture>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d.capture_all => "*".into(),
        Some(d) => d
            .servers()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The owner-group filter in a table cell: `*` (every group), `*,!G,…`
/// (all but these) or `G,…` (only these; `-` for none).
fn owner_groups_cell(g: &OwnerGroups) -> String {
    match g {
        OwnerGroups::AllExcept(v) => std::iter::once("*".to_string())
            .chain(v.iter().map(|g| format!("!{g}")))
            .collect::<Vec<_>>()
            .join(","),
        OwnerGroups::Only(v) if v.is_empty() => "-".to_string(),
        OwnerGroups::Only(v) => v.join(","),
    }
}

impl From<Registration> for PolicyRow {
    fn from(r: Registration) -> PolicyRow {
        let p = r.policy;
        PolicyRow {
            netns_cookie: r.netns_cookie,
            pod: r.pod,
            source: r.registered_by.name(),
            registered_at: r.registered_at.map(inspect::rfc3339),
            proxy_port: p.proxy_port,
            inbound_capture_port: p.inbound_capture_port,
            inbound_tunnel_port: p.inbound_tunnel_port,
            include_ranges: match &p.include_ranges {
                IncludeRanges::All => vec!["*".to_string()],
                IncludeRanges::List(v) => v.iter().map(ToString::to_string).collect(),
            },
            exclude_ranges: p.exclude_ranges.iter().map(ToString::to_string).collect(),
            include_ports: p.include_ports,
            exclude_ports: p.exclude_ports,
            proxy_uids: p.proxy_uids,
            proxy_gids: p.proxy_gids,
            local_addrs: p.local_addrs,
            owner_groups: p.owner_groups,
            inbound_ports: match &p.inbound_ports {
                InboundPorts::None => Vec::new(),
                InboundPorts::All => vec!["*".to_string()],
                InboundPorts::List(v) => v.iter().map(ToString::to_string).collect(),
            },
            inbound_exclude_ports: if p.inbound_ports == InboundPorts::All {
                p.inbound_exclude_ports
            } else {
                Vec::new()
            },
            dns: p.dns,
        }
    }
}

/// Run `divert maps`: 0, or 2 with the error on stderr.
pub fn main(args: &MapsArgs) -> ExitCode {
    match run(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail("maps", &e),
    }
}

fn run(args: &MapsArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let dir = &args.read.bpffs_dir;
    let mut maps = inspect::open(dir)?;
    let only = inspect::cookie_of(&mut maps, &args.target, dir)?;
    let rows: Vec<PolicyRow> = maps
        .registrations()?
        .into_iter()
        .filter(|r| only.is_none_or(|c| c == r.netns_cookie))
        .map(PolicyRow::from)
        .collect();
    if let (Some(c), true) = (only, rows.is_empty()) {
        anyhow::bail!("netns {c} has no policy registered under {}", dir.display());
    }
    match args.read.output {
        Output::Json => inspect::json(out, &rows),
        Output::Table => Ok(print_table(out, &rows)?),
    }
}

fn print_table(out: &mut impl Write, rows: &[PolicyRow]) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "no namespace is registered");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.netns_cookie.to_string(),
                r.pod.as_ref().map_or("-".to_string(), ToString::to_string),
                r.source.to_string(),
                r.registered_at.clone().unwrap_or_else(|| "-".into()),
                r.proxy_port.to_string(),
                inspect::list(&r.include_ranges),
                inspect::list(&r.exclude_ranges),
                inspect::list(&r.include_ports),
                inspect::list(&r.exclude_ports),
                inspect::list(&r.proxy_uids),
                inspect::list(&r.proxy_gids),
                owner_groups_cell(&r.owner_groups),
                inbound_cell(r),
                dns_cell(&r.dns),
            ]
        })
        .collect();
    inspect::table(
        out,
        &[
            "NETNS",
            "POD",
            "SOURCE",
            "REGISTERED",
            "PROXY",
            "INCLUDE RANGES",
            "EXCLUDE RANGES",
            "INCLUDE PORTS",
            "EXCLUDE PORTS",
            "UIDS",
            "GIDS",
            "OWNER GROUPS",
            "INBOUND",
            "DNS",
        ],
        &cells,
        &[0, 4],
    )
}
