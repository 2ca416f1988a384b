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
//!   diverted; a UDP socket whose DNS was captured).
//! * DNS capture: `divert_connect4|6` judge UDP connects to port 53 too,
//!   `divert_sendmsg4|6` (`cgroup/sendmsg4|6`) UDP datagrams sent to port
//!   53 with a destination; a captured one goes to the DNS proxy (15053)
//!   and its nameserver is remembered per socket (`DNS_ORIG`), so
//!   `divert_recvmsg4|6` (`cgroup/recvmsg4|6`) show the proxy's replies as
//!   from that nameserver.
//! * `divert_listen` (`sockops`, a proxy cgroup apart from the workload's;
//!   `divert_sock_ops` does the same where it runs): a socket listening on
//!   its namespace's inbound capture port becomes the capture listener.
//! * `divert_sk_lookup` (`sk_lookup`, per network namespace): an inbound
//!   connection the policy captures is handed to the capture listener,
//!   keeping its destination (no NAT); with no listener it is refused.
//!
//! Every cgroup program allows the operation (returns 1): divert rewrites,
//! it never refuses; only inbound capture refuses, when it cannot capture. A namespace with no policy is untouched and uncounted.
#![no_std]
#![no_main]
// Inline asm pins loads from the context and from `bpf_sock` to one
// instruction each (see `load!`).
#![feature(asm_experimental_arch)]

#[macro_use]
mod ctx;
mod chain;
mod counters;
mod inbound;
mod maps;
mod orig;

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use divert_common::{
    chain::{is_mapped, Dst, Transport, LOOPBACK4, LOOPBACK6},
    mapped_v4, DNS_PORT, DNS_PROXY_PORT, SO_ORIGINAL_DST,
};

use crate::{
    chain::on_connect,
    counters::account_close,
    ctx::{bytes_to_words, transport, PAGE_SIZE, SOL_IP, SOL_IPV6, TCP_FIN},
    orig::{answer_original_dst, bind_to_connection, dns_orig_of, on_tcp_connect, orig_of},
};

#[cgroup_sock_addr(connect4)]
pub fn divert_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if let Some(t) = transport(sa.type_, sa.protocol) {
        divert4(&ctx, t);
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn divert_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if let Some(t) = transport(sa.type_, sa.protocol) {
        divert6(&ctx, t);
    }
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn divert_sendmsg4(ctx: SockAddrContext) -> i32 {
    // udp_sendmsg() runs this for a datagram sent with a destination (an
    // AF_INET6 socket's to ::ffff:a.b.c.d too); UDP-Lite shares it.
    let sa = unsafe { &*ctx.sock_addr };
    if transport(sa.type_, sa.protocol) == Some(Transport::Udp) {
        divert4(&ctx, Transport::Udp);
    }
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn divert_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if transport(sa.type_, sa.protocol) == Some(Transport::Udp) {
        divert6(&ctx, Transport::Udp);
    }
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn divert_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    // A datagram from the DNS proxy: show it as from the nameserver asked.
    if u16::from_be(sa.user_port as u16) == DNS_PROXY_PORT && sa.user_ip4.to_ne_bytes() == LOOPBACK4
    {
        if let Some(orig) = dns_orig_of(&ctx) {
            if orig.is_v4 != 0 {
                sa.user_ip4 = u32::from_ne_bytes([
                    orig.addr[12],
                    orig.addr[13],
                    orig.addr[14],
                    orig.addr[15],
                ]);
                sa.user_port = orig.port.to_be() as u32;
            }
        }
    }
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn divert_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if u16::from_be(sa.user_port as u16) != DNS_PROXY_PORT {
        return 1;
    }
    // An IPv4 reply on an AF_INET6 socket comes here as ::ffff:127.0.0.1.
    let src = load6!(ctx.sock_addr, bpf_sock_addr, user_ip6);
    if src == LOOPBACK6 || src == mapped_v4(LOOPBACK4) {
        if let Some(orig) = dns_orig_of(&ctx) {
            sa.user_ip6 = bytes_to_words(orig.addr);
            sa.user_port = orig.port.to_be() as u32;
        }
    }
    1
}

/// Judge an IPv4 destination (`connect4`, `sendmsg4`) and rewrite it to
/// the proxy when the policy says so. UDP is judged for DNS only.
#[inline(always)]
fn divert4(ctx: &SockAddrContext, t: Transport) {
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if t == Transport::Udp && port != DNS_PORT {
        return;
    }
    let dst = sa.user_ip4.to_ne_bytes();
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if let Some(target_port) = on_connect(ctx, sk, Dst::V4(dst), port, t) {
        sa.user_ip4 = u32::from_ne_bytes(LOOPBACK4);
        sa.user_port = target_port.to_be() as u32;
    }
}

/// Judge an IPv6 destination (`connect6`, `sendmsg6`) and rewrite it to
/// the proxy when the policy says so. UDP is judged for DNS only.
#[inline(always)]
fn divert6(ctx: &SockAddrContext, t: Transport) {
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if t == Transport::Udp && port != DNS_PORT {
        return;
    }
    let dst = load6!(ctx.sock_addr, bpf_sock_addr, user_ip6);
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // ::ffff:a.b.c.d is an IPv4 connect through an AF_INET6 socket: judge it
    // as IPv4, so nobody escapes the IPv4 policy by dialling the mapped form.
    let is_mapped = is_mapped(&dst);
    let judged = if is_mapped {
        on_connect(ctx, sk, Dst::from_mapped(dst), port, t)
    } else {
        on_connect(ctx, sk, Dst::V6(dst), port, t)
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
}

#[sock_ops]
pub fn divert_sock_ops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match load!(ops, bpf_sock_ops, op) {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => inbound::on_listen(&ctx),
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
        // An in-window segment after our FIN. The peer's FIN: clearing the
        // flag both stops the parsing and records that it came.
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB if load!(ops, bpf_sock_ops, skb_tcp_flags) & TCP_FIN != 0 => {
            let cb = load!(ops, bpf_sock_ops, bpf_sock_ops_cb_flags);
            let _ = ctx.set_cb_flags((cb & !BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG) as i32);
        }
        _ => {}
    }
    1
}

#[sock_ops]
pub fn divert_listen(ctx: SockOpsContext) -> u32 {
    if load!(ctx.ops, bpf_sock_ops, op) == BPF_SOCK_OPS_TCP_LISTEN_CB {
        inbound::on_listen(&ctx);
    }
    1
}

#[sk_lookup]
pub fn divert_sk_lookup(ctx: SkLookupContext) -> u32 {
    inbound::on_sk_lookup(&ctx)
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
