//! Labs with a backend in place, each able to take a policy and dial: the
//! eBPF programs ([`EbpfRig`]) or divert's iptables rules ([`IptablesRig`]).

use std::net::{IpAddr, SocketAddr};

use divert::{
    ebpf::Interceptor,
    iptables::{self, Family},
    policy::Policy,
};

use crate::{Daemon, Lab};

/// A lab with the programs attached, the peers running, and the client
/// namespace registered with whatever policy `set` was last given.
pub struct EbpfRig {
    pub lab: Lab,
    _daemons: Vec<Daemon>,
    interceptor: Interceptor,
    cookie: u64,
    local: Vec<IpAddr>,
    current: Option<Policy>,
}

impl EbpfRig {
    pub fn start() -> EbpfRig {
        let lab = Lab::new().expect("lab");
        let daemons = lab.start_peers().expect("peers");
        let (cookie, local) = lab.client_identity().expect("client identity");
        let mut interceptor = Interceptor::load().expect("load");
        interceptor
            .attach_workload(lab.workload.file().unwrap())
            .expect("attach workload");
        interceptor
            .attach_proxy(lab.proxy.file().unwrap())
            .expect("attach proxy");
        EbpfRig {
            lab,
            _daemons: daemons,
            interceptor,
            cookie,
            local,
            current: None,
        }
    }

    pub fn set(&mut self, mut p: Policy) -> Policy {
        p.local_addrs = self.local.clone();
        if let Some(old) = self.current.take() {
            self.interceptor
                .unregister(self.cookie, &old)
                .expect("unregister");
        }
        self.interceptor
            .register(self.cookie, &p, divert::ebpf::RegisteredBy::Run)
            .expect("register");
        self.current = Some(p.clone());
        p
    }

    pub fn dial(&self, dst: SocketAddr, uid: u32, gid: u32, mapped: bool) -> String {
        self.lab.dial(dst, uid, gid, mapped).expect("dial")
    }

    /// The client namespace's counters.
    pub fn counters(&self) -> Vec<divert::ebpf::Counter> {
        self.interceptor
            .counters()
            .expect("counters")
            .into_iter()
            .filter(|c| c.netns_cookie == self.cookie)
            .collect()
    }

    /// Attach inbound capture (the socket lookup program) to the client
    /// namespace, as `divert run` does for its own.
    pub fn attach_inbound(&mut self) {
        let netns = self.lab.client.file().expect("the client namespace");
        self.interceptor
            .attach_netns(&netns)
            .expect("attach socket lookup");
    }
}

/// A lab whose client namespace gets its policy as divert's iptables
/// backend writes it (both families, through the library's apply, as
/// `divert init --backend iptables` does), with the peers running. No eBPF
/// program is attached anywhere in its cgroups.
pub struct IptablesRig {
    pub lab: Lab,
    _daemons: Vec<Daemon>,
    local: Vec<IpAddr>,
}

impl IptablesRig {
    pub fn start() -> IptablesRig {
        let lab = Lab::new().expect("lab");
        let daemons = lab.start_peers().expect("peers");
        let (_, local) = lab.client_identity().expect("client identity");
        IptablesRig {
            lab,
            _daemons: daemons,
            local,
        }
    }

    /// Replace the client namespace's rules with `p`'s; returns `p` with
    /// the namespace's addresses (for `verdict()`).
    pub fn set(&mut self, p: Policy) -> Policy {
        self.set_with(p, &divert::policy::Capture::default())
    }

    /// [`IptablesRig::set`] with capture settings too.
    pub fn set_with(&mut self, mut p: Policy, capture: &divert::policy::Capture) -> Policy {
        p.local_addrs = self.local.clone();
        let policy = p.clone();
        let capture = capture.clone();
        self.lab
            .client
            .enter(move || -> anyhow::Result<()> {
                let mut sets = Vec::new();
                for f in [Family::V4, Family::V6] {
                    sets.push((iptables::detect(f)?, iptables::render(&policy, &capture, f)));
                }
                iptables::apply(&sets)
            })
            .expect("enter the client namespace")
            .expect("apply the iptables rules");
        p
    }

    pub fn dial(&self, dst: SocketAddr, uid: u32, gid: u32, mapped: bool) -> String {
        self.lab.dial(dst, uid, gid, mapped).expect("dial")
    }
}
