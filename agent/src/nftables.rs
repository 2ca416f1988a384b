//! istio-iptables' `--native-nftables`: the rules of
//! `tools/istio-nftables/pkg/capture/run.go` (`NftablesConfigurator.Run`),
//! in its order and its spelling, as one `nft -f` script.
//!
//! istio-nftables owns three `inet` tables, `istio-proxy-nat`,
//! `istio-proxy-mangle` and `istio-proxy-raw` (IPv4 and IPv6 rules side by
//! side, the IPv6 ones only when the namespace gets IPv6 rules). A table is
//! written only when it has rules: `add table`, `flush table`, the chains
//! that hold rules (base chains with their hook and priority), then the
//! rules; an insert at an index the chain has not reached yet is an append,
//! as knftables does it. [`Ruleset::script`] is that text, compared with
//! istio-nftables' goldens character for character
//! (`tests/testdata/istio-nftables/`).
//!
//! [`apply`] runs the script with `nft -f` after deleting the three tables
//! if they exist, all in one transaction, so a namespace holds exactly
//! this run's rules (running twice is running once; a table this run does
//! not use is gone) or, on failure, what it held before. [`cleanup`]
//! deletes the three tables and touches nothing else.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::policy::{
    Capture, DnsCapture, InboundPorts, IncludeRanges, InterceptionMode, IpNetwork, OwnerGroups,
    Policy, DNS_PROXY_PORT,
};

/// The tables istio-nftables owns, in the order it writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Nat,
    Mangle,
    Raw,
}

impl Table {
    /// Every table, in script order.
    pub const ALL: [Table; 3] = [Table::Nat, Table::Mangle, Table::Raw];

    /// The `inet` table's name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "istio-proxy-nat",
            Table::Mangle => "istio-proxy-mangle",
            Table::Raw => "istio-proxy-raw",
        }
    }

    /// The table's chains in the order istio-nftables declares them, each
    /// with its base-chain spec (type, hook, priority) or none.
    fn chains(self) -> &'static [(&'static str, Option<&'static str>)] {
        match self {
            Table::Nat => &[
                (PREROUTING, Some("type nat hook prerouting priority -100 ;")),
                (OUTPUT, Some("type nat hook output priority -100 ;")),
                (INBOUND, None),
                (REDIRECT, None),
                (IN_REDIRECT, None),
                (ISTIO_OUTPUT, None),
                (OUTPUT_DNS, None),
            ],
            Table::Mangle => &[
                (
                    PREROUTING,
                    Some("type filter hook prerouting priority -150 ;"),
                ),
                (OUTPUT, Some("type route hook output priority -150 ;")),
                (DIVERT, None),
                (TPROXY, None),
                (INBOUND, None),
                (DROP, None),
            ],
            Table::Raw => &[
                (
                    PREROUTING,
                    Some("type filter hook prerouting priority -300 ;"),
                ),
                (OUTPUT, Some("type filter hook output priority -300 ;")),
                (INBOUND, None),
                (OUTPUT_DNS, None),
            ],
        }
    }
}

const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const INBOUND: &str = "istio-inbound";
const REDIRECT: &str = "istio-redirect";
const IN_REDIRECT: &str = "istio-in-redirect";
const ISTIO_OUTPUT: &str = "istio-output";
const OUTPUT_DNS: &str = "istio-output-dns";
const DIVERT: &str = "istio-divert";
const TPROXY: &str = "istio-tproxy";
const DROP: &str = "istio-drop";

/// One rule: its table and chain, istio's insert index (`None`: append),
/// and its text (matches, `counter`, then the statement).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: Table,
    pub chain: &'static str,
    pub index: Option<u32>,
    pub text: String,
}

/// Every rule of one namespace, in istio-nftables' order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
}

impl Ruleset {
    /// Append `matches… counter statement` to `chain`.
    fn add(&mut self, table: Table, chain: &'static str, matches: &[&str], statement: &str) {
        self.push(table, chain, None, matches, statement);
    }

    /// The same at istio's insert `index`.
    fn insert(
        &mut self,
        table: Table,
        chain: &'static str,
        index: u32,
        matches: &[&str],
        statement: &str,
    ) {
        self.push(table, chain, Some(index), matches, statement);
    }

    fn push(
        &mut self,
        table: Table,
        chain: &'static str,
        index: Option<u32>,
        matches: &[&str],
        statement: &str,
    ) {
        let text = matches
            .iter()
            .copied()
            .chain(["counter", statement])
            .collect::<Vec<_>>()
            .join(" ");
        self.rules.push(Rule {
            table,
            chain,
            index,
            text,
        });
    }

    /// The tables that have rules.
    pub fn tables(&self) -> Vec<Table> {
        Table::ALL
            .into_iter()
            .filter(|t| self.rules.iter().any(|r| r.table == *t))
            .collect()
    }

    /// istio-nftables' transaction as `nft -f` input (run.go
    /// `addIstioTableRules`).
    pub fn script(&self) -> String {
        let mut s = String::new();
        for table in self.tables() {
            let t = table.name();
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.table == table).collect();
            s.push_str(&format!("add table inet {t}\nflush table inet {t}\n"));
            for (chain, spec) in table.chains() {
                if !rules.iter().any(|r| r.chain == *chain) {
                    continue;
                }
                match spec {
                    Some(spec) => s.push_str(&format!("add chain inet {t} {chain} {{ {spec} }}\n")),
                    None => s.push_str(&format!("add chain inet {t} {chain}\n")),
                }
            }
            let mut count: Vec<(&str, u32)> = Vec::new();
            for r in rules {
                let n = match count.iter_mut().find(|(c, _)| *c == r.chain) {
                    Some((_, n)) => n,
                    None => {
                        count.push((r.chain, 0));
                        &mut count.last_mut().expect("just pushed").1
                    }
                };
                match r.index {
                    // nft cannot insert past the end: that is an append.
                    Some(i) if i < *n => s.push_str(&format!(
                        "insert rule inet {t} {} index {i} {}\n",
                        r.chain, r.text
                    )),
                    _ => s.push_str(&format!("add rule inet {t} {} {}\n", r.chain, r.text)),
                }
                *n += 1;
            }
        }
        s
    }
}

/// `add table` then `delete table` for each of istio-nftables' tables: the
/// tables go whether they existed or not.
fn delete_tables() -> String {
    Table::ALL
        .iter()
        .map(|t| format!("add table inet {0}\ndelete table inet {0}\n", t.name()))
        .collect()
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (the nftables package), which --native-nftables needs")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .context("writing to nft")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft rejected the rules ({}): {}\n--- input ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            script.trim_end()
        );
    }
    Ok(())
}

/// Put `set` in place in the calling thread's namespace: istio-nftables'
/// tables replaced whole, in one transaction.
pub fn apply(set: &Ruleset) -> Result<()> {
    nft(&(delete_tables() + &set.script()))
}

/// Delete istio-nftables' tables (what is not there is fine).
pub fn cleanup() -> Result<()> {
    nft(&delete_tables())
}

/// The rules istio-nftables writes for `policy` and `capture`, IPv6 rules
/// only when `ipv6` (its `EnableIPv6`), in run.go's order: interfaces,
/// `--drop-invalid`, the redirect chains, inbound capture (nat, or mangle
/// for TPROXY), `istio-output` (exclude ports, the inbound-passthrough
/// source, the proxy's owner rules, the owner-group filter), DNS capture,
/// the host loopback, exclude ranges, include ports and ranges, and
/// TPROXY's marks.
pub fn render(policy: &Policy, capture: &Capture, ipv6: bool) -> Ruleset {
    use Table::{Mangle, Nat};
    let mut rs = Ruleset::default();
    let tproxy = capture.interception_mode == InterceptionMode::Tproxy;
    let lo = capture.host_loopback_v4.as_str();
    let mark = capture.tproxy.mark.to_string();
    let outbound_mark = crate::iptables::TPROXY_OUTBOUND_MARK.to_string();
    let tunnel = policy.inbound_tunnel_port.to_string();
    let capture_port = format!(":{}", policy.inbound_capture_port);

    for ifc in &capture.exclude_interfaces {
        rs.add(Nat, PREROUTING, &["iifname", ifc], "return");
        rs.add(Nat, OUTPUT, &["oifname", ifc], "return");
    }
    if tproxy {
        for ifc in &capture.exclude_interfaces {
            rs.add(Mangle, PREROUTING, &["iifname", ifc], "return");
            rs.add(Mangle, OUTPUT, &["oifname", ifc], "return");
        }
    }
    for ifc in &capture.kube_virt_interfaces {
        rs.insert(Nat, PREROUTING, 0, &["iifname", ifc], "return");
    }
    if capture.drop_invalid {
        rs.add(
            Mangle,
            PREROUTING,
            &["meta l4proto tcp", "ct state", "invalid"],
            &format!("jump {DROP}"),
        );
        rs.add(Mangle, DROP, &[], "drop");
    }
    rs.add(
        Nat,
        INBOUND,
        &["meta l4proto tcp", "tcp dport", &tunnel],
        "return",
    );
    rs.add(
        Nat,
        REDIRECT,
        &["meta l4proto tcp"],
        &format!("redirect to :{}", policy.proxy_port),
    );
    rs.add(
        Nat,
        IN_REDIRECT,
        &["meta l4proto tcp"],
        &format!("redirect to {capture_port}"),
    );

    // Inbound capture (run.go handleInboundPortsInclude).
    if policy.inbound_ports != InboundPorts::None {
        let table = if tproxy { Mangle } else { Nat };
        if tproxy {
            rs.add(Mangle, DIVERT, &[], &format!("meta mark set {mark}"));
            rs.add(Mangle, DIVERT, &[], "accept");
            let tproxy_to = |family: &str, not_lo: &str| {
                [
                    "meta l4proto tcp".to_string(),
                    format!("{family} daddr != {not_lo}"),
                    format!("tproxy {family} to {capture_port}"),
                    format!("meta mark set {mark}"),
                ]
            };
            let v4 = tproxy_to("ip", lo);
            rs.add(Mangle, TPROXY, &v4.each_ref().map(String::as_str), "accept");
            if ipv6 {
                let v6 = tproxy_to("ip6", "::1/128");
                rs.add(Mangle, TPROXY, &v6.each_ref().map(String::as_str), "accept");
            }
        }
        rs.add(
            table,
            PREROUTING,
            &["meta l4proto tcp"],
            &format!("jump {INBOUND}"),
        );
        match &policy.inbound_ports {
            InboundPorts::All => {
                for p in &policy.inbound_exclude_ports {
                    rs.add(
                        table,
                        INBOUND,
                        &["meta l4proto tcp", "tcp dport", &p.to_string()],
                        "return",
                    );
                }
                if tproxy {
                    rs.add(
                        Mangle,
                        INBOUND,
                        &["meta l4proto tcp", "ct state", "related,established"],
                        &format!("jump {DIVERT}"),
                    );
                    rs.add(
                        Mangle,
                        INBOUND,
                        &["meta l4proto tcp"],
                        &format!("jump {TPROXY}"),
                    );
                } else {
                    rs.add(
                        Nat,
                        INBOUND,
                        &["meta l4proto tcp"],
                        &format!("jump {IN_REDIRECT}"),
                    );
                }
            }
            InboundPorts::List(ports) => {
                for p in ports {
                    let p = p.to_string();
                    if tproxy {
                        rs.add(
                            Mangle,
                            INBOUND,
                            &[
                                "meta l4proto tcp",
                                "ct state",
                                "related,established",
                                "tcp dport",
                                &p,
                            ],
                            &format!("jump {DIVERT}"),
                        );
                        rs.add(
                            Mangle,
                            INBOUND,
                            &["meta l4proto tcp", "tcp dport", &p],
                            &format!("jump {TPROXY}"),
                        );
                    } else {
                        rs.add(
                            Nat,
                            INBOUND,
                            &["meta l4proto tcp", "tcp dport", &p],
                            &format!("jump {IN_REDIRECT}"),
                        );
                    }
                }
            }
            InboundPorts::None => unreachable!("checked above"),
        }
    }

    rs.add(Nat, OUTPUT, &[], &format!("jump {ISTIO_OUTPUT}"));
    for p in &policy.exclude_ports {
        let p = p.to_string();
        rs.add(Nat, ISTIO_OUTPUT, &["tcp dport", &p], "return");
        rs.add(Nat, ISTIO_OUTPUT, &["udp dport", &p], "return");
    }
    rs.add(
        Nat,
        ISTIO_OUTPUT,
        &["oifname", "lo", "ip saddr", "127.0.0.6/32"],
        "return",
    );
    if ipv6 {
        rs.add(
            Nat,
            ISTIO_OUTPUT,
            &["oifname", "lo", "ip6 saddr", "::6/128"],
            "return",
        );
    }
    owners(&mut rs, policy, capture, ipv6);
    match &policy.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                rs.add(Nat, ISTIO_OUTPUT, &["skgid", g], "return");
            }
        }
        OwnerGroups::Only(groups) => {
            let matches: Vec<&str> = groups
                .iter()
                .flat_map(|g| ["skgid", "!=", g.as_str()])
                .collect();
            rs.add(Nat, ISTIO_OUTPUT, &matches, "return");
        }
    }
    if let Some(dns) = &policy.dns {
        dns_rules(&mut rs, policy, dns, ipv6);
    }
    rs.add(Nat, ISTIO_OUTPUT, &["ip daddr", lo], "return");
    if ipv6 {
        rs.add(Nat, ISTIO_OUTPUT, &["ip6 daddr", "::1/128"], "return");
    }
    let v4 = |n: &&IpNetwork| n.is_ipv4();
    let v6 = |n: &&IpNetwork| n.is_ipv6() && ipv6;
    for n in policy.exclude_ranges.iter().filter(v4) {
        rs.add(Nat, ISTIO_OUTPUT, &["ip daddr", &n.to_string()], "return");
    }
    for n in policy.exclude_ranges.iter().filter(v6) {
        rs.add(Nat, ISTIO_OUTPUT, &["ip6 daddr", &n.to_string()], "return");
    }
    for p in &policy.include_ports {
        rs.add(
            Nat,
            ISTIO_OUTPUT,
            &["tcp dport", &p.to_string()],
            &format!("jump {REDIRECT}"),
        );
    }
    let to_redirect = format!("jump {REDIRECT}");
    match &policy.include_ranges {
        IncludeRanges::All => {
            rs.add(Nat, ISTIO_OUTPUT, &[], &to_redirect);
            for ifc in &capture.kube_virt_interfaces {
                rs.insert(Nat, PREROUTING, 0, &["iifname", ifc], &to_redirect);
            }
        }
        IncludeRanges::List(nets) => {
            for (keyword, family) in [("ip daddr", true), ("ip6 daddr", false)] {
                let nets = nets.iter().filter(|n| {
                    if family {
                        n.is_ipv4()
                    } else {
                        n.is_ipv6() && ipv6
                    }
                });
                for n in nets {
                    let n = n.to_string();
                    for ifc in &capture.kube_virt_interfaces {
                        rs.insert(
                            Nat,
                            PREROUTING,
                            0,
                            &["iifname", ifc, keyword, &n],
                            &to_redirect,
                        );
                    }
                    rs.add(Nat, ISTIO_OUTPUT, &[keyword, &n], &to_redirect);
                }
            }
        }
    }
    if tproxy {
        rs.add(
            Mangle,
            PREROUTING,
            &["meta l4proto tcp", "mark", &mark],
            "ct mark set mark",
        );
        rs.add(
            Mangle,
            OUTPUT,
            &["oifname", "lo", "meta l4proto tcp", "mark", &mark],
            "return",
        );
        let set_outbound = format!("meta mark set {outbound_mark}");
        for (ids, owner) in [(&policy.proxy_uids, "skuid"), (&policy.proxy_gids, "skgid")] {
            for id in ids {
                let id = id.to_string();
                rs.add(
                    Mangle,
                    OUTPUT,
                    &[
                        "oifname",
                        "lo",
                        "meta l4proto tcp",
                        "ip daddr",
                        "!=",
                        lo,
                        owner,
                        &id,
                    ],
                    &set_outbound,
                );
                if ipv6 {
                    rs.add(
                        Mangle,
                        OUTPUT,
                        &[
                            "oifname",
                            "lo",
                            "meta l4proto tcp",
                            "ip6 daddr",
                            "!=",
                            "::1/128",
                            owner,
                            &id,
                        ],
                        &set_outbound,
                    );
                }
            }
        }
        rs.add(
            Mangle,
            OUTPUT,
            &["meta l4proto tcp", "ct", "mark", &mark],
            "meta mark set ct mark",
        );
        rs.insert(
            Mangle,
            INBOUND,
            0,
            &["meta l4proto tcp", "mark", &mark],
            "return",
        );
        rs.insert(
            Mangle,
            INBOUND,
            1,
            &[
                "iifname",
                "lo",
                "meta l4proto tcp",
                "ip saddr",
                "127.0.0.6/32",
            ],
            "return",
        );
        if ipv6 {
            rs.insert(
                Mangle,
                INBOUND,
                1,
                &["iifname", "lo", "meta l4proto tcp", "ip6 saddr", "::6/128"],
                "return",
            );
        }
        rs.insert(
            Mangle,
            INBOUND,
            2,
            &[
                "iifname",
                "lo",
                "meta l4proto tcp",
                "mark",
                "!=",
                &outbound_mark,
            ],
            "return",
        );
    }
    rs
}

/// The proxy's owner rules in `istio-output`, per UID then per GID (run.go).
fn owners(rs: &mut Ruleset, policy: &Policy, capture: &Capture, ipv6: bool) {
    use Table::Nat;
    let tunnel = policy.inbound_tunnel_port.to_string();
    let dns = policy.dns.is_some();
    let lo = capture.host_loopback_v4.as_str();
    let not_tunnel_or_dns = format!("{{ 53, {tunnel} }}");
    let loopback_included = policy.include_ranges.has_loopback();
    let to_inbound = format!("jump {IN_REDIRECT}");
    for (ids, owner) in [(&policy.proxy_uids, "skuid"), (&policy.proxy_gids, "skgid")] {
        for id in ids {
            let id = id.to_string();
            // istio-nftables leaves port 53 out for the UIDs only.
            let ports = if dns && owner == "skuid" {
                not_tunnel_or_dns.as_str()
            } else {
                tunnel.as_str()
            };
            for (daddr, not_lo, wanted) in [("ip daddr", lo, true), ("ip6 daddr", "::1/128", ipv6)]
            {
                if wanted {
                    rs.add(
                        Nat,
                        ISTIO_OUTPUT,
                        &[
                            "oifname",
                            "lo",
                            "meta l4proto tcp",
                            daddr,
                            "!=",
                            not_lo,
                            "tcp dport",
                            "!=",
                            ports,
                            owner,
                            &id,
                        ],
                        &to_inbound,
                    );
                }
            }
            if !loopback_included {
                if dns {
                    rs.add(
                        Nat,
                        ISTIO_OUTPUT,
                        &[
                            "oifname",
                            "lo",
                            "meta l4proto tcp",
                            "tcp dport",
                            "!=",
                            "53",
                            owner,
                            "!=",
                            &id,
                        ],
                        "return",
                    );
                } else {
                    rs.add(
                        Nat,
                        ISTIO_OUTPUT,
                        &["oifname", "lo", owner, "!=", &id],
                        "return",
                    );
                }
            }
            rs.add(Nat, ISTIO_OUTPUT, &[owner, &id], "return");
        }
    }
}

/// DNS capture (run.go `SetupDNSRedir`, `addDNSConntrackZones`).
fn dns_rules(rs: &mut Ruleset, policy: &Policy, dns: &DnsCapture, ipv6: bool) {
    use Table::{Nat, Raw};
    let to_agent = format!("redirect to :{DNS_PROXY_PORT}");
    let v4: Vec<String> = dns.servers_v4.iter().map(|s| format!("{s}/32")).collect();
    let v6: Vec<String> = dns.servers_v6.iter().map(|s| format!("{s}/128")).collect();
    rs.add(Raw, OUTPUT, &[], &format!("jump {OUTPUT_DNS}"));
    if dns.capture_all || !v4.is_empty() || !v6.is_empty() {
        rs.add(Nat, ISTIO_OUTPUT, &[], &format!("jump {OUTPUT_DNS}"));
    }
    for proto in ["tcp", "udp"] {
        let dport = format!("{proto} dport");
        if dns.capture_all {
            let mut m = vec![];
            if proto == "tcp" {
                m.push("meta l4proto tcp");
            }
            m.extend([dport.as_str(), "53"]);
            rs.add(Nat, OUTPUT_DNS, &m, &to_agent);
            continue;
        }
        for s in &v4 {
            rs.add(Nat, OUTPUT_DNS, &["ip daddr", s, &dport, "53"], &to_agent);
        }
        if ipv6 {
            for s in &v6 {
                rs.add(Nat, OUTPUT_DNS, &["ip6 daddr", s, &dport, "53"], &to_agent);
            }
        }
    }
    let agent_port = DNS_PROXY_PORT.to_string();
    for (ids, owner) in [(&policy.proxy_uids, "skuid"), (&policy.proxy_gids, "skgid")] {
        for id in ids {
            let id = id.to_string();
            rs.add(
                Raw,
                OUTPUT_DNS,
                &["udp dport", "53", "meta", owner, &id],
                "ct zone set 1",
            );
            rs.add(
                Raw,
                OUTPUT_DNS,
                &["udp sport", &agent_port, "meta", owner, &id],
                "ct zone set 2",
            );
        }
    }
    let jump_inbound = format!("jump {INBOUND}");
    if dns.capture_all {
        rs.add(Raw, PREROUTING, &[], &jump_inbound);
        rs.add(Raw, OUTPUT_DNS, &["udp dport", "53"], "ct zone set 2");
        rs.add(Raw, INBOUND, &["udp sport", "53"], "ct zone set 1");
        return;
    }
    if !v4.is_empty() || !v6.is_empty() {
        rs.add(Raw, PREROUTING, &[], &jump_inbound);
    }
    for s in &v4 {
        rs.add(
            Raw,
            OUTPUT_DNS,
            &["udp dport", "53", "ip daddr", s],
            "ct zone set 2",
        );
        rs.add(
            Raw,
            INBOUND,
            &["udp sport", "53", "ip saddr", s],
            "ct zone set 1",
        );
    }
    if ipv6 {
        for s in &v6 {
            rs.add(
                Raw,
                OUTPUT_DNS,
                &["udp dport", "53", "ip6 daddr", s],
                "ct zone set 2",
            );
            rs.add(
                Raw,
                INBOUND,
                &["udp sport", "53", "ip6 saddr", s],
                "ct zone set 1",
            );
        }
    }
}
