//! Builds the kernel programs (`ebpf/`, for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker) so the agent can embed the object.
use aya_build::{build_ebpf, Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let common = concat!(env!("CARGO_MANIFEST_DIR"), "/../common");
    println!("cargo:rerun-if-changed={common}");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_UPGRADE_TEST");
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_UPGRADE_TEST").is_some() {
        &["upgrade-test"]
    } else {
        &[]
    };
    build_ebpf(
        [Package {
            name: "divert-ebpf",
            root_dir: root,
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
