//! Inbound capture without NAT: the socket lookup program hands a captured
//! inbound connection to the namespace's capture listener
//! (`bpf_sk_assign`), so the proxy accepts it with the destination the
//! client dialled as its local address; the listener is recorded when it
//! starts listening (`sock_ops` `TCP_LISTEN_CB`).

use aya_ebpf::{
    bindings::{bpf_sk_lookup, bpf_sock_ops},
    helpers::bpf_get_netns_cookie,
    programs::{SkLookupContext, SockOpsContext},
    EbpfContext,
};
use divert_common::{
    chain::{judge_inbound, Accept, Dst, Lookups},
    flags, mapped_v4, CounterValue, ListenerKey, OrigDst, TupleKey, Verdict,
};

use crate::{
    chain::MapLookups,
    counters::count,
    ctx::{AF_INET, AF_INET6, IPPROTO_TCP},
    maps::{INBOUND_NETNS, INBOUND_ORIG, LISTENERS, POLICIES},
};

/// `sk_lookup` verdicts.
pub const SK_PASS: u32 = 1;
pub const SK_DROP: u32 = 0;

/// A listener starts listening: if it listens on its namespace's inbound
/// capture port and the namespace captures inbound connections, it is the
/// namespace's capture listener for its family (the last one to listen
/// wins). The socket hash drops it when it closes.
#[inline(always)]
pub fn on_listen(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(policy) = (unsafe { POLICIES.get(&netns) }) else {
        return;
    };
    if policy.flags & (flags::INBOUND_ALL | flags::INBOUND_LIST) == 0 {
        return;
    }
    // local_port: host byte order.
    if load!(ops, bpf_sock_ops, local_port) != u32::from(policy.inbound_capture_port) {
        return;
    }
    let mut key = ListenerKey {
        netns_cookie: netns,
        family: load!(ops, bpf_sock_ops, family),
        _pad: [0; 4],
    };
    let ops = unsafe { &mut *ops };
    // BPF_ANY: a listener that comes again replaces the old one.
    let _ = unsafe { (*core::ptr::addr_of!(LISTENERS)).update(&mut key, ops, 0) };
}

/// A connection comes in: judge it as istio-iptables' `ISTIO_INBOUND`
/// chain would ([`judge_inbound`]); hand a captured one to the capture
/// listener and remember what the client dialled. With no listener the
/// connection is refused (`SK_DROP`: the client gets a reset), never let
/// through to the port it asked for: inbound capture fails closed, as a
/// REDIRECT to a port nobody listens on does.
#[inline(always)]
pub fn on_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    if load!(lk, bpf_sk_lookup, protocol) != IPPROTO_TCP {
        return SK_PASS;
    }
    let family = load!(lk, bpf_sk_lookup, family);
    // Both addresses in the 16-byte form the maps use.
    let (remote, local) = if family == AF_INET {
        (
            mapped_v4(load!(lk, bpf_sk_lookup, remote_ip4).to_ne_bytes()),
            mapped_v4(load!(lk, bpf_sk_lookup, local_ip4).to_ne_bytes()),
        )
    } else if family == AF_INET6 {
        (
            load6!(lk, bpf_sk_lookup, remote_ip6),
            load6!(lk, bpf_sk_lookup, local_ip6),
        )
    } else {
        return SK_PASS;
    };
    // The namespace is the one that owns the destination address (socket
    // lookup programs cannot ask for the netns cookie).
    let Some(&netns) = (unsafe { INBOUND_NETNS.get(&local) }) else {
        return SK_PASS;
    };
    let Some(policy) = (unsafe { POLICIES.get(&netns) }) else {
        return SK_PASS;
    };
    if policy.flags & (flags::INBOUND_ALL | flags::INBOUND_LIST) == 0 {
        return SK_PASS;
    }
    // Local, as the outbound chain counts it: loopback, or one of the
    // namespace's own addresses.
    let mut lookups = MapLookups { netns };
    let from = Dst::from_mapped(remote);
    let from_local = from.is_loopback()
        || (policy.flags & flags::HAS_LOCAL_ADDRS != 0 && lookups.own_address(from));
    // local_port: host byte order; remote_port: __be16 and 16 bits of zero.
    let port = load!(lk, bpf_sk_lookup, local_port) as u16;
    let (capture, _) = judge_inbound(policy, &Accept { port, from_local }, &mut lookups);
    if !capture {
        return SK_PASS;
    }
    // An IPv4 connection may go to a dual-stack IPv6 listener (the kernel
    // refuses a v6-only one).
    if !assign(ctx, netns, family) && !(family == AF_INET && assign(ctx, netns, AF_INET6)) {
        return SK_DROP;
    }
    let tuple = TupleKey {
        netns_cookie: netns,
        addr: remote,
        port: u16::from_be(load!(lk, bpf_sk_lookup, remote_port) as u16),
        proxy_port: port,
        _pad: [0; 4],
    };
    let orig = OrigDst {
        addr: local,
        port,
        is_v4: (family == AF_INET) as u8,
        verdict: Verdict::InboundCapture as u8,
        _pad: [0; 4],
    };
    let _ = INBOUND_ORIG.insert(&tuple, &orig, 0);
    // Counted under the destination dialled, as inbound capture. (Its
    // bytes are not: no program sees the accepted socket close.)
    let one = CounterValue {
        connections: 1,
        ..CounterValue::default()
    };
    count(netns, local, port, Verdict::InboundCapture, &one);
    SK_PASS
}

/// Hand the connection to `netns`' capture listener of `family`; whether
/// there was one and the kernel took it.
#[inline(always)]
fn assign(ctx: &SkLookupContext, netns: u64, family: u32) -> bool {
    let key = ListenerKey {
        netns_cookie: netns,
        family,
        _pad: [0; 4],
    };
    let listeners = unsafe { &mut *core::ptr::addr_of_mut!(LISTENERS) };
    listeners.redirect_sk_lookup(ctx, key, 0).is_ok()
}
