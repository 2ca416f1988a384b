//! The inbound capture listener of a namespace whose proxy was listening
//! before the policy was registered: the kernel records a listener when it
//! starts listening (`divert_listen`), so one already listening is found
//! here and put in the `LISTENERS` socket hash by hand.
//!
//! [`find_listeners`] runs in the namespace: `/proc/thread-self/net/tcp{,6}`
//! lists its listening sockets (inode by port), `/proc/PID/fd` of its
//! processes tells which holds each, and `pidfd_getfd(2)` (Linux 5.6,
//! `CAP_SYS_PTRACE` over the holder) gives us a descriptor of that very
//! socket; [`Maps::adopt_listeners`] inserts them.

use std::{
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use aya::maps::SockHash;
use divert_common::{maps, ListenerKey};

use super::{Error, Maps, Result};

const AF_INET: u32 = libc::AF_INET as u32;
const AF_INET6: u32 = libc::AF_INET6 as u32;
/// `/proc/net/tcp`'s `st` of a listening socket (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";

/// The inodes of the sockets listening on `port` in `/proc/thread-self/net/FILE`'s
/// text (`tcp` or `tcp6` format: `sl local_address rem_address st … inode`,
/// addresses as `HEX:PORT`).
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            let listening = *f.get(3)? == TCP_LISTEN;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// A process of this namespace and its descriptor that hold the socket
/// `inode`, if any. Only processes whose `/proc/PID/ns/net` is `netns` (the
/// namespace's `net:[INODE]` link text) have their descriptors read. When no
/// holder is found and a process of the namespace had descriptors we could
/// not read (`/proc/PID/fd` of another user's process needs
/// `CAP_DAC_READ_SEARCH`), the error is that process's.
fn holder(
    inode: u64,
    netns: &std::ffi::OsStr,
) -> std::result::Result<Option<(i32, i32)>, (i32, std::io::Error)> {
    let wanted = format!("socket:[{inode}]");
    let mut unreadable = None;
    let Ok(procs) = fs::read_dir("/proc") else {
        return Ok(None);
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // (A kernel thread, or a process gone since, has no link to read.)
        if !fs::read_link(p.path().join("ns/net")).is_ok_and(|l| l.as_os_str() == netns) {
            continue;
        }
        let fds = match fs::read_dir(p.path().join("fd")) {
            Ok(fds) => fds,
            // Gone since.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                unreadable.get_or_insert((pid, e));
                continue;
            }
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == wanted.as_str()) {
                if let Some(n) = fd.file_name().to_str().and_then(|s| s.parse().ok()) {
                    return Ok(Some((pid, n)));
                }
            }
        }
    }
    unreadable.map_or(Ok(None), Err)
}

/// Our own descriptor of descriptor `fd` of process `pid`.
fn take_fd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned descriptor is new and ours.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// The sockets listening on `port` in the calling thread's namespace, one
/// per address family (`AF_INET`, `AF_INET6`), as descriptors of our own.
/// A socket whose holder cannot be reached is left out with a warning (it
/// is recorded when it listens again).
pub fn find_listeners(port: u16) -> Vec<(u32, OwnedFd)> {
    let Ok(netns) = fs::read_link("/proc/thread-self/ns/net") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (file, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
        let Ok(table) = fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        let mut found = None;
        for inode in listening_inodes(&table, port) {
            match holder(inode, netns.as_os_str()) {
                Ok(Some(h)) => {
                    found = Some(h);
                    break;
                }
                Ok(None) => {}
                Err((pid, e)) => {
                    tracing::warn!(pid, port, error = %e, "a socket listens on the inbound capture port, but the descriptors of a process of the namespace cannot be read (the daemon needs CAP_DAC_READ_SEARCH): capture starts when the proxy listens again");
                }
            }
        }
        let Some((pid, fd)) = found else {
            continue;
        };
        match take_fd(pid, fd) {
            Ok(sock) => out.push((family, sock)),
            Err(e) => {
                tracing::warn!(pid, fd, port, error = %e, "cannot take the listening socket of the inbound capture port")
            }
        }
    }
    out
}

impl Maps {
    /// Whether `netns_cookie` has a capture listener in `LISTENERS`.
    pub fn has_listener(&self, netns_cookie: u64) -> Result<bool> {
        let m = self
            .maps
            .get(maps::LISTENERS)
            .ok_or(Error::MissingMap(maps::LISTENERS))?;
        let hash: SockHash<&aya::maps::MapData, ListenerKey> =
            SockHash::try_from(m).map_err(|source| Error::Map {
                map: maps::LISTENERS,
                source,
            })?;
        Ok(hash
            .keys()
            .filter_map(|k| k.ok())
            .any(|k| k.netns_cookie == netns_cookie))
    }

    /// Put `listeners` ([`find_listeners`]) in the `LISTENERS` socket hash
    /// as `netns_cookie`'s capture listeners. Returns how many.
    pub fn adopt_listeners(
        &mut self,
        netns_cookie: u64,
        listeners: &[(u32, OwnedFd)],
    ) -> Result<usize> {
        let m = self
            .maps
            .get_mut(maps::LISTENERS)
            .ok_or(Error::MissingMap(maps::LISTENERS))?;
        let mut hash: SockHash<&mut aya::maps::MapData, ListenerKey> = SockHash::try_from(m)
            .map_err(|source| Error::Map {
                map: maps::LISTENERS,
                source,
            })?;
        for (family, sock) in listeners {
            let key = ListenerKey {
                netns_cookie,
                family: *family,
                _pad: [0; 4],
            };
            hash.insert(key, sock.as_raw_fd(), 0)
                .map_err(|source| Error::Map {
                    map: maps::LISTENERS,
                    source,
                })?;
        }
        Ok(listeners.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_by_port_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4243 1 0000000000000000 100 0 0 10 0
   2: 0100007F:3A9E 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4244 1 0000000000000000 20 4 30 10 -1
";
        // 0x3A9E = 15006; the established connection on it is not a listener.
        assert_eq!(listening_inodes(table, 15006), vec![4242]);
        assert_eq!(listening_inodes(table, 15001), vec![4243]);
        assert!(listening_inodes(table, 80).is_empty());
    }
}
