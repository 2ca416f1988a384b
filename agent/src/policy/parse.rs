//! istio-iptables' flags and environment variables → a validated [`Policy`].
//!
//! Spellings are istio-iptables' (`tools/istio-iptables/pkg/cmd/root.go` and
//! the environment of the older `istio-iptables.sh`), with readable aliases
//! named after the `traffic.sidecar.istio.io/*` annotations. A flag beats its
//! environment variable. Every bad value is an error naming the value and the
//! setting it came from; nothing is applied.

use std::{fmt, str::FromStr};

use clap::{parser::ValueSource, ArgMatches, Args};
use ipnetwork::IpNetwork;

use super::{
    Capture, DnsCapture, InboundPorts, IncludeRanges, InterceptionMode, Nameserver, OwnerGroups,
    Policy, Tproxy, DEFAULT_HOST_LOOPBACK_V4, DEFAULT_INBOUND_CAPTURE_PORT,
    DEFAULT_INBOUND_TUNNEL_PORT, DEFAULT_PROXY_ID, DEFAULT_PROXY_PORT, DEFAULT_TPROXY_MARK,
    DEFAULT_TPROXY_ROUTE_TABLE, MAX_PROXY_IDS,
};

/// Where a setting's value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag, e.g. `--istio-service-cidr (-i)`.
    Flag(String),
    /// An environment variable, e.g. `ISTIO_SERVICE_CIDR`.
    Env(String),
    /// Nobody set it: the built-in default.
    Default(String),
    /// A pod annotation, e.g. `traffic.sidecar.istio.io/includeOutboundIPRanges`
    /// on `shop/cart-1`.
    Annotation { pod: String, annotation: String },
    /// A field of the policy in a registration request on the daemon's
    /// socket, e.g. `proxy_port`.
    Request(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(s) => write!(f, "{s}"),
            Source::Env(s) => write!(f, "environment variable {s}"),
            Source::Default(s) => write!(f, "the default of {s}"),
            Source::Annotation { pod, annotation } => {
                write!(f, "annotation {annotation} of pod {pod}")
            }
            Source::Request(field) => write!(f, "policy.{field} of the registration request"),
        }
    }
}

/// A setting that could not be turned into a policy. Each names the value and
/// its [`Source`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid CIDR {value:?} in {origin}: {reason}")]
    InvalidCidr {
        value: String,
        origin: Source,
        reason: String,
    },
    #[error("'*' is not allowed in {origin}: exclude ranges must be CIDRs")]
    WildcardExclude { origin: Source },
    #[error("'*' must stand alone in {origin}, got {value:?}")]
    WildcardInList { value: String, origin: Source },
    #[error("invalid port {value:?} in {origin}: ports are whole numbers from 1 to 65535")]
    InvalidPort { value: String, origin: Source },
    #[error(
        "invalid ID {value:?} in {origin}: UIDs and GIDs are whole numbers from 0 to 4294967295"
    )]
    InvalidId { value: String, origin: Source },
    #[error("empty element in {origin}: {value:?} (a list is comma-separated with nothing between two commas or at either end)")]
    EmptyElement { value: String, origin: Source },
    #[error("{value:?} in {origin} contains white space: write the list without spaces")]
    WhiteSpace { value: String, origin: Source },
    #[error("{count} IDs in {origin}, at most {max} are supported")]
    TooManyIds {
        count: usize,
        max: usize,
        origin: Source,
    },
    #[error("{origin} is not what the command line would give: {reason}")]
    NotCanonical { origin: Source, reason: String },
    #[error(
        "invalid interception mode {value:?} in {origin}: istio-iptables knows REDIRECT and TPROXY"
    )]
    InvalidMode { value: String, origin: Source },
    #[error("invalid interface name {value:?} in {origin}: 1 to 15 characters, no '/', ':' or white space ('+' only at the end, as iptables' wildcard)")]
    InvalidInterface { value: String, origin: Source },
    #[error("cannot read the nameservers {origin} captures from {path}: {reason}")]
    ResolvConf {
        path: String,
        reason: String,
        origin: Source,
    },
    #[error("invalid {what} {value:?} in {origin}: {reason}")]
    InvalidNumber {
        what: &'static str,
        value: String,
        reason: &'static str,
        origin: Source,
    },
    #[error("invalid DNS capture in {origin}: {reason}")]
    Dns { reason: String, origin: Source },
    #[error("invalid boolean in {origin}: {reason}")]
    InvalidBool { reason: String, origin: Source },
    #[error("invalid group {value:?} in {origin}: a GID or a group name (letters, digits, '_', '.', '-'; at most 32 bytes)")]
    InvalidGroup { value: String, origin: Source },
    #[error("{count} groups in {origin}: the groups whose outbound traffic is captured cannot exceed {max}")]
    TooManyGroups {
        count: usize,
        max: usize,
        origin: Source,
    },
}

impl PolicyError {
    /// The setting the bad value came from.
    pub fn origin(&self) -> &Source {
        match self {
            PolicyError::InvalidCidr { origin, .. }
            | PolicyError::WildcardExclude { origin }
            | PolicyError::WildcardInList { origin, .. }
            | PolicyError::InvalidPort { origin, .. }
            | PolicyError::InvalidId { origin, .. }
            | PolicyError::EmptyElement { origin, .. }
            | PolicyError::WhiteSpace { origin, .. }
            | PolicyError::TooManyIds { origin, .. }
            | PolicyError::NotCanonical { origin, .. }
            | PolicyError::InvalidMode { origin, .. }
            | PolicyError::InvalidInterface { origin, .. }
            | PolicyError::ResolvConf { origin, .. }
            | PolicyError::InvalidNumber { origin, .. }
            | PolicyError::InvalidBool { origin, .. }
            | PolicyError::Dns { origin, .. }
            | PolicyError::InvalidGroup { origin, .. }
            | PolicyError::TooManyGroups { origin, .. } => origin,
        }
    }
}

/// The policy flags shared by every subcommand that configures interception.
///
/// Defaults are istio-iptables' except `-i`, which is `*` (capture
/// everything), the value Istio's injector always passes; `divert init`
/// restores istio-iptables' own default, `""`.
#[derive(Args, Clone, Debug)]
pub struct PolicyArgs {
    /// Outbound proxy port that connects are redirected to.
    #[arg(
        short = 'p',
        long = "envoy-port",
        env = "ENVOY_PORT",
        default_value_t = DEFAULT_PROXY_PORT.to_string(),
        value_name = "PORT"
    )]
    pub proxy_port: String,

    /// Inbound capture port: where a proxy-owned connect to the pod's own address goes.
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        default_value_t = DEFAULT_INBOUND_CAPTURE_PORT.to_string(),
        value_name = "PORT"
    )]
    pub inbound_capture_port: String,

    /// Inbound tunnel port (HBONE), never sent to the inbound capture port.
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        default_value_t = DEFAULT_INBOUND_TUNNEL_PORT.to_string(),
        value_name = "PORT"
    )]
    pub inbound_tunnel_port: String,

    /// Comma-separated UIDs whose connections are never redirected (the
    /// proxy's). Empty (the default): the UID of the user ENVOY_USER names
    /// (default istio-proxy) when it exists, else 1337, as istio-iptables.
    #[arg(
        short = 'u',
        long = "proxy-uid",
        env = "PROXY_UID",
        default_value = "",
        value_name = "UIDS"
    )]
    pub proxy_uids: String,

    /// Comma-separated GIDs whose connections are never redirected. Empty
    /// (the default): the same IDs as --proxy-uid, as istio-iptables.
    #[arg(
        short = 'g',
        long = "proxy-gid",
        env = "PROXY_GID",
        default_value = "",
        value_name = "GIDS"
    )]
    pub proxy_gids: String,

    /// Include ranges: '*', '' (none), or comma-separated IPv4/IPv6 CIDRs to redirect.
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        visible_alias = "include-outbound-ip-ranges",
        env = "ISTIO_SERVICE_CIDR",
        default_value = "*",
        value_name = "CIDRS",
        allow_hyphen_values = true
    )]
    pub include_ranges: String,

    /// Exclude ranges: comma-separated CIDRs never redirected; beats every include.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        visible_alias = "exclude-outbound-ip-ranges",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = "",
        value_name = "CIDRS"
    )]
    pub exclude_ranges: String,

    /// Include outbound ports: redirected whatever the address (but not past -x).
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        visible_alias = "include-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub include_ports: String,

    /// Exclude outbound ports: never redirected, checked before anything else.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        visible_alias = "exclude-outbound-ports",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = "",
        value_name = "PORTS"
    )]
    pub exclude_ports: String,

    /// Groups whose outbound traffic is captured: `*` (all) or a list of
    /// group names and GIDs, at most 64 (istio-iptables reads it from
    /// ISTIO_OUTBOUND_OWNER_GROUPS only). A connect by a process in none of
    /// them passes the proxy by. Names are resolved in this container's
    /// /etc/group.
    #[arg(
        long = "outbound-owner-groups",
        env = "ISTIO_OUTBOUND_OWNER_GROUPS",
        default_value = "*",
        value_name = "GROUPS"
    )]
    pub owner_groups: String,

    /// With `--outbound-owner-groups '*'`: groups whose outbound traffic is
    /// not captured (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE).
    #[arg(
        long = "outbound-owner-groups-exclude",
        env = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        default_value = "",
        value_name = "GROUPS"
    )]
    pub owner_groups_exclude: String,

    /// Inbound ports sent to the inbound capture port: '*', '' (none), or a
    /// comma-separated list.
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        visible_alias = "include-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub inbound_ports: String,

    /// Inbound ports never captured; applies only with -b '*'.
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        visible_alias = "exclude-inbound-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = "",
        value_name = "PORTS"
    )]
    pub inbound_exclude_ports: String,

    /// Capture DNS: TCP and UDP to port 53 of the nameservers in
    /// --resolv-conf go to istio-agent's port 15053, except the proxy's
    /// own. Also from ISTIO_META_DNS_CAPTURE.
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS", value_parser = go_bool, value_name = "BOOL")]
    pub redirect_dns: bool,

    /// With --redirect-dns: capture port 53 of every destination, not
    /// only of the nameservers (what istio-cni uses).
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS", value_parser = go_bool, value_name = "BOOL")]
    pub capture_all_dns: bool,

    /// The resolv.conf whose `nameserver` lines --redirect-dns captures
    /// (istio-iptables reads /etc/resolv.conf).
    #[arg(
        long = "resolv-conf",
        default_value = "/etc/resolv.conf",
        value_name = "PATH"
    )]
    pub resolv_conf: std::path::PathBuf,
}

impl PolicyArgs {
    /// Validate into a [`Policy`] (with no local addresses: the caller adds
    /// the namespace's). `matches` are the matches these args were parsed
    /// from, used to say whether a bad value came from a flag or the
    /// environment; without them every value is attributed to its flag.
    ///
    /// `--redirect-dns` not given, istio-iptables' other variable for it,
    /// `ISTIO_META_DNS_CAPTURE`, is read.
    pub fn to_policy(&self, matches: Option<&ArgMatches>) -> Result<Policy, PolicyError> {
        let given = matches
            .and_then(|m| m.value_source("redirect_dns"))
            .is_some_and(|s| s != ValueSource::DefaultValue);
        let (redirect_dns, dns_origin) = or_env(
            self.redirect_dns,
            given,
            origin_of("redirect_dns", matches),
            "ISTIO_META_DNS_CAPTURE",
        )?;
        let args = PolicyArgs {
            redirect_dns,
            ..self.clone()
        };
        args.to_policy_from(&|id: &str| {
            if id == "redirect_dns" {
                dns_origin.clone()
            } else {
                origin_of(id, matches)
            }
        })
    }

    /// Validate into a [`Policy`], attributing each setting (by its field
    /// name, e.g. `include_ranges`) to the [`Source`] `origin` gives.
    ///
    /// As istio-iptables (`tools/common/config` `FillConfigFromEnvironment`):
    /// an empty `-u` is the UID of the user `ENVOY_USER` names (default
    /// `istio-proxy`) when that user exists here, else 1337; an empty `-g`
    /// is the `-u` IDs.
    pub fn to_policy_from(&self, origin: &dyn Fn(&str) -> Source) -> Result<Policy, PolicyError> {
        // A non-empty list has at least one ID (`split` refuses empty
        // elements), so a policy always has a proxy UID.
        let proxy_uids = if self.proxy_uids.is_empty() {
            vec![default_proxy_uid()]
        } else {
            parse_ids(&self.proxy_uids, origin("proxy_uids"))?
        };
        let proxy_gids = if self.proxy_gids.is_empty() {
            proxy_uids.clone()
        } else {
            parse_ids(&self.proxy_gids, origin("proxy_gids"))?
        };
        Ok(Policy {
            proxy_port: parse_port(&self.proxy_port, origin("proxy_port"))?,
            inbound_capture_port: parse_port(
                &self.inbound_capture_port,
                origin("inbound_capture_port"),
            )?,
            inbound_tunnel_port: parse_port(
                &self.inbound_tunnel_port,
                origin("inbound_tunnel_port"),
            )?,
            proxy_uids,
            proxy_gids,
            include_ranges: parse_include(&self.include_ranges, origin("include_ranges"))?,
            exclude_ranges: parse_exclude(&self.exclude_ranges, origin("exclude_ranges"))?,
            include_ports: parse_ports(&self.include_ports, origin("include_ports"))?,
            exclude_ports: parse_ports(&self.exclude_ports, origin("exclude_ports"))?,
            owner_groups: parse_owner_groups(
                &self.owner_groups,
                &self.owner_groups_exclude,
                origin("owner_groups"),
                origin("owner_groups_exclude"),
            )?,
            inbound_ports: match self.inbound_ports.as_str() {
                "" => InboundPorts::None,
                "*" => InboundPorts::All,
                list => InboundPorts::List(parse_ports(list, origin("inbound_ports"))?),
            },
            inbound_exclude_ports: parse_ports(
                &self.inbound_exclude_ports,
                origin("inbound_exclude_ports"),
            )?,
            dns: dns_capture(
                self.redirect_dns,
                self.capture_all_dns,
                &self.resolv_conf,
                origin("redirect_dns"),
            )?,
            ..Policy::default()
        })
    }
}

/// DNS capture as istio-iptables decides it (run.go `Run` and
/// `SetupDNSRedir`): off without `redirect_dns`; with `capture_all`, port
/// 53 of every address; else the nameservers of `resolv_conf`, and off
/// (with a warning, as istio-iptables) when it names none. `origin` is the
/// setting that turned it on, for errors.
fn dns_capture(
    redirect_dns: bool,
    capture_all: bool,
    resolv_conf: &std::path::Path,
    origin: Source,
) -> Result<Option<DnsCapture>, PolicyError> {
    if !redirect_dns {
        if capture_all {
            tracing::warn!(
                "--capture-all-dns is set but DNS capture (--redirect-dns, ISTIO_META_DNS_CAPTURE) is not: no DNS is captured"
            );
        }
        return Ok(None);
    }
    if capture_all {
        return Ok(Some(DnsCapture {
            capture_all: true,
            servers_v4: Vec::new(),
            servers_v6: Vec::new(),
        }));
    }
    let (servers_v4, servers_v6) = nameservers(resolv_conf, origin)?;
    if servers_v4.is_empty() && servers_v6.is_empty() {
        // istio-iptables: "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is
        // false, and no DNS servers provided. DNS capture disabled."
        tracing::warn!(
            resolv_conf = %resolv_conf.display(),
            "DNS capture is set, but --capture-all-dns is not and resolv.conf names no nameserver: no DNS is captured (as istio-iptables)"
        );
        return Ok(None);
    }
    Ok(Some(DnsCapture {
        capture_all: false,
        servers_v4,
        servers_v6,
    }))
}

/// istio-iptables' flags that shape capture beyond the policy: the
/// interception mode, interfaces, DNS, and the iptables-only settings. Used by `divert init`, whose iptables
/// backend applies them; spellings and environment variables as
/// istio-iptables'.
#[derive(Args, Clone, Debug, Default)]
#[command(mut_args(go_bool_flag))]
pub struct CaptureArgs {
    /// Inbound interception mode: REDIRECT or TPROXY (TPROXY: iptables
    /// backend only).
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = "REDIRECT",
        value_name = "MODE"
    )]
    pub interception_mode: String,

    /// Interfaces (comma-separated) whose inbound traffic is treated as outbound (KubeVirt VMs).
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = "",
        value_name = "IFACES"
    )]
    pub kube_virt_interfaces: String,

    /// Interfaces (comma-separated) never intercepted, in either direction.
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        visible_alias = "exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = "",
        value_name = "IFACES"
    )]
    pub exclude_interfaces: String,

    /// The IPv4 range the rules treat as the host's loopback (istio-iptables
    /// reads it from ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR only): a loopback
    /// CIDR with a mask from 8 to 32. iptables backend only.
    #[arg(
        long = "outbound-ipv4-loopback-cidr",
        env = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        default_value = DEFAULT_HOST_LOOPBACK_V4,
        value_name = "CIDR"
    )]
    pub host_loopback_v4: String,

    /// TPROXY mode's packet and connection mark, decimal (used with -m
    /// TPROXY only).
    #[arg(
        short = 't',
        long = "inbound-tproxy-mark",
        env = "INBOUND_TPROXY_MARK",
        default_value_t = DEFAULT_TPROXY_MARK.to_string(),
        value_name = "MARK"
    )]
    pub inbound_tproxy_mark: String,

    /// TPROXY mode's route table, 1 to 4294967295 but not 253, 254 or 255
    /// (the kernel's default, main and local tables) (used with -m TPROXY
    /// only).
    #[arg(
        short = 'r',
        long = "inbound-tproxy-route-table",
        env = "INBOUND_TPROXY_ROUTE_TABLE",
        default_value_t = DEFAULT_TPROXY_ROUTE_TABLE.to_string(),
        value_name = "TABLE"
    )]
    pub inbound_tproxy_route_table: String,

    /// Drop packets conntrack finds invalid (the mangle table's ISTIO_DROP).
    /// Also from INVALID_DROP. iptables backend only.
    #[arg(long = "drop-invalid", env = "DROP_INVALID", value_parser = go_bool, value_name = "BOOL")]
    pub drop_invalid: bool,

    /// Write IPv6 rules whenever the namespace has an IPv6 address (without
    /// it, only when its first address is IPv6, as istio-iptables). Also
    /// from ISTIO_DUAL_STACK.
    #[arg(long = "dual-stack", env = "DUAL_STACK", value_parser = go_bool, value_name = "BOOL")]
    pub dual_stack: bool,
}

/// A flag of istio-iptables' boolean kind (value name `BOOL`, value parser
/// [`go_bool`]) made to take its value as Go's pflag does: `--flag` is true,
/// `--flag=false` false, absent false. Applied to every argument of a
/// command (`#[command(mut_args(go_bool_flag))]`); others are untouched.
pub fn go_bool_flag(a: clap::Arg) -> clap::Arg {
    let is_bool = a
        .get_value_names()
        .is_some_and(|n| n.len() == 1 && n[0] == "BOOL");
    if !is_bool {
        return a;
    }
    a.num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .default_value("false")
}

/// istio-iptables' `ValidateIPv4LoopbackCidr`: an IPv4 loopback CIDR with a
/// mask from 8 to 32, kept as written (`127.0.0.1/8` stays so in the rules).
fn parse_loopback_cidr(value: &str, origin: Source) -> Result<String, PolicyError> {
    let bad = |reason: &str| PolicyError::InvalidCidr {
        value: value.to_string(),
        origin: origin.clone(),
        reason: reason.to_string(),
    };
    let (addr, len) = value
        .split_once('/')
        .ok_or_else(|| bad("write ADDRESS/LENGTH"))?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| bad("not a prefix length"))?;
    if !addr.is_loopback() {
        return Err(bad("not a loopback address (127.0.0.0/8)"));
    }
    if !(8..=32).contains(&len) {
        return Err(bad("the mask must be from 8 to 32"));
    }
    Ok(value.to_string())
}

/// The most groups an include list may name (istio-iptables'
/// `maxOwnerGroupsInclude`: they become one rule of that many matches).
pub const MAX_OWNER_GROUPS_INCLUDE: usize = 64;

/// istio-iptables' owner-group filter (`ParseInterceptFilter`): `include`
/// `*` captures every group but those of `exclude`; otherwise only the
/// groups of `include` are captured (none when it is empty). Lists are
/// comma-separated with empty elements dropped, as istio's `Split`; each
/// group is a GID or a group name (letters, digits, `_`, `.`, `-`; at most
/// 32 bytes), which iptables resolves.
fn parse_owner_groups(
    include: &str,
    exclude: &str,
    include_origin: Source,
    exclude_origin: Source,
) -> Result<OwnerGroups, PolicyError> {
    let list = |s: &str, origin: &Source| -> Result<Vec<String>, PolicyError> {
        s.split(',')
            .filter(|g| !g.is_empty())
            .map(|g| {
                let ok = g.len() <= 32
                    && g.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                    && !g.starts_with('-');
                if ok {
                    Ok(g.to_string())
                } else {
                    Err(PolicyError::InvalidGroup {
                        value: g.to_string(),
                        origin: origin.clone(),
                    })
                }
            })
            .collect()
    };
    if include == "*" {
        return Ok(OwnerGroups::AllExcept(list(exclude, &exclude_origin)?));
    }
    let only = list(include, &include_origin)?;
    if only.len() > MAX_OWNER_GROUPS_INCLUDE {
        return Err(PolicyError::TooManyGroups {
            count: only.len(),
            max: MAX_OWNER_GROUPS_INCLUDE,
            origin: include_origin,
        });
    }
    Ok(OwnerGroups::Only(only))
}

/// A boolean as Go's `strconv.ParseBool` (istio-iptables' flags and
/// environment variables): `1 t T TRUE true True`, `0 f F FALSE false False`.
pub fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!(
            "{other:?} is not a boolean: 1, t, T, TRUE, true, True, 0, f, F, FALSE, false or False"
        )),
    }
}

/// A boolean that istio-iptables also reads from a second environment
/// variable (`ISTIO_META_DNS_CAPTURE` for `--redirect-dns`, …): the flag or
/// its own variable first (`given`, with its `origin`), then the other.
/// Returns the value and where it came from. Errors name the variable.
fn or_env(
    value: bool,
    given: bool,
    origin: Source,
    other: &str,
) -> Result<(bool, Source), PolicyError> {
    if given {
        return Ok((value, origin));
    }
    let from_other = Source::Env(other.to_string());
    match std::env::var(other) {
        Ok(v) => go_bool(&v)
            .map(|b| (b, from_other.clone()))
            .map_err(|reason| PolicyError::InvalidBool {
                reason,
                origin: from_other,
            }),
        Err(_) => Ok((value, origin)),
    }
}

impl CaptureArgs {
    /// The validated capture settings. `matches` as for
    /// [`PolicyArgs::to_policy`]. Errors: a bad value, named with its flag
    /// or environment variable.
    pub fn to_capture(&self, matches: Option<&ArgMatches>) -> Result<Capture, PolicyError> {
        let origin = |id: &str| origin_of(id, matches);
        let given = |id: &str| {
            matches
                .and_then(|m| m.value_source(id))
                .is_some_and(|s| s != ValueSource::DefaultValue)
        };
        let either =
            |value: bool, id: &str, other: &str| or_env(value, given(id), origin(id), other);
        let (drop_invalid, _) = either(self.drop_invalid, "drop_invalid", "INVALID_DROP")?;
        let (dual_stack, _) = either(self.dual_stack, "dual_stack", "ISTIO_DUAL_STACK")?;
        let tproxy = Tproxy {
            mark: parse_u32(
                "TPROXY mark",
                &self.inbound_tproxy_mark,
                origin("inbound_tproxy_mark"),
                &[],
            )?,
            route_table: parse_u32(
                "route table",
                &self.inbound_tproxy_route_table,
                origin("inbound_tproxy_route_table"),
                &[0, 253, 254, 255],
            )?,
        };
        let host_loopback_v4 =
            parse_loopback_cidr(&self.host_loopback_v4, origin("host_loopback_v4"))?;
        let mode = match self.interception_mode.as_str() {
            // Empty is REDIRECT, as istio-iptables.
            "" | "REDIRECT" => InterceptionMode::Redirect,
            "TPROXY" => InterceptionMode::Tproxy,
            other => {
                return Err(PolicyError::InvalidMode {
                    value: other.to_string(),
                    origin: origin("interception_mode"),
                })
            }
        };
        Ok(Capture {
            interception_mode: mode,
            kube_virt_interfaces: parse_interfaces(
                &self.kube_virt_interfaces,
                origin("kube_virt_interfaces"),
            )?,
            exclude_interfaces: parse_interfaces(
                &self.exclude_interfaces,
                origin("exclude_interfaces"),
            )?,
            dual_stack,
            drop_invalid,
            host_loopback_v4,
            tproxy,
        })
    }
}

/// A decimal 32-bit number (`what` names it in errors), not one of
/// `reserved`.
fn parse_u32(
    what: &'static str,
    value: &str,
    origin: Source,
    reserved: &[u32],
) -> Result<u32, PolicyError> {
    let bad = |reason| PolicyError::InvalidNumber {
        what,
        value: value.to_string(),
        reason,
        origin: origin.clone(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("write a decimal number"));
    }
    let n: u32 = value.parse().map_err(|_| bad("it must fit in 32 bits"))?;
    if reserved.contains(&n) {
        return Err(bad(
            "0, 253, 254 and 255 are the kernel's unspecified, default, main and local tables",
        ));
    }
    Ok(n)
}

/// The most of a resolv.conf that is read.
const RESOLV_CONF_MAX: u64 = 64 * 1024;

/// The `nameserver` addresses of a resolv.conf, IPv4 and IPv6 apart, as
/// written (what istio-iptables takes from miekg/dns'
/// `ClientConfigFromFile`): the second word of each `nameserver` line;
/// `#` and `;` start comments. A nameserver that is not an IP address
/// (a zone-scoped `fe80::1%eth0`) is an error rather than left
/// uncaptured. Errors name the file and `origin`, the setting that asked.
fn nameservers(
    path: &std::path::Path,
    origin: Source,
) -> Result<(Vec<Nameserver>, Vec<Nameserver>), PolicyError> {
    use std::io::Read as _;
    let fail = |reason: String| PolicyError::ResolvConf {
        path: path.display().to_string(),
        reason,
        origin: origin.clone(),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(RESOLV_CONF_MAX + 1).read_to_string(&mut text))
        .map_err(|e| fail(e.to_string()))?;
    if text.len() as u64 > RESOLV_CONF_MAX {
        return Err(fail(format!("longer than {RESOLV_CONF_MAX} bytes")));
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            continue;
        };
        let server = Nameserver::parse(addr).map_err(|e| fail(format!("line {}: {e}", n + 1)))?;
        if server.addr().is_ipv4() {
            v4.push(server);
        } else {
            v6.push(server);
        }
    }
    Ok((v4, v6))
}

impl PolicyArgs {
    /// The flag values that give `policy`'s outbound settings (the inverse
    /// of [`PolicyArgs::to_policy_from`] for every policy it returns): lists
    /// comma-joined, ranges as CIDRs, `*` for all.
    pub fn of(policy: &Policy) -> PolicyArgs {
        let join = |v: &mut dyn Iterator<Item = String>| v.collect::<Vec<_>>().join(",");
        PolicyArgs {
            proxy_port: policy.proxy_port.to_string(),
            inbound_capture_port: policy.inbound_capture_port.to_string(),
            inbound_tunnel_port: policy.inbound_tunnel_port.to_string(),
            proxy_uids: join(&mut policy.proxy_uids.iter().map(u32::to_string)),
            proxy_gids: join(&mut policy.proxy_gids.iter().map(u32::to_string)),
            include_ranges: match &policy.include_ranges {
                IncludeRanges::All => "*".to_string(),
                IncludeRanges::List(l) => join(&mut l.iter().map(IpNetwork::to_string)),
            },
            exclude_ranges: join(&mut policy.exclude_ranges.iter().map(IpNetwork::to_string)),
            include_ports: join(&mut policy.include_ports.iter().map(u16::to_string)),
            exclude_ports: join(&mut policy.exclude_ports.iter().map(u16::to_string)),
            owner_groups: match &policy.owner_groups {
                OwnerGroups::AllExcept(_) => "*".to_string(),
                OwnerGroups::Only(g) => g.join(","),
            },
            owner_groups_exclude: match &policy.owner_groups {
                OwnerGroups::AllExcept(g) => g.join(","),
                OwnerGroups::Only(_) => String::new(),
            },
            inbound_ports: match &policy.inbound_ports {
                InboundPorts::None => String::new(),
                InboundPorts::All => "*".to_string(),
                InboundPorts::List(l) => join(&mut l.iter().map(u16::to_string)),
            },
            inbound_exclude_ports: join(
                &mut policy.inbound_exclude_ports.iter().map(u16::to_string),
            ),
            // A policy's nameservers come from a file, not a flag: DNS
            // capture is not written back ([`Policy::validate`] checks it).
            redirect_dns: false,
            capture_all_dns: false,
            resolv_conf: "/etc/resolv.conf".into(),
        }
    }
}

const NOT_FLAG_FORM: &str = "a value is repeated, or an element is not one value";

impl Policy {
    /// Hold a policy that did not come from the flags (a request on the
    /// daemon's socket) to exactly the rules the flags are held to: it is
    /// written back as its flag values ([`PolicyArgs::of`]), those are
    /// parsed again by the command line's own parser, and the result must
    /// be this policy. So every value is checked by the one parser (ports
    /// 1–65535, 1 to 8 proxy UIDs and at most 8 GIDs, no IPv4-mapped
    /// range, …), and what the parser never returns is refused too: a
    /// repeated value, local addresses (the daemon reads a namespace's
    /// own), an owner group given by name (the daemon cannot read the pod's
    /// /etc/group: `divert init` resolves names) and more than
    /// [`MAX_OWNER_GROUPS`](divert_common::limits::MAX_OWNER_GROUPS) owner
    /// groups. `origin` names each field (`proxy_port`, …) in the error.
    pub fn validate(&self, origin: &dyn Fn(&str) -> Source) -> Result<(), PolicyError> {
        let parsed = PolicyArgs::of(self).to_policy_from(origin)?;
        // DNS capture is not a flag value: checked by its own rules below.
        let again = Policy {
            local_addrs: Vec::new(),
            dns: self.dns.clone(),
            ..parsed
        };
        if let Some(dns) = &self.dns {
            check_dns(dns, origin("dns"))?;
        }
        let differs = |field: &str, reason: &str| PolicyError::NotCanonical {
            origin: origin(field),
            reason: reason.to_string(),
        };
        if !self.local_addrs.is_empty() {
            return Err(differs(
                "local_addrs",
                "local addresses are not given, the daemon reads the namespace's own",
            ));
        }
        let groups = self.owner_groups.groups();
        if self.owner_groups.gids().is_none() {
            return Err(differs(
                "owner_groups",
                "owner groups must be GIDs: the daemon cannot resolve a pod's group names",
            ));
        }
        if groups.len() > divert_common::limits::MAX_OWNER_GROUPS {
            return Err(PolicyError::TooManyGroups {
                count: groups.len(),
                max: divert_common::limits::MAX_OWNER_GROUPS,
                origin: origin("owner_groups"),
            });
        }
        let unique: std::collections::HashSet<&String> = groups.iter().collect();
        for (field, same) in [
            ("owner_groups", unique.len() == groups.len()),
            ("proxy_uids", again.proxy_uids == self.proxy_uids),
            ("proxy_gids", again.proxy_gids == self.proxy_gids),
            (
                "include_ranges",
                again.include_ranges == self.include_ranges,
            ),
            (
                "exclude_ranges",
                again.exclude_ranges == self.exclude_ranges,
            ),
            ("include_ports", again.include_ports == self.include_ports),
            ("exclude_ports", again.exclude_ports == self.exclude_ports),
            ("inbound_ports", again.inbound_ports == self.inbound_ports),
            (
                "inbound_exclude_ports",
                again.inbound_exclude_ports == self.inbound_exclude_ports,
            ),
        ] {
            if !same {
                return Err(differs(field, NOT_FLAG_FORM));
            }
        }
        if again != *self {
            return Err(differs("policy", NOT_FLAG_FORM));
        }
        Ok(())
    }
}

/// A DNS capture that did not come from [`dns_capture`] held to what it
/// returns: with `capture_all` no nameservers, without it at least one;
/// each list its own family, no nameserver twice, at most
/// [`MAX_NAMESERVERS`](divert_common::limits::MAX_NAMESERVERS) in all.
fn check_dns(dns: &DnsCapture, origin: Source) -> Result<(), PolicyError> {
    let bad = |reason: String| {
        Err(PolicyError::Dns {
            reason,
            origin: origin.clone(),
        })
    };
    let count = dns.servers().count();
    if dns.capture_all && count != 0 {
        return bad("capture_all captures every address: it takes no nameservers".into());
    }
    if !dns.capture_all && count == 0 {
        return bad("no nameservers and no capture_all: nothing would be captured".into());
    }
    if count > divert_common::limits::MAX_NAMESERVERS {
        return bad(format!(
            "{count} nameservers, at most {} are supported",
            divert_common::limits::MAX_NAMESERVERS
        ));
    }
    if dns.servers_v4.iter().any(|s| !s.addr().is_ipv4())
        || dns.servers_v6.iter().any(|s| !s.addr().is_ipv6())
    {
        return bad("servers_v4 holds IPv4 addresses only, servers_v6 IPv6 only".into());
    }
    let unique: std::collections::HashSet<std::net::IpAddr> =
        dns.servers().map(Nameserver::addr).collect();
    if unique.len() != count {
        return bad("a nameserver is repeated".into());
    }
    Ok(())
}

/// istio-iptables' default proxy UID: the UID of the user `ENVOY_USER` names
/// (default `istio-proxy`), else [`DEFAULT_PROXY_ID`].
fn default_proxy_uid() -> u32 {
    let name = std::env::var("ENVOY_USER").unwrap_or_else(|_| "istio-proxy".to_string());
    nix::unistd::User::from_name(&name)
        .ok()
        .flatten()
        .map_or(DEFAULT_PROXY_ID, |u| u.uid.as_raw())
}

/// Where the value of setting `id` (a clap argument id of [`PolicyArgs`]
/// or [`CaptureArgs`]) came from, spelled as clap declares it: the
/// flag as `--long (-s)`, the environment variable (or, for a flag without
/// one, the flag again).
fn origin_of(id: &str, matches: Option<&ArgMatches>) -> Source {
    /// (argument id, flag spelling, environment variable) of every setting,
    /// read once from clap's own argument list.
    static SETTINGS: std::sync::LazyLock<Vec<(String, String, String)>> =
        std::sync::LazyLock::new(|| {
            let cmd = PolicyArgs::augment_args(clap::Command::new("divert"));
            CaptureArgs::augment_args(cmd)
                .get_arguments()
                .map(|a| {
                    let flag = match (a.get_long(), a.get_short()) {
                        (Some(l), Some(s)) => format!("--{l} (-{s})"),
                        (Some(l), None) => format!("--{l}"),
                        (None, Some(s)) => format!("-{s}"),
                        (None, None) => a.get_id().to_string(),
                    };
                    let env = a
                        .get_env()
                        .map_or_else(|| flag.clone(), |e| e.to_string_lossy().into_owned());
                    (a.get_id().to_string(), flag, env)
                })
                .collect()
        });
    let (_, flag, env) = SETTINGS
        .iter()
        .find(|(i, _, _)| i == id)
        .expect("every setting is a clap argument of PolicyArgs or CaptureArgs");
    match matches.and_then(|m| m.value_source(id)) {
        Some(ValueSource::EnvVariable) => Source::Env(env.clone()),
        Some(ValueSource::DefaultValue) => Source::Default(flag.clone()),
        _ => Source::Flag(flag.clone()),
    }
}

/// An interface list, in the order given, as iptables' `-i`/`-o` take names
/// (IFNAMSIZ: at most 15 bytes; a trailing `+` matches a prefix).
fn parse_interfaces(value: &str, origin: Source) -> Result<Vec<String>, PolicyError> {
    let mut out: Vec<String> = Vec::new();
    for item in split(value, &origin)? {
        let body = item.strip_suffix('+').unwrap_or(item);
        let ok = item.len() <= 15
            && !body.is_empty()
            && !body.contains(['/', ':', '+', '!'])
            && body.chars().all(|c| c.is_ascii_graphic());
        if !ok {
            return Err(PolicyError::InvalidInterface {
                value: item.to_string(),
                origin,
            });
        }
        if !out.iter().any(|i| i == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

/// Split a comma list: `""` is empty; an empty element or white space is an error.
fn split<'a>(value: &'a str, origin: &Source) -> Result<Vec<&'a str>, PolicyError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    if value.chars().any(char::is_whitespace) {
        return Err(PolicyError::WhiteSpace {
            value: value.to_string(),
            origin: origin.clone(),
        });
    }
    let items: Vec<&str> = value.split(',').collect();
    if items.iter().any(|s| s.is_empty()) {
        return Err(PolicyError::EmptyElement {
            value: value.to_string(),
            origin: origin.clone(),
        });
    }
    Ok(items)
}

fn parse_port(value: &str, origin: Source) -> Result<u16, PolicyError> {
    match u16::from_str(value) {
        Ok(p) if p > 0 && !value.starts_with('+') => Ok(p),
        _ => Err(PolicyError::InvalidPort {
            value: value.to_string(),
            origin,
        }),
    }
}

/// A port list, deduplicated, in the order given.
fn parse_ports(value: &str, origin: Source) -> Result<Vec<u16>, PolicyError> {
    let mut ports = Vec::new();
    for item in split(value, &origin)? {
        let p = parse_port(item, origin.clone())?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

fn parse_ids(value: &str, origin: Source) -> Result<Vec<u32>, PolicyError> {
    let mut ids = Vec::new();
    for item in split(value, &origin)? {
        match u32::from_str(item) {
            Ok(id) if !item.starts_with('+') => {
                if !ids.contains(&id) {
                    ids.push(id)
                }
            }
            _ => {
                return Err(PolicyError::InvalidId {
                    value: item.to_string(),
                    origin,
                })
            }
        }
    }
    if ids.len() > MAX_PROXY_IDS {
        return Err(PolicyError::TooManyIds {
            count: ids.len(),
            max: MAX_PROXY_IDS,
            origin,
        });
    }
    Ok(ids)
}

/// One CIDR. A bare address is a host route (/32, /128), as iptables' `-d`
/// reads it; host bits under the mask are allowed, as iptables allows them.
fn parse_cidr(item: &str, origin: &Source) -> Result<IpNetwork, PolicyError> {
    let err = |reason: String| PolicyError::InvalidCidr {
        value: item.to_string(),
        origin: origin.clone(),
        reason,
    };
    if item == "*" {
        return Err(PolicyError::WildcardInList {
            value: item.to_string(),
            origin: origin.clone(),
        });
    }
    let net = IpNetwork::from_str(item).map_err(|e| err(e.to_string()))?;
    if let IpNetwork::V6(v6) = net {
        if v6.ip().to_ipv4_mapped().is_some() {
            return Err(err(
                "IPv4-mapped IPv6 ranges are not accepted: write the IPv4 CIDR, it covers mapped destinations too".into(),
            ));
        }
    }
    Ok(net)
}

fn parse_cidrs(value: &str, origin: &Source) -> Result<Vec<IpNetwork>, PolicyError> {
    let mut nets: Vec<IpNetwork> = Vec::new();
    for item in split(value, origin)? {
        let net = parse_cidr(item, origin)?;
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    Ok(nets)
}

fn parse_include(value: &str, origin: Source) -> Result<IncludeRanges, PolicyError> {
    if value == "*" {
        return Ok(IncludeRanges::All);
    }
    if split(value, &origin)?.contains(&"*") {
        return Err(PolicyError::WildcardInList {
            value: value.to_string(),
            origin,
        });
    }
    Ok(IncludeRanges::List(parse_cidrs(value, &origin)?))
}

fn parse_exclude(value: &str, origin: Source) -> Result<Vec<IpNetwork>, PolicyError> {
    if split(value, &origin)?.contains(&"*") {
        return Err(PolicyError::WildcardExclude { origin });
    }
    parse_cidrs(value, &origin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        policy: PolicyArgs,
    }

    fn parse(args: &[&str]) -> Result<Policy, PolicyError> {
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("divert").chain(args.iter().copied()))
            .expect("clap accepts the arguments");
        let cli = Cli::from_arg_matches(&m).unwrap();
        cli.policy.to_policy(Some(&m))
    }

    fn locked<T>(f: impl FnOnce() -> T) -> T {
        let _g = crate::policy::TEST_ENV
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f()
    }

    #[test]
    fn defaults_are_istio_injector_defaults() {
        let p = locked(|| parse(&[])).unwrap();
        assert_eq!(p, Policy::default());
    }

    #[test]
    fn injector_command_line_parses() {
        // What Istio's sidecar injector writes for istio-init.
        let p = locked(|| {
            parse(&[
                "-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "", "-q", "", "-o", "",
            ])
        })
        .unwrap();
        assert_eq!(p.include_ranges, IncludeRanges::All);
        assert_eq!(p.proxy_uids, vec![1337]);
        assert!(p.exclude_ranges.is_empty());
    }

    #[test]
    fn long_spellings_and_aliases() {
        let p = locked(|| {
            parse(&[
                "--envoy-port=15111",
                "--istio-service-cidr=10.0.0.0/8,fd00::/8",
                "--exclude-outbound-ip-ranges=10.1.0.0/16",
                "--istio-outbound-ports=8080,9090",
                "--exclude-outbound-ports=5432",
                "--proxy-uid=1337,1338",
                "--proxy-gid=",
            ])
        })
        .unwrap();
        assert_eq!(p.proxy_port, 15111);
        assert_eq!(
            p.include_ranges,
            IncludeRanges::List(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ])
        );
        assert_eq!(
            p.exclude_ranges,
            vec!["10.1.0.0/16".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(p.include_ports, vec![8080, 9090]);
        assert_eq!(p.exclude_ports, vec![5432]);
        assert_eq!(p.proxy_uids, vec![1337, 1338]);
        // An empty -g is the -u IDs, as istio-iptables.
        assert_eq!(p.proxy_gids, vec![1337, 1338]);
    }

    #[test]
    fn empty_proxy_ids_take_istio_iptables_defaults() {
        let (given_u, empty_u, envoy_user) = locked(|| {
            let given_u = parse(&["-u", "1000"]).unwrap();
            let empty_u = parse(&["-u", "", "-g", "2000"]).unwrap();
            std::env::set_var("ENVOY_USER", "root");
            let envoy_user = parse(&[]).unwrap();
            std::env::remove_var("ENVOY_USER");
            (given_u, empty_u, envoy_user)
        });
        // -g follows -u.
        assert_eq!(
            (given_u.proxy_uids, given_u.proxy_gids),
            (vec![1000], vec![1000])
        );
        // -u empty: ENVOY_USER's UID (istio-proxy is no user here), else 1337.
        assert_eq!(
            (empty_u.proxy_uids, empty_u.proxy_gids),
            (vec![1337], vec![2000])
        );
        assert_eq!(envoy_user.proxy_uids, vec![0]);
    }

    #[test]
    fn environment_is_read_and_a_flag_beats_it() {
        let (from_env, flag_wins, bad) = locked(|| {
            std::env::set_var("ISTIO_SERVICE_CIDR", "10.9.0.0/16");
            std::env::set_var("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "70000");
            let bad = parse(&[]);
            std::env::remove_var("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE");
            let from_env = parse(&[]);
            let flag_wins = parse(&["-i", "10.8.0.0/16"]);
            std::env::remove_var("ISTIO_SERVICE_CIDR");
            (from_env, flag_wins, bad)
        });
        assert_eq!(
            from_env.unwrap().include_ranges,
            IncludeRanges::List(vec!["10.9.0.0/16".parse().unwrap()])
        );
        assert_eq!(
            flag_wins.unwrap().include_ranges,
            IncludeRanges::List(vec!["10.8.0.0/16".parse().unwrap()])
        );
        let err = bad.unwrap_err();
        assert_eq!(
            err,
            PolicyError::InvalidPort {
                value: "70000".into(),
                origin: Source::Env("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE".into())
            }
        );
        assert!(err
            .to_string()
            .contains("environment variable ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"));
    }

    #[test]
    fn bad_values_name_the_value_and_the_setting() {
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["-i", "10.0.0.0/33"],
                "\"10.0.0.0/33\"",
                "--istio-service-cidr (-i)",
            ),
            (&["-i", "10.0.0.0/8,banana"], "\"banana\"", "-i"),
            (&["-x", "*"], "'*'", "--istio-service-exclude-cidr (-x)"),
            (&["-i", "*,10.0.0.0/8"], "*,10.0.0.0/8", "-i"),
            (&["-q", "0"], "\"0\"", "--istio-outbound-ports (-q)"),
            (&["-o", "65536"], "\"65536\"", "(-o)"),
            (&["-o", "80,,81"], "80,,81", "empty element"),
            (&["-q", "80,"], "80,", "empty element"),
            (&["-x", "10.0.0.0/8, 10.1.0.0/16"], "white space", "(-x)"),
            (&["-u", "abc"], "\"abc\"", "--proxy-uid (-u)"),
            (&["-g", "1,2,3,4,5,6,7,8,9"], "9 IDs", "--proxy-gid (-g)"),
            (&["-p", "http"], "\"http\"", "--envoy-port (-p)"),
            (&["-i", "::ffff:10.0.0.0/104"], "IPv4-mapped", "-i"),
        ];
        for (args, want1, want2) in cases {
            let msg = locked(|| parse(args))
                .expect_err(&format!("{args:?} must fail"))
                .to_string();
            assert!(msg.contains(want1), "{args:?}: {msg:?} lacks {want1:?}");
            assert!(msg.contains(want2), "{args:?}: {msg:?} lacks {want2:?}");
        }
    }

    #[test]
    fn empty_include_is_nothing_and_bare_addresses_are_hosts() {
        let p = locked(|| parse(&["-i", "", "-x", "10.211.0.7"])).unwrap();
        assert_eq!(p.include_ranges, IncludeRanges::List(vec![]));
        assert_eq!(
            p.exclude_ranges,
            vec!["10.211.0.7/32".parse::<IpNetwork>().unwrap()]
        );
    }
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn every_setting_is_named_as_clap_declares_it() {
        assert_eq!(
            origin_of("proxy_port", None),
            Source::Flag("--envoy-port (-p)".into())
        );
        assert_eq!(
            origin_of("inbound_tunnel_port", None),
            Source::Flag("--inbound-tunnel-port (-e)".into())
        );
        assert_eq!(
            origin_of("capture_all_dns", None),
            Source::Flag("--capture-all-dns".into())
        );
        let m = PolicyArgs::augment_args(clap::Command::new("divert"))
            .try_get_matches_from(["divert"])
            .unwrap();
        assert_eq!(
            origin_of("include_ranges", Some(&m)),
            Source::Default("--istio-service-cidr (-i)".into())
        );
    }
}
