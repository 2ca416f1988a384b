//! The iptables backend: a [`Policy`] and its [`Capture`] settings rendered
//! as istio-iptables renders them, and applied to the calling thread's
//! network namespace with iptables-restore.
//!
//! [`render`] follows istio-iptables' `tools/istio-iptables/pkg/capture/run.go`
//! (`Run`, `SetupDNSRedir`) rule for rule, in its order and its spelling:
//! the nat table's `ISTIO_INBOUND`, `ISTIO_REDIRECT`, `ISTIO_IN_REDIRECT`,
//! `ISTIO_OUTPUT` and `ISTIO_OUTPUT_DNS`; the mangle table's `ISTIO_DROP`
//! (`--drop-invalid`) and TPROXY's `ISTIO_DIVERT`, `ISTIO_TPROXY` and
//! `ISTIO_INBOUND`; the raw table's DNS conntrack-zone chains; and the
//! jumps and rules in the built-in chains. [`RuleSet::restore_text`] prints
//! them the way istio-iptables' rule builder does (`BuildV4Restore`), so
//! `--dry-run` output can be compared line for line with istio-iptables'
//! own test goldens (`tests/testdata/istio-iptables/`, compared in
//! `tests/tests/iptables.rs`).
//!
//! [`apply`] installs a rule set in one iptables-restore transaction per
//! address family; see there for idempotence, cleanup and rollback. TPROXY
//! also needs policy routing, which [`route`] puts in place.

mod apply;
pub mod route;

pub use apply::{apply, cleanup, detect, detect_forced, Iptables};

use std::fmt::Write as _;

use crate::policy::{
    self, Capture, InboundPorts, InterceptionMode, IpNetwork, OwnerGroups, Policy, DNS_PROXY_PORT,
};

/// Inbound connections: entered from `PREROUTING` when `-b` is set (nat
/// for REDIRECT, mangle for TPROXY; in raw, DNS replies).
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
/// `REDIRECT --to-ports <-p>`: the outbound proxy.
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
/// `REDIRECT --to-ports <-z>`: the inbound capture port.
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// The outbound decision, entered from `OUTPUT` for every packet.
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
/// DNS capture: in nat, the redirects to [`DNS_PROXY_PORT`]; in raw, the
/// conntrack zones of outgoing UDP DNS.
pub const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
/// The mangle-table chain of `--drop-invalid`: packets conntrack finds
/// invalid are dropped (`PREROUTING -m conntrack --ctstate INVALID -j
/// ISTIO_DROP`).
pub const ISTIO_DROP: &str = "ISTIO_DROP";
/// TPROXY: marks a packet of an established inbound connection and accepts
/// it (mangle).
pub const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
/// TPROXY: hands a new inbound connection to the inbound capture port
/// (mangle).
pub const ISTIO_TPROXY: &str = "ISTIO_TPROXY";

/// The mark istio-iptables gives the proxy's packets to the pod's own
/// address over lo in TPROXY mode (its `OutboundMark`), so ISTIO_INBOUND
/// captures them.
pub const TPROXY_OUTBOUND_MARK: u32 = 1338;

/// A table this backend writes to, in the order istio-iptables' rule
/// builder prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Mangle,
    Nat,
    Raw,
}

impl Table {
    /// Every table, in restore order.
    pub const ALL: [Table; 3] = [Table::Mangle, Table::Nat, Table::Raw];

    /// The name iptables knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }

    /// The chains this backend owns in the table, in istio-iptables'
    /// names. Nothing else is ever created, flushed or deleted.
    pub fn chains(self) -> &'static [&'static str] {
        match self {
            Table::Mangle => &[ISTIO_DROP, ISTIO_DIVERT, ISTIO_TPROXY, ISTIO_INBOUND],
            Table::Nat => &[
                ISTIO_INBOUND,
                ISTIO_REDIRECT,
                ISTIO_IN_REDIRECT,
                ISTIO_OUTPUT,
                ISTIO_OUTPUT_DNS,
            ],
            Table::Raw => &[ISTIO_OUTPUT_DNS, ISTIO_INBOUND],
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// IPv4 (iptables) or IPv6 (ip6tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The host loopback address as iptables writes it (istio-iptables'
    /// `HostIPv4LoopbackCidr` default and `::1/128`).
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    /// The inbound-passthrough source address Envoy binds to reach the app
    /// (`127.0.0.6`, `::6`): its connections are never redirected.
    pub fn inbound_passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    /// `iptables` or `ip6tables`: the command family's base name.
    pub fn command(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The prefix length of one address (`/32`, `/128`).
    fn host_bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn owns(self, net: &IpNetwork) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNetwork::V4(_)) | (Family::V6, IpNetwork::V6(_))
        )
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One rule, as an `-A` (append) or `-I CHAIN n` (insert at position n)
/// line of iptables-restore input for its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The table the rule lives in.
    pub table: Table,
    /// The chain the rule lives in.
    pub chain: &'static str,
    /// `Some(n)` for istio-iptables' `-I <chain> n` (1-based); `None` to
    /// append.
    pub position: Option<u32>,
    /// Matches and target, e.g. `["-p", "tcp", "-j", "ISTIO_REDIRECT"]`.
    pub spec: Vec<String>,
    /// For a rule of the nat table's `ISTIO_OUTPUT`, `ISTIO_OUTPUT_DNS` and
    /// `ISTIO_INBOUND`:
    /// the decisions of [`crate::policy::verdict()`] it is the rule for (a
    /// multiport rule stands for each of its ports), for the transport its
    /// `-p` matches ([`Rule::matches_transport`]). Empty for the other
    /// chains. `divert explain` finds the deciding rule by it.
    pub decides: Vec<policy::Rule>,
}

impl Rule {
    /// Whether the rule's protocol match (`-p tcp`, `-p udp`, or none)
    /// admits `t`.
    pub fn matches_transport(&self, t: policy::Transport) -> bool {
        let proto = self
            .spec
            .windows(2)
            .find(|w| w[0] == "-p")
            .map(|w| w[1].as_str());
        matches!(
            (proto, t),
            (None, _)
                | (Some("tcp"), policy::Transport::Tcp)
                | (Some("udp"), policy::Transport::Udp)
        )
    }

    fn new(table: Table, chain: &'static str, spec: &[&str]) -> Rule {
        Rule {
            table,
            chain,
            position: None,
            spec: spec.iter().map(|s| s.to_string()).collect(),
            decides: Vec::new(),
        }
    }

    /// An `-A` rule of the nat table.
    fn nat(chain: &'static str, spec: &[&str]) -> Rule {
        Rule::new(Table::Nat, chain, spec)
    }

    /// An `-A` rule of the mangle table.
    fn mangle(chain: &'static str, spec: &[&str]) -> Rule {
        Rule::new(Table::Mangle, chain, spec)
    }

    /// An `-A` rule of the raw table.
    fn raw(chain: &'static str, spec: &[&str]) -> Rule {
        Rule::new(Table::Raw, chain, spec)
    }

    /// The same rule inserted at `position` (`-I CHAIN position`).
    fn at(self, position: u32) -> Rule {
        Rule {
            position: Some(position),
            ..self
        }
    }

    fn deciding(self, decides: impl IntoIterator<Item = policy::Rule>) -> Rule {
        Rule {
            decides: decides.into_iter().collect(),
            ..self
        }
    }

    /// The iptables-restore line: `-A CHAIN SPEC…` or `-I CHAIN n SPEC…`.
    pub fn line(&self) -> String {
        let head = match self.position {
            Some(n) => format!("-I {} {n}", self.chain),
            None => format!("-A {}", self.chain),
        };
        std::iter::once(head)
            .chain(self.spec.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The jump target (`-j X`), if any.
    pub fn target(&self) -> Option<&str> {
        let j = self.spec.iter().position(|s| s == "-j")?;
        self.spec.get(j + 1).map(String::as_str)
    }

    /// Whether the rule lives in a built-in chain (`PREROUTING`, `OUTPUT`).
    pub fn in_builtin_chain(&self) -> bool {
        !self.table.chains().contains(&self.chain)
    }

    /// Whether the rule jumps to one of this backend's chains of its table.
    pub fn jumps_to_ours(&self) -> bool {
        self.target()
            .is_some_and(|t| self.table.chains().contains(&t))
    }
}

/// The rules of one address family, every table's, in istio-iptables'
/// order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The rules of `table`, in order.
    pub fn in_table(&self, table: Table) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(move |r| r.table == table)
    }

    /// The chains of `table` to create, in istio-iptables' order: chains
    /// in order of their first rule, then chains only jumped to.
    pub fn chains(&self, table: Table) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for r in self.in_table(table) {
            if !r.in_builtin_chain() && !out.contains(&r.chain) {
                out.push(r.chain);
            }
        }
        for r in self.in_table(table) {
            if let Some(t) = r.target() {
                if let Some(c) = table.chains().iter().find(|c| **c == t) {
                    if !out.contains(c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    /// iptables-restore input in istio-iptables' spelling: per table that
    /// has rules (mangle, nat, raw), `* TABLE`, one `-N` per chain, the
    /// rules, `COMMIT`. Meant for `--noflush` on a namespace without the
    /// chains (what `--dry-run` prints; [`apply`] writes a variant that
    /// also replaces an earlier run's rules).
    pub fn restore_text(&self) -> String {
        let mut s = String::new();
        for table in Table::ALL {
            if self.in_table(table).next().is_none() {
                continue;
            }
            let _ = writeln!(s, "* {table}");
            for c in self.chains(table) {
                let _ = writeln!(s, "-N {c}");
            }
            for r in self.in_table(table) {
                let _ = writeln!(s, "{}", r.line());
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

/// The most ports one `-m multiport --dports` match takes (the kernel's
/// `XT_MULTI_PORTS`); longer lists are split over several rules.
pub const MULTIPORT_MAX: usize = 15;

/// Port matches for a list, as istio-iptables writes them: `--dport P` for
/// one port, `-m multiport --dports P,Q,…` for several (at most
/// [`MULTIPORT_MAX`] a rule; a last chunk of one port uses `--dport`).
fn port_matches(ports: &[u16]) -> Vec<Vec<String>> {
    ports
        .chunks(MULTIPORT_MAX)
        .map(|chunk| match chunk {
            [one] => vec!["--dport".into(), one.to_string()],
            many => {
                let list: Vec<String> = many.iter().map(u16::to_string).collect();
                vec![
                    "-m".into(),
                    "multiport".into(),
                    "--dports".into(),
                    list.join(","),
                ]
            }
        })
        .collect()
}

/// The rules istio-iptables writes for `policy`, `capture` and one address
/// family, in its order (run.go `Run`):
///
/// 1. `-c` interfaces: `PREROUTING -i X -j RETURN`, `OUTPUT -o X -j RETURN`
///    (in mangle too with TPROXY);
/// 2. `-k` interfaces: `-I PREROUTING 1 -i X -j RETURN`;
/// 3. `--drop-invalid`: mangle's `ISTIO_DROP`;
/// 4. `ISTIO_INBOUND` returns the tunnel port; `ISTIO_REDIRECT` and
///    `ISTIO_IN_REDIRECT` redirect to `-p` and `-z`;
/// 5. `-b`: `PREROUTING -p tcp -j ISTIO_INBOUND` and the inbound ports
///    (with `*`, `-d` first), in nat for REDIRECT, in mangle through
///    `ISTIO_DIVERT`/`ISTIO_TPROXY` for TPROXY;
/// 6. `OUTPUT -j ISTIO_OUTPUT`, then in `ISTIO_OUTPUT`: `-o` ports (tcp and
///    udp), the inbound-passthrough source, per proxy UID then per GID the
///    three owner rules (the middle one dropped when an include range is a
///    loopback address; port 53 left to DNS capture when it is on), the
///    owner-group filter;
/// 7. DNS capture (`SetupDNSRedir`): `ISTIO_OUTPUT_DNS` in nat and raw,
///    raw's conntrack zones;
/// 8. the host loopback, `-x`, `-q`, and `-i` (`*`, or one rule per range
///    of this family; with `-k`, matching `PREROUTING` jumps inserted at
///    the top);
/// 9. TPROXY's marks in mangle's `PREROUTING`, `OUTPUT` and
///    `ISTIO_INBOUND`.
pub fn render(policy: &Policy, capture: &Capture, family: Family) -> RuleSet {
    let tproxy = capture.interception_mode == InterceptionMode::Tproxy;
    let mut rules: Vec<Rule> = Vec::new();
    let tunnel = policy.inbound_tunnel_port.to_string();
    let lo = match family {
        Family::V4 => capture.host_loopback_v4.as_str(),
        Family::V6 => family.loopback(),
    };
    let mark = capture.tproxy.mark.to_string();
    let outbound_mark = TPROXY_OUTBOUND_MARK.to_string();

    for ifc in &capture.exclude_interfaces {
        rules.push(Rule::nat("PREROUTING", &["-i", ifc, "-j", "RETURN"]));
        rules.push(Rule::nat("OUTPUT", &["-o", ifc, "-j", "RETURN"]));
    }
    if tproxy {
        for ifc in &capture.exclude_interfaces {
            rules.push(Rule::mangle("PREROUTING", &["-i", ifc, "-j", "RETURN"]));
            rules.push(Rule::mangle("OUTPUT", &["-o", ifc, "-j", "RETURN"]));
        }
    }
    for ifc in &capture.kube_virt_interfaces {
        rules.push(Rule::nat("PREROUTING", &["-i", ifc, "-j", "RETURN"]).at(1));
    }
    if capture.drop_invalid {
        rules.push(Rule::mangle(
            "PREROUTING",
            &["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
        ));
        rules.push(Rule::mangle(ISTIO_DROP, &["-j", "DROP"]));
    }
    rules.push(
        Rule::nat(
            ISTIO_INBOUND,
            &["-p", "tcp", "--dport", &tunnel, "-j", "RETURN"],
        )
        .deciding([policy::Rule::InboundTunnelPort]),
    );
    rules.push(Rule::nat(
        ISTIO_REDIRECT,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &policy.proxy_port.to_string(),
        ],
    ));
    rules.push(Rule::nat(
        ISTIO_IN_REDIRECT,
        &[
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &policy.inbound_capture_port.to_string(),
        ],
    ));
    inbound(&mut rules, policy, capture, lo, &mark);

    rules.push(Rule::nat("OUTPUT", &["-j", ISTIO_OUTPUT]));
    for (m, ports) in port_matches(&policy.exclude_ports)
        .into_iter()
        .zip(policy.exclude_ports.chunks(MULTIPORT_MAX))
    {
        for proto in ["tcp", "udp"] {
            let mut spec = vec!["-p", proto];
            spec.extend(m.iter().map(String::as_str));
            spec.extend(["-j", "RETURN"]);
            rules.push(
                Rule::nat(ISTIO_OUTPUT, &spec)
                    .deciding(ports.iter().map(|&p| policy::Rule::ExcludeOutboundPort(p))),
            );
        }
    }
    rules.push(
        Rule::nat(
            ISTIO_OUTPUT,
            &[
                "-o",
                "lo",
                "-s",
                family.inbound_passthrough_source(),
                "-j",
                "RETURN",
            ],
        )
        .deciding([policy::Rule::InboundPassthroughSource]),
    );
    owners(&mut rules, policy, lo);
    // The owner-group filter (run.go `handleCaptureByOwnerGroup`).
    match &policy.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                // A name decides nothing verdict() can tell: it is resolved
                // before the kernel sees it.
                let decides = g.parse().ok().map(policy::Rule::OwnerGroupExcluded);
                rules.push(
                    Rule::nat(
                        ISTIO_OUTPUT,
                        &["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
                    )
                    .deciding(decides),
                );
            }
        }
        OwnerGroups::Only(groups) => {
            let mut spec: Vec<&str> = Vec::new();
            for g in groups {
                spec.extend(["-m", "owner", "!", "--gid-owner", g]);
            }
            spec.extend(["-j", "RETURN"]);
            rules.push(
                Rule::nat(ISTIO_OUTPUT, &spec).deciding([policy::Rule::OwnerGroupNotIncluded]),
            );
        }
    }
    if let Some(dns) = &policy.dns {
        dns_rules(&mut rules, policy, dns, family);
    }
    rules.push(
        Rule::nat(ISTIO_OUTPUT, &["-d", lo, "-j", "RETURN"]).deciding([policy::Rule::HostLoopback]),
    );
    for net in policy.exclude_ranges.iter().filter(|n| family.owns(n)) {
        rules.push(
            Rule::nat(ISTIO_OUTPUT, &["-d", &net.to_string(), "-j", "RETURN"])
                .deciding([policy::Rule::ExcludeRange(*net)]),
        );
    }
    for &p in &policy.include_ports {
        rules.push(
            Rule::nat(
                ISTIO_OUTPUT,
                &["-p", "tcp", "--dport", &p.to_string(), "-j", ISTIO_REDIRECT],
            )
            .deciding([policy::Rule::IncludeOutboundPort(p)]),
        );
    }
    match &policy.include_ranges {
        crate::policy::IncludeRanges::All => {
            rules.push(
                Rule::nat(ISTIO_OUTPUT, &["-j", ISTIO_REDIRECT])
                    .deciding([policy::Rule::IncludeAll]),
            );
            for ifc in &capture.kube_virt_interfaces {
                rules.push(Rule::nat("PREROUTING", &["-i", ifc, "-j", ISTIO_REDIRECT]).at(1));
            }
        }
        crate::policy::IncludeRanges::List(nets) => {
            for n in nets.iter().filter(|n| family.owns(n)) {
                let net = n.to_string();
                for ifc in &capture.kube_virt_interfaces {
                    rules.push(
                        Rule::nat("PREROUTING", &["-i", ifc, "-d", &net, "-j", ISTIO_REDIRECT])
                            .at(1),
                    );
                }
                rules.push(
                    Rule::nat(ISTIO_OUTPUT, &["-d", &net, "-j", ISTIO_REDIRECT])
                        .deciding([policy::Rule::IncludeRange(*n)]),
                );
            }
        }
    }
    if tproxy {
        tproxy_marks(&mut rules, policy, family, lo, &mark, &outbound_mark);
    }
    RuleSet { family, rules }
}

/// Step 5 of [`render`] (run.go `handleInboundPortsInclude`).
fn inbound(rules: &mut Vec<Rule>, policy: &Policy, capture: &Capture, lo: &str, mark: &str) {
    if policy.inbound_ports == InboundPorts::None {
        return;
    }
    let tproxy = capture.interception_mode == InterceptionMode::Tproxy;
    let table = if tproxy { Table::Mangle } else { Table::Nat };
    if tproxy {
        rules.push(Rule::mangle(
            ISTIO_DIVERT,
            &["-j", "MARK", "--set-mark", mark],
        ));
        rules.push(Rule::mangle(ISTIO_DIVERT, &["-j", "ACCEPT"]));
        rules.push(Rule::mangle(
            ISTIO_TPROXY,
            &[
                "!",
                "-d",
                lo,
                "-p",
                "tcp",
                "-j",
                "TPROXY",
                "--tproxy-mark",
                &format!("{mark}/0xffffffff"),
                "--on-port",
                &policy.inbound_capture_port.to_string(),
            ],
        ));
    }
    rules.push(Rule::new(
        table,
        "PREROUTING",
        &["-p", "tcp", "-j", ISTIO_INBOUND],
    ));
    let established = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"];
    match &policy.inbound_ports {
        InboundPorts::All => {
            for (m, ports) in port_matches(&policy.inbound_exclude_ports)
                .into_iter()
                .zip(policy.inbound_exclude_ports.chunks(MULTIPORT_MAX))
            {
                let mut spec = vec!["-p", "tcp"];
                spec.extend(m.iter().map(String::as_str));
                spec.extend(["-j", "RETURN"]);
                rules.push(
                    Rule::new(table, ISTIO_INBOUND, &spec)
                        .deciding(ports.iter().map(|&p| policy::Rule::InboundExcludedPort(p))),
                );
            }
            if tproxy {
                let mut spec = vec!["-p", "tcp"];
                spec.extend(established);
                spec.extend(["-j", ISTIO_DIVERT]);
                rules.push(Rule::mangle(ISTIO_INBOUND, &spec));
                rules.push(Rule::mangle(
                    ISTIO_INBOUND,
                    &["-p", "tcp", "-j", ISTIO_TPROXY],
                ));
            } else {
                rules.push(
                    Rule::nat(ISTIO_INBOUND, &["-p", "tcp", "-j", ISTIO_IN_REDIRECT])
                        .deciding([policy::Rule::InboundAllPorts]),
                );
            }
        }
        InboundPorts::List(ports) => {
            for p in ports {
                let port = p.to_string();
                if tproxy {
                    let mut spec = vec!["-p", "tcp", "--dport", &port];
                    spec.extend(established);
                    spec.extend(["-j", ISTIO_DIVERT]);
                    rules.push(Rule::mangle(ISTIO_INBOUND, &spec));
                    rules.push(Rule::mangle(
                        ISTIO_INBOUND,
                        &["-p", "tcp", "--dport", &port, "-j", ISTIO_TPROXY],
                    ));
                } else {
                    rules.push(
                        Rule::nat(
                            ISTIO_INBOUND,
                            &["-p", "tcp", "--dport", &port, "-j", ISTIO_IN_REDIRECT],
                        )
                        .deciding([policy::Rule::InboundListedPort(*p)]),
                    );
                }
            }
        }
        InboundPorts::None => unreachable!("returned above"),
    }
}

/// Step 6's owner rules of [`render`]: per proxy UID, then per GID, the
/// redirect back to the inbound capture port, the return of other
/// processes' loopback traffic, and the return of the proxy's own.
fn owners(rules: &mut Vec<Rule>, policy: &Policy, lo: &str) {
    let tunnel = policy.inbound_tunnel_port.to_string();
    // With DNS capture the proxy's loopback DNS is not sent inbound, and
    // other processes' loopback DNS over TCP is left to ISTIO_OUTPUT_DNS.
    let dns = policy.dns.is_some();
    let not_tunnel_or_dns = format!("53,{tunnel}");
    let loopback_included = policy.include_ranges.has_loopback();
    type Decides = fn(u32) -> policy::Rule;
    let owners: [(&Vec<u32>, &str, [Decides; 3]); 2] = [
        (
            &policy.proxy_uids,
            "--uid-owner",
            [
                policy::Rule::ProxyUidToLocal,
                policy::Rule::LocalNotProxyUid,
                policy::Rule::ProxyUid,
            ],
        ),
        (
            &policy.proxy_gids,
            "--gid-owner",
            [
                policy::Rule::ProxyGidToLocal,
                policy::Rule::LocalNotProxyGid,
                policy::Rule::ProxyGid,
            ],
        ),
    ];
    for (ids, owner, [to_local, local_not_owner, is_owner]) in owners {
        for &n in ids {
            let id = n.to_string();
            let mut spec = vec!["-o", "lo", "!", "-d", lo, "-p", "tcp"];
            // istio-iptables leaves port 53 out for the UIDs only.
            if dns && owner == "--uid-owner" {
                spec.extend(["-m", "multiport", "!", "--dports", &not_tunnel_or_dns]);
            } else {
                spec.extend(["!", "--dport", &tunnel]);
            }
            spec.extend(["-m", "owner", owner, &id, "-j", ISTIO_IN_REDIRECT]);
            rules.push(Rule::nat(ISTIO_OUTPUT, &spec).deciding([to_local(n)]));
            if !loopback_included {
                let mut spec = vec!["-o", "lo"];
                if dns {
                    spec.extend(["-p", "tcp", "!", "--dport", "53"]);
                }
                spec.extend(["-m", "owner", "!", owner, &id, "-j", "RETURN"]);
                rules.push(Rule::nat(ISTIO_OUTPUT, &spec).deciding([local_not_owner(n)]));
            }
            rules.push(
                Rule::nat(ISTIO_OUTPUT, &["-m", "owner", owner, &id, "-j", "RETURN"])
                    .deciding([is_owner(n)]),
            );
        }
    }
}

/// Step 7 of [`render`] (run.go `SetupDNSRedir` and
/// `addDNSConntrackZones`): TCP and UDP to port 53 of the nameservers of
/// this family (or of any address) go to [`DNS_PROXY_PORT`]; in raw, the
/// proxy's queries upstream and its answers are conntrack zone 1 and 2,
/// the clients' queries and the upstream answers zone 2 and 1, so the two
/// legs of a proxied query never share a conntrack entry.
fn dns_rules(rules: &mut Vec<Rule>, policy: &Policy, dns: &policy::DnsCapture, family: Family) {
    let nameservers = match family {
        Family::V4 => &dns.servers_v4,
        Family::V6 => &dns.servers_v6,
    };
    let servers: Vec<String> = nameservers
        .iter()
        .map(|s| format!("{s}/{}", family.host_bits()))
        .collect();
    let dns_port = DNS_PROXY_PORT.to_string();
    rules.push(Rule::raw("OUTPUT", &["-j", ISTIO_OUTPUT_DNS]));
    if dns.capture_all || !servers.is_empty() {
        rules.push(Rule::nat(ISTIO_OUTPUT, &["-j", ISTIO_OUTPUT_DNS]));
    }
    // istio-iptables spells the TCP redirect `--to-ports`, the UDP one
    // `--to-port`.
    for (proto, to) in [("tcp", "--to-ports"), ("udp", "--to-port")] {
        if dns.capture_all {
            rules.push(
                Rule::nat(
                    ISTIO_OUTPUT_DNS,
                    &[
                        "-p", proto, "--dport", "53", "-j", "REDIRECT", to, &dns_port,
                    ],
                )
                .deciding([policy::Rule::DnsCapture(None)]),
            );
        }
        for (s, ns) in servers.iter().zip(nameservers) {
            rules.push(
                Rule::nat(
                    ISTIO_OUTPUT_DNS,
                    &[
                        "-p", proto, "--dport", "53", "-d", s, "-j", "REDIRECT", to, &dns_port,
                    ],
                )
                .deciding([policy::Rule::DnsCapture(Some(ns.addr()))]),
            );
        }
    }
    for (ids, owner) in [
        (&policy.proxy_uids, "--uid-owner"),
        (&policy.proxy_gids, "--gid-owner"),
    ] {
        for id in ids {
            let id = id.to_string();
            rules.push(Rule::raw(
                ISTIO_OUTPUT_DNS,
                &[
                    "-p", "udp", "--dport", "53", "-m", "owner", owner, &id, "-j", "CT", "--zone",
                    "1",
                ],
            ));
            rules.push(Rule::raw(
                ISTIO_OUTPUT_DNS,
                &[
                    "-p", "udp", "--sport", &dns_port, "-m", "owner", owner, &id, "-j", "CT",
                    "--zone", "2",
                ],
            ));
        }
    }
    if dns.capture_all || !servers.is_empty() {
        rules.push(Rule::raw("PREROUTING", &["-j", ISTIO_INBOUND]));
    }
    if dns.capture_all {
        rules.push(Rule::raw(
            ISTIO_OUTPUT_DNS,
            &["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"],
        ));
        rules.push(Rule::raw(
            ISTIO_INBOUND,
            &["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"],
        ));
    }
    for s in &servers {
        rules.push(Rule::raw(
            ISTIO_OUTPUT_DNS,
            &[
                "-p", "udp", "--dport", "53", "-d", s, "-j", "CT", "--zone", "2",
            ],
        ));
        rules.push(Rule::raw(
            ISTIO_INBOUND,
            &[
                "-p", "udp", "--sport", "53", "-s", s, "-j", "CT", "--zone", "1",
            ],
        ));
    }
}

/// Step 9 of [`render`]: TPROXY's marks. The mark the original-source
/// filter sets is kept as the connection's; the proxy's packets to the
/// pod's own address over lo get [`TPROXY_OUTBOUND_MARK`]; replies take the
/// connection's mark back (so policy routing delivers them locally); and
/// `ISTIO_INBOUND` lets marked, inbound-passthrough and unmarked loopback
/// packets by.
fn tproxy_marks(
    rules: &mut Vec<Rule>,
    policy: &Policy,
    family: Family,
    lo: &str,
    mark: &str,
    outbound_mark: &str,
) {
    rules.push(Rule::mangle(
        "PREROUTING",
        &[
            "-p",
            "tcp",
            "-m",
            "mark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--save-mark",
        ],
    ));
    rules.push(Rule::mangle(
        "OUTPUT",
        &[
            "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN",
        ],
    ));
    for (ids, owner) in [
        (&policy.proxy_uids, "--uid-owner"),
        (&policy.proxy_gids, "--gid-owner"),
    ] {
        for id in ids {
            rules.push(Rule::mangle(
                "OUTPUT",
                &[
                    "!",
                    "-d",
                    lo,
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    owner,
                    &id.to_string(),
                    "-j",
                    "MARK",
                    "--set-mark",
                    outbound_mark,
                ],
            ));
        }
    }
    rules.push(Rule::mangle(
        "OUTPUT",
        &[
            "-p",
            "tcp",
            "-m",
            "connmark",
            "--mark",
            mark,
            "-j",
            "CONNMARK",
            "--restore-mark",
        ],
    ));
    rules.push(
        Rule::mangle(
            ISTIO_INBOUND,
            &["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"],
        )
        .at(1),
    );
    rules.push(
        Rule::mangle(
            ISTIO_INBOUND,
            &[
                "-p",
                "tcp",
                "-s",
                family.inbound_passthrough_source(),
                "-i",
                "lo",
                "-j",
                "RETURN",
            ],
        )
        .at(2),
    );
    rules.push(
        Rule::mangle(
            ISTIO_INBOUND,
            &[
                "-p",
                "tcp",
                "-i",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                outbound_mark,
                "-j",
                "RETURN",
            ],
        )
        .at(3),
    );
}

#[cfg(test)]
mod tests;
