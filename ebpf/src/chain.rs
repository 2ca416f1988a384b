//! The connect hook's glue to the one `ISTIO_OUTPUT` chain
//! (`divert_common::chain::judge`): its lookups over this object's maps,
//! and what happens to a judged connect.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    maps::lpm_trie::Key,
    EbpfContext,
};
use divert_common::{
    chain::{self, Connect, Dst, Lookups, Transport, PASSTHROUGH_SRC4, PASSTHROUGH_SRC6},
    mapped_v4, port_list, AddrKey, CounterValue, GroupKey, LpmKey4, LpmKey6, OrigDst, Verdict,
    COOKIE_PREFIX_BITS, DNS_PROXY_PORT,
};

use crate::{
    counters::count,
    ctx::port_key,
    maps::{
        DNS_ORIG, EXCLUDE_V4, EXCLUDE_V6, INCLUDE_V4, INCLUDE_V6, LOCAL_ADDRS, NAMESERVERS,
        ORIG_BY_COOKIE, OWNER_GROUPS, POLICIES, PORTS,
    },
};

/// The chain's lookups in one namespace's entries of the shared maps.
pub struct MapLookups {
    pub netns: u64,
}

impl MapLookups {
    #[inline(always)]
    fn port(&self, port: u16, list: u8) -> bool {
        unsafe { PORTS.get(&port_key(self.netns, port, list)) }.is_some()
    }

    #[inline(always)]
    fn range(&self, dst: Dst, include: bool) -> bool {
        match dst {
            Dst::V4(addr) => {
                let trie = if include { &INCLUDE_V4 } else { &EXCLUDE_V4 };
                let data = LpmKey4 {
                    netns_cookie: self.netns,
                    addr,
                };
                trie.get(&Key::new(COOKIE_PREFIX_BITS + 32, data)).is_some()
            }
            Dst::V6(addr) => {
                let trie = if include { &INCLUDE_V6 } else { &EXCLUDE_V6 };
                let data = LpmKey6 {
                    netns_cookie: self.netns,
                    addr,
                };
                trie.get(&Key::new(COOKIE_PREFIX_BITS + 128, data))
                    .is_some()
            }
        }
    }
}

impl Lookups for MapLookups {
    #[inline(always)]
    fn exclude_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::EXCLUDE)
    }
    #[inline(always)]
    fn include_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::INCLUDE)
    }
    #[inline(always)]
    fn own_address(&mut self, dst: Dst) -> bool {
        let key = AddrKey {
            netns_cookie: self.netns,
            addr: dst.mapped(),
        };
        unsafe { LOCAL_ADDRS.get(&key) }.is_some()
    }
    #[inline(always)]
    fn exclude_range(&mut self, dst: Dst) -> bool {
        self.range(dst, false)
    }
    #[inline(always)]
    fn include_range(&mut self, dst: Dst) -> bool {
        self.range(dst, true)
    }
    #[inline(always)]
    fn inbound_include_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::INBOUND_INCLUDE)
    }
    #[inline(always)]
    fn inbound_exclude_port(&mut self, port: u16) -> bool {
        self.port(port, port_list::INBOUND_EXCLUDE)
    }
    #[inline(always)]
    fn owner_group(&mut self, gid: u32) -> bool {
        let key = GroupKey {
            netns_cookie: self.netns,
            gid,
            _pad: [0; 4],
        };
        unsafe { OWNER_GROUPS.get(&key) }.is_some()
    }
    #[inline(always)]
    fn nameserver(&mut self, dst: Dst) -> bool {
        let key = AddrKey {
            netns_cookie: self.netns,
            addr: dst.mapped(),
        };
        unsafe { NAMESERVERS.get(&key) }.is_some()
    }
}

/// Judge a connect in this namespace to `dst:port` (or, for UDP, a
/// datagram sent with a destination), count it, and remember the original
/// destination of a diverted socket. Returns the loopback port the
/// destination must be rewritten to, or `None` to leave it alone (also
/// when the namespace has no policy).
///
/// UDP is judged only for DNS capture (the caller passes only port 53),
/// and counted only when captured; its original destination goes to
/// `DNS_ORIG`, where no close callback has to remove it.
#[inline(always)]
pub fn on_connect<C: EbpfContext>(
    ctx: &C,
    sk: *mut bpf_sock,
    dst: Dst,
    port: u16,
    transport: Transport,
) -> Option<u16> {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let policy = unsafe { POLICIES.get(&netns) }?;
    if transport == Transport::Udp && policy.flags & divert_common::flags::DNS_CAPTURE == 0 {
        return None;
    }
    let uid_gid = bpf_get_current_uid_gid();
    let is_v4 = matches!(dst, Dst::V4(_));
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
    let connect = Connect {
        transport,
        dst,
        port,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        src_is_passthrough,
    };
    let (v, _) = chain::judge(policy, &connect, &mut MapLookups { netns });
    if transport == Transport::Udp && v != Verdict::Dns {
        return None;
    }
    let addr = dst.mapped();
    let one = CounterValue {
        connections: 1,
        ..CounterValue::default()
    };
    count(netns, addr, port, v, &one);
    let target_port = match v {
        Verdict::Redirect => policy.proxy_port,
        Verdict::InboundCapture => policy.inbound_capture_port,
        Verdict::Dns => DNS_PROXY_PORT,
        Verdict::PassThrough => return None,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        is_v4: is_v4 as u8,
        verdict: v as u8,
        _pad: [0; 4],
    };
    // An LRU map evicts rather than fails; a failed insert only costs the
    // proxy its SO_ORIGINAL_DST answer (a DNS reply its source), never the
    // connect.
    let _ = match transport {
        Transport::Tcp => ORIG_BY_COOKIE.insert(&cookie, &orig, 0),
        Transport::Udp => DNS_ORIG.insert(&cookie, &orig, 0),
    };
    Some(target_port)
}
