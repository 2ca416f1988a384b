//! `divert init --validate`: prove from inside the namespace that a
//! connect is diverted, as Istio's validation init container does: listen
//! where the redirect lands (`127.0.0.1:<proxy port>`), dial a destination the
//! policy redirects, and check that the connection arrives with that
//! destination as its `SO_ORIGINAL_DST`.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::policy::{verdict, Action, IncludeRanges, Policy};

/// How long the probe may take end to end.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Ports tried for the probe destination, in order (15002 is Istio's
/// validation port).
const PROBE_PORTS: [u16; 3] = [15002, 80, 443];

/// Destinations worth probing: the documentation ranges (RFC 5737), then
/// one address of each IPv4 include range.
fn candidates(policy: &Policy) -> Vec<Ipv4Addr> {
    let mut v = vec![
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(198, 51, 100, 1),
        Ipv4Addr::new(203, 0, 113, 1),
    ];
    if let IncludeRanges::List(ranges) = &policy.include_ranges {
        for r in ranges {
            if let ipnetwork::IpNetwork::V4(n) = r {
                let a = u32::from(n.network());
                v.push(Ipv4Addr::from(if n.prefix() < 32 { a + 1 } else { a }));
            }
        }
    }
    v
}

/// The first IPv4 destination `policy` redirects to the outbound proxy
/// port for a process with these IDs; `None` when it redirects none we try.
pub fn probe_destination(policy: &Policy, uid: u32, gid: u32) -> Option<SocketAddrV4> {
    for ip in candidates(policy) {
        for port in PROBE_PORTS {
            let dst = SocketAddrV4::new(ip, port);
            if verdict(policy, SocketAddr::V4(dst), uid, gid).action
                == Action::Redirect(policy.proxy_port)
            {
                return Some(dst);
            }
        }
    }
    None
}

fn original_dst(s: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: getsockopt writes at most `len` bytes into `sa`.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            divert_common::SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    ))
}

/// Run the probe in this process's namespace. Errors name what was tried
/// and what happened instead.
pub fn probe(policy: &Policy) -> anyhow::Result<()> {
    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let mut policy = policy.clone();
    policy.local_addrs =
        crate::netns::local_addresses().context("listing this namespace's addresses")?;
    let Some(dst) = probe_destination(&policy, uid, gid) else {
        eprintln!(
            "divert init: validate: the policy redirects none of the probe destinations for UID {uid}; nothing to prove"
        );
        return Ok(());
    };
    let at = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), policy.proxy_port);
    let listener = TcpListener::bind(at)
        .with_context(|| format!("validate: listening on {at} (where the redirect lands)"))?;
    listener.set_nonblocking(true)?;
    let dialer = thread::spawn(move || TcpStream::connect_timeout(&SocketAddr::V4(dst), TIMEOUT));
    let deadline = Instant::now() + TIMEOUT;
    // Once the connect has returned, a diverted connection is already in
    // the accept queue; wait a little longer for stragglers, not the
    // whole timeout.
    let mut grace: Option<Instant> = None;
    let accepted = loop {
        match listener.accept() {
            Ok((s, _)) => break Some(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if dialer.is_finished() && grace.is_none() {
                    grace = Some(Instant::now() + Duration::from_millis(200));
                }
                let now = Instant::now();
                if now > deadline || grace.is_some_and(|g| now > g) {
                    break None;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("validate: accepting the probe"),
        }
    };
    let dialled = dialer
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?;
    let Some(s) = accepted else {
        bail!(
            "validate: a connect to {dst} (which the policy redirects) did not arrive on {at}: {}",
            match dialled {
                Ok(c) => format!("it reached {:?} instead", c.peer_addr().ok()),
                Err(e) => format!("the connect failed: {e}"),
            }
        );
    };
    let orig = original_dst(&s)
        .with_context(|| format!("validate: SO_ORIGINAL_DST of the probe connection to {dst}"))?;
    if orig != dst {
        bail!("validate: the probe to {dst} arrived on {at} with original destination {orig}");
    }
    eprintln!(
        "divert init: validate: a connect to {dst} landed on {at} with SO_ORIGINAL_DST {orig}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_a_destination_the_policy_redirects() {
        let p = Policy {
            proxy_uids: vec![1337],
            ..Policy::default()
        };
        let all = Policy {
            include_ranges: IncludeRanges::All,
            ..p.clone()
        };
        assert_eq!(
            probe_destination(&all, 0, 0),
            Some("192.0.2.1:15002".parse().unwrap())
        );
        // Only 10.0.0.0/8 captured: probe inside it.
        let some = Policy {
            include_ranges: IncludeRanges::List(vec!["10.0.0.0/8".parse().unwrap()]),
            ..p.clone()
        };
        assert_eq!(
            probe_destination(&some, 0, 0),
            Some("10.0.0.1:15002".parse().unwrap())
        );
        // 15002 excluded: another port.
        let mut no15002 = all.clone();
        no15002.exclude_ports = vec![15002];
        assert_eq!(
            probe_destination(&no15002, 0, 0),
            Some("192.0.2.1:80".parse().unwrap())
        );
        // The proxy's own UID is never redirected; nothing captured at all.
        assert_eq!(probe_destination(&all, 1337, 0), None);
        let none = Policy {
            include_ranges: IncludeRanges::List(vec![]),
            ..p
        };
        assert_eq!(probe_destination(&none, 0, 0), None);
    }
}

/// `--run-validation` failed: the rules in place did not redirect the probe
/// within the timeout (`divert init` and `divert istio-iptables` exit 126
/// for it, as istio-iptables does).
#[derive(Debug, thiserror::Error)]
#[error("validation failed: {0}; the workload is not ready for Istio (when using Istio CNI, this can happen when a pod is scheduled before the node is ready)")]
pub struct ValidationFailed(pub String);

/// istio-validation's check (`tools/istio-iptables/pkg/validation`): listen
/// on the loopback address at the proxy port and at the inbound capture port,
/// connect from it to 127.0.0.6 (`::6` when `v6`) at `probe_port` once a
/// second, and succeed when a listener accepts a connection whose original
/// destination port is `probe_port`. A connect to 127.0.0.6 is local, so
/// only a proxy-owned one is sent to a listener (to the inbound capture
/// port): run this as the proxy's UID, as istio's validation container runs.
/// Errors: [`ValidationFailed`] when `timeout` passes first.
pub fn istio(policy: &Policy, probe_port: u16, timeout: Duration, v6: bool) -> anyhow::Result<()> {
    let (listen_ip, server_ip): (IpAddr, IpAddr) = if v6 {
        (
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            IpAddr::from(divert_common::chain::PASSTHROUGH_SRC6),
        )
    } else {
        (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::from(divert_common::chain::PASSTHROUGH_SRC4),
        )
    };
    let mut listeners = Vec::new();
    for port in [policy.proxy_port, policy.inbound_capture_port] {
        let at = SocketAddr::new(listen_ip, port);
        match bind_reusable(at) {
            Ok(l) => listeners.push(l),
            Err(e) => tracing::warn!(%at, error = %e, "validation: cannot listen"),
        }
    }
    if listeners.is_empty() {
        return Err(ValidationFailed(format!(
            "no listener available on {listen_ip} at ports {} and {}",
            policy.proxy_port, policy.inbound_capture_port
        ))
        .into());
    }
    let target = SocketAddr::new(server_ip, probe_port);
    let deadline = Instant::now() + timeout;
    let mut next_dial = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_dial {
            // The result does not matter: a redirected connect shows up on
            // a listener.
            let from = SocketAddr::new(listen_ip, 0);
            let _ = dial_from(from, target);
            next_dial = Instant::now() + Duration::from_secs(1);
        }
        for l in &listeners {
            while let Ok((s, _)) = l.accept() {
                let v6_socket = s.local_addr().map(|a| a.is_ipv6()).unwrap_or(v6);
                if original_port(&s, v6_socket) == Some(probe_port) {
                    return Ok(());
                }
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    Err(ValidationFailed(format!(
        "no connect to {target} was redirected to {listen_ip} port {} or {} within {timeout:?}",
        policy.proxy_port, policy.inbound_capture_port
    ))
    .into())
}

fn bind_reusable(at: SocketAddr) -> io::Result<TcpListener> {
    let fd = nix::sys::socket::socket(
        if at.is_ipv6() {
            nix::sys::socket::AddressFamily::Inet6
        } else {
            nix::sys::socket::AddressFamily::Inet
        },
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_NONBLOCK | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(at))?;
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(16)?)?;
    Ok(TcpListener::from(fd))
}

fn dial_from(from: SocketAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let fd = nix::sys::socket::socket(
        if to.is_ipv6() {
            nix::sys::socket::AddressFamily::Inet6
        } else {
            nix::sys::socket::AddressFamily::Inet
        },
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::bind(
        fd.as_raw_fd(),
        &nix::sys::socket::SockaddrStorage::from(from),
    )?;
    nix::sys::socket::connect(fd.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// The original destination port of an accepted connection:
/// `SO_ORIGINAL_DST` at `SOL_IP`, or at `SOL_IPV6` (`IP6T_SO_ORIGINAL_DST`)
/// for an IPv6 socket.
fn original_port(s: &TcpStream, v6: bool) -> Option<u16> {
    if !v6 {
        return original_dst(s).ok().map(|a| a.port());
    }
    // SAFETY: getsockopt writes at most `len` bytes into `sa`.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IPV6,
            divert_common::SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| u16::from_be(sa.sin6_port))
}
