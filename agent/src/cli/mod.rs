//! The `divert` binary's subcommands, one module each.

pub mod cni;
pub mod daemon;
pub mod explain;
pub mod init;
pub mod inspect;
pub mod maps;
pub mod run;
pub mod stats;
pub mod validate;

use std::process::ExitCode;

/// Exit status for bad input and for a setup that could not be completed
/// (nothing is left applied), as clap uses for usage errors.
pub const EXIT_SETUP: u8 = 2;

/// Print `err` with its causes as `divert <cmd>: error: …` and return [`EXIT_SETUP`].
pub fn fail(cmd: &str, err: &anyhow::Error) -> ExitCode {
    eprintln!("divert {cmd}: error: {err:#}");
    ExitCode::from(EXIT_SETUP)
}
