//! The original destination of a diverted connection: filed under the
//! tuple the proxy will see, bound to that one connection, answered to the
//! proxy's `SO_ORIGINAL_DST` and to the application's `getpeername`.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr, bpf_sock_ops, bpf_tcp_sock, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_tcp_sock},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use divert_common::{
    chain::{is_mapped, LOOPBACK4},
    mapped_v4, BoundOrig, OrigDst, TupleKey,
};

use crate::{
    ctx::{is_proxy_addr, AF_INET, AF_INET6, IPPROTO_MPTCP, IPPROTO_TCP, IPPROTO_UDP, SOL_IP},
    maps::{DNS_ORIG, INBOUND_ORIG, ORIG_BY_COOKIE, ORIG_BY_TUPLE, POLICIES},
};

/// An active open: file the tuple of a diverted socket, and ask for state
/// callbacks on every socket of a meshed namespace so its bytes are counted
/// (and a diverted socket's tuple entry removed) when it closes.
///
/// Only a socket dialling the proxy's address (127.0.0.1, ::1,
/// ::ffff:127.0.0.1) can be diverted, so only such a socket is looked up
/// in `ORIG_BY_COOKIE`; any other costs one lookup, its namespace's policy
/// (a node's own sockets, on a node-wide attachment, are all of that
/// kind).
#[inline(always)]
pub fn on_tcp_connect(ctx: &SockOpsContext) {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let meshed = if remote_is_proxy_addr(ctx) {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        match unsafe { ORIG_BY_COOKIE.get(&cookie) } {
            Some(orig) => {
                // The source port is bound and the SYN not yet sent: file
                // the original destination under the tuple the proxy will
                // see.
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
                // Not diverted, but straight to the proxy's address: the
                // tuple may be an earlier diverted connection's (same
                // source address and port). Its entry is for that
                // connection only.
                if meshed {
                    let _ = ORIG_BY_TUPLE.remove(&tuple_of(ctx, netns));
                }
                meshed
            }
        }
    } else {
        unsafe { POLICIES.get(&netns) }.is_some()
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
pub fn tuple_of(ctx: &SockOpsContext, netns: u64) -> TupleKey {
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
pub fn remote_is_proxy_addr(ctx: &SockOpsContext) -> bool {
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
pub fn bind_to_connection(ctx: &SockOpsContext) {
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

/// Answer `SO_ORIGINAL_DST` when the socket is the proxy's end of a
/// diverted connection: its local address is the proxy address, its
/// (peer, local port) tuple has an entry, and that entry is bound to this
/// very connection (the peer's initial sequence number, `rcv_nxt -
/// bytes_received - 1`, is the one the client filed). `SOL_IP` answers an
/// IPv4 original only and `SOL_IPV6` an IPv6 one, as conntrack's
/// `getorigdst()` and `ipv6_getorigdst()` do; anything else keeps the
/// kernel's own answer (`ENOENT`, `ENOPROTOOPT`).
#[inline(always)]
pub fn answer_original_dst(ctx: &SockoptContext) {
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
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // dst_port: __be16 followed by 16 bits of zero padding; src_port: host order.
    let key = TupleKey {
        netns_cookie,
        addr: peer,
        port: u16::from_be(load!(sk, bpf_sock, dst_port) as u16),
        proxy_port: load!(sk, bpf_sock, src_port) as u16,
        _pad: [0; 4],
    };
    if !is_proxy_addr(&local) {
        // An inbound connection socket lookup handed to the capture
        // listener: its local address is what the client dialled, and the
        // entry says it was captured (another socket keeps the kernel's
        // answer).
        if let Some(orig) = unsafe { INBOUND_ORIG.get(&key) } {
            write_original_dst(so, orig);
        }
        return;
    }
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
    write_original_dst(so, &entry.orig);
}

/// Write `orig` as the answer to the `SO_ORIGINAL_DST` call `so`: a
/// `sockaddr_in` for `SOL_IP` and an IPv4 original, a `sockaddr_in6` for
/// `SOL_IPV6` and an IPv6 one; another pairing keeps the kernel's answer.
#[inline(always)]
fn write_original_dst(so: &mut aya_ebpf::bindings::bpf_sockopt, orig: &OrigDst) {
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

/// The nameserver the last captured DNS query of a UDP socket was for.
#[inline(always)]
pub fn dns_orig_of(ctx: &SockAddrContext) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { DNS_ORIG.get(&cookie) }.copied()
}

/// The original destination of the socket a `getpeername` is about: by its
/// cookie (a UDP socket's in `DNS_ORIG`), or, for an MPTCP socket, by the
/// tuple of its first subflow (a TCP socket with a cookie of its own, whose
/// connect was the one judged; the MPTCP socket carries its addresses).
#[inline(always)]
pub fn orig_of(ctx: &SockAddrContext) -> Option<OrigDst> {
    if load!(ctx.sock_addr, bpf_sock_addr, protocol) == IPPROTO_UDP {
        return dns_orig_of(ctx);
    }
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
