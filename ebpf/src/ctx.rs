//! Reading the kernel's context structures, and the constants of the
//! socket API the programs compare against.

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
        $crate::ctx::words_to_bytes([
            load!($ptr, $ty, $field, 0),
            load!($ptr, $ty, $field, 1),
            load!($ptr, $ty, $field, 2),
            load!($ptr, $ty, $field, 3),
        ])
    };
}

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_MPTCP: u32 = 262;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const PAGE_SIZE: i32 = 4096;
/// `TCPHDR_FIN` in `bpf_sock_ops.skb_tcp_flags`.
pub const TCP_FIN: u32 = 0x01;

/// Four words of a `[u32; 4]` address field (network byte order) as 16 bytes.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
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

/// 16 address bytes as the four words of a `[u32; 4]` field.
#[inline(always)]
pub fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Whether `a` (16 bytes, IPv4 mapped) is where diverted connects are
/// rewritten to: 127.0.0.1 or ::1.
#[inline(always)]
pub fn is_proxy_addr(a: &[u8; 16]) -> bool {
    use divert_common::{
        chain::{LOOPBACK4, LOOPBACK6},
        mapped_v4,
    };
    *a == mapped_v4(LOOPBACK4) || *a == LOOPBACK6
}

/// The transport a `connect()` hook judges a socket with: TCP (a stream
/// socket, not MPTCP's own connect, whose first subflow is judged) or UDP
/// (a datagram socket, not UDP-Lite); `None` for anything else.
#[inline(always)]
pub fn transport(ty: u32, protocol: u32) -> Option<divert_common::chain::Transport> {
    use divert_common::chain::Transport;
    match (ty, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Some(Transport::Tcp),
        (SOCK_DGRAM, IPPROTO_UDP) => Some(Transport::Udp),
        _ => None,
    }
}

/// A `PORTS` key, its padding zero. Built as two 8-byte words: LLVM turns
/// the struct literal's odd-sized `_pad: [0; 5]` into a call to a
/// byte-wise `memset` subprogram, on every lookup.
#[inline(always)]
pub fn port_key(netns_cookie: u64, port: u16, list: u8) -> divert_common::PortKey {
    use divert_common::PortKey;
    const _: () = assert!(
        core::mem::size_of::<PortKey>() == 16
            && core::mem::offset_of!(PortKey, port) == 8
            && core::mem::offset_of!(PortKey, list) == 10
    );
    let words: [u64; 2] = [netns_cookie, port as u64 | (list as u64) << 16];
    // SAFETY: 16 bytes of integers either way; the second word holds
    // `port`, `list` and the zero padding in little-endian order (bpfel).
    unsafe { core::mem::transmute::<[u64; 2], PortKey>(words) }
}

/// A `COUNTERS` key, its padding zero, without a `memset` call (see
/// [`port_key`]).
#[inline(always)]
pub fn counter_key(
    netns_cookie: u64,
    addr: [u8; 16],
    port: u16,
    verdict: u8,
) -> divert_common::CounterKey {
    use divert_common::CounterKey;
    #[repr(C)]
    struct Words {
        netns_cookie: u64,
        addr: [u8; 16],
        tail: u64,
    }
    const _: () = assert!(
        core::mem::size_of::<CounterKey>() == core::mem::size_of::<Words>()
            && core::mem::offset_of!(CounterKey, addr) == core::mem::offset_of!(Words, addr)
            && core::mem::offset_of!(CounterKey, port) == core::mem::offset_of!(Words, tail)
            && core::mem::offset_of!(CounterKey, verdict) == core::mem::offset_of!(Words, tail) + 2
    );
    let words = Words {
        netns_cookie,
        addr,
        tail: port as u64 | (verdict as u64) << 16,
    };
    // SAFETY: as `port_key`: integers and bytes, the tail word holding
    // `port`, `verdict` and the zero padding in little-endian order.
    unsafe { core::mem::transmute::<Words, CounterKey>(words) }
}
