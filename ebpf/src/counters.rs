//! Per-destination counters: a connect when it is judged, its payload
//! bytes when it closes.

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, BPF_NOEXIST, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE_WAIT,
        BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
    EbpfContext,
};
use divert_common::{mapped_v4, CounterValue, Verdict};

use crate::{
    ctx::{counter_key, AF_INET},
    maps::{COUNTERS, ORIG_BY_COOKIE, ORIG_BY_TUPLE, POLICIES},
    orig::{remote_is_proxy_addr, tuple_of},
};

/// Add to the counter of (netns, destination, port, verdict), creating it
/// if the LRU has none. One value for every CPU: each field is added to
/// atomically (a BPF atomic add; two per connection at most, so CPUs
/// rarely meet on one series).
#[inline(always)]
pub fn count(netns: u64, addr: [u8; 16], port: u16, v: Verdict, add: &CounterValue) {
    let key = counter_key(netns, addr, port, v as u8);
    for _ in 0..2 {
        if let Some(n) = COUNTERS.get_ptr_mut(&key) {
            // SAFETY: a map value, 8-byte aligned, live for this program's
            // run; other CPUs write it only through atomics too.
            unsafe {
                add_atomic(&raw mut (*n).connections, add.connections);
                add_atomic(&raw mut (*n).bytes_sent, add.bytes_sent);
                add_atomic(&raw mut (*n).bytes_received, add.bytes_received);
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

/// `*field += n` as one atomic instruction (skipped for 0).
///
/// # Safety
/// `field` points into a live map value, 8-byte aligned.
#[inline(always)]
unsafe fn add_atomic(field: *mut u64, n: u64) {
    // `AtomicU64::fetch_add` is not offered for BPF (the target has no
    // compare-and-swap in core's terms): the kernel's atomic add
    // (`BPF_ATOMIC | BPF_ADD`, no fetch), written out.
    if n != 0 {
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {n}",
                p = in(reg) field,
                n = in(reg) n,
                options(nostack),
            )
        };
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
pub fn account_close(ctx: &SockOpsContext, old: u32) {
    let ops = ctx.ops;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Only a socket dialling the proxy's address can have been diverted.
    let orig = if remote_is_proxy_addr(ctx) {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        unsafe { ORIG_BY_COOKIE.get(&cookie) }.copied()
    } else {
        None
    };
    let peer_fin = old == BPF_TCP_CLOSE_WAIT
        || old == BPF_TCP_CLOSING
        || old == BPF_TCP_LAST_ACK
        || (old == BPF_TCP_FIN_WAIT2
            && load!(ops, bpf_sock_ops, bpf_sock_ops_cb_flags)
                & BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
                == 0);
    if orig.is_some() {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
        Some(orig) => (orig.addr, orig.port, Verdict::from_code(orig.verdict)),
        None => {
            let addr = if load!(ops, bpf_sock_ops, family) == AF_INET {
                mapped_v4(load!(ops, bpf_sock_ops, remote_ip4).to_ne_bytes())
            } else {
                load6!(ops, bpf_sock_ops, remote_ip6)
            };
            // remote_port: the __be16 port in the upper half (little endian).
            let port = u16::from_be((load!(ops, bpf_sock_ops, remote_port) >> 16) as u16);
            (addr, port, Verdict::PassThrough)
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
