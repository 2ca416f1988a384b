//! divert's kernel programs.
//!
//! * `divert_connect4` / `divert_connect6` (`cgroup/connect4|6`): judge each
//!   outbound TCP connect of a meshed network namespace in the order of
//!   istio-iptables' `ISTIO_OUTPUT` chain (the same order as
//!   `divert::policy::verdict()`), rewrite the destination to the proxy,
//!   remember the original destination under the socket cookie, count.
//! * `divert_sock_ops` (`sockops`): at `TCP_CONNECT_CB` the source port is
//!   known; file the original destination under the tuple the proxy will see
//!   on its accepted socket, and ask for state callbacks for every active
//!   open of a meshed namespace. At `ACTIVE_ESTABLISHED_CB` bind the entry to
//!   this connection with the client's initial sequence number. At
//!   `TCP_CLOSE` remove the entry unless the proxy may still ask for it, and
//!   add the connection's payload bytes, both directions, to its counter
//!   (see [`account_close`]).
//! * `divert_getsockopt` (`cgroup/getsockopt`): answer `SO_ORIGINAL_DST` for
//!   the proxy's accepted socket of exactly that connection, in the family
//!   the application dialled; every other option, and every other socket,
//!   is left exactly as the kernel returned it.
//! * `divert_getpeername4|6` (`cgroup/getpeername4|6`): the application sees
//!   the address it dialled (an MPTCP socket too, whose first subflow was
//!   diverted).
//!
//! Every program allows the operation (returns 1): divert rewrites, it never
//! refuses. A namespace with no policy is untouched and uncounted.
#![no_std]
#![no_main]
// Inline asm pins loads from the context and from `bpf_sock` to one
// instruction each (see `load!`).
#![feature(asm_experimental_arch)]

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_addr, bpf_sock_ops, bpf_tcp_sock, BPF_F_NO_PREALLOC, BPF_NOEXIST,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING,
        BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
    },
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_tcp_sock},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, LruHashMap, LruPerCpuHashMap,
    },
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use divert_common::{
    flags, limits, mapped_v4, port_list, verdict, AddrKey, BoundOrig, CounterKey, CounterValue,
    LpmKey4, LpmKey6, OrigDst, PodName, PolicyHeader, PortKey, TupleKey, SO_ORIGINAL_DST,
};

/// Load the 32-bit word at `offset_of!($ty, $field) + 4 * $i` of a context or
/// `bpf_sock` pointer as one `ldxw` with a constant offset. The verifier
/// rejects any arithmetic on those pointers, and LLVM, left to itself, hoists
/// a shared base address for neighbouring fields (C has
/// `preserve_static_offset` for this; Rust does not).
macro_rules! load {
    ($ptr:expr, $ty:ty, $field:ident) => {
        load!($ptr, $ty, $field, 0)
    };
    ($ptr:expr, $ty:ty, $field:ident, $i:expr) => {{
        const OFF: usize = core::mem::offset_of!($ty, $field) + 4 * $i;
        let v: u64;
        unsafe {
            core::arch::asm!(
                "{v} = *(u32 *)({p} + {off})",
                p = in(reg) $ptr,
                v = lateout(reg) v,
                off = const OFF,
                options(readonly, nostack, preserves_flags),
            )
        };
        v as u32
    }};
}

/// Load the 64-bit field `$field` of a context pointer as one `ldxdw` (the
/// verifier only converts 8-byte loads of `bpf_sock_ops`' u64 fields).
macro_rules! load64 {
    ($ptr:expr, $ty:ty, $field:ident) => {{
        const OFF: usize = core::mem::offset_of!($ty, $field);
        let v: u64;
        unsafe {
            core::arch::asm!(
                "{v} = *(u64 *)({p} + {off})",
                p = in(reg) $ptr,
                v = lateout(reg) v,
                off = const OFF,
                options(readonly, nostack, preserves_flags),
            )
        };
        v
    }};
}

/// A 16-byte address field (`[u32; 4]`, network byte order) as bytes.
macro_rules! load6 {
    ($ptr:expr, $ty:ty, $field:ident) => {
        words_to_bytes([
            load!($ptr, $ty, $field, 0),
            load!($ptr, $ty, $field, 1),
            load!($ptr, $ty, $field, 2),
            load!($ptr, $ty, $field, 3),
        ])
    };
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_MPTCP: u32 = 262;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const PAGE_SIZE: i32 = 4096;
/// `TCPHDR_FIN` in `bpf_sock_ops.skb_tcp_flags`.
const TCP_FIN: u32 = 0x01;

/// 127.0.0.1 / ::1: where the proxy listens, and istio-iptables' "host loopback".
const LOOPBACK4: [u8; 4] = [127, 0, 0, 1];
const LOOPBACK6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Source of Envoy's inbound passthrough connects (istio-iptables' `-s 127.0.0.6/32` / `::6/128`).
const PASSTHROUGH_SRC4: [u8; 4] = [127, 0, 0, 6];
const PASSTHROUGH_SRC6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];

#[map]
static POLICIES: HashMap<u64, PolicyHeader> = HashMap::with_max_entries(limits::MAX_POLICIES, 0);
#[map]
static INCLUDE_V4: LpmTrie<LpmKey4, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
static EXCLUDE_V4: LpmTrie<LpmKey4, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
static INCLUDE_V6: LpmTrie<LpmKey6, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
static EXCLUDE_V6: LpmTrie<LpmKey6, u8> =
    LpmTrie::with_max_entries(limits::MAX_RANGES, BPF_F_NO_PREALLOC);
#[map]
static PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(limits::MAX_PORTS, 0);
#[map]
static LOCAL_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(limits::MAX_LOCAL_ADDRS, 0);
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(limits::MAX_ORIG, 0);
#[map]
static ORIG_BY_TUPLE: LruHashMap<TupleKey, BoundOrig> =
    LruHashMap::with_max_entries(limits::MAX_ORIG, 0);
#[map]
static COUNTERS: LruPerCpuHashMap<CounterKey, CounterValue> =
    LruPerCpuHashMap::with_max_entries(limits::MAX_COUNTERS, 0);
#[map]
static PODS: HashMap<u64, PodName> =
    HashMap::with_max_entries(limits::MAX_POLICIES, BPF_F_NO_PREALLOC);

/// A destination in the family it is judged in.
#[derive(Clone, Copy)]
enum Dst {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl Dst {
    /// The address the kernel really dials: `0.0.0.0` and `::` mean the
    /// local host (`ip_route_connect()` / `tcp_v6_connect()` turn them into
    /// 127.0.0.1 / ::1 before any packet exists), so they are judged, and
    /// counted, as that, as istio-iptables' rules see them.
    #[inline(always)]
    fn as_dialled(self) -> Dst {
        match self {
            Dst::V4([0, 0, 0, 0]) => Dst::V4(LOOPBACK4),
            Dst::V6(a) if a == [0; 16] => Dst::V6(LOOPBACK6),
            d => d,
        }
    }
    #[inline(always)]
    fn mapped(&self) -> [u8; 16] {
        match self {
            Dst::V4(a) => mapped_v4(*a),
            Dst::V6(a) => *a,
        }
    }
    /// 127.0.0.0/8 or ::1: always routed over `lo`.
    #[inline(always)]
    fn is_loopback(&self) -> bool {
        match self {
            Dst::V4(a) => a[0] == 127,
            Dst::V6(a) => *a == LOOPBACK6,
        }
    }
    /// istio-iptables' host loopback, `127.0.0.1/32` / `::1/128`.
    #[inline(always)]
    fn is_host_loopback(&self) -> bool {
        match self {
            Dst::V4(a) => *a == LOOPBACK4,
            Dst::V6(a) => *a == LOOPBACK6,
        }
    }
}

/// The verdict of istio-iptables' `ISTIO_OUTPUT` chain for one connect, rule
/// for rule in its order (see `divert::policy::verdict` for the reference).
#[inline(always)]
fn judge(
    p: &PolicyHeader,
    netns: u64,
    dst: Dst,
    port: u16,
    uid: u32,
    gid: u32,
    src_is_passthrough: bool,
) -> u8 {
    // -p tcp --dport <-o port> -j RETURN
    if p.flags & flags::HAS_EXCLUDE_PORTS != 0 {
        let key = PortKey {
            netns_cookie: netns,
            port,
            list: port_list::EXCLUDE,
            _pad: [0; 5],
        };
        if unsafe { PORTS.get(&key) }.is_some() {
            return verdict::PASSTHROUGH;
        }
    }
    // "-o lo": the destination is loopback or one of the namespace's own
    // addresses. Only the passthrough-source and owner rules ask, so
    // without them skip the lookup.
    let has_owner_rules = p.proxy_uid_count != 0 || p.proxy_gid_count != 0;
    let local = (src_is_passthrough || has_owner_rules)
        && (dst.is_loopback()
            || (p.flags & flags::HAS_LOCAL_ADDRS != 0 && {
                let key = AddrKey {
                    netns_cookie: netns,
                    addr: dst.mapped(),
                };
                unsafe { LOCAL_ADDRS.get(&key) }.is_some()
            }));
    // -o lo -s 127.0.0.6/32 -j RETURN: only towards a local destination, so
    // binding ::6 is no way out of the pod.
    if src_is_passthrough && local {
        return verdict::PASSTHROUGH;
    }
    let host_lo = dst.is_host_loopback();
    let lo_return = p.flags & flags::INCLUDE_HAS_LOOPBACK == 0;
    let tunnel = port == p.inbound_tunnel_port;
    // for uid in -u, then for gid in -g: IN_REDIRECT, "-o lo ! --uid-owner"
    // RETURN, "--uid-owner" RETURN
    let owner = |ids: &[u32; limits::MAX_PROXY_IDS], count: u8, id: u32| -> Option<u8> {
        for (i, &x) in ids.iter().enumerate() {
            if i >= count as usize {
                break;
            }
            let is_owner = x == id;
            if is_owner && local && !host_lo && !tunnel {
                return Some(verdict::INBOUND);
            }
            if is_owner || (local && lo_return) {
                return Some(verdict::PASSTHROUGH);
            }
        }
        None
    };
    if let Some(v) = owner(&p.proxy_uids, p.proxy_uid_count, uid) {
        return v;
    }
    if let Some(v) = owner(&p.proxy_gids, p.proxy_gid_count, gid) {
        return v;
    }
    // -d 127.0.0.1/32 -j RETURN
    if host_lo {
        return verdict::PASSTHROUGH;
    }
    // -d <-x range> -j RETURN
    if in_ranges(p, netns, dst, false) {
        return verdict::PASSTHROUGH;
    }
    // -p tcp --dport <-q port> -j ISTIO_REDIRECT
    if p.flags & flags::HAS_INCLUDE_PORTS != 0 {
        let key = PortKey {
            netns_cookie: netns,
            port,
            list: port_list::INCLUDE,
            _pad: [0; 5],
        };
        if unsafe { PORTS.get(&key) }.is_some() {
            return verdict::REDIRECT;
        }
    }
    // -j ISTIO_REDIRECT (`*`) or -d <-i range> -j ISTIO_REDIRECT
    if p.flags & flags::INCLUDE_ALL != 0 || in_ranges(p, netns, dst, true) {
        return verdict::REDIRECT;
    }
    verdict::PASSTHROUGH
}

#[inline(always)]
fn in_ranges(p: &PolicyHeader, netns: u64, dst: Dst, include: bool) -> bool {
    match dst {
        Dst::V4(addr) => {
            let (flag, trie) = if include {
                (flags::HAS_INCLUDE_V4, &INCLUDE_V4)
            } else {
                (flags::HAS_EXCLUDE_V4, &EXCLUDE_V4)
            };
            p.flags & flag != 0 && {
                let key = Key::new(
                    64 + 32,
                    LpmKey4 {
                        netns_cookie: netns,
                        addr,
                    },
                );
                trie.get(&key).is_some()
            }
        }
        Dst::V6(addr) => {
            let (flag, trie) = if include {
                (flags::HAS_INCLUDE_V6, &INCLUDE_V6)
            } else {
                (flags::HAS_EXCLUDE_V6, &EXCLUDE_V6)
            };
            p.flags & flag != 0 && {
                let key = Key::new(
                    64 + 128,
                    LpmKey6 {
                        netns_cookie: netns,
                        addr,
                    },
                );
                trie.get(&key).is_some()
            }
        }
    }
}

/// Add to the counter of (netns, destination, port, verdict) on this CPU,
/// creating it if the LRU has none.
#[inline(always)]
fn count(netns: u64, addr: [u8; 16], port: u16, v: u8, add: &CounterValue) {
    let key = CounterKey {
        netns_cookie: netns,
        addr,
        port,
        verdict: v,
        _pad: [0; 5],
    };
    for _ in 0..2 {
        if let Some(n) = COUNTERS.get_ptr_mut(&key) {
            // Per-CPU value: no other CPU writes it.
            unsafe {
                (*n).connections += add.connections;
                (*n).bytes_sent += add.bytes_sent;
                (*n).bytes_received += add.bytes_received;
            }
            return;
        }
        // Another CPU may insert the same series between our lookup and
        // insert; then the second lookup finds it.
        if COUNTERS.insert(&key, add, BPF_NOEXIST as u64).is_ok() {
            return;
        }
    }
}

/// Judge a connect in `netns` to `dst:port`, count it, and remember the
/// original destination of a diverted socket. Returns the loopback port the
/// connect must be rewritten to, or `None` to leave it alone.
#[inline(always)]
fn on_connect<C: EbpfContext>(
    ctx: &C,
    sk: *mut bpf_sock,
    dst: Dst,
    port: u16,
    is_v4: bool,
) -> Option<u16> {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let policy = unsafe { POLICIES.get(&netns) }?;
    let uid_gid = bpf_get_current_uid_gid();
    let (uid, gid) = (uid_gid as u32, (uid_gid >> 32) as u32);
    let src_is_passthrough = if sk.is_null() {
        false
    } else if is_v4 {
        let src = load!(sk, bpf_sock, src_ip4).to_ne_bytes();
        // An AF_INET6 socket bound to ::ffff:127.0.0.6 reports it in src_ip6.
        src == PASSTHROUGH_SRC4 || load6!(sk, bpf_sock, src_ip6) == mapped_v4(PASSTHROUGH_SRC4)
    } else {
        load6!(sk, bpf_sock, src_ip6) == PASSTHROUGH_SRC6
    };
    let dst = dst.as_dialled();
    let v = judge(policy, netns, dst, port, uid, gid, src_is_passthrough);
    let addr = dst.mapped();
    let one = CounterValue {
        connections: 1,
        ..CounterValue::default()
    };
    count(netns, addr, port, v, &one);
    let target_port = match v {
        verdict::REDIRECT => policy.proxy_port,
        verdict::INBOUND => policy.inbound_capture_port,
        _ => return None,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        is_v4: is_v4 as u8,
        verdict: v,
        _pad: [0; 4],
    };
    // An LRU map evicts rather than fails; a failed insert only costs the
    // proxy its SO_ORIGINAL_DST answer, never the connect.
    let _ = ORIG_BY_COOKIE.insert(&cookie, &orig, 0);
    Some(target_port)
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// `::ffff:a.b.c.d`.
#[inline(always)]
fn is_mapped(a: &[u8; 16]) -> bool {
    a[..12] == mapped_v4([0; 4])[..12]
}

/// Whether `a` (16 bytes, IPv4 mapped) is where diverted connects are
/// rewritten to: 127.0.0.1 or ::1.
#[inline(always)]
fn is_proxy_addr(a: &[u8; 16]) -> bool {
    *a == mapped_v4(LOOPBACK4) || *a == LOOPBACK6
}

#[inline(always)]
fn is_tcp(ty: u32, protocol: u32) -> bool {
    ty == SOCK_STREAM && protocol == IPPROTO_TCP
}

#[cgroup_sock_addr(connect4)]
pub fn divert_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if !is_tcp(sa.type_, sa.protocol) {
        return 1;
    }
    let dst = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if let Some(target_port) = on_connect(&ctx, sk, Dst::V4(dst), port, true) {
        sa.user_ip4 = u32::from_ne_bytes(LOOPBACK4);
        sa.user_port = target_port.to_be() as u32;
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn divert_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if !is_tcp(sa.type_, sa.protocol) {
        return 1;
    }
    let dst = load6!(ctx.sock_addr, bpf_sock_addr, user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // ::ffff:a.b.c.d is an IPv4 connect through an AF_INET6 socket: judge it
    // as IPv4, so nobody escapes the IPv4 policy by dialling the mapped form.
    let is_mapped = is_mapped(&dst);
    let judged = if is_mapped {
        on_connect(
            &ctx,
            sk,
            Dst::V4([dst[12], dst[13], dst[14], dst[15]]),
            port,
            true,
        )
    } else {
        on_connect(&ctx, sk, Dst::V6(dst), port, false)
    };
    if let Some(target_port) = judged {
        let target = if is_mapped {
            mapped_v4(LOOPBACK4)
        } else {
            LOOPBACK6
        };
        sa.user_ip6 = bytes_to_words(target);
        sa.user_port = target_port.to_be() as u32;
    }
    1
}

#[sock_ops]
pub fn divert_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match load!(ops, bpf_sock_ops, op) {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => bind_to_connection(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            // args[0]: old state, args[1]: new state (tcp_set_state()).
            let old = load!(ops, bpf_sock_ops, __bindgen_anon_1, 0);
            let new = load!(ops, bpf_sock_ops, __bindgen_anon_1, 1);
            if new == BPF_TCP_FIN_WAIT1 {
                // Our FIN is out: watch incoming segments for the peer's.
                let cb = load!(ops, bpf_sock_ops, bpf_sock_ops_cb_flags);
                let _ = ctx.set_cb_flags((cb | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32);
            } else if new == BPF_TCP_CLOSE {
                account_close(&ctx, old);
            }
        }
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => {
            // An in-window segment after our FIN. The peer's FIN: clearing
            // the flag both stops the parsing and records that it came.
            if load!(ops, bpf_sock_ops, skb_tcp_flags) & TCP_FIN != 0 {
                let cb = load!(ops, bpf_sock_ops, bpf_sock_ops_cb_flags);
                let _ = ctx.set_cb_flags((cb & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32);
            }
        }
        _ => {}
    }
    1
}

/// An active open: file the tuple of a diverted socket, and ask for state
/// callbacks on every socket of a meshed namespace so its bytes are counted
/// (and a diverted socket's tuple entry removed) when it closes.
#[inline(always)]
fn on_tcp_connect(ctx: &SockOpsContext) {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let meshed = match unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        Some(orig) => {
            // The source port is bound and the SYN not yet sent: file the
            // original destination under the tuple the proxy will see.
            let entry = BoundOrig {
                orig: *orig,
                client_isn: 0,
                established: 0,
                _pad: [0; 3],
            };
            let _ = ORIG_BY_TUPLE.insert(&tuple_of(ctx, netns), &entry, 0);
            true
        }
        None => {
            let meshed = unsafe { POLICIES.get(&netns) }.is_some();
            // Not diverted, but straight to the proxy's address: the tuple
            // may be an earlier diverted connection's (same source address
            // and port). Its entry is for that connection only.
            if meshed && remote_is_proxy_addr(ctx) {
                let _ = ORIG_BY_TUPLE.remove(&tuple_of(ctx, netns));
            }
            meshed
        }
    };
    if meshed {
        let cb = load!(ctx.ops, bpf_sock_ops, bpf_sock_ops_cb_flags);
        let _ = ctx.set_cb_flags((cb | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// The `ORIG_BY_TUPLE` key of a sock_ops socket's connection, from the
/// socket's own end: (netns, local address, local port, remote port). An
/// AF_INET6 socket dialling `::ffff:a.b.c.d` runs as IPv4: its source is in
/// `local_ip4` (`sk_rcv_saddr`; `local_ip6` is mapped only once
/// `tcp_v6_connect()` returns), which the proxy sees as an IPv4 peer.
#[inline(always)]
fn tuple_of(ctx: &SockOpsContext, netns: u64) -> TupleKey {
    let ops = ctx.ops;
    let v4 = load!(ops, bpf_sock_ops, family) == AF_INET
        || is_mapped(&load6!(ops, bpf_sock_ops, remote_ip6));
    let addr = if v4 {
        mapped_v4(load!(ops, bpf_sock_ops, local_ip4).to_ne_bytes())
    } else {
        load6!(ops, bpf_sock_ops, local_ip6)
    };
    // remote_port: the __be16 port in the upper half (little endian).
    let remote_port = u16::from_be((load!(ops, bpf_sock_ops, remote_port) >> 16) as u16);
    TupleKey {
        netns_cookie: netns,
        addr,
        port: ctx.local_port() as u16,
        proxy_port: remote_port,
        _pad: [0; 4],
    }
}

/// Whether a sock_ops socket's peer is 127.0.0.1 / ::1 / ::ffff:127.0.0.1,
/// the only addresses a diverted connect goes to.
#[inline(always)]
fn remote_is_proxy_addr(ctx: &SockOpsContext) -> bool {
    let ops = ctx.ops;
    if load!(ops, bpf_sock_ops, family) == AF_INET {
        load!(ops, bpf_sock_ops, remote_ip4).to_ne_bytes() == LOOPBACK4
    } else {
        is_proxy_addr(&load6!(ops, bpf_sock_ops, remote_ip6))
    }
}

/// `ACTIVE_ESTABLISHED_CB`: the SYN-ACK is in and our ACK not yet sent, so
/// the proxy has not accepted yet. Bind a diverted connection's pending
/// tuple entry to it with the client's initial sequence number
/// (`snd_una - bytes_acked`: `bytes_acked` counts the SYN and any SYN
/// data). Only a connection to the proxy's address can have one.
#[inline(always)]
fn bind_to_connection(ctx: &SockOpsContext) {
    if !remote_is_proxy_addr(ctx) {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(e) = ORIG_BY_TUPLE.get_ptr_mut(&tuple_of(ctx, netns)) else {
        return;
    };
    let ops = ctx.ops;
    let isn = load!(ops, bpf_sock_ops, snd_una)
        .wrapping_sub(load64!(ops, bpf_sock_ops, bytes_acked) as u32);
    // A pending entry's tuple is held by the SYN_SENT socket that filed
    // it, which is this one.
    unsafe {
        if (*e).established == 0 {
            (*e).client_isn = isn;
            (*e).established = 1;
        }
    }
}

/// At `TCP_CLOSE`, add the connection's payload bytes to the counter its
/// connect was counted under: the original destination and verdict of a
/// diverted socket (whose `ORIG_BY_COOKIE` entry goes now), else the
/// socket's peer with verdict passthrough. A namespace unregistered since
/// is not counted.
///
/// A diverted socket's `ORIG_BY_TUPLE` entry goes too, unless we closed
/// first and the proxy has not (leaving `FIN_WAIT2` without its FIN): then
/// the proxy's socket lives on and may not even be accepted yet, so its
/// `SO_ORIGINAL_DST` must still be answered, as conntrack would. That entry
/// stays bound to this connection by its initial sequence number until the
/// tuple is dialled again or the LRU reclaims it.
///
/// The socket's `bytes_acked` counts the SYN and, once acknowledged, our
/// FIN; `bytes_received` counts the peer's FIN. Which of them happened is
/// read from the state the socket leaves (`old`):
///
/// * SYN: acknowledged whenever anything was (`bytes_acked > 0`).
/// * our FIN acknowledged: leaving `FIN_WAIT2`, or `CLOSING`/`LAST_ACK`
///   with nothing unacknowledged (`snd_una == snd_nxt`).
/// * the peer's FIN received: leaving `CLOSE_WAIT`, `CLOSING` or
///   `LAST_ACK`; leaving `FIN_WAIT2`, when a segment with FIN was seen
///   after ours went out (the `PARSE_ALL_HDR_OPT` flag set on entering
///   `FIN_WAIT1` is cleared by it). A socket closed in `FIN_WAIT2` before the
///   peer's FIN (an orphan handed to a timewait socket) has not counted it.
#[inline(always)]
fn account_close(ctx: &SockOpsContext, old: u32) {
    let ops = ctx.ops;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied();
    let peer_fin = old == BPF_TCP_CLOSE_WAIT
        || old == BPF_TCP_CLOSING
        || old == BPF_TCP_LAST_ACK
        || (old == BPF_TCP_FIN_WAIT2
            && load!(ops, bpf_sock_ops, bpf_sock_ops_cb_flags)
                & BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
                == 0);
    if orig.is_some() {
        let _ = ORIG_BY_COOKIE.remove(&cookie);
        if old != BPF_TCP_FIN_WAIT2 || peer_fin {
            let _ = ORIG_BY_TUPLE.remove(&tuple_of(ctx, netns));
        }
    }
    // Unregistered since the connect: no longer counted.
    if unsafe { POLICIES.get(&netns) }.is_none() {
        return;
    }
    let (addr, port, v) = match orig {
        Some(orig) => (orig.addr, orig.port, orig.verdict),
        None => {
            let addr = if load!(ops, bpf_sock_ops, family) == AF_INET {
                mapped_v4(load!(ops, bpf_sock_ops, remote_ip4).to_ne_bytes())
            } else {
                load6!(ops, bpf_sock_ops, remote_ip6)
            };
            // remote_port: the __be16 port in the upper half (little endian).
            let port = u16::from_be((load!(ops, bpf_sock_ops, remote_port) >> 16) as u16);
            (addr, port, verdict::PASSTHROUGH)
        }
    };
    let acked = load64!(ops, bpf_sock_ops, bytes_acked);
    let received = load64!(ops, bpf_sock_ops, bytes_received);
    if acked == 0 && received == 0 {
        return;
    }
    let all_acked = load!(ops, bpf_sock_ops, snd_una) == load!(ops, bpf_sock_ops, snd_nxt);
    let our_fin_acked = old == BPF_TCP_FIN_WAIT2
        || ((old == BPF_TCP_CLOSING || old == BPF_TCP_LAST_ACK) && all_acked);
    let syn = (acked > 0) as u64;
    let add = CounterValue {
        connections: 0,
        bytes_sent: acked.saturating_sub(syn + our_fin_acked as u64),
        bytes_received: received.saturating_sub(peer_fin as u64),
    };
    count(netns, addr, port, v, &add);
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

#[cgroup_sockopt(getsockopt)]
pub fn divert_getsockopt(ctx: SockoptContext) -> i32 {
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        // Not ours. Past PAGE_SIZE the program only sees a truncated buffer:
        // optlen 0 tells the kernel to hand back its own result untouched
        // (Documentation/bpf/prog_cgroup_sockopt.rst).
        if so.optlen > PAGE_SIZE {
            so.optlen = 0;
        }
        return 1;
    }
    answer_original_dst(&ctx);
    1
}

/// Answer `SO_ORIGINAL_DST` when the socket is the proxy's end of a
/// diverted connection: its local address is the proxy address, its
/// (peer, local port) tuple has an entry, and that entry is bound to this
/// very connection (the peer's initial sequence number, `rcv_nxt -
/// bytes_received - 1`, is the one the client filed). `SOL_IP` answers an
/// IPv4 original only and `SOL_IPV6` an IPv6 one, as conntrack's
/// `getorigdst()` and `ipv6_getorigdst()` do; anything else keeps the
/// kernel's own answer (`ENOENT`, `ENOPROTOOPT`).
#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext) {
    let so = unsafe { &mut *ctx.sockopt };
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (family, protocol) = (load!(sk, bpf_sock, family), load!(sk, bpf_sock, protocol));
    if protocol != IPPROTO_TCP {
        return;
    }
    let (peer, local) = match family {
        AF_INET => (
            mapped_v4(load!(sk, bpf_sock, dst_ip4).to_ne_bytes()),
            mapped_v4(load!(sk, bpf_sock, src_ip4).to_ne_bytes()),
        ),
        AF_INET6 => (load6!(sk, bpf_sock, dst_ip6), load6!(sk, bpf_sock, src_ip6)),
        _ => return,
    };
    if !is_proxy_addr(&local) {
        return;
    }
    // dst_port: __be16 followed by 16 bits of zero padding; src_port: host order.
    let key = TupleKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: peer,
        port: u16::from_be(load!(sk, bpf_sock, dst_port) as u16),
        proxy_port: load!(sk, bpf_sock, src_port) as u16,
        _pad: [0; 4],
    };
    let Some(entry) = (unsafe { ORIG_BY_TUPLE.get(&key) }) else {
        return;
    };
    if entry.established != 0 {
        let tp = unsafe { bpf_tcp_sock(sk) };
        if tp.is_null() {
            return;
        }
        let irs = load!(tp, bpf_tcp_sock, rcv_nxt)
            .wrapping_sub(load64!(tp, bpf_tcp_sock, bytes_received) as u32)
            .wrapping_sub(1);
        if irs != entry.client_isn {
            return;
        }
    }
    let orig = &entry.orig;
    if (so.level == SOL_IP) != (orig.is_v4 != 0) {
        return;
    }
    let optval = unsafe { so.__bindgen_anon_2.optval } as usize;
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as usize;
    if so.level == SOL_IP {
        let len = core::mem::size_of::<SockaddrIn>();
        if optval + len > optval_end {
            return;
        }
        let out = optval as *mut SockaddrIn;
        unsafe {
            (*out).family = AF_INET as u16;
            (*out).port_be = orig.port.to_be();
            (*out).addr = [orig.addr[12], orig.addr[13], orig.addr[14], orig.addr[15]];
            (*out).zero = [0; 8];
        }
        so.optlen = len as i32;
    } else {
        let len = core::mem::size_of::<SockaddrIn6>();
        if optval + len > optval_end {
            return;
        }
        let out = optval as *mut SockaddrIn6;
        unsafe {
            (*out).family = AF_INET6 as u16;
            (*out).port_be = orig.port.to_be();
            (*out).flowinfo = 0;
            (*out).addr = orig.addr;
            (*out).scope_id = 0;
        }
        so.optlen = len as i32;
    }
    so.retval = 0;
}

/// The original destination of the socket a `getpeername` is about: by its
/// cookie, or, for an MPTCP socket, by the tuple of its first subflow (a
/// TCP socket with a cookie of its own, whose connect was the one judged;
/// the MPTCP socket carries its addresses).
#[inline(always)]
fn orig_of(ctx: &SockAddrContext) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        return Some(*orig);
    }
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() || load!(sk, bpf_sock, protocol) != IPPROTO_MPTCP {
        return None;
    }
    let addr = if load!(sk, bpf_sock, family) == AF_INET {
        mapped_v4(load!(sk, bpf_sock, src_ip4).to_ne_bytes())
    } else {
        load6!(sk, bpf_sock, src_ip6)
    };
    let key = TupleKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        port: load!(sk, bpf_sock, src_port) as u16,
        proxy_port: u16::from_be(load!(sk, bpf_sock, dst_port) as u16),
        _pad: [0; 4],
    };
    unsafe { ORIG_BY_TUPLE.get(&key) }.map(|e| e.orig)
}

#[cgroup_sock_addr(getpeername4)]
pub fn divert_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let sa = unsafe { &mut *ctx.sock_addr };
        if orig.is_v4 != 0 {
            sa.user_ip4 =
                u32::from_ne_bytes([orig.addr[12], orig.addr[13], orig.addr[14], orig.addr[15]]);
            sa.user_port = orig.port.to_be() as u32;
        }
    }
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn divert_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = orig_of(&ctx) {
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6 = bytes_to_words(orig.addr);
        sa.user_port = orig.port.to_be() as u32;
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
