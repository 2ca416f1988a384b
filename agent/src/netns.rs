//! The calling thread's network namespace: its cookie and its addresses.

use std::{io, net::IpAddr, os::fd::AsRawFd};

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// The network-namespace cookie of the calling thread's namespace
/// (`getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)`, Linux 5.14+), the key of
/// its policy in the kernel maps. Host byte order.
pub fn current_cookie() -> io::Result<u64> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a u64 buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Whether `ip` is an address every namespace has or may have alike —
/// loopback (127.0.0.0/8, ::1) or link-local (169.254.0.0/16, fe80::/10) —
/// and so says nothing about which namespace, or which family, a pod is.
pub fn is_loopback_or_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Every address configured on an interface of the calling thread's
/// network namespace (IPv4 and IPv6, loopback included): what iptables'
/// `-o lo` treats as local.
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// `::6`, the source address of Envoy's inbound passthrough cluster.
pub const INBOUND_PASSTHROUGH_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The kernel's `struct in6_ifreq` (linux/ipv6.h), the argument of
/// SIOCSIFADDR/SIOCDIFADDR on an AF_INET6 socket.
#[repr(C)]
struct In6Ifreq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

fn lo_v6_ioctl(request: libc::c_ulong) -> io::Result<()> {
    let sock = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let ifindex = nix::net::if_::if_nametoindex("lo")?;
    let req = In6Ifreq {
        addr: libc::in6_addr {
            s6_addr: INBOUND_PASSTHROUGH_V6.octets(),
        },
        prefixlen: 128,
        ifindex: ifindex as libc::c_int,
    };
    // SAFETY: a valid socket and a properly laid out in6_ifreq that lives
    // across the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &req as *const In6Ifreq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Add `::6/128` to `lo` in the calling thread's namespace, as
/// istio-iptables does when it writes IPv6 rules (`ip -6 addr add ::6/128
/// dev lo`). Returns whether it was added (`false`: it was already there).
pub fn add_inbound_passthrough_v6() -> io::Result<bool> {
    match lo_v6_ioctl(libc::SIOCSIFADDR as libc::c_ulong) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove `::6/128` from `lo`; absent (or IPv6 disabled) is not an error.
pub fn remove_inbound_passthrough_v6() -> io::Result<()> {
    match lo_v6_ioctl(libc::SIOCDIFADDR as libc::c_ulong) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EADDRNOTAVAIL) | Some(libc::ENODEV) | Some(libc::EAFNOSUPPORT)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}
