//! `crabboxctl`: the thin CLI of crabboxd. It parses flags, resolves the
//! socket, runs one subcommand (connect, one RPC or stream, render) and maps
//! failures to a sentence, hints and a documented exit code.
//!
//! Layout: `commands/` holds one file per subcommand; `connect` turns
//! connection and gRPC failures into instructions; `output` renders human and
//! `--json` output; `service` drives systemd and launchd; `dirs` knows where
//! things live; `exit` owns the exit codes; `mcp` serves the same API as
//! MCP tools on stdio.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// `print!` that returns the write error instead of panicking, so a closed
/// pipe (`crabboxctl tasks --watch | head -1`) ends the command quietly.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` counterpart of [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod commands;
mod connect;
mod dirs;
mod exit;
mod mcp;
mod output;
mod service;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};
use crabbox_api::paths;

use crate::exit::{Code, Failure};

/// Talk to crabboxd, the per-user Crabbox workstation daemon.
///
/// crabboxctl sends gRPC requests over the daemon's Unix socket
/// ($XDG_RUNTIME_DIR/crabbox/crabboxd.sock by default) and renders the
/// replies. Read commands take --json (unstable format).
#[derive(Debug, Parser)]
#[command(
    name = "crabboxctl",
    version,
    long_version = LONG_VERSION,
    propagate_version = true,
    after_long_help = exit::EXIT_CODES_HELP,
)]
pub struct Cli {
    /// The daemon's socket [env: CRABBOX_SOCKET; default:
    /// $XDG_RUNTIME_DIR/crabbox/crabboxd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (local API protocol ",
    // Kept in step with crabbox_api::PROTOCOL by the `long_version_names_the_protocol` test.
    "1",
    ")"
);

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the daemon's version, configuration and task counts.
    Status(commands::status::Args),
    /// List the daemon's supervised tasks, or watch them change.
    Tasks(commands::tasks::Args),
    /// Start, stop, install or inspect the daemon process itself.
    Daemon(commands::daemon::Args),
    /// Check the socket, configuration, coordinator and versions; say what to fix.
    Doctor(commands::doctor::Args),
    /// Change the daemon's log filter until it exits.
    LogLevel(commands::log_level::Args),
    /// Keep leases alive through the daemon, release them, or list them.
    Lease(commands::lease::Args),
    /// Send one heartbeat for a lease now.
    Heartbeat(commands::heartbeat::Args),
    /// Run mediated egress for a lease: host bridges and helper tickets.
    Egress(commands::egress::Args),
    /// Launch the lease's browser through its egress.
    Desktop(commands::desktop::Args),
    /// Follow a run's events and exit with its exit code.
    Attach(commands::attach::Args),
    /// Run a command on a lease over the daemon's SSH connection.
    Exec(commands::exec::Args),
    /// Run a command on a lease as a run the daemon owns, recorded at the coordinator.
    Run(commands::run::Args),
    /// Copy files or directories to or from a lease (LEASE:path).
    Cp(commands::cp::Args),
    /// An rsh-compatible transport over the daemon's SSH connection (rsync -e).
    Rsh(commands::rsh::Args),
    /// An interactive shell on a lease over the daemon's SSH connection; --print shows the OpenSSH command line.
    Ssh(commands::ssh::Args),
    /// Forward a local loopback port to an address on a lease (list, stop).
    Forward(commands::forward::Args),
    /// Serve the daemon's API to coding agents over MCP on stdin/stdout.
    Mcp(mcp::Args),
    /// Print a shell completion script.
    Completions(commands::completions::Args),
    /// Write man pages (used by packaging).
    #[command(hide = true)]
    Man(commands::man::Args),
}

/// What every command gets: where the daemon's socket is.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The socket to talk to, from `--socket`, `CRABBOX_SOCKET` or the
    /// platform default.
    pub socket: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Code::Error.into();
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code.into(),
        // The reader went away (`| head`); what it read was complete.
        Err(err) if output::is_broken_pipe(&err) => Code::Ok.into(),
        Err(err) => {
            let (text, code) = exit::report(&err);
            eprintln!("{text}");
            code.into()
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Code> {
    // Completions and man pages never touch the daemon, so they do not
    // resolve the socket and work without a home directory.
    let socket = cli.socket;
    match cli.command {
        Command::Completions(args) => commands::completions::run(&args),
        Command::Man(args) => commands::man::run(&args),
        Command::Status(args) => commands::status::run(&ctx(socket)?, &args).await,
        Command::Tasks(args) => commands::tasks::run(&ctx(socket)?, &args).await,
        Command::Daemon(args) => commands::daemon::run(&ctx(socket)?, args).await,
        Command::Doctor(args) => commands::doctor::run(&ctx(socket)?, &args).await,
        Command::LogLevel(args) => commands::log_level::run(&ctx(socket)?, &args).await,
        Command::Lease(args) => commands::lease::run(&ctx(socket)?, &args).await,
        Command::Heartbeat(args) => commands::heartbeat::run(&ctx(socket)?, &args).await,
        Command::Egress(args) => commands::egress::run(&ctx(socket)?, &args).await,
        Command::Desktop(args) => commands::desktop::run(&ctx(socket)?, &args).await,
        Command::Attach(args) => commands::attach::run(&ctx(socket)?, &args).await,
        Command::Exec(args) => commands::exec::run(&ctx(socket)?, &args).await,
        Command::Run(args) => commands::run::run(&ctx(socket)?, &args).await,
        Command::Cp(args) => commands::cp::run(&ctx(socket)?, &args).await,
        Command::Rsh(args) => commands::rsh::run(&ctx(socket)?, &args).await,
        Command::Ssh(args) => commands::ssh::run(&ctx(socket)?, &args).await,
        Command::Forward(args) => commands::forward::run(&ctx(socket)?, &args).await,
        Command::Mcp(args) => mcp::run(&ctx(socket)?, &args).await,
    }
}

fn ctx(socket: Option<PathBuf>) -> anyhow::Result<Ctx> {
    let socket = socket
        .or_else(paths::default_socket_path)
        .ok_or_else(|| Failure {
            code: Code::Usage,
            message: "cannot work out where crabboxd's socket is (no runtime or home directory)"
                .into(),
            hints: vec!["pass --socket PATH or set CRABBOX_SOCKET".into()],
        })?;
    Ok(Ctx { socket })
}

/// The clap command, for completions and man pages.
pub fn cli_command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crabbox_api::version;

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn long_version_names_the_protocol() {
        assert_eq!(
            LONG_VERSION,
            format!(
                "{} (local API protocol {})",
                version::VERSION,
                version::PROTOCOL
            )
        );
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit status:"), "{help}");
        assert!(help.contains("3   crabboxd could not be reached"));
        assert!(help.contains("5   crabboxd answered but could not reach its coordinator"));
        assert!(
            help.contains("a negative code or one\nabove 255 becomes 1"),
            "{help}"
        );
        assert!(help.contains("format is not yet stable"));
    }

    #[test]
    fn socket_flag_is_global() {
        let cli =
            Cli::try_parse_from(["crabboxctl", "tasks", "--socket", "/x.sock", "--json"]).unwrap();
        assert_eq!(cli.socket.as_deref(), Some(std::path::Path::new("/x.sock")));
    }
}
