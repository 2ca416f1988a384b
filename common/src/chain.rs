//! istio-iptables' `ISTIO_OUTPUT` chain, once: [`judge`] decides one
//! outbound TCP connect, rule for rule in the order istio-iptables writes
//! the chain (istio `tools/istio-iptables/pkg/capture/run.go`, `Run`).
//!
//! The kernel programs call it with lookups over their maps
//! (`divert-ebpf`'s `chain` module); the agent's `policy::verdict()` calls
//! it with lookups over a [`Policy`'s](../../divert/policy/struct.Policy.html)
//! plain lists, and `divert explain` prints the deciding rule as the
//! iptables backend writes it. So the decision the kernel makes is the one
//! the unit tests, `explain` and the iptables backend's equivalence tests
//! check, without a second copy to drift.
//!
//! The function is `#[inline(always)]` and its loops are bounded by
//! [`limits::MAX_PROXY_IDS`], so the BPF verifier sees straight-line code.

use crate::{flags, limits, mapped_v4, PolicyHeader, DNS_PORT};

/// 127.0.0.1: where the proxy listens, and istio-iptables' host loopback
/// (`-d 127.0.0.1/32 -j RETURN`).
pub const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
/// ::1, the IPv6 host loopback (`-d ::1/128 -j RETURN`).
pub const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// 127.0.0.6: the source Envoy binds for inbound passthrough connects
/// (istio-iptables' `-o lo -s 127.0.0.6/32 -j RETURN`).
pub const PASSTHROUGH_SRC4: [u8; 4] = [127, 0, 0, 6];
/// ::6, the IPv6 inbound passthrough source (`-o lo -s ::6/128 -j RETURN`).
pub const PASSTHROUGH_SRC6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

/// A destination address in the family it is judged in, network byte order.
/// An IPv4-mapped IPv6 destination (`::ffff:a.b.c.d`) is judged as `V4`, as
/// the kernel connects it over IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dst {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Dst {
    /// The 16-byte form every map key uses: IPv4 as `::ffff:a.b.c.d`.
    #[inline(always)]
    pub fn mapped(&self) -> [u8; 16] {
        match self {
            Dst::V4(a) => mapped_v4(*a),
            Dst::V6(a) => *a,
        }
    }

    /// From the 16-byte form: `::ffff:a.b.c.d` becomes `V4`.
    #[inline(always)]
    pub fn from_mapped(a: [u8; 16]) -> Dst {
        if is_mapped(&a) {
            Dst::V4([a[12], a[13], a[14], a[15]])
        } else {
            Dst::V6(a)
        }
    }

    /// The address the kernel really dials: `0.0.0.0` and `::` mean the
    /// local host (`ip_route_connect()` / `tcp_v6_connect()` turn them into
    /// 127.0.0.1 / ::1 before any packet exists), so they are judged, and
    /// counted, as that, as istio-iptables' rules see them.
    #[inline(always)]
    pub fn as_dialled(self) -> Dst {
        match self {
            Dst::V4([0, 0, 0, 0]) => Dst::V4(LOOPBACK4),
            Dst::V6(a) if a == [0; 16] => Dst::V6(LOOPBACK6),
            d => d,
        }
    }

    /// 127.0.0.0/8 or ::1: always routed over `lo`.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        match self {
            Dst::V4(a) => a[0] == 127,
            Dst::V6(a) => *a == LOOPBACK6,
        }
    }

    /// istio-iptables' host loopback, `127.0.0.1/32` / `::1/128`.
    #[inline(always)]
    pub fn is_host_loopback(&self) -> bool {
        match self {
            Dst::V4(a) => *a == LOOPBACK4,
            Dst::V6(a) => *a == LOOPBACK6,
        }
    }
}

/// Whether a 16-byte address is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub fn is_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

/// The transport of a judged connect or datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A TCP `connect()` (or TCP Fast Open's first `sendmsg`).
    Tcp,
    /// A UDP `connect()`, or a `sendmsg()` with a destination address.
    Udp,
}

/// One outbound connect as the kernel sees it at `connect()` (for UDP, or
/// at `sendmsg()` with a destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// TCP or UDP: most of `ISTIO_OUTPUT` matches `-p tcp` only.
    pub transport: Transport,
    /// Destination as dialled, after [`Dst::as_dialled`].
    pub dst: Dst,
    /// Destination port, host byte order.
    pub port: u16,
    /// Real UID of the connecting process.
    pub uid: u32,
    /// Real GID of the connecting process.
    pub gid: u32,
    /// The socket is bound to 127.0.0.6 / ::6 (Envoy's inbound passthrough).
    pub src_is_passthrough: bool,
}

/// What happens to a connect, as stored in [`OrigDst::verdict`] and
/// [`CounterKey::verdict`] (`as u8`).
///
/// [`OrigDst::verdict`]: crate::OrigDst::verdict
/// [`CounterKey::verdict`]: crate::CounterKey::verdict
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Left alone (`RETURN`): the connection goes where the application asked.
    PassThrough = 0,
    /// Rewritten to the outbound proxy port (`ISTIO_REDIRECT`).
    Redirect = 1,
    /// Rewritten to the inbound capture port (`ISTIO_IN_REDIRECT`).
    InboundCapture = 2,
    /// DNS sent to the DNS proxy (`ISTIO_OUTPUT_DNS`, port
    /// [`DNS_PROXY_PORT`](crate::DNS_PROXY_PORT)).
    Dns = 3,
}

impl Verdict {
    /// Every verdict, in code order.
    pub const ALL: [Verdict; 4] = [
        Verdict::PassThrough,
        Verdict::Redirect,
        Verdict::InboundCapture,
        Verdict::Dns,
    ];

    /// The verdict stored as `code`; an unknown code reads as pass-through
    /// (nothing was rewritten).
    #[inline(always)]
    pub const fn from_code(code: u8) -> Verdict {
        match code {
            1 => Verdict::Redirect,
            2 => Verdict::InboundCapture,
            3 => Verdict::Dns,
            _ => Verdict::PassThrough,
        }
    }

    /// The name counters, `/metrics`, `stats` and `explain` show:
    /// `passthrough`, `redirected`, `inbound_capture`, `dns`.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::PassThrough => "passthrough",
            Verdict::Redirect => "redirected",
            Verdict::InboundCapture => "inbound_capture",
            Verdict::Dns => "dns",
        }
    }
}

/// Which of a rule's owner matches: `-m owner --uid-owner` (`-u`) or
/// `--gid-owner` (`-g`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Uid,
    Gid,
}

/// The `ISTIO_OUTPUT` rule that decided, in chain order. Ranges and ports
/// are the ones the [`Lookups`] found; which of several matching ranges
/// decided is the lookup's to say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// `-p tcp --dport P -j RETURN` (`-o`).
    ExcludeOutboundPort,
    /// `-o lo -s 127.0.0.6/32 -j RETURN`.
    InboundPassthroughSource,
    /// `-o lo ! -d 127.0.0.1/32 -p tcp ! --dport <tunnel> -m owner
    /// --uid-owner ID -j ISTIO_IN_REDIRECT` (or `--gid-owner`).
    ProxyToLocal(Owner, u32),
    /// `-o lo -m owner ! --uid-owner ID -j RETURN` (or `--gid-owner`).
    LocalNotProxy(Owner, u32),
    /// `-m owner --uid-owner ID -j RETURN` (or `--gid-owner`).
    Proxy(Owner, u32),
    /// `-m owner --gid-owner G -j RETURN`: the connecting GID is in the
    /// owner-group exclude list.
    OwnerGroupExcluded,
    /// `-m owner ! --gid-owner G1 … -j RETURN`: the connecting GID is not in
    /// the owner-group include list.
    OwnerGroupNotIncluded,
    /// `ISTIO_OUTPUT_DNS`: `-p tcp|udp --dport 53 [-d <nameserver>] -j
    /// REDIRECT --to-ports 15053`.
    DnsCapture,
    /// UDP past DNS capture: the rest of the chain redirects TCP only
    /// (`ISTIO_REDIRECT` is `-p tcp`), so the datagram leaves unchanged.
    NotTcp,
    /// `-d 127.0.0.1/32 -j RETURN`.
    HostLoopback,
    /// `-d CIDR -j RETURN` (`-x`).
    ExcludeRange,
    /// `-p tcp --dport P -j ISTIO_REDIRECT` (`-q`).
    IncludeOutboundPort,
    /// `-j ISTIO_REDIRECT` (`-i '*'`).
    IncludeAll,
    /// `-d CIDR -j ISTIO_REDIRECT` (`-i`).
    IncludeRange,
    /// The end of the chain: `RETURN`.
    End,
}

/// The lists of one namespace's policy the chain looks up. The kernel
/// implements it over its maps (keyed by netns cookie), the agent over a
/// policy's lists. [`judge`] only asks when the header's [`flags`] say the
/// list is non-empty for the destination's family.
pub trait Lookups {
    /// `port` is an exclude outbound port (`-o`).
    fn exclude_port(&mut self, port: u16) -> bool;
    /// `port` is an include outbound port (`-q`).
    fn include_port(&mut self, port: u16) -> bool;
    /// `dst` is one of the namespace's own addresses (besides loopback,
    /// what iptables' `-o lo` matches).
    fn own_address(&mut self, dst: Dst) -> bool;
    /// `dst` is in an exclude range (`-x`) of its family.
    fn exclude_range(&mut self, dst: Dst) -> bool;
    /// `dst` is in an include range (`-i`) of its family.
    fn include_range(&mut self, dst: Dst) -> bool;
    /// `gid` is in the owner-group list (include or exclude, as the
    /// header's flags say).
    fn owner_group(&mut self, gid: u32) -> bool;
    /// `dst` is one of the nameservers DNS capture captures.
    fn nameserver(&mut self, dst: Dst) -> bool;
    /// `port` is an inbound port of the `-b` list.
    fn inbound_include_port(&mut self, port: u16) -> bool;
    /// `port` is an inbound port excluded from `-b '*'` (`-d`).
    fn inbound_exclude_port(&mut self, port: u16) -> bool;
}

/// One inbound TCP connection (its SYN) to the namespace, as socket lookup
/// sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accept {
    /// Destination port, host byte order.
    pub port: u16,
    /// The source is local (loopback, or one of the namespace's own
    /// addresses): the namespace dialling itself.
    pub from_local: bool,
}

/// The rule of istio-iptables' inbound capture (`PREROUTING -p tcp -j
/// ISTIO_INBOUND`) that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundHit {
    /// No `-b`: nothing inbound is captured.
    NoInboundCapture,
    /// From a local address: the namespace's own connections pass
    /// `OUTPUT`, where their NAT is decided, never the inbound rules.
    FromLocal,
    /// `-A ISTIO_INBOUND -p tcp --dport <tunnel> -j RETURN`.
    TunnelPort,
    /// `-A ISTIO_INBOUND -p tcp --dport P -j RETURN` (`-d`, with `*`).
    ExcludedPort,
    /// `-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT` (`-b '*'`).
    AllPorts,
    /// `-A ISTIO_INBOUND -p tcp --dport P -j ISTIO_IN_REDIRECT` (`-b` list).
    ListedPort,
    /// The end of `ISTIO_INBOUND` (`-b` list, another port).
    End,
}

/// Whether an inbound connection goes to the inbound capture port, and
/// which rule said so, in the order of istio-iptables' `ISTIO_INBOUND`
/// chain (run.go `handleInboundPortsInclude`): the tunnel port returns;
/// with `-b '*'` the `-d` ports return and every other port is captured;
/// with a `-b` list only its ports are. A connection from a local address
/// is never captured.
#[inline(always)]
pub fn judge_inbound<L: Lookups>(p: &PolicyHeader, a: &Accept, l: &mut L) -> (bool, InboundHit) {
    let all = p.flags & flags::INBOUND_ALL != 0;
    if !all && p.flags & flags::INBOUND_LIST == 0 {
        return (false, InboundHit::NoInboundCapture);
    }
    if a.from_local {
        return (false, InboundHit::FromLocal);
    }
    if a.port == p.inbound_tunnel_port {
        return (false, InboundHit::TunnelPort);
    }
    if all {
        if l.inbound_exclude_port(a.port) {
            return (false, InboundHit::ExcludedPort);
        }
        return (true, InboundHit::AllPorts);
    }
    if l.inbound_include_port(a.port) {
        return (true, InboundHit::ListedPort);
    }
    (false, InboundHit::End)
}

/// The verdict of istio-iptables' `ISTIO_OUTPUT` chain for `c` under the
/// policy `p` (whose lists `l` looks up), first match wins:
///
/// 1. port in `-o` → pass through;
/// 2. bound to 127.0.0.6 / ::6 and the destination is local → pass through;
/// 3. for each proxy UID U in order: owner U, local destination other than
///    127.0.0.1/::1, port not the tunnel port → inbound capture; local
///    destination and owner not U (rule absent when an include range is
///    written with a loopback address) → pass through; owner U → pass through;
/// 4. the same for each proxy GID;
/// 5. the owner-group filter: GID in the exclude list, or not in the
///    include list → pass through;
/// 6. DNS capture (`ISTIO_OUTPUT_DNS`): port 53 of a nameserver (of any
///    address with capture-all) → the DNS proxy;
/// 7. UDP → pass through: the rules below redirect TCP only;
/// 8. 127.0.0.1 / ::1 → pass through;
/// 9. in an exclude range → pass through;
/// 10. port in `-q` → redirect;
/// 11. include `*`, or in an include range → redirect;
/// 12. pass through.
///
/// As in istio-iptables, the owner rules' inbound capture and "local, not
/// the proxy" rules are `-p tcp`; with DNS capture on, both leave port 53
/// alone (the inbound capture only for UIDs: istio writes `! --dports
/// 53,15008` with `--uid-owner` and `! --dport 15008` with `--gid-owner`),
/// so the application's TCP DNS to a local nameserver reaches step 6.
/// Without DNS capture a UDP datagram is never judged (nothing captures
/// it), and the kernel programs do not ask.
///
/// "Local" is what iptables' `-o lo` matches: 127.0.0.0/8, ::1 and the
/// namespace's own addresses; only rules 2–4 ask, so without a passthrough
/// source or owner rules it is never looked up.
#[inline(always)]
pub fn judge<L: Lookups>(p: &PolicyHeader, c: &Connect, l: &mut L) -> (Verdict, Hit) {
    use Verdict::{PassThrough, Redirect};
    let (dst, port) = (c.dst, c.port);
    // -p tcp --dport <-o port> -j RETURN
    if p.flags & flags::HAS_EXCLUDE_PORTS != 0 && l.exclude_port(port) {
        return (PassThrough, Hit::ExcludeOutboundPort);
    }
    let has_owner_rules = p.proxy_uid_count != 0 || p.proxy_gid_count != 0;
    let local = (c.src_is_passthrough || has_owner_rules)
        && (dst.is_loopback() || (p.flags & flags::HAS_LOCAL_ADDRS != 0 && l.own_address(dst)));
    // -o lo -s 127.0.0.6/32 -j RETURN: only towards a local destination, so
    // binding ::6 is no way out of the pod.
    if c.src_is_passthrough && local {
        return (PassThrough, Hit::InboundPassthroughSource);
    }
    let host_lo = dst.is_host_loopback();
    let lo_return = p.flags & flags::INCLUDE_HAS_LOOPBACK == 0;
    let tunnel = port == p.inbound_tunnel_port;
    let tcp = c.transport == Transport::Tcp;
    let dns_on = p.flags & flags::DNS_CAPTURE != 0;
    let dns_port = port == DNS_PORT;
    // "-p tcp ! --dport 53" on the "local, not the proxy" rule with DNS
    // capture; no protocol match without it.
    let local_return = if dns_on { tcp && !dns_port } else { true };
    // "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport <tunnel>": the inbound
    // capture rule; for UIDs with DNS capture "! --dports 53,<tunnel>".
    let capture = local && !host_lo && tcp && !tunnel;
    let uid = OwnerMatch {
        kind: Owner::Uid,
        capture: capture && !(dns_on && dns_port),
        local_return: local && lo_return && local_return,
    };
    if let Some(d) = owner_rules(&uid, &p.proxy_uids, p.proxy_uid_count, c.uid) {
        return d;
    }
    let gid = OwnerMatch {
        kind: Owner::Gid,
        capture,
        ..uid
    };
    if let Some(d) = owner_rules(&gid, &p.proxy_gids, p.proxy_gid_count, c.gid) {
        return d;
    }
    // -m owner --gid-owner <excluded group> -j RETURN
    if p.flags & flags::OWNER_GROUPS_EXCEPT != 0 && l.owner_group(c.gid) {
        return (PassThrough, Hit::OwnerGroupExcluded);
    }
    // -m owner ! --gid-owner <group> … -j RETURN
    if p.flags & flags::OWNER_GROUPS_ONLY != 0 && !l.owner_group(c.gid) {
        return (PassThrough, Hit::OwnerGroupNotIncluded);
    }
    // -j ISTIO_OUTPUT_DNS: -p tcp|udp --dport 53 [-d <nameserver>] -j REDIRECT
    if dns_on && dns_port && (p.flags & flags::DNS_CAPTURE_ALL != 0 || l.nameserver(dst)) {
        return (Verdict::Dns, Hit::DnsCapture);
    }
    if !tcp {
        return (PassThrough, Hit::NotTcp);
    }
    // -d 127.0.0.1/32 -j RETURN
    if host_lo {
        return (PassThrough, Hit::HostLoopback);
    }
    let (has_exclude, has_include) = match dst {
        Dst::V4(_) => (flags::HAS_EXCLUDE_V4, flags::HAS_INCLUDE_V4),
        Dst::V6(_) => (flags::HAS_EXCLUDE_V6, flags::HAS_INCLUDE_V6),
    };
    // -d <-x range> -j RETURN
    if p.flags & has_exclude != 0 && l.exclude_range(dst) {
        return (PassThrough, Hit::ExcludeRange);
    }
    // -p tcp --dport <-q port> -j ISTIO_REDIRECT
    if p.flags & flags::HAS_INCLUDE_PORTS != 0 && l.include_port(port) {
        return (Redirect, Hit::IncludeOutboundPort);
    }
    // -j ISTIO_REDIRECT (`*`)
    if p.flags & flags::INCLUDE_ALL != 0 {
        return (Redirect, Hit::IncludeAll);
    }
    // -d <-i range> -j ISTIO_REDIRECT
    if p.flags & has_include != 0 && l.include_range(dst) {
        return (Redirect, Hit::IncludeRange);
    }
    (PassThrough, Hit::End)
}

/// What the owner rules of one kind (`--uid-owner` or `--gid-owner`)
/// match for one connect, besides the owner.
#[derive(Clone, Copy)]
struct OwnerMatch {
    kind: Owner,
    /// The inbound capture rule's other matches hold.
    capture: bool,
    /// The "local, not the proxy" RETURN rule is written and its other
    /// matches hold.
    local_return: bool,
}

/// For each ID in turn, istio-iptables writes three rules: the inbound
/// capture, "-o lo ! --uid-owner ID" RETURN, "--uid-owner ID" RETURN.
/// (A function, not a closure: BPF calls take at most five arguments, and
/// this must be inlined.)
#[inline(always)]
fn owner_rules(
    m: &OwnerMatch,
    ids: &[u32; limits::MAX_PROXY_IDS],
    count: u8,
    id: u32,
) -> Option<(Verdict, Hit)> {
    for (i, &x) in ids.iter().enumerate() {
        if i >= count as usize {
            break;
        }
        let is_owner = x == id;
        if is_owner && m.capture {
            return Some((Verdict::InboundCapture, Hit::ProxyToLocal(m.kind, x)));
        }
        if !is_owner && m.local_return {
            return Some((Verdict::PassThrough, Hit::LocalNotProxy(m.kind, x)));
        }
        if is_owner {
            return Some((Verdict::PassThrough, Hit::Proxy(m.kind, x)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lookups that find nothing, counting how often they were asked.
    #[derive(Default)]
    struct Empty {
        asked: u32,
    }
    impl Lookups for Empty {
        fn exclude_port(&mut self, _: u16) -> bool {
            self.asked += 1;
            false
        }
        fn include_port(&mut self, _: u16) -> bool {
            self.asked += 1;
            false
        }
        fn own_address(&mut self, _: Dst) -> bool {
            self.asked += 1;
            false
        }
        fn exclude_range(&mut self, _: Dst) -> bool {
            self.asked += 1;
            false
        }
        fn include_range(&mut self, _: Dst) -> bool {
            self.asked += 1;
            false
        }
        fn owner_group(&mut self, _: u32) -> bool {
            self.asked += 1;
            false
        }
        fn nameserver(&mut self, _: Dst) -> bool {
            self.asked += 1;
            false
        }
        fn inbound_include_port(&mut self, _: u16) -> bool {
            self.asked += 1;
            false
        }
        fn inbound_exclude_port(&mut self, _: u16) -> bool {
            self.asked += 1;
            false
        }
    }

    fn connect(dst: Dst, uid: u32) -> Connect {
        Connect {
            transport: Transport::Tcp,
            dst,
            port: 80,
            uid,
            gid: 1000,
            src_is_passthrough: false,
        }
    }

    #[test]
    fn lists_the_header_says_are_empty_are_never_looked_up() {
        let p = PolicyHeader::default();
        let mut l = Empty::default();
        let d = judge(&p, &connect(Dst::V4([10, 0, 0, 1]), 1000), &mut l);
        assert_eq!(d, (Verdict::PassThrough, Hit::End));
        assert_eq!(l.asked, 0);
    }

    #[test]
    fn the_owner_rules_stop_at_the_count() {
        let mut p = PolicyHeader {
            flags: flags::INCLUDE_ALL,
            proxy_uid_count: 1,
            ..PolicyHeader::default()
        };
        p.proxy_uids[0] = 1337;
        // A UID past the count is not a proxy UID.
        p.proxy_uids[1] = 2000;
        let mut l = Empty::default();
        let dst = Dst::V4([10, 0, 0, 1]);
        assert_eq!(
            judge(&p, &connect(dst, 1337), &mut l),
            (Verdict::PassThrough, Hit::Proxy(Owner::Uid, 1337))
        );
        assert_eq!(
            judge(&p, &connect(dst, 2000), &mut l),
            (Verdict::Redirect, Hit::IncludeAll)
        );
    }

    #[test]
    fn unspecified_is_dialled_as_the_host_loopback() {
        assert_eq!(Dst::V4([0; 4]).as_dialled(), Dst::V4(LOOPBACK4));
        assert_eq!(Dst::V6([0; 16]).as_dialled(), Dst::V6(LOOPBACK6));
        assert_eq!(
            Dst::from_mapped(mapped_v4([10, 1, 2, 3])),
            Dst::V4([10, 1, 2, 3])
        );
    }

    #[test]
    fn verdict_codes_round_trip() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_code(v as u8), v);
        }
    }
}
