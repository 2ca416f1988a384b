//! The node agent: one pinned instance of the programs at the cgroup root
//! ([`crate::ebpf::pinned`]) and the registration socket the pods' init
//! containers talk to ([`proto`]).
//!
//! The caller's network namespace is never taken from the request: the
//! daemon reads the peer's pid from `SO_PEERCRED`, opens
//! `/proc/<pid>/ns/net`, and on a thread that has entered that namespace
//! reads its netns cookie (`SO_NETNS_COOKIE`) and its own addresses. The
//! daemon's own network namespace (the host's: the DaemonSet runs with
//! `hostNetwork`) is refused.

pub mod gc;
pub mod kube;
pub mod metrics;
pub mod proto;

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    sync::{Arc, Mutex},
    thread,
};

use anyhow::Context as _;
use nix::sched::{setns, CloneFlags};

use crate::{
    ebpf::{Interceptor, PodRef, RegisteredBy},
    netns,
};
use proto::{Op, Request, Response, VERSION};

/// Who a connection's peer is, in network terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub netns_cookie: u64,
    pub local_addrs: Vec<std::net::IpAddr>,
}

/// Identify the process at the other end of `stream` by its credentials.
pub fn identify(stream: &UnixStream) -> anyhow::Result<Peer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .context("SO_PEERCRED")?;
    peer_of_pid(cred.pid())
}

/// The network namespace of process `pid` (as this daemon's pid namespace
/// numbers it): its cookie and its own addresses, read on a thread that
/// enters `/proc/<pid>/ns/net`.
pub fn peer_of_pid(pid: i32) -> anyhow::Result<Peer> {
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = fs::File::open(&ns_path).with_context(|| format!("opening {ns_path}"))?;
    let (netns_cookie, local_addrs) = thread::spawn(move || -> anyhow::Result<_> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).context("entering the netns")?;
        Ok((netns::current_cookie()?, netns::local_addresses()?))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns thread panicked"))??;
    Ok(Peer {
        pid,
        netns_cookie,
        local_addrs,
    })
}

/// The registration service: the instance and the daemon's own netns.
pub struct Registry {
    interceptor: Mutex<Interceptor>,
    host_netns: u64,
}

impl Registry {
    pub fn new(interceptor: Interceptor) -> anyhow::Result<Registry> {
        Ok(Registry {
            interceptor: Mutex::new(interceptor),
            host_netns: netns::current_cookie().context("the daemon's own netns cookie")?,
        })
    }

    /// Record which pod `netns_cookie` is (Kubernetes namespace and name) in
    /// the pinned `PODS` map, where `divert maps` and a restarted daemon find it.
    pub fn set_identity(
        &self,
        netns_cookie: u64,
        namespace: &str,
        pod: &str,
    ) -> anyhow::Result<()> {
        Ok(self.lock().set_pod(netns_cookie, namespace, pod)?)
    }

    /// Every known pod identity, by netns cookie.
    pub fn identities(&self) -> anyhow::Result<std::collections::BTreeMap<u64, PodRef>> {
        Ok(self.lock().pods()?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Interceptor> {
        self.interceptor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register `netns_cookie`'s policy, or replace it make-before-break
    /// (see [`Interceptor::replace`]), with the namespace's own addresses,
    /// recording `by` as who registered it. The node's own namespace is refused.
    pub fn register_namespace(
        &self,
        netns_cookie: u64,
        mut policy: crate::policy::Policy,
        local_addrs: &[std::net::IpAddr],
        by: RegisteredBy,
    ) -> anyhow::Result<()> {
        if netns_cookie == self.host_netns {
            anyhow::bail!(
                "netns {netns_cookie} is the node's own network namespace; only pod namespaces can be registered"
            );
        }
        policy.local_addrs = local_addrs.to_vec();
        self.lock().replace(netns_cookie, &policy, by)?;
        Ok(())
    }

    /// Answer one request from `peer`.
    pub fn handle(&self, peer: &Peer, req: Request) -> Response {
        let mut r = Response {
            version: VERSION,
            netns_cookie: Some(peer.netns_cookie),
            ..Response::default()
        };
        let outcome = (|| -> anyhow::Result<bool> {
            if req.version != VERSION {
                anyhow::bail!(
                    "protocol version {} is not spoken here (this daemon speaks {VERSION})",
                    req.version
                );
            }
            if peer.netns_cookie == self.host_netns {
                anyhow::bail!(
                    "pid {} is in the node's own network namespace (cookie {}); only pod namespaces can be registered",
                    peer.pid,
                    peer.netns_cookie
                );
            }
            match req.op {
                Op::Register { policy } => {
                    self.register_namespace(
                        peer.netns_cookie,
                        *policy,
                        &peer.local_addrs,
                        RegisteredBy::Init,
                    )?;
                    tracing::info!(
                        pid = peer.pid,
                        netns_cookie = peer.netns_cookie,
                        "registered"
                    );
                    Ok(true)
                }
                Op::Unregister => {
                    // Removes the pod identity with the policy.
                    self.lock().unregister_netns(peer.netns_cookie)?;
                    tracing::info!(
                        pid = peer.pid,
                        netns_cookie = peer.netns_cookie,
                        "unregistered"
                    );
                    Ok(false)
                }
                Op::Status => Ok(self.lock().is_registered(peer.netns_cookie)?),
            }
        })();
        match outcome {
            Ok(registered) => {
                r.ok = true;
                r.registered = registered;
            }
            Err(e) => {
                tracing::warn!(pid = peer.pid, netns_cookie = peer.netns_cookie, error = %format!("{e:#}"), "request refused");
                r.error = Some(format!("{e:#}"));
            }
        }
        r
    }

    fn serve_one(&self, stream: UnixStream) -> anyhow::Result<()> {
        stream.set_read_timeout(Some(proto::TIMEOUT))?;
        stream.set_write_timeout(Some(proto::TIMEOUT))?;
        let peer = identify(&stream);
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let response = match (peer, Request::parse(&line)) {
            (Ok(peer), Ok(req)) => self.handle(&peer, req),
            (Err(e), _) => Response {
                version: VERSION,
                error: Some(format!("cannot identify the caller: {e:#}")),
                ..Response::default()
            },
            (_, Err(e)) => Response {
                version: VERSION,
                error: Some(format!("bad request {:?}: {e}", line.trim())),
                ..Response::default()
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        (&stream).write_all(out.as_bytes())?;
        Ok(())
    }
}

/// Bind the registration socket at `path` (its directory is created; a
/// stale socket file is replaced), mode 0660.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serve requests forever, one thread per connection.
pub fn serve(listener: UnixListener, registry: Arc<Registry>) -> anyhow::Result<()> {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the registration socket");
                continue;
            }
        };
        let registry = registry.clone();
        thread::spawn(move || {
            if let Err(e) = registry.serve_one(stream) {
                tracing::warn!(error = %format!("{e:#}"), "registration connection");
            }
        });
    }
    Ok(())
}
