//! The `crabbox-coordinator` binary: parse flags, bind, call [`crabbox_coordinator::serve`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crabbox_coordinator::{Config, auth};

/// Self-hostable crabbox coordinator (leases, runs, control socket, egress pairing) on SQLite.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// SQLite database path (default: the user data dir).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Allow a non-loopback listen address. Put TLS in front of it.
    #[arg(long)]
    public: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Token utilities.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a signed `cbxu_` user token (needs CRABBOX_SESSION_SECRET).
    Issue {
        /// Owner (usually an email).
        #[arg(long)]
        owner: String,
        /// Org label.
        #[arg(long)]
        org: String,
        /// Login name.
        #[arg(long)]
        login: String,
        /// Lifetime, e.g. `30d`, `12h`.
        #[arg(long, default_value = "180d")]
        ttl: humantime::Duration,
    },
}

fn default_db() -> anyhow::Result<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "crabbox")
        .context("no home directory for the default --db")?;
    Ok(dirs.data_dir().join("coordinator.db"))
}

/// Whatever `CRABBOX_LOG` says, the HTTP/WebSocket/TLS libraries stay at
/// `info`: at `debug`/`trace` they log requests with their headers (bearer
/// tokens, bridge tickets).
fn clamp_secret_dumpers() -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::LevelFilter;
    [
        "tungstenite",
        "tokio_tungstenite",
        "hyper",
        "hyper_util",
        "h2",
        "http",
        "axum",
        "tower",
        "tower_http",
        "rustls",
        "reqwest",
    ]
    .into_iter()
    .fold(
        tracing_subscriber::filter::Targets::new().with_default(LevelFilter::TRACE),
        |t, target| t.with_target(target, LevelFilter::INFO),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = tracing_subscriber::EnvFilter::try_from_env("CRABBOX_LOG")
        .unwrap_or_else(|_| "info".into());
    // One filter, both rules: its level hint is the lower of the two (info
    // by default), so disabled `debug!`/`trace!` call sites on the relay's
    // per-message path are skipped at once instead of asking the filter on
    // every call (a separate clamp layer made the hint `trace`).
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only on a terminal: journald and log files get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(env.and(clamp_secret_dumpers())),
        )
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("crabbox-coordinator: {err:#}");
            // 64 = EX_USAGE: configuration and flag errors.
            ExitCode::from(64)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Token {
        command:
            TokenCommand::Issue {
                owner,
                org,
                login,
                ttl,
            },
    }) = cli.command
    {
        let cfg = Config::from_env(PathBuf::new());
        let secret = cfg
            .session_secret
            .as_ref()
            .context("CRABBOX_SESSION_SECRET is not set")?;
        if cfg.shared_token.as_ref() == Some(secret) {
            anyhow::bail!("CRABBOX_SESSION_SECRET must differ from CRABBOX_SHARED_TOKEN");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        println!(
            "{}",
            auth::issue_user_token(secret, &owner, &org, &login, now, ttl.as_secs() as i64)
        );
        return Ok(());
    }
    if !cli.listen.ip().is_loopback() && !cli.public {
        anyhow::bail!(
            "refusing to listen on non-loopback {} without --public",
            cli.listen
        );
    }
    if cli.public && !cli.listen.ip().is_loopback() {
        tracing::warn!(listen = %cli.listen, "listening publicly over plain HTTP: terminate TLS in front of the coordinator");
    }
    let db = match cli.db {
        Some(db) => db,
        None => default_db()?,
    };
    let config = Config::from_env(db);
    config.validate()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(cli.listen).await.with_context(|| format!("bind {}", cli.listen))?;
        tracing::info!(listen = %listener.local_addr()?, db = %config.db_path.display(), "crabbox-coordinator listening");
        crabbox_coordinator::serve(config, listener, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
