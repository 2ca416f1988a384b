//! Fixtures for divert's root-only kernel tests and its demo, following the
//! rules in shared/design.md: every test makes its own network namespaces and
//! child cgroups and removes them, pass or fail (guards with `Drop`); nothing
//! is attached to the machine's root cgroup or host namespace; traffic goes
//! only to loopback and to the addresses of namespaces made here.
//!
//! A [`Lab`] is two network namespaces joined by a veth pair:
//!
//! ```text
//!   client (A)  10.211.N.1/24  fd00:211:N::1/64  ── veth ──  peer (B)  10.211.N.2, .3/24  fd00:211:N::2, ::3/64
//! ```
//!
//! with a cgroup subtree `<cgroup2>/divert-test-<pid>-<N>/{workload,proxy,plain}`.

use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr, TcpStream},
    os::{
        fd::{AsFd, AsRawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

pub mod bench;
pub mod cases;
pub mod fake_api;
pub mod goldens;
pub mod node;
pub mod podman;
pub mod rig;

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// The istio-iptables command line Istio's sidecar injector writes for
/// `istio-init` (its defaults).
pub const INJECTOR: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

/// [`INJECTOR`] with some flags' values replaced, and flags it does not
/// have appended: `injector_with(&[("-i", "10.0.0.0/8"), ("-o", "3306")])`.
pub fn injector_with(overrides: &[(&str, &str)]) -> Vec<String> {
    let mut args: Vec<String> = INJECTOR.iter().map(|s| s.to_string()).collect();
    for (flag, value) in overrides {
        match args.iter().position(|a| a == flag) {
            Some(i) => args[i + 1] = value.to_string(),
            None => args.extend([flag.to_string(), value.to_string()]),
        }
    }
    args
}

/// Skip (return early with a message) unless running as root: kernel tests
/// need CAP_BPF, CAP_NET_ADMIN and cgroup writes.
#[macro_export]
macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (run `cargo xtask test`)");
            return;
        }
    };
}

/// Path of a binary built next to the test executable (`target/<profile>/NAME`).
pub fn sibling_bin(name: &str) -> PathBuf {
    let env_key = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(env_key) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The `divert` binary under test.
pub fn divert_bin() -> PathBuf {
    sibling_bin("divert")
}

/// The test helper binary (proxy, servers, client).
pub fn testkit_bin() -> PathBuf {
    sibling_bin("divert-testkit")
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawning {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Run `cmd` with `input` on its standard input, collecting its status,
/// standard output and standard error.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    // A child that exits without reading it all closes the pipe: what it
    // answered is what counts.
    let _ = child.stdin.take().expect("piped").write_all(input);
    child.wait_with_output().expect("waiting for the child")
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        let _ = run("ip", &["netns", "del", name]);
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS…`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn file(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))
    }

    /// Run `f` on a thread that has entered this namespace (the calling
    /// thread and the rest of the process stay where they are).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = self.file()?;
        thread::spawn(move || -> Result<T> {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A cgroup v2 directory this test made, with everything in it killed and
/// removed on drop (children first).
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> Result<Self> {
        if path.exists() {
            let _ = divert::cgroup::remove_cgroup(&path);
        }
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn child(&self, name: &str) -> Result<Cgroup> {
        Cgroup::create(self.path.join(name))
    }

    pub fn file(&self) -> Result<File> {
        Ok(divert::cgroup::open(&self.path)?)
    }

    pub fn procs(&self) -> Result<File> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .context("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(rd) = fs::read_dir(&self.path) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let _ = divert::cgroup::remove_cgroup(&e.path());
                }
            }
        }
        let _ = divert::cgroup::remove_cgroup(&self.path);
    }
}

/// Where and as whom a spawned process runs.
#[derive(Clone, Copy, Debug)]
pub struct Placement<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Cgroup,
    /// Real and effective UID/GID to switch to, if any.
    pub ids: Option<(u32, u32)>,
}

/// A `Command` that, between fork and exec, enters the placement's network
/// namespace and cgroup and then drops to its IDs. The cgroup tree stays
/// visible (no `ip netns exec`, which remounts /sys).
pub fn command_in(
    place: Placement<'_>,
    program: impl AsRef<OsStr>,
) -> Result<(Command, Vec<File>)> {
    let ns = place.netns.file()?;
    let procs = place.cgroup.procs()?;
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
    let ids = place.ids;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::setns(ns_fd, libc::CLONE_NEWNET))?;
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = ids {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(gid, gid, gid))?;
                check(libc::setresuid(uid, uid, uid))?;
            }
            Ok(())
        });
    }
    Ok((cmd, vec![ns, procs]))
}

/// A background process killed and reaped on drop.
pub struct Daemon {
    pub child: Child,
    pub name: String,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Daemon {
            child,
            name: name.to_string(),
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until `addr` accepts TCP connections, trying from inside `ns`.
pub fn wait_listening(ns: &Netns, addrs: &[SocketAddr], within: Duration) -> Result<()> {
    let addrs = addrs.to_vec();
    let ok = ns.enter(move || {
        let deadline = Instant::now() + within;
        'outer: loop {
            for a in &addrs {
                if TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err() {
                    if Instant::now() > deadline {
                        return Err(format!("nothing listens on {a}"));
                    }
                    thread::sleep(Duration::from_millis(20));
                    continue 'outer;
                }
            }
            return Ok(());
        }
    })?;
    ok.map_err(anyhow::Error::msg)
}

/// The addresses of lab number N: 10.211.N.0/24 and fd00:211:N::/64, the
/// client namespace at host 1, the peer at 2 and 3. The connect cases are
/// written over these, so they also run without a [`Lab`] (no root).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub n: u32,
}

impl Addrs {
    pub fn v4(&self, host: u8) -> IpAddr {
        format!("10.211.{}.{host}", self.n).parse().unwrap()
    }

    pub fn v6(&self, host: u8) -> IpAddr {
        format!("fd00:211:{}::{host}", self.n).parse().unwrap()
    }
}

impl From<&Lab> for Addrs {
    fn from(lab: &Lab) -> Addrs {
        Addrs { n: lab.n }
    }
}

/// Two namespaces joined by a veth pair, and a cgroup subtree, all removed
/// on drop.
pub struct Lab {
    /// Index N of this lab: its addresses are 10.211.N.0/24 and fd00:211:N::/64.
    pub n: u32,
    // Field order is drop order: cgroups (killing their processes) first.
    pub workload: Cgroup,
    pub proxy: Cgroup,
    pub plain: Cgroup,
    pub root: Cgroup,
    pub client: Netns,
    pub peer: Netns,
}

impl Lab {
    pub fn new() -> Result<Self> {
        let n = (std::process::id() + NEXT_LAB.fetch_add(1, Ordering::SeqCst)) % 200 + 1;
        let tag = format!("{}-{n}", std::process::id());
        let client = Netns::create(&format!("divert-test-{tag}-a"))?;
        let peer = Netns::create(&format!("divert-test-{tag}-b"))?;
        let (va, vb) = (format!("dva{n}"), format!("dvb{n}"));
        client.ip(&[
            "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &peer.name,
        ])?;
        client.ip(&["addr", "add", &format!("10.211.{n}.1/24"), "dev", &va])?;
        client.ip(&[
            "addr",
            "add",
            &format!("fd00:211:{n}::1/64"),
            "dev",
            &va,
            "nodad",
        ])?;
        client.ip(&["link", "set", &va, "up"])?;
        peer.ip(&["addr", "add", &format!("10.211.{n}.2/24"), "dev", &vb])?;
        peer.ip(&["addr", "add", &format!("10.211.{n}.3/24"), "dev", &vb])?;
        peer.ip(&[
            "addr",
            "add",
            &format!("fd00:211:{n}::2/64"),
            "dev",
            &vb,
            "nodad",
        ])?;
        peer.ip(&[
            "addr",
            "add",
            &format!("fd00:211:{n}::3/64"),
            "dev",
            &vb,
            "nodad",
        ])?;
        peer.ip(&["link", "set", &vb, "up"])?;
        let cg2 = divert::cgroup::cgroup2_mount()?;
        let root = Cgroup::create(cg2.join(format!("divert-test-{tag}")))?;
        let workload = root.child("workload")?;
        let proxy = root.child("proxy")?;
        let plain = root.child("plain")?;
        Ok(Lab {
            n,
            workload,
            proxy,
            plain,
            root,
            client,
            peer,
        })
    }

    /// The peer's first address (10.211.N.2) or one of the others.
    pub fn v4(&self, host: u8) -> IpAddr {
        Addrs::from(self).v4(host)
    }

    pub fn v6(&self, host: u8) -> IpAddr {
        Addrs::from(self).v6(host)
    }

    /// Placement in the client namespace.
    pub fn in_client<'a>(&'a self, cgroup: &'a Cgroup, ids: Option<(u32, u32)>) -> Placement<'a> {
        Placement {
            netns: &self.client,
            cgroup,
            ids,
        }
    }

    /// Start the testkit servers (every address, ports 80 8080 5432 15008)
    /// in the peer and in the client (for local destinations), and the
    /// testkit proxy on 127.0.0.1/::1 ports 15001 and 15006 in the proxy
    /// cgroup. Returns once all of them listen.
    pub fn start_peers(&self) -> Result<Vec<Daemon>> {
        self.start_peers_with_proxy(None)
    }

    /// [`Lab::start_peers`] with the proxy run as `proxy_ids` (UID, GID),
    /// as Istio's runs as 1337.
    pub fn start_peers_with_proxy(&self, proxy_ids: Option<(u32, u32)>) -> Result<Vec<Daemon>> {
        let kit = testkit_bin();
        let mut daemons = Vec::new();
        let ports = ["80", "8080", "5432", "15008"];
        for (ns, cg, name) in [
            (&self.peer, &self.plain, "peer server"),
            (&self.client, &self.plain, "local server"),
        ] {
            let (mut cmd, _keep) = command_in(
                Placement {
                    netns: ns,
                    cgroup: cg,
                    ids: None,
                },
                &kit,
            )?;
            cmd.arg("server").args(ports);
            daemons.push(Daemon::spawn(name, cmd)?);
        }
        let (mut cmd, _keep) = command_in(self.in_client(&self.proxy, proxy_ids), &kit)?;
        cmd.args([
            "proxy",
            "127.0.0.1:15001",
            "[::1]:15001",
            "127.0.0.1:15006",
            "[::1]:15006",
        ]);
        daemons.push(Daemon::spawn("proxy", cmd)?);
        let mut want: Vec<SocketAddr> = vec![
            "127.0.0.1:15001".parse()?,
            "[::1]:15001".parse()?,
            "127.0.0.1:15006".parse()?,
            "[::1]:15006".parse()?,
        ];
        for p in ports {
            want.push(SocketAddr::new(self.v4(2), p.parse()?));
            want.push(SocketAddr::new(self.v6(2), p.parse()?));
            want.push(SocketAddr::new(self.v4(1), p.parse()?));
        }
        wait_listening(&self.client, &want, Duration::from_secs(10))?;
        Ok(daemons)
    }

    /// Dial `dst` from the workload cgroup of the client namespace as
    /// `uid`/`gid` with the testkit client; `mapped` dials an IPv4
    /// destination as `::ffff:a.b.c.d` through an AF_INET6 socket.
    /// Returns its one line of output: who answered.
    pub fn dial(&self, dst: SocketAddr, uid: u32, gid: u32, mapped: bool) -> Result<String> {
        let opts: &[&str] = if mapped { &["--mapped"] } else { &[] };
        self.dial_with(&self.workload, dst, Some((uid, gid)), opts)
    }

    /// Dial `dst` with the testkit client from `cgroup` of the client
    /// namespace, as `ids` (or root), with client options (`--bind ADDR`,
    /// `--close rst|last|now`, `--mptcp`, `--mapped`; see divert-testkit).
    /// Returns its one line of output.
    pub fn dial_with(
        &self,
        cgroup: &Cgroup,
        dst: SocketAddr,
        ids: Option<(u32, u32)>,
        opts: &[&str],
    ) -> Result<String> {
        let (mut cmd, _keep) = command_in(self.in_client(cgroup, ids), testkit_bin())?;
        cmd.arg("client").arg(dst.to_string()).args(opts);
        let out: Output = cmd.output().context("running the testkit client")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            bail!(
                "client to {dst} as {ids:?} {opts:?} failed: {text} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(text)
    }

    /// Dial `dst` (in the client namespace) with the testkit client from
    /// the peer namespace: its one line, or `Err` with why it failed.
    pub fn dial_in(&self, dst: SocketAddr) -> std::result::Result<String, String> {
        let (mut cmd, _keep) = command_in(
            Placement {
                netns: &self.peer,
                cgroup: &self.plain,
                ids: None,
            },
            testkit_bin(),
        )
        .map_err(|e| format!("{e:#}"))?;
        let out = cmd
            .arg("client")
            .arg(dst.to_string())
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "{text} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Start the DNS servers of the DNS cases ([`cases::dns_matrix`]): the
    /// peer's nameservers on its addresses, port 53 (answering
    /// [`cases::NAMESERVER_ANSWER`]); the client's loopback nameserver
    /// ([`cases::LOCAL_NAMESERVER`]:53); and the DNS proxy on 127.0.0.1 and
    /// ::1 port 15053 in the proxy's cgroup as UID 1337, as istio-agent
    /// runs (the iptables backend's conntrack zones match the proxy's
    /// UID). Returns once all of them listen.
    pub fn start_dns_servers(&self) -> Result<Vec<Daemon>> {
        let kit = testkit_bin();
        let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
        let peer = [
            at(self.v4(2), 53),
            at(self.v4(3), 53),
            at(self.v6(2), 53),
            at(self.v6(3), 53),
        ];
        let local = [at(cases::LOCAL_NAMESERVER.parse()?, 53)];
        let proxy: [SocketAddr; 2] = ["127.0.0.1:15053".parse()?, "[::1]:15053".parse()?];
        let mut daemons = Vec::new();
        for (place, answer, addrs, name) in [
            (
                Placement {
                    netns: &self.peer,
                    cgroup: &self.plain,
                    ids: None,
                },
                cases::NAMESERVER_ANSWER,
                &peer[..],
                "nameservers",
            ),
            (
                self.in_client(&self.plain, None),
                cases::LOCAL_NAMESERVER_ANSWER,
                &local[..],
                "loopback nameserver",
            ),
            (
                self.in_client(&self.proxy, Some((1337, 1337))),
                cases::PROXY_ANSWER,
                &proxy[..],
                "DNS proxy",
            ),
        ] {
            let (mut cmd, _keep) = command_in(place, &kit)?;
            cmd.arg("dns-server")
                .arg(answer)
                .args(addrs.iter().map(SocketAddr::to_string));
            daemons.push(Daemon::spawn(name, cmd)?);
        }
        wait_listening(&self.peer, &peer, Duration::from_secs(10))?;
        wait_listening(&self.client, &local, Duration::from_secs(10))?;
        wait_listening(&self.client, &proxy, Duration::from_secs(10))?;
        Ok(daemons)
    }

    /// Ask `case`'s query with the testkit `dns` client from the workload
    /// cgroup as the case's UID: its one line, or `error …`.
    pub fn ask_dns(&self, case: &cases::DnsCase) -> Result<String> {
        let (mut cmd, _keep) = command_in(
            self.in_client(&self.workload, Some((case.uid, case.uid))),
            testkit_bin(),
        )?;
        cmd.args(["dns", "example.test", &case.server.to_string()])
            .args(case.ask.opts());
        if case.mapped {
            cmd.arg("--mapped");
        }
        let out = cmd.output().context("running the testkit dns client")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The client namespace's cookie and addresses.
    pub fn client_identity(&self) -> Result<(u64, Vec<IpAddr>)> {
        self.client.enter(|| -> Result<(u64, Vec<IpAddr>)> {
            Ok((
                divert::netns::current_cookie()?,
                divert::netns::local_addresses()?,
            ))
        })?
    }
}

/// Read lines from a file until one contains `needle` (or time runs out).
pub fn wait_for_line(path: &Path, needle: &str, within: Duration) -> Result<String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(f) = File::open(path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if line.contains(needle) {
                    return Ok(line);
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no line with {needle:?} in {} after {within:?}",
                path.display()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// squid in `intercept` mode on 127.0.0.1:15001 (outbound) and
/// 127.0.0.1:15006 (inbound) in the lab's client namespace and proxy
/// cgroup: a real transparent proxy that asks `SO_ORIGINAL_DST` for every
/// intercepted connection. Runs as the `proxy`
/// user (Debian's squid), whose UID divert must be told with `-u`.
pub struct Squid {
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
    /// squid's access log: one line per request.
    pub access_log: PathBuf,
    /// The UID squid's workers run as.
    pub uid: u32,
}

impl Squid {
    pub fn start(lab: &Lab) -> Result<Squid> {
        let dir = tempfile::Builder::new().prefix("divert-squid-").tempdir()?;
        // squid drops to the proxy user, which must write its logs here.
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        let d = dir.path().display();
        let access_log = dir.path().join("access.log");
        let conf = dir.path().join("squid.conf");
        fs::write(
            &conf,
            format!(
                "http_port 127.0.0.1:3128\n\
                 http_port 127.0.0.1:15001 intercept\n\
                 http_port 127.0.0.1:15006 intercept\n\
                 http_access allow all\n\
                 cache deny all\n\
                 access_log stdio:{d}/access.log squid\n\
                 cache_log {d}/cache.log\n\
                 cache_store_log none\n\
                 pid_filename none\n\
                 coredump_dir {d}\n\
                 netdb_filename none\n\
                 cache_effective_user proxy\n\
                 shutdown_lifetime 0 seconds\n\
                 "
            ),
        )?;
        let uid = nix::unistd::User::from_name("proxy")?
            .context("no 'proxy' user: is squid installed (cargo xtask setup)?")?
            .uid
            .as_raw();
        let (mut cmd, _keep) = command_in(lab.in_client(&lab.proxy, None), "squid")?;
        cmd.args(["-N", "-f"]).arg(&conf);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let daemon = Daemon::spawn("squid", cmd)?;
        // Probe the forward-proxy port, never the intercept one: squid 5
        // closes an intercept listener for good after a connection whose
        // original destination it cannot look up (and a probe from outside
        // the diverted cgroup has none). Both ports open together.
        wait_listening(
            &lab.client,
            &["127.0.0.1:3128".parse()?],
            Duration::from_secs(20),
        )
        .with_context(|| {
            format!(
                "squid did not start; see {}",
                dir.path().join("cache.log").display()
            )
        })?;
        Ok(Squid {
            daemon,
            dir,
            access_log,
            uid,
        })
    }
}

/// The testkit HTTP server in the lab's peer namespace at `addr`, answering
/// every request with `body`.
pub fn start_http(lab: &Lab, addr: SocketAddr, body: &str) -> Result<Daemon> {
    start_http_in(
        lab,
        Placement {
            netns: &lab.peer,
            cgroup: &lab.plain,
            ids: None,
        },
        addr,
        body,
    )
}

/// The testkit HTTP server placed at `place` (in one of `lab`'s
/// namespaces), listening on `addr` (reachable from the client namespace).
pub fn start_http_in(
    lab: &Lab,
    place: Placement<'_>,
    addr: SocketAddr,
    body: &str,
) -> Result<Daemon> {
    let (mut cmd, _keep) = command_in(place, testkit_bin())?;
    cmd.args(["http", &addr.to_string(), body]);
    let d = Daemon::spawn("http server", cmd)?;
    wait_listening(&lab.client, &[addr], Duration::from_secs(10))?;
    Ok(d)
}
