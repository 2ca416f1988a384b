//! `docs/cli.md` is `divert --help` and every subcommand's `--help`, as the
//! binary prints them: the command-line reference is generated from clap,
//! never written by hand. Run with `DIVERT_BLESS=1` to rewrite the file
//! after changing a flag; without it, a difference fails with the command
//! to run.

use std::{path::Path, process::Command};

use divert_tests::divert_bin;

const SUBCOMMANDS: [&str; 6] = ["run", "init", "daemon", "maps", "stats", "explain"];

fn help(args: &[&str]) -> String {
    let out = Command::new(divert_bin())
        .args(args)
        .arg("--help")
        // The help shows `[env: X=value]` for set variables: none here.
        .env_clear()
        .env("COLUMNS", "100")
        .output()
        .expect("running divert --help");
    assert!(out.status.success(), "divert {args:?} --help failed");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

fn reference() -> String {
    let mut s = String::from(
        "# divert command-line reference\n\n\
         Generated from the binary's own `--help` (`tests/tests/cli_reference.rs`; \
         `DIVERT_BLESS=1 cargo test --test cli_reference` rewrites it). \
         The manual ([manual.md](manual.md)) says what the commands do; \
         this is every flag, its environment variable and its default.\n\n\
         ## `divert`\n\n```text\n",
    );
    s.push_str(help(&[]).trim_end());
    s.push_str("\n```\n");
    for sub in SUBCOMMANDS {
        s.push_str(&format!("\n## `divert {sub}`\n\n```text\n"));
        s.push_str(help(&[sub]).trim_end());
        s.push_str("\n```\n");
    }
    s
}

#[test]
fn docs_cli_md_is_the_binarys_help() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli.md");
    let want = reference();
    if std::env::var_os("DIVERT_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/cli.md is not what the binary's --help says; \
         run `DIVERT_BLESS=1 cargo test --test cli_reference` and commit docs/cli.md"
    );
}
