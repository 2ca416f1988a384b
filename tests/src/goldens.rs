//! istio-iptables' expected rules per test case
//! (`tests/testdata/istio-iptables/*.golden`), and the policy `divert init`
//! makes of each case's flags.

use std::{fs, path::PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser};
use divert::{
    cli::init::InitArgs,
    policy::{Capture, Policy},
};

/// One golden file: its flags, whether the namespace has IPv6, and the
/// iptables-restore input istio-iptables writes per family (`v6` empty
/// without IPv6). A case with DNS capture names its nameservers
/// (`nameservers: 127.0.0.53 ::127.0.0.53`, possibly none): they are written
/// to a resolv.conf of the case's own, and `--resolv-conf` with its path is
/// added to the flags; the file is removed when the last golden of its
/// load is dropped.
pub struct Golden {
    pub name: String,
    pub flags: Vec<String>,
    pub ipv6: bool,
    /// Why the case cannot be applied in a test namespace (`apply: no
    /// (why)`), if it cannot; its rendering is still compared.
    pub not_applied: Option<String>,
    pub v4: String,
    pub v6: String,
    /// The `nft -f` script istio-nftables writes (`--- nft`; its goldens
    /// only).
    pub nft: String,
    /// Holds the resolv.conf files the flags name.
    _files: std::sync::Arc<tempfile::TempDir>,
}

/// Every istio-iptables golden file (`testdata/istio-iptables/`), by name.
pub fn goldens() -> Vec<Golden> {
    load("testdata/istio-iptables")
}

/// Every istio-nftables golden file (`testdata/istio-nftables/`), by name.
pub fn nft_goldens() -> Vec<Golden> {
    load("testdata/istio-nftables")
}

fn load(under: &str) -> Vec<Golden> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(under);
    let files = std::sync::Arc::new(
        tempfile::Builder::new()
            .prefix("divert-goldens-")
            .tempdir()
            .expect("a directory for the goldens' resolv.conf files"),
    );
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).expect(under) {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("golden") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        let mut g = Golden {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            flags: vec![],
            ipv6: false,
            not_applied: None,
            v4: String::new(),
            v6: String::new(),
            nft: String::new(),
            _files: files.clone(),
        };
        let mut cur = 0;
        for line in text.lines() {
            if let Some(f) = line.strip_prefix("flags:") {
                g.flags.splice(0..0, f.split_whitespace().map(String::from));
            } else if let Some(ns) = line.strip_prefix("nameservers:") {
                let conf = resolv_conf(files.path(), &g.name, ns.split_whitespace());
                g.flags.extend(["--resolv-conf".to_string(), conf]);
            } else if let Some(v) = line.strip_prefix("apply: no") {
                g.not_applied = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("ipv6:") {
                g.ipv6 = v.trim() == "yes";
            } else if line == "--- iptables" {
                cur = 4;
            } else if line == "--- ip6tables" {
                cur = 6;
            } else if line == "--- nft" {
                cur = 1;
            } else if cur == 1 {
                g.nft += &format!("{line}\n");
            } else if cur == 4 {
                g.v4 += &format!("{line}\n");
            } else if cur == 6 {
                g.v6 += &format!("{line}\n");
            }
        }
        out.push(g);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A resolv.conf naming `servers`, written in `dir`; its path.
fn resolv_conf<'a>(
    dir: &std::path::Path,
    case: &str,
    servers: impl Iterator<Item = &'a str>,
) -> String {
    let path = dir.join(format!("{case}.resolv.conf"));
    let text: String = servers.map(|s| format!("nameserver {s}\n")).collect();
    fs::write(&path, text).expect("writing a golden's resolv.conf");
    path.to_string_lossy().into_owned()
}

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

/// The outbound policy and capture settings `divert init FLAGS…` builds
/// (flags, environment, defaults).
pub fn settings_for(flags: &[String]) -> anyhow::Result<(Policy, Capture)> {
    let m = Cli::command().try_get_matches_from(
        std::iter::once("divert-init".to_string()).chain(flags.iter().cloned()),
    )?;
    let cli = Cli::from_arg_matches(&m)?;
    cli.init.settings(Some(&m))
}

/// The outbound policy of [`settings_for`].
pub fn policy_for(flags: &[String]) -> anyhow::Result<Policy> {
    Ok(settings_for(flags)?.0)
}
