//! `cargo xtask image`: divert's OCI image, from this repository and
//! Debian's packages only (no registry of images is needed).
//!
//! 1. The base root filesystem: `mmdebstrap --variant=essential` of the
//!    host's Debian suite with [`IMAGE_PACKAGES`] (what the iptables backend
//!    runs), documentation left out but the copyright files. It is cached
//!    under `target/image/` by a hash of everything that makes it, so a
//!    rebuild of divert alone takes seconds.
//! 2. `podman build` of `deploy/image/Containerfile` (`FROM scratch`, the
//!    base as one layer, the release binary as another, divert as the
//!    entrypoint) with no network, tagged [`IMAGE_REPOSITORY`]`:<tag>`, the
//!    tag being the workspace version unless `--tag` says otherwise; the
//!    image is then in the machine's podman storage.
//! 3. `podman save --format oci-archive` to `target/image/divert-<tag>.oci.tar`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{cargo, root_dir, run, target_dir};

/// Where the manifests in deploy/ pull divert from.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/divert-dev/divert";

/// Debian packages in the image besides the essential ones: the tools the
/// iptables backend runs (`iptables-restore`, `nft`, `ip`), and the root
/// certificates the Kubernetes client loads when a kubeconfig names no CA.
pub const IMAGE_PACKAGES: &[&str] = &["iptables", "nftables", "iproute2", "ca-certificates"];

/// What the base is made with, beyond the suite and the packages.
const MMDEBSTRAP_OPTS: &[&str] = &[
    "--variant=essential",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
];

/// The tag `cargo xtask image` gives by default: the workspace version,
/// which `divert --version` prints.
pub fn default_tag() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Where `cargo xtask image` writes the archive for `tag`.
pub fn archive(tag: &str) -> PathBuf {
    target_dir()
        .join("image")
        .join(format!("divert-{tag}.oci.tar"))
}

/// Build the image; returns the archive's path.
pub fn build(tag: &str) -> Result<PathBuf> {
    cargo(&["build", "--release", "--bin", "divert"])?;
    let dir = target_dir().join("image");
    std::fs::create_dir_all(&dir)?;
    let base = base(&dir)?;

    let context = dir.join("context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir(&context)?;
    std::fs::hard_link(&base, context.join("rootfs.tar"))
        .or_else(|_| std::fs::copy(&base, context.join("rootfs.tar")).map(|_| ()))?;
    std::fs::copy(target_dir().join("release/divert"), context.join("divert"))?;
    let reference = format!("{IMAGE_REPOSITORY}:{tag}");
    let mut b = Command::new("podman");
    b.args(["build", "--network", "none", "--pull=never", "--tag"])
        .arg(&reference)
        .arg("--label")
        .arg(format!("org.opencontainers.image.version={tag}"))
        .arg("--label")
        .arg("org.opencontainers.image.title=divert")
        .arg("--file")
        .arg(root_dir().join("deploy/image/Containerfile"))
        .arg(&context);
    run(b)?;
    let out = archive(tag);
    let _ = std::fs::remove_file(&out);
    let mut s = Command::new("podman");
    s.args(["save", "--quiet", "--format", "oci-archive", "--output"])
        .arg(&out)
        .arg(&reference);
    run(s)?;
    std::fs::remove_dir_all(&context)?;
    eprintln!(
        "xtask image: {reference} is in podman's storage; its OCI archive is {}",
        out.display()
    );
    Ok(out)
}

/// The cached base root filesystem, made first if missing.
fn base(dir: &std::path::Path) -> Result<PathBuf> {
    let suite = suite()?;
    let mut key = format!("{suite} {}", IMAGE_PACKAGES.join(","));
    for o in MMDEBSTRAP_OPTS {
        key.push(' ');
        key.push_str(o);
    }
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    };
    let path = dir.join(format!("rootfs-{suite}-{hash:016x}.tar"));
    if path.is_file() {
        return Ok(path);
    }
    eprintln!("xtask image: making the base root filesystem with mmdebstrap ({suite})");
    let partial = path.with_extension("tar.partial");
    let mut m = Command::new("mmdebstrap");
    m.args(MMDEBSTRAP_OPTS)
        .arg(format!("--include={}", IMAGE_PACKAGES.join(",")))
        .arg("--quiet")
        .arg("--format=tar")
        .arg(&suite)
        .arg(&partial);
    run(m)?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// The host's Debian suite (`VERSION_CODENAME` of /etc/os-release): the
/// one its apt sources, and so the registry, serve.
fn suite() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("/etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .context("no VERSION_CODENAME in /etc/os-release")
}
