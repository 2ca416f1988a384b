//! A real container runtime for the tests: Debian's podman (rootful, its
//! CNI network backend, runc) with everything of its own under one
//! temporary directory — storage (`vfs`), run state, libpod's tmpdir, the
//! CNI configuration directory, the plugins' directory, host-local's leases
//! — started inside a network namespace the test made (`nsenter --net`, so
//! the bridge the CNI plugin creates is there, not on the host), and
//! placing its containers under a cgroup the test made (`--cgroup-parent`).
//! Dropped: every container removed, and the cgroup v1 directories runc
//! made beside the v2 one (this machine's hierarchy is hybrid) removed,
//! children first.
//!
//! Images come from local files only: [`Podman::busybox`] imports a root
//! filesystem of Debian's `busybox-static`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{Cgroup, Netns};

/// The image [`Podman::busybox`] makes.
pub const BUSYBOX: &str = "localhost/divert-test-busybox:1";

/// One isolated podman. `network` is the CNI network containers join.
pub struct Podman {
    pub dir: tempfile::TempDir,
    netns: PathBuf,
    /// The containers' cgroup parent, as a path below the cgroup mounts.
    cgroup_parent: String,
    pub network: String,
}

impl Podman {
    /// A podman whose network `name` is a bridge (`10.212.N.0/24`, the
    /// bridge `.1` in `netns`) followed by `chained` plugins (each a CNI
    /// plugin configuration), found in `plugin_dirs` before Debian's
    /// `/usr/lib/cni`. Containers go under `cgroup`.
    pub fn new(
        netns: &Netns,
        cgroup: &Cgroup,
        n: u32,
        chained: Vec<Value>,
        plugin_dirs: &[&Path],
    ) -> Result<Podman> {
        let dir = tempfile::Builder::new()
            .prefix("divert-podman-")
            .tempdir()?;
        let cg2 = divert::cgroup::cgroup2_mount()?;
        let cgroup_parent = format!(
            "/{}",
            cgroup
                .path
                .strip_prefix(&cg2)
                .context("the containers' cgroup is not under the cgroup2 mount")?
                .display()
        );
        let network = format!("divert-test-{n}");
        let netd = dir.path().join("net.d");
        std::fs::create_dir(&netd)?;
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": format!("dtbr{n}"),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("10.212.{n}.0/24")}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": dir.path().join("leases"),
            }
        })];
        plugins.extend(chained);
        let conflist = json!({"cniVersion": "1.0.0", "name": network, "plugins": plugins});
        std::fs::write(
            netd.join(format!("{network}.conflist")),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        let mut dirs: Vec<String> = plugin_dirs
            .iter()
            .map(|d| format!("{:?}", d.display().to_string()))
            .collect();
        dirs.push("\"/usr/lib/cni\"".into());
        // The sandbox's hard limits are lower than podman's defaults.
        std::fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[containers]\n\
                 default_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 cni_plugin_dirs = [{}]\n\
                 network_config_dir = {:?}\n\
                 default_network = {network:?}\n\
                 [engine]\n\
                 runtime = \"runc\"\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"none\"\n",
                dirs.join(", "),
                netd.display().to_string(),
            ),
        )?;
        Ok(Podman {
            dir,
            netns: netns.path(),
            cgroup_parent,
            network,
        })
    }

    /// `podman ARGS…` as configured, not yet run.
    pub fn command(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("podman")
            .arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--storage-driver", "vfs"])
            .env("CONTAINERS_CONF", d.join("containers.conf"));
        cmd
    }

    /// Run `podman ARGS…` to the end.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        self.command()
            .args(args)
            .output()
            .with_context(|| format!("podman {}", args.join(" ")))
    }

    /// `podman run` arguments that place a container on `network` (this
    /// podman's own, `none`, `ns:PATH`) and under this podman's cgroup.
    pub fn run_on(&self, network: &str) -> Vec<String> {
        vec![
            "run".into(),
            "--network".into(),
            network.into(),
            "--cgroup-parent".into(),
            self.cgroup_parent.clone(),
        ]
    }

    /// Import a root filesystem of `/bin/busybox` (Debian's busybox-static)
    /// as [`BUSYBOX`].
    pub fn busybox(&self) -> Result<()> {
        let root = self.dir.path().join("busybox-root");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .context("/bin/busybox (Debian's busybox-static; `cargo xtask setup`)")?;
        for applet in ["sh", "nc", "sleep", "echo", "cat", "seq", "true"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        let tar = self.dir.path().join("busybox.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()?;
        if !out.status.success() {
            bail!("tar: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = self.run(&["import", &tar.display().to_string(), BUSYBOX])?;
        if !out.status.success() {
            bail!("podman import: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        // runc's cgroupfs manager makes the parent's path in every v1
        // hierarchy too, from its first component down (the v2 one is the
        // test's own and goes with it).
        let Some(first) = self.cgroup_parent.trim_start_matches('/').split('/').next() else {
            return;
        };
        if first.is_empty() {
            return;
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines() {
            let f: Vec<&str> = m.split_whitespace().collect();
            if f.len() > 2 && f[2] == "cgroup" {
                remove_tree(&Path::new(f[1]).join(first));
            }
        }
    }
}

/// Remove a cgroup v1 directory and its children, deepest first (each as
/// `divert::cgroup::remove_cgroup` does: conmon leaves its cgroup a moment
/// after `podman rm` returns, so a busy one is waited for).
fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = divert::cgroup::remove_cgroup(dir);
}
