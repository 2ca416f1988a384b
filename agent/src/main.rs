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

    /// Log line format on stderr: `text` for people, `json` (one object per
    /// line) for a cluster's log pipeline. The level is DIVERT_LOG
    /// (tracing's env-filter syntax; default info for the daemon, warn
    /// otherwise).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "DIVERT_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command with its outbound TCP diverted to the local proxy.
    Run(cli::run::RunArgs),
    /// Configure interception for this network namespace, as the init
    /// container of a meshed pod (a drop-in for istio-iptables). A flag
    /// given twice takes its last value, as istio-iptables'.
    #[command(args_override_self = true)]
    Init(cli::init::InitArgs),
    /// `divert init` as istio-iptables: the command line Istio's injector
    /// writes (`istio-iptables ARGS…`), its exit statuses (1 on error, 126
    /// when --run-validation fails). A binary named `istio-iptables` runs
    /// this.
    #[command(name = "istio-iptables", args_override_self = true)]
    IstioIptables(cli::init::InitArgs),
    /// The node agent: own the pinned programs at the cgroup root and serve
    /// the pods' registrations.
    Daemon(cli::daemon::DaemonArgs),
    /// List every registered policy in the node's pinned maps: ranges,
    /// ports, proxy IDs, pod, who registered it and when.
    Maps(cli::maps::MapsArgs),
    /// Connections and bytes per destination and verdict, redirected and
    /// passed through alike.
    Stats(cli::stats::StatsArgs),
    /// What divert does with one connect, and which rule decides, step by
    /// step, from the live maps.
    Explain(cli::explain::ExplainArgs),
}

/// The binary's arguments; invoked as `istio-iptables` (a symlink in an
/// image), they are `divert istio-iptables` ones.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_os_string());
    if invoked_as.as_deref() == Some(std::ffi::OsStr::new("istio-iptables")) {
        args[0] = "divert".into();
        args.insert(1, "istio-iptables".into());
    }
    args
}

fn main() -> ExitCode {
    // Run as `divert-cni` (the conflist's `type`): a CNI plugin, whose
    // interface is CNI_* variables and stdin, not a command line.
    let invoked_as = std::env::args_os().next().and_then(|a| {
        std::path::Path::new(&a)
            .file_name()
            .map(|n| n.to_os_string())
    });
    if invoked_as.as_deref() == Some(std::ffi::OsStr::new("divert-cni")) {
        let filter = tracing_subscriber::EnvFilter::try_from_env("DIVERT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .json()
            .init();
        return cli::cni::main();
    }
    let matches = Cli::command().get_matches_from(args());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The daemon says what it does (info); the one-shot commands only warn.
    let default_level = match cli.command {
        Command::Daemon(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DIVERT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match &cli.command {
        Command::Run(args) => {
            let sub = matches.subcommand_matches("run").expect("run was matched");
            cli::run::main(args, sub)
        }
        Command::Init(args) => {
            let sub = matches
                .subcommand_matches("init")
                .expect("init was matched");
            cli::init::main(args, sub, cli::init::Mode::Init)
        }
        Command::IstioIptables(args) => {
            let sub = matches
                .subcommand_matches("istio-iptables")
                .expect("istio-iptables was matched");
            cli::init::main(args, sub, cli::init::Mode::IstioIptables)
        }
        Command::Daemon(args) => cli::daemon::main(args),
        Command::Maps(args) => cli::maps::main(args),
        Command::Stats(args) => cli::stats::main(args),
        Command::Explain(args) => cli::explain::main(args),
    }
}
