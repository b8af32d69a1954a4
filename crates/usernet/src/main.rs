//! usernet: user-mode networking for containers and virtual machines.
//!
//! The binary is a thin layer over the network core (`usernet_core`) and the host side
//! (`usernet_host`): one module per command (`run`, `serve`, `port`), the options the
//! network commands share (`net_opts`) and the one function that starts the network
//! for both (`network`); `completions` and `man` generate the shell completions and the
//! man page from the command line's definition, and `logging` writes the log lines.

mod completions;
mod inspect;
mod limit_opts;
mod logging;
mod man;
mod modes;
mod net_opts;
mod network;
mod port;
mod run;
mod serve;
mod watch;

use clap::{Parser, Subcommand};

use usernet_host::exit_code;

#[derive(Parser, Debug)]
#[command(
    name = "usernet",
    version = env!("USERNET_VERSION"),
    about = "User-mode networking for containers and virtual machines",
    after_help = "Drop-in modes: started as `slirp4netns`, `pasta`, `vpnkit` or `gvproxy` (a symlink), or as `usernet NAME ARGS...`\n(e.g. `usernet pasta ARGS...`), usernet takes that program's command line (see `usernet pasta --help`)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: logging::LogOpts,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run COMMAND in new network and mount namespaces with full outbound networking.
    Run(run::RunArgs),
    /// Serve virtual machines (QEMU, vfkit, BESS, stdio) and existing namespaces until signalled.
    Serve(serve::ServeArgs),
    /// List, publish and unpublish ports of a running usernet through its `--api` socket.
    Port(port::PortArgs),
    /// Print the completion script of a shell (e.g. `usernet completions bash > /etc/bash_completion.d/usernet`).
    Completions(completions::CompletionsArgs),
    /// Print the man page, usernet(1) or a command's (`usernet man run | man -l -`).
    Man(man::ManArgs),
    /// List the usernets running for this user: pid, mode, guests, uptime, ports.
    Ps(inspect::ps::PsArgs),
    /// Show the connections of a running usernet: endpoints, state, bytes, age, idle time.
    Flows(inspect::flows::FlowsArgs),
    /// Watch a running usernet live: rates and totals, its flows fastest first.
    Top(inspect::top::TopArgs),
    /// Write a live pcap stream of a running usernet to stdout (`| tcpdump -r -`) or a file.
    Capture(inspect::capture::CaptureArgs),
}

fn main() {
    std::process::exit(run_cli());
}

/// Entry point: parses the command line, runs the command, returns the exit status.
fn run_cli() -> i32 {
    // Before any socket: published ports and flows each hold a descriptor.
    usernet_core::fd_limit::raise();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some((mode, args)) = modes::select(&argv) {
        // Each mode sets up logging itself, at the level its options ask for.
        return mode(args);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit_code::USERNET_FAILED } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    logging::init(cli.log.level(), cli.log.format);
    let result = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Serve(args) => serve::main(args),
        Command::Port(args) => port::main(args),
        Command::Completions(args) => completions::main(args),
        Command::Man(args) => man::main(args),
        Command::Ps(args) => inspect::ps::main(args),
        Command::Flows(args) => inspect::flows::main(args),
        Command::Top(args) => inspect::top::main(args),
        Command::Capture(args) => inspect::capture::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line either way: JSON readers of stderr get an event, people a sentence.
            match cli.log.format {
                logging::LogFormat::Text => eprintln!("usernet: {e:#}"),
                logging::LogFormat::Json => tracing::error!("{e:#}"),
            }
            exit_code::USERNET_FAILED
        }
    }
}

/// Logs to stderr at `level` (RUST_LOG, when set, decides instead), in the form
/// USERNET_LOG_FORMAT names: for the drop-in modes, which take no usernet flags.
fn init_logging(level: &str) {
    logging::init(level, logging::LogFormat::from_env());
}
