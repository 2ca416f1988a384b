//! The whole pod: inbound capture and DNS capture, measured side by side
//! for no capture (`floor`), divert's iptables rules and divert's eBPF
//! programs, each in a fresh pair of namespaces:
//!
//! | backend    | inbound: the peer dials 10.213.0.1:8080 and …        | DNS: the pod asks 10.213.0.2:53 and …        |
//! |------------|-------------------------------------------------------|----------------------------------------------|
//! | `floor`    | the application accepts on 8080 itself                | asks 127.0.0.1:15053 itself                  |
//! | `iptables` | `ISTIO_INBOUND` REDIRECTs it to the proxy on 15006    | `ISTIO_OUTPUT_DNS` REDIRECTs it to 15053     |
//! | `ebpf`     | socket lookup hands it to the proxy on 15006          | connect/recvmsg send it to 15053 and back    |
//!
//! The policy is istio-iptables' `-b '*' -i ''` with DNS capture of the
//! nameserver 10.213.0.2 (nothing answers there: only a captured query is
//! answered). Inbound latency is `connect()` start in the peer to the
//! listener's `accept()`; a DNS query is what glibc does for one lookup
//! (a new UDP socket, `connect`, `send`, `recvfrom`, close), timed from the
//! socket's creation to the answer, whose source must be the server asked.
//! Conntrack entries are counted in the pod's namespace. Nothing here
//! asserts on time.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use anyhow::Result;
use divert::{
    ebpf::{Interceptor, RegisteredBy},
    iptables::{self, Family},
    policy::{DnsCapture, InboundPorts, IncludeRanges, Nameserver, Policy},
};
use serde::{Deserialize, Serialize};

use super::{
    bench_exe, cpus, median_f64,
    peer::{Command, Reply},
    percentile, say, Backend, Client, Settings, CLIENT_IDS, CONNTRACK_FIRST_PORT, PROXY_IDS,
};
use crate::{command_in, Cgroup, Daemon, Netns, Placement};

/// The pod's address, which the peer dials.
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// The peer's address, and the pod's nameserver (nothing answers on 53).
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
/// The application port the peer dials.
pub const APP: SocketAddrV4 = SocketAddrV4::new(POD, 8080);
/// The inbound capture port (`-z`).
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
/// The nameserver the pod asks.
pub const NAMESERVER: SocketAddrV4 = SocketAddrV4::new(PEER, 53);
/// Where istio-agent's DNS proxy listens.
pub const DNS_PROXY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053);

/// One backend's inbound and DNS figures: a row of `run.json`'s `pod`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodRow {
    pub backend: Backend,
    /// Inbound connect latency, the peer's `connect()` to the listener's
    /// `accept()`, ns.
    pub inbound_p50_ns: u64,
    pub inbound_p99_ns: u64,
    /// Inbound connections per second (sequential), median over batches.
    pub inbound_connections_per_sec: f64,
    /// The listener's `SO_ORIGINAL_DST` (on the floor it fails: nothing
    /// was captured), ns.
    pub inbound_so_original_dst_p50_ns: u64,
    /// Conntrack entries in the pod's namespace after the conntrack batch
    /// of inbound connections, scaled to 10,000.
    pub inbound_conntrack_per_10k: u64,
    /// One DNS lookup as glibc makes it, socket to answer, ns.
    pub dns_p50_ns: u64,
    pub dns_p99_ns: u64,
    /// Conntrack entries after the conntrack batch of DNS lookups, scaled
    /// to 10,000.
    pub dns_conntrack_per_10k: u64,
    /// Samples behind each latency figure.
    pub samples: usize,
}

/// The policy of the diverting backends: inbound capture of every port,
/// no outbound ranges, DNS capture of [`NAMESERVER`].
pub fn policy() -> Policy {
    Policy {
        include_ranges: IncludeRanges::List(vec![]),
        inbound_ports: InboundPorts::All,
        dns: Some(DnsCapture {
            capture_all: false,
            servers_v4: vec![Nameserver::from(std::net::IpAddr::V4(PEER))],
            servers_v6: vec![],
        }),
        ..Policy::default()
    }
}

/// One backend's pod and peer with their processes running.
struct PodTwin {
    backend: Backend,
    inbound: Client,
    dns: Client,
    _servers: Vec<Daemon>,
    pod: Netns,
    _peer: Netns,
    registered: Option<(u64, Policy)>,
    inbound_ns: Vec<u64>,
    sockopt_ns: Vec<u64>,
    cps: Vec<f64>,
    dns_ns: Vec<u64>,
    inbound_conntrack: u64,
    dns_conntrack: u64,
}

impl PodTwin {
    fn start(
        backend: Backend,
        workload: &Cgroup,
        proxy: &Cgroup,
        plain: &Cgroup,
        interceptor: &mut Interceptor,
    ) -> Result<PodTwin> {
        let tag = format!("divert-bench-{}-{}", std::process::id(), backend.name());
        let pod = Netns::create(&format!("{tag}-pod"))?;
        let peer = Netns::create(&format!("{tag}-peer"))?;
        pod.ip(&[
            "link", "add", "dvp0", "type", "veth", "peer", "name", "dvp1", "netns", &peer.name,
        ])?;
        pod.ip(&["addr", "add", &format!("{POD}/24"), "dev", "dvp0"])?;
        pod.ip(&["link", "set", "dvp0", "up"])?;
        peer.ip(&["addr", "add", &format!("{PEER}/24"), "dev", "dvp1"])?;
        peer.ip(&["link", "set", "dvp1", "up"])?;
        peer.enter(|| {
            fs::write(
                "/proc/sys/net/ipv4/ip_local_port_range",
                format!("16384 {}", CONNTRACK_FIRST_PORT - 1),
            )
        })??;
        let mut registered = None;
        match backend {
            Backend::Floor => {}
            Backend::Iptables => {
                let mut p = policy();
                p.local_addrs = vec![POD.into()];
                pod.enter(move || -> Result<()> {
                    let set = iptables::render(&p, &Default::default(), Family::V4);
                    iptables::apply(&[(iptables::detect(Family::V4)?, set)])
                })??;
            }
            Backend::Ebpf => {
                let mut p = policy();
                let (cookie, local) = pod.enter(|| -> Result<_> {
                    Ok((
                        divert::netns::current_cookie()?,
                        divert::netns::local_addresses()?,
                    ))
                })??;
                p.local_addrs = local;
                interceptor.register(cookie, &p, RegisteredBy::Run)?;
                interceptor.attach_netns(pod.file()?)?;
                registered = Some((cookie, p));
            }
        }
        let (client_cpu, proxy_cpu) = cpus();
        let ebpf = backend == Backend::Ebpf;
        let (workload_cg, proxy_cg) = if ebpf {
            (workload, proxy)
        } else {
            (plain, plain)
        };
        // The inbound listener: the proxy's on 15006, or on the floor the
        // application's own on 8080. Started after the policy, as the proxy
        // starts after istio-init: socket lookup records it as it listens.
        let listen_port = if backend == Backend::Floor {
            APP.port()
        } else {
            INBOUND_CAPTURE_PORT
        };
        let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, listen_port));
        let exe = bench_exe()?;
        let mut servers = Vec::new();
        for (role, addr) in [("proxy", listen), ("dns-proxy", SocketAddr::V4(DNS_PROXY))] {
            let (mut cmd, _keep) = command_in(
                Placement {
                    netns: &pod,
                    cgroup: proxy_cg,
                    ids: Some(PROXY_IDS),
                },
                &exe,
            )?;
            cmd.args([role, &addr.to_string()]);
            if let Some(c) = proxy_cpu {
                cmd.args(["--cpu", &c.to_string()]);
            }
            servers.push(Daemon::spawn(&format!("{} {role}", backend.name()), cmd)?);
        }
        crate::wait_listening(
            &pod,
            &[SocketAddr::from((Ipv4Addr::LOCALHOST, listen_port))],
            std::time::Duration::from_secs(10),
        )?;
        let inbound = Client::spawn(
            Placement {
                netns: &peer,
                cgroup: plain,
                ids: Some(CLIENT_IDS),
            },
            client_cpu,
            backend,
            format!("{} inbound client", backend.name()),
        )?;
        let dns = Client::spawn(
            Placement {
                netns: &pod,
                cgroup: workload_cg,
                ids: Some(CLIENT_IDS),
            },
            client_cpu,
            backend,
            format!("{} DNS client", backend.name()),
        )?;
        Ok(PodTwin {
            backend,
            inbound,
            dns,
            _servers: servers,
            pod,
            _peer: peer,
            registered,
            inbound_ns: Vec::new(),
            sockopt_ns: Vec::new(),
            cps: Vec::new(),
            dns_ns: Vec::new(),
            inbound_conntrack: 0,
            dns_conntrack: 0,
        })
    }

    fn inbound_batch(
        &mut self,
        count: usize,
        reset: bool,
        first_port: Option<u16>,
    ) -> Result<Reply> {
        let expect_original = (self.backend != Backend::Floor).then_some(APP);
        self.inbound.call(&Command::Connect {
            dst: APP,
            count,
            reset,
            first_port,
            expect_original,
        })
    }

    fn dns_batch(&mut self, count: usize) -> Result<Reply> {
        let (dst, expect_from) = match self.backend {
            Backend::Floor => (DNS_PROXY, DNS_PROXY),
            _ => (NAMESERVER, NAMESERVER),
        };
        self.dns.call(&Command::Dns {
            dst,
            count,
            expect_from,
        })
    }

    fn conntrack_count(&self) -> Result<u64> {
        let text = self.pod.enter(|| {
            fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count").unwrap_or_default()
        })?;
        Ok(text.trim().parse().unwrap_or(0))
    }

    fn row(&mut self, settings: &Settings) -> PodRow {
        self.inbound_ns.sort_unstable();
        self.sockopt_ns.sort_unstable();
        self.dns_ns.sort_unstable();
        let per_10k = |n: u64| n * 10_000 / settings.conntrack_connections.max(1) as u64;
        PodRow {
            backend: self.backend,
            inbound_p50_ns: percentile(&self.inbound_ns, 0.50),
            inbound_p99_ns: percentile(&self.inbound_ns, 0.99),
            inbound_connections_per_sec: median_f64(self.cps.clone()),
            inbound_so_original_dst_p50_ns: percentile(&self.sockopt_ns, 0.50),
            inbound_conntrack_per_10k: per_10k(self.inbound_conntrack),
            dns_p50_ns: percentile(&self.dns_ns, 0.50),
            dns_p99_ns: percentile(&self.dns_ns, 0.99),
            dns_conntrack_per_10k: per_10k(self.dns_conntrack),
            samples: self.inbound_ns.len(),
        }
    }
}

/// Measure inbound and DNS capture for the three backends, batches taking
/// turns as in [`super::measure`]; one row per backend.
pub fn measure(settings: &Settings) -> Result<Vec<PodRow>> {
    let cg2 = divert::cgroup::cgroup2_mount()?;
    let root = Cgroup::create(cg2.join(format!("divert-bench-pod-{}", std::process::id())))?;
    let workload = root.child("workload")?;
    let proxy = root.child("proxy")?;
    let plain = root.child("plain")?;
    let mut interceptor = Interceptor::load()?;
    interceptor.attach_workload(workload.file()?)?;
    interceptor.attach_proxy(proxy.file()?)?;
    say("the whole pod: inbound and DNS capture, setting up");
    let mut twins = Vec::new();
    for b in Backend::ALL {
        twins.push(PodTwin::start(
            b,
            &workload,
            &proxy,
            &plain,
            &mut interceptor,
        )?);
    }
    say(format!(
        "the whole pod: {} inbound connections and {} DNS lookups each for conntrack",
        settings.conntrack_connections, settings.conntrack_connections
    ));
    for t in &mut twins {
        let before = t.conntrack_count()?;
        t.inbound_batch(
            settings.conntrack_connections,
            false,
            Some(CONNTRACK_FIRST_PORT),
        )?;
        let mid = t.conntrack_count()?;
        t.dns_batch(settings.conntrack_connections)?;
        let after = t.conntrack_count()?;
        t.inbound_conntrack = mid.saturating_sub(before);
        t.dns_conntrack = after.saturating_sub(mid);
    }
    for t in &mut twins {
        t.inbound_batch(settings.warmup, true, None)?;
        t.dns_batch(settings.warmup)?;
    }
    say(format!(
        "the whole pod: {} rounds of {} inbound connections and DNS lookups per backend",
        settings.rounds, settings.batch
    ));
    for _ in 0..settings.rounds {
        for t in &mut twins {
            let r = t.inbound_batch(settings.batch, true, None)?;
            t.cps
                .push(settings.batch as f64 / (r.elapsed_ns as f64 / 1e9));
            t.inbound_ns.extend(r.latency_ns);
            t.sockopt_ns.extend(r.sockopt_ns);
            let r = t.dns_batch(settings.batch)?;
            t.dns_ns.extend(r.latency_ns);
        }
    }
    let rows = twins.iter_mut().map(|t| t.row(settings)).collect();
    for t in &mut twins {
        if let Some((cookie, p)) = t.registered.take() {
            interceptor.unregister(cookie, &p)?;
        }
    }
    Ok(rows)
}
