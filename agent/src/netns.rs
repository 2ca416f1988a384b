//! Network namespaces: the calling thread's cookie and addresses, and
//! every live namespace by cookie.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
};

use nix::{
    sched::{setns, CloneFlags},
    sys::socket::{socket, AddressFamily, SockFlag, SockType},
};

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

/// Where bind-mounted namespaces live.
const NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Every path that names a live network namespace, grouped by namespace
/// (device and inode of the nsfs file): `/proc/<pid>/ns/net` of every
/// process, and the bind mounts under /run/netns and /var/run/netns.
fn live_namespace_paths() -> BTreeMap<(u64, u64), Vec<PathBuf>> {
    let mut by_ns: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = fs::metadata(&p) {
            by_ns.entry((m.dev(), m.ino())).or_default().push(p);
        }
    };
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                add(e.path().join("ns/net"));
            }
        }
    }
    for dir in NETNS_DIRS {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                add(e.path());
            }
        }
    }
    by_ns
}

/// Every live network namespace this process can see (a pod's pause
/// process holds its namespace; `ip netns` and CNI plugins bind-mount
/// theirs), by cookie, with a path that named it when it was read. Each
/// cookie is read by entering the namespace on a throwaway thread (no
/// cache: a freed namespace's inode number is reused). Seeing the pods'
/// processes needs the host's pid namespace (`hostPID`).
pub fn live_namespaces() -> io::Result<HashMap<u64, PathBuf>> {
    let groups: Vec<Vec<PathBuf>> = live_namespace_paths().into_values().collect();
    std::thread::spawn(move || {
        let mut out = HashMap::new();
        for paths in groups {
            // Any path of the group will do; a process may have exited since.
            for p in paths {
                let Ok(f) = fs::File::open(&p) else { continue };
                if setns(f.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                    continue;
                }
                if let Ok(c) = current_cookie() {
                    out.insert(c, p);
                    break;
                }
            }
        }
        out
    })
    .join()
    .map_err(|_| io::Error::other("the namespace scan thread panicked"))
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
