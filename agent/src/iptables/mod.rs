//! The iptables backend: a [`Policy`] and its [`Capture`] settings rendered
//! as istio-iptables renders them,
//! and applied to the calling thread's network namespace with
//! iptables-restore.
//!
//! [`render`] follows istio-iptables' `tools/istio-iptables/pkg/capture/run.go`
//! (`Run`, REDIRECT mode, DNS capture off, no owner-group filter) rule for
//! rule, in its order and its spelling, into the nat table's four chains
//! `ISTIO_INBOUND`, `ISTIO_REDIRECT`, `ISTIO_IN_REDIRECT` and `ISTIO_OUTPUT`
//! plus the jumps and interface rules in the built-in `PREROUTING` and
//! `OUTPUT` chains. [`RuleSet::restore_text`] prints them the way
//! istio-iptables' rule builder does (`BuildV4Restore`), so `--dry-run`
//! output can be compared line for line with istio-iptables' own test
//! goldens (`tests/testdata/istio-iptables/`,
//! compared in `tests/tests/iptables.rs`).
//!
//! [`apply`] installs a rule set in one iptables-restore transaction per
//! address family; see there for idempotence, cleanup and rollback.

mod apply;

pub use apply::{apply, cleanup, detect, detect_forced, Iptables};

use std::fmt::Write as _;

use crate::policy::{
    self, Capture, InboundPorts, InterceptionMode, IpNetwork, OwnerGroups, Policy,
};

/// Chains this backend owns in the nat table, in istio-iptables' names.
/// Nothing else is ever created, flushed or deleted.
pub const CHAINS: [&str; 4] = [
    ISTIO_INBOUND,
    ISTIO_REDIRECT,
    ISTIO_IN_REDIRECT,
    ISTIO_OUTPUT,
];

/// Inbound connections: entered from `PREROUTING` when `-b` is set.
pub const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
/// `REDIRECT --to-ports <-p>`: the outbound proxy.
pub const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
/// `REDIRECT --to-ports <-z>`: the inbound capture port.
pub const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
/// The outbound decision, entered from `OUTPUT` for every packet.
pub const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";

/// The mangle-table chain of `--drop-invalid`: packets conntrack finds
/// invalid are dropped (`PREROUTING -m conntrack --ctstate INVALID -j
/// ISTIO_DROP`). The only mangle chain this backend owns.
pub const ISTIO_DROP: &str = "ISTIO_DROP";

/// The most ports one `-m multiport --dports` match takes (the kernel's
/// `XT_MULTI_PORTS`); longer lists are split over several rules.
pub const MULTIPORT_MAX: usize = 15;

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

/// A policy setting this backend does not implement: refused whole rather
/// than half-applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("inbound interception mode TPROXY (-m TPROXY) is not supported by divert's iptables backend yet; use -m REDIRECT")]
    Tproxy,
}

/// One rule of the nat table, as an `-A` (append) or `-I … 1` (insert at the
/// top) line of iptables-restore input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The chain the rule lives in.
    pub chain: &'static str,
    /// `true` for istio-iptables' `-I <chain> 1` (only in `PREROUTING`).
    pub insert_first: bool,
    /// Matches and target, e.g. `["-p", "tcp", "-j", "ISTIO_REDIRECT"]`.
    pub spec: Vec<String>,
    /// For a rule of `ISTIO_OUTPUT`: the decisions of
    /// [`crate::policy::verdict()`] it is the rule for (a multiport rule
    /// stands for each of its ports). Empty for the other chains, and for
    /// rules no TCP connect matches (the `-p udp` exclude ports). `divert
    /// explain` finds the deciding rule by it.
    pub decides: Vec<policy::Rule>,
}

impl Rule {
    fn append(chain: &'static str, spec: &[&str]) -> Rule {
        Rule {
            chain,
            insert_first: false,
            spec: spec.iter().map(|s| s.to_string()).collect(),
            decides: Vec::new(),
        }
    }

    fn deciding(self, decides: impl IntoIterator<Item = policy::Rule>) -> Rule {
        Rule {
            decides: decides.into_iter().collect(),
            ..self
        }
    }

    fn insert(chain: &'static str, spec: &[&str]) -> Rule {
        Rule {
            insert_first: true,
            ..Rule::append(chain, spec)
        }
    }

    /// The iptables-restore line: `-A CHAIN SPEC…` or `-I CHAIN 1 SPEC…`.
    pub fn line(&self) -> String {
        let head = if self.insert_first {
            format!("-I {} 1", self.chain)
        } else {
            format!("-A {}", self.chain)
        };
        std::iter::once(head)
            .chain(self.spec.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The rule as iptables-save prints it back when the spelling is already
    /// canonical (the interface rules in built-in chains): `-A CHAIN SPEC…`.
    pub fn saved_form(&self) -> String {
        Rule {
            insert_first: false,
            ..self.clone()
        }
        .line()
    }

    /// The jump target (`-j X`), if any.
    pub fn target(&self) -> Option<&str> {
        let j = self.spec.iter().position(|s| s == "-j")?;
        self.spec.get(j + 1).map(String::as_str)
    }

    /// Whether the rule lives in a built-in chain (`PREROUTING`, `OUTPUT`).
    pub fn in_builtin_chain(&self) -> bool {
        !CHAINS.contains(&self.chain)
    }
}

/// The rules of one address family, in istio-iptables' order: the nat
/// table's, and the mangle table's (`--drop-invalid`; usually none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    /// The nat table.
    pub rules: Vec<Rule>,
    /// The mangle table: [`ISTIO_DROP`] and the jump to it.
    pub mangle: Vec<Rule>,
}

impl RuleSet {
    /// The chains to create, in istio-iptables' order: chains in order of
    /// their first rule, then chains only jumped to.
    pub fn chains(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = Vec::new();
        for r in &self.rules {
            if !r.in_builtin_chain() && !out.contains(&r.chain) {
                out.push(r.chain);
            }
        }
        for r in &self.rules {
            if let Some(t) = r.target() {
                if let Some(c) = CHAINS.iter().find(|c| **c == t) {
                    if !out.contains(c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    /// iptables-restore input in istio-iptables' spelling: the mangle
    /// table's section when there is one, then `* nat`, one `-N` per chain,
    /// the rules, `COMMIT`. Meant for `--noflush` on a namespace
    /// without the chains (what `--dry-run` prints; [`apply`] writes a
    /// variant that also replaces an earlier run's rules).
    pub fn restore_text(&self) -> String {
        let mut s = String::new();
        if !self.mangle.is_empty() {
            s.push_str("* mangle\n");
            let _ = writeln!(s, "-N {ISTIO_DROP}");
            for r in &self.mangle {
                let _ = writeln!(s, "{}", r.line());
            }
            s.push_str("COMMIT\n");
        }
        s.push_str("* nat\n");
        for c in self.chains() {
            let _ = writeln!(s, "-N {c}");
        }
        for r in &self.rules {
            let _ = writeln!(s, "{}", r.line());
        }
        s.push_str("COMMIT\n");
        s
    }
}

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

/// The rules istio-iptables writes into the nat table for `policy`,
/// `capture` and one address family, in its order (run.go `Run`):
///
/// 1. `-c` interfaces: `PREROUTING -i X -j RETURN`, `OUTPUT -o X -j RETURN`;
/// 2. `-k` interfaces: `-I PREROUTING 1 -i X -j RETURN`;
/// 3. `ISTIO_INBOUND` returns the tunnel port; `ISTIO_REDIRECT` and
///    `ISTIO_IN_REDIRECT` redirect to `-p` and `-z`;
/// 4. `-b`: `PREROUTING -p tcp -j ISTIO_INBOUND` and the inbound ports
///    (with `*`, `-d` first);
/// 5. `OUTPUT -j ISTIO_OUTPUT`, then in `ISTIO_OUTPUT`: `-o` ports (tcp and
///    udp), the inbound-passthrough source, per proxy UID then per GID the
///    three owner rules (the middle one dropped when an include range is a
///    loopback address), the owner-group filter, the host loopback, `-x`, `-q`, and `-i` (`*`, or
///    one rule per range of this family; with `-k`, matching
///    `PREROUTING` jumps inserted at the top).
///
/// Errors: [`RenderError`] for settings the backend refuses (TPROXY).
pub fn render(policy: &Policy, capture: &Capture, family: Family) -> Result<RuleSet, RenderError> {
    if capture.inbound.mode == InterceptionMode::Tproxy {
        return Err(RenderError::Tproxy);
    }
    let mut rules: Vec<Rule> = Vec::new();
    let tunnel = policy.inbound_tunnel_port.to_string();
    let lo = match family {
        Family::V4 => capture.host_loopback_v4.as_str(),
        Family::V6 => family.loopback(),
    };

    for ifc in &capture.exclude_interfaces {
        rules.push(Rule::append("PREROUTING", &["-i", ifc, "-j", "RETURN"]));
        rules.push(Rule::append("OUTPUT", &["-o", ifc, "-j", "RETURN"]));
    }
    for ifc in &capture.kube_virt_interfaces {
        rules.push(Rule::insert("PREROUTING", &["-i", ifc, "-j", "RETURN"]));
    }
    rules.push(Rule::append(
        ISTIO_INBOUND,
        &["-p", "tcp", "--dport", &tunnel, "-j", "RETURN"],
    ));
    rules.push(Rule::append(
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
    rules.push(Rule::append(
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

    if capture.inbound.ports != InboundPorts::None {
        rules.push(Rule::append(
            "PREROUTING",
            &["-p", "tcp", "-j", ISTIO_INBOUND],
        ));
        match &capture.inbound.ports {
            InboundPorts::All => {
                for m in port_matches(&capture.inbound.exclude_ports) {
                    let mut spec = vec!["-p", "tcp"];
                    spec.extend(m.iter().map(String::as_str));
                    spec.extend(["-j", "RETURN"]);
                    rules.push(Rule::append(ISTIO_INBOUND, &spec));
                }
                rules.push(Rule::append(
                    ISTIO_INBOUND,
                    &["-p", "tcp", "-j", ISTIO_IN_REDIRECT],
                ));
            }
            InboundPorts::List(ports) => {
                for p in ports {
                    rules.push(Rule::append(
                        ISTIO_INBOUND,
                        &[
                            "-p",
                            "tcp",
                            "--dport",
                            &p.to_string(),
                            "-j",
                            ISTIO_IN_REDIRECT,
                        ],
                    ));
                }
            }
            InboundPorts::None => unreachable!("checked above"),
        }
    }

    rules.push(Rule::append("OUTPUT", &["-j", ISTIO_OUTPUT]));
    for (m, ports) in port_matches(&policy.exclude_ports)
        .into_iter()
        .zip(policy.exclude_ports.chunks(MULTIPORT_MAX))
    {
        for proto in ["tcp", "udp"] {
            let mut spec = vec!["-p", proto];
            spec.extend(m.iter().map(String::as_str));
            spec.extend(["-j", "RETURN"]);
            let rule = Rule::append(ISTIO_OUTPUT, &spec);
            rules.push(if proto == "tcp" {
                rule.deciding(ports.iter().map(|&p| policy::Rule::ExcludeOutboundPort(p)))
            } else {
                rule
            });
        }
    }
    rules.push(
        Rule::append(
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
            rules.push(
                Rule::append(
                    ISTIO_OUTPUT,
                    &[
                        "-o",
                        "lo",
                        "!",
                        "-d",
                        lo,
                        "-p",
                        "tcp",
                        "!",
                        "--dport",
                        &tunnel,
                        "-m",
                        "owner",
                        owner,
                        &id,
                        "-j",
                        ISTIO_IN_REDIRECT,
                    ],
                )
                .deciding([to_local(n)]),
            );
            if !loopback_included {
                rules.push(
                    Rule::append(
                        ISTIO_OUTPUT,
                        &["-o", "lo", "-m", "owner", "!", owner, &id, "-j", "RETURN"],
                    )
                    .deciding([local_not_owner(n)]),
                );
            }
            rules.push(
                Rule::append(ISTIO_OUTPUT, &["-m", "owner", owner, &id, "-j", "RETURN"])
                    .deciding([is_owner(n)]),
            );
        }
    }
    // The owner-group filter (run.go `handleCaptureByOwnerGroup`).
    match &capture.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                rules.push(Rule::append(
                    ISTIO_OUTPUT,
                    &["-m", "owner", "--gid-owner", g, "-j", "RETURN"],
                ));
            }
        }
        OwnerGroups::Only(groups) => {
            let mut spec: Vec<&str> = Vec::new();
            for g in groups {
                spec.extend(["-m", "owner", "!", "--gid-owner", g]);
            }
            spec.extend(["-j", "RETURN"]);
            rules.push(Rule::append(ISTIO_OUTPUT, &spec));
        }
    }
    rules.push(
        Rule::append(ISTIO_OUTPUT, &["-d", lo, "-j", "RETURN"])
            .deciding([policy::Rule::HostLoopback]),
    );
    for net in policy.exclude_ranges.iter().filter(|n| family.owns(n)) {
        rules.push(
            Rule::append(ISTIO_OUTPUT, &["-d", &net.to_string(), "-j", "RETURN"])
                .deciding([policy::Rule::ExcludeRange(*net)]),
        );
    }
    for &p in &policy.include_ports {
        rules.push(
            Rule::append(
                ISTIO_OUTPUT,
                &["-p", "tcp", "--dport", &p.to_string(), "-j", ISTIO_REDIRECT],
            )
            .deciding([policy::Rule::IncludeOutboundPort(p)]),
        );
    }
    match &policy.include_ranges {
        crate::policy::IncludeRanges::All => {
            rules.push(
                Rule::append(ISTIO_OUTPUT, &["-j", ISTIO_REDIRECT])
                    .deciding([policy::Rule::IncludeAll]),
            );
            for ifc in &capture.kube_virt_interfaces {
                rules.push(Rule::insert(
                    "PREROUTING",
                    &["-i", ifc, "-j", ISTIO_REDIRECT],
                ));
            }
        }
        crate::policy::IncludeRanges::List(nets) => {
            for n in nets.iter().filter(|n| family.owns(n)) {
                let net = n.to_string();
                for ifc in &capture.kube_virt_interfaces {
                    rules.push(Rule::insert(
                        "PREROUTING",
                        &["-i", ifc, "-d", &net, "-j", ISTIO_REDIRECT],
                    ));
                }
                rules.push(
                    Rule::append(ISTIO_OUTPUT, &["-d", &net, "-j", ISTIO_REDIRECT])
                        .deciding([policy::Rule::IncludeRange(*n)]),
                );
            }
        }
    }
    // --drop-invalid (run.go: the mangle table's ISTIO_DROP).
    let mangle = if capture.drop_invalid {
        vec![
            Rule::append(
                "PREROUTING",
                &["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP],
            ),
            Rule::append(ISTIO_DROP, &["-j", "DROP"]),
        ]
    } else {
        Vec::new()
    };
    Ok(RuleSet {
        family,
        rules,
        mangle,
    })
}

#[cfg(test)]
mod tests;
