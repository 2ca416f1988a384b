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
