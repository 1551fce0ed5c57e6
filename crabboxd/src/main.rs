//! The `crabboxd` binary: parses flags, initialises logging, loads
//! configuration, binds the socket (or takes it from systemd), and calls
//! [`crabboxd::run`]. Exit codes: 0 after a clean shutdown, 1 on a runtime
//! error (including "already running"), 2 on an unknown flag (clap's), 64 on
//! a bad flag value or configuration error.

#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use crabboxd::{
    config::{Config, Overrides},
    platform::socket::{ApiListener, BindError},
};

/// The per-user Crabbox workstation daemon.
///
/// Serves the crabboxd gRPC API on a private Unix socket and supervises
/// egress host bridges, lease heartbeats and run attach feeds. Usually
/// started by systemd (`systemctl --user start crabboxd`), launchd, or
/// `crabboxctl daemon start`; run it directly to keep it in the foreground.
#[derive(Debug, Parser)]
#[command(name = "crabboxd", version, about, long_about)]
struct Flags {
    /// The API socket path [default: $XDG_RUNTIME_DIR/crabbox/crabboxd.sock].
    #[arg(long, env = "CRABBOX_SOCKET")]
    socket: Option<PathBuf>,
    /// The daemon TOML file [default: <config dir>/crabbox/crabboxd.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The coordinator base URL (overrides CRABBOX_COORDINATOR and the files).
    #[arg(long)]
    coordinator: Option<String>,
    /// The log filter, e.g. `info` or `info,crabboxd::supervisor=debug`
    /// (overrides CRABBOX_LOG).
    #[arg(long)]
    log: Option<String>,
    /// Where persisted state lives [default: <state dir>/crabbox].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print an example crabboxd.toml and exit.
    #[arg(long)]
    print_example_config: bool,
    /// Print the crabboxd(1) man page (roff) and exit; used by packaging.
    #[arg(long, hide = true)]
    print_man_page: bool,
}

/// Exit code for bad flag values and configuration errors (BSD `EX_USAGE`);
/// clap itself exits 2 on a flag it does not know.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let flags = Flags::parse();
    if flags.print_example_config {
        print!("{}", crabboxd::config::EXAMPLE_TOML);
        return ExitCode::SUCCESS;
    }
    if flags.print_man_page {
        use clap::CommandFactory as _;
        let man = clap_mangen::Man::new(Flags::command());
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("crabboxd: cannot write the man page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // Everything the daemon creates is private to the user, whatever the
    // umask it inherited.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));

    let overrides = Overrides {
        config_file: flags.config,
        socket: flags.socket,
        coordinator: flags.coordinator,
        log: flags.log,
        state_dir: flags.state_dir,
    };
    let config = match Config::load(&overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crabboxd: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Err(e) = crabboxd::telemetry::init(&config.log_filter) {
        eprintln!("crabboxd: cannot initialise logging: {e:#}");
        return ExitCode::from(EX_USAGE);
    }

    // Raise the soft open-file limit before anything is opened, and say so once.
    match crabboxd::platform::nofile::raise() {
        Ok(n) if n.soft > n.before => tracing::info!(
            from = n.before,
            to = n.soft,
            hard = n.hard,
            egress_socket_budget = crabboxd::platform::nofile::egress_socket_budget(),
            "raised the soft open-file limit (RLIMIT_NOFILE) to the hard limit"
        ),
        Ok(n) => tracing::info!(
            soft = n.soft,
            hard = n.hard,
            egress_socket_budget = crabboxd::platform::nofile::egress_socket_budget(),
            "open-file limit (RLIMIT_NOFILE) already at the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }

    let listener = match bind(&config) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("crabboxd: {e}");
            return ExitCode::FAILURE;
        }
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("crabboxd")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crabboxd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Handlers are installed before `run` reports READY, so a SIGTERM
        // that follows READY at once still drains instead of killing.
        let shutdown = signals()?;
        crabboxd::run(config, listener, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "crabboxd failed");
            ExitCode::FAILURE
        }
    }
}

/// Takes the socket from systemd when socket-activated, else binds the
/// configured or default path.
fn bind(config: &Config) -> Result<ApiListener, BindError> {
    if let Some(l) = ApiListener::from_systemd()? {
        return Ok(l);
    }
    let path = config
        .socket
        .clone()
        .or_else(crabbox_api::paths::default_socket_path)
        .ok_or_else(|| BindError::Dir {
            path: PathBuf::from("~"),
            source: std::io::Error::other("cannot determine a runtime directory; pass --socket"),
        })?;
    ApiListener::bind(&path)
}

/// Installs SIGTERM and SIGINT handlers and returns a future that
/// completes on the first of them.
fn signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
