//! The Istio interception policy: what it holds, how it is parsed and
//! validated, and [`verdict()`], the reference decision every backend must
//! agree with. Pure Rust, no I/O.
//!
//! The decision order is the order of istio-iptables' `ISTIO_OUTPUT` chain
//! (istio `tools/istio-iptables/pkg/capture/run.go`), rule for rule, so the
//! same flags give the same outcome under the eBPF and the iptables backend.

mod parse;
mod verdict;

use std::net::IpAddr;

pub use ipnetwork::IpNetwork;
pub use parse::{go_bool, go_bool_flag, CaptureArgs, PolicyArgs, PolicyError, Source};

pub use verdict::{
    as_dialled, inbound_verdict, verdict, verdict_for, Action, Connect, InboundVerdict, Rule,
    Transport, Verdict,
};

/// Environment variables are process-wide: unit tests that parse flags
/// (which read them) take turns with the tests that set them.
#[cfg(test)]
pub(crate) static TEST_ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Default outbound proxy port (`-p`, Envoy's outbound listener).
pub const DEFAULT_PROXY_PORT: u16 = 15001;
/// Default inbound capture port (`-z`, Envoy's inbound listener).
pub const DEFAULT_INBOUND_CAPTURE_PORT: u16 = 15006;
/// Default inbound tunnel port (HBONE, 15008): never sent to the inbound capture port.
pub const DEFAULT_INBOUND_TUNNEL_PORT: u16 = 15008;
/// Istio's proxy UID and GID.
pub const DEFAULT_PROXY_ID: u32 = 1337;
/// The port istio-agent's DNS proxy listens on, where DNS capture sends
/// port 53 (istio's `IstioAgentDNSListenerPort`).
pub const DNS_PROXY_PORT: u16 = divert_common::DNS_PROXY_PORT;
/// TPROXY mode's packet mark (`-t`, `INBOUND_TPROXY_MARK`), istio's default.
pub const DEFAULT_TPROXY_MARK: u32 = 1337;
/// TPROXY mode's route table (`-r`, `INBOUND_TPROXY_ROUTE_TABLE`), istio's default.
pub const DEFAULT_TPROXY_ROUTE_TABLE: u32 = 133;
/// Most proxy UIDs, and separately GIDs, one policy can name (kernel map layout).
pub const MAX_PROXY_IDS: usize = divert_common::limits::MAX_PROXY_IDS;

/// Which destinations the include ranges (`-i`, `includeOutboundIPRanges`) capture.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IncludeRanges {
    /// `*`: every destination that nothing earlier passes through.
    All,
    /// A list of CIDRs, IPv4 and IPv6 mixed; empty (`""`) captures nothing by range.
    List(Vec<IpNetwork>),
}

impl IncludeRanges {
    /// The CIDRs of a list (none for `*`).
    pub fn cidrs(&self) -> &[IpNetwork] {
        match self {
            IncludeRanges::All => &[],
            IncludeRanges::List(v) => v,
        }
    }

    /// Whether a range was written with a loopback address (`127.0.0.0/8`,
    /// `::1/128`), istio-iptables' `HasLoopBackIP`: then it omits the rules
    /// that let a non-proxy process reach the pod's own addresses directly.
    pub fn has_loopback(&self) -> bool {
        self.cidrs().iter().any(|n| n.ip().is_loopback())
    }
}

/// How inbound connections reach the inbound capture port (`-m`,
/// `sidecar.istio.io/interceptionMode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InterceptionMode {
    /// NAT `REDIRECT` (Istio's default).
    #[default]
    Redirect,
    /// `TPROXY` in the mangle table, keeping the client's source address.
    Tproxy,
}

/// Which inbound destination ports are captured (`-b`,
/// `traffic.sidecar.istio.io/includeInboundPorts`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundPorts {
    /// `""`: no inbound capture (the istio-iptables default).
    #[default]
    None,
    /// `*`: every port except the exclude list (`-d`).
    All,
    /// These ports only.
    List(Vec<u16>),
}

impl InboundPorts {
    /// No inbound capture.
    pub fn is_none(&self) -> bool {
        *self == InboundPorts::None
    }
}

/// The capture settings only a backend that sees packets applies (the
/// iptables backend's interface, mangle and raw rules): TPROXY, interfaces,
/// `--drop-invalid`, another host loopback range. Not part of [`Policy`],
/// which is what the kernel maps hold and the daemon's socket takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    /// `-m`: how inbound connections reach the inbound capture port
    /// (the ports are the policy's).
    pub interception_mode: InterceptionMode,
    /// Interfaces whose inbound traffic is treated as outbound (`-k`,
    /// `--kube-virt-interfaces`, `traffic.sidecar.istio.io/kubevirtInterfaces`).
    pub kube_virt_interfaces: Vec<String>,
    /// Interfaces never intercepted in either direction (`-c`,
    /// `--istio-exclude-interfaces`, `traffic.sidecar.istio.io/excludeInterfaces`).
    pub exclude_interfaces: Vec<String>,
    /// `--dual-stack`: IPv6 rules whenever the namespace has an IPv6
    /// address; without it, only when its first address is IPv6 (istio's
    /// `getLocalIP`).
    pub dual_stack: bool,
    /// `--drop-invalid` (`DROP_INVALID`, `INVALID_DROP`): drop packets
    /// conntrack finds invalid (the mangle table's `ISTIO_DROP`).
    pub drop_invalid: bool,
    /// The IPv4 host loopback range of the rules
    /// (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`), as written; 127.0.0.1/32 by
    /// default. Only the iptables backend applies another.
    pub host_loopback_v4: String,
    /// TPROXY mode's mark and route table (`-t`, `-r`); used only with
    /// `-m TPROXY`.
    pub tproxy: Tproxy,
}

/// DNS capture as istio-iptables does it (run.go `SetupDNSRedir`): TCP and
/// UDP to port 53 of the nameservers (or of every address, with
/// `--capture-all-dns`) go to istio-agent's [`DNS_PROXY_PORT`], except the
/// proxy's own. The iptables backend also splits UDP DNS over two
/// conntrack zones; the eBPF backend has no conntrack to split.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsCapture {
    /// `--capture-all-dns`: port 53 of every destination, not only of the
    /// nameservers.
    pub capture_all: bool,
    /// The IPv4 nameservers of the namespace's resolv.conf, in its order
    /// (none with `capture_all`, which does not read it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers_v4: Vec<Nameserver>,
    /// The IPv6 nameservers, likewise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers_v6: Vec<Nameserver>,
}

impl DnsCapture {
    /// Every nameserver, IPv4 first.
    pub fn servers(&self) -> impl Iterator<Item = &Nameserver> {
        self.servers_v4.iter().chain(&self.servers_v6)
    }
}

/// One nameserver of a resolv.conf: an IP address, kept as written (the
/// iptables backend writes `-d <as written>/32`, as istio-iptables does).
/// Not IPv4-mapped, no zone: iptables could not match either. Two are
/// equal when their addresses are, however written. A string on the wire.
#[derive(Clone, Debug, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Nameserver {
    addr: IpAddr,
    written: String,
}

impl Nameserver {
    /// Errors say why `s` is not a nameserver iptables can match.
    pub fn parse(s: &str) -> Result<Nameserver, String> {
        let addr: IpAddr = s
            .parse()
            .map_err(|_| format!("nameserver {s:?} is not an IP address iptables can match"))?;
        if canonical(addr) != addr {
            return Err(format!(
                "nameserver {s:?} is IPv4-mapped: write the IPv4 address"
            ));
        }
        Ok(Nameserver {
            addr,
            written: s.to_string(),
        })
    }

    /// The address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
}

impl From<IpAddr> for Nameserver {
    fn from(addr: IpAddr) -> Nameserver {
        let addr = canonical(addr);
        Nameserver {
            addr,
            written: addr.to_string(),
        }
    }
}

impl PartialEq for Nameserver {
    fn eq(&self, other: &Nameserver) -> bool {
        self.addr == other.addr
    }
}

impl std::fmt::Display for Nameserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.written)
    }
}

impl TryFrom<String> for Nameserver {
    type Error = String;
    fn try_from(s: String) -> Result<Nameserver, String> {
        Nameserver::parse(&s)
    }
}

impl From<Nameserver> for String {
    fn from(n: Nameserver) -> String {
        n.written
    }
}

/// TPROXY mode's policy routing (istio-iptables' `-t` and `-r`): inbound
/// packets marked `mark` are routed by table `route_table`, whose one
/// route delivers everything locally (`local default dev lo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tproxy {
    /// The packet and connection mark (decimal, 32 bits).
    pub mark: u32,
    /// The routing table number.
    pub route_table: u32,
}

impl Default for Tproxy {
    /// istio-iptables' defaults, 1337 and 133.
    fn default() -> Self {
        Tproxy {
            mark: DEFAULT_TPROXY_MARK,
            route_table: DEFAULT_TPROXY_ROUTE_TABLE,
        }
    }
}

/// istio-iptables' host loopback range, `HostIPv4LoopbackCidr`'s default.
pub const DEFAULT_HOST_LOOPBACK_V4: &str = "127.0.0.1/32";

impl Capture {
    /// TPROXY's policy routing, when the interception mode is TPROXY.
    pub fn tproxy_routing(&self) -> Option<&Tproxy> {
        (self.interception_mode == InterceptionMode::Tproxy).then_some(&self.tproxy)
    }
}

impl Default for Capture {
    /// istio-iptables' defaults: no inbound capture, no interfaces, one
    /// address family decision, every group, 127.0.0.1/32.
    fn default() -> Self {
        Capture {
            interception_mode: InterceptionMode::default(),
            kube_virt_interfaces: Vec::new(),
            exclude_interfaces: Vec::new(),
            dual_stack: false,
            drop_invalid: false,
            host_loopback_v4: DEFAULT_HOST_LOOPBACK_V4.to_string(),
            tproxy: Tproxy::default(),
        }
    }
}

/// Which processes' outbound connects are captured, by group (istio-iptables'
/// `InterceptFilter` over `ISTIO_OUTBOUND_OWNER_GROUPS` and
/// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`), group names or GIDs as written.
/// iptables resolves names in the namespace; for the kernel, `divert init`
/// and `divert run` resolve them first ([`OwnerGroups::resolved`]) and the
/// daemon takes GIDs only.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerGroups {
    /// Every group but these (`*`, and the exclude list).
    AllExcept(Vec<String>),
    /// These groups only (an include list; empty: none).
    Only(Vec<String>),
}

impl Default for OwnerGroups {
    /// istio-iptables' default: every group.
    fn default() -> Self {
        OwnerGroups::AllExcept(Vec::new())
    }
}

impl OwnerGroups {
    /// Whether this is the default, every group (no filter at all).
    pub fn is_every_group(&self) -> bool {
        *self == OwnerGroups::default()
    }

    /// The groups of the list, as written.
    pub fn groups(&self) -> &[String] {
        match self {
            OwnerGroups::AllExcept(g) | OwnerGroups::Only(g) => g,
        }
    }

    /// The list's GIDs, when every group is written as one (what the
    /// kernel holds); `None` when a group is a name.
    pub fn gids(&self) -> Option<Vec<u32>> {
        self.groups().iter().map(|g| g.parse().ok()).collect()
    }

    /// Whether a process with real GID `gid` is in the list (a name is
    /// never matched: resolve it first).
    pub fn lists(&self, gid: u32) -> bool {
        self.groups().iter().any(|g| g.parse() == Ok(gid))
    }

    /// The same filter with each group name resolved to its GID in this
    /// process's group database (`getgrnam`, the `/etc/group` iptables
    /// would read here). Errors name the group that does not resolve.
    pub fn resolved(&self) -> Result<OwnerGroups, String> {
        let resolve = |g: &String| -> Result<String, String> {
            if g.parse::<u32>().is_ok() {
                return Ok(g.clone());
            }
            match nix::unistd::Group::from_name(g) {
                Ok(Some(group)) => Ok(group.gid.as_raw().to_string()),
                Ok(None) => Err(format!("group {g:?} does not exist here (/etc/group)")),
                Err(e) => Err(format!("looking up group {g:?}: {e}")),
            }
        };
        let list = |v: &Vec<String>| -> Result<Vec<String>, String> {
            let mut out: Vec<String> = Vec::new();
            for g in v {
                let gid = resolve(g)?;
                // A name and its GID both listed are one group.
                if !out.contains(&gid) {
                    out.push(gid);
                }
            }
            Ok(out)
        };
        Ok(match self {
            OwnerGroups::AllExcept(v) => OwnerGroups::AllExcept(list(v)?),
            OwnerGroups::Only(v) => OwnerGroups::Only(list(v)?),
        })
    }
}

/// One network namespace's outbound interception policy, validated: what
/// the kernel maps hold for it ([`crate::ebpf::Maps::policy_of`] reads it
/// back whole), what the daemon's socket takes (without `local_addrs`, and
/// no field besides these), and what [`verdict()`] judges.
///
/// Ports are host byte order; UIDs and GIDs are as the kernel reports the
/// connecting process's real IDs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Outbound proxy port (`-p`, `--envoy-port`), default 15001.
    pub proxy_port: u16,
    /// Inbound capture port (`-z`, `--inbound-capture-port`), default 15006.
    pub inbound_capture_port: u16,
    /// Inbound tunnel port (`--inbound-tunnel-port`), default 15008.
    pub inbound_tunnel_port: u16,
    /// Proxy UIDs (`-u`, `--proxy-uid`), at most [`MAX_PROXY_IDS`].
    pub proxy_uids: Vec<u32>,
    /// Proxy GIDs (`-g`, `--proxy-gid`), at most [`MAX_PROXY_IDS`].
    pub proxy_gids: Vec<u32>,
    /// Include ranges (`-i`, `includeOutboundIPRanges`).
    pub include_ranges: IncludeRanges,
    /// Exclude ranges (`-x`, `excludeOutboundIPRanges`); exclude always beats include.
    pub exclude_ranges: Vec<IpNetwork>,
    /// Include outbound ports (`-q`, `includeOutboundPorts`): redirected whatever the address.
    pub include_ports: Vec<u16>,
    /// Exclude outbound ports (`-o`, `excludeOutboundPorts`): never redirected.
    pub exclude_ports: Vec<u16>,
    /// The namespace's own addresses (what iptables' `-o lo` matches besides
    /// loopback), canonical: no IPv4-mapped IPv6.
    pub local_addrs: Vec<IpAddr>,
    /// The owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`),
    /// every group by default (and then absent from a request).
    #[serde(default, skip_serializing_if = "OwnerGroups::is_every_group")]
    pub owner_groups: OwnerGroups,
    /// Inbound ports sent to the inbound capture port (`-b`,
    /// `includeInboundPorts`); none by default (and then absent from a
    /// request).
    #[serde(default, skip_serializing_if = "InboundPorts::is_none")]
    pub inbound_ports: InboundPorts,
    /// Inbound ports left alone under `-b '*'` (`-d`,
    /// `excludeInboundPorts`; istio-iptables ignores them with a list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_exclude_ports: Vec<u16>,
    /// DNS capture (`--redirect-dns`, `ISTIO_META_DNS_CAPTURE`); off by
    /// default (and then absent from a request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsCapture>,
}

impl Default for Policy {
    /// istio-iptables' defaults with include `*`: the policy of a plain `divert run`.
    fn default() -> Self {
        Policy {
            proxy_port: DEFAULT_PROXY_PORT,
            inbound_capture_port: DEFAULT_INBOUND_CAPTURE_PORT,
            inbound_tunnel_port: DEFAULT_INBOUND_TUNNEL_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            include_ranges: IncludeRanges::All,
            exclude_ranges: Vec::new(),
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
            local_addrs: Vec::new(),
            owner_groups: OwnerGroups::default(),
            inbound_ports: InboundPorts::None,
            inbound_exclude_ports: Vec::new(),
            dns: None,
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`; every other address unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}
