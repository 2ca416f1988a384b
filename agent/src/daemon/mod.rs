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
//!
//! What a client can make the daemon spend is bounded: a request is at most
//! [`proto::MAX_REQUEST_BYTES`] and must arrive within
//! [`proto::REQUEST_DEADLINE`], at most [`MAX_CLIENTS`] connections are
//! served at once (one more is answered "busy" at once), a request's policy
//! is held to the command line's rules ([`crate::policy::Policy::validate`])
//! before anything is written, and a panic while serving one request is
//! caught, logged and answered as an error, never left to the client or
//! the other requests.

pub mod gc;
pub mod kube;
pub mod metrics;
pub mod proto;

use std::{
    fs,
    os::{
        fd::AsFd,
        unix::{fs::MetadataExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
};

use anyhow::Context as _;
use nix::sched::{setns, CloneFlags};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    ebpf::{Maps, RegisteredBy},
    netns,
    policy::Source,
};
use proto::{Op, Request, Response, VERSION};

/// Who a connection's peer is, in network terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub netns_cookie: u64,
    pub local_addrs: Vec<std::net::IpAddr>,
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

/// The registration service: the instance, where it is pinned, and the
/// daemon's own netns.
pub struct Registry {
    interceptor: Mutex<Maps>,
    bpffs_dir: std::path::PathBuf,
    host_netns: u64,
    health: metrics::Health,
}

impl Registry {
    /// The service over `interceptor`'s maps, pinned under `bpffs_dir`;
    /// failed registrations and collected namespaces are counted in
    /// `health`.
    pub fn new(
        interceptor: Maps,
        bpffs_dir: &std::path::Path,
        health: metrics::Health,
    ) -> anyhow::Result<Registry> {
        Ok(Registry {
            interceptor: Mutex::new(interceptor),
            bpffs_dir: bpffs_dir.to_path_buf(),
            host_netns: netns::current_cookie().context("the daemon's own netns cookie")?,
            health,
        })
    }

    /// What this registry counts.
    pub fn health(&self) -> &metrics::Health {
        &self.health
    }

    /// Inbound capture for a namespace whose policy is registered: with
    /// `capture_port`, the socket lookup program attached to it (a pinned
    /// link) and a capture listener already listening there adopted;
    /// without, its link removed. `netns` is the namespace, e.g.
    /// `/proc/PID/ns/net`.
    fn inbound(
        &self,
        netns_cookie: u64,
        netns: &std::path::Path,
        capture_port: Option<u16>,
    ) -> anyhow::Result<()> {
        let Some(port) = capture_port else {
            crate::ebpf::pinned::unlink_netns(&self.bpffs_dir, netns_cookie)?;
            return Ok(());
        };
        let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        crate::ebpf::pinned::link_netns(&self.bpffs_dir, netns_cookie, ns.as_fd())?;
        if self.lock().has_listener(netns_cookie)? {
            return Ok(());
        }
        // A proxy already listening: found from inside the namespace,
        // without holding the maps.
        let found = thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<_> {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).context("entering the netns")?;
                Ok(crate::ebpf::find_listeners(port))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
        })?;
        let adopted = self.lock().adopt_listeners(netns_cookie, &found)?;
        tracing::debug!(netns_cookie, adopted, "inbound capture attached");
        Ok(())
    }

    /// Remove `netns_cookie`'s policy, pod identity and inbound capture.
    /// Returns whether a policy was registered.
    pub fn forget(&self, netns_cookie: u64) -> anyhow::Result<bool> {
        let was = self.lock().unregister_netns(netns_cookie)?;
        crate::ebpf::pinned::unlink_netns(&self.bpffs_dir, netns_cookie)?;
        Ok(was)
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

    /// Hold the maps: no registration is under way while the guard lives.
    pub fn hold(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.interceptor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register `netns_cookie`'s policy, or replace it make-before-break
    /// (see [`Maps::replace`]), with the namespace's own addresses,
    /// recording `by` as who registered it. The node's own namespace is refused.
    fn register_namespace(
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

    /// Register (or replace) `peer`'s namespace with `policy`, and attach or
    /// detach its inbound capture to match: the one way a namespace is
    /// registered, for the socket and the pod watch alike. Fully configured
    /// or not at all: when inbound capture cannot be attached, the policy is
    /// removed again.
    pub fn register_peer(
        &self,
        peer: &Peer,
        policy: crate::policy::Policy,
        by: RegisteredBy,
    ) -> anyhow::Result<()> {
        let capture_port = (!policy.inbound_ports.is_none()).then_some(policy.inbound_capture_port);
        if let Err(e) = self.register_namespace(peer.netns_cookie, policy, &peer.local_addrs, by) {
            self.health.registration_failed(&e);
            return Err(e);
        }
        let ns = std::path::PathBuf::from(format!("/proc/{}/ns/net", peer.pid));
        if let Err(e) = self.inbound(peer.netns_cookie, &ns, capture_port) {
            let _ = self.forget(peer.netns_cookie);
            self.health.registration_failed(&e);
            return Err(e.context("attaching inbound capture; the policy was removed again"));
        }
        Ok(())
    }

    /// Answer one request from `peer`.
    pub fn handle(&self, peer: &Peer, req: Request) -> Response {
        let mut r = Response {
            version: VERSION,
            netns_cookie: Some(peer.netns_cookie),
            ..Response::default()
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decide(peer, req)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(pid = peer.pid, netns_cookie = peer.netns_cookie, panic = %what, "a request handler panicked (a bug): answered as an error");
            Err(anyhow::anyhow!(
                "internal error in the divert daemon (logged there); nothing was changed"
            ))
        });
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

    /// What a request does. Maps are written only after the request is
    /// known good; a write that fails removes what it wrote.
    fn decide(&self, peer: &Peer, req: Request) -> anyhow::Result<bool> {
        {
            if req.version != VERSION {
                self.health.error("refused");
                anyhow::bail!(
                    "protocol version {} is not spoken here (this daemon speaks {VERSION})",
                    req.version
                );
            }
            if peer.netns_cookie == self.host_netns {
                self.health.error("refused");
                anyhow::bail!(
                    "pid {} is in the node's own network namespace (cookie {}); only pod namespaces can be registered",
                    peer.pid,
                    peer.netns_cookie
                );
            }
            match req.op {
                Op::Register { policy, registrar } => {
                    if let Err(e) = policy.validate(&|field| Source::Request(field.to_string())) {
                        self.health.error("invalid");
                        return Err(e.into());
                    }
                    self.register_peer(peer, *policy, proto::Registrar::registered_by(registrar))?;
                    tracing::info!(
                        pid = peer.pid,
                        netns_cookie = peer.netns_cookie,
                        "registered"
                    );
                    Ok(true)
                }
                Op::Unregister => {
                    // Removes the pod identity and inbound capture with the policy.
                    self.forget(peer.netns_cookie)?;
                    tracing::info!(
                        pid = peer.pid,
                        netns_cookie = peer.netns_cookie,
                        "unregistered"
                    );
                    Ok(false)
                }
                Op::Status => Ok(self.lock().is_registered(peer.netns_cookie)?),
            }
        }
    }
}

/// Read one request and answer it. Whatever the client sends, it gets one
/// answer line (unless it is gone); its request is never echoed. The
/// caller is identified by `SO_PEERCRED`; identifying it (a thread that
/// enters its namespace) and the map writes run on the blocking pool.
async fn serve_one(registry: Arc<Registry>, mut stream: UnixStream) -> anyhow::Result<()> {
    let response = match read_request(&mut stream).await {
        Err(e) => refusal(e),
        Ok(line) => {
            let pid = stream.peer_cred().ok().and_then(|c| c.pid());
            tokio::task::spawn_blocking(move || {
                let peer = pid.context("SO_PEERCRED gave no pid").and_then(peer_of_pid);
                match (peer, Request::parse(&line)) {
                    (Ok(peer), Ok(req)) => registry.handle(&peer, req),
                    (Err(e), _) => refusal(format!("cannot identify the caller: {e:#}")),
                    (_, Err(e)) => refusal(format!("bad request ({} bytes): {e}", line.len())),
                }
            })
            .await
            .unwrap_or_else(|e| refusal(format!("internal error in the divert daemon: {e}")))
        }
    };
    answer(&mut stream, &response, proto::TIMEOUT).await
}

fn refusal(error: String) -> Response {
    Response {
        version: VERSION,
        error: Some(error),
        ..Response::default()
    }
}

/// Write `response` as one line, within `within`.
async fn answer(
    stream: &mut UnixStream,
    response: &Response,
    within: std::time::Duration,
) -> anyhow::Result<()> {
    let mut out = serde_json::to_string(response)?;
    out.push('\n');
    tokio::time::timeout(within, stream.write_all(out.as_bytes()))
        .await
        .context("writing the answer timed out")??;
    Ok(())
}

/// Read one request line: at most [`proto::MAX_REQUEST_BYTES`] before the
/// newline, all of it within [`proto::REQUEST_DEADLINE`]. The error says
/// which bound was hit, never what was sent.
async fn read_request(stream: &mut UnixStream) -> Result<String, String> {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) => return Err("the connection closed before a complete request line".into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading the request: {e}")),
            };
            let end = chunk[..n].iter().position(|&b| b == b'\n');
            buf.extend_from_slice(&chunk[..end.unwrap_or(n)]);
            if buf.len() > proto::MAX_REQUEST_BYTES {
                return Err(format!(
                    "request line longer than {} bytes",
                    proto::MAX_REQUEST_BYTES
                ));
            }
            if end.is_some() {
                return String::from_utf8(buf).map_err(|_| "the request is not UTF-8".to_string());
            }
        }
    };
    tokio::time::timeout(proto::REQUEST_DEADLINE, read)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no complete request line within {:?}",
                proto::REQUEST_DEADLINE
            ))
        })
}

/// At most this many registration connections are served at once; one
/// more is answered "busy" straight away. Each is done within
/// [`proto::REQUEST_DEADLINE`] plus the registration itself.
pub const MAX_CLIENTS: usize = 64;

/// The registration socket, bound and held: the lock that makes this
/// daemon the only one serving the path, and what readiness checks.
pub struct Endpoint {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's inode when bound: the path still leads here.
    ino: u64,
    /// `<path>.lock`, flock'd for as long as this daemon lives.
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Endpoint {
    /// Take the registration socket at `path` (its directory is created,
    /// mode 0660). Another daemon serving it is refused, whether it holds
    /// the lock file `<path>.lock` or merely answers on the socket; a socket
    /// file nobody serves (a daemon that was killed) is replaced.
    pub fn bind(path: &Path) -> anyhow::Result<Endpoint> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| {
                anyhow::anyhow!(
                    "another divert daemon serves {} (it holds {}): stop it first",
                    path.display(),
                    lock_path.display()
                )
            })?;
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "something already serves {} (holding no divert lock): stop it first",
                path.display()
            );
        }
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))?;
        let ino = fs::metadata(path)?.ino();
        Ok(Endpoint {
            listener,
            path: path.to_path_buf(),
            ino,
            _lock: lock,
        })
    }

    /// What tells whether registrations are served here.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            path: self.path.clone(),
            ino: self.ino,
        }
    }
}

/// Whether this daemon serves registrations: the socket file at its path is
/// the one it bound (not removed, not replaced).
#[derive(Clone, Debug)]
pub struct Readiness {
    pub path: PathBuf,
    pub ino: u64,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        fs::metadata(&self.path)
            .map(|m| m.ino() == self.ino)
            .unwrap_or(false)
    }

    /// Remove the socket file if it is still this daemon's.
    pub fn remove_socket(&self) {
        if self.ready() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Serve requests until `shutdown` is cancelled, a task per connection, at
/// most [`MAX_CLIENTS`] at once (one more is answered "busy" at once).
/// Then stop accepting and wait for the requests under way (each bounded
/// by [`proto::REQUEST_DEADLINE`] and its map writes), so none is cut off
/// half-served; the endpoint (the socket and its lock) is given back.
pub async fn serve(
    endpoint: Endpoint,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> anyhow::Result<Endpoint> {
    endpoint.listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(endpoint.listener.try_clone()?)
        .context("the registration socket")?;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let tasks = TaskTracker::new();
    loop {
        let mut stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the registration socket");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tasks.spawn(async move {
                let busy = refusal(format!(
                    "the divert daemon is serving {MAX_CLIENTS} requests already: try again"
                ));
                let _ = answer(&mut stream, &busy, std::time::Duration::from_millis(100)).await;
            });
            continue;
        };
        let registry = registry.clone();
        tasks.spawn(async move {
            if let Err(e) = serve_one(registry, stream).await {
                tracing::warn!(error = %format!("{e:#}"), "registration connection");
            }
            drop(permit);
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(endpoint)
}
