//! `daemon start` and `daemon restart`: through the service manager when its
//! unit is installed, else by spawning crabboxd detached with its output in
//! a private log file; then a bounded wait until the socket answers.

use std::{
    fs,
    io::{self, IsTerminal as _, Read as _, Seek as _, Write as _},
    os::unix::{
        fs::{DirBuilderExt as _, OpenOptionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use crabbox_api::{Client, v1::GetStatusResponse, version::Skew};

use super::stop;
use crate::{
    Ctx, dirs,
    exit::{Code, Failure},
    output,
    service::Platform,
};

/// Flags of `daemon start` and `daemon restart`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The crabboxd binary to spawn when no service manager is used
    /// [default: next to crabboxctl, else on PATH].
    #[arg(long, env = "CRABBOXD_BIN", value_name = "PATH")]
    daemon_bin: Option<PathBuf>,

    /// Where a spawned daemon's output goes [default:
    /// $XDG_STATE_HOME/crabbox/crabboxd.log; ~/Library/Logs/crabbox/crabboxd.log on macOS].
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,

    /// How long to wait for the daemon to answer, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    timeout: u64,

    /// Spawn crabboxd directly even when a systemd unit or launchd agent is
    /// installed.
    #[arg(long)]
    no_manager: bool,

    /// Extra arguments for a spawned crabboxd, after `--` (for example
    /// `-- --config ./crabboxd.toml`). They imply --no-manager.
    #[arg(last = true, value_name = "CRABBOXD_ARGS")]
    daemon_args: Vec<String>,
}

impl StartArgs {
    /// The service manager to go through, if any: only when its unit is
    /// installed and the socket is the one the unit's daemon binds.
    fn manager(&self, socket: &Path) -> Option<Platform> {
        if self.no_manager || !self.daemon_args.is_empty() || !dirs::is_manager_socket(socket) {
            return None;
        }
        Platform::native().filter(|p| p.installed_unit().is_some())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

/// Runs `daemon start`.
pub async fn start(ctx: &Ctx, args: &StartArgs) -> anyhow::Result<Code> {
    if let Some(status) = probe(&ctx.socket).await {
        outln!(
            "crabboxd is already running: pid {}, version {}, at {}",
            status.pid,
            status.version,
            ctx.socket.display()
        )?;
        return Ok(Code::Ok);
    }
    let status = match args.manager(&ctx.socket) {
        Some(platform) => {
            eprintln!("starting crabboxd with `{}`", platform.start_command());
            platform.start().await?;
            wait_until_answering(&ctx.socket, args.timeout(), None).await?
        }
        None => spawn(ctx, args).await?,
    };
    report_started(&ctx.socket, &status)?;
    Ok(Code::Ok)
}

/// Runs `daemon restart`.
pub async fn restart(ctx: &Ctx, args: &StartArgs) -> anyhow::Result<Code> {
    let status = match args.manager(&ctx.socket) {
        Some(platform) => {
            let state = platform.state().await;
            if !state.running && probe(&ctx.socket).await.is_some() {
                // A daemon started outside the manager holds the socket and
                // the lock; the managed one would refuse to start.
                stop::stop_running(ctx, None).await?;
            }
            eprintln!("restarting crabboxd with {}", platform.name());
            platform.restart().await?;
            wait_until_answering(&ctx.socket, args.timeout(), None).await?
        }
        None => {
            stop::stop_running(ctx, None).await?;
            spawn(ctx, args).await?
        }
    };
    report_started(&ctx.socket, &status)?;
    Ok(Code::Ok)
}

fn report_started(socket: &Path, status: &GetStatusResponse) -> std::io::Result<()> {
    outln!(
        "crabboxd is running: pid {}, version {}, at {}",
        status.pid,
        status.version,
        socket.display()
    )?;
    let skew = Skew::of(&status.version, status.protocol);
    if skew != Skew::None {
        eprintln!(
            "warning: {skew} (if a service unit runs an older binary, run `crabboxctl daemon install` again)"
        );
    }
    Ok(())
}

/// Spawns crabboxd in its own process group, detached from this terminal,
/// with stdout and stderr appended to a 0600 log file, then waits for it.
async fn spawn(ctx: &Ctx, args: &StartArgs) -> anyhow::Result<GetStatusResponse> {
    let bin = dirs::find_crabboxd(args.daemon_bin.as_deref())?;
    let log_path = match &args.log_file {
        Some(p) => p.clone(),
        None => dirs::default_log_file()?,
    };
    let mut log = open_log(&log_path)?;
    // Remember where this run's output starts, to quote it if it fails.
    let offset = log.seek(io::SeekFrom::End(0))?;
    writeln!(
        log,
        "--- {} crabboxctl daemon start: {} --socket {}",
        output::rfc3339(output::now_unix_ms()),
        bin.display(),
        ctx.socket.display()
    )?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket")
        .arg(&ctx.socket)
        .args(&args.daemon_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // A new process group keeps the terminal's Ctrl-C and hangup away
        // from the daemon once crabboxctl returns.
        .process_group(0);
    // These describe *this* process's supervisor. Inherited, they would make
    // crabboxd log to journald, notify a manager that did not start it, or
    // look for sockets it was never passed.
    for var in [
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    eprintln!(
        "started {} (pid {}); log: {}",
        bin.display(),
        child.id(),
        log_path.display()
    );
    wait_until_answering(
        &ctx.socket,
        args.timeout(),
        Some(Spawned {
            child: &mut child,
            log: &log_path,
            offset,
        }),
    )
    .await
}

/// Opens the log for appending, creating it 0600 in a 0700 directory: the
/// daemon's output can name leases and coordinator URLs.
fn open_log(path: &Path) -> anyhow::Result<fs::File> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .read(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))
}

/// A daemon this invocation spawned, watched while waiting so that an early
/// exit is reported at once with its log instead of after the timeout.
pub struct Spawned<'a> {
    child: &'a mut Child,
    log: &'a Path,
    offset: u64,
}

/// Asks the daemon for its status with a short bound, for "is it up?".
pub async fn probe(socket: &Path) -> Option<GetStatusResponse> {
    let attempt = async {
        let client = Client::connect(socket).await.ok()?;
        client.status().await.ok().map(|(s, _)| s)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// Polls the socket until GetStatus answers, the spawned child exits, or
/// `timeout` passes. On a terminal it shows the seconds waited.
pub async fn wait_until_answering(
    socket: &Path,
    timeout: Duration,
    mut spawned: Option<Spawned<'_>>,
) -> anyhow::Result<GetStatusResponse> {
    let started = tokio::time::Instant::now();
    let tty = io::stderr().is_terminal();
    let mut shown = 0;
    let mut delay = Duration::from_millis(20);
    // Erases the progress line, if one was drawn, before the result prints.
    let clear = |shown: u64| {
        if shown > 0 {
            eprint!("\r\x1b[K");
        }
    };
    loop {
        if let Some(status) = probe(socket).await {
            clear(shown);
            return Ok(status);
        }
        if let Some(s) = spawned.as_mut()
            && let Some(exit) = s.child.try_wait()?
        {
            clear(shown);
            return Err(exited_early(exit, s.log, s.offset).into());
        }
        let waited = started.elapsed();
        if waited >= timeout {
            clear(shown);
            return Err(Failure::error(format!(
                "crabboxd did not answer at {} within {}s",
                socket.display(),
                timeout.as_secs()
            ))
            .hint("see what it is doing with `crabboxctl daemon logs`")
            .into());
        }
        if tty && waited.as_secs() > shown {
            shown = waited.as_secs();
            eprint!("\rwaiting for crabboxd at {} ({shown}s)", socket.display());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Explains a daemon that exited before answering, quoting the end of what
/// it wrote to the log in this run.
fn exited_early(exit: std::process::ExitStatus, log: &Path, offset: u64) -> Failure {
    let mut tail = String::new();
    if let Ok(mut f) = fs::File::open(log)
        && f.seek(io::SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.take(64 * 1024).read_to_string(&mut tail);
    }
    let lines: Vec<&str> = tail.lines().skip(1).collect();
    let quoted: String = lines[lines.len().saturating_sub(20)..]
        .iter()
        .map(|l| format!("\n  | {l}"))
        .collect();
    let mut f = Failure::error(format!(
        "crabboxd exited ({exit}) before it answered; the end of {}:{quoted}",
        log.display()
    ));
    match exit.code() {
        Some(64) => {
            f = f.hint("exit 64 means its configuration is invalid: fix the file named above")
        }
        Some(1) => {
            f = f.hint("is another crabboxd already running? see `crabboxctl daemon status`")
        }
        _ => {}
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{os::unix::process::ExitStatusExt as _, process::ExitStatus};

    #[test]
    fn early_exit_quotes_only_this_runs_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/crabboxd.log");
        let mut f = open_log(&log).unwrap();
        writeln!(f, "old run").unwrap();
        let offset = f.seek(io::SeekFrom::End(0)).unwrap();
        writeln!(f, "--- header\nerror: unknown key `foo` in crabboxd.toml").unwrap();
        let failure = exited_early(ExitStatus::from_raw(64 << 8), &log, offset);
        assert!(
            failure.message.contains("| error: unknown key `foo`"),
            "{}",
            failure.message
        );
        assert!(!failure.message.contains("old run"));
        assert!(!failure.message.contains("header"));
        assert!(failure.hints[0].contains("configuration is invalid"));
        let mode = fs::metadata(&log).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let dir_mode = fs::metadata(log.parent().unwrap()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&dir_mode) & 0o777,
            0o700
        );
    }

    #[test]
    fn daemon_args_bypass_the_manager() {
        let args = StartArgs {
            daemon_bin: None,
            log_file: None,
            timeout: 1,
            no_manager: false,
            daemon_args: vec!["--config".into(), "x".into()],
        };
        assert_eq!(args.manager(&dirs::manager_socket().unwrap()), None);
    }

    #[tokio::test]
    async fn waiting_on_a_missing_socket_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let err = wait_until_answering(
            &dir.path().join("none.sock"),
            Duration::from_millis(100),
            None,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
    }
}
