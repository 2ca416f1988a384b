//! The `divert` binary.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use divert::cli;

/// Transparent outbound interception for service meshes, with eBPF.
#[derive(Parser, Debug)]
#[command(name = "divert", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command with its outbound TCP diverted to the local proxy.
    Run(cli::run::RunArgs),
    /// Configure interception for this network namespace, as the init
    /// container of a meshed pod (a drop-in for istio-iptables).
    Init(cli::init::InitArgs),
    /// The node agent: own the pinned programs at the cgroup root and serve
    /// the pods' registrations.
    Daemon(cli::daemon::DaemonArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DIVERT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match &cli.command {
        Command::Run(args) => {
            let sub = matches.subcommand_matches("run").expect("run was matched");
            cli::run::main(args, sub)
        }
        Command::Init(args) => {
            let sub = matches
                .subcommand_matches("init")
                .expect("init was matched");
            cli::init::main(args, sub)
        }
        Command::Daemon(args) => cli::daemon::main(args),
    }
}
