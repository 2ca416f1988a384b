//! divert: transparent outbound interception for service meshes, with eBPF.
//!
//! * [`policy`]: the Istio policy model and [`policy::verdict()`], the
//!   reference every backend agrees with.
//! * [`ebpf`]: loading, attaching and filling the kernel programs and maps.
//! * [`iptables`]: the same policy as istio-iptables' NAT rules, for pods
//!   where eBPF is not allowed; [`nftables`]: istio-nftables' tables
//!   (`--native-nftables`).
//! * [`cgroup`], [`netns`]: the kernel objects a policy is attached to.
//! * [`conflist`]: chaining `divert-cni` into the node's CNI configuration.
//! * [`sidecar`]: which pods are meshed, and their policy, as istio-cni
//!   reads a pod.
//! * [`cli`]: one module per subcommand of the `divert` binary.
//!
//! `ARCHITECTURE.md` at the repository root tells how flags become a verdict
//! in the kernel.

pub mod cgroup;
pub mod cli;
pub mod conflist;
pub mod daemon;
pub mod ebpf;
pub mod iptables;
pub mod netns;
pub mod nftables;
pub mod policy;
pub mod sidecar;
