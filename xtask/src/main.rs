//! `cargo xtask setup | test | bench | demo | image`: the project's own way
//! to get a fresh machine ready, prove it, measure it, show it, and ship it.
//!
//! `setup` is idempotent and quiet when everything is present: Debian
//! packages (LLVM 22 for bpf-linker, iptables, nftables, bpftool, curl,
//! squid, dig for the DNS tests, podman with runc, the CNI plugins and
//! busybox-static for the container runtime tests, mmdebstrap for the
//! image), the nightly toolchain with `rust-src`, and `bpf-linker` built
//! against LLVM 22. `fonts-dejavu-core` is there for the benchmark's chart.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod image;

/// Debian packages the build, the tests and the demo need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iptables",
    "nftables",
    "bpftool",
    // `cargo xtask bench --perf`.
    "linux-perf",
    "iproute2",
    "curl",
    "squid",
    "bind9-dnsutils",
    "fonts-dejavu-core",
    // A real container runtime for the CNI plugin's test.
    "podman",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    // `cargo xtask image`.
    "mmdebstrap",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every prerequisite (idempotent).
    Setup,
    /// Set up, build, build the image (`image`), and run every test
    /// (kernel tests need root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build (release), and benchmark divert's eBPF redirect against
    /// its iptables rules and no interception (needs root). Writes
    /// target/bench/{results.json,run.json,summary.txt,connect-latency.png}.
    Bench {
        /// A few minutes on two cores: 1 and 10,000 ranges, fewer samples.
        #[arg(long)]
        quick: bool,
        /// Also sample the eBPF programs' call stacks with `perf record`
        /// and report where their time goes.
        #[arg(long)]
        perf: bool,
    },
    /// Set up, build, and run the end-to-end demo (needs root).
    Demo,
    /// Set up and build divert's OCI image (needs root): the release
    /// binary on a Debian root filesystem made by mmdebstrap, loaded into
    /// podman and written to target/image/divert-<tag>.oci.tar.
    Image {
        /// The image's tag (default: the workspace version).
        #[arg(long)]
        tag: Option<String>,
    },
}

/// Build "the other release" of the upgrade test (`tests/tests/upgrade.rs`):
/// divert with the `upgrade-test` feature (other program instructions,
/// other map layouts), copied to target/upgrade-test/divert before the
/// normal build puts its own binary back in target/debug. Returns its path.
fn upgrade_test_build() -> Result<PathBuf> {
    cargo(&[
        "build",
        "-p",
        "divert",
        "--bin",
        "divert",
        "--features",
        "upgrade-test",
    ])?;
    let dir = target_dir().join("upgrade-test");
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("divert");
    std::fs::copy(target_dir().join("debug/divert"), &bin)
        .with_context(|| format!("copying the upgrade-test build to {}", bin.display()))?;
    Ok(bin)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Test { args } => {
            setup()?;
            require_root("cargo xtask test")?;
            let other = upgrade_test_build()?;
            cargo(&["build", "--bins"])?;
            clippy_kernel()?;
            // The image test runs what `cargo xtask image` made.
            let archive = image::build(&image::default_tag())?;
            let mut a = vec!["test"];
            a.extend(args.iter().map(String::as_str));
            cargo_test(
                &a,
                &[
                    ("DIVERT_IMAGE_ARCHIVE", archive.as_os_str()),
                    ("DIVERT_UPGRADE_TEST_BIN", other.as_os_str()),
                ],
            )
        }
        Cmd::Bench { quick, perf } => {
            setup()?;
            require_root("cargo xtask bench")?;
            cargo(&["build", "--release", "--bins"])?;
            let mut c = Command::new(target_dir().join("release/divert-bench"));
            c.arg("--out").arg(target_dir().join("bench"));
            if quick {
                c.arg("--quick");
            }
            if perf {
                c.arg("--perf");
            }
            run(c)
        }
        Cmd::Image { tag } => {
            setup()?;
            require_root("cargo xtask image")?;
            image::build(&tag.unwrap_or_else(image::default_tag)).map(|_| ())
        }
        Cmd::Demo => {
            setup()?;
            require_root("cargo xtask demo")?;
            cargo(&["build", "--bins"])?;
            run(Command::new(target_dir().join("debug/divert-demo")))
        }
    }
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root: it makes network namespaces and cgroups and loads eBPF programs");
    }
    Ok(())
}

/// Effective UID 0, read from /proc/self/status (xtask has no libc dependency).
fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"))
}

fn run(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(root_dir());
    run(cmd)
}

/// `cargo test ARGS`, its output passed through, then one closing line
/// summing every test binary's `test result:` line: `N passed, M failed`.
fn cargo_test(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .envs(env.iter().copied())
        .current_dir(root_dir())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().context("spawning cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(what)) = (w.next(), w.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\nall test binaries: {passed} passed, {failed} failed, {ignored} ignored");
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}

/// Lint the kernel crate, which builds only for `bpfel-unknown-none` (it
/// is not a default member, so `cargo clippy` alone never sees it): warnings
/// are errors.
fn clippy_kernel() -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        "clippy",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
    .current_dir(root_dir().join("ebpf"))
    // The workspace's cargo sets these for its own toolchain; the nightly
    // cargo must choose its own.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("CARGO")
    .env_remove("RUSTUP_TOOLCHAIN");
    run(cmd)
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    apt()?;
    nightly()?;
    bpf_linker()
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .map(|s| !s.contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root("installing Debian packages")?;
    eprintln!("xtask setup: installing {}", missing.join(" "));
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

fn nightly() -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    );
    match installed {
        Some(list) => {
            // rust-src builds `core` for the BPF target; clippy lints the
            // kernel crate (`cargo xtask test`).
            let missing: Vec<&str> = ["rust-src", "clippy"]
                .into_iter()
                .filter(|c| !list.lines().any(|l| l.starts_with(c)))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            eprintln!(
                "xtask setup: adding {} to the nightly toolchain",
                missing.join(" ")
            );
            let mut c = Command::new("rustup");
            c.args(["component", "add", "--toolchain", "nightly"])
                .args(&missing);
            run(c)
        }
        None => {
            eprintln!("xtask setup: installing the nightly toolchain with rust-src");
            let mut c = Command::new("rustup");
            c.args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                "--component",
                "clippy",
            ]);
            run(c)
        }
    }
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)"
    );
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ])
    .env("PATH", path);
    run(c)
}
