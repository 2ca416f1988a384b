//! A node with `divert daemon` running for a test: a [`Lab`], a private
//! bpffs mount, the daemon attached at the lab's cgroup root, and helpers to
//! run `divert init`, dial, and read the daemon's HTTP endpoint.

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use divert::{ebpf::pinned, policy::Action};

use crate::{cases::expected, command_in, divert_bin, Daemon, Lab, Netns, Placement};

/// A temporary directory the daemon mounts bpffs on; on drop, everything
/// pinned there is removed and the mount is lazily unmounted.
pub struct Bpffs {
    pub dir: tempfile::TempDir,
}

impl Bpffs {
    pub fn tempdir() -> Bpffs {
        Bpffs {
            dir: tempfile::Builder::new()
                .prefix("divert-bpffs-")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("bpf")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = pinned::uninstall(&self.path());
        let _ = nix::mount::umount2(&self.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

pub struct Setup {
    pub lab: Lab,
    pub bpffs: Bpffs,
    pub socket: PathBuf,
    _peers: Vec<Daemon>,
    starts: std::cell::Cell<u32>,
    /// Where the last started daemon serves /metrics.
    metrics: std::cell::Cell<Option<SocketAddr>>,
}

impl Setup {
    pub fn start() -> Setup {
        Self::start_with_proxy(None)
    }

    /// [`Setup::start`] with the lab's proxy run as `proxy_ids` (UID, GID).
    pub fn start_with_proxy(proxy_ids: Option<(u32, u32)>) -> Setup {
        let lab = Lab::new().expect("lab");
        let peers = lab.start_peers_with_proxy(proxy_ids).expect("peers");
        let bpffs = Bpffs::tempdir();
        let socket = bpffs.dir.path().join("divert.sock");
        Setup {
            lab,
            bpffs,
            socket,
            _peers: peers,
            starts: Default::default(),
            metrics: Default::default(),
        }
    }

    /// Start `divert daemon` (host namespace, attached at the lab's cgroup
    /// root, metrics on a free loopback port) and wait until it is ready.
    pub fn daemon(&self) -> Daemon {
        self.daemon_with(&[])
    }

    pub fn daemon_with(&self, extra: &[&str]) -> Daemon {
        self.daemon_env(extra, &[])
    }

    /// [`Setup::daemon`] with extra flags and environment variables.
    pub fn daemon_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = self.daemon_command(extra);
        cmd.envs(env.iter().copied());
        self.spawn_daemon(cmd)
    }

    /// [`Setup::daemon_with`] of the divert binary `bin` (another build).
    pub fn daemon_of(&self, bin: &std::path::Path, extra: &[&str]) -> Daemon {
        let mut cmd = self.daemon_command(extra);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_os_string()).collect();
        cmd = Command::new(bin);
        cmd.args(args);
        self.spawn_daemon(cmd)
    }

    /// Start `cmd` (a `divert daemon` of this setup), its log in the
    /// bpffs' directory, and wait until it serves.
    fn spawn_daemon(&self, mut cmd: Command) -> Daemon {
        let _ = std::fs::remove_file(&self.socket);
        self.starts.set(self.starts.get() + 1);
        let log = self
            .bpffs
            .dir
            .path()
            .join(format!("daemon-{}.log", self.starts.get()));
        cmd.stderr(std::fs::File::create(&log).unwrap());
        let mut d = Daemon::spawn("divert daemon", cmd).expect("spawn the daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .find_map(|l| l.split_once("metrics on http://").map(|(_, a)| a))
                .and_then(|l| l.split('/').next())
            {
                self.metrics.set(Some(addr.parse().unwrap()));
                break;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("divert daemon exited: {status}: {text}");
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready after 20 s: {text}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// `divert daemon` for this setup (its cgroup root, bpffs and socket)
    /// with `extra` flags, not started: see [`daemon_command`].
    pub fn daemon_command(&self, extra: &[&str]) -> Command {
        daemon_command(&self.lab, &self.bpffs, &self.socket, extra)
    }

    /// The log of the last started daemon.
    pub fn daemon_log(&self) -> String {
        let log = self
            .bpffs
            .dir
            .path()
            .join(format!("daemon-{}.log", self.starts.get()));
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// Where the last started daemon serves its HTTP endpoint.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics.get().expect("a daemon was started")
    }

    /// GET `path` from the daemon's HTTP endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics.get().expect("a daemon was started"), path)
    }

    /// `divert init ARGS…` from the lab's client namespace.
    pub fn init(&self, args: &[&str]) -> std::process::Output {
        self.init_with(&self.lab.client, &self.socket, args)
    }

    /// `divert init --backend ebpf --daemon-socket SOCKET ARGS…` from
    /// `netns`, in the lab's plain cgroup.
    pub fn init_with(
        &self,
        netns: &Netns,
        socket: &std::path::Path,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> std::process::Output {
        let (mut cmd, _keep) = command_in(
            Placement {
                netns,
                cgroup: &self.lab.plain,
                ids: None,
            },
            divert_bin(),
        )
        .unwrap();
        cmd.args(["init", "--backend", "ebpf", "--daemon-socket"])
            .arg(socket)
            .args(args);
        cmd.output().expect("divert init")
    }

    /// A network namespace of the test's own besides the lab's (gone when
    /// dropped), with its cookie, and `divert init ARGS…` run in it (in
    /// the lab's plain cgroup).
    pub fn init_in_new_netns(
        &self,
        tag: &str,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> (Netns, u64, std::process::Output) {
        let ns = Netns::create(&format!("divert-test-{}-{tag}", std::process::id())).unwrap();
        let cookie = ns.enter(divert::netns::current_cookie).unwrap().unwrap();
        let out = self.init_with(&ns, &self.socket, args);
        (ns, cookie, out)
    }

    pub fn dial(&self) -> (SocketAddr, String) {
        let dst = SocketAddr::new(self.lab.v4(2), 80);
        (dst, self.lab.dial(dst, 1000, 1000, false).expect("dial"))
    }

    pub fn assert_redirected(&self, when: &str) {
        let (dst, got) = self.dial();
        assert_eq!(got, expected(Action::Redirect(15001), dst, false), "{when}");
    }

    /// Whether the namespace with `cookie` has a policy in this node's
    /// pinned maps.
    pub fn is_registered(&self, cookie: u64) -> bool {
        pinned::open_maps(&self.bpffs.path())
            .unwrap()
            .registered_cookies()
            .unwrap()
            .contains(&cookie)
    }

    pub fn assert_attached_once(&self, when: &str) {
        let counts = pinned::attachment_counts(&self.lab.root.path).unwrap();
        assert!(
            counts.iter().all(|&(_, n, ours)| n == ours),
            "{when}: {counts:?}"
        );
    }
}

/// `divert daemon` at `lab`'s cgroup root (unless `extra` names
/// `--cgroup-root`), pins under `bpffs`, serving `socket`, sweeping every
/// 0.5 s and serving metrics on a free loopback port (unless `extra` sets
/// those), with `extra` flags; not started.
pub fn daemon_command(
    lab: &Lab,
    bpffs: &Bpffs,
    socket: &std::path::Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(divert_bin());
    cmd.arg("daemon");
    for (flag, value) in [("--gc-interval", "0.5"), ("--metrics-addr", "127.0.0.1:0")] {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    if !extra.contains(&"--cgroup-root") {
        cmd.arg("--cgroup-root").arg(&lab.root.path);
    }
    cmd.arg("--bpffs-dir")
        .arg(bpffs.path())
        .arg("--socket")
        .arg(socket)
        .args(extra);
    cmd
}

/// `GET path` of the daemon's HTTP endpoint at `addr`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// [`http_get`], an error where nothing answers (or the answer breaks off).
pub fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut all = String::new();
    std::io::Read::read_to_string(&mut s, &mut all)?;
    let status = all
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = all
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Lossy UTF-8 of a process's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
